"""torch.distributed plumbing for commands started by ``torchrun`` or ``srun`` (one process per GPU or
CPU worker).

``torchrun --nproc-per-node N lt surface ...`` starts N copies of the same command line with the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``srun -n N lt surface ...`` starts them with ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``
instead, and the rendezvous is the first host of ``SLURM_STEP_NODELIST`` on a port derived from
``SLURM_JOB_ID`` (:func:`slurm_rendezvous`; torchrun's ``RANK`` wins when both are set).
:func:`launched` recognises either; :func:`init` joins the process group (``nccl`` with one GPU per
``LOCAL_RANK`` when the run is on CUDA, ``gloo`` on CPU) and :func:`destroy` leaves it.  A plain
``lt`` process is a group of one: every helper here then works without torch.distributed.

Process-group helpers only: this module imports no analysis.  How an analysis splits its units
over the ranks, votes and merges is :mod:`landscape_tools.engine`'s business; the collectives it
needs are few: :func:`barrier`, :func:`all_reduce` and :func:`all_ok` (did every rank succeed?, over
a gloo group of its own with a long timeout, :func:`vote_timeout`).
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError, LTError

__all__ = ["launched", "env_rank", "slurm_step", "slurm_rendezvous", "adopt_slurm_environment", "expand_hostlist",
           "init", "destroy", "Context", "barrier", "all_reduce", "all_ok", "rank_device", "RankFailed",
           "collective_timeout", "vote_timeout"]

#: default seconds a rank waits for the others at a collective of the job's group (nccl / gloo)
TIMEOUT_SECONDS = 30 * 60
#: default seconds a rank waits at a vote (:func:`all_ok`, a gloo group): long, because a rank with a
#: smaller share (or a finished rank file) arrives there long before the others
VOTE_TIMEOUT_SECONDS = 7 * 24 * 3600


def _seconds(name: str, default: float) -> _dt.timedelta:
    text = os.environ.get(name, "").strip()
    if not text:
        return _dt.timedelta(seconds=default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{name}={text!r} is not a positive number of seconds; unset it for the default "
                          f"({default:g} s)")
    return _dt.timedelta(seconds=value)


def collective_timeout() -> _dt.timedelta:
    """How long a collective of the job's process group (an all-reduce of Hessian products, a
    barrier) may wait: ``LT_COLLECTIVE_TIMEOUT`` seconds, default 30 minutes."""
    return _seconds("LT_COLLECTIVE_TIMEOUT", TIMEOUT_SECONDS)


def vote_timeout() -> _dt.timedelta:
    """How long a rank waits at a vote for the slowest rank: ``LT_VOTE_TIMEOUT`` seconds, default 7
    days (a job's time limit ends it first).  Votes run over their own gloo group, so this wait never
    meets the NCCL watchdog of the job's group."""
    return _seconds("LT_VOTE_TIMEOUT", VOTE_TIMEOUT_SECONDS)


class RankFailed(LTError):
    """Another rank of a torchrun job failed; this rank stops without writing the result."""


def _env_int(name: str, launcher: str = "torchrun") -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; it is set by {launcher}, "
                          f"unset it when not running under a launcher") from None


