"""The paper's model families: ResNet, PreResNet, VGG and AlexNet, with and without MC dropout and
spatial smoothing.

Module names, registration order and forward computation follow the reference code, so its
checkpoints load unchanged (``tests/test_models.py`` reproduces its logits to 1e-8 in float64).
Every stage of a zoo model is followed by ``smoothK``, an ``nn.Sequential`` that holds one
:class:`~landscape_tools.models.smoothing.Smoothing` block in ``_smoothing`` models and is empty
otherwise; the box blur has no state, so a model and its smoothing twin share state-dict keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .mc import MCDropout
from .smoothing import Smoothing


@dataclass
class SmoothingConfig:
    """How ``_smoothing`` models smooth: Prob kind, temperature, blur filter and padding."""

    kind: str = "tanh"
    tau: float | None = None
    sfilter: Sequence[float] = (1, 1)
    pad_mode: str = "constant"

    def make(self, channels: int) -> nn.Module:
        return Smoothing(channels, kind=self.kind, tau=self.tau, sfilter=self.sfilter, pad_mode=self.pad_mode)


@dataclass
class ZooSpec:
    """What a zoo model is made of; set on every zoo model as ``model.zoo_spec``."""

    name: str
    family: str
    mc: bool
    smoothing: bool
    depth: int | None
    # module names in forward order, for feature analyses
    stages: list[str] = field(default_factory=list)        # stage outputs (after smoothing)
    blocks: list[str] = field(default_factory=list)        # every block, smoothing included
    smoothing_layers: list[str] = field(default_factory=list)
    downsampling_layers: list[str] = field(default_factory=list)


def _conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=padding, bias=False)


def _dropout(p: float | None) -> nn.Module | None:
    return MCDropout(p) if p else None


# ----------------------------------------------------------------------------- ResNet family
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, channels: int, stride: int = 1, dropout: float | None = None):
        super().__init__()
        cout = channels * self.expansion
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
        self.conv1 = _conv(cin, channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.dropout = _dropout(dropout)
        self.conv2 = _conv(channels, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.bn2(self.conv2(x))
        return self.relu2(skip + x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, channels: int, stride: int = 1, dropout: float | None = None):
        super().__init__()
        cout = channels * self.expansion
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
        self.conv1 = _conv(cin, channels, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv(channels, channels, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.dropout = _dropout(dropout)
        self.conv3 = _conv(channels, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.bn3(self.conv3(x))
        return self.relu3(skip + x)


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, channels: int, stride: int = 1, dropout: float | None = None):
        super().__init__()
        cout = channels * self.expansion
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride))
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv(cin, channels, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.dropout = _dropout(dropout)
        self.conv2 = _conv(channels, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv2(out) + skip


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, channels: int, stride: int = 1, dropout: float | None = None):
        super().__init__()
        cout = channels * self.expansion
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride))
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv(cin, channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv(channels, channels, 3, stride, 1)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu3 = nn.ReLU()
        self.dropout = _dropout(dropout)
        self.conv3 = _conv(channels, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.relu3(self.bn3(out))
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv3(out) + skip


class GAPHead(nn.Module):
    """Global average pooling, flatten, ``dense``; PreResNet's version starts with BN + ReLU."""

    def __init__(self, cin: int, num_classes: int, preact: bool = False):
        super().__init__()
        if preact:
            self.bn = nn.BatchNorm2d(cin)
            self.relu = nn.ReLU()
        self.preact = preact
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.dense = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            x = self.relu(self.bn(x))
        return self.dense(torch.flatten(self.pool(x), 1))


class MLPHead(nn.Module):
    """``dense1 -> ReLU -> Dropout -> dense2 -> ReLU -> Dropout -> dense3`` on the flattened input."""

    def __init__(self, cin: int, hidden: int, num_classes: int, p: float = 0.5):
        super().__init__()
        self.dense1 = nn.Linear(cin, hidden)
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(p)
        self.dense2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(p)
        self.dense3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout1(self.relu1(self.dense1(x)))
        x = self.dropout2(self.relu2(self.dense2(x)))
        return self.dense3(x)


