"""Data that does not fit: batches decoded on demand, in a fixed order, through a ``DataLoader``.

:func:`landscape_tools.data.load_data` keeps a data set whose decoded inputs fit in the memory budget
(:func:`memory_budget`: ``--data-memory`` or ``$LT_DATA_MEMORY``, default 2 GiB) on the device, as one
tensor (fastest), and returns a :class:`StreamedDataSet` for anything larger.  Both are built from the
same :class:`PixelSource` (pixels as stored, uint8 for images) and the same :class:`Normaliser` applied on
the device, so a batch is bit for bit the same whichever way it was loaded.

A streamed batch is read when it is asked for: :meth:`StreamedBatches.__getitem__` decodes batch ``i``
(so a process of a torchrun job that computes batches ``r, r + n, ...`` reads those only), and a read-ahead
follows the pattern of the requests (consecutive, or every n-th), decoding the next batches in
``DataLoader`` workers into pinned memory (on CUDA) while the current one is being used.  At most
``workers x 2`` batches wait on the host and one (the last asked for, kept for repeated requests) on the
device.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import ConfigError, DataError

#: the default memory budget of data kept whole on the device: 2 GiB (CIFAR-10's training split
#: is 0.6 GiB in float32; ImageNet's at 224 x 224 is 720 GiB)
DEFAULT_DATA_MEMORY = 2 * 2 ** 30
DATA_MEMORY_ENV = "LT_DATA_MEMORY"
DATA_WORKERS_ENV = "LT_DATA_WORKERS"
#: batches each worker decodes ahead
PREFETCH = 2

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_memory(text: str | int, option: str = "--data-memory") -> int:
    """``"2GiB"`` -> 2147483648 bytes; KB/MB/GB are powers of 1000, KiB/MiB/GiB (and K/M/G) of 1024.

    Raises:
        ConfigError: not a non-negative size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{option} {text} is negative; expected a size such as 2GiB, 500MB or 0")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{option} {text!r} is not a memory size: expected a number with an optional unit, "
                          f"e.g. 2GiB, 500MB, 64KiB or 0 (stream everything)")
    return int(float(m.group(1)) * _UNITS[unit])


def memory_budget(value: str | int | None = None) -> int:
    """Bytes of decoded inputs kept whole on the device: ``value``, else ``$LT_DATA_MEMORY``, else 2 GiB."""
    if value is not None:
        return parse_memory(value)
    env = os.environ.get(DATA_MEMORY_ENV)
    if env not in (None, ""):
        return parse_memory(env, option=f"${DATA_MEMORY_ENV}")
    return DEFAULT_DATA_MEMORY


def default_workers(source: "PixelSource") -> int:
    """``DataLoader`` workers: ``$LT_DATA_WORKERS``, else none for data already in memory (slicing an array
    costs nothing) and up to 8 (one core left free) for sources that decode files."""
    env = os.environ.get(DATA_WORKERS_ENV)
    if env not in (None, ""):
        try:
            n = int(env)
        except ValueError:
            n = -1
        if n < 0:
            raise ConfigError(f"${DATA_WORKERS_ENV}={env!r} is not a number of worker processes (0 or more)")
        return n
    if not source.decodes:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------- sources
class PixelSource:
    """Samples as stored (uint8 pixels for images), read by position.

    Attributes:
        shape: the shape of one sample, e.g. (3, 32, 32).
        dtype: their stored dtype.
        decodes: whether reading decodes files (worth worker processes).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    decodes: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, positions: np.ndarray) -> torch.Tensor:
        """The samples at ``positions`` (in that order), shape ``(len(positions), *shape)``, on the CPU."""
        raise NotImplementedError


class ArraySource(PixelSource):
    """An array already in host memory (CIFAR's uint8 pixels, a tensors file, digits)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(int(s) for s in array.shape[1:])
        try:
            self.dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
        except TypeError:
            raise DataError(f"inputs of dtype {array.dtype} cannot become a torch tensor; store them as "
                            f"float32, float64 or an integer type") from None

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, positions: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(positions, dtype=np.int64)]))


