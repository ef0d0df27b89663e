"""The end-to-end demo behind ``lt demo``: two models, every analysis, every figure, one report.

On the built-in ``digits`` data it trains a ResNet-18 with MC dropout with and without spatial
smoothing (small width), saves both checkpoints, then runs the four analyses on both through the
same library functions the commands use (one HDF5 file per analysis, one group per model), draws
every figure with :func:`landscape_tools.plotting.render`, and writes ``report.md``: a table of the
key numbers side by side and, for each claim of Park & Kim (2022), whether it showed up here.

Stages whose output already exists (and was made by the same configuration) are reused, so an
interrupted demo continues where it stopped; the analyses themselves also resume from their
``.partial`` files. The library never prints: stage headers go to ``log``, progress to the
``progress_for(title)`` callbacks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import seeds
from .device import Progress
from .errors import ConfigError, StoreError
from .seeds import derive_seed

DATA_SPEC = "digits"
#: (label = checkpoint stem, zoo architecture, description)
MODELS = (("mcdo", "resnet_mcdo_18", "MC dropout"),
          ("smooth", "resnet_mcdo_smoothing_18", "MC dropout + spatial smoothing"))
FIGURES = (("evaluate", "curves", "evaluate_curves.png", "NLL, accuracy and ECE against the ensemble size N"),
           ("evaluate", "reliability", "evaluate_reliability.png", "reliability diagrams (N = 1 and N = max)"),
           ("hessian", "spectrum", "hessian_spectrum.png", "top-5 Hessian eigenvalues of every training batch"),
           ("surface", "contour", "surface_contour.png", "2-D loss surface, filter-normalised random directions"),
           ("featvar", "variance", "featvar_variance.png", "feature-map variance across MC samples by depth"),
           ("featvar", "fourier", "featvar_fourier.png", "relative log amplitude of the feature maps' spectra"))
ANALYSES = ("evaluate", "hessian", "surface", "featvar")
NLL_TOLERANCE = 0.02
#: training seeds per model of the full demo: 3 seeds x ~2.4 minutes on 2 idle CPU cores fit in 8 minutes
DEFAULT_SEEDS = 3
#: the verdict of a claim from one training run per model
ONE_SEED = "one seed: no verdict across training runs"
#: the compare.h5 quantities behind each claim (in judge_claims' order); ``{n}``: the largest N
CLAIM_QUANTITIES = (("NLL at N={n}", "accuracy at N={n}"),
                    (f"MC samples to come within {NLL_TOLERANCE:.0%} of the N={{n}} NLL",),
                    ("median |top eigenvalue| over batches", "negative eigenvalues per batch"),
                    ("rise from the centre to the border (sharpness)",),
                    ("mean variance over layers",))


@dataclass
class DemoConfig:
    """Everything that determines the demo's numbers (with ``seed``).

    Attributes:
        width, epochs, batch_size, lr, train_samples: training (``train_samples`` None: all 1,347).
        mc_sizes, eval_samples: ``evaluate`` ensemble sizes and test samples (None: all 450).
        hessian_batches, hessian_batch_size, hessian_k, hessian_tol, hessian_max_iter: ``hessian``
            (the first batches of the training split, one Hessian each).
        surface_points, surface_range, surface_samples: ``surface`` grid (points per axis over
            [-range, range]^2) and training subset.
        featvar_mc, featvar_samples, featvar_batch_size: ``featvar`` (test split, zoo stages, Fourier).
        seed: every random choice.
    """

    width: int = 8
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.05
    train_samples: int | None = None
    mc_sizes: tuple = (1, 2, 5, 10, 20)
    eval_samples: int | None = None
    hessian_batches: int = 3
    hessian_batch_size: int = 64
    hessian_k: int = 5
    hessian_tol: float = 1e-3
    hessian_max_iter: int | None = None
    surface_points: int = 9
    surface_range: float = 1.0
    surface_samples: int = 192
    featvar_mc: int = 16
    featvar_samples: int = 256
    featvar_batch_size: int = 64
    seed: int = 0
    name: str = "full"

    @classmethod
    def full(cls, seed: int = 0) -> "DemoConfig":
        """The configuration of ``lt demo`` (a few minutes on 2 CPU cores)."""
        return cls(seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        """A tiny configuration (seconds): every stage and file, no meaningful numbers."""
        return cls(width=4, epochs=1, batch_size=32, train_samples=64, mc_sizes=(1, 2, 4), eval_samples=32,
                   hessian_batches=1, hessian_batch_size=16, hessian_k=2, hessian_tol=1e-2, hessian_max_iter=12,
                   surface_points=3, surface_samples=32, featvar_mc=3, featvar_samples=16, featvar_batch_size=16,
                   seed=seed, name="quick")

    def digest(self) -> str:
        """A short fingerprint of the configuration (stored in every output, checked on reuse)."""
        document = {**asdict(self), "seed_scheme": seeds.SEED_SCHEME}   # other seeds: other models and numbers
        return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: paths, the key numbers per model, the claim verdicts."""

    out_dir: Path
    checkpoints: dict[str, Path]
    results: dict[str, Path]
    figures: list[Path]
    report: Path
    numbers: dict[str, dict[str, Any]]
    claims: list[dict[str, str]]
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    compare: Path | None = None
    runs: list["DemoResult"] = field(default_factory=list)


