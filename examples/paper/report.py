"""The report stage of examples/paper/reproduce.sh: every figure and OUTDIR/report.md.

    python examples/paper/report.py OUTDIR --profile tiny --data digits --published examples/paper/published.csv

Reads the stages' files (OUTDIR/models/*.pt, evaluate/, hessian/, surface/, featvar/, robustness/,
compare/), draws the figures with landscape_tools.plotting.render (the code behind `lt plot`) into
OUTDIR/figures/, and writes OUTDIR/report.md: our numbers per model side by side, the published
ResNet-18 / CIFAR-100 numbers beside ours, and one verdict per claim of the paper, taken from the
`lt compare` files (robustness, which `lt compare` does not cover, from the numbers). Every number
in the report is read back from those files. Files are replaced atomically; nothing is trained or
computed here beyond means of stored numbers.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

MODELS = (("dnn", "deterministic"), ("dnn_smoothing", "deterministic + smoothing"),
          ("mcdo", "MC dropout"), ("mcdo_smoothing", "MC dropout + smoothing"))
PAIRS = ("dnn", "mcdo")
PUBLISHED_N = (1, 2, 50)
WITHIN = 0.02           # `lt compare`'s default --within
#: claim -> the compare quantities behind it ({n}: the largest N of the evaluate file)
CLAIMS = (("smoothing improves NLL and accuracy", ("NLL at N={n}", "accuracy at N={n}")),
          ("smoothing needs fewer MC samples", (f"MC samples to come within {WITHIN:.0%} of the N={{n}} NLL",)),
          ("smoothing gives smaller-magnitude Hessian eigenvalues and fewer negative ones",
           ("median |top eigenvalue| over batches", "negative eigenvalues per batch")),
          ("smoothing flattens the loss surface", ("rise from the centre to the border (sharpness)",)),
          ("smoothing lowers feature-map variance across MC samples", ("mean variance over layers",)))
ROBUST_CLAIM = "smoothing improves robustness under corruption"


def fmt(x: float, digits: int = 4) -> str:
    """Numbers of the report: fixed point with ``digits`` decimals, or '-' when missing."""
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- reading the stages' files
def read(path: Path):
    from landscape_tools import store
    return store.read_result(path)


def evaluate_numbers(node) -> dict:
    """NLL / accuracy / ECE per N, N needed, of one evaluate model group."""
    sizes = [int(n) for n in node.data["n_samples"]]
    nll = np.asarray(node.data["nll"], dtype=np.float64)
    within = np.flatnonzero(nll <= nll[-1] * (1 + WITHIN))
    return {"sizes": sizes, "nll": dict(zip(sizes, nll.tolist())),
            "accuracy": dict(zip(sizes, np.asarray(node.data["accuracy"], dtype=np.float64).tolist())),
            "ece": dict(zip(sizes, np.asarray(node.data["ece"], dtype=np.float64).tolist())),
            "n_needed": sizes[int(within[0])]}


def hessian_numbers(node) -> dict:
    ev = np.asarray(node.data["eigenvalues"], dtype=np.float64)       # (batches, k)
    top = np.abs(ev[:, 0])
    return {"batches": int(ev.shape[0]), "k": int(ev.shape[1]), "top_median": float(np.median(top)),
            "top_max": float(top.max()), "negatives": int(np.sum(ev < 0)), "eigenvalues": int(ev.size),
            "converged": int(np.sum(np.asarray(node.data["converged"])))}


def surface_numbers(node) -> dict:
    loss = np.asarray(node.data["loss"], dtype=np.float64)
    x, y = np.asarray(node.data["x"]), np.asarray(node.data["y"])
    cx, cy = int(np.argmin(np.abs(x))), int(np.argmin(np.abs(y)))
    border = np.concatenate([loss[0, :], loss[-1, :], loss[1:-1, 0], loss[1:-1, -1]])
    return {"centre": float(loss[cx, cy]), "border": float(np.mean(border)),
            "rise": float(np.mean(border) - loss[cx, cy]), "points": f"{len(x)}x{len(y)}",
            "range": f"[{x.min():g}, {x.max():g}]"}


def featvar_numbers(node) -> dict:
    var = np.asarray(node.data["variance"], dtype=np.float64)
    return {"mean": float(np.nanmean(var)), "layers": [str(v) for v in node.data["layers"]], "variance": var.tolist()}


def robustness_numbers(node) -> dict:
    """Per severity, the metric at the smallest and largest N averaged over the corruptions (each
    corruption weighted equally); severity 0 = the clean split when the file holds it."""
    group = node.groups["corruptions"]
    sizes = [int(n) for n in node.data["n_samples"]]
    rows: dict[int, dict[str, list]] = {}
    for sub in group.groups.values():
        for i, sev in enumerate(np.asarray(sub.data["severity"], dtype=int)):
            for metric in ("nll", "accuracy", "ece"):
                rows.setdefault(int(sev), {}).setdefault(metric, []).append(np.asarray(sub.data[metric][i], float))
    out = {"sizes": sizes, "corruptions": len(group.groups), "by_severity": {}}
    for sev in sorted(rows):
        out["by_severity"][sev] = {m: np.mean(v, axis=0).tolist() for m, v in rows[sev].items()}
    if bool(group.attrs.get("clean", False)):
        out["clean"] = {m: np.asarray(node.data[m], float).tolist() for m in ("nll", "accuracy", "ece")}
    # the mean over every corrupted set (all corruptions, all severities)
    out["mean"] = {m: np.mean([out["by_severity"][s][m] for s in out["by_severity"]], axis=0).tolist()
                   for m in ("nll", "accuracy", "ece")}
    return out


def collect(out: Path) -> dict:
    """label -> every number of the report, read from the files of ``out``."""
    from landscape_tools.checkpoints import load_checkpoint

    numbers = {}
    for pair in PAIRS:
        ev, he = read(out / "evaluate" / f"{pair}.h5"), read(out / "hessian" / f"{pair}.h5")
        fv, ro = read(out / "featvar" / f"{pair}.h5"), read(out / "robustness" / f"{pair}.h5")
        su = read(out / "surface" / f"{pair}.h5") if pair == "mcdo" else None
        ref = read(out / "surface" / f"{pair}_ref.h5") if pair == "mcdo" else None
        for label in (pair, f"{pair}_smoothing"):
            _, info = load_checkpoint(out / "models" / f"{label}.pt")
            n = {"arch": info.arch, "num_params": info.num_params, "width": info.arch_kwargs.get("width"),
                 "train": info.meta.get("train", {}),
                 "epochs": info.meta.get("epochs"), "train_samples": info.meta.get("train_samples"),
                 "train_test": info.meta.get("metrics", {}).get("test", {}),
                 "evaluate": evaluate_numbers(ev.models[label]),
                 "hessian": hessian_numbers(he.models[label]),
                 "featvar": featvar_numbers(fv.models[label]), "featvar_over": fv.config.get("over", "?"),
                 "robustness": robustness_numbers(ro.models[label])}
            if su is not None:
                n["surface"] = surface_numbers(su.models[label])
                n["surface_ref"] = surface_numbers(ref.models[label])
            numbers[label] = n
    return numbers


def comparisons(out: Path) -> dict:
    """pair -> the ``B-vs-A`` node of ``compare/PAIR.h5``."""
    res = {}
    for pair in PAIRS:
        node = read(out / "compare" / f"{pair}.h5").models[f"{pair}_smoothing-vs-{pair}"]
        res[pair] = node
    return res


def read_published(path: Path) -> dict:
    """(model, N) -> (nll, accuracy %, ECE %) from the published-numbers file."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    return {(r["model"], int(r["n"])): (float(r["nll"]), float(r["accuracy_pct"]), float(r["ece_pct"])) for r in rows}


