"""Precision of the forward passes (and Hessian products), and ``torch.compile``.

``--precision`` picks how float32 arithmetic runs:

* ``fp32`` (default): no autocast, the model runs in its own dtype (float32 or float64), and on CUDA
  with TF32 off: float32 matrix products (cuBLAS) and cuDNN convolutions round like float32, not to
  TF32's 10-bit significand (PyTorch's own default lets cuDNN convolutions use TF32 on Ampere and
  later GPUs, which puts ~1e-4..1e-3 relative error into every product).
* ``tf32``: float32 everywhere, with TF32 on for matrix products and cuDNN convolutions (faster on
  Ampere and later GPUs; rounding ~1e-3 relative; no effect on a CPU or older GPUs).
* ``bf16`` / ``fp16``: matrix products and convolutions run in bfloat16 / float16 on CUDA (and on
  CPU, where PyTorch's CPU autocast supports them; useful for testing, rarely faster).  Whatever
  autocast leaves in float32 runs with TF32 off.  ``lt hessian`` refuses ``fp16``
  (:func:`parse_hessian_precision`): second derivatives underflow in float16 without loss scaling.

Every setting is entered by :func:`autocast` (the block every analysis runs its forward passes in)
and restored on leaving it; :func:`fp32_math` is the TF32 part alone.  :func:`precision_attrs` is
what a result file records.

Only the forward pass is affected: the logits are cast back to float32 (float64 when the model is
float64) before any loss, probability or statistic is computed, so accumulations never happen in 16
bits.

``--compile`` wraps the model in :func:`torch.compile`.  The first forward pass of each input shape
pays the compilation (seconds to minutes); afterwards the compiled graph is reused.  It helps when
the same shapes are evaluated many times (surface grids, MC samples) and is off by default
(``lt surface`` defaults to ``--compile auto``: see :class:`landscape_tools.surface.SurfaceEvaluator`).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["PRECISIONS", "HESSIAN_PRECISIONS", "parse_precision", "parse_hessian_precision", "autocast_dtype",
           "autocast", "fp32_math", "tf32_state", "precision_attrs", "rounding", "watch_precisions",
           "full_precision", "compile_model", "model_dtype"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
#: what ``lt hessian`` accepts: fp16 second derivatives underflow without loss scaling
HESSIAN_PRECISIONS = ("fp32", "tf32", "bf16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: machine epsilon of a float32 product at each precision (TF32 and fp16 keep 10 significand bits,
#: bf16 7, float32 23)
_EPS = {"fp32": 2.0 ** -23, "tf32": 2.0 ** -10, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
#: compute capability from which CUDA GPUs have bfloat16 arithmetic (Ampere)
BF16_CAPABILITY = (8, 0)


def parse_precision(text: str | None) -> str:
    """Validate a ``--precision`` value (``None`` means ``fp32``).

    Raises:
        ConfigError: a value other than fp32, tf32, bf16 or fp16.
    """
    if text is None:
        return "fp32"
    value = str(text).strip().lower()
    aliases = {"float32": "fp32", "32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "16": "fp16",
               "tensorfloat32": "tf32"}
    value = aliases.get(value, value)
    if value not in PRECISIONS:
        raise ConfigError(f"--precision {text!r} is not one of {', '.join(PRECISIONS)}; "
                          f"use fp32 (exact), tf32 (TF32 matrix products on GPUs), bf16 or fp16 "
                          f"(faster forward passes on a GPU)")
    return value


def parse_hessian_precision(text: str | None) -> str:
    """:func:`parse_precision` for Hessians, which refuses ``fp16``.

    Raises:
        ConfigError: an unknown value, or fp16.
    """
    value = parse_precision(text)
    if value == "fp16":
        raise ConfigError("--precision fp16 is refused for Hessians: without loss scaling the second "
                          "derivatives underflow in float16 (its smallest normal number is 6e-5), so small "
                          "curvatures come out as zero; use --precision bf16 (float32's range, GPUs from "
                          "Ampere on) or fp32 (exact)")
    return value


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name, ``None`` for fp32 and tf32."""
    return _DTYPES.get(parse_precision(precision))


