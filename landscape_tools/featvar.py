"""Feature-map variance, layer by layer: across Monte-Carlo samples, over spatial positions, and the
Fourier picture of the feature maps (Park & Kim 2022, section 6 of ``PAPER.md``).

``over="mc"``: for each selected layer, the sample variance (Bessel-corrected, ``1/(mc-1)``) of
every feature-map entry across ``mc`` stochastic forward passes, averaged over channels, positions
and data samples.  The randomness is the model's dropout (every ``MCDropout`` and ``nn.Dropout*``
module switched on, BatchNorm on running statistics) or Gaussian input noise of std ``sigma`` with
every dropout switched off.

``over="spatial"``: for each selected layer, the variance over the ``H x W`` positions of every
(sample, channel) map (Bessel-corrected, as ``torch.var`` and the how-do-vits-work notebook),
averaged over samples and channels; one deterministic pass with dropout off.

``fourier=True``: per layer, ``log(|FFT2(map)| + 1e-6)``, shifted so frequency 0 is central, averaged
over every map seen (samples, channels and, for ``mc``, the MC copies), read along the half-diagonal
from frequency 0 to pi, minus its value at 0 ("relative log amplitude").

How the MC samples are run: the data batch is repeated along the batch dimension, one copy per MC
sample, and the copies go through the model in batched forward passes of at most ``max_batch`` rows
(default 128 on CPU, 4096 on CUDA; halved again on out-of-memory; an explicit ``max_batch`` below the
batch size also splits the batch into row pieces).  Every copy draws its own dropout masks (or noise) from a
generator seeded by ``derive_seed(seed, FEATVAR_DROPOUT, batch index, copy, dropout module, call)``
(noise: ``derive_seed(seed, FEATVAR_NOISE, batch index, copy)``; :mod:`landscape_tools.seeds`), so the
result does not depend on the chunking, equals the plain loop of ``mc`` separate passes with the same masks, and
a resumed run equals an uninterrupted one.  Statistics are merged in float64 as they stream out of
the forward hooks (Chan et al.'s parallel Welford update), so memory does not grow with ``mc``.
Hooks, dropout switches and train/eval flags are always restored: the model is left as it was.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import seeds
from .device import Progress, report
from .errors import ConfigError, NumericalError
from .evaluate import DEFAULT_MAX_BATCH, _is_oom, check_max_batch
from .models import Smoothing, dropout_modules, replaced_forwards, sampling_dropout_modules
from .models.mc import _CHANNEL_DROPOUTS
from .precision import autocast, full_precision, model_dtype, parse_precision
from .seeds import derive_seed
from .streaming import batch_sizes, inputs_of

OVER = ("mc", "spatial")
LAYER_PRESETS = ("stages", "blocks")
LOG_EPS = 1e-6
DEFAULT_MC = 32
#: default cap on the rows (MC copies x samples) of one forward pass, per device type (see evaluate's)
DEFAULT_MAX_BATCH = dict(DEFAULT_MAX_BATCH)


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Source:
    """Where MC randomness comes from: ``dropout`` or Gaussian input ``noise`` of std ``sigma``."""

    kind: str = "dropout"
    sigma: float = 0.0

    def __str__(self) -> str:
        return "dropout" if self.kind == "dropout" else f"noise:{self.sigma:g}"


def parse_source(text: str | Source | None) -> Source:
    """``"dropout"`` or ``"noise:SIGMA"`` -> :class:`Source`.

    Raises:
        ConfigError: anything else, or a sigma that is not a positive finite number.
    """
    if isinstance(text, Source):
        return text
    if text is None or text == "dropout":
        return Source("dropout")
    kind, sep, arg = str(text).partition(":")
    if kind == "noise" and sep:
        try:
            sigma = float(arg)
        except ValueError:
            sigma = float("nan")
        if math.isfinite(sigma) and sigma > 0:
            return Source("noise", sigma)
    raise ConfigError(f"--source {text!r}: expected 'dropout' or 'noise:SIGMA' with SIGMA a positive number "
                      f"(the std of Gaussian input noise), e.g. noise:0.1")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def dropout_mask(shape: Sequence[int], p: float, seed: int, device, dtype) -> torch.Tensor:
    """The scaled keep-mask ``(rand >= p) / (1 - p)`` drawn from a generator seeded with ``seed``."""
    gen = _generator(seed, torch.device(device))
    keep = torch.rand(tuple(shape), generator=gen, device=device, dtype=dtype) >= p
    return keep.to(dtype) * (1.0 / (1.0 - p))


def input_noise(shape: Sequence[int], sigma: float, seed: int, device, dtype) -> torch.Tensor:
    """``sigma * N(0, 1)`` noise drawn from a generator seeded with ``seed``."""
    gen = _generator(seed, torch.device(device))
    return sigma * torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- layers
@dataclass
class LayerInfo:
    """The selected layers of one model, in forward order.

    Attributes:
        names: module names (``named_modules``), in the order their outputs are produced.
        depth: normalised depth ``index / (n - 1)`` (0 for a single layer).
        is_smoothing: a smoothing layer ran since the previous selected layer (inclusive).
        is_downsampling: a downsampling layer ran since the previous selected layer (zoo models:
            ``zoo_spec.downsampling_layers``; other models: the output's spatial size shrank).
        shapes: per-sample output shape of each layer.
    """

    names: list[str]
    depth: np.ndarray
    is_smoothing: np.ndarray
    is_downsampling: np.ndarray
    shapes: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.names)

    def fourier_length(self, i: int) -> int:
        """Points on layer ``i``'s half-diagonal (0 when its maps are not square ``C x H x H``)."""
        s = self.shapes[i]
        return s[-1] // 2 + 1 if len(s) == 3 and s[-1] == s[-2] else 0


@dataclass
class _Probe:
    order: list[str]                           # module names, by completion in the forward pass
    shapes: dict[str, tuple[int, ...] | None]  # per-sample output shape (None: not a tensor)
    calls: dict[str, int]
    input_shape: tuple[int, ...]


def _probe(model: nn.Module, sample: torch.Tensor) -> _Probe:
    """One deterministic forward pass of one sample with a hook on every module."""
    order, shapes, calls, handles = [], {}, {}, []

    def make(name):
        def hook(_module, _inp, out):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                shapes[name] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make(name)))
    except (RuntimeError, AttributeError) as exc:
        for h in handles:
            h.remove()
        raise ConfigError(f"cannot attach forward hooks to this model ({type(model).__name__}: "
                          f"{str(exc).splitlines()[0]}); TorchScript models cannot be hooked: load the weights as a "
                          f"state_dict with --arch NAME or --model pkg.module:factory instead") from None
    try:
        with _evaluation(model), _copywise_dropout(model, None), torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return _Probe(order, shapes, calls, tuple(sample.shape[1:]))


