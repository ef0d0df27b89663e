"""Training for the model zoo: SGD with momentum, cosine or step schedule, simple image augmentation."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataSet
from .device import Progress, report
from .errors import ConfigError, NumericalError
from .models import mc_dropout

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Options of :func:`train`; stored in the checkpoint's ``meta``."""

    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    augment: bool = True
    flip: bool = False
    pad: int = 2
    seed: int = 0
    warmup_epochs: int = 1

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):   # NaN / inf compare False: refused too
            raise ConfigError(f"--lr {self.lr} must be a positive finite number, e.g. --lr 0.05")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum {self.momentum} must be in [0, 1)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"--weight-decay {self.weight_decay} must be a finite number >= 0, e.g. --weight-decay 5e-4")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    test: dict = field(default_factory=dict)
    seconds: float = 0.0


def augment_batch(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translations (zero-pad by ``pad``, random crop back) and optional horizontal flips."""
    if x.dim() != 4 or (pad <= 0 and not flip):
        return x
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        if mask.any():
            x = x.clone()
            x[mask.to(x.device)] = x[mask.to(x.device)].flip(-1)
    return x


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: DataSet, batch_size: int = 256) -> dict:
    """Mean NLL and accuracy of one deterministic pass (dropout off, BN running statistics)."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with mc_dropout(model, False):
        for x, y in data.batches(batch_size):
            out = model(x)
            total_loss += float(F.cross_entropy(out.double(), y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += int(y.shape[0])
    model.train(was_training)
    return {"nll": total_loss / n, "accuracy": correct / n, "samples": n}


def _lr_at(cfg: TrainConfig, epoch_float: float) -> float:
    if cfg.warmup_epochs and epoch_float < cfg.warmup_epochs:
        return cfg.lr * (epoch_float + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, epoch_float / cfg.epochs)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** int(epoch_float // cfg.step_size)
    return cfg.lr


def train(model: nn.Module, train_data: DataSet, test_data: DataSet | None, config: TrainConfig,
          progress: Progress = None) -> TrainResult:
    """Train ``model`` in place on ``train_data`` (already on the device).

    Args:
        model: the network (MC dropout stays active during training, as in the paper).
        train_data: training split, shuffled each epoch with a seeded generator.
        test_data: evaluated after training (deterministic pass) when given.
        config: optimiser, schedule, augmentation and seed.
        progress: ``progress(step, total_steps, message)``.

    Returns:
        per-epoch history (loss, accuracy, lr) and the final test metrics.

    Raises:
        NumericalError: when the loss becomes NaN or infinite (lower --lr).
    """
    config.validate()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    n = len(train_data)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    result = TrainResult()
    start = time.monotonic()
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(train_data.x.device)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x, y = train_data.x[idx], train_data.y[idx]
            if config.augment:
                x = augment_batch(x, config.pad, config.flip, gen)
            lr = _lr_at(config, epoch + b / steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            out = model(x)
            loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise NumericalError(f"training diverged at epoch {epoch + 1} (loss {float(loss)}); lower --lr "
                                     f"(now {config.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * int(y.shape[0])
            correct += int((out.detach().argmax(1) == y).sum())
            seen += int(y.shape[0])
            step += 1
            report(progress, step, total, f"epoch {epoch + 1}/{config.epochs} loss {loss_sum / seen:.3f} "
                                          f"acc {correct / seen:.3f}")
        result.history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen, "lr": lr})
    model.eval()
    if test_data is not None:
        result.test = evaluate_loss(model, test_data)
    result.seconds = time.monotonic() - start
    return result
