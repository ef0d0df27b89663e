"""`lt surface` against the forward-pass floor and a loss-landscape-style loop, in one run.

(a) floor: one forward pass over the evaluation data (best of 3) x number of points;
(b) loss-landscape style: per point, a deepcopy of the model, the directions read back from an HDF5
    file, weights set, and a torch DataLoader over a Dataset decoding uint8 images with per-sample
    transforms (to float, /255, normalise);
(c) ours: :func:`landscape_tools.surface.surface` (data on the device once, weights in place);
(c') with ``--compile`` and/or ``--precision bf16|fp16``: the same with torch.compile / autocast (the
    one-off compilation is timed separately, on a 1-point warm-up, and left out of the rounds).
``--transforms torchvision`` makes (b) decode like loss-landscape's CIFAR loader: a Dataset whose
``__getitem__`` does ``PIL.Image.fromarray`` then ``transforms.Compose([ToTensor(), Normalize(mean, std)])``.
Targets: (c) <= 1.25 x (a) and (b) / (c) >= 3.  Then peak memory of (c) for a small and a larger
grid (tracemalloc peak of Python allocations, growth of the process RSS high-water mark and, on
CUDA, torch.cuda.max_memory_allocated): it must not grow with the number of points.

    python benchmarks/bench_surface.py [--side 3] [--samples 1024] [--width 16] [--device auto] [--threads N]
        [--compile] [--precision fp32|bf16|fp16] [--transforms builtin|torchvision]
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
import tracemalloc

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from landscape_tools.data import DataSet
from landscape_tools.device import resolve_device
from landscape_tools.models import build_model, mc_dropout
from landscape_tools.surface import random_directions, surface

MEAN, STD = np.array([0.4914, 0.4822, 0.4465], np.float32), np.array([0.2470, 0.2435, 0.2616], np.float32)


class DecodingDataset(torch.utils.data.Dataset):
    """uint8 HWC images, decoded and normalised one sample at a time (torchvision ToTensor + Normalize)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div(255.0)
        img = (img - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]
        return img, int(self.labels[i])


