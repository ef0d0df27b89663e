"""Reduced-precision forward passes and ``torch.compile`` for the forward-only analyses.

``--precision`` picks the dtype the model's forward pass runs in through :func:`torch.autocast`:

* ``fp32`` (default): no autocast, the model runs in its own dtype (float32 or float64).
* ``bf16`` / ``fp16``: matrix products and convolutions run in bfloat16 / float16 on CUDA (and on
  CPU, where PyTorch's CPU autocast supports them; useful for testing, rarely faster).

Only the forward pass is affected: the logits are cast back to float32 (float64 when the model is
float64) before any loss, probability or statistic is computed, so accumulations never happen in 16
bits.  Hessians stay in full precision unless a user asks for less (second derivatives in 16 bits
are rarely meaningful).

``--compile`` wraps the model in :func:`torch.compile`.  The first forward pass of each input shape
pays the compilation (seconds to minutes); afterwards the compiled graph is reused.  It helps when
the same shapes are evaluated many times (surface grids, MC samples) and is off by default
(``lt surface`` defaults to ``--compile auto``: see :class:`landscape_tools.surface.SurfaceEvaluator`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["PRECISIONS", "parse_precision", "autocast_dtype", "autocast", "full_precision", "compile_model", "model_dtype"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_precision(text: str | None) -> str:
    """Validate a ``--precision`` value (``None`` means ``fp32``).

    Raises:
        ConfigError: a value other than fp32, bf16 or fp16.
    """
    if text is None:
        return "fp32"
    value = str(text).strip().lower()
    aliases = {"float32": "fp32", "32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "16": "fp16"}
    value = aliases.get(value, value)
    if value not in PRECISIONS:
        raise ConfigError(f"--precision {text!r} is not one of {', '.join(PRECISIONS)}; "
                          f"use fp32 (exact), bf16 or fp16 (faster forward passes on a GPU)")
    return value


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name, ``None`` for fp32."""
    return _DTYPES.get(parse_precision(precision))


def _check_supported(device: torch.device, precision: str) -> None:
    dtype = _DTYPES[precision]
    if device.type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--precision bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 "
                              f"support; use --precision fp16 or fp32")
        return
    if device.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"--precision {precision} is not supported on device {device}; use --precision fp32")
    available = getattr(torch.amp.autocast_mode, "is_autocast_available", None)
    if available is not None and not available(device.type):
        raise ConfigError(f"--precision {precision}: this PyTorch has no autocast for {device.type}; "
                          f"use --precision fp32")


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """Run the enclosed forward passes at ``precision`` on ``device`` (a no-op for fp32).

    Raises:
        ConfigError: the precision is unknown or the device cannot run it.
    """
    precision = parse_precision(precision)
    device = torch.device(device)
    if precision == "fp32":
        yield
        return
    _check_supported(device, precision)
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
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