# ----------------------------------------------------------------------------- determinism
@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and ask for deterministic kernels (restored afterwards)."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if env is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _provenance(kind: str, config: dict, seed: int, device) -> dict:
    from . import store

    root = store.provenance(kind, None, config, seed, str(device))
    # torch.__version__ is a str subclass h5py cannot store as an attribute
    return {k: str(v) if isinstance(v, str) else v for k, v in root.items()}


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------- outputs and reuse
def output_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every file the demo writes, by name (checkpoints, results, figures, report)."""
    d = Path(out_dir)
    paths = {label: d / f"{label}.pt" for label, _, _ in MODELS}
    paths.update({kind: d / f"{kind}.h5" for kind in ANALYSES})
    paths.update({fig: d / fig for _, _, fig, _ in FIGURES})
    paths["compare"] = d / "compare.h5"
    paths["compare_figure"] = d / "compare_forest.png"
    paths["report"] = d / "report.md"
    return paths


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a folder that already holds a finished demo (``report.md``) unless ``overwrite``.

    Raises:
        ConfigError: report.md exists and ``overwrite`` is False, or ``out_dir`` is a file.
    """
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"-o {d} is a file; the demo writes a folder: choose another -o")
    report = d / "report.md"
    if report.exists() and not overwrite:
        raise ConfigError(f"{report} already exists (a finished demo); pass --overwrite to run it again, "
                          f"or choose another -o")
    return d


def _reusable_checkpoint(path: Path, cfg: DemoConfig, arch: str) -> bool:
    from .checkpoints import load_checkpoint

    if not path.exists():
        return False
    _, info = load_checkpoint(path)
    demo = info.meta.get("demo") or {}
    if demo.get("digest") != cfg.digest() or info.arch != arch:
        raise ConfigError(f"{path} was not made by this demo configuration ({cfg.name}, seed {cfg.seed}); "
                          f"pass --overwrite to replace it, or choose another -o")
    return True


def _reusable_result(path: Path, cfg: DemoConfig, checkpoints: dict[str, str]) -> bool:
    from . import store

    if not path.exists():
        return False
    try:
        res = store.read_result(path)
    except StoreError:
        res = None
    ok = (res is not None and (res.config.get("demo") or {}).get("digest") == cfg.digest()
          and set(res.models) == set(checkpoints)
          and all(res.models[k].attrs.get("checkpoint_sha256") == v for k, v in checkpoints.items()))
    if not ok:
        raise ConfigError(f"{path} was not made by this demo run (other configuration, seed or checkpoints); "
                          f"pass --overwrite to replace it, or choose another -o")
    return True


# ----------------------------------------------------------------------------- stages
def train_models(cfg: DemoConfig, out_dir: Path, device, overwrite: bool, log: Callable[[str], None],
                 progress_for: Callable[[str], Progress]) -> tuple[dict[str, Path], list[str]]:
    """Train (or reuse) both checkpoints; returns label -> path and the labels reused."""
    from .checkpoints import save_checkpoint
    from .data import load_data
    from .models import build_model
    from .training import TrainConfig, train

    paths, reused = {}, []
    for i, (label, arch, desc) in enumerate(MODELS):
        path = out_dir / f"{label}.pt"
        paths[label] = path
        if not overwrite and _reusable_checkpoint(path, cfg, arch):
            log(f"reusing {path} ({arch})")
            reused.append(label)
            continue
        train_ds = load_data(DATA_SPEC, "train", samples=cfg.train_samples, seed=cfg.seed,
                             batch_size=cfg.batch_size, device=device)
        test_ds = load_data(DATA_SPEC, "test", batch_size=256, device=device)
        in_channels = int(train_ds.x.shape[1])
        torch.manual_seed(derive_seed(cfg.seed, seeds.DEMO_MODEL_INIT, i))   # model i's initial weights
        model = build_model(arch, num_classes=train_ds.num_classes, in_channels=in_channels, width=cfg.width).to(device)
        tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"training {label}: {arch} ({desc}, width {cfg.width}, {n_params:,} parameters), {cfg.epochs} epochs "
            f"on {len(train_ds)} {DATA_SPEC} images, {device}")
        start = time.monotonic()
        result = train(model, train_ds, test_ds, tc, progress=progress_for(f"train {label}"))
        # the same meta as `lt train` writes, plus the demo's fingerprint
        meta = {"dataset": DATA_SPEC, "input_shape": list(train_ds.x.shape[1:]), "num_classes": train_ds.num_classes,
                "normalisation": train_ds.normalisation, "epochs": cfg.epochs, "train": tc.__dict__,
                "history": result.history, "metrics": {"test": result.test},
                "seconds": round(time.monotonic() - start, 1), "train_samples": len(train_ds),
                "sample_indices": train_ds.describe()["indices"],
                "demo": {"digest": cfg.digest(), "config": _json_safe(asdict(cfg))}}
        save_checkpoint(path, model.cpu(), arch, model.arch_kwargs, meta, overwrite=True)
        log(f"{path}: test accuracy {result.test['accuracy']:.4f}, NLL {result.test['nll']:.4f} "
            f"(one deterministic pass), {result.seconds:.0f} s")
    return paths, reused


def _load(paths: dict[str, Path], device):
    from .checkpoints import load_checkpoint

    out = []
    for label, path in paths.items():
        model, info = load_checkpoint(path, label=label)
        out.append((model.to(device), info))
    return out