class TorchvisionDataset(torch.utils.data.Dataset):
    """loss-landscape's CIFAR path: uint8 HWC -> PIL image -> ToTensor -> Normalize, per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from PIL import Image
        from torchvision import transforms

        self.images, self.labels, self.image = images, labels, Image
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize(MEAN.tolist(), STD.tolist())])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.image.fromarray(self.images[i])), int(self.labels[i])


DATASETS = {"builtin": DecodingDataset, "torchvision": TorchvisionDataset}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_floor(model, data, device, repeats=3):
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            sync(device)
            t = time.perf_counter()
            for bx, by in data.batches():
                F.cross_entropy(model(bx), by, reduction="sum")
            sync(device)
            times.append(time.perf_counter() - t)
    return min(times[1:])


def landscape_style(model, images, labels, direction_file, coords, device, batch_size, dataset=DecodingDataset):
    """What loss-landscape does per point: copy, read directions, set weights, re-read the data."""
    losses = []
    loader = torch.utils.data.DataLoader(dataset(images, labels), batch_size=batch_size, shuffle=False,
                                         num_workers=0)
    for a, b in coords:
        net = copy.deepcopy(model).cpu()
        with h5py.File(direction_file, "r") as f:
            dx = [torch.from_numpy(f["x"][name][()]) for name, _ in net.named_parameters()]
            dy = [torch.from_numpy(f["y"][name][()]) for name, _ in net.named_parameters()]
        with torch.no_grad():
            for p, u, v in zip(net.parameters(), dx, dy):
                p.add_(a * u + b * v)
        net = net.to(device).eval()
        total, n = 0.0, 0
        with torch.no_grad(), mc_dropout(net, False):
            for bx, by in loader:
                bx, by = bx.to(device), by.to(device)
                total += F.cross_entropy(net(bx), by, reduction="sum").item()
                n += len(by)
        losses.append(total / n)
    return losses


def grid(side):
    xs = np.linspace(-1, 1, side)
    return xs, xs.copy(), [(float(a), float(b)) for a in xs for b in xs]


def rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=3, help="grid side for the timing (side x side points)")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--arch", default="resnet_dnn_18")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--memory-sides", default="3,7", help="grid sides compared for peak memory")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (the minimum of each method is reported)")
    ap.add_argument("--compile", action="store_true", help="add a row (c') with lt surface --compile")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="add a row (c') with lt surface --precision (bf16/fp16)")
    ap.add_argument("--transforms", choices=sorted(DATASETS), default="builtin",
                    help="(b)'s per-sample decoding: builtin tensor ops or the torchvision PIL pipeline")
    args = ap.parse_args(argv)
    variant = args.compile or args.precision != "fp32"
    label = " ".join(([f"--precision {args.precision}"] if args.precision != "fp32" else [])
                     + (["--compile"] if args.compile else []))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, width=args.width).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.samples)
    x = torch.stack([DecodingDataset(images, labels)[i][0] for i in range(args.samples)])
    data = DataSet(x.to(device), torch.as_tensor(labels).to(device), "bench", "train", 10, args.batch_size)
    d = random_directions(model, 2, seed=0)
    xs, ys, coords = grid(args.side)
    print(f"{args.arch} width {args.width} ({n_params:,} parameters), {args.samples} CIFAR-shaped samples, "
          f"batch {args.batch_size}, {len(coords)} points, device {device}, torch threads {torch.get_num_threads()}, "
          f"best of {args.rounds} rounds; (b) decodes with {args.transforms} transforms")

    with tempfile.TemporaryDirectory() as tmp:
        dfile = os.path.join(tmp, "directions.h5")
        with h5py.File(dfile, "w") as f:
            for axis, vec in (("x", d.x), ("y", d.y)):
                g = f.create_group(axis)
                for name, t in vec.items():
                    g.create_dataset(name, data=t.numpy())
        t_warm = None
        if variant:   # the one-off compilation (and autocast's first use), outside the rounds
            sync(device)
            t = time.perf_counter()
            surface(model, data, d, xs[:1], ys[:1], precision=args.precision, compile=args.compile)
            sync(device)
            t_warm = time.perf_counter() - t
        # rounds of (a), (b), (c) [, (c')] in turn; the minimum of each is robust to other processes' load
        t_a = t_b = t_c = t_v = float("inf")
        for _ in range(args.rounds):
            t_a = min(t_a, forward_floor(model, data, device) * len(coords))
            sync(device)
            t = time.perf_counter()
            ref = landscape_style(model, images, labels, dfile, coords, device, args.batch_size,
                                  DATASETS[args.transforms])
            sync(device)
            t_b = min(t_b, time.perf_counter() - t)
            t = time.perf_counter()
            res = surface(model, data, d, xs, ys)
            sync(device)
            t_c = min(t_c, time.perf_counter() - t)
            if variant:
                t = time.perf_counter()
                res_v = surface(model, data, d, xs, ys, precision=args.precision, compile=args.compile)
                sync(device)
                t_v = min(t_v, time.perf_counter() - t)
    diff = float(np.max(np.abs(res["loss"].reshape(-1) - np.array(ref))))

    print()
    print("| method | total s | per point ms | vs floor |")
    print("|---|---|---|---|")
    rows = [("(a) forward-pass floor", t_a), ("(b) loss-landscape style", t_b), ("(c) lt surface", t_c)]
    if variant:
        rows.append((f"(c') lt surface {label}", t_v))
    for name, tt in rows:
        print(f"| {name} | {tt:.2f} | {1000 * tt / len(coords):.1f} | {tt / t_a:.2f}x |")
    print()
    ok_floor, ok_speedup = t_c <= 1.25 * t_a, t_b / t_c >= 3
    print(f"(c)/(a) = {t_c / t_a:.3f} (target <= 1.25: {'met' if ok_floor else 'NOT met'}); "
          f"(b)/(c) = {t_b / t_c:.2f} (target >= 3: {'met' if ok_speedup else 'NOT met'})")
    print(f"max |loss (b) - loss (c)| over the grid = {diff:.2e} (same points, same weights)")
    if variant:
        diff_v = float(np.max(np.abs(res_v["loss"] - res["loss"])))
        print(f"(c')/(a) = {t_v / t_a:.3f}; (b)/(c') = {t_b / t_v:.2f}; (c)/(c') = {t_c / t_v:.2f} "
              f"(speed-up of {label} over plain lt surface)")
        print(f"one-off warm-up of (c') (compilation, 1 point): {t_warm:.2f} s; "
              f"max |loss (c') - loss (c)| = {diff_v:.2e}")

    print()
    print("| grid | points | tracemalloc peak MB | RSS high-water growth MB | CUDA peak MB |")
    print("|---|---|---|---|---|")
    for side in (int(s) for s in args.memory_sides.split(",")):
        xs, ys, coords = grid(side)
        before = rss_peak_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tracemalloc.start()
        surface(model, data, d, xs, ys)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        cuda = f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f}" if device.type == "cuda" else "-"
        print(f"| {side}x{side} | {len(coords)} | {peak / 2**20:.2f} | {rss_peak_mb() - before:.1f} | {cuda} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