# ----------------------------------------------------------------------------- verdicts
def claim_verdict(verdicts: list[str], pair: str) -> str:
    """A claim's verdict from the `lt compare` verdicts of its quantities (A = pair, B = pair_smoothing)."""
    n, for_b, for_a = len(verdicts), verdicts.count("favours B"), verdicts.count("favours A")
    if n == 0:
        return "not compared"
    if for_b == n:
        return "yes"
    if for_a == n:
        return f"no: the opposite (favours {pair})"
    if for_a and for_b:
        return "mixed"
    if for_b:
        return f"partly ({for_b} of {n} favour smoothing, the rest no detectable difference)"
    if for_a:
        return f"partly the opposite ({for_a} of {n} favour {pair}, the rest no detectable difference)"
    return "no detectable difference"


def judge(pair: str, node, n_max: int) -> list[dict]:
    """Each claim the compare file of ``pair`` covers, with its verdict and the evidence."""
    names = [str(q) for q in node.data["quantity"]]
    claims = []
    for claim, wanted in CLAIMS:
        if pair == "dnn" and claim == "smoothing needs fewer MC samples":
            continue                      # deterministic models: every N is the same prediction
        rows = [names.index(w.format(n=n_max)) for w in wanted if w.format(n=n_max) in names]
        if not rows:
            continue
        verdicts = [str(node.data["verdict"][i]) for i in rows]
        parts = []
        for i in rows:
            low, high = float(node.data["low"][i]), float(node.data["high"][i])
            interval = f"[{low:.4g}, {high:.4g}]" if np.isfinite(low) and np.isfinite(high) else "(no interval)"
            parts.append(f"{names[i]}: {float(node.data['value_a'][i]):.4g} vs {float(node.data['value_b'][i]):.4g}, "
                         f"difference {float(node.data['estimate'][i]):.4g} {interval}, {verdicts[rows.index(i)]}")
        claims.append({"pair": pair, "claim": claim, "verdict": claim_verdict(verdicts, pair),
                       "evidence": "; ".join(parts)})
    return claims