def _config(cfg: DemoConfig, stage: str, **options) -> dict:
    return _json_safe(dict(options, demo={"digest": cfg.digest(), "name": cfg.name, "stage": stage,
                                          "config": asdict(cfg)}, data=DATA_SPEC))


def run_evaluate(cfg: DemoConfig, loaded, output: Path, device, progress_for) -> None:
    """``lt evaluate`` on the test split for both models (same node as the command writes)."""
    from . import store
    from .data import load_data
    from .evaluate import ensemble_curve

    nodes = {}
    for model, info in loaded:
        ds = load_data(DATA_SPEC, "test", samples=cfg.eval_samples, seed=cfg.seed, batch_size=256,
                       in_channels=int(model.arch_kwargs["in_channels"]), device=device)
        curve = ensemble_curve(model, ds.batches(), cfg.mc_sizes, seed=cfg.seed,
                               progress=progress_for(f"evaluate {info.label}"))
        data = ds.describe()
        attrs = dict(info.describe(), split="test", data_spec=ds.spec,
                     data=_json_safe({k: v for k, v in data.items() if k != "indices"}))
        node = curve.to_node(attrs)
        if data["indices"] is not None:
            node["data"]["sample_indices"] = (data["indices"], {"description": f"indices into the test split "
                                                                              f"(seed {ds.sample_seed})"})
        nodes[info.label] = node
    config = _config(cfg, "evaluate", models=[info.path for _, info in loaded], mc=list(cfg.mc_sizes), split="test",
                     samples=cfg.eval_samples, batch_size=256, device=str(device), seed=cfg.seed)
    store.write_result(output, _provenance("evaluate", config, cfg.seed, device), nodes, overwrite=True)


def run_hessian_stage(cfg: DemoConfig, loaded, output: Path, device, overwrite: bool, progress_for) -> None:
    """``lt hessian --batches B --batch-size S --top-k K`` (per-batch, largest magnitude, Lanczos)."""
    from . import hessian as H
    from .data import load_data

    jobs, described = [], None
    for model, info in loaded:
        ds = load_data(DATA_SPEC, "train", batch_size=cfg.hessian_batch_size,
                       in_channels=int(model.arch_kwargs["in_channels"]), device=device)
        described = ds.describe()
        jobs.append(H.HessianJob(info.label, model, info, ds.batches()[:cfg.hessian_batches]))
    config = _config(cfg, "hessian", models=[info.path for _, info in loaded], split="train",
                     batch_size=cfg.hessian_batch_size, batches=cfg.hessian_batches, scope="batch",
                     top_k=cfg.hessian_k, which="LM", method="lanczos", tol=cfg.hessian_tol,
                     max_iter=cfg.hessian_max_iter, mc_seed=cfg.seed, device=str(device), seed=cfg.seed)
    options = H.HessianOptions(k=cfg.hessian_k, which="LM", method="lanczos", tol=cfg.hessian_tol,
                               max_iter=cfg.hessian_max_iter, mc_seed=cfg.seed, scope="batch", seed=cfg.seed)
    H.run_hessian(jobs, str(output), options, overwrite=overwrite, config=config, device=str(device),
                  data_description=described,
                  progress=progress_for("hessian"))


def surface_grid(cfg: DemoConfig) -> np.ndarray:
    return np.linspace(-cfg.surface_range, cfg.surface_range, cfg.surface_points)


def run_surface_stage(cfg: DemoConfig, loaded, output: Path, device, overwrite: bool, progress_for) -> None:
    """``lt surface`` with seeded filter-normalised random directions on a training subset."""
    from . import surface as S
    from .data import load_data

    jobs = []
    for model, info in loaded:
        ds = load_data(DATA_SPEC, "train", samples=cfg.surface_samples, seed=cfg.seed, batch_size=256,
                       in_channels=int(model.arch_kwargs["in_channels"]), device=device)
        directions = S.random_directions(model, 2, "filter", "biasbn", cfg.seed)
        jobs.append(S.SurfaceJob(info.label, model, info, ds, directions))
    grid = surface_grid(cfg)
    config = _config(cfg, "surface", models=[info.path for _, info in loaded], dims=2, x=grid.tolist(),
                     y=grid.tolist(), norm="filter", ignore="biasbn", split="train", samples=cfg.surface_samples,
                     batch_size=256, mc=0, bn="frozen", device=str(device), seed=cfg.seed, mode="random")
    S.run_surface(jobs, str(output), S.SurfaceOptions(x=grid, y=grid, mc=0, bn="frozen", seed=cfg.seed),
                  overwrite=overwrite, config=config, device=str(device), progress=progress_for("surface"))


def run_featvar_stage(cfg: DemoConfig, loaded, output: Path, device, overwrite: bool, progress_for) -> None:
    """``lt featvar --over mc --layers stages --fourier`` on a test subset."""
    from . import featvar
    from .data import load_data

    jobs = []
    for model, info in loaded:
        ds = load_data(DATA_SPEC, "test", samples=cfg.featvar_samples, seed=cfg.seed,
                       batch_size=cfg.featvar_batch_size, in_channels=int(model.arch_kwargs["in_channels"]),
                       device=device)
        described = ds.describe()
        jobs.append(featvar.Job(info.label, model, dict(info.describe(), data=described), ds.batches(),
                                data={k: v for k, v in described.items() if k != "normalisation"}))
    config = _config(cfg, "featvar", models=[info.path for _, info in loaded], over="mc", mc=cfg.featvar_mc,
                     source="dropout", layers="stages", fourier=True, split="test", samples=cfg.featvar_samples,
                     batch_size=cfg.featvar_batch_size, max_batch=None, seed=cfg.seed)
    options = featvar.FeatvarOptions(over="mc", mc=cfg.featvar_mc, source="dropout", layers="stages", fourier=True,
                                     seed=cfg.seed)
    featvar.run_to_file(jobs, str(output), _provenance("featvar", config, cfg.seed, device), options,
                        overwrite=overwrite, progress=progress_for("featvar"))