class FolderSource(PixelSource):
    """``torchvision.datasets.ImageFolder`` decoded to uint8 RGB, optionally resized (shorter side to
    ``image_size``, bilinear with antialiasing) and centre-cropped to ``image_size`` x ``image_size``.

    Without ``image_size`` every image must have the first image's size.
    """

    decodes = True

    def __init__(self, folder: Path, image_size: int | None = None):
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        self.folder = folder
        try:
            found = ImageFolder(str(folder), allow_empty=True)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"imagefolder {folder}: {exc}") from None
        self.classes = list(found.classes)
        self.samples = [(str(p), int(c)) for p, c in found.samples]
        self.targets = np.asarray([c for _, c in self.samples], dtype=np.int64)
        self.loader = found.loader
        self.image_size = None if image_size is None else int(image_size)
        self.dtype = torch.uint8
        if self.image_size is not None:
            if self.image_size < 1:
                raise ConfigError(f"--image-size {image_size} must be a positive number of pixels (e.g. 224)")
            self.transform = transforms.Compose([transforms.Resize(self.image_size, antialias=True),
                                                 transforms.CenterCrop(self.image_size)])
            self.shape = (3, self.image_size, self.image_size)
            self.first_size = None
        else:
            self.transform = None
            if self.samples:
                w, h = self._open(self.samples[0][0]).size
                self.first_size = (w, h)
                self.shape = (3, h, w)
            else:
                self.first_size, self.shape = None, (3, 0, 0)

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, path: str):
        try:
            return self.loader(path)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None

    def read(self, positions: np.ndarray) -> torch.Tensor:
        _, h, w = self.shape
        out = torch.empty((len(positions), 3, h, w), dtype=torch.uint8)
        for j, p in enumerate(np.asarray(positions, dtype=np.int64)):
            path = self.samples[int(p)][0]
            img = self._open(path)
            if self.transform is not None:
                img = self.transform(img)
            elif img.size != self.first_size:
                raise DataError(f"image {path} is {img.size[0]}x{img.size[1]} pixels but the first image "
                                f"({self.samples[0][0]}) is {self.first_size[0]}x{self.first_size[1]}: pass "
                                f"--image-size N to resize every image (shorter side to N, centre crop N x N)")
            out[j] = torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())
        return out