def available_layers(model: nn.Module, limit: int = 12) -> list[str]:
    """A few module names worth suggesting (top-level children first)."""
    top = [n for n, _ in model.named_children()]
    rest = [n for n, _ in model.named_modules() if n and n not in top]
    return (top + rest)[:limit]


def _match_globs(model: nn.Module, spec: str) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    picked: list[str] = []
    for glob in (g.strip() for g in spec.split(",")):
        if not glob:
            raise ConfigError(f"--layers {spec!r} has an empty entry; give comma-separated module names or globs")
        hits = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not hits:
            raise ConfigError(f"--layers {glob!r} matches no module of the model; available names include "
                              f"{', '.join(available_layers(model))} (globs like 'layer*' match by name)")
        picked += [n for n in hits if n not in picked]
    return picked


def select_layers(model: nn.Module, spec: str | Sequence[str] | None, sample: torch.Tensor) -> LayerInfo:
    """Resolve a layer selection against a model and describe the layers.

    Args:
        model: any ``nn.Module``; zoo models carry ``zoo_spec``.
        spec: None (zoo: ``stages``; other models: the top-level children), ``stages``, ``blocks``,
            comma-separated globs matched (fnmatch) against ``named_modules`` names, or a list of names.
        sample: one input batch (its first sample runs through the model once).

    Returns:
        a :class:`LayerInfo`, layers in forward order.

    Raises:
        ConfigError: a preset on a non-zoo model, a glob matching nothing, a layer that never runs,
            runs more than once per forward pass or does not return a tensor.
    """
    zoo = getattr(model, "zoo_spec", None)
    if spec is None:
        spec = "stages" if zoo is not None else None
    if spec in LAYER_PRESETS:
        if zoo is None:
            raise ConfigError(f"--layers {spec} needs a zoo model (it reads model.zoo_spec); this "
                              f"{type(model).__name__} has none: pick modules by name or glob instead, e.g. "
                              f"--layers {','.join(available_layers(model, 3)) or 'NAME'}")
        wanted = list(getattr(zoo, spec))
    elif spec is None:
        wanted = [n for n, _ in model.named_children()]
    elif isinstance(spec, str):
        wanted = _match_globs(model, spec)
    else:
        wanted = list(spec)
        known = {n for n, _ in model.named_modules() if n}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ConfigError(f"layers {', '.join(unknown)} are not modules of the model; available names include "
                              f"{', '.join(available_layers(model))}")
    probe = _probe(model, sample[:1])
    twice = [n for n in wanted if probe.calls.get(n, 0) > 1]
    if twice:
        raise ConfigError(f"layer {twice[0]} runs {probe.calls[twice[0]]} times per forward pass, so its output is "
                          f"ambiguous; select modules that run once")
    ran = [n for n in probe.order if n in set(wanted)]
    if not ran:
        raise ConfigError(f"none of the selected layers ({', '.join(wanted[:6])}) runs in the forward pass")
    bad = [n for n in ran if probe.shapes[n] is None]
    if bad:
        raise ConfigError(f"layer {bad[0]} does not return a tensor; select another module")
    position = {n: i for i, n in enumerate(probe.order)}
    if zoo is not None:
        smoothing = set(zoo.smoothing_layers)
        downsampling = set(zoo.downsampling_layers)
    else:
        smoothing = {n for n, m in model.named_modules() if isinstance(m, Smoothing)}
        downsampling = set()
    is_smooth, is_down = [], []
    prev_pos, prev_spatial = -1, _spatial(probe.input_shape)
    for n in ran:
        pos = position[n]
        segment = {m for m in probe.order[prev_pos + 1:pos + 1]}
        is_smooth.append(bool(segment & smoothing))
        if zoo is not None:
            is_down.append(bool(segment & downsampling))
        else:
            spatial = _spatial(probe.shapes[n])
            is_down.append(spatial is not None and prev_spatial is not None and spatial < prev_spatial)
            prev_spatial = spatial if spatial is not None else prev_spatial
        prev_pos = pos
    count = len(ran)
    depth = np.arange(count, dtype=np.float64) / max(count - 1, 1)
    return LayerInfo(ran, depth, np.array(is_smooth, bool), np.array(is_down, bool), [probe.shapes[n] for n in ran])


def _spatial(shape: tuple[int, ...] | None) -> int | None:
    if shape is None or len(shape) != 3:
        return None
    return int(shape[1] * shape[2])


