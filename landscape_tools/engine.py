"""The run engine: how every analysis (hessian, surface, featvar, evaluate) runs into its result file.

An analysis is a list of *units* (hessian: the rows, one Hessian per batch; surface: grid points, or
(repeat, grid point) pairs with ``--repeats K``;
featvar and evaluate: data batches), a frozen options dataclass validated once when it is made
(:class:`~landscape_tools.hessian.HessianOptions`, :class:`~landscape_tools.surface.SurfaceOptions`,
:class:`~landscape_tools.featvar.FeatvarOptions`, :class:`~landscape_tools.evaluate.EvaluateOptions`:
the CLI builds one and passes it to the analysis' run function), a way to compute the units it is
given, a result layout with a ``done`` mask over the units, and a merge that assembles units
computed elsewhere.  This module owns everything around that, once for all four:

- **one fingerprint scheme** (:func:`run_identity`): the SHA-256 of a JSON document holding the
  result kind, the analysis' key (its options, :func:`options_key`: ``dataclasses.asdict`` of the
  options less the fields that change only memory or speed, tagged with the class name; its models
  and data), the seed scheme and the runtime (device kind and TF32 setting, :func:`runtime`).  It is stored in every file as
  ``run_fingerprint`` (the same for every shard of one run) with the readable document in
  ``run_key``; ``fingerprint`` adds the shard (``I/N``) and is what a ``.partial`` file is resumed by.
- **resume** (:func:`open_run`): the ``.partial`` file is resumed unit by unit; a partial file of
  another run is refused with the first difference spelled out (another device kind, another
  seed scheme, another option, options recorded before they were a dataclass ...), never resumed
  with other masks.
- **the unit loop** (:func:`run_units`, every analysis): compute one unit, write finished units
  (every unit, or in batches), report ``progress(done, total, message)``; on SIGINT / SIGTERM
  (raised at a progress call or inside a unit) the finished units are written, the unit in progress
  is dropped, and the exception leaves through the caller's ``finally``, which closes the partial
  file and releases the lock; :mod:`landscape_tools.cli.main` turns it into exit 130 / 143.
  Hessian rows are its units (:func:`landscape_tools.hessian.top_eigenvalues` and ``run_hessian``
  run them through it); the row computer keeps row 0's warm-start anchor between the rows it is
  given (row 0 solved again, unstored, when a call does not compute it), so a row's values do not
  depend on which rows a call, a shard or a rank computes.  Evaluate's batches are units the same
  way (:func:`landscape_tools.evaluate.batch_scorer` gives their compute, which reports progress per
  MC sample from inside the unit).  Only ``--scope dataset`` under torchrun / srun
  (:func:`landscape_tools.hessian.run_dataset_ranks`) keeps a loop of its own over the models: every
  rank takes part in every product and votes after each model is written, a collective step the
  unit loop does not have.
- **the lock**: :class:`landscape_tools.store.OutputLock` (host, pid, heartbeat, stale takeover),
  taken by :func:`landscape_tools.store.open_partial`.
- **the split** of units over ``--shard I/N`` jobs and over the ranks of a torchrun / srun job
  (:func:`shard_units`: interleaved ``I, I + N, ...``); ranks compute their share into rank files
  (:func:`shard_path`) exactly as shards do, and rank 0 merges them (:func:`run_ranks`).
- **the merge** (:func:`merge`, ``lt merge``): any kind; refuses shards of different runs, missing
  and duplicated shards; units are copied from the one shard that computed them
  (:func:`merge_done`) and the kind's own ``merge_units`` finishes the result (featvar and evaluate
  add their per-batch sums in batch order, exactly as one process does), so a merged file equals a
  one-process file bit for bit.  ``merged_from`` records the shards' fingerprints.
- **the rank vote** (:func:`vote`): one function; it runs over a gloo group with a long timeout
  (:func:`landscape_tools.distributed.vote_group`), so a rank that finishes early waits for slow
  ranks instead of being killed by the NCCL watchdog.
- **seeds**: :func:`derive_seed` (:mod:`landscape_tools.seeds`, re-exported here) is the one
  derivation of every seed lt derives, with one purpose number per kind of draw; ``SEED_SCHEME``
  (2) is recorded in every run's key, so a partial file written under another scheme is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import store
from .distributed import RankFailed
from .errors import ConfigError, StoreError
from .seeds import SEED_SCHEME, derive_seed   # the one seed derivation (re-exported here)

__all__ = ["SEED_SCHEME", "KINDS", "digest", "derive_seed", "runtime", "options_key", "run_identity", "parse_shard", "shard_units",
           "shard_path", "shard_suffix", "open_run", "run_units", "replace_partial", "array_of", "vote", "check_shard", "run_ranks",
           "merge", "merge_done", "node_dict",
           "RankFailed"]

#: the kinds ``lt merge`` assembles (each module ``landscape_tools.<kind>`` has ``merge_units``)
KINDS = ("hessian", "surface", "featvar", "evaluate")


# ----------------------------------------------------------------------------- identity
def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as sorted JSON (the one fingerprint function)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def runtime(device: torch.device | str) -> dict:
    """What of the runtime changes a run's numbers beyond rounding: the device kind (CUDA dropout
    masks come from CUDA generators, CPU ones from the CPU's) and whether TF32 may be used for
    float32 matmuls and convolutions (only on CUDA)."""
    dev = torch.device(device)
    tf32 = False
    if dev.type == "cuda":
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return {"device_kind": dev.type, "tf32": tf32}


def options_key(options) -> dict:
    """The part of a run's key its options make: ``dataclasses.asdict`` of the analysis' frozen,
    validated options dataclass, less the fields declared ``metadata={"identity": False}`` (those
    that change only the memory or speed of a run, never its units' values, e.g. hessian's
    ``sub_batch``), with ``options_class`` naming the dataclass.  A partial file written before the
    options were a dataclass lacks ``options_class`` and is refused by that (:func:`open_run`)."""
    if not dataclasses.is_dataclass(options) or isinstance(options, type):
        raise TypeError(f"expected an options dataclass instance, got {type(options).__name__}")
    skip = {f.name for f in dataclasses.fields(options) if not f.metadata.get("identity", True)}
    key = {k: v for k, v in dataclasses.asdict(options).items() if k not in skip}
    key["options_class"] = type(options).__name__
    return key


def run_identity(kind: str, key: dict, device: torch.device | str, shard: tuple[int, int] = (0, 1)) -> dict:
    """The root attributes that identify a run and this file's part of it.

    Returns:
        ``run_fingerprint`` (the run, whatever the shard), ``fingerprint`` (run + shard: what a
        partial file is resumed by), ``run_key`` (the JSON document hashed), ``seed_scheme``,
        ``device_kind``, ``tf32``, ``shard``, ``n_shards``.
    """
    rt = runtime(device)
    document = {"kind": kind, "seed_scheme": SEED_SCHEME, "runtime": rt, "run": key}
    run_fp = digest(document)
    i, n = int(shard[0]), int(shard[1])
    return {"run_fingerprint": run_fp, "fingerprint": _shard_fingerprint(run_fp, i, n),
            "run_key": json.dumps(document, sort_keys=True, default=str), "seed_scheme": SEED_SCHEME,
            "device_kind": rt["device_kind"], "tf32": rt["tf32"], "shard": i, "n_shards": n}


def _shard_fingerprint(run_fp: str, i: int, n: int) -> str:
    return run_fp if n == 1 else f"{run_fp}/shard {i}/{n}"


# ----------------------------------------------------------------------------- shards
def parse_shard(spec: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8): shard 2 of 8, counted from 0.

    Raises:
        ConfigError: not ``I/N`` with integers 0 <= I < N.
    """
    m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", str(spec))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {spec!r} is not a shard: expected I/N with 0 <= I < N, e.g. --shard 0/4 "
                          f"(shards are counted from 0, like Slurm array tasks and torch ranks), or --shard slurm "
                          f"in a Slurm job array")
    return int(m.group(1)), int(m.group(2))


