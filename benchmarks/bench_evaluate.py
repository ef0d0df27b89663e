"""`lt evaluate --mc 1,2,5,10,20,50` against the plain loop of max(N) forward passes, in one process.

plain: per data batch, max(N) forward passes with MC dropout on (torch's own unseeded dropout), the
       softmax summed in float64 -- the least work the sweep needs, written as a user would.
lt:    `lt evaluate` started as a user starts it (the click command, in this process): checkpoint
       and data loaded, every N scored, the HDF5 file written.  Once per --max-batch value:
       ``default`` (MC samples stacked up to the device's default rows per pass) and each number
       given; ``--max-batch`` equal to --batch-size is one MC sample per forward pass, the engine as it
       was before MC samples were stacked.
The runs are interleaved round by round and the best of --rounds is kept, both of the wall-clock time
and of the process's CPU time (with --threads 1 the CPU time is the steadier figure on a shared
machine: it leaves out the time spent waiting for a core); every lt run must give the same curve to
1e-6 (the numbers do not depend on --max-batch).

    python benchmarks/bench_evaluate.py [--width 16] [--samples 256] [--batch-size 256] [--mc 1,2,5,10,20,50]
        [--max-batch default,256] [--threads 1] [--rounds 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

from _timing import best_of, clock, run_lt, since  # noqa: E402 (benchmarks/ is on sys.path)
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.data import save_tensors
from landscape_tools.device import resolve_device
from landscape_tools.models import build_model, mc_dropout


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model, batches, passes, device):
    """max(N) forward passes per batch, MC dropout on, probabilities summed: returns the N = passes NLL."""
    nll, n = 0.0, 0
    with torch.no_grad(), mc_dropout(model, True):
        for x, y in batches:
            running = None
            for _ in range(passes):
                p = torch.softmax(model(x).double(), dim=1)
                running = p if running is None else running + p
            p_true = (running / passes)[torch.arange(len(y), device=device), y]
            nll -= float(torch.log(p_true.clamp_min(1e-12)).sum())
            n += len(y)
    sync(device)
    return nll / n




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet_mcdo_18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256, help="lt evaluate's default")
    parser.add_argument("--mc", default="1,2,5,10,20,50")
    parser.add_argument("--max-batch", default="default,256",
                        help="comma-separated --max-batch values to time; 'default' leaves the option out")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = sorted({int(v) for v in args.mc.split(",")})
    passes = max(sizes)
    caps = [v.strip() for v in args.max_batch.split(",")]

    tmp = tempfile.mkdtemp(prefix="bench_evaluate_")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.samples)
    data = os.path.join(tmp, "data.npz")
    save_tensors(data, x=x, y=y, x_test=x, y_test=y)
    torch.manual_seed(0)
    model = build_model(args.arch, width=args.width)
    ckpt = os.path.join(tmp, "model.pt")
    save_checkpoint(ckpt, model, args.arch, model.arch_kwargs, {})
    model = model.to(device).eval()
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    batches = [(xt[i:i + args.batch_size], yt[i:i + args.batch_size]) for i in range(0, args.samples, args.batch_size)]

    def lt_args(cap, out):
        extra = [] if cap == "default" else ["--max-batch", cap]
        return (["evaluate", ckpt, "--data", f"tensors:{data}", "--mc", ",".join(map(str, sizes)), "--batch-size",
                 str(args.batch_size), "--device", str(device), "-o", out, "--overwrite"] + extra)

    print(f"{args.arch} width {args.width}, {args.samples} samples of 3x32x32, batch {args.batch_size}, "
          f"N = {','.join(map(str, sizes))} ({passes} MC samples per batch), {device}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds")
    plain_loop(model, batches[:1], 1, device)                      # warm-up
    run_lt(lt_args(caps[0], os.path.join(tmp, "warm.h5")))
    inf = (float("inf"), float("inf"))
    best = {"plain": inf, **{c: inf for c in caps}}
    plain_nll = None
    for _ in range(args.rounds):
        start = clock()
        plain_nll = plain_loop(model, batches, passes, device)
        best["plain"] = best_of(best["plain"], since(start))
        for cap in caps:
            best[cap] = best_of(best[cap], run_lt(lt_args(cap, os.path.join(tmp, f"eval_{cap}.h5"))))

    from landscape_tools import store
    curves = {cap: store.read_result(os.path.join(tmp, f"eval_{cap}.h5")) for cap in caps}
    ref = next(iter(curves.values())).models["model"]["nll"]
    for cap, result in curves.items():
        np.testing.assert_allclose(result.models["model"]["nll"], ref, rtol=1e-6, err_msg=f"--max-batch {cap}")
    floor = best["plain"]

    def row(label, t, nll):
        print(f"{label:>28} {t[0]:>8.2f} {t[0] / floor[0]:>8.2f} {t[1]:>8.2f} {t[1] / floor[1]:>8.2f}   "
              f"NLL(N={passes}) {nll:.4f}")
    print(f"{'run':>28} {'wall s':>8} {'x plain':>8} {'CPU s':>8} {'x plain':>8}")
    row(f"plain loop ({passes} passes)", floor, plain_nll)
    for cap in caps:
        row("lt evaluate" + ("" if cap == "default" else f" --max-batch {cap}"), best[cap], float(ref[-1]))


if __name__ == "__main__":
    main()
