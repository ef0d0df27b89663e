"""Spatial smoothing layers: a "Prob" nonlinearity followed by a blur.

The blur ensembles neighbouring feature-map points.  The default box blur is a 2x2
average with stride 1 and zero padding of one pixel on every side (padded zeros count in the
average), so each spatial side grows by one pixel and the layer has no state.  A general blur
is a depthwise convolution with the normalised outer product of a 1-D filter and "same"
padding; its kernel is a non-trainable parameter stored under ``<block>.blur.filter``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

PROB_KINDS = ("tanh", "relu6", "sigmoid", "softmax", "scaling", "none")
DEFAULT_TAU = {"tanh": 10.0, "relu6": 6.0, "sigmoid": 10.0, "softmax": 10.0, "scaling": 5.0, "none": 1.0}
PAD_MODES = ("constant", "zero", "replicate", "reflect", "circular")


class BoxBlur2x2(nn.Module):
    """2x2 average, stride 1, one pixel of zero padding: ``H x W -> (H+1) x (W+1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=1, padding=1, count_include_pad=True)


class FilterBlur(nn.Module):
    """Depthwise blur with kernel ``s s^T / sum(s s^T)`` and "same" padding.

    Args:
        channels: number of input channels (one kernel copy each).
        sfilter: the 1-D filter, e.g. ``(1, 2, 1)``.
        pad_mode: ``constant`` (zeros), ``replicate``, ``reflect`` or ``circular``.
    """

    def __init__(self, channels: int, sfilter: Sequence[float] = (1, 2, 1), pad_mode: str = "replicate"):
        super().__init__()
        if pad_mode == "zero":
            pad_mode = "constant"
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode {pad_mode!r} is not one of {', '.join(PAD_MODES)}")
        proto = torch.tensor([float(v) for v in sfilter])
        if proto.numel() < 1 or float(proto.sum()) == 0.0:
            raise ValueError(f"blur filter {tuple(sfilter)} must be non-empty with a non-zero sum")
        kernel = torch.outer(proto, proto)
        kernel = kernel / kernel.sum()
        self.filter = nn.Parameter(kernel.repeat(channels, 1, 1, 1), requires_grad=False)
        k = proto.numel()
        before, after = (k - 1) // 2, int(math.ceil((k - 1) / 2))
        self.pad = (before, after, before, after)
        self.pad_mode = pad_mode
        self.sfilter = tuple(float(v) for v in sfilter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad, mode=self.pad_mode)
        return F.conv2d(x, self.filter.to(x.dtype), groups=x.shape[1])

    def extra_repr(self) -> str:
        return f"sfilter={self.sfilter}, pad_mode={self.pad_mode}"


def make_blur(channels: int, sfilter: Sequence[float] = (1, 1), pad_mode: str = "constant") -> nn.Module:
    """The box blur for ``(1, 1)`` with zero padding, else a :class:`FilterBlur`."""
    if tuple(float(v) for v in sfilter) == (1.0, 1.0) and pad_mode in ("constant", "zero"):
        return BoxBlur2x2()
    return FilterBlur(channels, sfilter, pad_mode)


class Smoothing(nn.Module):
    """Prob nonlinearity (with temperature ``tau``) followed by an optional blur.

    kinds: ``tanh``  -> tau*tanh(x/tau), ReLU;  ``relu6`` -> clamp(x, 0, tau);
    ``sigmoid`` -> 4*tau*(sigmoid(x/tau) - 0.5), ReLU;  ``softmax`` -> tau*softmax_c(x/tau), ReLU;
    ``scaling`` -> x/tau;  ``none`` -> identity.  ``blur=False`` gives the ablation without blur.
    """

    def __init__(self, channels: int, kind: str = "tanh", tau: float | None = None,
                 sfilter: Sequence[float] = (1, 1), pad_mode: str = "constant", blur: bool = True):
        super().__init__()
        if kind not in PROB_KINDS:
            raise ValueError(f"smoothing kind {kind!r} is not one of {', '.join(PROB_KINDS)}")
        self.kind = kind
        self.tau = float(DEFAULT_TAU[kind] if tau is None else tau)
        if self.tau <= 0:
            raise ValueError(f"smoothing temperature tau={tau} must be positive")
        if blur:
            self.blur = make_blur(channels, sfilter, pad_mode)
        else:
            self.blur = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tau, kind = self.tau, self.kind
        if kind == "tanh":
            x = F.relu(tau * torch.tanh(x / tau))
        elif kind == "relu6":
            x = torch.clamp(x, 0.0, tau)
        elif kind == "sigmoid":
            x = F.relu(4.0 * tau * (torch.sigmoid(x / tau) - 0.5))
        elif kind == "softmax":
            x = F.relu(tau * torch.softmax(x / tau, dim=1))
        elif kind == "scaling":
            x = x / tau
        if self.blur is not None:
            x = self.blur(x)
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, tau={self.tau}"