class ZooNet(nn.Module):
    """A stem ``layer0``, stages ``layer1..`` each followed by ``smoothK``, and ``classifier``."""

    zoo_spec: ZooSpec
    #: MC sampling switches on exactly this model's MCDropout layers (none for ``_dnn``), never the
    #: classifier's ordinary nn.Dropout (see ``mc.sampling_dropout_modules``); a class attribute, so
    #: every zoo model has it however it was built or loaded
    lt_mc_layers_only = True

    def __init__(self, first_stage: int, n_stages: int):
        super().__init__()
        self._order = []
        for k in range(first_stage, n_stages):
            self._order += [f"layer{k}", f"smooth{k}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "layer0") and "layer0" not in self._order:
            x = self.layer0(x)
        for name in self._order:
            x = getattr(self, name)(x)
        return self.classifier(x)


def _finish_spec(model: ZooNet, spec: ZooSpec, downsampling: list[str]) -> ZooNet:
    names = ["layer0"] if "layer0" not in model._order else []
    names += model._order
    for name in names:
        module = getattr(model, name)
        if name.startswith("smooth"):
            if len(module) > 0:
                spec.smoothing_layers.append(name)
                spec.blocks.append(name)
                spec.stages[-1] = name        # stage output = after its smoothing
            continue
        spec.stages.append(name)
        spec.blocks.extend(f"{name}.{child}" for child, _ in module.named_children())
    spec.downsampling_layers = downsampling
    model.zoo_spec = spec
    return model


def resnet(depth: int, mc: bool, smoothing: bool, preact: bool = False, num_classes: int = 10,
           in_channels: int = 3, width: int = 64, stem: str = "cifar", dropout: float | None = None,
           smoothing_config: SmoothingConfig | None = None) -> ZooNet:
    configs = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
               101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}
    kind, counts = configs[depth]
    if preact:
        block = PreActBasicBlock if kind == "basic" else PreActBottleneck
    else:
        block = BasicBlock if kind == "basic" else Bottleneck
    p = (0.3 if dropout is None else dropout) if mc else None
    sc = smoothing_config or SmoothingConfig()
    model = ZooNet(1, 5)
    if stem == "cifar":
        stem_layers = [_conv(in_channels, width, 3, 1, 1)]
        if not preact:
            stem_layers += [nn.BatchNorm2d(width), nn.ReLU()]
    elif stem == "imagenet":
        stem_layers = [_conv(in_channels, width, 7, 2, 3)]
        if not preact:
            stem_layers += [nn.BatchNorm2d(width), nn.ReLU()]
        stem_layers += [nn.MaxPool2d(3, 2, 1)]
    else:
        raise ValueError(f"stem {stem!r} is not 'cifar' or 'imagenet'")
    model.layer0 = nn.Sequential(*stem_layers)
    cin = width
    downsampling = ["layer0"] if stem == "imagenet" else []
    for k, (count, stride) in enumerate(zip(counts, [1, 2, 2, 2]), start=1):
        channels = width * 2 ** (k - 1)
        blocks = []
        for i in range(count):
            blocks.append(block(cin, channels, stride if i == 0 else 1, p))
            cin = channels * block.expansion
        setattr(model, f"layer{k}", nn.Sequential(*blocks))
        if stride != 1:
            downsampling.append(f"layer{k}.0")
        smooth = smoothing and not (preact and k == 4)
        setattr(model, f"smooth{k}", nn.Sequential(sc.make(cin)) if smooth else nn.Sequential())
    model.classifier = nn.Sequential(GAPHead(cin, num_classes, preact=preact))
    family = "preresnet" if preact else "resnet"
    name = f"{family}_{'mcdo' if mc else 'dnn'}{'_smoothing' if smoothing else ''}_{depth}"
    return _finish_spec(model, ZooSpec(name, family, mc, smoothing, depth), downsampling)


