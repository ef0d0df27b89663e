"""CIFAR-C-style image corruptions, generated on the fly and seeded, and the published corrupted-CIFAR files.

Robustness under corruption is the paper's third claim (smoothing + MC dropout degrade more gracefully).
The corruptions follow the CIFAR-10-C / CIFAR-100-C benchmark (Hendrycks & Dietterich 2019): each has
five severities, each severity one parameter value (the published CIFAR values, :data:`PARAMETERS`).

**Pixel space.** The images of :mod:`landscape_tools.data` are normalised tensors, ``x = (p - mean) / std``
per channel with ``p`` in ``[0, 1]`` (``DataSet.normalisation``).  Every corruption works on ``p``:
un-normalise ``p = x * std + mean``, corrupt, clip to ``[0, 1]``, re-normalise with the same mean and std.
Data used as stored (``tensors:``) has no known pixel scale and is refused.

The corruptions of an image ``p`` (shape ``(C, H, W)``; ``c`` the severity's parameter; ``z`` standard
normal, ``u`` uniform on ``[0, 1)``, one draw per value; every result clipped to ``[0, 1]``):

* ``gaussian_noise``: ``p + c z``, ``c`` = 0.04, 0.06, 0.08, 0.09, 0.10.
* ``shot_noise``: ``Poisson(c p) / c`` (photon noise at ``c`` photons per unit intensity), ``c`` = 500,
  250, 100, 75, 50.
* ``impulse_noise`` (salt and pepper): a value becomes 0 where ``u < c/2``, 1 where ``c/2 <= u < c``,
  else stays; ``c`` (the fraction of values hit) = 0.01, 0.02, 0.03, 0.05, 0.07.
* ``speckle_noise``: ``p + p c z``, ``c`` = 0.06, 0.10, 0.12, 0.16, 0.20.
* ``gaussian_blur``: each channel convolved with the normalised Gaussian ``w_k ~ exp(-k^2 / (2 c^2))``,
  ``|k| <= r = int(4 c + 0.5)``, along rows then columns; ``c`` (sigma, pixels) = 0.4, 0.6, 0.7, 0.8, 1.0.
* ``defocus_blur``: each channel convolved with the kernel ``K = D * G``: ``D`` the disk of radius ``r``
  (the grid points ``i^2 + j^2 <= r^2``, normalised to sum 1), ``G`` the normalised 3x3 Gaussian of
  sigma ``a`` (anti-aliasing), ``*`` the full 2-D convolution; ``c = (r, a)`` = (0.3, 0.4), (0.4, 0.5),
  (0.5, 0.6), (1, 0.2), (1.5, 0.1).
* ``contrast``: ``(p - m) c + m`` with ``m`` the image's mean per channel over ``H, W``; ``c`` = 0.75,
  0.5, 0.4, 0.3, 0.15.
* ``brightness``: ``V = max_channels p`` (HSV value) becomes ``V' = min(V + c, 1)`` with hue and
  saturation kept: ``p' = p V' / V`` where ``V > 0``, ``p' = V'`` in every channel where ``V = 0``
  (exactly the RGB -> HSV -> RGB round trip; for one channel ``p' = min(p + c, 1)``); ``c`` = 0.05, 0.1,
  0.15, 0.2, 0.3.
* ``pixelate``: block means on an ``s_h x s_w`` grid (``s = max(1, int(c H))``, adaptive average pooling:
  output cell ``i`` averages input rows ``floor(i H / s) .. ceil((i + 1) H / s) - 1``), then nearest-
  neighbour upsampling back (output row ``i`` takes cell ``floor(i s / H)``); ``c`` = 0.95, 0.9, 0.85, 0.75,
  0.65.

Both blurs pad with the half-sample symmetric reflection (``d c b a | a b c d``; scipy's ``reflect``).
Severity 0 is the identity (the clean data, returned unchanged).

**Seeding.** The random draws of a noise corruption on the image at position ``i`` of the full split
come from a generator seeded ``derive_seed(seed, CORRUPTION, crc32(name), severity, i)``
(:func:`sample_generator`, :mod:`landscape_tools.seeds`): an image gets
the same noise whatever subset (``--samples``), batch size or device, and the draws are made on the CPU
in float64.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import seeds
from .errors import ConfigError, DataError
from .seeds import derive_seed

SEVERITIES = (1, 2, 3, 4, 5)

#: the parameter of each corruption at severities 1..5 (the published CIFAR-10-C / CIFAR-100-C values)
PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}
CORRUPTIONS = tuple(PARAMETERS)
#: what the parameter of each corruption is (stored with the results)
PARAMETER_MEANING = {
    "gaussian_noise": "standard deviation of the added noise (pixel scale 0..1)",
    "shot_noise": "photons per unit intensity (Poisson rate = c * pixel)",
    "impulse_noise": "fraction of values set to 0 or 1",
    "speckle_noise": "standard deviation of the multiplicative noise",
    "gaussian_blur": "Gaussian sigma in pixels",
    "defocus_blur": "(disk radius in pixels, sigma of the 3x3 anti-aliasing Gaussian)",
    "contrast": "factor on the deviation from the image's per-channel mean",
    "brightness": "added to the HSV value (max over channels)",
    "pixelate": "fraction of the side kept by the block-mean grid",
}
_NOISY = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")


# ----------------------------------------------------------------------------- parsing
def parse_corruptions(values: Iterable[str] | str | None) -> list[tuple[str, int]]:
    """``--corrupt`` values -> ordered, de-duplicated ``(name, severity)`` pairs.

    Each value is ``NAME`` (severities 1-5), ``NAME:SEVERITY`` (one severity, 1..5), ``all`` (every
    corruption at 1-5) or ``all:SEVERITY``; a value may also be a comma-separated list of these.

    Raises:
        ConfigError: unknown name, a severity that is not a whole number in 1..5.
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    pairs: list[tuple[str, int]] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            name, sep, sev = part.partition(":")
            if name == "all":
                names = list(CORRUPTIONS)
            elif name in PARAMETERS:
                names = [name]
            else:
                raise ConfigError(f"--corrupt {part!r}: unknown corruption {name!r}; expected NAME[:SEVERITY] or "
                                  f"all[:SEVERITY] with NAME one of {', '.join(CORRUPTIONS)}")
            if sep:
                if not (sev.isascii() and sev.isdigit()) or not 1 <= int(sev) <= 5:
                    raise ConfigError(f"--corrupt {part!r}: severity {sev!r} is not a whole number from 1 to 5 "
                                      f"(e.g. --corrupt {name}:3; without :SEVERITY all five are run)")
                severities = [int(sev)]
            else:
                severities = list(SEVERITIES)
            for n in names:
                for s in severities:
                    if (n, s) not in pairs:
                        pairs.append((n, s))
    order = {n: i for i, n in enumerate(CORRUPTIONS)}
    return sorted(pairs, key=lambda p: (order.get(p[0], len(order)), p[0], p[1]))