# ----------------------------------------------------------------------------- key numbers and claims
def key_numbers(results: dict[str, str | os.PathLike], checkpoints: dict[str, str | os.PathLike]) -> dict:
    """The report's numbers per model label, read back from the result files and checkpoints.

    Returns:
        label -> dict with ``train_test_accuracy`` (one deterministic pass, from training),
        ``accuracy_1``/``accuracy_max``, ``nll_1``/``nll_max``, ``ece_1``/``ece_max``, ``n_max``,
        ``n_needed`` (smallest N whose NLL is within 2% of NLL at N = max), ``nll_gain`` (NLL at 1
        minus at max), ``top_median``/``top_max`` (top |eigenvalue| per batch, signed values' median
        of magnitudes and maximum), ``negatives``/``eigenvalues`` (count), ``surface_centre``,
        ``surface_edge`` (mean loss on the grid's border), ``surface_rise`` (edge minus centre),
        ``featvar_mean`` (mean over layers) and ``featvar`` (per layer).
    """
    from . import store
    from .checkpoints import load_checkpoint

    ev, he, su, fv = (store.read_result(results[k]) for k in ANALYSES)
    out = {}
    for label in ev.models:
        _, info = load_checkpoint(checkpoints[label])
        n = {"arch": info.arch, "num_params": info.num_params,
             "train_test_accuracy": float(info.meta.get("metrics", {}).get("test", {}).get("accuracy", np.nan))}
        e = ev.models[label].data
        sizes = e["n_samples"]
        n.update(n_max=int(sizes[-1]), accuracy_1=float(e["accuracy"][0]), accuracy_max=float(e["accuracy"][-1]),
                 nll_1=float(e["nll"][0]), nll_max=float(e["nll"][-1]), ece_1=float(e["ece"][0]),
                 ece_max=float(e["ece"][-1]), nll_gain=float(e["nll"][0] - e["nll"][-1]))
        within = np.flatnonzero(e["nll"] <= e["nll"][-1] * (1 + NLL_TOLERANCE))
        n["n_needed"] = int(sizes[within[0]])
        ev_h = np.asarray(he.models[label].data["eigenvalues"], dtype=np.float64)
        top = np.abs(ev_h[:, 0])
        n.update(top_median=float(np.median(top)), top_max=float(top.max()),
                 negatives=int(np.sum(ev_h < 0)), eigenvalues=int(ev_h.size),
                 converged=int(np.sum(he.models[label].data["converged"])))
        s = su.models[label].data
        loss = np.asarray(s["loss"], dtype=np.float64)
        cx, cy = int(np.argmin(np.abs(s["x"]))), int(np.argmin(np.abs(s["y"])))
        border = np.concatenate([loss[0, :], loss[-1, :], loss[1:-1, 0], loss[1:-1, -1]])
        n.update(surface_centre=float(loss[cx, cy]), surface_edge=float(np.mean(border)),
                 surface_rise=float(np.mean(border) - loss[cx, cy]), surface_max=float(np.nanmax(loss)))
        f = fv.models[label].data
        n.update(featvar_mean=float(np.nanmean(f["variance"])),
                 featvar={str(k): float(v) for k, v in zip(f["layers"], f["variance"])})
        out[label] = n
    return out


def _verdict(checks: Sequence[bool]) -> str:
    if all(checks):
        return "yes"
    return "no" if not any(checks) else "mixed"


