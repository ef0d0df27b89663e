"""Device resolution and progress reporting hooks shared by every analysis."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import ConfigError

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


def report(progress: Progress, done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)