def rounding(precision: str, dtype: torch.dtype = torch.float32) -> float:
    """Relative rounding (machine epsilon) of products computed at ``precision`` for a model whose
    parameters are ``dtype``: the larger of the dtype's and the precision's (TF32 and autocast only
    touch float32 arithmetic, so a float64 model at fp32 / tf32 keeps float64's)."""
    precision = parse_precision(precision)
    own = float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(torch.finfo(torch.float64).eps)
    if precision == "fp32" or (precision == "tf32" and dtype != torch.float32):
        return own
    return max(own, _EPS[precision])


def tf32_state() -> dict:
    """Whether TF32 is on now for float32 matrix products (cuBLAS) and cuDNN convolutions."""
    return {"matmul": _matmul_tf32(), "cudnn": _cudnn_tf32()}


def _matmul_tf32() -> bool:
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:   # the new and the legacy setting disagree: ask the new one
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _cudnn_conv():
    conv = getattr(torch.backends.cudnn, "conv", None)
    return conv if conv is not None and hasattr(conv, "fp32_precision") else None


def _cudnn_tf32() -> bool:
    conv = _cudnn_conv()
    if conv is None:
        return bool(torch.backends.cudnn.allow_tf32)
    return conv.fp32_precision == "tf32" or (conv.fp32_precision == "none" and _cudnn_none_is_tf32())


def _cudnn_none_is_tf32() -> bool:
    return getattr(torch.backends.cudnn, "fp32_precision", "none") == "tf32" or \
        getattr(torch.backends, "fp32_precision", "none") == "tf32"


