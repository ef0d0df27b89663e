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

(d) through the CLI (``--cli-points P``, 0 skips it; ``--cli-only`` runs only this): the same model
saved as a checkpoint and the same samples as a tensors file, ``lt surface --dims 1 --x -1:1:P`` run
in this process (click's CliRunner, the code path of the command line) with ``--compile off`` and
``--compile on``.  The marginal cost of a grid point is the mean interval between consecutive
points' progress reports (everything the command does per point: weights, forward passes, loss,
progress, partial-file writes; the compilation happens before the first point and is left out), and
for ``off`` also (T(P points) - T(2 points)) / (P - 2) over whole invocations.  It is set against the
forward pass of the same batches by the model the same command line loads (mean of several; eager,
and ``torch.compile(dynamic=False)`` for ``on``), measured in turn with the CLI runs.  Wall time and
process CPU time are both given (with one torch thread, CPU time is what other processes on a shared
machine disturb least).  Targets: marginal point <= 1.1 x forward pass, in both modes.

    python benchmarks/bench_surface.py [--side 3] [--samples 1024] [--width 16] [--device auto] [--threads N]
        [--compile] [--precision fp32|bf16|fp16] [--transforms builtin|torchvision]
        [--cli-points 8] [--cli-rounds 2] [--cli-only]
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

from landscape_tools.checkpoints import load_checkpoint, save_checkpoint
from landscape_tools.data import DataSet, load_data, save_tensors
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