def judge_robustness(pair: str, a: dict, b: dict) -> dict:
    """From the numbers (`lt compare` has no corruption quantities): mean corrupted NLL lower and
    accuracy higher with smoothing, at the smallest and the largest N."""
    ra, rb = a["robustness"], b["robustness"]
    checks, parts = [], []
    for j in (0, -1):
        n = ra["sizes"][j]
        na, nb = ra["mean"]["nll"][j], rb["mean"]["nll"][j]
        aa, ab = ra["mean"]["accuracy"][j], rb["mean"]["accuracy"][j]
        checks += [nb < na, ab > aa]
        parts.append(f"N={n}: NLL {na:.4f} vs {nb:.4f}, accuracy {aa:.4f} vs {ab:.4f}")
    verdict = "yes" if all(checks) else "no" if not any(checks) else "mixed"
    return {"pair": pair, "claim": ROBUST_CLAIM, "verdict": verdict,
            "evidence": f"mean over {ra['corruptions']} corruptions x severities ({pair} vs {pair}_smoothing): "
                        + "; ".join(parts) + " (from the numbers: no interval)"}


# ----------------------------------------------------------------------------- figures
FIGURES = (  # (file, result files, kind, caption)
    ("evaluate_curves.png", ["evaluate/dnn.h5", "evaluate/mcdo.h5"], "curves",
     "NLL, accuracy and ECE against the ensemble size N (log axis)"),
    ("evaluate_reliability.png", ["evaluate/dnn.h5", "evaluate/mcdo.h5"], "reliability",
     "reliability diagrams (N = 1 and the largest N)"),
    ("hessian_spectrum.png", ["hessian/dnn.h5", "hessian/mcdo.h5"], "spectrum",
     "top-5 Hessian eigenvalues of every training batch, pooled: negative and positive panels"),
    ("surface_contour.png", ["surface/mcdo.h5"], "contour",
     "2-D loss surfaces of the MC-dropout models over [-1, 1]^2, filter-normalised directions, "
     "one MC sample per point"),
    ("surface_ref_contour.png", ["surface/mcdo_ref.h5"], "contour",
     "the reference code's slice: [-0.1, 0.1]^2, directions normalised over dim 0 (--norm filter-dim0)"),
    ("featvar_variance.png", ["featvar/mcdo.h5"], "variance",
     "feature-map variance across MC-dropout samples at every stage"),
    ("featvar_spatial.png", ["featvar/dnn.h5"], "variance",
     "spatial feature-map variance of the deterministic models at every stage"),
    ("featvar_fourier.png", ["featvar/dnn.h5", "featvar/mcdo.h5"], "fourier",
     "relative log amplitude of the feature maps' Fourier spectra at every stage"),
    ("robustness.png", ["robustness/dnn.h5", "robustness/mcdo.h5"], "corruption",
     "NLL, accuracy and ECE against corruption severity (mean over corruptions; 0 = clean)"),
    ("compare_dnn.png", ["compare/dnn.h5"], None, "`lt compare`: dnn_smoothing - dnn with 95% intervals"),
    ("compare_mcdo.png", ["compare/mcdo.h5"], None, "`lt compare`: mcdo_smoothing - mcdo with 95% intervals"),
)


def draw_figures(out: Path) -> list[tuple[str, str]]:
    from landscape_tools.plotting import render

    (out / "figures").mkdir(exist_ok=True)
    drawn = []
    for name, files, kind, caption in FIGURES:
        render([str(out / f) for f in files], str(out / "figures" / name), kind=kind)
        drawn.append((f"figures/{name}", caption))
    return drawn


# ----------------------------------------------------------------------------- report.md
def stage_seconds(out: Path) -> dict[str, float]:
    seconds: dict[str, float] = {}
    path = out / "stage_seconds.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            stage, _, value = line.split("\t")
            seconds[stage] = seconds.get(stage, 0.0) + float(value)
    return seconds


