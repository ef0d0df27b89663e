"""Streamed data against data held whole on the device (issue #18 item 7): one pass over an image folder.

Writes --images random RGB PNGs of --size pixels into a temporary ImageFolder (two classes), then times,
best of --rounds:
  load    ``load_data`` with the default budget: every image decoded and put on the device as one tensor;
  memory  one pass over the in-memory batches (slices of that tensor);
  stream  one pass over the streamed batches (``--data-memory 0``) with 0 and with --workers DataLoader
          workers: decoding, (pinned) copy, normalisation on the device.
Every streamed batch is checked equal to the in-memory one. On a GPU add ``--device cuda``.

    python benchmarks/bench_streaming.py [--images 2048] [--size 32] [--batch-size 256] [--workers 4]
        [--rounds 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from landscape_tools.data import load_data
from landscape_tools.device import resolve_device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.images):
            cls = root / "train" / ("a" if i % 2 else "b")
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(cls / f"{i:06d}.png")
        spec = f"imagefolder:{root}"

        def timed(fn):
            best = float("inf")
            for _ in range(args.rounds):
                _sync(device)
                start = time.perf_counter()
                out = fn()
                _sync(device)
                best = min(best, time.perf_counter() - start)
            return best, out

        os.environ["LT_DATA_WORKERS"] = str(args.workers)
        t_load, whole = timed(lambda: load_data(spec, batch_size=args.batch_size, device=device))
        t_mem, _ = timed(lambda: [float(x.sum()) for x, _ in whole.batches()])
        rows = [("load whole (decode + copy)", t_load), ("pass, in memory", t_mem)]
        for workers in (0, args.workers):
            os.environ["LT_DATA_WORKERS"] = str(workers)
            ds = load_data(spec, batch_size=args.batch_size, device=device, memory=0)
            t, sums = timed(lambda: [float(x.sum()) for x, _ in ds.batches()])
            for (x, _), (wx, _) in zip(ds.batches(), whole.batches()):
                assert torch.equal(x, wx), "a streamed batch differs from the in-memory one"
            ds.close()
            rows.append((f"pass, streamed, {workers} workers", t))
    mib = args.images * 3 * args.size * args.size * 4 / 2 ** 20
    print(f"{args.images} PNGs of {args.size}x{args.size} ({mib:.1f} MiB decoded), batch {args.batch_size}, "
          f"{device}, best of {args.rounds}")
    for name, t in rows:
        print(f"  {name:32s} {t:8.3f} s  {args.images / t:9.0f} images/s")


if __name__ == "__main__":
    main()