def judge_claims(numbers: dict, plain: str = "mcdo", smooth: str = "smooth") -> list[dict[str, str]]:
    """For each claim of the paper: ``{"claim", "verdict" (yes | no | mixed), "evidence"}`` from the numbers."""
    p, s = numbers[plain], numbers[smooth]
    claims = []
    checks = [s["nll_max"] < p["nll_max"]]
    if s["accuracy_max"] != p["accuracy_max"]:
        checks.append(s["accuracy_max"] > p["accuracy_max"])
    claims.append({"claim": "smoothing improves NLL and accuracy", "verdict": _verdict(checks),
                   "evidence": f"NLL at N={p['n_max']}: {s['nll_max']:.4f} vs {p['nll_max']:.4f}; accuracy "
                               f"{s['accuracy_max']:.4f} vs {p['accuracy_max']:.4f} (smooth vs mcdo)"})
    checks = [s["nll_gain"] < p["nll_gain"]]
    if s["n_needed"] != p["n_needed"]:  # a tie says nothing either way
        checks.append(s["n_needed"] < p["n_needed"])
    claims.append({"claim": "smoothing needs fewer MC samples", "verdict": _verdict(checks),
                   "evidence": f"N to come within {NLL_TOLERANCE:.0%} of the N={p['n_max']} NLL: "
                               f"{s['n_needed']:.3g} vs {p['n_needed']:.3g}; NLL gained from N=1 to N={p['n_max']}: "
                               f"{s['nll_gain']:.4f} vs {p['nll_gain']:.4f}"})
    checks = [s["top_median"] < p["top_median"]]
    if not s["negatives"] == p["negatives"] == 0:
        checks.append(s["negatives"] < p["negatives"])
    claims.append({"claim": "smoothing gives smaller-magnitude Hessian eigenvalues and fewer negative ones",
                   "verdict": _verdict(checks),
                   "evidence": f"median top abs(eigenvalue) {s['top_median']:.4g} vs {p['top_median']:.4g}; negative "
                               f"eigenvalues {s['negatives']:.3g} vs {p['negatives']:.3g} of {p['eigenvalues']:.3g}"
                               + (" (none in either)" if s["negatives"] == p["negatives"] == 0 else "")})
    claims.append({"claim": "smoothing flattens the loss surface", "verdict": _verdict([s["surface_rise"] < p["surface_rise"]]),
                   "evidence": f"mean loss rise from the centre to the grid's border {s['surface_rise']:.4f} vs "
                               f"{p['surface_rise']:.4f}"})
    # stages where both are equal (e.g. 0 before the first dropout) say nothing either way
    pairs = [(sv, pv) for sv, pv in zip(s["featvar"].values(), p["featvar"].values()) if sv != pv]
    layers_lower = [sv < pv for sv, pv in pairs]
    ties = len(s["featvar"]) - len(pairs)
    claims.append({"claim": "smoothing lowers feature-map variance across MC samples",
                   "verdict": _verdict([s["featvar_mean"] < p["featvar_mean"], *layers_lower]),
                   "evidence": f"mean over stages {s['featvar_mean']:.4g} vs {p['featvar_mean']:.4g}; lower at "
                               f"{sum(layers_lower)} of {len(pairs)} stages"
                               + (f" ({ties} equal, e.g. zero before any dropout)" if ties else "")})
    return claims


def claim_verdict(verdicts: Sequence[str]) -> str:
    """A claim's verdict from the ``lt compare`` verdicts of its quantities (A = mcdo, B = smooth)."""
    n, for_smooth, for_plain = len(verdicts), list(verdicts).count("favours B"), list(verdicts).count("favours A")
    if n == 0:
        return "not compared"
    if for_smooth == n:
        return "yes"
    if for_plain == n:
        return "no: the opposite (favours mcdo)"
    if for_smooth and for_plain:
        return "mixed"
    if for_smooth:
        return f"partly ({for_smooth} of {n} favour smoothing, the rest no detectable difference)"
    if for_plain:
        return f"partly the opposite ({for_plain} of {n} favour mcdo, the rest no detectable difference)"
    return "no detectable difference"


def compared_claims(claims: list[dict], comparison, n_max: int, seeds: int) -> list[dict]:
    """The claims of :func:`judge_claims` with their verdict from ``lt compare`` (``comparison``: the
    ``smooth-vs-mcdo`` node of compare.h5) and each quantity's difference and interval in the evidence.

    With one seed per model the verdict is :data:`ONE_SEED` (the intervals cover the test data of this
    run, not training noise); ``within`` then holds what they say.
    """
    from .compare import describe_verdict

    names = [str(q) for q in comparison["quantity"]]
    out = []
    for claim, wanted in zip(claims, CLAIM_QUANTITIES):
        rows = [names.index(w.format(n=n_max)) for w in wanted if w.format(n=n_max) in names]
        verdicts = [str(comparison["verdict"][i]) for i in rows]
        parts = []
        for i, v in zip(rows, verdicts):
            low, high = float(comparison["low"][i]), float(comparison["high"][i])
            if np.isfinite(low) and np.isfinite(high):
                said = f"[{low:.3g}, {high:.3g}], {describe_verdict(v, 'mcdo', 'smooth')}"
            else:
                said = "(no interval)"
            parts.append(f"{names[i]}: smooth - mcdo = {float(comparison['estimate'][i]):.3g} {said}")
        within = claim_verdict(verdicts)
        verdict = ONE_SEED if seeds == 1 else within
        scope = "within this run (test data only)" if seeds == 1 else f"across {seeds} seeds per model"
        out.append(dict(claim, verdict=verdict, within=within,
                        evidence=f"{claim['evidence']}; {scope}: " + "; ".join(parts)))
    return out


def run_compare_stage(results: dict[str, Sequence[Path]], output: Path, figure: Path, cfg: DemoConfig):
    """``lt compare`` of the analyses' files (one per seed each) into ``output`` and its forest plot."""
    from . import store
    from .compare import compare_files
    from .plotting import render

    files = [str(p) for kind in ANALYSES for p in results[kind]]
    compare_files(files, str(output), seed=cfg.seed, overwrite=True)
    render([str(output)], str(figure))
    return store.read_result(output).models["smooth-vs-mcdo"]


