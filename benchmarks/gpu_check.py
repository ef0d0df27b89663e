"""One-command GPU check: every analysis of `lt` on CUDA at sizes that say something, in a few minutes.

What runs (each stage is the `lt` command line itself, run in this process; the model is a randomly
initialised ``resnet_mcdo_18`` of width 64 with 100 classes, the data synthetic random CIFAR-shaped
3x32x32 images with random labels, written to a temporary ``tensors:`` file: nothing is downloaded):

* ``hessian``: top-5 eigenvalues of the loss Hessian on one batch of 128 (fp32 at the default ``--tol``;
  bf16 at ``--tol 5e-2``, as bf16 products cannot certify more), compared as sets (sorted);
* ``surface``: 3x3 warm-up grids (fp32, bf16), the 51x51 grid over [-1, 1]^2 on 2,048 samples (fp32,
  eager), and bf16 and ``--compile on`` on the 11x11 grid over [-1, 1]^2, whose points are every 5th
  point of the 51x51 grid in each direction (same seeded directions), compared with those points;
* ``featvar``: MC feature-map variance, ``--mc 32`` on 512 samples (fp32, bf16; ``lt featvar`` refuses
  ``--compile``: its per-batch hooks would not be seen by a compiled graph);
* ``evaluate``: ensemble sizes N = 1, 2, 5, 10, 20, 50 on 10,000 samples (fp32, bf16, ``--compile``);
* with 2 or more GPUs: ``evaluate`` again under ``torchrun --nproc-per-node 2`` (nccl), compared with
  the one-process fp32 file.

Each stage is timed on the wall clock between two ``torch.cuda.synchronize()`` calls (model and data
loading and the result file included: what a user waits for; compiled runs include their compilation),
with the CUDA peak-memory counter reset before it (``torch.cuda.reset_peak_memory_stats``) and read after
it (``max_memory_allocated`` less what was allocated when the stage began: the tensors PyTorch allocated
for the stage; the caching allocator's reserve and the CUDA context are not in it).  Before the first
stage a small conv net's forward and backward loads the CUDA context, cuBLAS and cuDNN (not timed).  Every bf16 / compiled / 2-rank result is compared with its fp32 one-process
result ("agreement": the largest difference relative to the largest fp32 magnitude, over the
eigenvalues, grid losses, per-layer variances or per-N NLLs) against a tolerance: bf16 5e-2 (Hessian
eigenvalues 1e-1), compiled 1e-4 (float32 with reordered sums), 2 ranks 1e-6.  The full-CIFAR projection
is the marginal cost of a grid point, ``(T(grid) - T(3x3 grid)) / (points - 9)`` of the same precision,
scaled to 50,000 training samples and 51 x 51 = 2,601 points (fp32 and bf16, eager).

The table goes to stdout and, as JSON, to ``--json`` (default ``gpu_check.json``); the exit status is 1
when an agreement is outside its tolerance.  ``--device cpu --tiny`` runs the same stages at toy sizes
(width 2, 16x16 images, 16 to 64 samples, 9x9 / 5x5 / 3x3 grids, --mc 4, N up to 4) on the CPU: the
test suite's run (with ``--compile-backend eager``: dynamo's tracing without inductor's C++ build).

    python benchmarks/gpu_check.py                       # on cuda:0; meant to take under 8 minutes (unmeasured)
    python benchmarks/gpu_check.py --device cuda:1 --json h200.json
    python benchmarks/gpu_check.py --device cpu --tiny --compile-backend eager   # seconds, no GPU
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

#: sizes of the full check and of --tiny
SIZES = {
    "full": dict(width=64, classes=100, image=32, hessian_batch=128, surface_samples=2048, grid=51, sub_grid=11,
                 featvar_samples=512, featvar_mc=32, evaluate_samples=10000, mc="1,2,5,10,20,50", test=10000),
    "tiny": dict(width=2, classes=10, image=16, hessian_batch=16, surface_samples=32, grid=9, sub_grid=5,
                 featvar_samples=16, featvar_mc=4, evaluate_samples=64, mc="1,2,4", test=64),
}
TOLERANCE = {"bf16": 5e-2, "bf16-hessian": 1e-1, "compiled": 1e-4, "2 ranks": 1e-6}
FULL_CIFAR_TRAIN = 50000
FULL_GRID = 51


@dataclass
class Row:
    analysis: str
    variant: str
    work: str
    seconds: float
    peak_mib: float | None
    agreement: float | None = None
    tolerance: float | None = None
    ok: bool | None = None
    note: str = ""


@dataclass
class Report:
    device: str
    card: str
    torch: str
    cuda: str | None
    tiny: bool
    rows: list = field(default_factory=list)
    projection: dict = field(default_factory=dict)
    total_seconds: float = 0.0


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, sm_{props.major}{props.minor})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()}"


def run_lt(args: list[str]) -> str:
    """`lt ARGS` in this process (the command line's code path); returns its stdout, raises on failure."""
    from landscape_tools.cli.main import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args], standalone_mode=False)
        except BaseException:
            sys.__stderr__.write(err.getvalue()[-4000:])
            raise
    return out.getvalue()


