"""Training for the model zoo: SGD with momentum, cosine or step schedule (every ``step_size`` epochs
or at given milestones) after a linear warm-up, simple image augmentation (translations, flips)."""
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
    #: step schedule: multiply the learning rate by ``gamma`` at each of these epochs (0-based epoch
    #: index from which the new rate holds, as torch's MultiStepLR); empty: every ``step_size`` epochs
    milestones: list = field(default_factory=list)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs} must be at least 1")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"--gamma {self.gamma} must be a positive finite factor, e.g. --gamma 0.2")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs!r} must be a whole number of epochs >= 0 "
                              f"(0: no warm-up)")
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ConfigError(f"--translate {self.pad!r} must be a whole number of pixels >= 0, e.g. --translate 4")
        if self.milestones:
            ms = list(self.milestones)
            if self.schedule != "step":
                raise ConfigError(f"--milestones {','.join(map(str, ms))} needs --schedule step (now "
                                  f"{self.schedule}); add --schedule step")
            if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms) or ms != sorted(set(ms)):
                raise ConfigError(f"--milestones {','.join(map(str, ms))}: expected increasing whole epochs >= 1, "
                                  f"e.g. --milestones 60,120,160")
            if ms[-1] >= self.epochs:
                raise ConfigError(f"--milestones {','.join(map(str, ms))}: milestone {ms[-1]} is not before the "
                                  f"end of training (--epochs {self.epochs}); drop it or train longer")
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


def draw_augmentation(n: int, pad: int, flip: bool, generator: torch.Generator
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of :func:`augment_batch` for ``n`` samples, on the CPU from ``generator``:
    crop offsets ``dx``, ``dy`` in ``[0, 2 * pad]`` (``None`` without padding) and the flip mask
    (``None`` without ``flip``), drawn in that order."""
    dx = dy = mask = None
    if pad > 0:
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
    return dx, dy, mask


def apply_augmentation(x: torch.Tensor, pad: int, dx: torch.Tensor | None, dy: torch.Tensor | None,
                       mask: torch.Tensor | None) -> torch.Tensor:
    """Translate each image of ``x`` (N, C, H, W) by zero-padding ``pad`` pixels on every side and
    cropping the H x W window whose top-left corner is ``(dy[i], dx[i])``, then mirror the images
    where ``mask`` is True; in a few batched operations on ``x``'s device (the draws are moved there)."""
    n, _, h, w = x.shape
    if dx is not None and pad > 0:
        # every H x W window of the padded images as a view (N, C, 2p+1, 2p+1, H, W); one indexing
        # op picks window (dy[i], dx[i]) of image i
        windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)
        x = windows[torch.arange(n, device=x.device), :, dy.to(x.device), dx.to(x.device)]
    if mask is not None:
        x = torch.where(mask.to(x.device).view(n, 1, 1, 1), x.flip(-1), x)
    return x


def augment_batch(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translations (zero-pad by ``pad``, random crop back) and optional horizontal flips,
    drawn from ``generator`` (:func:`draw_augmentation`) and applied at once (:func:`apply_augmentation`)."""
    if x.dim() != 4 or (pad <= 0 and not flip):
        return x
    return apply_augmentation(x, pad, *draw_augmentation(int(x.shape[0]), pad, flip, generator))


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: DataSet, batch_size: int = 256) -> dict:
    """Mean NLL and accuracy of one deterministic pass (dropout off, BN running statistics); summed
    on the device, read once at the end."""
    was_training = model.training
    model.eval()
    device = data.y.device
    total_loss = torch.zeros((), dtype=_sum_dtype(device), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    with mc_dropout(model, False):
        for x, y in data.batches(batch_size):
            out = model(x)
            total_loss += F.cross_entropy(out.to(total_loss.dtype), y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            n += int(y.shape[0])
    model.train(was_training)
    total_loss, correct = float(total_loss), int(correct)
    return {"nll": total_loss / n, "accuracy": correct / n, "samples": n}


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 sums on the device (float32 where the device has no float64, e.g. MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _lr_at(cfg: TrainConfig, epoch_float: float) -> float:
    if cfg.warmup_epochs and epoch_float < cfg.warmup_epochs:
        return cfg.lr * (epoch_float + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, epoch_float / cfg.epochs)))
    if cfg.schedule == "step":
        if cfg.milestones:
            return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch_float >= m)
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
        NumericalError: when the loss became NaN or infinite, checked at the end of each epoch (the
            running loss and accuracy are summed on the device and read once per epoch, so a step
            never waits for the device); lower --lr.
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
    device = train_data.y.device
    augment = config.augment and train_data.x.dim() == 4 and (config.pad > 0 or config.flip)
    step = 0
    shown = ""
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        # the epoch's augmentation, drawn batch by batch in the order the per-batch draws always had
        # (the same crops for a seed), moved to the device once per epoch like the order
        draws = [draw_augmentation(min(config.batch_size, n - b * config.batch_size), config.pad, config.flip, gen)
                 if augment else (None, None, None) for b in range(steps_per_epoch)]
        dx, dy, flips = (torch.cat(parts).to(device) if parts[0] is not None else None for parts in zip(*draws))
        order = order.to(device)
        # running sums stay on the device: one read per epoch instead of three per step
        loss_sum = torch.zeros((), dtype=_sum_dtype(device), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        for b in range(steps_per_epoch):
            rows = slice(b * config.batch_size, (b + 1) * config.batch_size)
            idx = order[rows]
            x, y = train_data.x[idx], train_data.y[idx]
            if augment:
                x = apply_augmentation(x, config.pad, None if dx is None else dx[rows],
                                       None if dy is None else dy[rows], None if flips is None else flips[rows])
            lr = _lr_at(config, epoch + b / steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            detached = loss.detach()
            loss_sum += detached.to(loss_sum.dtype) * int(y.shape[0])
            correct += (out.detach().argmax(1) == y).sum()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(detached), b, first_bad)
            step += 1
            if b < steps_per_epoch - 1:   # the epoch's last step is reported below, with its figures
                report(progress, step, total, f"epoch {epoch + 1}/{config.epochs}{shown}")
        # the epoch's one read (in the sums' dtype: counts below 2**24 are exact even in float32)
        loss_total, correct_total, bad = torch.stack([loss_sum, correct.to(loss_sum.dtype),
                                                      first_bad.to(loss_sum.dtype)]).tolist()
        if bad >= 0 or not math.isfinite(loss_total):
            where = f" from step {int(bad) + 1} of {steps_per_epoch} on" if bad >= 0 else ""
            raise NumericalError(f"training diverged in epoch {epoch + 1} (the loss was not finite{where}); "
                                 f"lower --lr (now {config.lr})")
        mean_loss, accuracy = loss_total / n, correct_total / n
        shown = f" (epoch {epoch + 1}: loss {mean_loss:.3f} acc {accuracy:.3f})"
        report(progress, step, total, f"epoch {epoch + 1}/{config.epochs}{shown}")
        result.history.append({"epoch": epoch + 1, "loss": mean_loss, "accuracy": accuracy, "lr": lr})
    model.eval()
    if test_data is not None:
        result.test = evaluate_loss(model, test_data)
    result.seconds = time.monotonic() - start
    return result
