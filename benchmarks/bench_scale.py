"""`lt surface`, `lt hessian --scope batch`, `lt featvar` and `lt evaluate` on 1 process against 2 (or
more) under torchrun, one thread each, on one machine: the run engine splits each analysis' units
(grid points, batches) over the ranks, which write rank files that rank 0 merges.

Builds a small zoo checkpoint and a tensors data file in a temporary folder, runs the same
command line once as a plain process and once per process count under
``python -m torch.distributed.run``, checks that the results are equal, and prints wall times
(whole command, process start-up included) and the speed-up.  The points are shared like
``--shard RANK/WORLD`` and the hessian's batches every WORLD-th, so the compute part scales with the
number of processes; what does not is start-up (importing torch, loading the model and data: once
per rank, in parallel) and the merge on rank 0, measured as the same command on a tiny job.  The
"units" column is each process's share of the work (the engine's interleaved split).

    python benchmarks/bench_scale.py [--procs 2] [--side 9] [--samples 128] [--width 4] [--batches 4]
                                     [--mc 8] [--mc-samples 512] [--only surface|hessian|featvar|evaluate]
                                     [--repeat 1]
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
    ap.add_argument("--side", type=int, default=9, help="surface grid side (side x side points)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4, help="hessian: batches of --hessian-batch-size samples")
    ap.add_argument("--hessian-batch-size", type=int, default=32)
    ap.add_argument("--mc", type=int, default=8, help="featvar / evaluate: MC samples (batches of 32)")
    ap.add_argument("--mc-samples", type=int, default=512, help="featvar / evaluate: data samples (batches of 32)")
    ap.add_argument("--only", choices=["surface", "hessian", "featvar", "evaluate"], default=None,
                    help="run one of the four")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (best is reported)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        m = build_model("resnet_dnn_18", width=args.width, num_classes=10, in_channels=3)
        save_checkpoint(root / "m.pt", m, "resnet_dnn_18", m.arch_kwargs, {})
        mc = build_model("resnet_mcdo_18", width=args.width, num_classes=10, in_channels=3)
        save_checkpoint(root / "mc.pt", mc, "resnet_mcdo_18", mc.arch_kwargs, {})
        n_params = sum(p.numel() for p in m.parameters())
        rng = np.random.default_rng(0)
        samples = max(args.samples, args.batches * args.hessian_batch_size, args.mc_samples)
        save_tensors(root / "d.npz", x=rng.normal(size=(samples, 3, 16, 16)).astype(np.float32),
                     y=rng.integers(0, 10, samples))
        common = ["m.pt", "--data", "tensors:d.npz", "--device", "cpu"]

        def run(procs: int, words: list[str], out: str) -> float:
            if procs == 1:
                cmd = [sys.executable, "-m", "landscape_tools.cli.main", *words, "-o", out]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                       "-m", "landscape_tools.cli.main", *words, "-o", out]
            best = float("inf")
            for _ in range(args.repeat):
                (root / out).unlink(missing_ok=True)
                best = min(best, timed(cmd, root))
            return best

        def compare(name: str, full: list[str], fixed: list[str], key: str, rtol: float, units: int) -> None:
            """1 process against each count: the full job, and the fixed cost (start-up, loading,
            rendezvous, merge) measured as the same command on a tiny job; ``units`` of work in all."""
            base, base_fixed = run(1, full, f"{name}1.h5"), run(1, fixed, f"{name}f1.h5")
            ref = next(iter(store.read_result(root / f"{name}1.h5").models.values())).data[key]
            print(f"  {'processes':>9}  {'units':>9}  {'wall':>8}  {'fixed':>7}  {'wall - fixed':>12}  "
                  f"speed-up (wall / work only)")
            print(f"  {1:>9}  {units:>9}  {base:7.2f}s  {base_fixed:6.2f}s  {base - base_fixed:11.2f}s")
            for procs in args.procs:
                wall, cost = run(procs, full, f"{name}{procs}.h5"), run(procs, fixed, f"{name}f{procs}.h5")
                got = next(iter(store.read_result(root / f"{name}{procs}.h5").models.values())).data[key]
                same = np.allclose(got, ref, rtol=rtol, atol=0, equal_nan=True)
                share = "/".join(str(len(range(r, units, procs))) for r in range(procs))
                work = (f"{(base - base_fixed) / (wall - cost):.2f}x" if wall > cost and base > base_fixed
                        else "n/a (noise larger than the work)")
                print(f"  {procs:>9}  {share:>9}  {wall:7.2f}s  {cost:6.2f}s  {wall - cost:11.2f}s  {base / wall:.2f}x / "
                      f"{work} (ideal {procs}x)"
                      f"{'' if same else '  RESULTS DIFFER'}")
                if not same:
                    sys.exit(1)

        if args.only in (None, "surface"):
            surface = ["surface", *common, "--batch-size", "128"]
            print(f"lt surface: resnet_dnn_18 width {args.width} ({n_params:,} parameters), {args.samples} samples "
                  f"3x16x16, {args.side ** 2} points, 1 thread per process, {os.cpu_count()} CPU cores")
            compare("s", [*surface, "--samples", str(args.samples), "--x", f"-1:1:{args.side}", "--y",
                          f"-1:1:{args.side}"],
                    [*surface, "--samples", str(args.samples), "--x", "-1:1:2", "--y", "-1:1:2"], "loss", 1e-6,
                    args.side ** 2)
        if args.only in (None, "hessian"):
            hessian = ["hessian", *common, "--batch-size", str(args.hessian_batch_size), "--top-k", "5"]
            print(f"lt hessian --scope batch: the same model, top-5 of each of {args.batches} batches of "
                  f"{args.hessian_batch_size} samples, 1 thread per process")
            # the fixed cost: one batch per process
            compare("h", [*hessian, "--batches", str(args.batches)],
                    [*hessian, "--batches", str(max(args.procs))], "eigenvalues", 1e-6, args.batches)
        n_batches = -(-args.mc_samples // 32)
        if args.only in (None, "featvar"):
            featvar = ["featvar", *common, "--split", "train", "--batch-size", "32", "--mc", str(args.mc)]
            print(f"lt featvar: the same model, {args.mc} MC samples (input noise 0.1) of {args.mc_samples} samples in "
                  f"{n_batches} batches of 32, 1 thread per process")
            compare("f", [*featvar, "--samples", str(args.mc_samples), "--source", "noise:0.1"],
                    [*featvar, "--samples", str(32 * max(args.procs)), "--source", "noise:0.1"], "variance", 0, n_batches)
        if args.only in (None, "evaluate"):
            sizes = ",".join(str(n) for n in (1, 2, 4, 8, 16, 32) if n <= args.mc)
            evaluate = ["evaluate", "mc.pt", "--data", "tensors:d.npz", "--device", "cpu", "--split", "train",
                        "--batch-size", "32", "--mc", sizes]
            print(f"lt evaluate: resnet_mcdo_18 width {args.width}, N = {sizes} of {args.mc_samples} samples in "
                  f"{n_batches} batches of 32, 1 thread per process")
            compare("e", [*evaluate, "--samples", str(args.mc_samples)],
                    [*evaluate, "--samples", str(32 * max(args.procs))], "nll", 0, n_batches)


if __name__ == "__main__":
    main()