def shard_units(n_units: int, i: int, n: int) -> np.ndarray:
    """The unit indices shard ``i`` of ``n`` computes: ``i, i + n, i + 2n, ...``.

    Interleaved, so every shard gets a spread of the units and the shares differ by at most one;
    disjoint and complete over ``i = 0..n-1``.  Rank ``r`` of ``w`` computes ``shard_units(N, r, w)``.

    Raises:
        ConfigError: ``n < 1`` or ``i`` outside ``0..n-1``.
    """
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard {i}/{n}: expected 0 <= i < n")
    return np.arange(i, int(n_units), n, dtype=np.int64)


def shard_suffix(shard: tuple[int, int] | None) -> str:
    """The part a ``--shard I/N`` run adds to its default file name: ``.shardIofN``."""
    return "" if shard is None else f".shard{shard[0]}of{shard[1]}"


def shard_path(output, rank: int, world_size: int) -> Path:
    """The file rank ``rank`` writes its share to: ``OUT.h5`` -> ``OUT.rank0of2.h5`` next to it."""
    p = Path(output)
    return p.with_name(f"{p.stem}.rank{rank}of{world_size}{p.suffix or '.h5'}")


# ----------------------------------------------------------------------------- resumable files
def open_run(output, root: dict, identity: dict, layout: dict, overwrite: bool = False,
             explain: Callable[[dict, dict], str | None] | None = None) -> "store.PartialResult":
    """Open (resume) or create ``output``'s partial file for the run ``identity`` (:func:`run_identity`).

    A partial file of another run is refused (unless ``overwrite``) with the first difference: the
    device kind or TF32 setting, the seed scheme, then ``explain(old_run, new_run)`` of the analysis
    (its keys' difference in words), else the first differing entry of the run's key.

    Raises:
        StoreError: as :func:`landscape_tools.store.open_partial`, with the reason above.
    """
    part = store.partial_path(output)
    if part.exists() and not overwrite:
        try:                 # the root attributes only: a partial file may hold gigabytes of vectors
            with store._open_checked(part) as f:
                old = {k: store._read_attr(v) for k, v in f.attrs.items()}
        except StoreError:
            old = None
        if old is not None and old.get("fingerprint") != identity["fingerprint"]:
            why = _difference(old, identity, explain)
            raise StoreError(f"{part} holds progress of a different run ({why}); rerun the same command to resume "
                             f"it, or pass --overwrite to start again")
    attrs = {k: (str(v) if isinstance(v, str) else v) for k, v in root.items()}
    attrs.update({k: v for k, v in identity.items() if k != "fingerprint"})
    return store.open_partial(output, attrs, identity["fingerprint"], layout, overwrite=overwrite)


