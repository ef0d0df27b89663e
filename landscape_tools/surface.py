"""Loss-surface slices: 1-D lines and 2-D planes through a model's weights.

Each point ``(a, b)`` is evaluated at ``w0 + a*dx + b*dy`` written straight from the centre weights
``w0`` into the model's parameters on its device (never a cumulative walk), so the centre point is the
model itself, bit for bit, and the model is restored exactly afterwards.  The data set is materialised
once on the device; nothing is re-read per point.

Grids are stored in ``(nx, ny)`` order: ``loss[i, j]`` is the loss at ``x[i], y[j]``.

Library use::

    from landscape_tools.surface import random_directions, surface
    d = random_directions(model, dims=2, seed=0)
    res = surface(model, data, d, x=np.linspace(-1, 1, 21), y=np.linspace(-1, 1, 21))
    res["loss"][i, j]

:func:`run_surface` does the same resumably into a result file (``lt surface``), optionally for one
shard of the points; :func:`merge_shards` assembles shard files (``lt merge``).  A
:class:`SurfaceJob` with ``more_directions`` (:func:`repeat_directions`, ``lt surface --repeats K``)
computes the grid along each of K direction pairs: the units are (repeat, grid point), ``loss`` gets a
leading repeat axis, and :func:`sharpness` of each repeat's grid is stored beside it.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import engine, seeds, store
from ._directions import (IGNORES, NORMS, Directions, from_node, hessian_directions, line_to, model_fingerprint,
                          normalize_direction, parse_eig, pca_directions, plane_through, random_directions, to_node)
from .data import DataSet
from .device import Progress, is_out_of_memory, memory_notice, report
from .errors import ConfigError
from .models import mask_rows, mc_dropout
from .models.mc import MCDropout, sampling_dropout_modules
from .precision import autocast, full_precision, model_dtype, parse_precision
from .seeds import derive_seed
from .streaming import batch_sizes
from ._compiled import SeededCompiled

__all__ = ["Directions", "NORMS", "IGNORES", "BN_MODES", "normalize_direction", "random_directions", "line_to",
           "plane_through", "pca_directions", "model_fingerprint", "parse_range", "parse_shard", "shard_points",
           "SurfaceEvaluator", "surface", "SurfaceJob", "run_surface", "merge_shards", "load_directions",
           "evaluate_model", "SurfaceOptions", "recompute_bn_statistics", "COMPILE_MODES", "parse_compile",
           "hessian_directions", "parse_eig", "split_directions_spec",
           "estimated_compile_seconds", "repeat_seed", "repeat_directions", "border_rise", "centre_curvature",
           "sharpness", "REPEAT_TAG"]

BN_MODES = ("frozen", "recompute")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
#: the most grid points ``parse_range`` accepts along one axis
MAX_AXIS_POINTS = 100_000
_RANGE = re.compile(r"^\s*([-+]?[0-9.eE+-]+)\s*:\s*([-+]?[0-9.eE+-]+)\s*:\s*([0-9]+)\s*$")


# ----------------------------------------------------------------------------- grids and shards
def parse_range(spec: str, option: str = "--x") -> np.ndarray:
    """``"-1:1:21"`` -> 21 evenly spaced float64 values from -1 to 1 (both included).

    A value within 1e-12 (relative to the range width) of an integer is set to that integer, so a grid
    that nominally contains 0 (or 1, the far end of a ``--to`` line) hits it exactly.

    Raises:
        ConfigError: not ``MIN:MAX:NUM`` with finite MIN < MAX and NUM >= 2 (or NUM = 1 with MIN = MAX).
    """
    expected = f"expected MIN:MAX:NUM, e.g. {option} -1:1:21 (MIN < MAX, NUM >= 2 points)"
    m = _RANGE.match(str(spec))
    if not m:
        raise ConfigError(f"{option} {spec!r} is not a range: {expected}")
    try:
        lo, hi, num = float(m.group(1)), float(m.group(2)), int(m.group(3))
    except ValueError:
        raise ConfigError(f"{option} {spec!r} is not a range: {expected}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or num < 1 or (num == 1 and lo != hi) or (num > 1 and not lo < hi):
        raise ConfigError(f"{option} {spec!r} is not a valid range: {expected}")
    if not math.isfinite(hi - lo):
        raise ConfigError(f"{option} {spec!r}: the range is wider than float64 holds; use coordinates of "
                          f"reasonable size, e.g. {option} -1:1:21")
    if num > MAX_AXIS_POINTS:
        raise ConfigError(f"{option} {spec!r} asks for {num} points; at most {MAX_AXIS_POINTS} per axis "
                          f"(each point is a pass over the data): use fewer points, e.g. {option} -1:1:51")
    values = np.linspace(lo, hi, num, dtype=np.float64)
    nearest = np.round(values)
    snap = np.abs(values - nearest) <= 1e-12 * max(hi - lo, 1.0)
    values[snap] = nearest[snap] + 0.0        # + 0.0 turns -0.0 into 0.0
    return values


#: ``--shard I/N`` parsing and the points of shard I of N (interleaved): the run engine's, for every analysis
parse_shard = engine.parse_shard
shard_points = engine.shard_units


# ----------------------------------------------------------------------------- evaluation
def evaluate_model(model: nn.Module, data: DataSet, mc: int = 0, seed: int = 0, precision: str = "fp32",
                   compile: bool = False) -> tuple[float, float]:
    """Mean NLL and accuracy of ``model`` as it is (eval mode), the way every surface point is measured.

    Args:
        model: any classifier returning logits.
        data: the evaluation data (batches in fixed order).
        mc: 0: dropout off (deterministic); N >= 1: the probabilities averaged over N MC-dropout
            samples, sample ``s`` on batch ``b`` with the masks of ``mc_dropout(model, True,
            seed=derive_seed(seed, seeds.SURFACE_MC_SAMPLE, b, s))`` (:mod:`landscape_tools.seeds`), so every
            grid point sees the same masks.
        seed: seed of those masks.
        precision: ``fp32`` (the model's own dtype), ``bf16`` or ``fp16`` (autocast forward pass;
            the logits are cast back before the loss); see :mod:`landscape_tools.precision`.
        compile: run the forward passes through ``torch.compile(model)``.

    Returns:
        ``(nll, accuracy)`` as Python floats; NaN / inf losses are returned as computed.

    Raises:
        ConfigError: an unknown precision, one the device cannot run, or bf16 / fp16 for a model that
            is not float32.
    """
    precision = _check_precision(model, precision)
    forward = SeededCompiled(model, dynamic=None) if compile else model
    was_training = _training_flags(model)
    model.eval()
    try:
        return _evaluate(model, data, mc, seed, precision, forward)
    finally:
        _restore_training(model, was_training)


def _check_precision(model: nn.Module, precision: str) -> str:
    """Validate ``precision`` for ``model`` (its device can run it; bf16 / fp16 need a float32 model)."""
    precision = parse_precision(precision)
    if precision == "fp32":
        return precision
    dtype = model_dtype(model)
    if dtype != torch.float32:
        raise ConfigError(f"--precision {precision} needs a float32 model, but this one's parameters are "
                          f"{str(dtype).replace('torch.', '')} (autocast leaves them as they are, so nothing "
                          f"would change); use --precision fp32")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with autocast(device, precision):     # raises ConfigError when the device cannot run it
        pass
    return precision


def _logits(forward: nn.Module, bx: torch.Tensor, precision: str, dtype: torch.dtype) -> torch.Tensor:
    """``forward(bx)`` at ``precision``, cast back to the model's dtype (fp32 and tf32: as computed;
    fp32 with TF32 off, see :func:`landscape_tools.precision.autocast`)."""
    with autocast(bx.device, precision):
        out = forward(bx)
    return out if precision in ("fp32", "tf32") else full_precision(out, dtype)


class Pieces:
    """How many samples of a batch go through one forward pass of the surface's points: whole batches
    until a pass runs out of memory, then half as many (down to 1), kept for every later batch and
    point.  Each piece keeps its rows of the whole batch's dropout masks and the model is in eval
    mode, so the per-sample log-probabilities, and the surface, are the same up to rounding."""

    def __init__(self, notice: Callable[[str], None] | None = None):
        #: samples per forward pass, ``None``: whole batches
        self.size: int | None = None
        self.notice = notice

    def of(self, rows: int) -> int:
        return rows if self.size is None else min(self.size, rows)

    def shrink(self, tried: int) -> None:
        self.size = max(1, tried // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _evaluate(model: nn.Module, data: DataSet, mc: int, seed: int, precision: str = "fp32",
              forward: nn.Module | None = None, pieces: Pieces | None = None) -> tuple[float, float]:
    """Mean NLL / accuracy; ``model`` is switched (dropout, modes), ``forward`` (default ``model``;
    a compiled wrapper sharing its parameters) is called, on batches split as ``pieces`` says (and
    split further when a forward pass runs out of memory)."""
    forward = model if forward is None else forward
    pieces = Pieces() if pieces is None else pieces
    dtype = model_dtype(model)
    total = torch.zeros((), dtype=torch.float64, device=data.y.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.y.device)
    with torch.no_grad(), (mc_dropout(model, False) if mc <= 0 else contextlib.nullcontext()):
        for b, (bx, by) in enumerate(data.batches()):
            rows = int(bx.shape[0])
            first = pieces.of(rows)
            while True:
                size = pieces.of(rows)
                try:
                    nll, right = _batch_sums(model, forward, bx, by, b, mc, seed, precision, dtype, size)
                    break
                except Exception as exc:      # noqa: BLE001 -- only out-of-memory errors are retried
                    if not is_out_of_memory(exc) or size <= 1:
                        raise
                pieces.shrink(size)           # outside the except block: the failed pass's tensors are freed
            if pieces.of(rows) < first:
                memory_notice(f"the forward passes ran out of memory with {first} samples at once; continuing "
                              f"with {pieces.of(rows)} (a --batch-size of {pieces.of(rows)} gives the same surface, "
                              f"up to rounding)", pieces.notice)
            total += nll
            correct += right
    n = len(data)
    return float(total) / n, float(correct) / n


def _batch_sums(model, forward, bx, by, b: int, mc: int, seed: int, precision: str, dtype,
                size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64) and correct predictions of batch ``b``, ``size`` samples per forward pass
    (each piece with its rows of the whole batch's dropout masks)."""
    rows = int(bx.shape[0])
    nll = torch.zeros((), dtype=torch.float64, device=by.device)
    right = torch.zeros((), dtype=torch.int64, device=by.device)
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        x, y = (bx, by) if stop - start == rows else (bx[start:stop], by[start:stop])
        if mc <= 0:
            logp = F.log_softmax(_logits(forward, x, precision, dtype), dim=1)
        else:
            samples = []
            with mask_rows(start, stop - start, rows):
                for s in range(mc):
                    with mc_dropout(model, True, seed=derive_seed(seed, seeds.SURFACE_MC_SAMPLE, b, s)):
                        samples.append(F.log_softmax(_logits(forward, x, precision, dtype), dim=1))
            logp = torch.logsumexp(torch.stack(samples), dim=0) - math.log(mc)
        nll += F.nll_loss(logp, y, reduction="sum").double()
        right += (logp.argmax(dim=1) == y).sum()
    return nll, right


