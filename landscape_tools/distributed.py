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

The commands split their work like ``--shard RANK/WORLD_SIZE`` and gather on rank 0, so the
collectives needed are few: :func:`barrier`, :func:`all_reduce` and :func:`all_ok` (did every rank
succeed?); the results travel through files (``OUT.rank<r>of<n>.h5``), which also makes every rank's
share resumable.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError, LTError
from .streaming import select

__all__ = ["launched", "env_rank", "slurm_step", "slurm_rendezvous", "adopt_slurm_environment", "expand_hostlist",
           "init", "destroy", "Context", "barrier", "all_reduce", "all_ok", "rank_device",
           "RankFailed", "shard_path", "run_surface", "run_hessian", "merge_rows", "dataset_share"]

#: how long a rank waits for the others at a collective before giving up
TIMEOUT = _dt.timedelta(minutes=30)


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
        kwargs = {"backend": backend, "rank": rank, "world_size": world, "timeout": TIMEOUT}
        if backend == "nccl":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    return Context(rank, world, local, dev, True)


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
    """Share whether each rank succeeded; returns the ranks that failed (empty: all fine)."""
    flags = torch.zeros(ctx.world_size, dtype=torch.int64)
    flags[ctx.rank] = 0 if ok else 1
    flags = all_reduce(ctx, flags, "sum")
    return [int(r) for r in torch.nonzero(flags).flatten()]


# ----------------------------------------------------------------------------- lt surface under torchrun
def shard_path(output, rank: int, world_size: int):
    """The file rank ``rank`` writes its share to: ``OUT.h5`` -> ``OUT.rank0of2.h5`` next to it."""
    from pathlib import Path
    p = Path(output)
    return p.with_name(f"{p.stem}.rank{rank}of{world_size}{p.suffix or '.h5'}")


def run_surface(ctx: Context, jobs, output, x, y=None, *, mc: int = 0, bn: str = "frozen", seed: int = 0,
                shard=None, overwrite: bool = False, command=None, config=None, device: str = "cpu", progress=None,
                **kwargs):
    """:func:`landscape_tools.surface.run_surface` shared between the ranks of a torchrun job.

    Rank ``r`` of ``n`` computes the points of ``--shard r/n`` into :func:`shard_path` (resumable like
    any run: its ``.partial`` file survives a kill), then rank 0 merges the shards into ``output``
    with :func:`landscape_tools.surface.merge_shards` and removes them.  A shard file already finished
    by an earlier, interrupted job of the same run is reused.  With one process this is exactly
    ``surface.run_surface``.

    Returns:
        The output path (on every rank, once rank 0 has written it).

    Raises:
        StoreError: a shard file of a different run is in the way (and no ``overwrite``).
        RankFailed: another rank failed; this one's shard is kept for a rerun.
        Whatever ``run_surface`` / ``merge_shards`` raise on this rank.
    """
    from pathlib import Path

    import numpy as np

    from . import store
    from . import surface as S
    from .errors import StoreError

    if ctx.distributed and shard is not None:
        raise ConfigError("--shard cannot be combined with torchrun: the ranks already share the points")
    if not ctx.distributed:
        return S.run_surface(jobs, output, x, y, mc=mc, bn=bn, seed=seed, shard=shard, overwrite=overwrite,
                             command=command, config=config, device=device, progress=progress, **kwargs)
    shards = [shard_path(output, r, ctx.world_size) for r in range(ctx.world_size)]
    mine = shards[ctx.rank]
    error = None
    try:
        reuse = False
        if mine.exists() and not overwrite:
            xs = np.asarray(x, np.float64)
            ys = None if y is None else np.asarray(y, np.float64)
            options = S.surface_options(mc, bn, seed, kwargs.get("precision", "fp32"))
            want = S._digest(S.run_fingerprint(jobs, xs, ys, options))
            old = store.read_result(mine).attrs
            if (old.get("surface_fingerprint") != want or int(old.get("shard", -1)) != ctx.rank
                    or int(old.get("n_shards", -1)) != ctx.world_size):
                raise StoreError(f"{mine} holds a shard of a different run; remove it or pass --overwrite")
            reuse = True
        if not reuse:
            S.run_surface(jobs, str(mine), x, y, mc=mc, bn=bn, seed=seed, shard=(ctx.rank, ctx.world_size),
                          overwrite=overwrite, command=command, config=config, device=device, progress=progress,
                          **kwargs)
    except Exception as exc:  # every rank must reach the vote below, or the others wait forever
        error = exc
    _gather_on_main(ctx, error, shards, output,
                    lambda: S.merge_shards([str(s) for s in shards], output, overwrite=overwrite, command=command),
                    kept="finished shards and partial progress", gathered="merge the shards")
    return Path(output)