# ----------------------------------------------------------------------------- model state
@contextlib.contextmanager
def _evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN on running statistics) for the block; every module's flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class _CopySchedule:
    """Which MC copies the current forward pass carries, and how their masks are seeded."""

    def __init__(self, seed: int, batch: int, copies: Sequence[int], rows: tuple[int, int, int] | None = None):
        self.seed, self.batch, self.copies = int(seed), int(batch), list(copies)
        self.rows = rows                       # (start, count, total): the pass holds rows start.. of total
        self.calls: dict[int, int] = {}

    def next_call(self, module_index: int) -> int:
        call = self.calls.get(module_index, 0)
        self.calls[module_index] = call + 1
        return call


@contextlib.contextmanager
def _copywise_dropout(model: nn.Module, holder: list | None) -> Iterator[None]:
    """Replace every dropout's forward: identity when ``holder`` is None or holds None, else each MC
    copy of the repeated batch gets its own mask seeded by ``derive_seed(seed, FEATVAR_DROPOUT, batch,
    copy, module, call)`` (the ``module``-th dropout module in ``dropout_modules`` order at its
    ``call``-th call in a pass; only the modules MC
    sampling switches on, see ``sampling_dropout_modules``; the others are the identity).  Restored on exit."""
    sampled = {id(m) for _, m in sampling_dropout_modules(model)}
    with replaced_forwards((m, _copy_forward(m, index, holder if id(m) in sampled else None,
                                             isinstance(m, _CHANNEL_DROPOUTS)))
                           for index, (_, m) in enumerate(dropout_modules(model))):
        yield


def _copy_forward(module: nn.Module, index: int, holder: list | None, channelwise: bool):
    def forward(x: torch.Tensor) -> torch.Tensor:
        schedule = holder[0] if holder else None
        p = float(getattr(module, "p", 0.0))
        if schedule is None or p == 0.0:
            return x
        call = schedule.next_call(index)
        n = len(schedule.copies)
        if x.shape[0] % n:
            raise NumericalError(f"dropout input of batch {x.shape[0]} is not {n} MC copies of one batch: the model "
                                 f"mixes samples across the batch; use --mc with a model that treats samples independently")
        b = x.shape[0] // n
        shape = (b, x.shape[1]) + (1,) * (x.dim() - 2) if channelwise and x.dim() > 2 else (b,) + tuple(x.shape[1:])
        if p >= 1.0:
            return torch.zeros_like(x)
        # masks are drawn in float32 under autocast (bf16/fp16 inputs), so every precision sees the same masks
        mask_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        keep = torch.empty((n,) + shape, device=x.device, dtype=mask_dtype)
        piece = schedule.rows
        if piece is not None:        # rows start..start+count of a batch of total: the whole batch's mask, sliced
            start, count, total = piece
            if b != count:
                raise NumericalError(f"a dropout input of shape {tuple(x.shape)} does not have the batch ({count} "
                                     f"samples x {n} MC copies) as its leading dimension, so a batch of {total} cannot "
                                     f"be split into pieces of --max-batch {count} rows: give --max-batch at least "
                                     f"{total} (or a smaller --batch-size)")
        for j, k in enumerate(schedule.copies):
            gen = _generator(derive_seed(schedule.seed, seeds.FEATVAR_DROPOUT, schedule.batch, k, index, call), x.device)
            if piece is None:
                torch.rand(shape, generator=gen, device=x.device, dtype=mask_dtype, out=keep[j])
            else:
                whole = torch.rand((total,) + shape[1:], generator=gen, device=x.device, dtype=mask_dtype)
                keep[j] = whole[start:start + count]
        keep = keep.ge_(p).reshape((n * b,) + shape[1:])
        if keep.dtype != x.dtype:
            keep = keep.to(x.dtype)
        return (x * keep).mul_(1.0 / (1.0 - p))
    return forward


# ----------------------------------------------------------------------------- statistics
def spatial_variance(maps: torch.Tensor) -> torch.Tensor:
    """Variance over positions of each map: ``(N, C, H, W) -> (N, C)``, Bessel-corrected, float64."""
    return maps.to(torch.float64).flatten(2).var(dim=2, unbiased=True)


