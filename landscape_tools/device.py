"""Device resolution, out-of-memory messages and progress reporting hooks shared by every analysis."""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from .errors import ConfigError, LTError

#: progress callback: ``progress(done, total, message)``; the library calls it, the CLI draws it
Progress = Optional[Callable[[int, int, str], None]]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else CPU; otherwise validated as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


class OutOfMemory(LTError):
    """The device ran out of memory; the message names the options that lower the peak."""


#: per command, the options that lower its peak memory (and whether the numbers change)
MEMORY_KNOBS = {
    "hessian": "--sub-batch N (pieces of each batch processed in turn; the same Hessian), or a smaller "
               "--batch-size (smaller batches: a different Hessian per batch)",
    "surface": "a smaller --batch-size (the same surface, up to rounding)",
    "featvar": "a smaller --max-batch (rows per forward pass; the same numbers), or a smaller --batch-size",
    "evaluate": "a smaller --max-batch (rows per forward pass; the same curve), or a smaller --batch-size",
    "train": "a smaller --batch-size (a different training run: scale --lr with it)",
    "demo": "--device cpu",
}


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError`` (or a RuntimeError saying "out of memory", as older PyTorch
    and other back ends raise)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def out_of_memory_error(exc: BaseException, command: str | None = None,
                        device: torch.device | str | None = None) -> OutOfMemory:
    """The one-line error for an out-of-memory ``exc`` raised by ``lt COMMAND``: where, PyTorch's own
    first line (how much it tried to allocate), and the knob to turn."""
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "no details")
    if len(detail) > 160:
        detail = detail[:157] + "..."
    where = f" on {device}" if device is not None else ""
    knobs = MEMORY_KNOBS.get(command or "", "smaller batches (--batch-size, and --max-batch or --sub-batch "
                                               "where the command has them)")
    name = f"lt {command}" if command else "the command"
    return OutOfMemory(f"{name} ran out of memory{where} ({detail}); lower the peak with {knobs}, "
                       f"or run on a device with more memory")


def memory_notice(message: str, notice: Callable[[str], None] | None = None) -> None:
    """Say an automatic out-of-memory fallback (smaller pieces, the same result) on one line: through
    ``notice`` when given (e.g. the CLI's status line), else on stderr."""
    if notice is not None:
        notice(message)
    else:
        sys.stderr.write(f"note: {message}\n")
        sys.stderr.flush()


def report(progress: Progress, done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)