def timed(device: torch.device, fn) -> tuple[float, float | None]:
    """(wall seconds, peak MiB allocated on the CUDA device during ``fn()`` above what was allocated
    before it, or None on a CPU), synchronised on both ends.  Earlier stages' objects are freed first
    (garbage collection, torch.compile's caches, which hold compiled models' weights)."""
    import gc

    gc.collect()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, ((torch.cuda.max_memory_allocated(device) - before) / 2 ** 20 if cuda else None)


def warm_up(device: torch.device) -> None:
    """The CUDA context, cuBLAS and cuDNN loaded before the first timed stage (a small conv net's
    forward and backward); nothing on a CPU."""
    if device.type != "cuda":
        return
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 32 * 32, 10)).to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    net(x).sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.get_device_capability(device) >= (8, 0)):
        net(x)
    torch.cuda.synchronize(device)


def read(path: Path, analysis: str, sub: int | None = None) -> np.ndarray:
    """The numbers compared across variants: eigenvalues, grid losses (every ``sub``-th point of each
    axis when ``sub``), per-layer variances or per-N NLLs."""
    from landscape_tools import store

    node = next(iter(store.read_result(path).models.values()))
    key = {"hessian": "eigenvalues", "surface": "loss", "featvar": "variance", "evaluate": "nll"}[analysis]
    values = np.asarray(node.data[key], dtype=np.float64)
    if sub:
        values = values[::sub, ::sub]
    if analysis == "hessian":         # the top-5 as a set: close eigenvalues may swap places between variants
        values = np.sort(values, axis=-1)
    return values


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def hessian_note(path: Path) -> str:
    """How many of the top-5 converged, in how many Hessian-vector products."""
    from landscape_tools import store

    node = next(iter(store.read_result(path).models.values()))
    return f"{int(np.sum(node.data['converged']))}/5 converged, {int(node.data['hvp_count'][0])} products"


def agreement(values: np.ndarray, reference: np.ndarray) -> float:
    """max |values - reference| / max |reference| (shapes must match)."""
    if values.shape != reference.shape:
        raise SystemExit(f"gpu_check: shapes {values.shape} and {reference.shape} differ: the variants did not "
                         f"compute the same thing")
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(values - reference)) / scale)


def make_inputs(root: Path, s: dict, seed: int) -> tuple[Path, Path]:
    """A random ``resnet_mcdo_18`` checkpoint and a random CIFAR-shaped ``tensors:`` file."""
    from landscape_tools.checkpoints import save_checkpoint
    from landscape_tools.data import save_tensors
    from landscape_tools.models import build_model

    torch.manual_seed(seed)
    model = build_model("resnet_mcdo_18", width=s["width"], num_classes=s["classes"])
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, model, "resnet_mcdo_18", model.arch_kwargs, {})
    rng = np.random.default_rng(seed)
    n_train = max(s["hessian_batch"], s["surface_samples"])
    shape = (3, s["image"], s["image"])
    data = root / "data.npz"
    save_tensors(data, x=rng.normal(size=(n_train, *shape)).astype(np.float32),
                 y=rng.integers(0, s["classes"], n_train),
                 x_test=rng.normal(size=(s["test"], *shape)).astype(np.float32),
                 y_test=rng.integers(0, s["classes"], s["test"]))
    return ckpt, data


