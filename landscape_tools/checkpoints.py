"""Load any supported checkpoint -> ``(nn.Module, ModelInfo)``, and write the native format.

Supported (see ``ARCHITECTURE.md``):
  * native files written by ``lt train`` / :func:`save_checkpoint`;
  * the reference code's ``{"name": ..., "state_dict": ...}``;
  * a bare state_dict with ``arch=`` (a zoo name) or ``model=`` (``pkg.module:factory`` or
    ``torchvision:NAME``);
  * TorchScript archives.
A whole pickled module can run arbitrary code when unpickled, so it is refused -- before anything is
unpickled -- unless ``trust_pickle=True``.  Every load is strict: missing, unexpected or mismatched
keys are an error that lists them; nothing is ever partially loaded.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError
from .models import UnknownArchitecture, build_model, parse_name

NATIVE_FORMAT = "landscape-tools-checkpoint"
NATIVE_VERSION = 1


@dataclass
class ModelInfo:
    """Where a model came from and what it is."""

    path: str
    label: str
    sha256: str
    kind: str                      # native | reference | state_dict | torchscript | pickle
    arch: str                      # zoo name, "torchvision:NAME", "pkg.mod:factory", "torchscript" or class name
    arch_kwargs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    num_params: int = 0

    @property
    def dataset(self) -> str | None:
        """The data spec the model was trained on, when the checkpoint records it."""
        return self.meta.get("dataset")

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.path, "checkpoint_sha256": self.sha256, "arch": self.arch,
                "num_params": self.num_params, "checkpoint_kind": self.kind, "arch_kwargs": self.arch_kwargs}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in names)


def _strict_load(model: nn.Module, state_dict: dict, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})"
                  for k in own if k in state_dict and hasattr(state_dict[k], "shape")
                  and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mismatched shapes", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"the state_dict does not fit {source}: " + "; ".join(parts)
                              + ". Check --arch / --model and its options (num_classes, width, in_channels)")
    model.load_state_dict(state_dict, strict=True)


def infer_zoo_kwargs(state_dict: dict) -> dict:
    """num_classes / in_channels / width of a zoo model from its weights."""
    kwargs = {}
    stem = state_dict.get("layer0.0.weight", state_dict.get("layer0.0.conv.weight"))
    if isinstance(stem, torch.Tensor) and stem.dim() == 4:
        kwargs["in_channels"] = int(stem.shape[1])
        kwargs["width"] = int(stem.shape[0])
        if stem.shape[-1] == 7:
            kwargs["stem"] = "imagenet"
    for key in ("classifier.0.dense.weight", "classifier.2.dense3.weight"):
        if key in state_dict:
            kwargs["num_classes"] = int(state_dict[key].shape[0])
    return kwargs


def _build_zoo(arch: str, state_dict: dict, arch_kwargs: dict | None) -> tuple[nn.Module, dict]:
    kwargs = infer_zoo_kwargs(state_dict)
    kwargs.update(arch_kwargs or {})
    try:
        model = build_model(arch, **kwargs)
    except UnknownArchitecture as exc:
        raise CheckpointError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build {arch!r} with {kwargs}: {exc}") from None
    return model, model.arch_kwargs


def _build_user_model(spec: str, state_dict: dict | None, arch_kwargs: dict | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise CheckpointError(f"--model {spec!r}: expected pkg.module:factory or torchvision:NAME")
    kwargs = dict(arch_kwargs or {})
    if module_name == "torchvision":
        import torchvision
        if "num_classes" not in kwargs and state_dict:
            last = [v for v in state_dict.values() if isinstance(v, torch.Tensor) and v.dim() == 2]
            if last:
                kwargs["num_classes"] = int(last[-1].shape[0])
        try:
            return torchvision.models.get_model(attr, weights=None, **kwargs)
        except ValueError as exc:
            raise CheckpointError(f"--model {spec!r}: {exc}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(f"--model {spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise CheckpointError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torch_load(path: Path, trust_pickle: bool, map_location: Any) -> Any:
    # torch.save writes a zip archive (or, legacy format, a pickle: protocol byte 0x80); anything else
    # (a text file...) would otherwise be misreported as "pickled Python objects" by the weights-only loader
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: neither a torch.save zip archive nor a pickle "
                              f"(a text file, or another kind of file?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "weights_only" in str(exc):
            if not trust_pickle:
                raise CheckpointError(
                    f"{path} contains pickled Python objects (a whole model?), and unpickling can run arbitrary "
                    f"code, so it was not loaded. If you trust the file, pass --trust-pickle "
                    f"(library: trust_pickle=True); better, convert it once to a state_dict: "
                    f"torch.save({{'name': ARCH, 'state_dict': model.state_dict()}}, 'model.pt')") from None
        else:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({exc})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file?): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be unpickled: {exc}") from None


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, model: str | None = None,
                    arch_kwargs: dict | None = None, trust_pickle: bool = False,
                    map_location: Any = "cpu", check_finite: bool = True, label: str | None = None,
                    ) -> tuple[nn.Module, ModelInfo]:
    """Load a checkpoint of any supported kind.

    Args:
        path: the checkpoint file.
        arch: zoo name for a bare state_dict (or to override a reference file's name).
        model: ``pkg.module:factory`` or ``torchvision:NAME`` for a bare state_dict of a user model.
        arch_kwargs: extra build arguments (num_classes, width, ...); inferred from the weights
            when omitted.
        trust_pickle: allow whole pickled modules (runs code from the file!).
        map_location: passed to ``torch.load``.
        check_finite: refuse weights containing NaN or inf.
        label: the model's label in results (default: the file stem).

    Returns:
        ``(model, info)``; the model is in eval mode.

    Raises:
        CheckpointError: with a message naming the problem and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty")
    sha = file_sha256(p)
    label = label or p.stem
    meta: dict = {}
    kwargs_used: dict = {}
    if _is_torchscript(p):
        try:
            net = torch.jit.load(str(p), map_location=map_location)
        except Exception as exc:
            raise CheckpointError(f"{p} looks like a TorchScript archive but cannot be loaded: {exc}") from None
        kind, arch_name = "torchscript", "torchscript"
    else:
        obj = _torch_load(p, trust_pickle, map_location)
        if isinstance(obj, nn.Module):
            net, kind, arch_name = obj, "pickle", type(obj).__name__
        elif isinstance(obj, dict):
            net, kind, arch_name, kwargs_used, meta = _from_dict(p, obj, arch, model, arch_kwargs)
        else:
            raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a checkpoint: expected a state_dict, "
                                  f"a {{'name', 'state_dict'}} dict, a native lt checkpoint or TorchScript")
    if check_finite:
        bad = [name for name, t in net.state_dict().items()
               if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CheckpointError(f"{p} has NaN or inf weights in {', '.join(bad[:5])}"
                                  f"{'...' if len(bad) > 5 else ''}: the model is broken (diverged training?)")
    net.eval()
    n = sum(t.numel() for t in net.parameters() if t.requires_grad)
    info = ModelInfo(str(p), label, sha, kind, arch_name, kwargs_used, meta, n)
    return net, info


def _from_dict(p: Path, obj: dict, arch: str | None, model: str | None, arch_kwargs: dict | None):
    if obj.get("format") == NATIVE_FORMAT:
        version = int(obj.get("version", 0))
        if version > NATIVE_VERSION:
            raise CheckpointError(f"{p} is a version {version} landscape-tools checkpoint; this version reads "
                                  f"{NATIVE_VERSION}: upgrade landscape-tools")
        name = arch or obj["arch"]
        kwargs = dict(obj.get("arch_kwargs") or {})
        kwargs.update(arch_kwargs or {})
        state = obj["state_dict"]
        if model:
            net = _build_user_model(model, state, kwargs)
            _strict_load(net, state, model)
            return net, "native", model, kwargs, dict(obj.get("meta") or {})
        net, used = _build_zoo(name, state, kwargs)
        _strict_load(net, state, name)
        return net, "native", name, used, dict(obj.get("meta") or {})
    if "state_dict" in obj and isinstance(obj["state_dict"], dict) and ("name" in obj or arch or model):
        state = obj["state_dict"]
        if model:
            net = _build_user_model(model, state, arch_kwargs)
            _strict_load(net, state, model)
            return net, "reference", model, dict(arch_kwargs or {}), {}
        name = arch or obj["name"]
        net, used = _build_zoo(name, state, arch_kwargs)
        _strict_load(net, state, name)
        return net, "reference", name, used, {}
    state = obj
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} is a dict with keys {', '.join(map(str, list(obj)[:6]))}, not a state_dict "
                              f"or a supported checkpoint")
    if model:
        net = _build_user_model(model, state, arch_kwargs)
        _strict_load(net, state, model)
        return net, "state_dict", model, dict(arch_kwargs or {}), {}
    if arch:
        net, used = _build_zoo(arch, state, arch_kwargs)
        _strict_load(net, state, arch)
        return net, "state_dict", arch, used, {}
    raise CheckpointError(f"{p} is a bare state_dict ({len(state)} tensors) that does not say which architecture "
                          f"it belongs to: pass --arch NAME (a zoo name, see `lt info --zoo`) or "
                          f"--model pkg.module:factory / --model torchvision:NAME")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str, arch_kwargs: dict, meta: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write the native format atomically (temporary file + rename); refuses to overwrite unless asked."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise CheckpointError(f"{p} already exists; pass --overwrite to replace it or choose another -o")
    try:
        parse_name(arch)
    except UnknownArchitecture as exc:
        raise CheckpointError(str(exc)) from None
    payload = {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "arch": arch, "arch_kwargs": dict(arch_kwargs),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": dict(meta or {})}
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p
