"""The model zoo: ``build_model(name, **kwargs)`` and the names it knows.

Names follow the reference code: ``{resnet,preresnet}_{dnn,mcdo}[_smoothing]_{18,34,50,101,152}``,
``vgg_{dnn,mcdo}[_smoothing]_{11,13,16,19}``, ``alexnet_{dnn,mcdo}[_smoothing]``.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch.nn as nn

from .mc import (MCDropout, describe_sampling, dropout_modules, has_stochastic_dropout, is_mc_layers_only, mask_rows,
                 mc_dropout, replaced_forwards, sampling_dropout_modules)
from .smoothing import PROB_KINDS, Smoothing, make_blur
from .zoo import BUILDERS, FAMILY_DEPTHS, SmoothingConfig, ZooNet, ZooSpec

__all__ = ["build_model", "list_models", "parse_name", "MCDropout", "mc_dropout", "mask_rows", "dropout_modules", "replaced_forwards",
           "has_stochastic_dropout", "sampling_dropout_modules", "describe_sampling", "is_mc_layers_only", "Smoothing", "make_blur", "PROB_KINDS", "ZooNet", "ZooSpec",
           "UnknownArchitecture", "ARCH_KWARGS"]

_NAME = re.compile(r"^(resnet|preresnet|vgg|alexnet)_(dnn|mcdo)(_smoothing)?(?:_(\d+))?$")

#: keyword arguments :func:`build_model` accepts, with their defaults
ARCH_KWARGS: dict[str, Any] = {"num_classes": 10, "in_channels": 3, "width": 64, "stem": "cifar",
                               "dropout": None, "smoothing": "tanh", "tau": None, "sfilter": (1, 1),
                               "pad_mode": "constant"}


class UnknownArchitecture(ValueError):
    """A name that is not in the zoo."""


def list_models() -> list[str]:
    """Every zoo name, family by family."""
    names = []
    for family, depths in FAMILY_DEPTHS.items():
        for mode in ("dnn", "mcdo"):
            for smooth in ("", "_smoothing"):
                for depth in depths:
                    names.append(f"{family}_{mode}{smooth}" + ("" if depth is None else f"_{depth}"))
    return names


def parse_name(name: str) -> tuple[str, bool, bool, int | None]:
    """``"resnet_mcdo_smoothing_18" -> ("resnet", True, True, 18)``; raises UnknownArchitecture."""
    m = _NAME.match(name)
    if m:
        family, mode, smooth, depth = m.groups()
        depth_i = int(depth) if depth else None
        if depth_i in FAMILY_DEPTHS[family]:
            return family, mode == "mcdo", bool(smooth), depth_i
    close = [n for n in list_models() if n.split("_")[0] == name.split("_")[0]][:4]
    hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
    raise UnknownArchitecture(
        f"unknown architecture {name!r}: expected {{resnet,preresnet}}_{{dnn,mcdo}}[_smoothing]_{{18,34,50,101,152}}, "
        f"vgg_{{dnn,mcdo}}[_smoothing]_{{11,13,16,19}} or alexnet_{{dnn,mcdo}}[_smoothing] "
        f"(`lt info --zoo` lists them all).{hint}")


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: int = 64, stem: str = "cifar",
                dropout: float | None = None, smoothing: str = "tanh", tau: float | None = None,
                sfilter: Sequence[float] = (1, 1), pad_mode: str = "constant") -> ZooNet:
    """Build a zoo model by name.

    Args:
        name: e.g. ``resnet_mcdo_smoothing_18`` (see :func:`list_models`).
        num_classes: output logits.
        in_channels: input image channels (3 for CIFAR, 1 for grey images).
        width: base channel count (64 in the paper; e.g. 16 for small CPU models). Stage widths
            and MLP hidden sizes scale with it.
        stem: ``cifar`` (3x3 conv, stride 1) or ``imagenet`` (7x7/2 conv + 3x3/2 max-pool).
        dropout: MC-dropout probability for ``_mcdo`` models (default 0.3; AlexNet 0.1).
        smoothing: Prob kind of ``_smoothing`` models: tanh, relu6, sigmoid, softmax, scaling, none.
        tau: temperature (default per kind: tanh 10, relu6 6, scaling 5).
        sfilter: 1-D blur filter; ``(1, 1)`` with zero padding is the 2x2 box blur.
        pad_mode: blur padding: constant (zero), replicate, reflect.

    Returns:
        a :class:`ZooNet` with ``zoo_spec`` (stage / block / smoothing layer names) and
        ``arch_kwargs`` (the arguments that rebuild it).

    Raises:
        UnknownArchitecture: for a name not in the zoo; ValueError for bad options.
    """
    family, mc, smooth, depth = parse_name(name)
    if smoothing not in PROB_KINDS:
        raise ValueError(f"smoothing kind {smoothing!r} is not one of {', '.join(PROB_KINDS)}")
    if int(width) < 1 or int(num_classes) < 1 or int(in_channels) < 1:
        raise ValueError(f"width, num_classes and in_channels must be positive (got {width}, {num_classes}, {in_channels})")
    config = SmoothingConfig(kind=smoothing, tau=tau, sfilter=tuple(sfilter), pad_mode=pad_mode)
    model = BUILDERS[family](depth, mc=mc, smoothing=smooth, num_classes=int(num_classes),
                             in_channels=int(in_channels), width=int(width), stem=stem, dropout=dropout,
                             smoothing_config=config)
    model.arch_name = name
    model.arch_kwargs = {"num_classes": int(num_classes), "in_channels": int(in_channels), "width": int(width),
                         "stem": stem, "dropout": dropout, "smoothing": smoothing, "tau": tau,
                         "sfilter": [float(v) for v in sfilter], "pad_mode": pad_mode}
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter entries."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