def stages(ckpt: Path, data: Path, s: dict, device: str, out: Path) -> list[dict]:
    """Every run of the check, in order: analysis, variant, `lt` arguments, output, reference variant."""
    spec = f"tensors:{data}"
    common = ["--data", spec, "--device", device, "--seed", "0"]
    g, sg = s["grid"], s["sub_grid"]
    grid = ["--x", f"-1:1:{g}", "--y", f"-1:1:{g}"]
    sub_grid = ["--x", f"-1:1:{sg}", "--y", f"-1:1:{sg}"]
    hess = ["hessian", ckpt, *common, "--split", "train", "--samples", s["hessian_batch"], "--batch-size",
            s["hessian_batch"], "--batches", "1", "--top-k", "5"]
    surf = ["surface", ckpt, *common, "--split", "train", "--samples", s["surface_samples"], "--batch-size", "512"]
    feat = ["featvar", ckpt, *common, "--mc", s["featvar_mc"], "--samples", s["featvar_samples"]]
    ev = ["evaluate", ckpt, *common, "--mc", s["mc"], "--samples", s["evaluate_samples"], "--batch-size", "500"]
    runs = [
        dict(analysis="hessian", variant="fp32", args=hess + ["--precision", "fp32"],
             work=f"top-5, one batch of {s['hessian_batch']}"),
        dict(analysis="hessian", variant="bf16", args=hess + ["--precision", "bf16", "--tol", "5e-2"], ref="fp32",
             work=f"top-5, one batch of {s['hessian_batch']}, tol 5e-2"),
        dict(analysis="surface", variant="fp32 warm-up", args=surf + ["--x", "-1:1:3", "--y", "-1:1:3", "--compile",
                                                                       "off", "--precision", "fp32"],
             work=f"3x3 grid, {s['surface_samples']} samples"),
        dict(analysis="surface", variant="fp32", args=surf + grid + ["--compile", "off", "--precision", "fp32"],
             work=f"{g}x{g} grid, {s['surface_samples']} samples"),
        dict(analysis="surface", variant="bf16 warm-up", args=surf + ["--x", "-1:1:3", "--y", "-1:1:3", "--compile",
                                                                       "off", "--precision", "bf16"],
             ref="fp32", sub=(g - 1) // 2, work=f"3x3 of the {g}x{g} points"),
        dict(analysis="surface", variant="bf16", args=surf + sub_grid + ["--compile", "off", "--precision", "bf16"],
             ref="fp32", sub=(g - 1) // (sg - 1), work=f"{sg}x{sg} of the {g}x{g} points"),
        dict(analysis="surface", variant="compiled", args=surf + sub_grid + ["--compile", "on", "--precision",
                                                                              "fp32"],
             ref="fp32", sub=(g - 1) // (sg - 1), work=f"{sg}x{sg} of the {g}x{g} points"),
        dict(analysis="featvar", variant="fp32", args=feat + ["--precision", "fp32"],
             work=f"--mc {s['featvar_mc']}, {s['featvar_samples']} samples"),
        dict(analysis="featvar", variant="bf16", args=feat + ["--precision", "bf16"], ref="fp32",
             work=f"--mc {s['featvar_mc']}, {s['featvar_samples']} samples"),
        dict(analysis="evaluate", variant="fp32", args=ev + ["--precision", "fp32"],
             work=f"N = {s['mc']}, {s['evaluate_samples']} samples"),
        dict(analysis="evaluate", variant="bf16", args=ev + ["--precision", "bf16"], ref="fp32",
             work=f"N = {s['mc']}, {s['evaluate_samples']} samples"),
        dict(analysis="evaluate", variant="compiled", args=ev + ["--precision", "fp32", "--compile"], ref="fp32",
             work=f"N = {s['mc']}, {s['evaluate_samples']} samples"),
    ]
    for r in runs:
        r["output"] = out / f"{r['analysis']}-{r['variant'].replace(' ', '-')}.h5"
        r["args"] = [str(a) for a in r["args"]] + ["-o", str(r["output"])]
    return runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_args(lt_args: list[str], output: Path) -> list[str]:
    """The `lt` arguments under ``torchrun --nproc-per-node 2`` (same command line, its own output)."""
    args = list(lt_args)
    args[args.index("-o") + 1] = str(output)
    if "--device" in args:
        i = args.index("--device")
        args[i + 1] = "cuda" if args[i + 1].startswith("cuda") else args[i + 1]   # each rank: cuda:LOCAL_RANK
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", *args]


@contextlib.contextmanager
def compile_backend(backend: str):
    """``torch.compile`` with ``backend`` for the block (``inductor`` = torch's default, unchanged)."""
    if backend == "inductor":
        yield
        return
    original = torch.compile

    def patched(model=None, **kwargs):
        kwargs.setdefault("backend", backend)
        return original(model, **kwargs) if model is not None else original(**kwargs)
    torch.compile = patched
    try:
        yield
    finally:
        torch.compile = original


def check(device: str = "cuda", tiny: bool = False, json_path: str | None = "gpu_check.json", seed: int = 0,
          compile_backend_name: str = "inductor", distributed: str = "auto", keep: str | None = None,
          say=print) -> Report:
    """Run the check; returns the :class:`Report` (also written to ``json_path`` unless None)."""
    from landscape_tools.device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    s = SIZES["tiny" if tiny else "full"]
    report = Report(device=str(dev), card=card_name(dev), torch=torch.__version__, cuda=torch.version.cuda, tiny=tiny)
    if keep and Path(keep).exists() and any(Path(keep).iterdir()):
        raise SystemExit(f"gpu_check: --keep {keep} is not empty; give a new or empty folder")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        ckpt, data = make_inputs(root, s, seed)
        runs = stages(ckpt, data, s, str(dev), root)
        warm_up(dev)
        no_bf16 = dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 0)
        seconds: dict[tuple[str, str], float] = {}
        failed: set[tuple[str, str]] = set()
        with compile_backend(compile_backend_name):
            for r in runs:
                if no_bf16 and r["variant"].startswith("bf16"):
                    report.rows.append(Row(r["analysis"], r["variant"], "skipped", 0.0, None,
                                           note="bf16 needs compute capability 8.0 (Ampere) or later"))
                    continue
                say(f"gpu_check: {r['analysis']} {r['variant']} ({r['work']}) ...", file=sys.stderr)
                try:
                    sec, peak = timed(dev, lambda r=r: run_lt(r["args"]))
                except Exception as exc:      # one stage failing must not hide the rest of the table
                    failed.add((r["analysis"], r["variant"]))
                    report.rows.append(Row(r["analysis"], r["variant"], r["work"], 0.0, None, ok=False,
                                           note=f"FAILED: {first_line(exc)}"))
                    continue
                seconds[(r["analysis"], r["variant"])] = sec
                row = Row(r["analysis"], r["variant"], r["work"], sec, peak)
                if "ref" in r and (r["analysis"], r["ref"]) in failed:
                    row.note = f"not compared: the {r['ref']} run failed"
                elif "ref" in r:
                    ref = next(q for q in runs if q["analysis"] == r["analysis"] and q["variant"] == r["ref"])
                    row.agreement = agreement(read(r["output"], r["analysis"]),
                                              read(ref["output"], r["analysis"], r.get("sub")))
                    key = "bf16-hessian" if (r["variant"], r["analysis"]) == ("bf16", "hessian") else \
                        r["variant"].split()[0]
                    row.tolerance = TOLERANCE[key]
                    row.ok = bool(row.agreement <= row.tolerance)
                if r["analysis"] == "hessian":
                    row.note = "; ".join(filter(None, [hessian_note(r["output"]), row.note]))
                report.rows.append(row)
        ranks = distributed == "on" or (distributed == "auto" and dev.type == "cuda" and torch.cuda.device_count() >= 2)
        if ranks:
            ref = next(q for q in runs if q["analysis"] == "evaluate" and q["variant"] == "fp32")
            output = root / "evaluate-2ranks.h5"
            cmd = torchrun_args(ref["args"], output)
            say("gpu_check: evaluate on 2 ranks (torchrun) ...", file=sys.stderr)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            sec = time.perf_counter() - t0
            row = Row("evaluate", "2 ranks", ref["work"] + (", nccl" if dev.type == "cuda" else ", gloo"),
                      sec, None, note="separate processes: time includes their start; memory not measured")
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                row.ok, row.note = False, f"FAILED: torchrun exit status {proc.returncode} (its stderr above)"
            elif ("evaluate", "fp32") in failed:
                row.note = "not compared: the fp32 run failed"
            else:
                row.agreement = agreement(read(output, "evaluate"), read(ref["output"], "evaluate"))
                row.tolerance = TOLERANCE["2 ranks"]
                row.ok = bool(row.agreement <= row.tolerance)
            report.rows.append(row)
        else:
            report.rows.append(Row("evaluate", "2 ranks", "skipped", 0.0, None,
                                   note="needs 2 or more GPUs (or --distributed on)"))
        report.projection = projection(seconds, s)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    report.total_seconds = round(time.perf_counter() - start, 1)
    say(table(report))
    if json_path:
        replaced = Path(json_path).exists()
        tmp = Path(f"{json_path}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(report), indent=2))
        os.replace(tmp, json_path)
        say(f"gpu_check: JSON written to {json_path}{' (replacing the earlier one)' if replaced else ''}",
            file=sys.stderr)
    return report


def projection(seconds: dict, s: dict) -> dict:
    """Seconds per grid point (marginal: the 3x3 warm-up of the same precision taken off) and the
    full-CIFAR 51x51 time they give, for fp32 and bf16 (eager)."""
    g, sg = s["grid"], s["sub_grid"]
    out = {"samples_measured": s["surface_samples"], "full_samples": FULL_CIFAR_TRAIN, "full_points": FULL_GRID ** 2,
           "formula": "(T(grid) - T(3x3 grid)) / (points - 9) * (50000 / samples) * 2601"}
    for variant, points in (("fp32", g * g), ("bf16", sg * sg)):
        if ("surface", variant) not in seconds or ("surface", f"{variant} warm-up") not in seconds:
            continue
        per_point = max(seconds[("surface", variant)] - seconds[("surface", f"{variant} warm-up")], 0.0) / (points - 9)
        full = per_point * FULL_CIFAR_TRAIN / s["surface_samples"] * FULL_GRID ** 2
        out[variant] = {"seconds_per_point": per_point, "full_cifar_51x51_seconds": full}
    return out


def table(report: Report) -> str:
    lines = [f"gpu_check on {report.card} ({report.device}), torch {report.torch}, CUDA {report.cuda or '-'}"
             f"{', --tiny sizes' if report.tiny else ''}",
             f"{'analysis':<9} {'variant':<13} {'work':<34} {'time s':>8} {'peak MiB':>9} {'agreement':>10} "
             f"{'tol':>7}  ok"]
    for r in report.rows:
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        agree = "-" if r.agreement is None else f"{r.agreement:.2e}"
        tol = "-" if r.tolerance is None else f"{r.tolerance:.0e}"
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        lines.append(f"{r.analysis:<9} {r.variant:<13} {r.work[:34]:<34} {r.seconds:8.2f} {peak:>9} {agree:>10} "
                     f"{tol:>7}  {ok}{'  (' + r.note + ')' if r.note else ''}")
    p = report.projection
    if "fp32" in p:
        lines.append(f"full-CIFAR 51x51 surface ({p['full_samples']} samples, {p['full_points']} points), projected "
                     f"from the marginal cost of a point: fp32 {p['fp32']['full_cifar_51x51_seconds'] / 60:.1f} min "
                     f"({p['fp32']['seconds_per_point'] * 1e3:.1f} ms / point of {p['samples_measured']})"
                     + (f", bf16 {p['bf16']['full_cifar_51x51_seconds'] / 60:.1f} min "
                        f"({p['bf16']['seconds_per_point'] * 1e3:.1f} ms / point)" if "bf16" in p else ""))
    lines.append(f"total {report.total_seconds:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the test suite's run on a CPU)")
    ap.add_argument("--json", default="gpu_check.json", help="where the table goes as JSON (default gpu_check.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                    help="torch.compile backend of the compiled runs (default inductor, torch's own; eager: "
                         "dynamo's tracing only, for a CPU without a C++ compiler or a quick test)")
    ap.add_argument("--distributed", default="auto", choices=("auto", "on", "off"),
                    help="the 2-rank torchrun evaluate: auto = with 2 or more GPUs; on = also on a CPU (gloo)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the checkpoint, data and result files in DIR")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or --device cpu --tiny for the code path",
              file=sys.stderr)
        return 2
    report = check(args.device, args.tiny, args.json, args.seed, args.compile_backend, args.distributed, args.keep)
    return exit_status(report)


def exit_status(report: Report) -> int:
    """0 when every compared result is within its tolerance, else 1."""
    return 0 if all(r.ok is not False for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