def run_units(units: Sequence[Any], compute: Callable[[Any], Any], write: Callable[[list], None], *,
              progress: Callable[[int, int, str], None] | None = None, done: int = 0, total: int | None = None,
              message: Callable[[Any, Any], str] | None = None, every: int = 1, seconds: float | None = None,
              on_unit: Callable[[Any], None] | None = None) -> int:
    """The unit loop of a run into a partial file (:func:`open_run`), one for every analysis that
    computes its units one at a time.

    For each unit ``u`` of ``units`` (those still to do, in order): ``value = compute(u)``, then
    ``on_unit(u)`` (a test hook), then the finished ``(u, value)`` waits in a batch that
    ``write(batch)`` puts into the partial file (the analysis' layout: values, a flush, the units'
    ``done`` flags, a flush) once ``every`` units wait or ``seconds`` have passed since the last
    write (``every=1``: each unit at once), then ``progress(done, total, message(u, value))`` with
    ``done`` counted from ``done`` (units found done in the file) up to ``total``.

    Interrupts: SIGINT and SIGTERM are turned into ``KeyboardInterrupt`` / ``Terminated`` inside
    ``compute`` or at the progress call (:func:`landscape_tools.cli.common.check_interrupted`); on
    those, as on any error, the units finished before it are written (finished), the unit being
    computed is dropped (a resumed run computes it again), and the exception propagates, so the
    caller's ``finally`` closes the partial file and releases the lock, and ``lt`` exits 130 / 143
    (:mod:`landscape_tools.cli.main`).  A ``write`` that fails is not retried.

    Returns:
        ``done`` plus the number of units computed.
    """
    from .device import report

    pending: list = []
    last = time.monotonic()
    try:
        for u in units:
            value = compute(u)
            pending.append((u, value))
            done += 1
            if on_unit is not None:
                on_unit(u)
            if len(pending) >= every or (seconds is not None and time.monotonic() - last >= seconds):
                batch, pending = pending, []
                write(batch)
                last = time.monotonic()
            report(progress, done, total if total is not None else done, message(u, value) if message else "")
    finally:
        if pending:
            write(pending)
    return done


def replace_partial(part: "store.PartialResult", models: dict[str, dict]) -> Path:
    """Finish a run whose whole-run file has another layout than its partial file (evaluate: curves
    instead of per-batch units): write ``models`` under the partial file's root attributes to the
    final path (atomically, under the lock), then remove the partial file and release the lock."""
    part.lock.check()
    root = part.attrs("/")
    store.write_result(part.final, root, models, overwrite=True)   # open_partial checked the final path
    part.file.close()
    part.file = None
    part.partial.unlink(missing_ok=True)
    part.lock.release()
    return part.final