# ----------------------------------------------------------------------------- report
def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def write_report(path: Path, cfg: DemoConfig, numbers: dict, claims: list[dict], seconds: dict[str, float],
                 device, compare_figure: str | None = None) -> Path:
    """``report.md``: configuration, the table of key numbers, the claims, the figures (relative paths)."""
    p, s = (numbers[label] for label, _, _ in MODELS)
    nmax = p["n_max"]
    head = [f"{label} ({arch})" for label, arch, _ in MODELS]
    rows = [
        ("parameters", f"{p['num_params']:,}", f"{s['num_params']:,}"),
        ("test accuracy, one deterministic pass (dropout off)", _fmt(p["train_test_accuracy"]),
         _fmt(s["train_test_accuracy"])),
        ("test accuracy, N = 1", _fmt(p["accuracy_1"]), _fmt(s["accuracy_1"])),
        (f"test accuracy, N = {nmax}", _fmt(p["accuracy_max"]), _fmt(s["accuracy_max"])),
        ("NLL, N = 1", _fmt(p["nll_1"]), _fmt(s["nll_1"])),
        (f"NLL, N = {nmax}", _fmt(p["nll_max"]), _fmt(s["nll_max"])),
        ("ECE, N = 1", _fmt(p["ece_1"]), _fmt(s["ece_1"])),
        (f"ECE, N = {nmax}", _fmt(p["ece_max"]), _fmt(s["ece_max"])),
        (f"MC samples N to come within {NLL_TOLERANCE:.0%} of the N = {nmax} NLL", str(p["n_needed"]),
         str(s["n_needed"])),
        ("Hessian: median top abs(eigenvalue) over batches", f"{p['top_median']:.4g}", f"{s['top_median']:.4g}"),
        ("Hessian: max top abs(eigenvalue)", f"{p['top_max']:.4g}", f"{s['top_max']:.4g}"),
        ("Hessian: negative eigenvalues", f"{p['negatives']} of {p['eigenvalues']}",
         f"{s['negatives']} of {s['eigenvalues']}"),
        ("Hessian: converged eigenvalues", f"{p['converged']} of {p['eigenvalues']}",
         f"{s['converged']} of {s['eigenvalues']}"),
        ("surface: loss at the centre", _fmt(p["surface_centre"]), _fmt(s["surface_centre"])),
        ("surface: mean loss on the grid border", _fmt(p["surface_edge"]), _fmt(s["surface_edge"])),
        ("surface: rise, border minus centre (sharpness)", _fmt(p["surface_rise"]), _fmt(s["surface_rise"])),
        ("feature-map MC variance, mean over stages", f"{p['featvar_mean']:.4g}", f"{s['featvar_mean']:.4g}"),
    ]
    lines = ["# landscape-tools demo report", "",
             f"Two ResNet-18s (width {cfg.width}) trained on the built-in `digits` data (1,347 training / 450 test "
             f"images, 8x8 upsampled to 32x32) for {cfg.epochs} epochs: **{MODELS[0][0]}** = {MODELS[0][2]}, "
             f"**{MODELS[1][0]}** = {MODELS[1][2]}. Configuration `{cfg.name}`, seed {cfg.seed}, device {device}"
             + (f", {sum(seconds.values()):.0f} s" if seconds else "") + ".", "",
             "## Key numbers", "",
             "| | " + " | ".join(head) + " |", "|---|---:|---:|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += ["", f"N is the number of MC-dropout samples averaged (`evaluate.h5`, test split"
              f"{'' if cfg.eval_samples is None else f', {cfg.eval_samples} samples'}); Hessians: top-{cfg.hessian_k} "
              f"by magnitude of {cfg.hessian_batches} training batches of {cfg.hessian_batch_size} (`hessian.h5`); "
              f"surface: {cfg.surface_points}x{cfg.surface_points} grid over [-{cfg.surface_range:g}, "
              f"{cfg.surface_range:g}]^2 along filter-normalised random directions, {cfg.surface_samples} training "
              f"samples (`surface.h5`); feature variance: {cfg.featvar_mc} MC samples of {cfg.featvar_samples} test "
              f"images at the zoo's stage outputs (`featvar.h5`).", "",
              "## The paper's claims on this data", "",
              "| claim (Park & Kim 2022) | showed up here? | evidence (smooth vs mcdo; 95% intervals from `lt compare`) |",
              "|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} |" for c in claims]
    lines += ["", f"One training run per model, so no claim gets a verdict: the numbers move more between training "
              f"seeds than between these models. The intervals beside them (`compare.h5`, made by `lt compare`) "
              f"cover the noise of this run's test samples, batches and directions only; a difference they detect "
              f"says these two networks differ, not that smoothing does. `lt demo --seeds {DEFAULT_SEEDS}` trains "
              f"{DEFAULT_SEEDS} seeds per model and gives verdicts across training runs.", "", "## Figures", ""]
    for _, _, fig, caption in FIGURES:
        lines += [f"### {caption[0].upper() + caption[1:]}", "", f"![{caption}]({fig})", ""]
    if compare_figure:
        lines += ["### Differences smooth - mcdo with 95% intervals (`lt compare`)", "",
                  f"![differences smooth - mcdo]({compare_figure})", ""]
    if seconds:
        lines += ["## Time per stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
        lines += [""]
    lines += ["Every number above is read back from the files in this folder; `lt info FILE.h5` describes a file "
              "and `lt plot FILE.h5 -o FIG.png` redraws it.", ""]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- the whole demo
def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None, device="cpu", overwrite: bool = False,
             log: Callable[[str], None] | None = None,
             progress_for: Callable[[str], Progress] | None = None, seeds: int = 1) -> DemoResult:
    """Train both models, run every analysis, draw every figure and write ``report.md`` into ``out_dir``.

    ``seeds`` > 1: the whole demo once per seed ``config.seed, config.seed + 1, ...`` into
    ``out_dir/seed<S>/`` (each with its own report), then ``lt compare`` of every seed's files (seeds
    as the replicate unit: Welch t on per-seed values) into ``out_dir/compare.h5`` and a report whose
    claim verdicts come from it.  One seed: the claims get :data:`ONE_SEED`, with the intervals of
    ``lt compare`` within the run beside the numbers.

    Without ``overwrite`` a folder holding ``report.md`` is refused; outputs of an interrupted run
    of the same configuration are reused (checkpoints, finished result files) or resumed (the
    analyses' ``.partial`` files); outputs of another configuration are refused. With ``overwrite``
    everything is recomputed and replaced. Figures and the report are always redrawn.

    Args:
        out_dir: the folder (created if missing).
        config: :meth:`DemoConfig.full` (default) or :meth:`DemoConfig.quick`.
        device: a ``torch.device`` (or its name).
        overwrite: recompute and replace everything.
        log: receives one line per stage (headers and summaries).
        progress_for: ``progress_for(title) -> progress(done, total, message)`` for each long step.

    Returns:
        a :class:`DemoResult`.

    Raises:
        ConfigError: the folder holds a finished demo (no ``overwrite``) or outputs of another
            configuration; ``seeds`` below 1.
        LTError: from the analyses.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r}: expected a whole number of training seeds per model, at least 1 "
                          f"(e.g. {DEFAULT_SEEDS})")
    if seeds > 1:
        return _run_seeds(out_dir, config or DemoConfig.full(), device, overwrite, log or (lambda message: None),
                          progress_for or (lambda title: None), seeds)
    return _run_one(out_dir, config, device, overwrite, log, progress_for)


def _run_one(out_dir, config, device, overwrite, log, progress_for) -> DemoResult:
    """One seed: the demo as described in :func:`run_demo`."""
    from .plotting import render

    cfg = config or DemoConfig.full()
    log = log or (lambda message: None)
    progress_for = progress_for or (lambda title: None)
    device = torch.device(device)
    out = check_output_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out)
    seconds: dict[str, float] = {}
    reused: list[str] = []
    stages = ["train", *ANALYSES, "figures", "compare", "report"]

    def header(i: int, text: str) -> None:
        log(f"== [{i + 1}/{len(stages)}] {text}")

    with deterministic(cfg.seed):
        start = time.monotonic()
        header(0, f"train {', '.join(arch for _, arch, _ in MODELS)} (width {cfg.width}, {cfg.epochs} epochs)")
        checkpoints, reused_models = train_models(cfg, out, device, overwrite, log, progress_for)
        reused += [f"{label}.pt" for label in reused_models]
        seconds["train"] = time.monotonic() - start
        loaded = _load(checkpoints, device)
        shas = {info.label: info.sha256 for _, info in loaded}
        stage_text = {
            "evaluate": f"evaluate: MC ensembles N = {','.join(map(str, cfg.mc_sizes))} on the test split",
            "hessian": f"hessian: top-{cfg.hessian_k} eigenvalues of {cfg.hessian_batches} training batches of "
                       f"{cfg.hessian_batch_size}",
            "surface": f"surface: {cfg.surface_points}x{cfg.surface_points} grid over [-{cfg.surface_range:g}, "
                       f"{cfg.surface_range:g}]^2 on {cfg.surface_samples} training samples",
            "featvar": f"featvar: MC variance ({cfg.featvar_mc} samples) and Fourier at the stages, "
                       f"{cfg.featvar_samples} test images"}
        for i, kind in enumerate(ANALYSES, start=1):
            header(i, stage_text[kind])
            path = paths[kind]
            if not overwrite and _reusable_result(path, cfg, shas):
                log(f"reusing {path}")
                reused.append(path.name)
                continue
            start = time.monotonic()
            with deterministic(cfg.seed):
                if kind == "evaluate":
                    run_evaluate(cfg, loaded, path, device, progress_for)
                elif kind == "hessian":
                    run_hessian_stage(cfg, loaded, path, device, overwrite, progress_for)
                elif kind == "surface":
                    run_surface_stage(cfg, loaded, path, device, overwrite, progress_for)
                else:
                    run_featvar_stage(cfg, loaded, path, device, overwrite, progress_for)
            seconds[kind] = time.monotonic() - start
            log(f"{path} written ({seconds[kind]:.0f} s)")

    header(len(ANALYSES) + 1, f"figures ({len(FIGURES)} png)")
    start = time.monotonic()
    figures = []
    draw = progress_for("figures")
    for j, (kind, variant, name, _) in enumerate(FIGURES):
        figures.append(render([str(paths[kind])], str(paths[name]), kind=variant))
        if draw is not None:
            draw(j + 1, len(FIGURES), name)
    seconds["figures"] = time.monotonic() - start

    header(len(ANALYSES) + 2, "compare: smooth - mcdo with 95% intervals (lt compare)")
    start = time.monotonic()
    results = {kind: paths[kind] for kind in ANALYSES}
    comparison = run_compare_stage({kind: [path] for kind, path in results.items()}, paths["compare"],
                                   paths["compare_figure"], cfg)
    seconds["compare"] = time.monotonic() - start

    header(len(ANALYSES) + 3, "report")
    numbers = key_numbers(results, checkpoints)
    claims = compared_claims(judge_claims(numbers), comparison, numbers[MODELS[0][0]]["n_max"], 1)
    write_report(paths["report"], cfg, numbers, claims, seconds, device, paths["compare_figure"].name)
    return DemoResult(out, checkpoints, results, figures + [paths["compare_figure"]], paths["report"], numbers, claims,
                      seconds, reused, paths["compare"])


def _mean_numbers(runs: Sequence[DemoResult]) -> dict:
    """Each model's key numbers averaged over the runs (per-layer featvar too), for the claims' evidence."""
    out = {}
    for label in runs[0].numbers:
        first = runs[0].numbers[label]
        mean = {}
        for key, value in first.items():
            if isinstance(value, dict):
                mean[key] = {k: float(np.mean([r.numbers[label][key][k] for r in runs])) for k in value}
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "n_max":
                mean[key] = float(np.mean([r.numbers[label][key] for r in runs]))
            else:
                mean[key] = value
        out[label] = mean
    return out


def _run_seeds(out_dir, cfg: DemoConfig, device, overwrite: bool, log, progress_for, seeds: int) -> DemoResult:
    from dataclasses import replace

    out = check_output_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    runs, seconds = [], {}
    for k in range(seeds):
        sub_cfg = replace(cfg, seed=cfg.seed + k)
        sub = out / f"seed{sub_cfg.seed}"
        log(f"=== seed {sub_cfg.seed} ({k + 1} of {seeds}) into {sub}/")
        if not overwrite and (sub / "report.md").exists():
            (sub / "report.md").unlink()            # a finished seed: its checkpoints and files are reused
        start = time.monotonic()
        runs.append(_run_one(sub, sub_cfg, device, overwrite, log, progress_for))
        seconds[f"seed {sub_cfg.seed}"] = time.monotonic() - start
    log(f"=== compare across {seeds} seeds per model (lt compare: Welch t on per-seed values)")
    start = time.monotonic()
    paths = output_paths(out)
    comparison = run_compare_stage({kind: [r.results[kind] for r in runs] for kind in ANALYSES}, paths["compare"],
                                   paths["compare_figure"], cfg)
    seconds["compare"] = time.monotonic() - start
    numbers = _mean_numbers(runs)
    n_max = numbers[MODELS[0][0]]["n_max"]
    claims = compared_claims(judge_claims(numbers), comparison, n_max, seeds)
    write_seeds_report(paths["report"], cfg, runs, comparison, claims, seconds, device, paths["compare_figure"].name)
    return DemoResult(out, {f"{label}@seed{i + cfg.seed}": r.checkpoints[label] for i, r in enumerate(runs)
                            for label in r.checkpoints},
                      {f"{kind}@seed{i + cfg.seed}": r.results[kind] for i, r in enumerate(runs) for kind in ANALYSES},
                      [f for r in runs for f in r.figures] + [paths["compare_figure"]], paths["report"], numbers,
                      claims, seconds, [x for r in runs for x in r.reused], paths["compare"], runs)


def write_seeds_report(path: Path, cfg: DemoConfig, runs: Sequence[DemoResult], comparison, claims: list[dict],
                       seconds: dict[str, float], device, compare_figure: str) -> Path:
    """``report.md`` of a demo over several seeds: claims with verdicts across training runs, every
    difference of ``compare.h5`` with its interval, the per-seed reports and the time taken."""
    seeds = [cfg.seed + i for i in range(len(runs))]
    lines = ["# landscape-tools demo report, several training seeds", "",
             f"The demo (configuration `{cfg.name}`, device {device}) run once per seed {', '.join(map(str, seeds))}: "
             f"each seed trains both models (**mcdo** = {MODELS[0][2]}, **smooth** = {MODELS[1][2]}) and runs "
             f"every analysis (`seed<S>/`, each with its own report). `lt compare` then treats the seeds as the "
             f"replicate unit: each seed's number is one observation and the difference smooth - mcdo of the seed "
             f"means gets a 95% Welch t interval (`compare.h5`). {sum(seconds.values()):.0f} s in all.", "",
             "## The paper's claims across training runs", "",
             "| claim (Park & Kim 2022) | verdict | evidence (means over seeds, smooth vs mcdo; 95% intervals) |",
             "|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} |" for c in claims]
    lines += ["", "Verdicts: yes = every quantity of the claim favours smoothing (its interval excludes 0 on the "
              "better side); no detectable difference = every interval contains 0; partly / mixed / the opposite as "
              "said. With few seeds the intervals are wide (Welch t with few degrees of freedom): no detectable "
              "difference is not evidence of no difference.", "",
              "## Every difference (smooth - mcdo)", "",
              "| analysis | quantity | mcdo | smooth | smooth - mcdo | 95% interval | verdict |",
              "|---|---|---:|---:|---:|---|---|"]
    from .compare import describe_verdict
    for i in range(len(comparison["quantity"])):
        low, high = float(comparison["low"][i]), float(comparison["high"][i])
        interval = f"[{low:.4g}, {high:.4g}]" if np.isfinite(low) and np.isfinite(high) else "-"
        lines.append(f"| {comparison['analysis'][i]} | {comparison['quantity'][i]} | {float(comparison['value_a'][i]):.4g} "
                     f"| {float(comparison['value_b'][i]):.4g} | {float(comparison['estimate'][i]):.4g} | {interval} | "
                     f"{describe_verdict(str(comparison['verdict'][i]), 'mcdo', 'smooth')} |")
    lines += ["", "## Per seed", ""]
    lines += [f"- seed {s}: [seed{s}/report.md](seed{s}/report.md)" for s in seeds]
    lines += ["", f"![differences smooth - mcdo]({compare_figure})", "", "## Time", "", "| stage | seconds |",
              "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines += [""]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