def _gather_on_main(ctx: "Context", error: Exception | None, shards, output, gather, kept: str, gathered: str) -> None:
    """After every rank computed its shard (``error``: this rank's failure, if any): vote, let rank 0
    run ``gather()`` and remove the shard files, vote again.  Every rank calls this, so none waits forever."""
    failed = all_ok(ctx, error is None)
    if error is not None:
        raise error
    if failed:
        raise RankFailed(f"rank(s) {', '.join(map(str, failed))} of {ctx.world_size} failed (see their messages); "
                         f"{kept} are kept next to {output}: rerun the same command to resume")
    if ctx.is_main:
        try:
            gather()
            for s in shards:
                s.unlink(missing_ok=True)
        except Exception as exc:
            error = exc
    failed = all_ok(ctx, error is None)
    if error is not None:
        raise error
    if failed:
        raise RankFailed(f"rank 0 could not {gathered} into {output} (see its message)")


# ----------------------------------------------------------------------------- lt hessian under torchrun
def run_hessian(ctx: Context, jobs, output, *, scope: str = "batch", overwrite: bool = False, command=None,
                **kwargs):
    """:func:`landscape_tools.hessian.run_hessian` with the batches (rows) shared between the ranks.

    ``scope="batch"``: rank ``r`` of ``n`` computes rows ``r, r + n, ...`` of every model (one
    Hessian per batch, each depending only on its batch and the seeds) into :func:`shard_path`,
    resumably; rank 0 then gathers the rows into ``output`` (:func:`merge_rows`) and removes the rank
    files.  A rank file finished by an earlier, interrupted job is resumed from (its fingerprint is
    checked).

    ``scope="dataset"``: one Hessian of the mean loss over all batches, its products shared
    (:func:`_run_hessian_dataset`): rank ``r`` forms the products of batches ``r, r + n, ...`` and an
    all-reduce adds them up; the solvers run in lock-step on every rank and rank 0 alone writes
    ``output`` (resumable per model, like one process).

    With one process this is exactly ``hessian.run_hessian``.

    Returns:
        The output path (on every rank).

    Raises:
        RankFailed: another rank failed.
        Whatever ``run_hessian`` / :func:`merge_rows` raise on this rank.
    """
    from pathlib import Path

    from . import hessian as H
    from . import store

    if not ctx.distributed:
        H.run_hessian(jobs, output, scope=scope, overwrite=overwrite, command=command, **kwargs)
        return Path(output)
    if scope == "dataset":
        _run_hessian_dataset(ctx, jobs, output, overwrite=overwrite, command=command, **kwargs)
        return Path(output)
    shards = [shard_path(output, r, ctx.world_size) for r in range(ctx.world_size)]
    mine = shards[ctx.rank]
    n_rows = max(len(j.batches) for j in jobs)
    error = None
    try:
        partial = store.partial_path(mine)
        if mine.exists() and not overwrite and not partial.exists():
            os.replace(mine, partial)   # finished earlier: resume from it (refused if another run's)
        H.run_hessian(jobs, str(mine), scope=scope, overwrite=overwrite, command=command,
                      only_rows=range(ctx.rank, n_rows, ctx.world_size), **kwargs)
    except Exception as exc:  # every rank must reach the vote below
        error = exc
    _gather_on_main(ctx, error, shards, output,
                    lambda: merge_rows([str(s) for s in shards], output, overwrite=overwrite),
                    kept="finished rows", gathered="gather the rows")
    return Path(output)