class ConvBlock(nn.Module):
    """``conv`` (bias-free) [-> ``bn``] -> ``relu`` [-> MC dropout]."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1,
                 bn: bool = True, dropout: float | None = None):
        super().__init__()
        self.conv = _conv(cin, cout, k, stride, padding)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.relu = nn.ReLU()
        self.dropout = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        x = self.relu(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x


def vgg(depth: int, mc: bool, smoothing: bool, num_classes: int = 10, in_channels: int = 3, width: int = 64,
        stem: str = "cifar", dropout: float | None = None, smoothing_config: SmoothingConfig | None = None) -> ZooNet:
    counts = {11: [1, 1, 2, 2, 2], 13: [2, 2, 2, 2, 2], 16: [2, 2, 3, 3, 3], 19: [2, 2, 4, 4, 4]}[depth]
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem {stem!r} is not 'cifar' or 'imagenet'")
    p = (0.3 if dropout is None else dropout) if mc else None
    sc = smoothing_config or SmoothingConfig()
    model = ZooNet(0, 5)
    cin = in_channels
    downsampling = []
    for k, count in enumerate(counts):
        cout = width * min(2 ** k, 8)
        layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if k > 0 else []
        if k > 0:
            downsampling.append(f"layer{k}.0")
        for _ in range(count):
            layers.append(ConvBlock(cin, cout, dropout=p))
            cin = cout
        setattr(model, f"layer{k}", nn.Sequential(*layers))
        setattr(model, f"smooth{k}", nn.Sequential(sc.make(cin)) if smoothing else nn.Sequential())
    hidden = max(1, 4096 * width // 64)
    model.classifier = nn.Sequential(nn.MaxPool2d(2, 2), nn.AdaptiveAvgPool2d((7, 7)),
                                     MLPHead(cin * 49, hidden, num_classes))
    name = f"vgg_{'mcdo' if mc else 'dnn'}{'_smoothing' if smoothing else ''}_{depth}"
    return _finish_spec(model, ZooSpec(name, "vgg", mc, smoothing, depth), downsampling)


def alexnet(mc: bool, smoothing: bool, num_classes: int = 10, in_channels: int = 3, width: int = 64,
            stem: str = "cifar", dropout: float | None = None, smoothing_config: SmoothingConfig | None = None) -> ZooNet:
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem {stem!r} is not 'cifar' or 'imagenet'")
    p = (0.1 if dropout is None else dropout) if mc else None
    sc = smoothing_config or SmoothingConfig()
    c = [width, width * 3, width * 6, width * 4, width * 4]    # 64, 192, 384, 256, 256 at width 64
    model = ZooNet(0, 3)
    model.layer0 = nn.Sequential(ConvBlock(in_channels, c[0], 3, 2, 1, bn=False, dropout=p))
    model.smooth0 = nn.Sequential(sc.make(c[0])) if smoothing else nn.Sequential()
    model.layer1 = nn.Sequential(nn.MaxPool2d(2, 2), ConvBlock(c[0], c[1], 5, 1, 2, bn=False, dropout=p))
    model.smooth1 = nn.Sequential(sc.make(c[1])) if smoothing else nn.Sequential()
    model.layer2 = nn.Sequential(nn.MaxPool2d(2, 2), ConvBlock(c[1], c[2], bn=False, dropout=p),
                                 ConvBlock(c[2], c[3], bn=False, dropout=p), ConvBlock(c[3], c[4], bn=False, dropout=p))
    model.smooth2 = nn.Sequential(sc.make(c[4])) if smoothing else nn.Sequential()
    hidden = max(1, 4096 * width // 64)
    model.classifier = nn.Sequential(nn.MaxPool2d(2, 2), nn.AdaptiveAvgPool2d((2, 2)),
                                     MLPHead(c[4] * 4, hidden, num_classes))
    name = f"alexnet_{'mcdo' if mc else 'dnn'}{'_smoothing' if smoothing else ''}"
    return _finish_spec(model, ZooSpec(name, "alexnet", mc, smoothing, None), ["layer0.0", "layer1.0", "layer2.0"])


FAMILY_DEPTHS = {"resnet": (18, 34, 50, 101, 152), "preresnet": (18, 34, 50, 101, 152),
                 "vgg": (11, 13, 16, 19), "alexnet": (None,)}
BUILDERS: dict[str, Callable[..., ZooNet]] = {
    "resnet": lambda depth, **kw: resnet(depth, preact=False, **kw),
    "preresnet": lambda depth, **kw: resnet(depth, preact=True, **kw),
    "vgg": lambda depth, **kw: vgg(depth, **kw),
    "alexnet": lambda depth, **kw: alexnet(**kw),
}