@contextlib.contextmanager
def fp32_math(precision: str = "fp32") -> Iterator[None]:
    """TF32 on for ``tf32``, off for every other precision, in float32 matrix products (cuBLAS) and
    cuDNN convolutions and RNNs, restored on leaving.

    The matrix-product setting goes through :func:`torch.set_float32_matmul_precision`, which keeps
    PyTorch's legacy and new TF32 flags in agreement (``torch.compile`` reads the legacy one, and a
    matmul flag set through ``torch.backends.cuda.matmul.fp32_precision`` alone makes that read
    raise); cuDNN through ``torch.backends.cudnn.conv/rnn.fp32_precision`` (PyTorch 2.9+, where the
    legacy ``torch.backends.cudnn.allow_tf32`` setter is deprecated; that setter before).  Inside the
    block PyTorch refuses to read the legacy ``torch.backends.cudnn.allow_tf32`` (it no longer agrees
    with the per-operation flags); :func:`tf32_state` reads the new ones.  The settings are
    process-wide: the block should not overlap a block of another precision in another thread.
    """
    allow = parse_precision(precision) == "tf32"
    try:
        previous_matmul = torch.get_float32_matmul_precision()
    except RuntimeError:    # someone mixed the legacy and new APIs: restore the new setting as it was
        previous_matmul = None
    # set_float32_matmul_precision also writes the new per-backend fields: put back what they were
    matmuls = [m for m in (torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None))
               if m is not None and hasattr(m, "fp32_precision")]
    previous_fields = [m.fp32_precision for m in matmuls]
    conv, rnn = _cudnn_conv(), getattr(torch.backends.cudnn, "rnn", None)
    if conv is not None:
        previous_cudnn = (conv.fp32_precision, rnn.fp32_precision if rnn is not None else None)
    else:
        previous_cudnn = bool(torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("high" if allow else "highest")
        for m, value in zip(matmuls[1:], previous_fields[1:]):   # oneDNN (CPU) matmuls stay as they were
            m.fp32_precision = value
        if conv is not None:
            conv.fp32_precision = "tf32" if allow else "ieee"
            if rnn is not None:
                rnn.fp32_precision = "tf32" if allow else "ieee"
        else:
            torch.backends.cudnn.allow_tf32 = allow
        yield
    finally:
        if previous_matmul is not None:
            torch.set_float32_matmul_precision(previous_matmul)
        for m, value in zip(matmuls, previous_fields):
            if m.fp32_precision != value:
                m.fp32_precision = value
        if conv is not None:
            conv.fp32_precision = previous_cudnn[0]
            if rnn is not None:
                rnn.fp32_precision = previous_cudnn[1]
        else:
            torch.backends.cudnn.allow_tf32 = previous_cudnn


def precision_attrs(precision: str) -> dict:
    """What a result file records about a run's arithmetic: ``{"precision": ..., "tf32": bool}``
    (TF32 is on only for ``tf32``; see :func:`fp32_math`)."""
    precision = parse_precision(precision)
    return {"precision": precision, "tf32": precision == "tf32"}


_WATCHERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("lt_precision_watchers", default=())


@contextlib.contextmanager
def watch_precisions(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback(precision)`` each time an :func:`autocast` block is entered inside this block,
    before anything runs in it (it may raise to refuse the precision).  The Hessian products use
    it to learn at what precision the model's forward pass really ran."""
    token = _WATCHERS.set(_WATCHERS.get() + (callback,))
    try:
        yield
    finally:
        _WATCHERS.reset(token)


def _check_supported(device: torch.device, precision: str) -> None:
    dtype = _DTYPES[precision]
    if device.type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.is_available():
            # torch.cuda.is_bf16_supported() asks about the current device, not the run's, and says
            # True on pre-Ampere GPUs, which only emulate bfloat16 (slower than float32)
            capability = tuple(torch.cuda.get_device_capability(device))
            if capability < BF16_CAPABILITY:
                raise ConfigError(
                    f"--precision bf16: the GPU {device} ({torch.cuda.get_device_name(device)}) has compute "
                    f"capability {capability[0]}.{capability[1]}; bfloat16 arithmetic needs "
                    f"{BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]} (Ampere) or later, older GPUs only emulate it "
                    f"(slower than fp32); use --precision fp32, or fp16 for forward-only analyses "
                    f"(surface, evaluate, featvar)")
        return
    if device.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"--precision {precision} is not supported on device {device}; use --precision fp32")
    available = getattr(torch.amp.autocast_mode, "is_autocast_available", None)
    if available is not None and not available(device.type):
        raise ConfigError(f"--precision {precision}: this PyTorch has no autocast for {device.type}; "
                          f"use --precision fp32")


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """Run the enclosed forward passes at ``precision`` on ``device``: fp32 and tf32 without
    autocast (TF32 off / on, see :func:`fp32_math`), bf16 / fp16 under :func:`torch.autocast`
    (TF32 off for what it leaves in float32).  Every setting is restored on leaving.

    Raises:
        ConfigError: the precision is unknown or the device cannot run it.
    """
    precision = parse_precision(precision)
    device = torch.device(device)
    for callback in _WATCHERS.get():
        callback(precision)
    if precision in ("fp32", "tf32"):
        with fp32_math(precision):
            yield
        return
    _check_supported(device, precision)
    with fp32_math(precision), torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield


def full_precision(output: torch.Tensor, reference_dtype: torch.dtype) -> torch.Tensor:
    """``output`` cast back to the model's own floating dtype (a reduced-precision forward pass
    returns bf16/fp16 logits; losses and statistics must not be accumulated in them)."""
    if output.is_floating_point() and output.dtype != reference_dtype:
        return output.to(reference_dtype)
    return output


def compile_model(model: nn.Module, enabled: bool = True, mode: str | None = None) -> nn.Module:
    """``torch.compile(model)`` when ``enabled``, else ``model`` itself.

    The compiled module shares parameters and buffers with ``model``: in-place weight updates
    (surface grids) and forward hooks registered on the submodules of ``model`` stay effective
    (hooks force graph breaks, so feature-variance probes gain little from compiling).

    Raises:
        ConfigError: this PyTorch cannot compile (no ``torch.compile``, or no C++ compiler on CPU,
            which is reported at the first forward pass as a backend error).
    """
    if not enabled:
        return model
    if not hasattr(torch, "compile"):
        raise ConfigError("--compile needs PyTorch 2.0 or later; drop --compile")
    try:
        return torch.compile(model, mode=mode)
    except RuntimeError as exc:  # e.g. unsupported Python version for dynamo
        raise ConfigError(f"--compile: torch.compile is unavailable here ({exc}); drop --compile") from None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