def _difference(old: dict, identity: dict, explain) -> str:
    if old.get("seed_scheme") is None or "run_key" not in old:
        return ("written by an older lt whose seeds were derived otherwise (no seed_scheme): resuming it would mix "
                "dropout masks and directions of two schemes")
    for key, what in (("device_kind", "device"), ("tf32", "TF32 setting")):
        if old.get(key) != identity[key]:
            return (f"started with {what} {old.get(key)}, this run has {identity[key]}: random masks and rounding "
                    f"differ between device kinds, so the two cannot be mixed in one result; resume it on a "
                    f"{old.get('device_kind')} device with the same --precision")
    if int(old.get("seed_scheme")) != SEED_SCHEME:
        return (f"written with seed scheme {old.get('seed_scheme')}, this lt derives its seeds with scheme {SEED_SCHEME} "
                f"(landscape_tools.seeds): resuming it would mix dropout masks, start vectors and probes of two schemes")
    if (int(old.get("shard", 0)), int(old.get("n_shards", 1))) != (identity["shard"], identity["n_shards"]):
        return f"shard {old.get('shard')}/{old.get('n_shards')}, this run is {identity['shard']}/{identity['n_shards']}"
    try:
        was, now = json.loads(old["run_key"])["run"], json.loads(identity["run_key"])["run"]
    except (ValueError, KeyError, TypeError):
        return "another run"
    old_options, new_options = was.get("options"), now.get("options")
    if (isinstance(new_options, dict) and "options_class" in new_options
            and not (isinstance(old_options, dict) and "options_class" in old_options)):
        return (f"written by an older lt that recorded its options one by one, before they were validated as one "
                f"{new_options['options_class']}: its units cannot be checked against this command's options, "
                f"so it is not resumed; finish it with the lt version that started it, or pass --overwrite")
    why = explain(was, now) if explain is not None else None
    return why or _first_difference(was, now) or "another run"