def recompute_bn_statistics(model: nn.Module, inputs, precision: str = "fp32") -> int:
    """Re-estimate every BatchNorm's running statistics on ``inputs`` (an iterable of input batches).

    Each batch goes through the model with its BatchNorm layers in train mode (every layer normalises
    the batch by the batch's own statistics, as in training and SWA's ``bn_update``), the rest in eval
    mode and dropout off.  A BN layer's new ``running_mean`` / ``running_var`` are the mean and the
    unbiased (1/(n-1)) variance of *all* its inputs over every batch, samples and positions pooled:
    batches weighted by their size, the same numbers as ``x.mean`` / ``x.var`` over the concatenated
    inputs of the layer (accumulated per channel in float64, batch by batch with the exact pairwise
    update of mean and sum of squared deviations; the law of total variance).  ``num_batches_tracked``
    counts the layer's calls.  A layer that sees no input keeps reset statistics (mean 0, variance 1); one
    with ``track_running_stats=False`` has none to set.  The pass runs eagerly on ``model`` (never a
    ``torch.compile`` wrapper, which would skip the hooks that read the layers' inputs), under
    :func:`torch.autocast` for ``precision`` bf16 / fp16; the modes of every module are restored.

    Returns:
        the number of batches seen.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not bns:
        return 0
    dtype = model_dtype(model)
    sums: dict[int, list] = {}         # id(bn) -> [count, mean (C,), M2 (C,)] in float64

    def hook(module, args):
        x = args[0].detach()                       # (N, C, ...): channel dim 1, as BatchNorm requires
        flat = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        count = flat.shape[1]
        mean = flat.mean(dim=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(dim=1)
        state = sums.get(id(module))
        if state is None:
            sums[id(module)] = [count, mean, m2]
            return
        total = state[0] + count
        delta = mean - state[1]
        state[1] = state[1] + delta * (count / total)
        state[2] = state[2] + m2 + delta ** 2 * (state[0] * count / total)
        state[0] = total

    flags = _training_flags(model)
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    batches = 0
    try:
        for m in bns:
            m.reset_running_stats()
        model.eval()
        for m in model.modules():
            if isinstance(m, _BN_TYPES):
                m.train()
        with torch.no_grad(), mc_dropout(model, False):
            for bx in inputs:
                _logits(model, bx, precision, dtype)
                batches += 1
        with torch.no_grad():
            for m in bns:
                state = sums.get(id(m))
                if state is None:
                    continue
                count, mean, m2 = state
                m.running_mean.copy_(mean.to(m.running_mean.dtype))
                m.running_var.copy_((m2 / max(count - 1, 1)).to(m.running_var.dtype))
    finally:
        for h in handles:
            h.remove()
        _restore_training(model, flags)
    return batches


# ----------------------------------------------------------------------------- compilation
#: ``--compile`` values: ``auto`` compiles when the run is long enough to pay for it, ``on`` always, ``off`` never
COMPILE_MODES = ("auto", "on", "off")
#: ``auto`` assumes a compiled forward pass saves this fraction of an eager one (measured on the 2-core
#: CPU: 0.48 for a CIFAR ResNet-20, 0.45 for resnet_dnn_18 width 16, 0.25 for width 4; 0.22 for
#: resnet_mcdo_18 width 8 with its MCDropout layers outside the graph), and checks it after compiling
AUTO_COMPILE_GAIN = 0.3
#: ``auto``'s estimate of one compilation: seconds per graph (one: the dropout masks are graph inputs,
#: :mod:`landscape_tools._compiled`) and per leaf module.  Measured on the 2-core CPU with cold caches: 15 s for a
#: 5-module model, 47-49 s for resnet_dnn_18 width 4 (68 modules) and a ResNet-20 (50), 70 s for
#: resnet_mcdo_18 width 8 with --mc (12 graphs); Inductor's cache makes later compilations faster
COMPILE_SECONDS_PER_GRAPH = 5.0
COMPILE_SECONDS_PER_MODULE = 0.5
#: ``auto`` keeps the compiled forward pass only when one full batch takes at most this fraction of
#: the eager one (tiny models run slower compiled: 0.61 vs 0.35 ms for a 5-module model)
AUTO_COMPILE_MAX_RATIO = 0.9


def parse_compile(value) -> str:
    """A ``--compile`` value -> ``"auto"``, ``"on"`` or ``"off"`` (True is ``on``; False and None are ``off``).

    Raises:
        ConfigError: anything else.
    """
    if value is True:
        return "on"
    if value is False or value is None:
        return "off"
    text = str(value).strip().lower()
    if text not in COMPILE_MODES:
        raise ConfigError(f"--compile {value!r} is not one of {', '.join(COMPILE_MODES)}: auto (the default) "
                          f"compiles when the grid is large enough to pay for the compilation, on always, off never")
    return text


def estimated_compile_seconds(model: nn.Module, graphs: int = 1) -> float:
    """``auto``'s rough estimate of what compiling ``model`` costs (see :data:`COMPILE_SECONDS_PER_GRAPH`)."""
    leaves = sum(1 for m in model.modules() if next(m.children(), None) is None)
    return COMPILE_SECONDS_PER_GRAPH * max(int(graphs), 1) + COMPILE_SECONDS_PER_MODULE * leaves


