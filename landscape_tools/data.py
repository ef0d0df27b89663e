"""Data sources -> a fixed, ordered set of ``(x, y)`` batches, on a device.

Data whose decoded inputs fit in the memory budget (``--data-memory``, ``$LT_DATA_MEMORY``, default
2 GiB) is materialised once on the device (a :class:`DataSet`); larger data is streamed batch by batch
(a :class:`landscape_tools.streaming.StreamedDataSet`).  Images are stored as uint8 and normalised on
the device in both cases, so the batches hold the same numbers either way.

Specs:
  ``digits``          scikit-learn's bundled 8x8 digits (no download), a fixed stratified 75/25
                      train/test split, upsampled to 32x32 and normalised; 1 or 3 channels.
  ``cifar10:DIR``     the python batch files of CIFAR-10 (``cifar-10-batches-py``), read with an
  ``cifar100:DIR``    unpickler that only admits numpy arrays, never downloaded.
  ``imagefolder:DIR`` ``DIR/<split>/<class>/*.png`` (the test split: ``DIR/test``, else ``DIR/val`` as in
                      ImageNet's layout; or ``DIR/<class>/...`` for both splits), read with torchvision's
                      ``ImageFolder``; ``image_size`` resizes and centre-crops every image.
  ``tensors:FILE``    ``.npz``, ``.pt`` or ``.h5`` holding ``x``, ``y`` (and optionally ``x_test``,
                      ``y_test``), used exactly as stored: no normalisation, no reordering.
  ``cifar10c:DIR``    the published corrupted test sets (CIFAR-10-C / CIFAR-100-C): ``DIR/<corruption>.npy``
  ``cifar100c:DIR``   (uint8, 5 x 10000 images stacked by severity 1..5) and ``DIR/labels.npy``; read by
                      ``lt evaluate`` one corruption and severity at a time (:func:`read_cifar_c`),
                      normalised with the clean data set's statistics.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

SPLITS = ("train", "test")
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@dataclass
class DataSet:
    """Inputs and labels of one split, in a fixed order, on one device.

    Attributes:
        x: inputs, shape (N, C, H, W) for images (any shape for ``tensors:``).
        y: int64 labels, shape (N,).
        spec, split: where they came from.
        num_classes: number of classes (max label + 1 when the source does not say).
        indices: positions in the full split when ``samples`` picked a subset, else None.
        normalisation: what was done to the raw values (recorded in results).
        batch_size: size of the batches :meth:`batches` yields (the last may be smaller).
    """

    x: torch.Tensor
    y: torch.Tensor
    spec: str
    split: str
    num_classes: int
    batch_size: int = 128
    indices: np.ndarray | None = None
    normalisation: dict = field(default_factory=dict)
    sample_seed: int | None = None

    streamed = False

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    def sample_input(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` inputs."""
        return self.x[:n]

    def close(self) -> None:
        """Nothing to release (a :class:`~landscape_tools.streaming.StreamedDataSet` stops its workers)."""

    def batches(self, batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches in fixed order (views of :attr:`x` and :attr:`y`, no copies)."""
        b = int(batch_size or self.batch_size)
        return [(self.x[i:i + b], self.y[i:i + b]) for i in range(0, len(self), b)]

    def batch_sizes(self, batch_size: int | None = None) -> list[int]:
        return [int(bx.shape[0]) for bx, _ in self.batches(batch_size)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "DataSet":
        """Move (and for floating inputs optionally cast) the data; returns a new DataSet."""
        x = self.x.to(device)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        return DataSet(x, self.y.to(device), self.spec, self.split, self.num_classes, self.batch_size,
                       self.indices, dict(self.normalisation), self.sample_seed)

    def describe(self) -> dict[str, Any]:
        """Provenance: spec, split, size, subset seed and indices, normalisation."""
        return {"spec": self.spec, "split": self.split, "num_samples": len(self), "num_classes": self.num_classes,
                "input_shape": list(self.x.shape[1:]), "batch_size": self.batch_size,
                "sample_seed": self.sample_seed,
                "indices": None if self.indices is None else [int(i) for i in self.indices],
                "normalisation": self.normalisation}


# ----------------------------------------------------------------------------- readers
def _digits(split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST_FRACTION, stratify=y,
                                              random_state=DIGITS_SPLIT_SEED)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    xs, ys = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    t = torch.from_numpy(np.ascontiguousarray(xs))[:, None]
    t = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
    t = (t - mean) / std
    norm = {"scale": "1/16", "resize": "bilinear 8x8->32x32", "mean": [mean], "std": [std],
            "split": f"stratified {1 - DIGITS_TEST_FRACTION:.0%}/{DIGITS_TEST_FRACTION:.0%}, seed {DIGITS_SPLIT_SEED}"}
    return t.numpy(), ys, norm


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python batches need; anything else is refused before it runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch file")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a readable CIFAR python batch file ({exc}); re-extract the archive") from None


def _cifar(kind: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict, int]:
    """uint8 pixels (N, 3, 32, 32), labels, the normalisation to apply, number of classes."""
    if kind == "cifar10":
        sub, files = "cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])
        label_key, n_classes = b"labels", 10
    else:
        sub, files = "cifar-100-python", (["train"] if split == "train" else ["test"])
        label_key, n_classes = b"fine_labels", 100
    folder = root / sub if (root / sub).is_dir() else root
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{kind} folder {root} lacks {', '.join(missing)}: expected the python version of "
                        f"the data set, {sub}/{files[0]}... (extract {sub.replace('-python', '').replace('-batches-py', '')}"
                        f"-python.tar.gz there); nothing is downloaded")
    xs, ys = [], []
    for f in files:
        d = _read_cifar_batch(folder / f)
        if b"data" not in d or label_key not in d:
            raise DataError(f"{folder / f} has no {label_key.decode()!r}/'data' entries: not a {kind} batch file")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    mean, std = CIFAR_STATS[kind]
    return np.concatenate(xs), np.concatenate(ys), {"scale": "1/255", "mean": list(mean), "std": list(std)}, n_classes


def _tensors(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    if not path.is_file():
        raise DataError(f"tensors file {path} does not exist")
    xk, yk = ("x", "y") if split == "train" else ("x_test", "y_test")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise DataError(f"{path} holds a {type(obj).__name__}; expected a dict with 'x' and 'y' tensors")
            arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in obj.items()}
        elif suffix in (".h5", ".hdf5"):
            from . import store
            arrays = store.read_plain_arrays(path)
        else:
            raise DataError(f"tensors file {path}: unknown extension {suffix!r}; expected .npz, .pt or .h5")
    except DataError:
        raise
    except Exception as exc:  # corrupt archives raise many different types
        raise DataError(f"cannot read tensors file {path}: {exc}") from None
    if xk not in arrays or yk not in arrays:
        have = ", ".join(sorted(arrays)) or "nothing"
        extra = " (use --split train, or add x_test and y_test)" if split == "test" else ""
        raise DataError(f"tensors file {path} has no {xk!r} and {yk!r} for the {split} split; it holds {have}{extra}")
    x, y = np.asarray(arrays[xk]), np.asarray(arrays[yk])
    if x.shape[0] != y.shape[0]:
        raise DataError(f"tensors file {path}: {xk} has {x.shape[0]} rows but {yk} has {y.shape[0]}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"tensors file {path}: {yk} must be a 1-D integer class vector, got {y.dtype} {y.shape}")
    n_classes = arrays.get("num_classes")
    return x, y.astype(np.int64), (int(n_classes) if n_classes is not None else None)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:/data" -> ("cifar10", "/data")``; validates the kind."""
    kind, _, arg = spec.partition(":")
    kinds = ("digits", "cifar10", "cifar100", "imagefolder", "tensors") + CIFAR_C_KINDS
    if kind not in kinds:
        raise DataError(f"unknown data spec {spec!r}: expected digits, cifar10:DIR, cifar100:DIR, "
                        f"imagefolder:DIR or tensors:FILE")
    if kind == "digits":
        if arg:
            raise DataError(f"data spec {spec!r}: 'digits' takes no argument")
        return kind, None
    if not arg:
        raise DataError(f"data spec {spec!r} needs a path: {kind}:{'FILE' if kind == 'tensors' else 'DIR'}")
    return kind, os.path.expanduser(arg)


def absolute_spec(spec: str) -> str:
    """The spec with its path made absolute, so a checkpoint that records it works from any folder."""
    kind, arg = parse_spec(spec)
    return kind if arg is None else f"{kind}:{os.path.abspath(arg)}"


def _image_folder(root: Path, split: str) -> Path:
    """The folder of a split: ``DIR/train``; ``DIR/test`` or else ``DIR/val`` (ImageNet's layout); or ``DIR``
    itself (its class folders serve both splits) when it has no split folders."""
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (root / name).is_dir():
            return root / name
    present = [n for n in ("train", "test", "val") if (root / n).is_dir()]
    if present:
        raise DataError(f"imagefolder {root} has {', '.join(f'{n}/' for n in present)} but no "
                        f"{' or '.join(f'{n}/' for n in names)} folder for the {split} split: use --split "
                        f"{'test' if split == 'train' else 'train'}, or add {root}/{names[-1]}/<class>/*.png")
    return root


def _folder_source(root: Path, split: str, image_size: int | None):
    from .streaming import FolderSource

    folder = _image_folder(root, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DataError(f"imagefolder {root}: expected class sub-folders ({root}/<class>/*.png or "
                        f"{root}/{split}/<class>/*.png), found none")
    source = FolderSource(folder, image_size)
    if len(source) == 0:
        raise DataError(f"imagefolder {folder}: the class folders hold no images (.bmp, .jpeg, .jpg, .pgm, .png, "
                        f".ppm, .tif, .tiff, .webp)")
    _, h, w = source.shape
    norm = {"scale": "1/255", "mean": [0.5] * 3, "std": [0.5] * 3, "classes": source.classes,
            "size": source.image_size if source.image_size is not None else w,
            "resize": (f"shorter side to {source.image_size} (bilinear, antialiased), centre crop "
                       f"{source.image_size}x{source.image_size}") if source.image_size is not None
            else f"none (every image {w}x{h})"}
    return source, source.targets, norm, len(source.classes)


def load_data(spec: str, split: str = "train", samples: int | None = None, seed: int = 0, batch_size: int = 128,
              in_channels: int | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, image_size: int | None = None,
              memory: str | int | None = None):
    """Resolve a data spec to a :class:`DataSet` on ``device``, or a
    :class:`landscape_tools.streaming.StreamedDataSet` when its decoded inputs exceed the memory budget.

    Args:
        spec: see the module docstring.
        split: ``train`` or ``test`` (``imagefolder``: ``DIR/test``, else ``DIR/val``).
        samples: keep a seeded random subset of this many samples (in their original order;
            indices recorded); None (or exactly the split's size) keeps all; more is an error.
        seed: seed of that subset.
        batch_size: the batch size of :meth:`DataSet.batches`.
        in_channels: the channels the model expects; grey images are repeated to 3 channels.
        device, dtype: where and in which floating type the inputs live.
        image_size: for ``imagefolder``: resize every image's shorter side to this and centre-crop a
            square of this size (None: images are used at their size, which must be the same for all).
        memory: the memory budget (bytes, or a size such as ``"2GiB"``; ``0`` streams everything)
            for the decoded inputs kept whole on the device; None: ``$LT_DATA_MEMORY``, else 2 GiB.
            Either way the batches hold the same numbers.

    Raises:
        DataError: unknown spec, missing folder or file, empty data, bad shapes, ``samples`` larger
            than the split, images of different sizes without ``image_size``.
        ConfigError: a bad ``memory`` or ``image_size``.
    """
    from .streaming import ArraySource, Normaliser, StreamedDataSet, default_workers, memory_budget

    if split not in SPLITS:
        raise DataError(f"split {split!r} is not 'train' or 'test'")
    if int(batch_size) < 1:
        raise DataError(f"batch size {batch_size} must be at least 1")
    budget = memory_budget(memory)
    kind, arg = parse_spec(spec)
    if kind in CIFAR_C_KINDS:
        raise DataError(f"data {spec!r}: the published corrupted test sets are scored by lt evaluate (every "
                        f"<corruption>.npy at every severity, or those of --corrupt NAME[:SEVERITY]); other "
                        f"analyses take the clean data, e.g. {kind[:-1]}:DIR")
    if image_size is not None and kind != "imagefolder":
        raise DataError(f"--image-size applies to imagefolder: data only, not {spec!r} (its samples are used at "
                        f"their stored size)")
    normalisation: dict = {}
    n_classes: int | None = None
    stats = None                               # (mean, std) of uint8 pixels, applied on the device
    if kind == "digits":
        x, y, normalisation = _digits(split)
        n_classes = 10
        source = ArraySource(x)
    elif kind in ("cifar10", "cifar100"):
        root = Path(arg)
        if not root.is_dir():
            raise DataError(f"{kind} folder {root} does not exist: expected a folder holding "
                            f"{'cifar-10-batches-py' if kind == 'cifar10' else 'cifar-100-python'}/ (nothing is downloaded)")
        x, y, normalisation, n_classes = _cifar(kind, root, split)
        source, stats = ArraySource(x), (normalisation["mean"], normalisation["std"])
    elif kind == "imagefolder":
        root = Path(arg)
        if not root.is_dir():
            raise DataError(f"imagefolder {root} does not exist")
        source, y, normalisation, n_classes = _folder_source(root, split, image_size)
        stats = (normalisation["mean"], normalisation["std"])
    else:
        x, y, n_classes = _tensors(Path(arg), split)
        normalisation = {"none": "used exactly as stored"}
        source = ArraySource(x)
    if len(y) == 0:
        raise DataError(f"data {spec!r} ({split}) is empty: nothing to analyse")
    if y.min() < 0:
        raise DataError(f"data {spec!r} has negative labels (min {int(y.min())}); labels must be 0..C-1")
    if n_classes is None:
        n_classes = int(y.max()) + 1
    indices = None
    positions = np.arange(len(y))
    if samples is not None:
        samples = int(samples)
        if samples < 1:
            raise DataError(f"--samples {samples} must be at least 1")
        if samples > len(y):
            raise DataError(f"--samples {samples} asks for more samples than the {split} split of {spec} has "
                            f"({len(y)}); use --samples {len(y)} or --samples all")
        if samples < len(y):
            rng = np.random.default_rng(seed)
            indices = np.sort(rng.choice(len(y), size=samples, replace=False))
            positions, y = indices, y[indices]
    shape = tuple(source.shape)
    if in_channels is not None and len(shape) == 3 and shape[0] != in_channels:
        if shape[0] == 1:
            normalisation = dict(normalisation, channels=f"grey repeated to {in_channels}")
        else:
            raise DataError(f"data {spec!r} has {shape[0]} channels but the model expects {in_channels}")
    device = torch.device(device)
    normaliser = Normaliser(mean=None if stats is None else tuple(stats[0]),
                            std=None if stats is None else tuple(stats[1]), in_channels=in_channels)
    floating = stats is not None or source.dtype.is_floating_point
    itemsize = (torch.empty((), dtype=dtype) if floating else torch.empty((), dtype=source.dtype)).element_size()
    per_sample = int(np.prod(shape, dtype=np.int64)) * itemsize
    if normalisation.get("channels"):
        per_sample *= int(in_channels)
    decoded = per_sample * len(positions)
    labels = torch.as_tensor(y, dtype=torch.int64).to(device)
    streamed = StreamedDataSet(source, np.asarray(positions, dtype=np.int64), labels, spec, split, n_classes,
                               int(batch_size), indices, normalisation, seed if indices is not None else None,
                               normaliser, device, dtype, decoded, budget, default_workers(source))
    if decoded > budget:
        return streamed
    # in memory: the streamed batches (same decoding, same normalisation on the device), put together
    xt = None
    for b, (bx, _) in enumerate(streamed.batches(_LOAD_CHUNK)):
        if xt is None:
            xt = torch.empty((len(positions),) + tuple(bx.shape[1:]), dtype=bx.dtype, device=device)
        xt[b * _LOAD_CHUNK:b * _LOAD_CHUNK + bx.shape[0]] = bx
    streamed.close()
    return DataSet(xt, labels, spec, split, n_classes, int(batch_size), indices, normalisation,
                   seed if indices is not None else None)


#: samples decoded per step when data is loaded whole
_LOAD_CHUNK = 1024


CIFAR_C_KINDS = ("cifar10c", "cifar100c")


def _cifar_c_root(spec: str) -> tuple[str, Path]:
    kind, arg = parse_spec(spec)
    if kind not in CIFAR_C_KINDS:
        raise DataError(f"data {spec!r} is not a cifar10c:DIR / cifar100c:DIR spec")
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"{kind} folder {root} does not exist: expected the extracted "
                        f"{'CIFAR-10-C' if kind == 'cifar10c' else 'CIFAR-100-C'} folder holding <corruption>.npy "
                        f"and labels.npy (nothing is downloaded)")
    return kind, root


def cifar_c_names(spec: str) -> list[str]:
    """The corruptions of a ``cifar10c:DIR`` / ``cifar100c:DIR`` folder: its ``*.npy`` files but ``labels.npy``, sorted.

    Raises:
        DataError: missing folder, no ``labels.npy``, no corruption files.
    """
    kind, root = _cifar_c_root(spec)
    if not (root / "labels.npy").is_file():
        raise DataError(f"{kind} folder {root} has no labels.npy: expected <corruption>.npy files and labels.npy "
                        f"as published")
    names = sorted(p.stem for p in root.glob("*.npy") if p.name != "labels.npy")
    if not names:
        raise DataError(f"{kind} folder {root} holds no <corruption>.npy files besides labels.npy")
    return names


def read_cifar_c(spec: str, name: str, severity: int, samples: int | None = None, seed: int = 0,
                 batch_size: int = 128, in_channels: int | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> DataSet:
    """One corruption at one severity of a ``cifar10c:DIR`` / ``cifar100c:DIR`` folder, as a DataSet.

    ``DIR/<name>.npy`` holds uint8 images (5 N, 32, 32, 3) (or (5 N, 3, 32, 32)), severity ``s`` in rows
    ``(s - 1) N .. s N - 1``; ``DIR/labels.npy`` holds 5 N labels (or N).  Images are scaled by 1/255 and
    normalised with the clean CIFAR-10 / CIFAR-100 statistics (as ``cifar10:`` / ``cifar100:``);
    ``samples`` picks the same seeded subset as :func:`load_data` does on the clean split.

    Raises:
        DataError: missing files, shapes that do not fit, ``samples`` larger than N.
    """
    kind, root = _cifar_c_root(spec)
    path = root / f"{name}.npy"
    if not path.is_file():
        raise DataError(f"{kind} folder {root} has no {name}.npy")
    if severity not in (1, 2, 3, 4, 5):
        raise DataError(f"severity {severity!r} of {path}: expected 1..5")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        labels = np.load(root / "labels.npy", mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path} / labels.npy as numpy arrays: {exc}") from None
    if images.ndim != 4 or images.shape[0] % 5 or 3 not in (images.shape[1], images.shape[3]):
        raise DataError(f"{path} has shape {images.shape}; expected (5 x N, 32, 32, 3) uint8 images stacked by "
                        f"severity 1..5")
    n = images.shape[0] // 5
    if labels.ndim != 1 or labels.shape[0] not in (n, 5 * n) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{root / 'labels.npy'} has {labels.dtype} {labels.shape}; expected {5 * n} (or {n}) integer "
                        f"labels for the {5 * n} images of {path.name}")
    block = images[(severity - 1) * n:severity * n]
    y = np.array(labels[(severity - 1) * n:severity * n] if labels.shape[0] == 5 * n else labels, dtype=np.int64)
    indices = None
    if samples is not None:
        samples = int(samples)
        if not 1 <= samples <= n:
            raise DataError(f"--samples {samples}: the {kind} sets hold {n} images each; use 1..{n} or all")
        if samples < n:
            indices = np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))
            block, y = block[indices], y[indices]
    x = np.asarray(block, dtype=np.float32) / 255.0
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.transpose(0, 3, 1, 2)
    mean, std = CIFAR_STATS[kind[:-1]]
    x = (x - np.array(mean, np.float32)[None, :, None, None]) / np.array(std, np.float32)[None, :, None, None]
    xt = torch.as_tensor(np.ascontiguousarray(x)).to(dtype)
    if in_channels is not None and in_channels != 3:
        raise DataError(f"data {spec!r} has 3 channels but the model expects {in_channels}")
    norm = {"scale": "1/255", "mean": list(mean), "std": list(std),
            "corruption": f"{name}.npy severity {severity} (published file)"}
    return DataSet(xt.to(device), torch.as_tensor(y).to(device), spec, "test", 10 if kind == "cifar10c" else 100,
                   int(batch_size), indices, norm, seed if indices is not None else None)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Plain fixed-order slicing, for code holding raw tensors."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def save_tensors(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write a ``.npz`` a ``tensors:`` spec can read (for tests and examples)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    Path(path).write_bytes(buf.getvalue())
