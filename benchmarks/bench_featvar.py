"""`lt featvar --mc N` against the plain loop of N forward passes, same model and data.

Timing (default), in one process, runs interleaved round by round, best of --rounds:
plain: per batch, ``--mc`` forward passes with MC dropout on (torch's own unseeded dropout), nothing
       else -- the least work the statistic needs;
loop:  the same passes with the stage outputs hooked and stacked, ``torch.var(unbiased=True)`` over the
       stack (a straightforward reference implementation);
lt:    `lt featvar` started as a user starts it (the click command, in this process): checkpoint and
       data loaded, each batch repeated once per MC sample and run as batched forward passes of at
       most ``--max-batch`` rows, statistics streamed in float64, the HDF5 file written; once per
       value of --max-batch (``default`` leaves the option out).
Both the wall-clock time and the process's CPU time are kept (with --threads 1 the CPU time is the
steadier figure on a shared machine).  Every lt run must give the same variances to 1e-6 (the
numbers do not depend on --max-batch).

Memory (``--memory``): ``feature_variance`` and the loop each in a fresh subprocess (glibc told to
serve large blocks by mmap, so freed memory leaves the RSS), so its peak resident memory (VmHWM)
above the RSS after setup and warm-up is its own.

    python benchmarks/bench_featvar.py [--mc 50] [--samples 256] [--max-batch default,64,512] [--threads 1]
    python benchmarks/bench_featvar.py --memory [--mc 8,32] [--samples 256]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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




def timing(args) -> None:
    import numpy as np
    import torch

    from _timing import best_of, clock, run_lt, since  # benchmarks/ is on sys.path
    from landscape_tools import store
    from landscape_tools.checkpoints import save_checkpoint
    from landscape_tools.data import save_tensors
    from landscape_tools.models import build_model, mc_dropout

    if args.threads:
        torch.set_num_threads(args.threads)
    mc = int(args.mc)
    caps = [v.strip() for v in args.max_batch.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_featvar_")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.samples)
    data = os.path.join(tmp, "data.npz")
    save_tensors(data, x=x, y=y, x_test=x, y_test=y)
    torch.manual_seed(0)
    model = build_model(args.arch, width=args.width)
    ckpt = os.path.join(tmp, "model.pt")
    save_checkpoint(ckpt, model, args.arch, model.arch_kwargs, {})
    model.eval()
    xt = torch.from_numpy(x)
    batches = [xt[i:i + args.batch_size] for i in range(0, args.samples, args.batch_size)]
    layers = list(model.zoo_spec.stages)
    modules = dict(model.named_modules())

    def plain():
        with torch.no_grad(), mc_dropout(model, True):
            for xb in batches:
                for _ in range(mc):
                    model(xb)

    def loop():
        sums, counts = {n: 0.0 for n in layers}, {n: 0 for n in layers}
        for xb in batches:
            outs = {n: [] for n in layers}
            handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs[n].append(o)) for n in layers]
            try:
                with torch.no_grad(), mc_dropout(model, True):
                    for _ in range(mc):
                        model(xb)
            finally:
                for h in handles:
                    h.remove()
            for n in layers:
                var = torch.stack(outs[n]).double().var(dim=0, unbiased=True)
                sums[n] += float(var.sum())
                counts[n] += var.numel()
        return [sums[n] / counts[n] for n in layers]

    def lt_args(cap, out):
        extra = [] if cap == "default" else ["--max-batch", cap]
        return ["featvar", ckpt, "--data", f"tensors:{data}", "--mc", str(mc), "--batch-size", str(args.batch_size),
                "-o", out, "--overwrite"] + extra

    print(f"{args.arch} width {args.width}, {args.samples} samples of 3x32x32, batch {args.batch_size}, --mc {mc}, "
          f"stage outputs, {torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds")
    with torch.no_grad(), mc_dropout(model, True):
        model(xt[:8])                                                   # warm-up
    run_lt(lt_args(caps[0], os.path.join(tmp, "warm.h5")))
    inf = (float("inf"), float("inf"))
    best = {"plain": inf, "loop": inf, **{c: inf for c in caps}}
    reference = None
    for _ in range(args.rounds):
        start = clock()
        plain()
        best["plain"] = best_of(best["plain"], since(start))
        start = clock()
        reference = loop()
        best["loop"] = best_of(best["loop"], since(start))
        for cap in caps:
            best[cap] = best_of(best[cap], run_lt(lt_args(cap, os.path.join(tmp, f"fv_{cap}.h5"))))
    got = {cap: store.read_result(os.path.join(tmp, f"fv_{cap}.h5")).models["model"]["variance"] for cap in caps}
    first = got[caps[0]]
    for cap, values in got.items():
        np.testing.assert_allclose(values, first, rtol=1e-6, err_msg=f"--max-batch {cap}")
    floor = best["plain"]

    def row(label, t, text=""):
        print(f"{label:>27} {t[0]:>8.2f} {t[0] / floor[0]:>8.2f} {t[1]:>8.2f} {t[1] / floor[1]:>8.2f}   {text}")
    print(f"{'run':>27} {'wall s':>8} {'x plain':>8} {'CPU s':>8} {'x plain':>8}   variance per stage")
    row(f"plain loop ({mc} passes)", floor)
    row("hooks + torch.var loop", best["loop"], " ".join(f"{v:.3g}" for v in reference) + "  (its own masks)")
    for cap in caps:
        row("lt featvar" + ("" if cap == "default" else f" --max-batch {cap}"), best[cap],
            " ".join(f"{v:.3g}" for v in got[cap]))


def memory(args) -> None:
    print(f"{args.arch} width {args.width}, {args.samples} samples of 3x32x32, batch {args.batch_size}, "
          f"max batch {args.max_batch}, {args.threads} threads; stage outputs")
    print(f"{'mc':>4} {'method':>6} {'seconds':>9} {'peak MiB':>9} {'speed-up':>9}   variance per stage")
    rows = {}
    for mc in [int(v) for v in args.mc.split(",")]:
        for method in ("loop", "ours"):
            cmd = [sys.executable, __file__, "--method", method, "--mc", str(mc)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("method", "mc", "memory", "rounds")]
            # large blocks straight from mmap, so freed memory leaves RSS and the peak is the live peak
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env=env).stdout.strip().splitlines()[-1]
            rows[(mc, method)] = r = json.loads(out)
            speed = f"{rows[(mc, 'loop')]['seconds'] / r['seconds']:.2f}x" if method == "ours" else ""
            print(f"{mc:>4} {method:>6} {r['seconds']:>9.1f} {r['peak_mib']:>9.0f} {speed:>9}   "
                  + " ".join(f"{v:.3g}" for v in r["variance"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet_mcdo_smoothing_18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="lt featvar's default")
    parser.add_argument("--max-batch", default=None,
                        help="timing: comma-separated --max-batch values ('default' leaves the option out; "
                             "default: default,64,512); --memory: one number (default 512)")
    parser.add_argument("--mc", default=None, help="timing: one number (default 50); --memory: a list (default 8,32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --memory: 2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="peak memory of ours and the loop, a subprocess each")
    parser.add_argument("--method", choices=["ours", "loop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        args.mc, args.max_batch = int(args.mc), int(args.max_batch)
        print(json.dumps(worker(args)))
        return
    if args.memory:
        args.mc = args.mc or "8,32"
        args.max_batch = args.max_batch or "512"
        args.threads = args.threads or 2
        memory(args)
    else:
        args.mc = args.mc or "50"
        args.max_batch = args.max_batch or "default,64,512"
        timing(args)


if __name__ == "__main__":
    main()