def _compile_blocker(model: nn.Module, mc: int) -> str | None:
    """Why ``model`` cannot be compiled for ``mc`` samples without recompiling at every seed, or None.

    A model's :class:`MCDropout` layers get their masks as inputs of the compiled graph
    (:class:`landscape_tools._compiled.SeededCompiled`).  Ordinary ``nn.Dropout`` modules that MC sampling switches (models outside the zoo)
    get a new forward with the seed at every sample, which a compiled graph would recompile for.
    """
    if mc <= 0:
        return None
    switched = [name for name, m in sampling_dropout_modules(model) if not isinstance(m, MCDropout)]
    if not switched:
        return None
    return (f"--mc {mc} samples this model's torch.nn.Dropout module(s) ({', '.join(switched[:3])}"
            f"{' ...' if len(switched) > 3 else ''}) with a new seed each time, which a compiled graph would "
            f"recompile for (only the zoo's MCDropout layers can run outside it)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_training(model: nn.Module, flags) -> None:
    for m, flag in flags:
        m.training = flag


def _check_mc_bn(mc, bn) -> None:
    if bn not in BN_MODES:
        raise ConfigError(f"--bn {bn!r} is not one of {', '.join(BN_MODES)}")
    if mc < 0:
        raise ConfigError(f"--mc {mc} must be 0 (dropout off) or a number of samples >= 1")


class SurfaceEvaluator:
    """Evaluates a model at points of a slice, in place, and restores it exactly on exit.

    Use as a context manager::

        with SurfaceEvaluator(model, data, directions) as ev:
            loss, acc = ev(0.5, -0.25)

    Args:
        model: the centre model (its parameters are overwritten during the block, restored after).
        data: the evaluation data, on the model's device.
        directions: :class:`Directions` (1-D: ``b`` must be 0).
        mc: MC-dropout samples per point (0: dropout off).
        bn: ``frozen`` (BatchNorm running statistics of the centre) or ``recompute`` (re-estimated at
            every point on ``data`` by :func:`recompute_bn_statistics`: each layer's mean and unbiased
            variance of its inputs over the whole data, batches weighted by size, every batch passing
            through train-mode BN, dropout off).
        seed: seed of the MC-dropout masks.
        precision: ``fp32`` (default: the model's own dtype, bit for bit), ``bf16`` or ``fp16``: every
            forward pass (the BN re-estimation passes of ``bn="recompute"`` too) runs under
            :func:`torch.autocast`; logits are cast back before the NLL, accuracy and MC average.
        compile: ``"off"`` / False (default), ``"on"`` / True or ``"auto"``: call the model through
            ``torch.compile`` (``dynamic=False``; wrapped and compiled on entry, on the first batch; the
            wrapper shares the parameters, so the in-place point updates reach it).  Only batches of the
            first batch's size go through it (a shorter last batch runs eagerly: one graph, one
            compilation); the BN re-estimation passes of ``bn="recompute"`` run eagerly; with ``mc``,
            :class:`MCDropout` masks are drawn outside the graph and passed in as tensors (one graph,
            no break, no recompilation per seed).  ``auto``
            compiles when the estimated saving, ``points x max(mc, 1) x full batches`` forward passes
            times one eager batch (timed on entry) times :data:`AUTO_COMPILE_GAIN`, exceeds
            :func:`estimated_compile_seconds`, keeps the compiled pass only if a timed batch is faster
            (:data:`AUTO_COMPILE_MAX_RATIO`), and runs eagerly when compiling fails.  ``compiled``
            (bool) and ``compile_note`` (why) say what ran.
        points: how many points this evaluator will compute (``auto``'s estimate; None: unknown, so
            ``auto`` stays eager).
        notice: called with one line when ``auto`` decides, or falls back to eager (e.g. the CLI's stderr).

    Raises:
        ConfigError: directions of another model (fingerprint), unknown ``bn``, a precision the
            device cannot run or bf16 / fp16 for a model that is not float32, an unknown ``compile``;
            ``compile="on"`` where torch.compile fails or would recompile at every MC seed
            (``nn.Dropout`` modules of a model outside the zoo with ``mc``).
    """

    def __init__(self, model: nn.Module, data: DataSet, directions: Directions, mc: int = 0, bn: str = "frozen",
                 seed: int = 0, precision: str = "fp32", compile: bool | str = False, points: int | None = None,
                 notice: Callable[[str], None] | None = None):
        _check_mc_bn(mc, bn)
        self.model, self.data, self.directions, self.mc, self.bn, self.seed = model, data, directions, int(mc), bn, seed
        self.precision = _check_precision(model, precision)
        self.compile_option = parse_compile(compile)
        if self.compile_option == "on":
            blocker = _compile_blocker(model, self.mc)
            if blocker:
                raise ConfigError(f"--compile on: {blocker}; use --compile off (or auto, which runs it eagerly)")
        self.points, self.notice = points, notice
        #: samples per forward pass (``pieces.size``: None for whole batches, smaller after out of memory)
        self.pieces = Pieces(notice)
        self.forward: Callable = model
        self.compiled, self.compile_note = False, "--compile off: eager"
        self.dtype = model_dtype(model)
        fp = model_fingerprint(model)
        if directions.fingerprint and directions.fingerprint != fp:
            raise ConfigError(f"the directions were made for another model (fingerprint {directions.fingerprint[:12]}), "
                              f"not this one ({fp[:12]}); compute new directions for it")
        self._entered = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "SurfaceEvaluator":
        model, d = self.model, self.directions
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in self.params]
        if set(d.x) != set(names):
            missing = sorted(set(names) ^ set(d.x))
            raise ConfigError(f"the directions do not match the model's parameters ({', '.join(missing[:5])})")
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
        self.flags = _training_flags(model)
        self.bns = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
        self.momenta = [m.momentum for m in self.bns]
        dev = lambda t, p: t.to(device=p.device, dtype=p.dtype)  # noqa: E731
        dx = [dev(d.x[n], p) for n, p in self.params]
        dy = [dev(d.y[n], p) for n, p in self.params] if d.y is not None else None
        # tensors whose directions are all zero (ignored biases / BN) keep their centre values: never touched
        active_x = [bool(t.any()) for t in dx]
        active_y = [bool(t.any()) for t in dy] if dy is not None else [False] * len(dx)
        moved = [k for k in range(len(dx)) if active_x[k] or active_y[k]]
        self.p_moved = [self.params[k][1] for k in moved]
        self.w0 = [self.params[k][1].detach().clone() for k in moved]
        self.p_x = [self.params[k][1] for k in range(len(dx)) if active_x[k]]
        self.dx = [dx[k] for k in range(len(dx)) if active_x[k]]
        self.p_y = [self.params[k][1] for k in range(len(dx)) if active_y[k]]
        self.dy = [dy[k] for k in range(len(dx)) if active_y[k]] if dy is not None else None
        self.lerp = None
        if d.target is not None:
            sd = dict(model.named_parameters())
            sd.update(dict(model.named_buffers()))
            self.lerp = [(sd[k], sd[k].detach().clone(), dev(v, sd[k])) for k, v in d.target.items() if k in sd]
        self._entered = True
        try:
            self._prepare_forward()
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the centre weights, buffers, train/eval flags, BN momenta and module forwards back exactly."""
        if not self._entered:
            return
        self._stack.close()
        with torch.no_grad():
            current = self.model.state_dict(keep_vars=True)
            for k, v in self.state.items():
                current[k].copy_(v)
        for m, mom in zip(self.bns, self.momenta):
            m.momentum = mom
        _restore_training(self.model, self.flags)
        self._entered = False

    # ------------------------------------------------------------------------- the forward pass
    def _say(self, compiled: bool, note: str) -> None:
        """Record what runs; ``auto`` says it when that is eager (its announcement precedes a compilation)."""
        self.compiled, self.compile_note = compiled, note
        if not compiled and self.compile_option == "auto" and self.notice is not None:
            self.notice(note)

    def _timed_batch(self, forward, bx) -> float:
        """Seconds of one forward pass of ``bx`` as the points run it (eval mode, no grad, the run's dropout)."""
        device = bx.device
        self.model.eval()
        dropout = (mc_dropout(self.model, False) if self.mc <= 0
                   else mc_dropout(self.model, True, seed=derive_seed(self.seed, seeds.SURFACE_MC_SAMPLE, 0, 0)))
        with torch.no_grad(), dropout:
            _sync(device)
            start = time.perf_counter()
            _logits(forward, bx, self.precision, self.dtype)
            _sync(device)
        return time.perf_counter() - start

    def _prepare_forward(self) -> None:
        """Decide eager or compiled (``compile``), compile on the first batch, set ``self.forward``."""
        option = self.compile_option
        if option == "off":
            return
        batches = self.data.batches()
        if not batches:
            self._say(False, f"--compile {option}: running eagerly: no data")
            return
        blocker = _compile_blocker(self.model, self.mc)
        if blocker:
            self._say(False, f"--compile auto: running eagerly: {blocker}")
            return
        bx = batches[0][0]
        size = int(bx.shape[0])
        full = sum(1 for n in batch_sizes(batches) if n == size)
        t_eager = None
        if option == "auto":
            try:
                t_eager = self._timed_batch(self.model, bx)
            except Exception as exc:      # noqa: BLE001 -- out of memory: the points split the batches (eagerly)
                if not is_out_of_memory(exc):
                    raise
                t_eager = None
            if t_eager is None:
                if bx.is_cuda:
                    torch.cuda.empty_cache()
                self._say(False, f"--compile auto: running eagerly: a batch of {size} samples does not fit in "
                                 f"memory at once")
                return
            if t_eager < 0.5:                           # the first pass may include one-off set-up: once more
                t_eager = min(t_eager, self._timed_batch(self.model, bx))
            points = int(self.points or 0)
            calls = points * max(self.mc, 1) * full
            cost = estimated_compile_seconds(self.model, 1)     # one graph: the masks are its inputs
            saving = calls * t_eager * AUTO_COMPILE_GAIN
            what = (f"{points} point(s) x {max(self.mc, 1)} pass(es) x {full} batch(es) of {size} = {calls} forward "
                    f"passes of ~{_ms(t_eager)} eagerly")
            if saving < cost:
                self._say(False, f"--compile auto: running eagerly: {what}; compiling would save ~{saving:.1f} s "
                                 f"but cost ~{cost:.0f} s (--compile on compiles anyway)")
                return
            if self.notice is not None:
                self.notice(f"--compile auto: compiling the forward pass (~{cost:.0f} s; {what}, ~{saving:.0f} s "
                            f"saved; --compile off skips it)")
        stack = contextlib.ExitStack()
        try:
            # the dropout masks are drawn outside the graph and passed in: no break, no recompile per seed
            compiled = SeededCompiled(self.model, dynamic=False)
            start = time.perf_counter()
            self._timed_batch(compiled, bx)
            seconds = time.perf_counter() - start
        except Exception as exc:      # no C++ compiler, an unsupported op or platform, ...
            stack.close()
            if is_out_of_memory(exc):     # not a failure of torch.compile: the one Error: line (--batch-size)
                raise
            why = _first_line(exc)
            if option == "on":
                raise ConfigError(f"--compile on: torch.compile failed here ({why}); use --compile off "
                                  f"(or auto, which falls back to eager)") from None
            self._say(False, f"--compile auto: running eagerly: torch.compile failed here ({why})")
            return
        note = f"compiled in {seconds:.1f} s"
        if option == "auto":
            t_compiled = self._timed_batch(compiled, bx)
            if t_compiled < 0.5:
                t_compiled = min(t_compiled, self._timed_batch(compiled, bx))
            if t_compiled > AUTO_COMPILE_MAX_RATIO * t_eager:
                stack.close()
                self._say(False, f"--compile auto: running eagerly: the compiled forward pass is not faster here "
                                 f"(a batch of {size}: {_ms(t_compiled)} compiled, {_ms(t_eager)} eager)")
                return
            note += f"; a batch of {size}: {_ms(t_compiled)} compiled, {_ms(t_eager)} eager"
        self._stack.enter_context(stack)
        model = self.model

        def forward(batch: torch.Tensor) -> torch.Tensor:
            return compiled(batch) if batch.shape[0] == size else model(batch)

        self.forward = forward
        self._say(True, f"--compile {option}: {note}")

    # ------------------------------------------------------------------------- points
    def set_point(self, a: float, b: float = 0.0) -> None:
        """Write ``w0 + a*dx + b*dy`` (or ``lerp(w0, target, a)``) into the parameters."""
        with torch.no_grad():
            if self.lerp is not None:
                if b != 0.0:
                    raise ConfigError("a line to another model has one dimension: b must be 0")
                for t, start, end in self.lerp:
                    t.copy_(torch.lerp(start, end, float(a)))
                return
            if b != 0.0 and self.dy is None:
                raise ConfigError("1-D directions: b must be 0")
            if self.p_moved:
                torch._foreach_copy_(self.p_moved, self.w0)
            if a != 0.0 and self.p_x:
                torch._foreach_add_(self.p_x, self.dx, alpha=float(a))
            if b != 0.0 and self.p_y:
                torch._foreach_add_(self.p_y, self.dy, alpha=float(b))

    def _recompute_bn(self) -> None:
        if not self.bns:
            return
        recompute_bn_statistics(self.model, (bx for bx, _ in self.data.batches()), self.precision)
        self.model.eval()

    def __call__(self, a: float, b: float = 0.0) -> tuple[float, float]:
        """``(nll, accuracy)`` at ``(a, b)``."""
        if not self._entered:
            raise RuntimeError("use SurfaceEvaluator as a context manager")
        self.set_point(a, b)
        if self.bn == "recompute":
            self._recompute_bn()
        else:
            self.model.eval()
        return _evaluate(self.model, self.data, self.mc, self.seed, self.precision, self.forward, self.pieces)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def surface(model: nn.Module, data: DataSet, directions: Directions, x: Sequence[float],
            y: Sequence[float] | None = None, mc: int = 0, bn: str = "frozen", seed: int = 0,
            progress: Progress = None, precision: str = "fp32", compile: bool | str = False,
            notice: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Loss and accuracy over a 1-D or 2-D grid, in memory.

    Args:
        model, data, directions, mc, bn, seed, precision, compile, notice: see :class:`SurfaceEvaluator`
            (``compile="auto"`` counts the grid's points).
        x: coordinates along ``directions.x``.
        y: coordinates along ``directions.y`` (2-D directions), else None.
        progress: ``progress(done, total, message)``.

    Returns:
        ``{"x", "y" (2-D only), "loss", "accuracy"}``; loss / accuracy shaped (nx,) or (nx, ny).

    Raises:
        ConfigError: ``y`` given for 1-D directions or missing for 2-D ones.
    """
    x = np.asarray(x, dtype=np.float64)
    shape = _grid_shape(directions, x, y)
    loss = np.full(shape, np.nan)
    acc = np.full(shape, np.nan)
    coords = _coords(x, None if y is None else np.asarray(y, np.float64))
    with SurfaceEvaluator(model, data, directions, mc, bn, seed, precision, compile, len(coords), notice) as ev:
        for k, (a, b) in enumerate(coords):
            idx = np.unravel_index(k, shape)
            loss[idx], acc[idx] = ev(a, b)
            report(progress, k + 1, len(coords))
    out = {"x": x, "loss": loss, "accuracy": acc}
    if y is not None:
        out["y"] = np.asarray(y, np.float64)
    return out


def _grid_shape(directions: Directions, x: np.ndarray, y) -> tuple[int, ...]:
    if directions.dims == 2 and y is None:
        raise ConfigError("2-D directions need y coordinates (--y)")
    if directions.dims == 1 and y is not None:
        raise ConfigError("1-D directions take no y coordinates: use --dims 2 for a plane")
    return (len(x),) if y is None else (len(x), len(y))


def _coords(x: np.ndarray, y: np.ndarray | None) -> list[tuple[float, float]]:
    if y is None:
        return [(float(a), 0.0) for a in x]
    return [(float(a), float(b)) for a in x for b in y]     # row-major over (nx, ny)


# ----------------------------------------------------------------------------- directions from files
def split_directions_spec(spec: str) -> tuple[str, int | None]:
    """``--directions FILE.h5[:ROW]`` -> ``(FILE.h5, ROW or None)``.

    A path that exists as given is taken whole (even with a colon in its name); otherwise a trailing
    ``:N`` (a whole number) is the row of a hessian file.
    """
    import os

    text = str(spec)
    if os.path.exists(text):
        return text, None
    m = re.match(r"^(.*):\s*(\d+)\s*$", text)
    if m and m.group(1):
        return m.group(1), int(m.group(2))
    return text, None


def load_directions(path: str, fingerprint: str, dims: int | None, label: str | None = None, *,
                    model: nn.Module | None = None, row: int | None = None,
                    eig: Sequence[int] | None = None) -> Directions:
    """Directions from a file: a surface result's stored directions (reused exactly), or the unit
    Hessian eigenvectors of a hessian result written with ``lt hessian --save-vectors``.

    Surface files: picks the model group whose directions were made for the model with
    ``fingerprint`` (or the group named ``label``).  Hessian files: picks the group whose
    eigenvectors were taken of the model with ``fingerprint`` (``label`` first when given); ``row``
    (default 0: the first batch, or the dataset Hessian) and ``eig`` (1-based, default ``1, 2`` for
    2-D and ``1`` for 1-D; ``dims`` None: as many as ``eig`` has) choose the vectors; ``model`` (the
    centre, needed for its parameters' names, shapes and dtypes) is required.  See
    :func:`landscape_tools._directions.hessian_directions`.

    Raises:
        ConfigError: the file holds neither, no directions / eigenvectors for this model, another number
            of dimensions; for hessian files also a row or eigenvector out of range or not computed;
            ``row`` / ``eig`` given for a surface file.
        StoreError: unreadable file.
    """
    with store._open_checked(Path(path)) as f:
        if store._read_attr(f.attrs.get("kind", "")) == "hessian":
            # the eigenvectors stay on disk and only the chosen (row, eigenvector) slices are read: a
            # ResNet-18 file of 10 batches x 5 vectors holds 2.2 GB of them
            return _hessian_file_directions(_hessian_lazily(f, path), path, fingerprint, dims, label, model, row,
                                            eig)
    res = store.read_result(path)
    if res.kind != "surface":
        raise ConfigError(f"--directions {path} is a {res.kind} result: it holds no directions; give a surface "
                          f"result (its directions are reused) or a hessian result of lt hessian --save-vectors")
    if row is not None:
        raise ConfigError(f"--directions {path}:{row}: a :ROW picks a Hessian of a hessian file, but {path} is a "
                          f"surface file (one pair of directions per model); drop :{row}")
    if eig is not None:
        raise ConfigError(f"--eig {','.join(map(str, eig))} picks eigenvectors of a hessian file, but {path} is a "
                          f"surface file; drop --eig")
    found = []
    for name, node in res.models.items():
        if "directions" in node.groups:
            found.append((name, node.groups["directions"]))
    if not found:
        raise ConfigError(f"--directions {path} holds no directions")
    match = [(n, g) for n, g in found if g.attrs.get("model_fingerprint") == fingerprint]
    if label is not None:
        match = [(n, g) for n, g in match if n == label] or match
    if not match:
        have = ", ".join(f"{n} ({str(g.attrs.get('model_fingerprint', ''))[:12]})" for n, g in found)
        raise ConfigError(f"--directions {path} was made for other weights ({have}), not this model "
                          f"({fingerprint[:12]}); directions only mean something for the model they were "
                          f"normalised to: compute new ones")
    name, node = match[0]
    d = from_node(node)
    if dims is not None and d.dims != dims:
        raise ConfigError(f"--directions {path} holds {d.dims}-D directions but this run is {dims}-D "
                          f"(--dims {dims}); use a {dims}-D direction file or --dims {d.dims}")
    return d


def _hessian_lazily(f, path) -> "store.Result":
    """An open hessian result as :func:`store.read_result` reads it, except that every dataset of an
    ``eigenvectors`` group is left an ``h5py.Dataset`` (read by the slice, while ``f`` is open)."""
    import h5py

    def node(group, lazy: bool) -> store.Node:
        out = store.Node(attrs={k: store._read_attr(v) for k, v in group.attrs.items()})
        for name, item in group.items():
            if isinstance(item, h5py.Dataset):
                out.data[name] = item if lazy else item[()]
            else:
                out.groups[name] = node(item, lazy or name == "eigenvectors")
        return out

    attrs = {k: store._read_attr(v) for k, v in f.attrs.items()}
    models = {name: node(g, False) for name, g in f.items() if isinstance(g, h5py.Group)}
    return store.Result(str(path), attrs, models)


def _hessian_file_directions(res, path: str, fingerprint: str, dims: int | None, label: str | None,
                             model: nn.Module | None, row: int | None, eig: Sequence[int] | None) -> Directions:
    if model is None:
        raise ConfigError(f"--directions {path} is a hessian result: its eigenvectors need the model "
                          f"(load_directions(..., model=model))")
    row = 0 if row is None else int(row)
    where = f"--directions {path}:{row}"
    with_vectors = [(n, node) for n, node in res.models.items() if "eigenvectors" in node.groups]
    if not with_vectors:
        raise ConfigError(f"{where} is a hessian result without stored eigenvectors: run lt hessian with "
                          f"--save-vectors (it keeps them for lt surface --directions)")
    match = [(n, node) for n, node in with_vectors
             if node.groups["eigenvectors"].attrs.get("model_fingerprint") == fingerprint]
    if label is not None:
        match = [(n, node) for n, node in match if n == label] or match
    if not match:
        have = ", ".join(f"{n} ({str(node.groups['eigenvectors'].attrs.get('model_fingerprint', ''))[:12]})"
                         for n, node in with_vectors)
        raise ConfigError(f"{where}: the eigenvectors were computed for other weights (model {have}), not this model "
                          f"({fingerprint[:12]}); a Hessian's eigenvectors belong to the weights it was taken at: "
                          f"run lt hessian --save-vectors on this checkpoint")
    if eig is None:
        eig = [1, 2][:2 if dims is None else int(dims)]
    eig = [int(i) for i in eig]
    if dims is not None and len(eig) != int(dims):
        raise ConfigError(f"--eig {','.join(map(str, eig))} names {len(eig)} eigenvector(s) but this run is "
                          f"{dims}-D (--dims {dims}); give {dims} number(s), e.g. --eig "
                          f"{'1,2' if int(dims) == 2 else '1'}")
    name, node = match[0]
    return hessian_directions(model, node, row=row, eig=eig, source=str(path), label=name, run=res.attrs)


# ----------------------------------------------------------------------------- resumable runs
@dataclass
class SurfaceJob:
    """One model of a surface run: its label, the model, its :class:`ModelInfo`, data and directions."""

    label: str
    model: nn.Module
    info: Any
    data: DataSet
    directions: Directions
    #: the directions of repeats 1 .. K-1 (``--repeats K``; ``directions`` is repeat 0); empty: one repeat
    more_directions: Sequence[Directions] = ()

    @property
    def repeats(self) -> list[Directions]:
        """Every repeat's directions, repeat 0 first."""
        return [self.directions, *self.more_directions]


def _job_key(job: SurfaceJob) -> dict:
    key = {"label": job.label, "checkpoint_sha256": getattr(job.info, "sha256", None),
           "model_fingerprint": job.directions.fingerprint, "directions": job.directions.digest(),
           "data": {k: v for k, v in job.data.describe().items()}}
    if job.more_directions:        # one repeat: the key it had before --repeats existed
        key["repeat_directions"] = [d.digest() for d in job.more_directions]
    return key


# ----------------------------------------------------------------------------- repeats and sharpness
#: the purpose :func:`repeat_seed` derives with (``seeds.SURFACE_REPEAT``: keeps repeat seeds apart from
#: other derivations; the same number as before the seeds module, so repeat seeds are unchanged)
REPEAT_TAG = seeds.SURFACE_REPEAT


def repeat_seed(seed: int, repeat: int) -> int:
    """The direction seed of repeat ``repeat`` (from 0) of a run with seed ``seed``.

    Repeat 0 is the run's own seed (so ``--repeats 1`` is the run it always was); repeat r >= 1 is
    ``engine.derive_seed(seed, REPEAT_TAG, r)``.  It depends on nothing but ``seed`` and ``r``, so the
    first K repeats of a longer run are the K repeats of a shorter one.
    """
    if int(repeat) < 0:
        raise ConfigError(f"repeat {repeat}: expected 0 or more")
    return int(seed) if int(repeat) == 0 else derive_seed(int(seed), REPEAT_TAG, int(repeat))


def repeat_directions(model: nn.Module, repeats: int, dims: int = 2, norm: str = "filter", ignore: str = "biasbn",
                      seed: int = 0) -> list[Directions]:
    """``repeats`` independent :func:`random_directions` of ``model``, repeat r drawn with :func:`repeat_seed`
    ``(seed, r)`` (its recipe records that seed and ``repeat: r``).

    Raises:
        ConfigError: ``repeats`` < 1, and as :func:`random_directions`.
    """
    repeats = check_repeats(repeats)
    out = []
    for r in range(repeats):
        d = random_directions(model, dims, norm, ignore, repeat_seed(seed, r))
        if repeats > 1:
            d.recipe["repeat"] = r
            d.recipe["run_seed"] = int(seed)
        out.append(d)
    return out


def check_repeats(repeats) -> int:
    """``--repeats`` as an int >= 1.

    Raises:
        ConfigError: anything else.
    """
    try:
        k = int(repeats)
        ok = k == float(repeats) and k >= 1 and not isinstance(repeats, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"--repeats {repeats!r}: expected a whole number of independent direction pairs, at least 1 "
                          f"(1, the default, is one pair), e.g. --repeats 5")
    return k


def border_rise(loss: np.ndarray, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Centre-to-border rise of each grid: the mean loss on the grid's border (1-D: the two ends) minus the
    loss at the centre (the grid point nearest 0).  ``loss`` is one grid (``(nx,)`` / ``(nx, ny)``) or
    several with a leading repeat axis; returns one value per grid (float64)."""
    loss = np.asarray(loss, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    dims = 1 if y is None else 2
    grids = loss.reshape((-1,) + loss.shape[loss.ndim - dims:])
    cx = int(np.argmin(np.abs(x)))
    out = []
    for g in grids:
        if dims == 2:
            cy = int(np.argmin(np.abs(np.asarray(y, dtype=np.float64))))
            border = np.concatenate([g[0, :], g[-1, :], g[1:-1, 0], g[1:-1, -1]])
            out.append(float(np.mean(border) - g[cx, cy]))
        else:
            out.append(float(np.mean([g[0], g[-1]]) - g[cx]))
    return np.array(out, dtype=np.float64)


def _second_difference(values: np.ndarray, coords: np.ndarray, c: int) -> float:
    """The second derivative at ``coords[c]`` from the three grid points around it (the three-point
    formula for uneven spacing; ``(f+ - 2 f0 + f-) / h**2`` on an even grid).  NaN at a grid end."""
    if c <= 0 or c >= len(coords) - 1:
        return math.nan
    hl, hr = float(coords[c] - coords[c - 1]), float(coords[c + 1] - coords[c])
    fl, f0, fr = float(values[c - 1]), float(values[c]), float(values[c + 1])
    return 2.0 * (hl * fr - (hl + hr) * f0 + hr * fl) / (hl * hr * (hl + hr))


def centre_curvature(loss: np.ndarray, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Curvature of each grid at its centre (the point nearest 0) along each direction, by a second
    difference of the stored loss: shape ``(grids, dims)`` (column 0 along x, 1 along y); NaN where the
    centre is a grid end."""
    loss = np.asarray(loss, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    dims = 1 if y is None else 2
    grids = loss.reshape((-1,) + loss.shape[loss.ndim - dims:])
    cx = int(np.argmin(np.abs(x)))
    out = np.full((len(grids), dims), np.nan)
    for k, g in enumerate(grids):
        if dims == 1:
            out[k, 0] = _second_difference(g, x, cx)
        else:
            yy = np.asarray(y, dtype=np.float64)
            cy = int(np.argmin(np.abs(yy)))
            out[k, 0] = _second_difference(g[:, cy], x, cx)
            out[k, 1] = _second_difference(g[cx, :], yy, cy)
    return out


def sharpness(loss: np.ndarray, x: np.ndarray, y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The sharpness summaries of a repeats file, one row per repeat: ``sharpness_rise`` (:func:`border_rise`)
    and ``sharpness_curvature`` (:func:`centre_curvature`)."""
    return {"sharpness_rise": border_rise(loss, x, y), "sharpness_curvature": centre_curvature(loss, x, y)}


@dataclass(frozen=True)
class SurfaceOptions:
    """The options of a surface run into a file (:func:`run_surface`, ``lt surface``), validated once,
    when it is made; the fields hold the resolved values.

    ``x``, ``y``: the grid's coordinates (``y`` None for a line; float tuples, e.g. from
    :func:`parse_range`); ``mc``, ``bn``, ``seed``, ``precision`` (parsed), ``compile`` (``auto`` /
    ``on`` / ``off``) as :class:`SurfaceEvaluator`, which, like :func:`surface`, keeps them as keywords
    for one model.  The run's fingerprint hashes every field but ``compile`` (it changes how the same
    numbers are computed, not which; :func:`landscape_tools.engine.options_key`); the file records
    them as each model group's attributes and its ``x`` / ``y`` arrays.

    Raises:
        ConfigError: an empty or non-finite grid, a negative ``mc``, an unknown ``bn``, ``precision``
            or ``compile``.
    """

    x: tuple
    y: tuple | None = None
    mc: int = 0
    bn: str = "frozen"
    seed: int = 0
    precision: str = "fp32"
    compile: str = field(default="off", metadata={"identity": False})

    def __post_init__(self):
        axes = {"x": _axis(self.x, "x"), "y": None if self.y is None else _axis(self.y, "y")}
        _check_mc_bn(int(self.mc), self.bn)
        resolved = dict(axes, mc=int(self.mc), seed=int(self.seed), precision=parse_precision(self.precision),
                        compile=parse_compile(self.compile))
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def grid(self) -> tuple[int, ...]:
        """The grid's shape: ``(len(x),)`` or ``(len(x), len(y))``."""
        return (len(self.x),) if self.y is None else (len(self.x), len(self.y))


def _axis(values, name: str) -> tuple:
    try:
        axis = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        axis = None
    if axis is None or axis.ndim != 1 or axis.size == 0 or not np.isfinite(axis).all():
        raise ConfigError(f"the grid's {name} coordinates {values!r} are not a list of finite numbers; give them as "
                          f"--{name} MIN:MAX:NUM, e.g. --{name} -1:1:21")
    return tuple(float(v) for v in axis)


def run_key(jobs: Sequence[SurfaceJob], options: SurfaceOptions, repeats: int) -> dict:
    """Everything that determines a surface result (shard excluded), as a JSON-able dict: the models
    (with their data and directions), the options (:func:`landscape_tools.engine.options_key`, the grid
    included) and the number of repeats (direction pairs)."""
    return {"models": [_job_key(j) for j in jobs], "options": engine.options_key(options), "repeats": int(repeats)}


def _provenance(command, config, seed, device) -> dict:
    root = store.provenance("surface", command, config, seed, device)
    # torch.__version__ is a str subclass h5py cannot store as an attribute
    return {k: (str(v) if isinstance(v, str) else v) for k, v in root.items()}


def _layout(jobs: Sequence[SurfaceJob], x: np.ndarray, y: np.ndarray | None, options: SurfaceOptions) -> dict:
    grid = options.grid
    layout = {}
    for j in jobs:
        k = len(j.repeats)
        shape = grid if k == 1 else (k,) + grid
        data = {"x": x, "loss": np.full(shape, np.nan), "accuracy": np.full(shape, np.nan),
                "done": np.zeros(shape, dtype=bool)}
        if y is not None:
            data["y"] = y
        if k > 1:
            data["repeat_seeds"] = np.array([int(d.recipe.get("seed", -1)) for d in j.repeats], dtype=np.int64)
            data["sharpness_rise"] = np.full(k, np.nan)
            data["sharpness_curvature"] = np.full((k, len(grid)), np.nan)
        attrs = dict(j.info.describe()) if hasattr(j.info, "describe") else {}
        attrs.update({"norm": j.directions.recipe.get("norm"), "ignore": j.directions.recipe.get("ignore"),
                      "bn": options.bn, "mc": options.mc, "precision": options.precision,
                      "compile": False, "compile_option": options.compile, "compile_note": "",
                      "split": j.data.split, "dims": j.directions.dims,
                      "directions_kind": j.directions.recipe.get("kind"), "num_samples": len(j.data),
                      "data": json.dumps(j.data.describe(), sort_keys=True, default=str)})
        groups = {"directions": to_node(j.directions)}
        if k > 1:
            attrs["repeats"] = k
            groups["repeat_directions"] = {"attrs": {"note": "repeat r's directions in group r (repeat 0: the "
                                                             "model's directions group)"},
                                           "groups": {str(r): to_node(d) for r, d in enumerate(j.repeats) if r}}
        layout[j.label] = {"attrs": attrs, "data": data, "groups": groups}
    return layout


def _store_sharpness(result: "store.PartialResult", label: str) -> None:
    """Write a repeats group's sharpness summaries from its stored (complete) grid."""
    loss = result.read(f"{label}/loss")
    x = result.read(f"{label}/x")
    y = result.read(f"{label}/y") if "y" in result.file[label] else None
    for name, values in sharpness(loss, x, y).items():
        result.write(f"{label}/{name}", Ellipsis, values)


def _explain_mismatch(old: dict, key: dict) -> str | None:
    """Which part of an earlier run's key (a partial file's) differs from this run's, in words."""
    if not isinstance(old, dict):
        return None
    was, now = (int(k.get("repeats", 1)) for k in (old, key))
    if was != now:
        return f"another --repeats: {now}, the partial file has {was}"
    for part, what in (("models", "models or directions or data"), ("options", "options")):
        if old.get(part) != key.get(part):
            if part == "models" and isinstance(old.get("models"), list):
                for o, n in zip(old["models"], key["models"]):
                    for k, label in (("checkpoint_sha256", "model"), ("model_fingerprint", "model weights"),
                                     ("directions", "directions"), ("data", "data")):
                        if o.get(k) != n.get(k):
                            return f"another {label} ({n['label']})"
            if part == "options" and isinstance(old.get("options"), dict):
                for k in sorted(set(old["options"]) | set(key["options"])):
                    was, now = (o.get(k) for o in (old["options"], key["options"]))
                    if was != now:
                        return f"another grid (--{k})" if k in ("x", "y") else \
                            f"another --{k}: {now}, the partial file has {was}"
            return f"another {what}"
    return None


def run_surface(jobs: Sequence[SurfaceJob], output: str, options: SurfaceOptions, *,
                shard: tuple[int, int] | None = None, overwrite: bool = False, command: Sequence[str] | None = None,
                config: dict | None = None, device: str = "cpu", progress: Progress = None,
                flush_seconds: float = 5.0, flush_points: int = 64, on_point: Callable[[int, int], None] | None = None,
                notice: Callable[[str], None] | None = None) -> Path:
    """Compute a surface for each job into ``output``, resumably; returns the final path.

    Progress goes to ``output + ".partial"`` in batches (every ``flush_seconds`` or ``flush_points``
    points, whichever comes first): values first, then their ``done`` flags, so a run killed at any
    moment loses at most the unflushed batch, and the same call later finishes the remaining points.

    Args:
        jobs: the models with their data and directions.
        output: final ``.h5`` path.
        options: the run's :class:`SurfaceOptions` (grid, mc, bn, seed, precision, compile; validated
            when made).  ``compile="auto"`` decides for each model from the points it has left to
            compute.  Each model group's attrs record the precision, ``compile_option`` (auto / on /
            off as asked), ``compile`` (True: the forward passes ran compiled, False: eagerly) and
            ``compile_note`` (why).  The precision is part of the run's fingerprint (a partial file
            of another precision is refused, like one of another grid); compilation is not (the same
            numbers to float rounding): a resumed run decides again, and when its points ran
            otherwise than the earlier ones, ``compile`` is ``"mixed"``.  When a forward pass ran out
            of memory and batches went through in smaller pieces (the same numbers up to rounding;
            :class:`Pieces`), ``rows_per_pass`` records the samples per pass.
        shard: ``(i, n)``: compute only :func:`shard_points` ``(N, i, n)``; root attrs ``shard``, ``n_shards``.
        overwrite: replace an existing output or a partial file of another run.
        command, config, device: provenance.
        progress: ``progress(done, total, message)``.
        flush_seconds, flush_points: write batching.
        on_point: called as ``on_point(job_index, point_index)`` after each point is computed (a test
            hook: raising from it simulates an interrupted run).
        notice: see :class:`SurfaceEvaluator`.

    Raises:
        StoreError: output exists, another process writes it, a partial file of another run.
        ConfigError: inconsistent directions / grid.
    """
    if not jobs:
        raise ConfigError("no models to evaluate")
    o = options
    mc, bn, seed, precision, compile_option = o.mc, o.bn, o.seed, o.precision, o.compile
    x = np.asarray(o.x, np.float64)
    y = None if o.y is None else np.asarray(o.y, np.float64)
    for j in jobs:
        for d in j.repeats:
            _grid_shape(d, x, y)
    n_repeats = len(jobs[0].repeats)
    if any(len(j.repeats) != n_repeats for j in jobs):
        raise ConfigError(f"every model of a run needs the same number of repeats (direction pairs): "
                          f"{', '.join(f'{j.label}: {len(j.repeats)}' for j in jobs)}")
    grid = (len(x),) if y is None else (len(x), len(y))
    shape = grid if n_repeats == 1 else (n_repeats,) + grid
    n_points = int(np.prod(grid))
    n_units = n_points * n_repeats         # unit u: repeat u // n_points, grid point u % n_points
    for j in jobs:     # refuse a bad precision, or a compilation that cannot be done, before any file is touched
        _check_precision(j.model, precision)
        blocker = _compile_blocker(j.model, mc) if compile_option == "on" else None
        if blocker:
            raise ConfigError(f"--compile on: {blocker}; use --compile off (or auto, which runs it eagerly)")
    key = run_key(jobs, o, n_repeats)
    shard_i, shard_n = shard if shard is not None else (0, 1)
    points = shard_points(n_units, shard_i, shard_n)
    identity = engine.run_identity("surface", key, _device_of(jobs[0].model), (shard_i, shard_n))
    root = _provenance(command, config, seed, device)
    root["dims"] = 1 if y is None else 2
    layout = _layout(jobs, x, y, o)
    result = engine.open_run(output, root, identity, layout, overwrite=overwrite, explain=_explain_mismatch)
    try:
        total = len(points) * len(jobs)
        done_count = 0
        todo = []
        for ji, job in enumerate(jobs):
            done = result.read(f"{job.label}/done").reshape(-1)
            remaining = [int(p) for p in points if not done[p]]
            done_count += len(points) - len(remaining)
            todo.append(remaining)
        report(progress, done_count, total, "resumed" if result.resumed else "")
        coords = _coords(x, y)
        rows_per_pass = None       # samples per forward pass once out of memory made them fewer: kept for later models
        for ji, job in enumerate(jobs):
            for r, directions in enumerate(job.repeats):
                units = [u for u in todo[ji] if u // n_points == r]
                if not units:
                    continue
                name = job.label if n_repeats == 1 else f"{job.label} repeat {r}"
                said = any(u // n_points < r for u in todo[ji])      # an earlier repeat already told the notice
                with SurfaceEvaluator(job.model, job.data, directions, mc, bn, seed, precision, compile_option,
                                      len(units), None if said else notice) as ev:
                    # earlier: this model's units computed before this evaluator (a resume, or earlier repeats)
                    _record_compile(result, job.label, compile_option, ev,
                                    earlier=len(points) - len(todo[ji]) + sum(u // n_points < r for u in todo[ji]))
                    ev.pieces.size = rows_per_pass

                    def compute(u, ev=ev):
                        return ev(*coords[u % n_points])

                    def write(batch, label=job.label):
                        if result.file is not None:
                            _write_points(result, label, shape, [(u, loss, acc) for u, (loss, acc) in batch])

                    try:
                        done_count = engine.run_units(
                            units, compute, write, progress=progress, done=done_count, total=total,
                            message=lambda u, value, name=name: name, every=flush_points, seconds=flush_seconds,
                            on_unit=None if on_point is None else (lambda u, ji=ji: on_point(ji, u)))
                    finally:
                        rows_per_pass = ev.pieces.size
                        if rows_per_pass is not None and result.file is not None:
                            result.set_attrs(job.label, {"rows_per_pass": int(rows_per_pass)})
        if n_repeats > 1 and shard_n == 1:     # shards: lt merge computes them from the assembled grid
            for job in jobs:
                _store_sharpness(result, job.label)
            result.flush()
        return result.finalize()
    finally:
        result.close()


def _record_compile(result: "store.PartialResult", label: str, option: str, ev: SurfaceEvaluator,
                    earlier: int) -> None:
    """The group's ``compile`` attrs: what runs now, or ``"mixed"`` when ``earlier`` points ran otherwise."""
    ran: Any = bool(ev.compiled)
    note = ev.compile_note
    if earlier:
        old = result.attrs(label)
        was = old.get("compile")
        if isinstance(was, str) or (was is not None and bool(was) != ran):
            before = "compiled and eagerly" if isinstance(was, str) else "compiled" if bool(was) else "eagerly"
            ran, note = "mixed", f"{earlier} point(s) ran {before} before a resume; the rest: {ev.compile_note}"
    result.set_attrs(label, {"compile": ran, "compile_option": option, "compile_note": note})


def _write_points(result: "store.PartialResult", label: str, shape: tuple[int, ...],
                  pending: list[tuple[int, float, float]]) -> None:
    """Values first, flushed, then their done flags: a kill in between loses nothing recorded as done."""
    idx = [np.unravel_index(p, shape) for p, _, _ in pending]
    for i, (_, loss, acc) in zip(idx, pending):
        result.write(f"{label}/loss", i, loss)
        result.write(f"{label}/accuracy", i, acc)
    result.flush()
    for i in idx:
        result.write(f"{label}/done", i, True)
    result.flush()


# ----------------------------------------------------------------------------- merging shards
def merge_shards(paths: Sequence[str], output: str, overwrite: bool = False,
                 command: Sequence[str] | None = None) -> Path:
    """Assemble ``--shard i/n`` files into one complete result: :func:`landscape_tools.engine.merge`
    (any kind; kept under this name for the library's users).

    Raises:
        StoreError / ConfigError: as :func:`landscape_tools.engine.merge`.
    """
    return engine.merge(paths, output, overwrite=overwrite, command=command)


def merge_units(results: Sequence["store.Result"]) -> dict[str, dict]:
    """The model groups of a surface assembled from its shards (the engine's merge): every point from
    the shard that computed it; ``compile`` is ``"mixed"`` when the shards ran otherwise."""
    merged = {}
    for label in results[0].models:
        node = engine.merge_done(results, label, "done")
        ran = [r.models[label].attrs.get("compile") for r in results]
        if any(isinstance(v, str) for v in ran) or len({bool(v) for v in ran}) > 1:
            node["attrs"]["compile"] = "mixed"
            node["attrs"]["compile_note"] = "the shards ran " + ", ".join(
                f"{'mixed' if isinstance(v, str) else 'compiled' if v else 'eagerly'} ({r.path})"
                for v, r in zip(ran, results))
        if int(node["attrs"].get("repeats", 1)) > 1:    # from the assembled grid, as one process computes them
            data = node["data"]
            arr = lambda name: engine.array_of(node, name)
            for name, values in sharpness(arr("loss"), arr("x"), arr("y") if "y" in data else None).items():
                data[name] = values
        merged[label] = node
    return merged


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
