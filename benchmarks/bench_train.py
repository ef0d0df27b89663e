"""`landscape_tools.training.train` against the loop it replaced (issue #18 item 9), in one process.

old: the training loop as it was -- per step a finiteness check of the loss, ``float(loss)`` and
     ``int(correct)`` read back to the host (three waits for the device), and the random crops cut one
     sample at a time in Python (``torch.stack`` of N slices) with boolean-mask flips.
new: ``train`` -- the running loss / accuracy summed on the device and read once per epoch, the
     epoch's crop offsets drawn up front (same generator, same order, so the same crops) and applied
     in two ``gather`` calls, flips by ``torch.where``.

Both train the same freshly seeded model on the same data with the same seed; the script checks that
their per-epoch histories agree (to 1e-12) and prints steps per second, best of --rounds, both of the
wall clock and of this process's CPU time (with --threads 1 the CPU time is the steadier figure on a
shared machine), and the new/old ratio; then the augmentation of one batch alone, old and new.

    python benchmarks/bench_train.py [--arch resnet_dnn_18] [--width 4] [--size 32] [--samples 512]
        [--batch-size 64] [--epochs 1] [--flip] [--threads 1] [--rounds 3] [--reps 50] [--device cpu]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from _timing import best_of, clock, since  # noqa: E402 (benchmarks/ is on sys.path)
from landscape_tools.data import DataSet
from landscape_tools.device import resolve_device
from landscape_tools.errors import NumericalError
from landscape_tools.models import build_model
from landscape_tools.training import TrainConfig, _lr_at, augment_batch, train


def old_augment_batch(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """The per-sample augmentation as it was before issue #18."""
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


def old_train(model: nn.Module, train_data: DataSet, config: TrainConfig) -> list[dict]:
    """The training loop as it was before issue #18 (three host reads per step); returns the history."""
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
    history = []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).to(train_data.x.device)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x, y = train_data.x[idx], train_data.y[idx]
            if config.augment:
                x = old_augment_batch(x, config.pad, config.flip, gen)
            lr = _lr_at(config, epoch + b / steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            out = model(x)
            loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise NumericalError(f"training diverged at epoch {epoch + 1} (loss {float(loss)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * int(y.shape[0])
            correct += int((out.detach().argmax(1) == y).sum())
            seen += int(y.shape[0])
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen, "lr": lr})
    return history


def make_data(samples: int, size: int, channels: int, classes: int, device: torch.device) -> DataSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, channels, size, size, generator=g)
    y = torch.randint(0, classes, (samples,), generator=g)
    return DataSet(x.to(device), y.to(device), "tensors:bench", "train", classes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet_dnn_18")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=50, help="augmentation-alone repetitions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = make_data(args.samples, args.size, 3, 10, device)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, flip=args.flip, seed=1)
    steps = math.ceil(args.samples / args.batch_size) * args.epochs

    def fresh():
        torch.manual_seed(0)
        return build_model(args.arch, num_classes=10, in_channels=3, width=args.width).to(device)

    best = {"old": (math.inf, math.inf), "new": (math.inf, math.inf)}
    histories = {}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            model = fresh()
            sync(device)
            start = clock()
            if name == "old":
                histories[name] = old_train(model, data, cfg)
            else:
                histories[name] = train(model, data, None, cfg).history
            sync(device)
            best[name] = best_of(best[name], since(start))
    for a, b in zip(histories["old"], histories["new"]):
        assert a["epoch"] == b["epoch"] and a["lr"] == b["lr"] and a["accuracy"] == b["accuracy"], (a, b)
        assert abs(a["loss"] - b["loss"]) <= 1e-12 * abs(a["loss"]), (a, b)
    print(f"{args.arch} width {args.width}, {args.samples} x 3x{args.size}x{args.size}, batch {args.batch_size}, "
          f"{steps} steps, flip {args.flip}, {args.threads} thread(s), {device}, best of {args.rounds}; "
          f"histories agree")
    print(f"{'loop':<5} {'steps/s (wall)':>15} {'steps/s (CPU)':>14}")
    for name in ("old", "new"):
        wall, cpu = best[name]
        print(f"{name:<5} {steps / wall:15.2f} {steps / cpu:14.2f}")
    print(f"new/old: {best['old'][0] / best['new'][0]:.3f}x wall, {best['old'][1] / best['new'][1]:.3f}x CPU")
    # the augmentation alone (one batch, --reps times), where the per-sample crops cost most
    x = data.x[:args.batch_size]
    times = {}
    for name, fn in (("old", old_augment_batch), ("new", augment_batch)):
        for _ in range(args.rounds):
            gen = torch.Generator().manual_seed(0)
            sync(device)
            start = clock()
            for _ in range(args.reps):
                fn(x, cfg.pad, True, gen)
            sync(device)
            times[name] = min(times.get(name, math.inf), since(start)[0] / args.reps)
    print(f"augmentation of one batch ({args.batch_size} images, pad {cfg.pad}, flips): old {times['old'] * 1e3:.3f} ms, "
          f"new {times['new'] * 1e3:.3f} ms, {times['old'] / times['new']:.1f}x")


if __name__ == "__main__":
    main()