def frequency_axis(size: int) -> np.ndarray:
    """Frequencies (radians per pixel) on the half-diagonal of a ``size x size`` spectrum: 0 .. pi."""
    return 2.0 * np.pi * np.arange(size // 2 + 1) / size


def fourier_diagonal(maps: torch.Tensor) -> torch.Tensor:
    """``log(|FFT2| + 1e-6)`` of square maps ``(..., H, H)``, fftshift-ed, on the half-diagonal.

    Returns float64 ``(..., H // 2 + 1)``: entry ``k`` is the log amplitude at frequency
    ``(2 pi k / H, 2 pi k / H)``, from 0 to pi (pi included for even ``H``).
    """
    size = maps.shape[-1]
    amp = torch.log(torch.fft.fft2(maps.to(torch.float64)).abs() + LOG_EPS)
    amp = torch.fft.fftshift(amp, dim=(-2, -1))
    idx = (size // 2 + torch.arange(size // 2 + 1, device=maps.device)) % size
    return amp[..., idx, idx]


class _Welford:
    """Per-entry mean and sum of squared deviations over MC copies, merged chunk by chunk (float64)."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, chunk: torch.Tensor) -> None:
        """``chunk``: ``(copies, *entry_shape)``; the chunk's own mean and squared deviations are taken
        in its dtype (shifted by the first copy, then centred), the merge with earlier chunks in float64."""
        k = chunk.shape[0]
        first = chunk[0]
        shifted = chunk - first              # exact zeros where every copy agrees (layers before any dropout)
        dmean = shifted.mean(dim=0)
        m2 = shifted.sub_(dmean).square_().sum(dim=0).to(torch.float64)
        mean = first.to(torch.float64) + dmean.to(torch.float64)
        if self.n == 0:
            self.n, self.mean, self.m2 = k, mean, m2
            return
        total = self.n + k
        delta = mean - self.mean
        self.mean += delta * (k / total)
        self.m2 += m2 + delta.square() * (self.n * k / total)
        self.n = total


@dataclass
class BatchStats:
    """Sums of one data batch, per layer (what a resumed run stores and adds up).

    Attributes:
        var_sum: (n_layers,) sum of the per-entry variances (mc) or per-map variances (spatial).
        count: (n_layers,) number of entries / maps summed.
        fourier_sum: (n_layers, n_freq) sum of half-diagonal log amplitudes over maps (NaN-padded).
        fourier_count: (n_layers,) number of maps in ``fourier_sum``.
    """

    var_sum: np.ndarray
    count: np.ndarray
    fourier_sum: np.ndarray
    fourier_count: np.ndarray


@dataclass
class FeatVarResult:
    """Feature-map variance of one model.

    Attributes:
        layers: the :class:`LayerInfo`.
        variance: (n_layers,) mean variance per layer (NaN where undefined, e.g. spatial variance
            of a layer without spatial dimensions).
        over, samples, source: ``mc``/``spatial``, MC samples (1 for spatial), randomness source.
        num_samples: data samples analysed; batches: data batches.
        frequency, fourier: (n_layers, n_freq) NaN-padded frequency axis (radians) and relative log
            amplitude, or None without ``fourier``.
    """

    layers: LayerInfo
    variance: np.ndarray
    over: str
    samples: int
    source: str
    num_samples: int
    batches: int
    seed: int
    frequency: np.ndarray | None = None
    fourier: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)


def _over_options(over: str, mc: int | None, source) -> tuple[int, Source | None]:
    """``over``'s MC samples and source, resolved: ``mc``: (``mc`` or :data:`DEFAULT_MC`, the source);
    ``spatial``: (1, None).

    Raises:
        ConfigError: an unknown ``over``, fewer than 2 MC samples, a bad source, a source with ``spatial``.
    """
    if over not in OVER:
        raise ConfigError(f"--over {over!r}: expected one of {', '.join(OVER)}")
    if over == "mc":
        mc = DEFAULT_MC if mc is None else int(mc)
        if mc < 2:
            raise ConfigError(f"--mc {mc}: the sample variance needs at least 2 MC samples")
        return mc, parse_source(source)
    if source is not None and str(source) != "dropout":
        raise ConfigError("--source applies to --over mc only; --over spatial is deterministic")
    return 1, None


class FeatureVariance:
    """The analysis of one model, batch by batch (so a run can resume at batch granularity).

    Args:
        model: any ``nn.Module`` taking ``(N, ...)`` inputs and treating samples independently in
            eval mode (true of the zoo); left unchanged.
        sample: a batch of inputs (only its first sample is used, to find the layers).
        over: ``mc`` or ``spatial``.
        mc: MC samples per input (>= 2) for ``mc``.
        source: ``dropout``, ``noise:SIGMA`` or a :class:`Source` (``mc`` only).
        layers: see :func:`select_layers`.
        fourier: also compute the relative log amplitude per layer.
        seed: seed of every mask and noise draw.
        precision: ``fp32`` (default), ``bf16`` or ``fp16``: the forward passes run under
            :func:`landscape_tools.precision.autocast`; the hooked features are cast back to the
            model's dtype before any statistic (dropout masks are the same at every precision).
        max_batch: at most this many rows (MC copies x samples) per forward pass; a batch of more samples
            runs in pieces of ``max_batch`` rows whose masks and noise are the rows of the whole batch's,
            so the numbers do not depend on it (to float rounding of the per-piece sums).  None
            (default): copies stacked up to :data:`DEFAULT_MAX_BATCH` rows for the device type, batches
            never split.

    Raises:
        ConfigError: bad options, a model without dropout for ``source=dropout``, bad layers.
    """

    def __init__(self, model: nn.Module, sample: torch.Tensor, over: str = "mc", mc: int | None = DEFAULT_MC,
                 source: str | Source | None = None, layers: str | Sequence[str] | None = None,
                 fourier: bool = False, seed: int = 0, max_batch: int | None = None, precision: str = "fp32"):
        mc, self.source = _over_options(over, mc, source)
        if over == "mc":
            if self.source.kind == "dropout":
                active = [n for n, m in sampling_dropout_modules(model) if float(getattr(m, "p", 0.0)) > 0.0]
                if not active:
                    raise ConfigError(f"{getattr(model, 'arch_name', type(model).__name__)} has no MC dropout, so "
                                      f"--source dropout gives zero variance; use --source noise:SIGMA (Gaussian "
                                      f"input noise, e.g. noise:0.1) or --over spatial")
        self.split = max_batch is not None          # an explicit cap also splits batches larger than it
        if max_batch is None:
            max_batch = DEFAULT_MAX_BATCH.get(sample.device.type, DEFAULT_MAX_BATCH["cpu"])
        check_max_batch(max_batch)
        self.model, self.over, self.mc, self.fourier = model, over, int(mc), bool(fourier)
        self.seed, self.max_batch = int(seed), int(max_batch)
        self.precision, self.out_dtype = parse_precision(precision), model_dtype(model)
        self.layers = select_layers(model, layers, sample)
        self.n_freq = max([self.layers.fourier_length(i) for i in range(len(self.layers))] + [1])

    # ------------------------------------------------------------------ per batch
    def empty_stats(self) -> BatchStats:
        n = len(self.layers)
        return BatchStats(np.zeros(n), np.zeros(n), np.full((n, self.n_freq), np.nan), np.zeros(n))

    def batch_stats(self, index: int, x: torch.Tensor) -> BatchStats:
        """Statistics of data batch ``index`` (its position in the fixed batch order) with inputs ``x``."""
        b = int(x.shape[0])
        piece = min(b, self.max_batch) if self.split else b
        copies = max(1, min(self.mc, self.max_batch // max(piece, 1)))
        while True:
            try:
                if piece >= b:
                    return self._batch_stats(index, x, copies)
                parts = [self._batch_stats(index, x, copies, (r, min(r + piece, b), b)) for r in range(0, b, piece)]
                return BatchStats(*(np.sum([getattr(s, key) for s in parts], axis=0) for key in _SUMS))
            except Exception as exc:  # out of memory: fewer copies per pass, same masks, same answer
                if not _is_oom(exc) or copies == 1:
                    raise
                copies = max(1, copies // 2)
                if x.is_cuda:
                    torch.cuda.empty_cache()

    def _batch_stats(self, index: int, x: torch.Tensor, copies: int,
                     rows: tuple[int, int, int] | None = None) -> BatchStats:
        """The sums of batch ``index`` (``rows``: only rows ``start..stop`` of its ``total``)."""
        n_layers = len(self.layers)
        stats = self.empty_stats()
        fsum = [None] * n_layers
        welford = [_Welford() for _ in range(n_layers)]
        holder: list = [None]
        current = {"n": 1}
        whole = x
        piece = None
        if rows is not None:
            start, stop, total = rows
            x, piece = x[start:stop], (start, stop - start, total)
        b = int(x.shape[0])
        layer_of = {name: i for i, name in enumerate(self.layers.names)}
        modules = dict(self.model.named_modules())

        def make_hook(i):
            def hook(_module, _inp, out):
                if not isinstance(out, torch.Tensor):
                    raise ConfigError(f"layer {self.layers.names[i]} does not return a tensor")
                out = out.detach()
                if self.precision != "fp32":   # reduced-precision features: statistics in the model's dtype
                    out = full_precision(out, self.out_dtype)
                if self.over == "mc":
                    welford[i].add(out.reshape((current["n"], b) + tuple(out.shape[1:])))
                else:
                    if out.dim() == 4:
                        v = spatial_variance(out)
                        stats.var_sum[i] += float(v.sum())
                        stats.count[i] += v.numel()
                    else:
                        stats.var_sum[i], stats.count[i] = np.nan, 1
                if self.fourier and self.layers.fourier_length(i):
                    for part in out.split(b):
                        diag = fourier_diagonal(part).sum(dim=(0, 1))
                        fsum[i] = diag if fsum[i] is None else fsum[i] + diag
                    stats.fourier_count[i] += out.shape[0] * out.shape[1]
            return hook

        handles = []
        try:
            for name, i in layer_of.items():
                handles.append(modules[name].register_forward_hook(make_hook(i)))
            with _evaluation(self.model), _copywise_dropout(self.model, holder), torch.no_grad(), \
                    _seeded_global_rng(derive_seed(self.seed, seeds.FEATVAR_BATCH, index), x.device), \
                    autocast(x.device, self.precision):
                if self.over == "spatial":
                    self.model(x)
                else:
                    for first in range(0, self.mc, copies):
                        ks = list(range(first, min(first + copies, self.mc)))
                        current["n"] = len(ks)
                        if self.source.kind == "dropout":
                            holder[0] = _CopySchedule(self.seed, index, ks, piece)
                            xin = x.repeat((len(ks),) + (1,) * (x.dim() - 1))
                        else:
                            holder[0] = None
                            noise = [input_noise(whole.shape, self.source.sigma,
                                                 derive_seed(self.seed, seeds.FEATVAR_NOISE, index, k), x.device,
                                                 x.dtype) for k in ks]
                            if piece is not None:
                                noise = [z[piece[0]:piece[0] + piece[1]] for z in noise]
                            xin = torch.cat([x + z for z in noise])
                        self.model(xin)
                        holder[0] = None
        finally:
            for h in handles:
                h.remove()
        if self.over == "mc":
            for i, w in enumerate(welford):
                if w.n != self.mc:
                    raise NumericalError(f"layer {self.layers.names[i]} saw {w.n} of {self.mc} MC samples")
                var = w.m2 / (self.mc - 1)
                stats.var_sum[i] = float(var.sum())
                stats.count[i] = var.numel()
        for i, s in enumerate(fsum):
            if s is not None:
                stats.fourier_sum[i, :s.numel()] = s.cpu().numpy()
        return stats

    # ------------------------------------------------------------------ reduction
    def finish(self, batches: Sequence[BatchStats], num_samples: int) -> FeatVarResult:
        """Add up the batches' sums (in batch order) into the result (:func:`finish_sums`)."""
        lengths, axes = (self.fourier_axes() if self.fourier else (None, None))
        variance, frequency, amplitude = finish_sums(
            np.array([s.var_sum for s in batches]), np.array([s.count for s in batches]),
            np.array([s.fourier_sum for s in batches]), np.array([s.fourier_count for s in batches]), lengths, axes)
        return FeatVarResult(self.layers, variance, self.over, self.mc, str(self.source) if self.source else "none",
                             int(num_samples), len(batches), self.seed, frequency, amplitude)

    def fourier_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per layer: the half-diagonal's length and its frequency axis (radians, NaN-padded to ``n_freq``)."""
        n = len(self.layers)
        lengths = np.array([self.layers.fourier_length(i) for i in range(n)], dtype=np.int64)
        axes = np.full((n, self.n_freq), np.nan)
        for i in range(n):
            if lengths[i]:
                axes[i, :lengths[i]] = frequency_axis(self.layers.shapes[i][-1])
        return lengths, axes

    def settings(self) -> dict[str, Any]:
        """Everything that determines the numbers (for fingerprints and attributes)."""
        return {"over": self.over, "samples": self.mc, "source": str(self.source) if self.source else "none",
                "fourier": self.fourier, "seed": self.seed, "layers": list(self.layers.names),
                "precision": self.precision}


def finish_sums(var_sum: np.ndarray, count: np.ndarray, fourier_sum: np.ndarray, fourier_count: np.ndarray,
                lengths: np.ndarray | None, axes: np.ndarray | None):
    """The result from per-batch sums (rows in batch order), as one process or a merge of shards
    computes it: ``(variance, frequency, amplitude)`` (the last two None without ``lengths``)."""
    var_sum, count = np.sum(var_sum, axis=0), np.sum(count, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.where(count > 0, var_sum / np.maximum(count, 1), np.nan)
    if lengths is None:
        return variance, None, None
    frequency = np.full(axes.shape, np.nan)
    amplitude = np.full(axes.shape, np.nan)
    fsum, fcount = np.sum(fourier_sum, axis=0), np.sum(fourier_count, axis=0)
    for i, length in enumerate(int(v) for v in lengths):
        if length and fcount[i] > 0:
            mean = fsum[i, :length] / fcount[i]
            amplitude[i, :length] = mean - mean[0]
            frequency[i, :length] = axes[i, :length]
    return variance, frequency, amplitude


def batch_variance(batches: Sequence[BatchStats]) -> np.ndarray:
    """(n_batches, n_layers): each batch's own mean variance per layer (NaN where it has no entries)."""
    var_sum = np.array([s.var_sum for s in batches], dtype=np.float64)
    count = np.array([s.count for s in batches], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, var_sum / np.maximum(count, 1), np.nan)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Any randomness we do not control (a user model's own) is seeded per batch; global state restored."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def feature_variance(model: nn.Module, batches: Sequence[tuple[torch.Tensor, Any]] | Sequence[torch.Tensor],
                     over: str = "mc", mc: int | None = DEFAULT_MC, source: str | Source | None = None,
                     layers: str | Sequence[str] | None = None, fourier: bool = False, seed: int = 0,
                     max_batch: int | None = None, progress: Progress = None, precision: str = "fp32") -> FeatVarResult:
    """Feature-map variance per layer over fixed-order data batches (see the module docstring).

    Args:
        model: the network (left unchanged: hooks removed, modes restored).
        batches: ``[(x, y), ...]`` (e.g. ``DataSet.batches()``) or ``[x, ...]``.
        over, mc, source, layers, fourier, seed, max_batch, precision: see :class:`FeatureVariance`.
        progress: ``progress(done, total, message)`` after each batch.

    Returns:
        a :class:`FeatVarResult`.

    Raises:
        ConfigError: bad options or layers; NumericalError: a model that mixes samples.
    """
    xs = inputs_of(batches)
    if not xs:
        raise ConfigError("no data batches to analyse")
    analysis = FeatureVariance(model, xs[0], over, mc, source, layers, fourier, seed, max_batch, precision)
    stats = []
    for i, x in enumerate(xs):
        stats.append(analysis.batch_stats(i, x))
        report(progress, i + 1, len(xs), "")
    return analysis.finish(stats, sum(batch_sizes(xs)))


# ----------------------------------------------------------------------------- result files
def result_node(result: FeatVarResult, model_attrs: dict) -> dict:
    """The HDF5 group of one model (schema v1, ``featvar``)."""
    layers = result.layers
    node = {"attrs": dict(model_attrs, over=result.over, samples=result.samples, source=result.source,
                          num_samples=result.num_samples, batches=result.batches, seed=result.seed,
                          variance_definition=_definition(result.over)),
            "data": {"layers": np.array(layers.names, dtype=object), "depth": layers.depth,
                     "variance": result.variance, "is_smoothing": layers.is_smoothing,
                     "is_downsampling": layers.is_downsampling}}
    if result.fourier is not None:
        node["groups"] = {"fourier": _fourier_node(layers, result.frequency, result.fourier)}
    return node


def _definition(over: str) -> str:
    if over == "mc":
        return ("per entry: sample variance (Bessel, 1/(samples-1)) across MC samples; "
                "mean over channels, positions and data samples")
    return "per (sample, channel) map: variance over positions (Bessel, 1/(H*W-1)); mean over samples and channels"


def _fourier_node(layers: LayerInfo, frequency: np.ndarray, amplitude: np.ndarray) -> dict:
    lengths = np.array([layers.fourier_length(i) for i in range(len(layers))], dtype=np.int64)
    return {"attrs": {"definition": "log(|fftshift(FFT2(map))| + 1e-6) averaged over maps, half-diagonal from "
                                    "frequency 0 to pi, minus its value at frequency 0",
                      "frequency_unit": "radians per pixel"},
            "data": {"frequency": frequency, "amplitude": amplitude, "length": lengths}}


def _layout(analysis: FeatureVariance, n_batches: int, model_attrs: dict) -> dict:
    n = len(analysis.layers)
    placeholder = FeatVarResult(analysis.layers, np.full(n, np.nan), analysis.over, analysis.mc,
                                str(analysis.source) if analysis.source else "none", 0, n_batches, analysis.seed,
                                np.full((n, analysis.n_freq), np.nan) if analysis.fourier else None,
                                np.full((n, analysis.n_freq), np.nan) if analysis.fourier else None)
    node = result_node(placeholder, model_attrs)
    node["data"]["batch_variance"] = (np.full((n_batches, n), np.nan), {
        "description": "per data batch (rows, in batch order) and layer: the mean variance of that batch alone "
                       "(var_sum / count of the sums group); the units lt compare resamples"})
    node.setdefault("groups", {})["sums"] = {
        "attrs": {"note": "per-batch sums the variance is computed from (kept for resuming and merging)"},
        "data": {"var_sum": np.zeros((n_batches, n)), "count": np.zeros((n_batches, n)),
                 "fourier_sum": np.full((n_batches, n, analysis.n_freq), np.nan),
                 "fourier_count": np.zeros((n_batches, n)), "done": np.zeros(n_batches, dtype=bool)}}
    if analysis.fourier:       # what a merge of shards needs to finish the Fourier curves without the model
        node["groups"]["sums"]["data"]["fourier_axis"] = analysis.fourier_axes()[1]
    return node


@dataclass(frozen=True)
class FeatvarOptions:
    """The options of a feature-variance run into a file (:func:`run_to_file`, ``lt featvar``),
    validated once, when it is made; the fields hold the resolved values.

    The fields mean what :class:`FeatureVariance`'s arguments of the same names mean (that per-model
    class, like :func:`feature_variance`, keeps them as keywords).  Resolved on creation: ``mc``
    None -> :data:`DEFAULT_MC` (``over="mc"``) or 1 (``spatial``), ``source`` as text (``dropout`` /
    ``noise:SIGMA``; None for ``spatial``), ``precision`` parsed, ``layers`` a tuple of globs or one
    spec (None: the default stages).  The run's fingerprint hashes every field but ``max_batch`` (the
    numbers do not depend on it; :func:`landscape_tools.engine.options_key`); the file records them
    as each model group's attributes.

    Raises:
        ConfigError: as :class:`FeatureVariance` for the options that do not depend on the model.
    """

    over: str = "mc"
    mc: int | None = DEFAULT_MC
    source: str | None = None
    layers: str | tuple | None = None
    fourier: bool = False
    seed: int = 0
    max_batch: int | None = field(default=None, metadata={"identity": False})
    precision: str = "fp32"

    def __post_init__(self):
        mc, source = _over_options(self.over, self.mc, self.source)
        if self.max_batch is not None:
            check_max_batch(self.max_batch)
        layers = self.layers if self.layers is None or isinstance(self.layers, str) else tuple(self.layers)
        resolved = {"mc": mc, "source": None if source is None else str(source), "layers": layers,
                    "fourier": bool(self.fourier), "seed": int(self.seed),
                    "max_batch": None if self.max_batch is None else int(self.max_batch),
                    "precision": parse_precision(self.precision)}
        for name, value in resolved.items():
            object.__setattr__(self, name, value)


@dataclass
class Job:
    """One model to analyse: its label, the network, its group attributes and its data batches."""

    label: str
    model: nn.Module
    attrs: dict
    batches: list
    data: dict = field(default_factory=dict)


def run_to_file(jobs: Sequence[Job], output: str, root_attrs: dict, options: FeatvarOptions, *,
                overwrite: bool = False, progress: Progress = None, ctx=None,
                shard: tuple[int, int] | None = None) -> dict[str, FeatVarResult]:
    """Analyse every job and write one result file, resumable at batch granularity.

    Progress (per-batch sums) goes to ``OUTPUT.partial`` after every batch; the same call after an
    interruption continues where it stopped and gives the same file as an uninterrupted run.

    The units are the data batches (the masks are seeded by the global batch index): ``shard=(i, n)``
    computes batches ``i, i + n, ...`` only, into a file whose sums ``lt merge`` adds up with the other
    shards' (:func:`merge_units`); the variance of a shard file is NaN until then.  Under torchrun /
    srun (``ctx`` of several ranks) rank ``r`` of ``n`` computes shard ``r/n`` into its rank file and
    rank 0 merges (:func:`landscape_tools.engine.run_ranks`): the same numbers, bit for bit, as one
    process (the sums are added in batch order either way).  When any rank fails, every rank stops,
    nothing is written and the rank files are kept: the same command resumes them.

    Args:
        jobs: the models with their data; each becomes one group.
        output: the ``.h5`` path.
        root_attrs: provenance (``store.provenance``).
        options: the run's :class:`FeatvarOptions` (validated when made).
        overwrite: replace an existing output or a partial file of a different run.
        progress: ``progress(done, total, message)`` (this process's batches).
        ctx: a :class:`landscape_tools.distributed.Context`; None or one process: everything here.
        shard: ``(i, n)`` of ``--shard I/N``; None: every batch.

    Returns:
        label -> :class:`FeatVarResult` of a whole run (one process, or rank 0 after the merge; read
        from the file); empty for a shard and on the other ranks.

    Raises:
        ConfigError, StoreError, NumericalError; RankFailed: another rank failed.
    """
    from . import engine
    from .distributed import Context

    # torch.__version__ is a str subclass h5py cannot store: plain str for every text attribute
    root_attrs = {k: str(v) if isinstance(v, str) else v for k, v in root_attrs.items()}
    prepared = _prepare(jobs, options)
    results: dict[str, FeatVarResult] = {}

    def compute(out, part):
        results.clear()
        results.update(_run_shard(prepared, out, root_attrs, part, overwrite, progress))

    engine.run_ranks(ctx or Context(), output, compute, shard=shard, overwrite=overwrite)
    if ctx is not None and ctx.distributed:
        results.clear()
        if ctx.is_main:
            results.update(_results_from_file(prepared[0], output))
    return results


def _run_shard(prepared, output, root_attrs: dict, shard: tuple[int, int], overwrite: bool,
               progress: Progress) -> dict[str, FeatVarResult]:
    from . import engine

    analyses, layout, key = prepared
    device = analyses[0][2][0].device
    identity = engine.run_identity("featvar", key, device, shard)
    with engine.open_run(output, root_attrs, identity, layout, overwrite=overwrite) as part:
        _compute_rows(part, analyses, None if shard == (0, 1) else shard, progress)
        results = _finish_into(part, analyses) if shard == (0, 1) else {}
        part.finalize()
    return results


def _results_from_file(analyses, path) -> dict[str, FeatVarResult]:
    from . import store

    res = store.read_result(path)
    out = {}
    for job, analysis, xs in analyses:
        node = res.models[job.label]
        fourier = node.groups.get("fourier")
        out[job.label] = FeatVarResult(analysis.layers, node.data["variance"], analysis.over, analysis.mc,
                                       str(analysis.source) if analysis.source else "none",
                                       int(node.attrs["num_samples"]), len(xs), analysis.seed,
                                       None if fourier is None else fourier.data["frequency"],
                                       None if fourier is None else fourier.data["amplitude"])
    return out


#: why ``--compile`` is refused by featvar
COMPILE_REFUSED = ("--compile is not supported by lt featvar: its forward hooks and per-copy dropout masks are "
                   "attached and removed for every batch, which torch.compile does not see once a graph is "
                   "compiled (its hook guards are off by default), so the statistics could come from stale hooks; "
                   "drop --compile (the hooks would break the graph at every layer anyway)")


def _prepare(jobs: Sequence[Job], options: FeatvarOptions):
    """The analysis of every job, the partial file's layout and the run's key (for its fingerprint)."""
    from . import engine

    o = options
    analyses, layout, prints = [], {}, []
    for job in jobs:
        xs = inputs_of(job.batches)       # streamed: read when computed
        if not xs:
            raise ConfigError(f"no data batches for {job.label}")
        analysis = FeatureVariance(job.model, xs[0], o.over, o.mc, o.source, o.layers, o.fourier, o.seed,
                                   o.max_batch, o.precision)
        analyses.append((job, analysis, xs))
        layout[job.label] = _layout(analysis, len(xs), dict(job.attrs, precision=analysis.precision))
        layout[job.label]["attrs"]["num_samples"] = sum(batch_sizes(xs))   # shards and merges too
        prints.append({"label": job.label, "sha256": job.attrs.get("checkpoint_sha256"), "data": job.data,
                       "batch_sizes": batch_sizes(xs), **analysis.settings()})
    return analyses, layout, {"options": engine.options_key(o), "models": prints}


_SUMS = ("var_sum", "count", "fourier_sum", "fourier_count")


def _compute_rows(part, analyses, rank: tuple[int, int] | None, progress: Progress) -> None:
    """Compute every batch not yet done (of rank ``(r, n)``: batches ``r, r + n, ...``) into ``part``,
    through the engine's unit loop (:func:`landscape_tools.engine.run_units`)."""
    from . import engine

    rows = [range(len(xs)) if rank is None else range(rank[0], len(xs), rank[1]) for _, _, xs in analyses]
    total = sum(len(r) for r in rows)
    todo = []
    for (job, _, _), mine in zip(analyses, rows):
        done = part.read(job.label + "/sums/done").astype(bool)
        todo.append([i for i in mine if not done[i]])
    count = total - sum(len(t) for t in todo)
    if count:
        report(progress, count, total, "resumed")
    for (job, analysis, xs), units in zip(analyses, todo):
        base = job.label + "/sums/"

        def write(batch, base=base):
            for i, s in batch:
                for key in _SUMS:
                    part.write(base + key, i, getattr(s, key))
            part.flush()
            for i, _ in batch:
                part.write(base + "done", i, True)
            part.flush()

        count = engine.run_units(units, lambda i, a=analysis, xs=xs: a.batch_stats(i, xs[i]), write,
                                 progress=progress, done=count, total=total,
                                 message=lambda i, s, label=job.label: label)


def _finish_into(part, analyses, sums: dict | None = None) -> dict[str, FeatVarResult]:
    """Write the per-batch ``sums`` (label -> arrays; None: already in ``part``), compute every model's
    result from the sums in the file and write it into ``part``."""
    results = {}
    for job, analysis, xs in analyses:
        base = job.label + "/sums/"
        if sums is not None:
            for key in _SUMS:
                part.write(base + key, ..., sums[job.label][key])
            part.write(base + "done", ..., np.ones(len(xs), dtype=bool))
        stats = [BatchStats(*(part.read(base + k)[i] for k in _SUMS)) for i in range(len(xs))]
        result = analysis.finish(stats, sum(batch_sizes(xs)))
        part.write(job.label + "/variance", ..., result.variance)
        if job.label + "/batch_variance" in part.file:     # absent from partial files of older versions
            part.write(job.label + "/batch_variance", ..., batch_variance(stats))
        part.set_attrs(job.label, {"num_samples": result.num_samples})
        if result.fourier is not None:
            part.write(job.label + "/fourier/amplitude", ..., result.fourier)
            part.write(job.label + "/fourier/frequency", ..., result.frequency)
        results[job.label] = result
    part.flush()
    return results


def merge_units(results) -> dict[str, dict]:
    """The model groups of a featvar result assembled from its shards (the engine's merge): every
    batch's sums from the shard that computed it, then the variance, per-batch variance and Fourier
    curves from the sums exactly as one process computes them (:func:`finish_sums`)."""
    from . import engine

    merged = {}
    for label in results[0].models:
        node = engine.merge_done(results, label, "sums/done")
        sums = {k: engine.array_of(node["groups"]["sums"], k) for k in node["groups"]["sums"]["data"]}
        fourier = node.get("groups", {}).get("fourier")
        lengths = None if fourier is None else engine.array_of(fourier, "length")
        variance, frequency, amplitude = finish_sums(sums["var_sum"], sums["count"], sums["fourier_sum"],
                                                     sums["fourier_count"], lengths, sums.get("fourier_axis"))
        engine.array_of(node, "variance")[...] = variance
        if "batch_variance" in node["data"]:
            with np.errstate(invalid="ignore", divide="ignore"):
                engine.array_of(node, "batch_variance")[...] = np.where(
                    sums["count"] > 0, sums["var_sum"] / np.maximum(sums["count"], 1), np.nan)
        if fourier is not None:
            engine.array_of(fourier, "frequency")[...] = frequency
            engine.array_of(fourier, "amplitude")[...] = amplitude
        merged[label] = node
    return merged
