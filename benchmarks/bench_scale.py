"""`lt surface` on 1 process against 2 (or more) under torchrun, one thread each, on one machine.

Builds a small zoo checkpoint and a tensors data file in a temporary folder, runs the same
`lt surface` command line once as a plain process and once per process count under
``python -m torch.distributed.run``, checks that the results are equal, and prints wall times
(whole command, process start-up included) and the speed-up.  The points are shared like
``--shard RANK/WORLD``, so the compute part scales with the number of processes; what does not is
start-up (importing torch, loading the model and data: once per rank, in parallel) and the merge
on rank 0.

    python benchmarks/bench_scale.py [--procs 2] [--side 15] [--samples 256] [--width 8] [--repeat 1]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from landscape_tools import store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.data import save_tensors
from landscape_tools.models import build_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    ap.add_argument("--side", type=int, default=15, help="grid side (side x side points)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (best is reported)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        m = build_model("resnet_dnn_18", width=args.width, num_classes=10, in_channels=3)
        save_checkpoint(root / "m.pt", m, "resnet_dnn_18", m.arch_kwargs, {})
        rng = np.random.default_rng(0)
        save_tensors(root / "d.npz", x=rng.normal(size=(args.samples, 3, 16, 16)).astype(np.float32),
                     y=rng.integers(0, 10, args.samples))
        surface = ["surface", "m.pt", "--data", "tensors:d.npz", "--batch-size", "128", "--device", "cpu"]
        n_points = args.side ** 2
        print(f"lt surface: resnet_dnn_18 width {args.width} ({sum(p.numel() for p in m.parameters()):,} "
              f"parameters), {args.samples} samples 3x16x16, {n_points} points, 1 thread per process, "
              f"{os.cpu_count()} CPU cores")

        def run(procs: int, out: str, side: int = args.side) -> float:
            grid = ["--x", f"-1:1:{side}", "--y", f"-1:1:{side}"]
            if procs == 1:
                cmd = [sys.executable, "-m", "landscape_tools.cli.main", *surface, *grid, "-o", out]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                       "-m", "landscape_tools.cli.main", *surface, *grid, "-o", out]
            best = float("inf")
            for _ in range(args.repeat):
                (root / out).unlink(missing_ok=True)
                best = min(best, timed(cmd, root))
            return best

        # fixed cost (start-up, loading, rendezvous, merge): the same command on a 2 x 2 grid
        base, base_fixed = run(1, "p1.h5"), run(1, "f1.h5", side=2)
        ref = store.read_result(root / "p1.h5").models["m"].data["loss"]
        print(f"  {'processes':>9}  {'wall':>8}  {'fixed':>7}  {'wall - fixed':>12}  speed-up (wall / points only)")
        print(f"  {1:>9}  {base:7.2f}s  {base_fixed:6.2f}s  {base - base_fixed:11.2f}s")
        for procs in args.procs:
            wall, fixed = run(procs, f"p{procs}.h5"), run(procs, f"f{procs}.h5", side=2)
            loss = store.read_result(root / f"p{procs}.h5").models["m"].data["loss"]
            same = np.allclose(loss, ref, rtol=1e-6, atol=0)
            print(f"  {procs:>9}  {wall:7.2f}s  {fixed:6.2f}s  {wall - fixed:11.2f}s  {base / wall:.2f}x / "
                  f"{(base - base_fixed) / max(wall - fixed, 1e-9):.2f}x (ideal {procs}x)"
                  f"{'' if same else '  RESULTS DIFFER'}")
            if not same:
                sys.exit(1)


if __name__ == "__main__":
    main()