class Clocks:
    """Wall and process-CPU seconds."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self, start: "Clocks") -> tuple[float, float]:
        return self.wall - start.wall, self.cpu - start.cpu


def cli_marginal(args, arch_kwargs, model, images_x, labels, device, tmp):
    """(d): the marginal grid point of `lt surface` through the CLI against the forward pass."""
    from click.testing import CliRunner

    from landscape_tools.cli import common
    from landscape_tools.cli.main import cli

    ckpt, tensors = os.path.join(tmp, "model.pt"), os.path.join(tmp, "data.npz")
    save_checkpoint(ckpt, model, args.arch, arch_kwargs, {}, overwrite=True)
    save_tensors(tensors, x=images_x.cpu().numpy(), y=np.asarray(labels))
    loaded, _ = load_checkpoint(ckpt)                    # what the command line loads, the same way
    loaded = loaded.to(device).eval()
    data = load_data("tensors:" + tensors, batch_size=args.batch_size, device=device)
    compiled = torch.compile(loaded, dynamic=False)

    size = len(data.batches()[0][1])

    def forward(m):
        """One pass over the batches; compiled as `lt surface` runs it: a shorter last batch eagerly."""
        sync(device)
        start = Clocks()
        with torch.no_grad(), mc_dropout(loaded, False):
            for bx, by in data.batches():
                F.cross_entropy((m if len(bx) == size else loaded)(bx), by, reduction="sum")
        sync(device)
        return Clocks().since(start)

    # each point's progress report closes its interval; then one forward pass is timed (paired with that
    # point, so a change of load on a shared machine hits both alike) and the next interval starts after it
    intervals: list[tuple[float, float]] = []
    paired: list[tuple[float, float]] = []
    state: dict = {}
    original = common.ProgressBar

    class Stamped(original):
        def __call__(self, done, total, message=""):
            super().__call__(done, total, message)
            if done > 0:
                end = Clocks()
                if "start" in state:
                    intervals.append(end.since(state["start"]))
                    if state.get("pair") is not None:
                        paired.append(forward(state["pair"]))
                state["start"] = Clocks()

    def invoke(points, mode, pair=None):
        intervals.clear()
        paired.clear()
        state.clear()
        state["pair"] = pair
        out = os.path.join(tmp, f"cli-{mode}-{points}.h5")
        argv = ["surface", ckpt, "--data", "tensors:" + tensors, "--batch-size", str(args.batch_size), "--dims", "1",
                "--x", f"-1:1:{points}", "--compile", mode, "--device", str(device), "-o", out, "--overwrite"]
        start = Clocks()
        r = CliRunner().invoke(cli, argv, catch_exceptions=False)
        total = Clocks().since(start)
        if r.exit_code != 0:
            raise RuntimeError(r.output)
        return total, list(intervals), list(paired), out

    common.ProgressBar = Stamped
    try:
        P = args.cli_points
        print(f"\n(d) through the CLI: lt surface {os.path.basename(ckpt)} --dims 1 --x -1:1:{P} --batch-size "
              f"{args.batch_size} ({len(data)} samples, {len(data.batches())} batches), --compile off / on, "
              f"{args.cli_rounds} round(s); each point after the first is paired with a forward pass timed "
              f"right after it")
        t = time.perf_counter()
        forward(compiled)                                # the one-off compilation, outside the rounds
        print(f"one-off compilation of the forward pass: {time.perf_counter() - t:.1f} s")
        fwd = {"off": [], "on": []}
        gaps = {"off": [], "on": []}
        whole = {2: [], P: []}
        around = []
        outs = {}
        for _ in range(args.cli_rounds):
            for mode, m in (("off", loaded), ("on", compiled)):
                _, g, f, outs[mode] = invoke(P, mode, pair=m)
                gaps[mode] += g
                fwd[mode] += f
            around.append(forward(loaded))
            whole[2].append(invoke(2, "off")[0])
            whole[P].append(invoke(P, "off")[0])
            around.append(forward(loaded))
    finally:
        common.ProgressBar = original
    from landscape_tools import store
    diff = float(np.max(np.abs(store.read_result(outs["on"]).models["model"].data["loss"]
                               - store.read_result(outs["off"]).models["model"].data["loss"])))

    def mean(pairs, k):
        return float(np.mean([p[k] for p in pairs]))

    print()
    print("| --compile | forward pass ms (wall / CPU) | marginal point ms (wall / CPU) | ratio (wall / CPU) |")
    print("|---|---|---|---|")
    ratios = {}
    for mode in ("off", "on"):
        fw, fc, gw, gc = mean(fwd[mode], 0), mean(fwd[mode], 1), mean(gaps[mode], 0), mean(gaps[mode], 1)
        ratios[mode] = (gw / fw, gc / fc)
        print(f"| {mode} | {1e3 * fw:.1f} / {1e3 * fc:.1f} | {1e3 * gw:.1f} / {1e3 * gc:.1f} | "
              f"{gw / fw:.3f} / {gc / fc:.3f} |")
    dw = (mean(whole[P], 0) - mean(whole[2], 0)) / (P - 2)
    dc = (mean(whole[P], 1) - mean(whole[2], 1)) / (P - 2)
    print(f"--compile off by whole invocations, (T({P}) - T(2)) / {P - 2}: {1e3 * dw:.1f} ms wall "
          f"({dw / mean(around, 0):.3f}x the forward pass timed around them), {1e3 * dc:.1f} ms CPU "
          f"({dc / mean(around, 1):.3f}x)")
    print(f"compiled forward pass / eager forward pass: {mean(fwd['on'], 0) / mean(fwd['off'], 0):.3f} wall; "
          f"marginal point on / off: {mean(gaps['on'], 0) / mean(gaps['off'], 0):.3f} wall")
    ok = all(max(r) <= 1.1 for r in ratios.values())
    print(f"target: marginal point <= 1.1 x the forward pass in both modes: {'met' if ok else 'NOT met'}; "
          f"max |loss on - loss off| over the line = {diff:.2e}")


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
    ap.add_argument("--cli-points", type=int, default=8, help="(d): points of the CLI line (0: skip (d); >= 4)")
    ap.add_argument("--cli-rounds", type=int, default=2, help="(d): rounds of CLI runs and forward passes")
    ap.add_argument("--cli-only", action="store_true", help="run only (d)")
    args = ap.parse_args(argv)
    if args.cli_points and args.cli_points < 4:
        ap.error("--cli-points must be 0 (skip) or at least 4")
    variant = args.compile or args.precision != "fp32"
    label = " ".join(([f"--precision {args.precision}"] if args.precision != "fp32" else [])
                     + (["--compile"] if args.compile else []))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, width=args.width).to(device).eval()
    arch_kwargs = dict(model.arch_kwargs)
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

    if args.cli_only:
        with tempfile.TemporaryDirectory() as tmp:
            cli_marginal(args, arch_kwargs, model, x, labels, device, tmp)
        return 0

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
    if args.cli_points:
        with tempfile.TemporaryDirectory() as tmp:
            cli_marginal(args, arch_kwargs, model, x, labels, device, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