# ----------------------------------------------------------------------------- Slurm (srun without torchrun)
def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order: ``"gpu[03-05,07]"`` ->
    ``["gpu03", "gpu04", "gpu05", "gpu07"]``; ``"a1,b[1-2]"`` -> ``["a1", "b1", "b2"]``; several
    bracket groups in one name multiply (``"r[1-2]n[1-2]"`` -> r1n1 r1n2 r2n1 r2n2).  Zero padding is
    kept (the width of a range's first number).

    Raises:
        ConfigError: unbalanced brackets, an empty name, or a range that is not ``LO-HI`` with LO <= HI.
    """
    text = str(spec).strip()
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            break
        if ch == "," and depth == 0:
            item = text[start:i].strip()
            if not item:
                raise ConfigError(f"host list {spec!r} has an empty host name; expected e.g. gpu[03-05,07],cpu1")
            names.extend(_expand_one(item, spec))
            start = i + 1
    if depth != 0:
        raise ConfigError(f"host list {spec!r} has unbalanced brackets; expected e.g. gpu[03-05,07],cpu1")
    return names


def _expand_one(item: str, spec: str) -> list[str]:
    open_ = item.find("[")
    if open_ < 0:
        if "]" in item:
            raise ConfigError(f"host list {spec!r} has unbalanced brackets; expected e.g. gpu[03-05,07],cpu1")
        return [item]
    close = item.index("]", open_)
    prefix, body, rest = item[:open_], item[open_ + 1:close], item[close + 1:]
    values = []
    for part in body.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise ConfigError(f"host list {spec!r}: [{body}] is not a list of numbers and LO-HI ranges "
                              f"(LO <= HI), e.g. gpu[03-05,07]")
        width = len(lo)
        values.extend(f"{v:0{width}d}" for v in range(int(lo), int(hi if dash else lo) + 1))
    return [prefix + v + tail for v in values for tail in _expand_one(rest, spec)] if rest else \
        [prefix + v for v in values]


def slurm_step() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` of a task started by ``srun`` (no torchrun), or None.

    Read from ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``) and ``SLURM_LOCALID``,
    and only inside a job step (``SLURM_STEP_ID`` / ``SLURM_STEPID`` / ``SLURM_STEP_NUM_TASKS`` set): the
    batch script itself also has ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``, but runs once, so an
    ``lt`` started there directly is one process.  ``RANK`` set (torchrun) always wins over Slurm.
    """
    env = os.environ
    if env.get("RANK", "").strip() or not env.get("SLURM_PROCID", "").strip():
        return None
    if not any(env.get(k, "").strip() for k in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS")):
        return None
    world = _env_int("SLURM_STEP_NUM_TASKS", "srun")
    world = _env_int("SLURM_NTASKS", "srun") if world is None else world
    rank = _env_int("SLURM_PROCID", "srun")
    if world is None:
        return None
    local = _env_int("SLURM_LOCALID", "srun")
    if not 0 <= rank < world:
        raise ConfigError(f"SLURM_PROCID={rank} is outside 0..{world - 1} (SLURM_NTASKS={world}); start the tasks "
                          f"with srun, or unset the SLURM_* variables when not running under Slurm")
    return rank, world, rank if local is None else local


def slurm_rendezvous() -> tuple[str, int]:
    """``(MASTER_ADDR, MASTER_PORT)`` for the tasks of an srun step: the variables when set, else the
    first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``) and the port
    ``20000 + SLURM_JOB_ID % 20000`` (the same in every task of the job, different for jobs that share
    a node).

    Raises:
        ConfigError: no node list and no MASTER_ADDR; no job id and no MASTER_PORT; a bad host list.
    """
    env = os.environ
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if env.get(name, "").strip():
                addr = expand_hostlist(env[name])[0]
                break
        else:
            raise ConfigError("srun started several lt tasks but neither MASTER_ADDR nor SLURM_STEP_NODELIST / "
                              "SLURM_JOB_NODELIST is set; export MASTER_ADDR=<first node's host name>")
    port = _env_int("MASTER_PORT", "the job script")
    if port is None:
        job = _env_int("SLURM_JOB_ID", "Slurm")
        job = _env_int("SLURM_JOBID", "Slurm") if job is None else job
        if job is None:
            raise ConfigError("srun started several lt tasks but neither MASTER_PORT nor SLURM_JOB_ID is set; "
                              "export MASTER_PORT=<a free port, the same in every task>")
        port = 20000 + job % 20000
    return addr, port


def adopt_slurm_environment() -> bool:
    """Inside an ``srun`` step of several tasks (and without torchrun), export the torchrun-style
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` derived from Slurm,
    so torch's ``env://`` rendezvous and everything that reads ``RANK`` see one consistent job.
    Returns whether it did.  Called by ``lt`` at start-up and by :func:`init`."""
    step = slurm_step()
    if step is None or step[1] <= 1:
        return False
    rank, world, local = step
    addr, port = slurm_rendezvous()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), MASTER_ADDR=addr,
                      MASTER_PORT=str(port))
    return True