def dataset_share(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` forms the products of under ``--scope dataset``: every
    ``world_size``-th one from ``rank`` (balanced to within one batch; may be empty)."""
    return list(range(int(rank), int(n_batches), int(world_size)))


def _vote(ctx: Context, error: BaseException | None, what: str) -> None:
    """Every rank calls this at the same point: raise this rank's error, or :class:`RankFailed` when
    another rank reported one."""
    failed = all_ok(ctx, error is None)
    if error is not None:
        raise error
    if failed:
        raise RankFailed(f"rank(s) {', '.join(map(str, failed))} of {ctx.world_size} failed {what} "
                         f"(see their messages)")


def _run_hessian_dataset(ctx: Context, jobs, output, *, overwrite: bool = False, command=None, progress=None,
                         on_row=None, only_rows=None, **kwargs) -> None:
    """``--scope dataset`` under torchrun: the products of every model's Hessian are shared between
    the ranks and all-reduced (:class:`landscape_tools.hessian.SharedDataOperator`).

    Every rank validates the options and runs the same solvers on the same seeded vectors (they stay
    in lock-step because every rank receives the same summed products); rank 0 alone opens
    ``output``'s partial file, writes each finished model and renames the file at the end.  Each step
    that can fail on one rank only (opening the file, a product, a write, the final rename) is
    followed by a vote, so a failing rank stops the others instead of leaving them waiting; a model
    finished before a failure (or an earlier kill) stays in the partial file and is not recomputed
    when the same command runs again.
    """
    import numpy as np

    from . import hessian as H
    from . import store

    if only_rows is not None:
        raise ConfigError("only_rows applies to --scope batch")
    n_models = len(jobs)
    error, part, plan = None, None, None
    done = torch.zeros(n_models, dtype=torch.int64)
    try:
        plan = H.plan_run(jobs, scope="dataset", command=command, **kwargs)
        if ctx.is_main:
            part = store.open_partial(output, plan.root, plan.fingerprint, plan.layout, overwrite=overwrite)
            for i, job in enumerate(jobs):
                done[i] = int(bool(np.asarray(part.read(f"{job.label}/done")).all()))
    except Exception as exc:  # every rank must reach the vote below
        error = exc
    # one collective: who failed, and which models rank 0 found finished in a partial file
    flags = torch.zeros(ctx.world_size + n_models, dtype=torch.int64)
    flags[ctx.rank] = 0 if error is None else 1
    if ctx.is_main:
        flags[ctx.world_size:] = done
    flags = all_reduce(ctx, flags, "sum")
    failed = [int(r) for r in torch.nonzero(flags[:ctx.world_size]).flatten()]
    try:
        if error is not None:
            raise error
        if failed:
            raise RankFailed(f"rank(s) {', '.join(map(str, failed))} of {ctx.world_size} failed before starting "
                             f"(see their messages); nothing was computed")
        done = flags[ctx.world_size:].bool().tolist()
        opts = plan.options
        todo = [i for i in range(n_models) if not done[i]]

        def reduce(t):
            return all_reduce(ctx, t, "sum")

        for count, ji in enumerate(todo, start=1):
            job = jobs[ji]
            share = dataset_share(len(job.batches), ctx.rank, ctx.world_size)

            def make(idx, _job=job, _share=share):
                return H.SharedDataOperator(_job.model, select(_job.batches, idx), _share, reduce,
                                            rank=ctx.rank, world_size=ctx.world_size, params=opts["params"],
                                            weight_decay=opts["weight_decay"], mc_seed=opts["mc_seed"],
                                            form=opts["form"], precision=opts["precision"],
                                            sub_batch=opts["sub_batch"])

            error = None
            try:
                res = H.top_eigenvalues(
                    job.model, job.batches, k=opts["k"], which=opts["which"], method=opts["method"],
                    tol=opts["tol"], max_iter=opts["max_iter"], params=opts["params"],
                    weight_decay=opts["weight_decay"], mc_seed=opts["mc_seed"], scope="dataset", seed=opts["seed"],
                    trace=opts["trace"], trace_probes=opts["trace_probes"], density=opts["density"],
                    density_runs=opts["density_runs"], density_steps=opts["density_steps"], form=opts["form"],
                    precision=opts["precision"], sub_batch=opts["sub_batch"], make_operator=make, label=job.label,
                    save_vectors=opts["save_vectors"])
                if ctx.is_main:
                    H.write_row(part, job.label, 0, res)
            except Exception as exc:
                error = exc
            _vote(ctx, error, f"while computing {job.label}; finished models are kept in "
                              f"{store.partial_path(output)}: rerun the same command to resume")
            if ctx.is_main:
                from .device import report
                report(progress, count, len(todo), f"{job.label}: top {res.eigenvalues[0][0]:.5g}")
                if on_row is not None:
                    on_row(ji, 0)
        error = None
        if ctx.is_main:
            try:
                part.finalize()
            except Exception as exc:
                error = exc
        _vote(ctx, error, f"writing {output}")
    finally:
        if part is not None:
            part.close()


def merge_rows(paths, output, overwrite: bool = False):
    """Join result files of one run whose models each computed some rows (``done`` flags).

    Every dataset whose first dimension is the number of rows is taken, row by row, from the file
    that computed the row; everything else from the first file.

    Raises:
        StoreError: files of different runs (fingerprints), rows computed twice or by no file.
    """
    import numpy as np

    from . import store
    from .errors import StoreError

    results = [store.read_result(p) for p in paths]
    fps = {r.attrs.get("fingerprint") for r in results}
    if len(fps) != 1 or None in fps:
        raise StoreError(f"{', '.join(map(str, paths))} are not the rank files of one run (fingerprints differ); "
                         f"remove them and run again")
    models = {}
    for label, base in results[0].models.items():
        node = _as_dict(base)
        done = np.zeros(base.data["done"].shape, dtype=bool)
        for r in results:
            if label not in r.models:
                raise StoreError(f"{r.path} has no model {label!r}: not a rank file of the same run")
            d = r.models[label].data["done"].astype(bool)
            if (d & done).any():
                raise StoreError(f"{r.path} repeats row(s) {np.flatnonzero(d & done).tolist()} of {label}")
            _copy_rows(node, r.models[label], d)
            done |= d
        if not done.all():
            raise StoreError(f"rows {np.flatnonzero(~done).tolist()} of {label} were computed by no rank; "
                             f"rerun the same command to finish them")
        node["data"]["done"] = done
        models[label] = node
    return store.write_result(output, results[0].attrs, models, overwrite=overwrite)


def _as_dict(node) -> dict:
    return {"attrs": dict(node.attrs),
            "data": {k: ((v.copy(), node.data_attrs[k]) if node.data_attrs.get(k) else v.copy())
                     for k, v in node.data.items()},
            "groups": {k: _as_dict(g) for k, g in node.groups.items()}}


def _copy_rows(dst: dict, src, rows) -> None:
    n = rows.shape[0]
    for name, value in src.data.items():
        if name == "done" or value.ndim == 0 or value.shape[0] != n:
            continue
        target = dst["data"][name]
        target = target[0] if isinstance(target, tuple) else target
        target[rows] = value[rows]
    for name, group in src.groups.items():
        _copy_rows(dst["groups"][name], group, rows)
