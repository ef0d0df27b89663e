"""`lt featvar`'s engine against the plain loop, same model and data, in one run.

ours: ``landscape_tools.featvar.feature_variance`` -- each batch repeated once per MC sample and run
      as one batched forward pass (chunks of ``--max-batch`` samples), statistics streamed in float64.
loop: ``--mc`` separate forward passes per batch with MC dropout on, hooked stage outputs stacked,
      ``torch.var(unbiased=True)`` over the stack.

Each measurement runs in a fresh subprocess (glibc told to serve large blocks by mmap, so freed
memory leaves the RSS), so its peak resident memory (VmHWM) above the RSS after setup and warm-up
is its own.  Run:  python benchmarks/bench_featvar.py [--samples 256]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(args) -> dict:
    import torch

    from landscape_tools import featvar
    from landscape_tools.models import build_model, mc_dropout

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.arch, width=args.width).eval()
    x = torch.randn(args.samples, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batches = [x[i:i + args.batch_size] for i in range(0, args.samples, args.batch_size)]
    layers = list(model.zoo_spec.stages)
    with torch.no_grad(), mc_dropout(model, True):
        model(x[:8])                                                   # warm-up
    base = rss_kib("VmRSS")
    start = time.perf_counter()
    if args.method == "ours":
        res = featvar.feature_variance(model, batches, mc=args.mc, layers="stages", seed=0, max_batch=args.max_batch)
        variance = res.variance.tolist()
    else:
        sums = {n: 0.0 for n in layers}
        counts = {n: 0 for n in layers}
        modules = dict(model.named_modules())
        for xb in batches:
            outs = {n: [] for n in layers}
            handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs[n].append(o)) for n in layers]
            try:
                with torch.no_grad(), mc_dropout(model, True):
                    for _ in range(args.mc):
                        model(xb)
            finally:
                for h in handles:
                    h.remove()
            for n in layers:
                var = torch.stack(outs[n]).double().var(dim=0, unbiased=True)
                sums[n] += float(var.sum())
                counts[n] += var.numel()
        variance = [sums[n] / counts[n] for n in layers]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (rss_kib("VmHWM") - base) / 1024, "variance": variance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet_mcdo_smoothing_18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="lt featvar's default")
    parser.add_argument("--max-batch", type=int, default=512, help="lt featvar's default on CPU")
    parser.add_argument("--mc", default="8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=["ours", "loop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        args.mc = int(args.mc)
        print(json.dumps(worker(args)))
        return
    print(f"{args.arch} width {args.width}, {args.samples} samples of 3x32x32, batch {args.batch_size}, "
          f"max batch {args.max_batch}, {args.threads} threads; stage outputs")
    print(f"{'mc':>4} {'method':>6} {'seconds':>9} {'peak MiB':>9} {'speed-up':>9}   variance per stage")
    rows = {}
    for mc in [int(v) for v in args.mc.split(",")]:
        for method in ("loop", "ours"):
            cmd = [sys.executable, __file__, "--method", method, "--mc", str(mc)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("method", "mc")]
            # large blocks straight from mmap, so freed memory leaves RSS and the peak is the live peak
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env=env).stdout.strip().splitlines()[-1]
            rows[(mc, method)] = r = json.loads(out)
            speed = f"{rows[(mc, 'loop')]['seconds'] / r['seconds']:.2f}x" if method == "ours" else ""
            print(f"{mc:>4} {method:>6} {r['seconds']:>9.1f} {r['peak_mib']:>9.0f} {speed:>9}   "
                  + " ".join(f"{v:.3g}" for v in r["variance"]), flush=True)


if __name__ == "__main__":
    main()