def _first_difference(was: Any, now: Any, path: str = "") -> str | None:
    if isinstance(was, dict) and isinstance(now, dict):
        for k in sorted(set(was) | set(now), key=str):
            d = _first_difference(was.get(k), now.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(was, list) and isinstance(now, list) and len(was) == len(now):
        for i, (a, b) in enumerate(zip(was, now)):
            d = _first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    if was != now:
        short = (lambda v: (s if len(s) < 60 else s[:57] + "...") if (s := json.dumps(v, default=str)) else s)
        return f"another {path}: {short(now)}, the partial file has {short(was)}"
    return None


# ----------------------------------------------------------------------------- ranks
def vote(ctx, error: BaseException | None, what: str) -> None:
    """The rank vote: every rank calls it at the same point of the run.  Raises this rank's
    ``error``, or :class:`RankFailed` ("rank(s) R of N failed WHAT") when another rank reported one;
    returns when all succeeded.

    The vote travels through :func:`landscape_tools.distributed.vote_group` (gloo, long timeout),
    so a rank that arrives long before the others (uneven shares, a finished rank file) waits
    instead of tripping the collective timeout of the NCCL group.  No-op for one process.
    """
    from . import distributed as D

    failed = D.all_ok(ctx, error is None)
    if error is not None:
        raise error
    if failed:
        raise RankFailed(f"rank(s) {', '.join(map(str, failed))} of {ctx.world_size} failed {what}")


def check_shard(ctx, shard: tuple[int, int] | None) -> None:
    """Refuse ``--shard I/N`` in a job of several ranks (the ranks already split the units)."""
    if shard is not None and ctx.distributed:
        raise ConfigError(f"--shard {shard[0]}/{shard[1]} cannot be combined with torchrun or srun ranks: the ranks "
                          f"already share the units (drop --shard, or start one process per shard)")


def run_ranks(ctx, output, compute: Callable[[Path, tuple[int, int]], Any], shard: tuple[int, int] | None = None,
              overwrite: bool = False, command: Sequence[str] | None = None) -> Path:
    """Run an analysis on every rank of a job: rank ``r`` of ``n`` calls ``compute(rank_file, (r, n))``
    (its share, resumable like any shard; a rank file already finished by an earlier job of the same
    run is resumed from, i.e. reused), a vote, then rank 0 merges the rank files into ``output``
    (:func:`merge`) and removes them, and another vote.  With one process: ``compute(output, shard)``
    (``shard``: the ``--shard I/N`` of the command, default ``(0, 1)``).

    Raises:
        ConfigError: ``shard`` given to a job of several ranks.
        RankFailed: another rank failed (this rank's finished work is kept for a rerun).
        Whatever ``compute`` or the merge raise on this rank.
    """
    output = Path(output)
    if not ctx.distributed:
        compute(output, tuple(shard) if shard is not None else (0, 1))
        return output
    check_shard(ctx, shard)
    shards = [shard_path(output, r, ctx.world_size) for r in range(ctx.world_size)]
    mine = shards[ctx.rank]
    error = None
    try:
        part = store.partial_path(mine)
        moved = mine.exists() and not overwrite and not part.exists()
        if moved:
            mine.replace(part)      # finished by an earlier job: resumed, i.e. nothing left to compute
        try:
            compute(mine, (ctx.rank, ctx.world_size))
        except BaseException:
            if moved and part.exists() and not mine.exists():
                part.replace(mine)  # not resumable (another run's file): left as it was found
            raise
    except Exception as exc:      # every rank must reach the vote, or the others wait forever
        error = exc
    vote(ctx, error, f"(see their messages); finished shards and partial progress are kept next to {output}: "
                     f"rerun the same command to resume")
    if ctx.is_main:
        try:
            merge([str(s) for s in shards], output, overwrite=overwrite, command=command, ranks=True)
            for s in shards:
                s.unlink(missing_ok=True)
        except Exception as exc:
            error = exc
    vote(ctx, error, f"to merge the rank files into {output} (see rank 0's message)")
    return output


# ----------------------------------------------------------------------------- merging
def node_dict(node) -> dict:
    """A :class:`landscape_tools.store.Node` as the nested dict :func:`store.write_result` takes (copies)."""
    return {"attrs": dict(node.attrs),
            "data": {k: ((np.array(v, copy=True), node.data_attrs[k]) if node.data_attrs.get(k)
                         else np.array(v, copy=True)) for k, v in node.data.items()},
            "groups": {k: node_dict(g) for k, g in node.groups.items()}}


def array_of(node: dict, name: str) -> np.ndarray:
    """The array ``name`` of a node dict (its value, without the attributes it may carry)."""
    value = node["data"][name]
    return value[0] if isinstance(value, tuple) else value


def merge_done(results: Sequence["store.Result"], label: str, done: str = "done") -> dict:
    """One model's group assembled from shards: ``done`` (a path in the group, e.g. ``"done"`` or
    ``"sums/done"``) says which units each shard computed; every array of that group (and its
    subgroups) whose leading dimensions are the mask's shape is taken unit by unit from the shard that
    computed the unit, everything else from the first shard.

    Raises:
        StoreError: a shard without the model, a unit computed by two shards or by none.
    """
    parts = done.split("/")
    group_path, mask_name = parts[:-1], parts[-1]

    def group_of(node):
        for p in group_path:
            node = node.groups[p]
        return node

    base = node_dict(results[0].models[label])
    target = base
    for p in group_path:
        target = target["groups"][p]
    covered = np.zeros(np.shape(array_of(target, mask_name)), dtype=bool)
    for r in results:
        if label not in r.models:
            raise StoreError(f"{r.path} has no model {label!r}: not a shard of the same run")
        src = group_of(r.models[label])
        d = np.asarray(src.data[mask_name]).astype(bool)
        both = d & covered
        if both.any():
            raise StoreError(f"{r.path} repeats {int(both.sum())} unit(s) of {label} computed by another shard "
                             f"(first: {np.argwhere(both)[0].tolist()}); each unit must come from one shard")
        _copy_units(target, src, d)
        covered |= d
    if not covered.all():
        raise StoreError(f"{int((~covered).sum())} unit(s) of {label} were computed by no shard (first: "
                         f"{np.argwhere(~covered)[0].tolist()}); compute the missing shards (or finish interrupted "
                         f"ones: rerun their command) first")
    value = target["data"][mask_name]
    target["data"][mask_name] = (covered, value[1]) if isinstance(value, tuple) else covered
    return base


def _copy_units(dst: dict, src, mask: np.ndarray) -> None:
    for name, value in src.data.items():
        value = np.asarray(value)
        if value.ndim < mask.ndim or value.shape[:mask.ndim] != mask.shape or value.dtype == object:
            continue
        array_of(dst, name)[mask] = value[mask]
    for name, group in src.groups.items():
        if name in dst["groups"]:
            _copy_units(dst["groups"][name], group, mask)


def merge(paths: Sequence[str], output, overwrite: bool = False, command: Sequence[str] | None = None,
          ranks: bool = False) -> Path:
    """Assemble the ``--shard I/N`` files (or rank files) of one run of any kind into ``output``.

    The result equals a one-process run's file: the units come from the shard that computed them,
    and the kind's ``merge_units(results) -> {label: node}`` finishes the groups exactly as one
    process does.  Root attributes are the shards', with ``shard = 0``, ``n_shards = 1``, the run's
    one-process ``fingerprint``, and ``merged_from`` = the shards' fingerprints (in shard order).

    Raises:
        ConfigError: no files; files of another kind or not written by a sharded run; shards of
            different runs; shards cut in different numbers of pieces; a shard missing or given twice.
        StoreError: the output exists (no ``overwrite``); units computed twice or by no shard.
    """
    if not paths:
        raise ConfigError("lt merge needs the shard files to assemble, e.g. lt merge out.shard*.h5 -o out.h5")
    store.check_writable(output, overwrite)
    results = [store.read_result(p) for p in paths]
    kinds = {r.kind for r in results}
    if len(kinds) != 1:
        listing = ", ".join(f"{r.path} ({r.kind})" for r in results)
        raise ConfigError(f"these files are results of different kinds: {listing}; merge the shards of one command")
    kind = kinds.pop()
    if kind not in KINDS:
        raise ConfigError(f"{results[0].path} is a {kind} result; lt merge assembles shards of "
                          f"{', '.join(KINDS)} runs")
    for r in results:
        if "run_fingerprint" not in r.attrs:
            raise ConfigError(f"{r.path} has no run_fingerprint: not a shard written by lt {kind} --shard I/N "
                              f"(or written by an older lt); compute the shards again with this version")
    fps = {r.attrs["run_fingerprint"] for r in results}
    if len(fps) != 1:
        groups: dict[str, list[str]] = {}
        for r in results:
            groups.setdefault(r.attrs["run_fingerprint"][:12], []).append(str(r.path))
        listing = "; ".join(f"run {fp}: {', '.join(ps)}" for fp, ps in groups.items())
        raise ConfigError(f"these shards come from different runs (models, data, options, device or seeds "
                          f"differ): {listing}; merge only shards of one command")
    counts = {int(r.attrs.get("n_shards", 1)) for r in results}
    if len(counts) != 1:
        raise ConfigError(f"the shards were cut in different numbers of pieces ({sorted(counts)})")
    n = counts.pop()
    seen: dict[int, str] = {}
    for r in results:
        i = int(r.attrs.get("shard", 0))
        if i in seen:
            raise ConfigError(f"shard {i}/{n} given twice: {seen[i]} and {r.path}")
        seen[i] = str(r.path)
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        what = "rank file" if ranks else "shard"
        raise ConfigError(f"{what}(s) {', '.join(f'{i}/{n}' for i in missing)} missing: {n} were cut and "
                          f"{len(seen)} given ({', '.join(seen[i] for i in sorted(seen))}); compute the missing "
                          f"one(s) with --shard I/{n} first")
    results.sort(key=lambda r: int(r.attrs.get("shard", 0)))
    module = importlib.import_module(f"{__package__}.{kind}")
    models = module.merge_units(results)
    attrs = {k: v for k, v in results[0].attrs.items()}
    prov = store.provenance(kind, command, None, attrs.get("seed"), attrs.get("device", "cpu"))
    run_fp = attrs["run_fingerprint"]
    attrs.update({"created": prov["created"], "generated_by": str(prov["generated_by"]), "shard": 0, "n_shards": 1,
                  "fingerprint": run_fp})
    config = attrs.get("config")     # the configuration of the one command that all shards are parts of
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            config = None
    if isinstance(config, dict) and "shard" in config:
        attrs["config"] = dict(config, shard=None)
    if not ranks:       # the rank files of one torchrun / srun job give the file one process would write
        attrs["merged_from"] = [str(r.attrs.get("fingerprint")) for r in results]
        if command is not None:
            attrs["command"] = prov["command"]
    return store.write_result(output, attrs, models, overwrite=overwrite)