def launched() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE`` > 1) or by
    ``srun`` (a job step of more than one task)."""
    step = slurm_step()
    if step is not None:
        return step[1] > 1
    world = _env_int("WORLD_SIZE")
    return world is not None and world > 1 and _env_int("RANK") is not None


def env_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (torchrun's ``RANK`` /
    ``WORLD_SIZE`` / ``LOCAL_RANK``, else an srun step's ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
    ``SLURM_LOCALID``); ``(0, 1, 0)`` without one.

    Raises:
        ConfigError: inconsistent values (rank outside ``0..world_size-1``).
    """
    if not launched():
        return 0, 1, 0
    step = slurm_step()
    if step is not None:
        return step
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK")
    local = rank if local is None else local
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); start the job with torchrun")
    return rank, world, local


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of this rank: any CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process);
    CPU stays CPU.

    Raises:
        ConfigError: fewer visible GPUs than processes on this node.
    """
    if device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ConfigError(f"torchrun started process {local_rank} on this node but only {n} GPU(s) are visible; "
                          f"use --nproc-per-node {n} (one process per GPU)")
    return torch.device("cuda", local_rank)


@dataclass
class Context:
    """Where this process stands in the job: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False
    vote_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: torch.device) -> Context:
    """Join the torchrun process group (no-op for a single process).

    Args:
        device: the device the command resolved (``--device``); CUDA selects ``nccl`` and pins this
            process to ``cuda:LOCAL_RANK``, anything else uses ``gloo``.

    Returns:
        The :class:`Context` of this process (its ``device`` is the per-rank device).

    Raises:
        ConfigError: broken launcher environment, too few GPUs.
    """
    rank, world, local = env_rank()
    if world == 1:
        return Context(0, 1, 0, device, False)
    import torch.distributed as dist

    adopt_slurm_environment()      # srun without torchrun: the env:// rendezvous reads MASTER_ADDR/PORT

    dev = rank_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"backend": backend, "rank": rank, "world_size": world, "timeout": collective_timeout()}
        if backend == "nccl":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    # votes (did every rank succeed?) wait for the slowest rank: their own gloo group, long timeout
    group = dist.new_group(backend="gloo", timeout=vote_timeout())
    return Context(rank, world, local, dev, True, group)


def destroy(ctx: Context) -> None:
    """Leave the process group (safe to call twice or for a single process)."""
    if ctx.initialised:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        ctx.initialised = False


def _tensor_device(ctx: Context) -> torch.device:
    return ctx.device if ctx.device.type == "cuda" else torch.device("cpu")


def barrier(ctx: Context) -> None:
    """Wait until every rank arrives (no-op for one process)."""
    if ctx.initialised:
        import torch.distributed as dist
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index or 0])
        else:
            dist.barrier()


def all_reduce(ctx: Context, values, op: str = "sum") -> torch.Tensor:
    """Sum / min / max of ``values`` over all ranks; returns a new tensor on the values' device.

    Args:
        ctx: the job context.
        values: a tensor or anything ``torch.as_tensor`` takes.
        op: ``sum``, ``min`` or ``max``.
    """
    t = torch.as_tensor(values)
    if not ctx.initialised:
        return t.clone()
    import torch.distributed as dist
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ConfigError(f"all_reduce op {op!r}: expected one of {sorted(ops)}")
    work = t.detach().to(_tensor_device(ctx), copy=True)
    dist.all_reduce(work, op=ops[op])
    return work.to(t.device)


def all_ok(ctx: Context, ok: bool) -> list[int]:
    """Share whether each rank succeeded; returns the ranks that failed (empty: all fine).

    Runs over the context's vote group (gloo, :func:`vote_timeout`) when it has one, so a rank that
    got here early waits for the others however long their share takes."""
    flags = torch.zeros(ctx.world_size, dtype=torch.int64)
    flags[ctx.rank] = 0 if ok else 1
    if ctx.initialised and ctx.vote_group is not None:
        import torch.distributed as dist
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=ctx.vote_group)
    else:
        flags = all_reduce(ctx, flags, "sum")
    return [int(r) for r in torch.nonzero(flags).flatten()]