def parameter(name: str, severity: int):
    """The parameter of ``name`` at ``severity`` (1..5).

    Raises:
        ConfigError: unknown name or severity.
    """
    if name not in PARAMETERS:
        raise ConfigError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity {severity!r} of {name}: expected 0 (identity) or 1..5")
    return PARAMETERS[name][severity - 1]


# ----------------------------------------------------------------------------- the corruptions
def sample_generator(seed: int, name: str, severity: int, index: int) -> torch.Generator:
    """The CPU generator of the random draws on the image at position ``index`` of the full split, seeded
    ``derive_seed(seed, seeds.CORRUPTION, crc32(name), severity, index)``."""
    return torch.Generator().manual_seed(derive_seed(seed, seeds.CORRUPTION, zlib.crc32(name.encode()), severity,
                                                     index))


def _reflect_index(n: int, radius: int) -> torch.Tensor:
    """Indices of a half-sample symmetric padding of ``radius`` on each side of ``n`` values."""
    i = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _conv_same(p: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel of ``p`` (n, C, H, W) correlated with the odd square ``kernel`` (symmetric padding)."""
    k = int(kernel.shape[-1])
    r = k // 2
    n, c, h, w = p.shape
    padded = p[:, :, _reflect_index(h, r)][:, :, :, _reflect_index(w, r)]
    weight = kernel.to(p.dtype).reshape(1, 1, k, k).expand(c, 1, k, k)
    return F.conv2d(padded, weight, groups=c)


def gaussian_kernel_1d(sigma: float, dtype=torch.float64) -> torch.Tensor:
    """Normalised ``exp(-k^2 / (2 sigma^2))`` for ``|k| <= int(4 sigma + 0.5)``."""
    r = int(4.0 * sigma + 0.5)
    k = torch.arange(-r, r + 1, dtype=dtype)
    w = torch.exp(-k ** 2 / (2.0 * sigma ** 2))
    return w / w.sum()


def defocus_kernel(radius: float, alias_sigma: float, dtype=torch.float64) -> torch.Tensor:
    """``D * G``: the normalised disk of ``radius`` convolved with the normalised 3x3 Gaussian of ``alias_sigma``."""
    r = max(int(math.ceil(radius)), 0)
    grid = torch.arange(-r, r + 1, dtype=dtype)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2).to(dtype)
    disk = disk / disk.sum()
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=dtype) / (2.0 * alias_sigma ** 2))
    g = g / g.sum()
    g2 = g[:, None] * g[None, :]
    # full 2-D convolution (G is symmetric, so correlation with the flipped kernel = correlation)
    return F.conv2d(F.pad(disk[None, None], (2, 2, 2, 2)), g2[None, None])[0, 0]


def _gaussian_blur(p: torch.Tensor, sigma: float) -> torch.Tensor:
    w = gaussian_kernel_1d(sigma, p.dtype)
    return _conv_same(p, w[:, None] * w[None, :])


def _brightness(p: torch.Tensor, c: float) -> torch.Tensor:
    v = p.amax(dim=1, keepdim=True)
    v_new = torch.clamp(v + c, max=1.0)
    scaled = p * (v_new / torch.where(v > 0, v, torch.ones_like(v)))
    return torch.where(v > 0, scaled, v_new.expand_as(p))


def _pixelate(p: torch.Tensor, c: float) -> torch.Tensor:
    h, w = int(p.shape[-2]), int(p.shape[-1])
    size = (max(1, int(c * h)), max(1, int(c * w)))
    small = F.adaptive_avg_pool2d(p, size)
    return F.interpolate(small, size=(h, w), mode="nearest")


def _contrast(p: torch.Tensor, c: float) -> torch.Tensor:
    m = p.mean(dim=(2, 3), keepdim=True)
    return (p - m) * c + m


def _noise(name: str, image: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """One image (C, H, W), float64 on the CPU."""
    if name == "gaussian_noise":
        return image + c * torch.randn(image.shape, generator=g, dtype=torch.float64)
    if name == "speckle_noise":
        return image + image * c * torch.randn(image.shape, generator=g, dtype=torch.float64)
    if name == "shot_noise":
        return torch.poisson(torch.clamp(image, min=0.0) * c, generator=g) / c
    if name == "impulse_noise":
        u = torch.rand(image.shape, generator=g, dtype=torch.float64)
        out = torch.where(u < c / 2, torch.zeros_like(image), image)
        return torch.where((u >= c / 2) & (u < c), torch.ones_like(image), out)
    raise ConfigError(f"{name} is not a noise corruption")


def corrupt_pixels(p: torch.Tensor, name: str, severity: int, seed: int = 0,
                   indices: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
    """Corrupt images in pixel space.

    Args:
        p: (n, C, H, W) floating images with values in [0, 1].
        name: one of :data:`CORRUPTIONS`.
        severity: 0 (identity: ``p`` itself is returned) or 1..5.
        seed: seed of the random draws (noise corruptions).
        indices: (n,) positions of the images in the full split (the draws of image ``i`` come from
            :func:`sample_generator` ``(seed, name, severity, indices[i])``); default ``0..n-1``.

    Returns:
        the corrupted images, clipped to [0, 1], same dtype and device as ``p`` (computed in float64
        on the CPU).

    Raises:
        ConfigError: unknown name or severity, indices of the wrong length.
        DataError: not a batch of images.
    """
    if severity == 0:
        if name not in PARAMETERS:
            raise ConfigError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
        return p
    c = parameter(name, severity)
    if p.dim() != 4 or not p.is_floating_point():
        raise DataError(f"corruptions need floating images of shape (n, channels, height, width), got "
                        f"{p.dtype} {tuple(p.shape)}")
    x = p.detach().to("cpu", torch.float64)
    if name in _NOISY:
        idx = np.arange(x.shape[0]) if indices is None else np.asarray(indices)
        if idx.shape != (x.shape[0],):
            raise ConfigError(f"indices of shape {idx.shape} for {x.shape[0]} images")
        out = torch.stack([_noise(name, x[i], c, sample_generator(seed, name, severity, int(idx[i])))
                           for i in range(x.shape[0])]) if x.shape[0] else x.clone()
    elif name == "gaussian_blur":
        out = _gaussian_blur(x, c)
    elif name == "defocus_blur":
        out = _conv_same(x, defocus_kernel(*c))
    elif name == "contrast":
        out = _contrast(x, c)
    elif name == "brightness":
        out = _brightness(x, c)
    else:
        out = _pixelate(x, c)
    return torch.clamp(out, 0.0, 1.0).to(p.device, p.dtype)


# ----------------------------------------------------------------------------- on normalised data sets
def pixel_stats(ds) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` per channel of a DataSet's normalisation (``x = (p - mean) / std``).

    Raises:
        ConfigError: data whose pixel scale is unknown (``tensors:``), or not images.
    """
    norm = ds.normalisation or {}
    if "mean" not in norm or "std" not in norm:
        raise ConfigError(f"--corrupt works on images in [0, 1] pixel space, but data {ds.spec!r} is used as stored "
                          f"and its pixel scale is unknown; corrupt the images yourself (or use digits, "
                          f"cifar10:DIR, cifar100:DIR, imagefolder:DIR, or the published files with "
                          f"--data cifar100c:DIR / cifar10c:DIR)")
    if ds.x.dim() != 4:
        raise ConfigError(f"--corrupt needs image data (n, channels, height, width); {ds.spec!r} has inputs of "
                          f"shape {tuple(ds.x.shape[1:])}")
    return np.asarray(norm["mean"], np.float64), np.asarray(norm["std"], np.float64)


def corrupt_dataset(ds, name: str, severity: int, seed: int = 0, chunk: int = 1024):
    """A copy of a normalised :class:`~landscape_tools.data.DataSet` with every image corrupted.

    Un-normalises (``p = x * std + mean``), applies :func:`corrupt_pixels` (seeded per position in the
    full split: ``ds.indices`` or ``0..n-1``), clips to [0, 1] and re-normalises; severity 0 returns
    ``ds`` itself.  Labels, spec, batch size and indices are kept; ``normalisation`` gains
    ``corruption``.

    Raises:
        ConfigError: see :func:`pixel_stats` and :func:`corrupt_pixels`.
    """
    from .data import DataSet

    if severity == 0:
        parameter(name, 1)            # validates the name
        return ds
    mean, std = pixel_stats(ds)
    shape = (1, -1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(shape)
    s = torch.as_tensor(std, dtype=torch.float64).reshape(shape)
    positions = ds.indices if ds.indices is not None else np.arange(len(ds))
    parts = []
    for i in range(0, len(ds), chunk):
        x = ds.x[i:i + chunk].detach().to("cpu", torch.float64)
        p = torch.clamp(x * s + m, 0.0, 1.0)   # rounding of the stored values may step outside [0, 1]
        q = corrupt_pixels(p, name, severity, seed, positions[i:i + chunk])
        parts.append(((q - m) / s).to(ds.x.device, ds.x.dtype))
    x = torch.cat(parts) if parts else ds.x.clone()
    norm = dict(ds.normalisation, corruption=f"{name} severity {severity} (parameter {parameter(name, severity)}), "
                                              f"seed {seed}, in [0, 1] pixel space")
    return DataSet(x, ds.y, ds.spec, ds.split, ds.num_classes, ds.batch_size, ds.indices, norm, ds.sample_seed)


# ----------------------------------------------------------------------------- results
@dataclass
class CorruptionResults:
    """Ensemble curves of one model on corrupted data, per corruption and severity.

    Attributes:
        curves: ``{(name, severity): EnsembleCurve}``.
        source: ``generated`` (from the clean split, by :func:`corrupt_dataset`) or the ``cifar*c:DIR`` spec.
        clean: the model group's top-level arrays are the clean split (``generated``) rather than the
            corrupted sets pooled (published files).
        seed: seed of the corruptions' draws (generated).
    """

    curves: dict
    source: str
    clean: bool
    seed: int

    def to_node(self) -> dict:
        """The ``corruptions`` group of a model (schema: kind ``evaluate``)."""
        names = []
        for name, _ in self.curves:
            if name not in names:
                names.append(name)
        groups = {}
        for name in names:
            keys = sorted(s for n, s in self.curves if n == name)
            curves = [self.curves[(name, s)] for s in keys]
            sizes = curves[0].sizes
            data = {"severity": (np.array(keys, dtype=np.int64), {"description": "severity (1..5), rows below"}),
                    "n_samples": (sizes.astype(np.int64), {"description": "ensemble size N, columns below"})}
            for key, text in (("nll", "mean -log p(label) of the mean softmax, nats"),
                              ("accuracy", "fraction of arg-max predictions equal to the label"),
                              ("ece", "expected calibration error, equal-width bins of max probability"),
                              ("brier", "mean sum_k (onehot_k - p_k)^2")):
                data[key] = (np.stack([getattr(c, key) for c in curves]).astype(np.float64),
                             {"description": f"{text}; (severity, N)"})
            data["num_samples"] = (np.array([c.num_samples for c in curves], dtype=np.int64),
                                   {"description": "scored samples per severity"})
            params = [PARAMETERS[name][s - 1] if name in PARAMETERS else None for s in keys]
            groups[name] = {"attrs": {"parameters": _json(params), "parameter": PARAMETER_MEANING.get(name, ""),
                                      "mc_active": bool(curves[0].mc_active)},
                            "data": data}
        attrs = {"source": self.source, "clean": bool(self.clean), "seed": int(self.seed),
                 "corruptions": _json(names),
                 "pixel_space": "un-normalised to [0, 1], corrupted, clipped to [0, 1], re-normalised",
                 "description": "per corruption (sub-group) and severity (rows): the metrics of the ensemble "
                                "sizes n_samples (columns); severity 0 is the model group's clean arrays when "
                                "'clean' is true"}
        return {"attrs": attrs, "groups": groups}


def _json(value) -> str:
    import json
    return json.dumps(value)


def evaluate_corruptions(ds, pairs: Sequence[tuple[str, int]], evaluate: Callable[[Any, str, int], Any],
                         seed: int = 0) -> CorruptionResults:
    """Corrupt ``ds`` with each ``(name, severity)`` in turn and score it.

    Args:
        ds: the clean, normalised DataSet.
        pairs: from :func:`parse_corruptions`.
        evaluate: ``evaluate(corrupted DataSet, name, severity) -> EnsembleCurve`` (e.g. a closure over
            :func:`~landscape_tools.evaluate.ensemble_curve` with the run's options).
        seed: seed of the corruptions' random draws.

    Raises:
        ConfigError: data whose pixel scale is unknown (checked before any work).
    """
    pixel_stats(ds)
    curves = {}
    for name, severity in pairs:
        curves[(name, severity)] = evaluate(corrupt_dataset(ds, name, severity, seed), name, severity)
    return CorruptionResults(curves, "generated", True, int(seed))


# ----------------------------------------------------------------------------- published files
def cifar_c_sets(spec: str, pairs: Sequence[tuple[str, int]] | None, samples: int | None, seed: int,
                 batch_size: int, in_channels: int | None, device, dtype=torch.float32):
    """The corrupted test sets of a ``cifar10c:DIR`` / ``cifar100c:DIR`` spec, one at a time.

    Args:
        spec: the data spec.
        pairs: ``(name, severity)`` to read (from ``--corrupt``); None: every ``<name>.npy`` in DIR at
            severities 1-5.  A name need not be one of :data:`CORRUPTIONS` (the published sets have more).
        samples, seed: a seeded subset of the 10000 images, the same positions in every set.
        batch_size, in_channels, device, dtype: as :func:`~landscape_tools.data.load_data`.

    Returns:
        ``(pairs, iterator of (name, severity, DataSet))``; the files are read lazily (memory-mapped).

    Raises:
        DataError: a missing folder or file, shapes that do not match.
    """
    from .data import cifar_c_names, read_cifar_c

    names = cifar_c_names(spec)
    if pairs is None:
        pairs = [(n, s) for n in names for s in SEVERITIES]
    else:
        missing = sorted({n for n, _ in pairs if n not in names})
        if missing:
            raise DataError(f"{spec}: no {', '.join(m + '.npy' for m in missing)} in the folder; it holds "
                            f"{', '.join(names) or 'no <corruption>.npy files'}")

    def sets():
        for name, severity in pairs:
            yield name, severity, read_cifar_c(spec, name, severity, samples=samples, seed=seed,
                                               batch_size=batch_size, in_channels=in_channels, device=device,
                                               dtype=dtype)
    return list(pairs), sets()


def pool_curves(curves: Sequence) -> Any:
    """One :class:`~landscape_tools.evaluate.EnsembleCurve` of several data sets scored apart (same sizes):
    the metrics of all their samples together, exactly as one accumulator over all of them (means
    weighted by the sets' sizes; reliability bins summed; ECE from the summed bins); per-sample values
    concatenated in order."""
    from .evaluate import EnsembleCurve

    if not curves:
        raise DataError("no corrupted sets to pool")
    first = curves[0]
    n = np.array([c.num_samples for c in curves], dtype=np.float64)
    total = float(n.sum())

    def mean(key):
        return sum(w * getattr(c, key) for w, c in zip(n, curves)) / total

    counts = sum(c.bin_counts for c in curves)
    correct = sum(np.nan_to_num(c.bin_accuracy) * c.bin_counts for c in curves)
    conf = sum(np.nan_to_num(c.bin_confidence) * c.bin_counts for c in curves)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_acc = np.where(counts > 0, correct / counts, np.nan)
        bin_conf = np.where(counts > 0, conf / counts, np.nan)
    ece = np.abs(correct - conf).sum(axis=1) / total

    def cat(key):
        values = [getattr(c, key) for c in curves]
        return None if any(v is None for v in values) else np.concatenate(values, axis=1)

    return EnsembleCurve(sizes=first.sizes, nll=mean("nll"), accuracy=mean("accuracy"), ece=ece, brier=mean("brier"),
                         bin_edges=first.bin_edges, bin_counts=counts.astype(np.int64), bin_accuracy=bin_acc,
                         bin_confidence=bin_conf, num_samples=int(total), mc_active=first.mc_active,
                         forward_passes=first.forward_passes, seed=first.seed, note=first.note,
                         sample_log_prob=cat("sample_log_prob"), sample_correct=cat("sample_correct"),
                         sample_confidence=cat("sample_confidence"), sample_brier=cat("sample_brier"))