@dataclass(frozen=True)
class Normaliser:
    """What turns stored samples into model inputs, on the device: uint8 pixels ``(x / scale - mean) / std``
    per channel in float32 (then cast to the run's dtype); floating samples are only cast; other
    dtypes are kept.  Single-channel images are repeated to ``in_channels``."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 255.0
    in_channels: int | None = None

    def apply(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.mean is not None and not x.is_floating_point():
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
            x = (x.to(torch.float32) / self.scale - mean) / std
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        if self.in_channels is not None and x.dim() == 4 and x.shape[1] == 1 and self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        return x


# ----------------------------------------------------------------------------- streamed data
class _Failed:
    """A reading error carried out of a worker process as a value (a raised one arrives wrapped in a
    traceback the user does not need)."""

    def __init__(self, message: str):
        self.message = message


class _BatchReader(torch.utils.data.Dataset):
    """Batch ``k`` of the data (its samples' stored values), as one tensor; what a worker runs."""

    def __init__(self, source: PixelSource, positions: np.ndarray, batch_size: int):
        self.source, self.positions, self.batch_size = source, positions, int(batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def __getitem__(self, k: int):
        try:
            return self.source.read(self.positions[k * self.batch_size:(k + 1) * self.batch_size])
        except DataError as exc:
            return _Failed(str(exc))


class _Plan(torch.utils.data.Sampler):
    """The batches the next read-ahead decodes, in order (set before each ``iter(loader)``)."""

    def __init__(self):
        self.items: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class StreamedBatches(Sequence):
    """The batches of a :class:`StreamedDataSet` (or a selection of them) in a fixed order, each read when
    asked for, as ``(x, y)`` on the data's device.

    ``batches[i]`` decodes batch ``i`` (the one before is kept, so asking twice reads once), slices and
    :meth:`select` give views without reading anything, :attr:`sizes` gives every batch's size without
    reading anything, and iterating reads ahead in ``DataLoader`` workers.
    """

    def __init__(self, data: "StreamedDataSet", batch_size: int, order: Sequence[int] | None = None):
        self.data = data
        self.batch_size = int(batch_size)
        n = len(data)
        total = math.ceil(n / self.batch_size)
        self.order = list(range(total)) if order is None else [int(k) for k in order]
        self.sizes = [min(self.batch_size, n - k * self.batch_size) for k in self.order]
        self._loader = None
        self._plan = _Plan()
        self._iter = None
        self._expect: list[int] = []
        self._prev: int | None = None
        self._last: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return StreamedBatches(self.data, self.batch_size, self.order[i])
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        return self._fetch(i)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self._fetch(i)

    def close(self) -> None:
        """Stop the read-ahead and its worker processes (a later request starts them again)."""
        self._iter, self._loader, self._expect, self._last = None, None, [], None

    def select(self, indices: Sequence[int]) -> "StreamedBatches":
        """The batches at ``indices`` (positions in this sequence), as a view; nothing is read."""
        return StreamedBatches(self.data, self.batch_size, [self.order[int(i)] for i in indices])

    def _make_loader(self):
        workers = self.data.workers if len(self) > 1 else 0      # one batch: nothing to read ahead
        reader = _BatchReader(self.data.source, self.data.positions, self.batch_size)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs = {"persistent_workers": True, "prefetch_factor": PREFETCH}
        return torch.utils.data.DataLoader(reader, batch_size=None, sampler=self._plan, num_workers=workers,
                                           pin_memory=self.data.device.type == "cuda", **kwargs)

    def _fetch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        if self._iter is not None and self._expect and self._expect[0] == i:
            self._expect.pop(0)
        else:                       # start reading ahead along the requests' stride
            stride = i - self._prev if self._prev is not None and i > self._prev else 1
            ahead = list(range(i, len(self), stride))
            self._expect = ahead[1:]
            self._plan.items = [self.order[p] for p in ahead]
            if self._loader is None:
                self._loader = self._make_loader()
            self._last = None       # the device batch it held is not needed any more
            self._iter = iter(self._loader)
        raw = next(self._iter)
        self._prev = i
        if isinstance(raw, _Failed):
            self._iter, self._expect = None, []
            raise DataError(raw.message)
        k = self.order[i]
        b = self.batch_size
        batch = (self.data.to_inputs(raw), self.data.y[k * b:(k + 1) * b])
        self._last = (i, batch)
        return batch


@dataclass
class StreamedDataSet:
    """A split too large to keep on the device: its labels there, its inputs read batch by batch.

    The attributes are those of :class:`landscape_tools.data.DataSet` except ``x`` (there is no tensor of
    every input; asking for it raises :class:`DataError`).  ``batches()`` returns a
    :class:`StreamedBatches`, the same object for the same batch size.
    """

    source: PixelSource
    positions: np.ndarray
    y: torch.Tensor
    spec: str
    split: str
    num_classes: int
    batch_size: int
    indices: np.ndarray | None
    normalisation: dict
    sample_seed: int | None
    normaliser: Normaliser
    device: torch.device
    dtype: torch.dtype
    decoded_bytes: int
    budget: int
    workers: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    streamed = True

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def x(self) -> torch.Tensor:
        raise DataError(f"data {self.spec!r} ({self.split}) is streamed from disk, not held on the device: its "
                        f"{len(self)} decoded inputs take {_size(self.decoded_bytes)}, more than the memory budget "
                        f"of {_size(self.budget)}; raise --data-memory (or ${DATA_MEMORY_ENV}) above "
                        f"{_size(self.decoded_bytes)} to load it whole")

    @property
    def input_shape(self) -> tuple[int, ...]:
        shape = tuple(self.source.shape)
        if self.normaliser.in_channels is not None and len(shape) == 3 and shape[0] == 1:
            shape = (self.normaliser.in_channels,) + shape[1:]
        return shape

    def to_inputs(self, raw: torch.Tensor) -> torch.Tensor:
        """Stored samples (on the CPU) -> model inputs on the device."""
        return self.normaliser.apply(raw.to(self.device, non_blocking=raw.is_pinned()), self.dtype)

    def sample_input(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` inputs, on the device."""
        return self.to_inputs(self.source.read(self.positions[:n]))

    def batches(self, batch_size: int | None = None) -> StreamedBatches:
        b = int(batch_size or self.batch_size)
        if b not in self._cache:
            self._cache[b] = StreamedBatches(self, b)
        return self._cache[b]

    def batch_sizes(self, batch_size: int | None = None) -> list[int]:
        return list(self.batches(batch_size).sizes)

    def close(self) -> None:
        """Stop the worker processes of :meth:`batches` (they also stop when the data set is collected)."""
        for batches in self._cache.values():
            batches.close()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "StreamedDataSet":
        return StreamedDataSet(self.source, self.positions, self.y.to(device), self.spec, self.split,
                               self.num_classes, self.batch_size, self.indices, dict(self.normalisation),
                               self.sample_seed, self.normaliser, torch.device(device), dtype or self.dtype,
                               self.decoded_bytes, self.budget, self.workers)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "split": self.split, "num_samples": len(self), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "batch_size": self.batch_size,
                "sample_seed": self.sample_seed,
                "indices": None if self.indices is None else [int(i) for i in self.indices],
                "normalisation": self.normalisation}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


# ----------------------------------------------------------------------------- helpers for analyses
def batch_sizes(batches) -> list[int]:
    """Samples per batch of a batch list or :class:`StreamedBatches` (read without decoding anything)."""
    if isinstance(batches, StreamedBatches):
        return list(batches.sizes)
    if isinstance(batches, Inputs):
        return list(batches.batches.sizes)
    return [int(b[0].shape[0]) if isinstance(b, (tuple, list)) else int(b.shape[0]) for b in batches]


def as_sequence(batches) -> Sequence:
    """``batches`` as an indexable sequence: a :class:`StreamedBatches` as it is (so nothing is read
    now), anything else as a list."""
    return batches if isinstance(batches, StreamedBatches) else list(batches)


def select(batches, indices: Sequence[int]):
    """``[batches[i] for i in indices]``, as a view (nothing read) for :class:`StreamedBatches`."""
    if isinstance(batches, StreamedBatches):
        return batches.select(indices)
    return [batches[int(i)] for i in indices]


class Inputs(Sequence):
    """The inputs ``x`` of every ``(x, y)`` batch of a :class:`StreamedBatches`, read when asked for."""

    def __init__(self, batches: StreamedBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Inputs(self.batches[i])
        return self.batches[i][0]


def inputs_of(batches) -> Sequence:
    """The inputs of ``[(x, y), ...]`` or ``[x, ...]`` batches; a lazy view for :class:`StreamedBatches`."""
    if isinstance(batches, StreamedBatches):
        return Inputs(batches)
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