def write_report(out: Path, profile: str, data: str, numbers: dict, claims: list[dict], published: dict,
                 figures: list[tuple[str, str]]) -> Path:
    labels = [m for m, _ in MODELS]
    first = numbers["mcdo"]
    sizes = first["evaluate"]["sizes"]
    n_max = sizes[-1]
    t = first["train"]
    lines = ["# Blurs Behave Like Ensembles: the evidence reproduced with landscape-tools", "",
             f"Profile `{profile}`, data `{data}`, seed {t.get('seed', '?')}. Four ResNet-18s "
             f"(width {first['width']}): "
             + ", ".join(f"**{m}** = {d} (`{numbers[m]['arch']}`)" for m, d in MODELS) + ". "
             f"Training: {first['epochs']} epochs on {first['train_samples']} images, batch {t.get('batch_size')}, "
             f"SGD lr {t.get('lr')} momentum {t.get('momentum')} weight decay {t.get('weight_decay')}, "
             f"{t.get('warmup_epochs')} warm-up epoch(s), step schedule x{t.get('gamma')} at epochs "
             f"{','.join(map(str, t.get('milestones') or [])) or '-'}, translations of {t.get('pad')} px"
             f"{', flips' if t.get('flip') else ''}.", ""]
    if profile == "tiny":
        lines += ["**Profile tiny**: every stage of the paper's pipeline at toy sizes on the built-in digits data; "
                  "it checks the recipe, its numbers say nothing about the paper.", ""]

    # -- ours vs published
    lines += ["## Predictive performance beside the published numbers", ""]
    if not data.startswith("cifar100:"):
        lines += [f"The published numbers are ResNet-18 on CIFAR-100; this run used `{data}`, so they are shown for "
                  f"orientation only, not as a comparison.", ""]
    lines += ["| model | N | NLL | published NLL | accuracy (%) | published accuracy (%) | ECE (%) "
              "| published ECE (%) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, _ in MODELS:
        e = numbers[m]["evaluate"]
        for n in PUBLISHED_N:
            if n not in e["nll"]:
                continue
            pub = published.get((m, n)) or (published.get((m, 1)) if m.startswith("dnn") else None)
            p_nll, p_acc, p_ece = pub if pub else (None, None, None)
            lines.append(f"| {m} | {n} | {fmt(e['nll'][n])} | {fmt(p_nll, 3)} | {fmt(100 * e['accuracy'][n], 2)} | "
                         f"{fmt(p_acc, 1)} | {fmt(100 * e['ece'][n], 2)} | {fmt(p_ece, 1)} |")
    lines += ["", "Published: the reference code's README (ResNet-18, CIFAR-100), `examples/paper/published.csv`. "
              "The deterministic models were published at N = 1; without dropout their prediction is the same for "
              "every N, so that value is repeated.", ""]

    # -- key numbers
    head = "| | " + " | ".join(labels) + " |"
    rows = []

    def row(name, fn):
        cells = []
        for m in labels:
            try:
                cells.append(fn(numbers[m]))
            except KeyError:
                cells.append("-")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    row("parameters", lambda n: f"{n['num_params']:,}")
    row("test accuracy after training, one deterministic pass", lambda n: fmt(n["train_test"]["accuracy"]))
    for n_ in (1, n_max):
        row(f"NLL, N = {n_}", lambda n, k=n_: fmt(n["evaluate"]["nll"][k]))
        row(f"accuracy, N = {n_}", lambda n, k=n_: fmt(n["evaluate"]["accuracy"][k]))
        row(f"ECE, N = {n_}", lambda n, k=n_: fmt(n["evaluate"]["ece"][k]))
    row(f"MC samples N to come within {WITHIN:.0%} of the N = {n_max} NLL", lambda n: str(n["evaluate"]["n_needed"]))
    row("Hessian: median top abs(eigenvalue) over batches", lambda n: fmt(n["hessian"]["top_median"]))
    row("Hessian: max top abs(eigenvalue)", lambda n: fmt(n["hessian"]["top_max"]))
    row("Hessian: negative eigenvalues", lambda n: f"{n['hessian']['negatives']} of {n['hessian']['eigenvalues']}")
    row("Hessian: converged eigenvalues", lambda n: f"{n['hessian']['converged']} of {n['hessian']['eigenvalues']}")
    row("surface [-1, 1]^2: loss at the centre", lambda n: fmt(n["surface"]["centre"]))
    row("surface [-1, 1]^2: rise, border minus centre", lambda n: fmt(n["surface"]["rise"]))
    row("surface [-0.1, 0.1]^2 (filter-dim0): rise", lambda n: fmt(n["surface_ref"]["rise"]))
    row("feature-map MC variance, mean over stages", lambda n: fmt(n["featvar"]["mean"]) if n["featvar_over"] == "mc"
        else "-")
    row("feature-map spatial variance, mean over stages",
        lambda n: fmt(n["featvar"]["mean"]) if n["featvar_over"] == "spatial" else "-")
    ro_sizes = first["robustness"]["sizes"]
    for j in (0, -1):
        row(f"corrupted NLL, N = {ro_sizes[j]}, mean over corruptions x severities",
            lambda n, j=j: fmt(n["robustness"]["mean"]["nll"][j]))
        row(f"corrupted accuracy, N = {ro_sizes[j]}, mean over corruptions x severities",
            lambda n, j=j: fmt(n["robustness"]["mean"]["accuracy"][j]))
    h = first["hessian"]
    lines += ["## Key numbers", "", head, "|---|" + "---:|" * len(labels), *rows, "",
              f"Evaluate: test split, MC ensembles N = {','.join(map(str, sizes))}. Hessian: top-{h['k']} by magnitude "
              f"of each of {h['batches']} training batches (fixed dropout mask per batch). Surfaces: MC-dropout "
              f"models only, one MC sample per point ({first['surface']['points']} over {first['surface']['range']}^2 "
              f"and {first['surface_ref']['points']} over {first['surface_ref']['range']}^2). Feature variance: MC "
              f"variance for the MC-dropout models, spatial variance for the deterministic ones (no randomness). "
              f"Robustness: {first['robustness']['corruptions']} corruptions at severities "
              f"{','.join(str(s) for s in first['robustness']['by_severity'])}.", ""]
    # -- robustness per severity
    lines += ["### Robustness by severity (mean over corruptions)", "",
              "| model | N | " + " | ".join(f"NLL s{s}" for s in first["robustness"]["by_severity"]) + " | "
              + " | ".join(f"acc s{s}" for s in first["robustness"]["by_severity"]) + " |",
              "|---|---:|" + "---:|" * (2 * len(first["robustness"]["by_severity"]))]
    for m in labels:
        r = numbers[m]["robustness"]
        for j in (0, -1):
            lines.append(f"| {m} | {r['sizes'][j]} | "
                         + " | ".join(fmt(r["by_severity"][s]["nll"][j]) for s in r["by_severity"]) + " | "
                         + " | ".join(fmt(r["by_severity"][s]["accuracy"][j]) for s in r["by_severity"]) + " |")
    lines += [""]

    # -- claims
    lines += ["## The paper's claims", "",
              "| pair | claim (Park & Kim 2022) | verdict "
              "| evidence (pair vs pair_smoothing; 95% intervals of `lt compare`) |",
              "|---|---|---|---|"]
    # a '|' inside a cell (e.g. "median |top eigenvalue|") is escaped for markdown tables
    lines += [f"| {c['pair']} | {c['claim']} | **{c['verdict']}** | {c['evidence'].replace('|', chr(92) + '|')} |"
              for c in claims]
    lines += ["", "Verdicts come from `lt compare` (`compare/PAIR.h5`): yes = every quantity of the claim favours "
              "smoothing (its interval excludes 0 on the better side); no detectable difference = every interval "
              "holds 0. One training run per model: the intervals cover this run's test samples, batches and "
              "directions, not training noise. Robustness is judged from the numbers alone.", ""]

    # -- figures
    lines += ["## Figures", ""]
    for path, caption in figures:
        lines += [f"### {caption[0].upper() + caption[1:]}", "", f"![{caption}]({path})", ""]

    seconds = stage_seconds(out)
    if seconds:
        lines += ["## Time per stage (wall seconds, all runs of the stage)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
        lines += [""]
    lines += ["Every number above is read back from the files of this folder; `lt info FILE.h5` describes a file "
              "and `lt plot FILE.h5 -o FIG.png` redraws it.", ""]
    path = out / "report.md"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--published", type=Path, required=True)
    args = parser.parse_args(argv)
    numbers = collect(args.out)
    compared = comparisons(args.out)
    claims = []
    for pair in PAIRS:
        claims += judge(pair, compared[pair], numbers[pair]["evaluate"]["sizes"][-1])
        claims.append(judge_robustness(pair, numbers[pair], numbers[f"{pair}_smoothing"]))
    figures = draw_figures(args.out)
    path = write_report(args.out, args.profile, args.data, numbers, claims, read_published(args.published), figures)
    print(f"{path}", file=sys.stderr)
    for c in claims:
        print(f"  {c['pair']}: {c['claim']}: {c['verdict']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
