"""``lt compare``: differences between models with confidence intervals and verdicts (issue #16).

Result files of two or more models (one file with several model groups, or several files) are grouped
by label; several entries with the same label (e.g. several training seeds of one model) pool as
replicates.  For every quantity the files support, the difference **B - A** (A: the first label, B:
each other label in turn) gets a two-sided confidence interval at ``level`` and a verdict:

* ``favours A`` / ``favours B``: the interval excludes 0 and the side it lies on is better for that
  model (per quantity: lower NLL, ECE, Brier, MC samples needed, Hessian eigenvalue magnitude,
  negative eigenvalues, feature-map variance and surface sharpness; higher accuracy);
* ``no detectable difference``: the interval contains 0 (or there is no interval: one unit only).

The replicate unit:

* **one entry per label** (one training run per model): the units inside the files.  evaluate: the
  test samples (per-sample values stored by ``lt evaluate``); hessian: the data batches (one spectrum
  each); featvar: the data batches (per-batch variance); surface: the direction pairs (``lt surface
  --repeats K``: K pairs, the same seeds for every model of the run; one pair: no interval), with two
  quantities per pair: the centre-to-border rise and the curvature at the centre.
  **Paired** when both models saw the same units (same data description, sample
  indices / batch sizes, direction seeds), otherwise unpaired (said in the ``note``).
  Means (NLL, accuracy, Brier, negative eigenvalues per batch, feature-map variance) get a t interval
  (``scipy.stats.ttest_rel`` paired, Welch ``scipy.stats.ttest_ind(equal_var=False)`` unpaired);
  the other statistics (ECE, MC samples to come within ``within`` of the largest N's NLL, median top
  eigenvalue magnitude) a bootstrap interval over the units (``scipy.stats.bootstrap``, BCa, ``resamples``
  resamples, seeded by ``derive_seed(seed, COMPARE_QUANTITY, crc32(kind/quantity))``; paired: the same
  resampled units for A and B),
  and their verdict also needs a permutation test (``scipy.stats.permutation_test``: paired, A's and
  B's value of a unit swapped at random) to reject at ``1 - level``: bootstrap intervals of ECE or of a
  median under-cover with a few hundred units (measured: 8-11 % false detections at 95 %), the
  permutation test keeps the false-detection rate at its level.  Fewer than 8 units: no interval.
  These intervals cover sampling noise of the test data / batches only, not training-seed variation.
* **two or more entries for every label** (training seeds): the seed is the unit.  Each entry's
  summary value (the number its file reports) is one observation, and the difference of the seed
  means gets a Welch t interval (``scipy.stats.ttest_ind(equal_var=False)``).
"""
from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import seeds
from .errors import ConfigError
from .seeds import derive_seed

LEVEL = 0.95
RESAMPLES = 2000
#: "MC samples to come within x of the largest N's NLL": x (relative), as the demo's report
WITHIN = 0.02
#: bootstrap interval: BCa (bias-corrected and accelerated; ECE is biased under resampling) up to this many
#: units, whose jackknife costs n statistics of n - 1 units; percentile above it
BCA_MAX_UNITS = 5000
#: fewer units than this per model: no bootstrap interval (a median of 4 batches has too few distinct resamples)
MIN_BOOTSTRAP_UNITS = 8
BOOTSTRAP_METHOD = "BCa up to 5000 units per model, percentile above"
VERDICTS = ("favours A", "favours B", "no detectable difference")
ANALYSES = ("evaluate", "hessian", "featvar", "surface")


# ----------------------------------------------------------------------------- intervals
@dataclass
class Interval:
    """A difference ``B - A`` with its interval; ``low``/``high`` NaN when there is none."""

    estimate: float
    low: float
    high: float
    method: str
    p_value: float = math.nan


def _degenerate(diff: float) -> Interval | None:
    return Interval(diff, diff, diff, "exact (no spread)")


def paired_t(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of the paired differences ``b - a`` with the interval of ``scipy.stats.ttest_rel(b, a)``.

    Differences without spread (e.g. a model against itself) give the exact interval [d, d]."""
    from scipy import stats

    a, b = _floats(a), _floats(b)
    d = b - a
    if d.size < 2:
        return Interval(float(d.mean()) if d.size else math.nan, math.nan, math.nan, "none (fewer than 2 units)")
    if np.all(d == d[0]):
        return _degenerate(float(d[0]))
    res = stats.ttest_rel(b, a)
    ci = res.confidence_interval(level)
    return Interval(float(d.mean()), float(ci.low), float(ci.high), "paired t (scipy.stats.ttest_rel)",
                    float(res.pvalue))


def welch_t(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """``mean(b) - mean(a)`` with the Welch interval of ``scipy.stats.ttest_ind(b, a, equal_var=False)``.

    Both groups without spread give the exact interval [d, d]."""
    from scipy import stats

    a, b = _floats(a), _floats(b)
    diff = float(b.mean() - a.mean())
    if a.size < 2 or b.size < 2:
        return Interval(diff, math.nan, math.nan, "none (one unit on a side)")
    if np.all(a == a[0]) and np.all(b == b[0]):
        return _degenerate(diff)
    res = stats.ttest_ind(b, a, equal_var=False)
    ci = res.confidence_interval(level)
    return Interval(diff, float(ci.low), float(ci.high), "Welch t (scipy.stats.ttest_ind, equal_var=False)",
                    float(res.pvalue))


def bootstrap_difference(statistic: Callable[[np.ndarray], np.ndarray], n_a: int, n_b: int | None = None,
                         statistic_b: Callable[[np.ndarray], np.ndarray] | None = None, level: float = LEVEL,
                         resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Bootstrap interval (``scipy.stats.bootstrap``: BCa up to :data:`BCA_MAX_UNITS` units, percentile
    above) of ``statistic_b(units of B) - statistic(units of A)``.

    Resampling draws unit indices: ``n_b`` None means paired (A and B share the ``n_a`` units and one
    resample of indices serves both; then ``statistic`` maps indices ``(..., n)`` to the difference
    directly); otherwise A's ``n_a`` and B's ``n_b`` units are resampled independently and
    ``statistic(idx_a)``, ``statistic_b(idx_b)`` give each side's value (vectorised over leading axes).
    """
    from scipy import stats

    rng = np.random.default_rng(seed)
    if n_b is None:
        data = (np.arange(n_a),)

        def stat(i, axis=-1):
            return statistic(i)
        estimate = float(statistic(np.arange(n_a)))
    else:
        data = (np.arange(n_a), np.arange(n_b))

        def stat(i, j, axis=-1):
            return statistic_b(j) - statistic(i)
        estimate = float(statistic_b(np.arange(n_b)) - statistic(np.arange(n_a)))
    longest = max(n_a, n_b or 0)
    method = "BCa" if longest <= BCA_MAX_UNITS else "percentile"
    options = dict(n_resamples=int(resamples), confidence_level=level, vectorized=True, paired=False,
                   batch=max(1, 2_000_000 // max(longest, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # BCa on a degenerate distribution: NaN, handled below
        res = stats.bootstrap(data, stat, method=method, rng=rng, **options)
    ci = res.confidence_interval
    if not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        spread = np.ptp(res.bootstrap_distribution)
        if spread == 0:                             # every resample gives the same difference
            return Interval(estimate, float(res.bootstrap_distribution.flat[0]),
                            float(res.bootstrap_distribution.flat[0]), "exact (no spread across resamples)")
        method = "percentile"
        res = stats.bootstrap(data, stat, method=method, rng=np.random.default_rng(seed), **options)
        ci = res.confidence_interval
    kind = "paired" if n_b is None else "unpaired"
    return Interval(estimate, float(ci.low), float(ci.high),
                    f"{kind} {method} bootstrap (scipy.stats.bootstrap, {int(resamples)} resamples)")


def statistic_difference(stat: Callable[..., np.ndarray], arrays_a: Sequence[np.ndarray],
                         arrays_b: Sequence[np.ndarray], paired: bool, level: float = LEVEL,
                         resamples: int = RESAMPLES, seed: int = 0) -> tuple[Interval, float]:
    """``stat(*arrays_b) - stat(*arrays_a)`` (units along the last axis of every array) with a bootstrap
    interval (:func:`bootstrap_difference`) and the two-sided p-value of a permutation test
    (``scipy.stats.permutation_test``: paired, A's and B's value of each unit swapped at random;
    unpaired, units reassigned between A and B), ``resamples`` each, seeded by ``seed``."""
    from scipy import stats

    arrays_a = [np.asarray(x, dtype=np.float64) for x in arrays_a]
    arrays_b = [np.asarray(x, dtype=np.float64) for x in arrays_b]
    n_a, n_b = arrays_a[0].shape[-1], arrays_b[0].shape[-1]

    def side(arrays, idx):
        return stat(*[x[..., idx] for x in arrays])
    if paired:
        interval = bootstrap_difference(lambda i: side(arrays_b, i) - side(arrays_a, i), n_a, level=level,
                                        resamples=resamples, seed=seed)
    else:
        interval = bootstrap_difference(lambda i: side(arrays_a, i), n_a, n_b, lambda j: side(arrays_b, j),
                                        level=level, resamples=resamples, seed=seed)
    # codes 0..n_a-1: A's units, n_a..: B's units, looked up in the pooled arrays
    pooled = [np.concatenate([xa, xb], axis=-1) for xa, xb in zip(arrays_a, arrays_b)]

    def swapped(x, y, axis=-1):
        return side(pooled, y) - side(pooled, x)
    res = stats.permutation_test((np.arange(n_a), n_a + np.arange(n_b)), swapped,
                                 permutation_type="samples" if paired else "independent", vectorized=True,
                                 n_resamples=int(resamples), rng=np.random.default_rng([seed, 1]),
                                 batch=max(1, 2_000_000 // max(n_a + n_b, 1)))
    return interval, float(res.pvalue)


def _excludes_zero(interval: Interval) -> bool:
    return bool(interval.low > 0 or interval.high < 0)


def verdict(interval: Interval, better: str, p_value: float = math.nan, alpha: float | None = None) -> str:
    """``favours A`` / ``favours B`` / ``no detectable difference`` for ``B - A`` where ``better`` is
    ``lower`` or ``higher`` (which values favour a model).  With ``alpha``, a difference also needs
    ``p_value < alpha`` (a test that agrees with the interval; NaN p-values are not checked)."""
    lo, hi = interval.low, interval.high
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return VERDICTS[2]
    if alpha is not None and math.isfinite(p_value) and not p_value < alpha:
        return VERDICTS[2]
    if lo > 0:
        return VERDICTS[1] if better == "higher" else VERDICTS[0]
    if hi < 0:
        return VERDICTS[0] if better == "higher" else VERDICTS[1]
    return VERDICTS[2]


def _floats(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


# ----------------------------------------------------------------------------- entries
@dataclass
class Entry:
    """One model group of one result file, under a comparison label."""

    label: str
    path: str
    group: str
    kind: str
    node: Any
    root: dict


def collect(results: Sequence[Any], labels: Sequence[str] | None = None) -> list[Entry]:
    """The (file, group) entries of ``results`` (``store.Result``) in order, labelled by ``labels``
    (one per entry) or by their group names.

    Raises:
        ConfigError: a kind ``lt compare`` cannot use, or a wrong number of labels.
    """
    entries = []
    for res in results:
        if res.kind not in ANALYSES:
            raise ConfigError(f"{res.path} holds {res.kind!r} results; lt compare reads {', '.join(ANALYSES)} files")
        for group, node in res.models.items():
            entries.append(Entry(group, res.path, group, res.kind, node, res.attrs))
    if labels is not None:
        if len(labels) != len(entries):
            listing = ", ".join(f"{e.path}:{e.group}" for e in entries)
            raise ConfigError(f"--labels gives {len(labels)} labels for {len(entries)} model groups ({listing}); "
                              f"give one label per group, in this order")
        for e, lab in zip(entries, labels):
            e.label = lab
    return entries


# ----------------------------------------------------------------------------- quantities
@dataclass
class Quantity:
    """One comparable number of one analysis.

    Attributes:
        analysis, name, metric: e.g. ``evaluate``, ``NLL at N=10``, ``NLL`` (the forest-plot panel).
        better: ``lower`` or ``higher``; ``wording``: what "better" means, e.g. ``smaller magnitude``.
        value: entry -> its summary value (the number its file reports).
        units: entry -> per-unit array (for t intervals; None: statistic-based).
        arrays: entry -> per-unit arrays (units along the last axis) that ``stat`` reduces.
        stat: ``(*arrays) -> value``, reducing the last axis (vectorised over leading axes): for the
            bootstrap interval and the permutation test (None: t on ``units``).
        count: entry -> number of units.
    """

    analysis: str
    name: str
    metric: str
    better: str
    wording: str
    value: Callable[[Entry], float]
    units: Callable[[Entry], np.ndarray] | None = None
    arrays: Callable[[Entry], tuple] | None = None
    stat: Callable[..., np.ndarray] | None = None
    count: Callable[[Entry], int] | None = None


def _evaluate_quantities(a: Entry, b: Entry, within: float) -> list[Quantity]:
    sizes = [int(n) for n in a.node["n_samples"] if int(n) in {int(m) for m in b.node["n_samples"]}]
    per = "per_sample"
    have_units = per in a.node.groups and per in b.node.groups
    out = []

    def row(e: Entry, n: int) -> int:
        return int(np.flatnonzero(np.asarray(e.node["n_samples"]) == n)[0])

    def arr(e: Entry, key: str, n: int) -> np.ndarray:
        return np.asarray(e.node.groups[per].data[key][row(e, n)], dtype=np.float64)

    def count(e: Entry) -> int:
        return int(e.node.groups[per].data["log_prob"].shape[1])

    for n in sizes:
        def summary(key, n=n):
            return lambda e: float(np.asarray(e.node[key])[row(e, n)])
        out.append(Quantity("evaluate", f"NLL at N={n}", "NLL", "lower", "lower NLL", summary("nll"),
                            (lambda e, n=n: -arr(e, "log_prob", n)) if have_units else None, count=count))
        out.append(Quantity("evaluate", f"accuracy at N={n}", "accuracy", "higher", "higher accuracy",
                            summary("accuracy"), (lambda e, n=n: arr(e, "correct", n)) if have_units else None,
                            count=count))
        out.append(Quantity("evaluate", f"Brier at N={n}", "Brier", "lower", "lower Brier score", summary("brier"),
                            (lambda e, n=n: arr(e, "brier", n)) if have_units else None, count=count))

        bins = int(a.node.attrs.get("ece_bins", 10))
        out.append(Quantity("evaluate", f"ECE at N={n}", "ECE", "lower", "lower ECE", summary("ece"),
                            arrays=lambda e, n=n: (arr(e, "confidence", n), arr(e, "correct", n)),
                            stat=(lambda conf, ok, bins=bins: ece(conf, ok, bins)) if have_units else None,
                            count=count))
    if len(sizes) >= 2:
        def needed_value(e: Entry) -> float:
            nll = np.array([float(np.asarray(e.node["nll"])[row(e, n)]) for n in sizes])
            return float(sizes[int(np.argmax(nll <= nll[-1] * (1 + within)))])

        def needed_arrays(e: Entry) -> tuple:
            rows = [row(e, n) for n in sizes]
            return (np.asarray(e.node.groups[per].data["log_prob"], dtype=np.float64)[rows],)

        def needed_stat(logp: np.ndarray) -> np.ndarray:
            nll = -logp.mean(axis=-1)                                # (S, ...)
            first = np.argmax(nll <= nll[-1] * (1 + within), axis=0)
            return np.asarray(sizes, dtype=np.float64)[first]
        out.append(Quantity("evaluate", f"MC samples to come within {within:.0%} of the N={sizes[-1]} NLL",
                            "MC samples needed", "lower", "fewer MC samples", needed_value,
                            arrays=needed_arrays, stat=needed_stat if have_units else None, count=count))
    return out


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Expected calibration error along the last axis, binned as :class:`~landscape_tools.evaluate.MetricAccumulator`
    (bin ``b`` holds ``(edges[b], edges[b+1]]``, 0 in the first bin): ``sum_b |sum_{i in b} (correct_i -
    confidence_i)| / n``, vectorised over leading axes."""
    conf = np.asarray(confidence, dtype=np.float64)
    gap = np.broadcast_to(np.asarray(correct, dtype=np.float64), conf.shape) - conf
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    lead = conf.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    slot = (np.arange(rows).reshape(lead + (1,)) * n_bins + bins).ravel()
    sums = np.bincount(slot, weights=gap.ravel(), minlength=rows * n_bins).reshape(lead + (n_bins,))
    return np.abs(sums).sum(axis=-1) / conf.shape[-1]


def _hessian_quantities(a: Entry, b: Entry) -> list[Quantity]:
    def ev(e: Entry) -> np.ndarray:
        values = np.asarray(e.node["eigenvalues"], dtype=np.float64)
        done = np.asarray(e.node.data.get("done", np.ones(len(values), bool)), dtype=bool)
        return values[done & ~np.all(np.isnan(values), axis=1)]

    def top(e: Entry) -> np.ndarray:
        return np.abs(ev(e)[:, 0])

    def negatives(e: Entry) -> np.ndarray:
        return np.sum(ev(e) < 0, axis=1).astype(np.float64)

    return [Quantity("hessian", "median |top eigenvalue| over batches", "Hessian top eigenvalue", "lower",
                     "smaller magnitude", lambda e: float(np.median(top(e))),
                     arrays=lambda e: (top(e),), stat=lambda t: np.median(t, axis=-1), count=lambda e: len(top(e))),
            Quantity("hessian", "negative eigenvalues per batch", "Hessian negative eigenvalues", "lower",
                     "fewer negative eigenvalues", lambda e: float(np.mean(negatives(e))), negatives,
                     count=lambda e: len(negatives(e)))]


def _featvar_quantities(a: Entry, b: Entry) -> list[Quantity]:
    names_a, names_b = [str(v) for v in a.node["layers"]], [str(v) for v in b.node["layers"]]
    if names_a == names_b:
        pairs = [(i, i, n) for i, n in enumerate(names_a)]
    elif len(names_a) == len(names_b):      # e.g. the same stages under other module names: by position
        pairs = [(i, i, n if n == m else f"{n} / {m}") for i, (n, m) in enumerate(zip(names_a, names_b))]
    else:
        pairs = [(names_a.index(n), names_b.index(n), n) for n in names_a if n in names_b]

    def per_batch(e: Entry) -> np.ndarray:
        if "batch_variance" in e.node.data:
            return np.asarray(e.node["batch_variance"], dtype=np.float64)
        sums = e.node.groups["sums"].data                      # files of older versions: from the sums
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(sums["count"] > 0, sums["var_sum"] / np.maximum(sums["count"], 1), np.nan)

    have_units = all("batch_variance" in e.node.data or "sums" in e.node.groups for e in (a, b))
    out = []
    for k, (i, j, name) in enumerate(pairs):
        col = {a.label: i, b.label: j}
        out.append(Quantity("featvar", f"variance at {name}", "feature-map variance", "lower",
                            "lower variance (more stable)",
                            lambda e, col=col: float(np.asarray(e.node["variance"])[col[e.label]]),
                            (lambda e, col=col: per_batch(e)[:, col[e.label]]) if have_units else None,
                            count=lambda e: per_batch(e).shape[0]))
    ia, ib = [p[0] for p in pairs], [p[1] for p in pairs]
    cols = {a.label: ia, b.label: ib}

    def batch_mean(e: Entry) -> np.ndarray:
        with warnings.catch_warnings():        # a layer without entries in every batch: NaN, said nowhere else
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(per_batch(e)[:, cols[e.label]], axis=1)
    out.append(Quantity("featvar", "mean variance over layers", "feature-map variance", "lower",
                        "lower variance (more stable)",
                        lambda e: float(np.nanmean(np.asarray(e.node["variance"])[cols[e.label]])),
                        batch_mean if have_units else None, count=lambda e: per_batch(e).shape[0]))
    return out


def surface_rises(node) -> np.ndarray:
    """Sharpness of a surface: mean loss on the grid's border minus the loss at the centre (the grid
    point nearest 0), one value per direction pair (a leading axis of ``loss`` beyond the grid's
    dimensions is taken as repeats): :func:`landscape_tools.surface.border_rise`."""
    from .surface import border_rise

    loss = np.asarray(node["loss"], dtype=np.float64)
    x = np.asarray(node["x"], dtype=np.float64)
    two = "y" in node.data and loss.ndim >= 2 and loss.shape[-2:] == (len(x), len(node["y"]))
    return border_rise(loss, x, np.asarray(node["y"], dtype=np.float64) if two else None)


def surface_curvatures(node) -> np.ndarray:
    """Curvature of a surface at its centre, the mean over its directions of the second difference of the
    stored grid (:func:`landscape_tools.surface.centre_curvature`), one value per direction pair."""
    from .surface import centre_curvature

    loss = np.asarray(node["loss"], dtype=np.float64)
    x = np.asarray(node["x"], dtype=np.float64)
    two = "y" in node.data and loss.ndim >= 2 and loss.shape[-2:] == (len(x), len(node["y"]))
    return centre_curvature(loss, x, np.asarray(node["y"], dtype=np.float64) if two else None).mean(axis=1)


def _surface_quantities(a: Entry, b: Entry) -> list[Quantity]:
    return [Quantity("surface", "rise from the centre to the border (sharpness)", "surface sharpness", "lower",
                     "flatter", lambda e: float(np.mean(surface_rises(e.node))), lambda e: surface_rises(e.node),
                     count=lambda e: len(surface_rises(e.node))),
            Quantity("surface", "curvature at the centre (mean over directions)",
                     "surface curvature", "lower", "flatter",
                     lambda e: float(np.mean(surface_curvatures(e.node))), lambda e: surface_curvatures(e.node),
                     count=lambda e: len(surface_curvatures(e.node)))]


QUANTITIES = {"evaluate": _evaluate_quantities, "hessian": _hessian_quantities, "featvar": _featvar_quantities,
              "surface": _surface_quantities}


# ----------------------------------------------------------------------------- pairing
def shared_units(a: Entry, b: Entry) -> tuple[bool, str]:
    """Whether A's and B's units are the same (so the comparison can be paired), and why not."""
    na, nb = a.node, b.node
    if a.kind == "evaluate":
        for key in ("data_spec", "split", "num_samples", "data"):
            if na.attrs.get(key) != nb.attrs.get(key):
                return False, f"different test data ({key}: {na.attrs.get(key)!r} vs {nb.attrs.get(key)!r})"
        ia, ib = na.data.get("sample_indices"), nb.data.get("sample_indices")
        if (ia is None) != (ib is None) or (ia is not None and not np.array_equal(ia, ib)):
            return False, "different test samples (sample_indices)"
        return True, ""
    if a.kind in ("hessian", "featvar"):
        if na.attrs.get("data") != nb.attrs.get("data"):
            return False, "different data batches (data description)"
        if a.kind == "hessian":
            sa, sb = na.data.get("batch_sizes"), nb.data.get("batch_sizes")
        else:
            sa, sb = na.attrs.get("batches"), nb.attrs.get("batches")
        if not np.array_equal(np.asarray(sa), np.asarray(sb)):
            return False, "different batches (batch sizes)"
        if a.kind == "hessian" and na.attrs.get("scope") != nb.attrs.get("scope"):
            return False, "different Hessian scopes"
        return True, ""
    # surface: the same direction pairs need the same direction seeds, normalisation and grid
    for key in ("x", "y"):
        if (key in na.data) != (key in nb.data) or (key in na.data and not np.array_equal(na[key], nb[key])):
            return False, f"different grids ({key})"
    da, db = na.groups.get("directions"), nb.groups.get("directions")
    if da is None or db is None or da.attrs.get("recipe") is None or da.attrs.get("recipe") != db.attrs.get("recipe"):
        return False, "different or unrecorded direction recipes (seed, normalisation)"
    if na.attrs.get("data") != nb.attrs.get("data"):
        return False, "different data (data description)"
    ra, rb = na.data.get("repeat_seeds"), nb.data.get("repeat_seeds")      # lt surface --repeats K
    if (ra is None) != (rb is None) or (ra is not None and not np.array_equal(ra, rb)):
        return False, "different direction pairs (repeat_seeds)"
    return True, ""


# ----------------------------------------------------------------------------- comparing
@dataclass
class Row:
    """One quantity of one comparison (B - A)."""

    analysis: str
    quantity: str
    metric: str
    better: str
    wording: str
    value_a: float
    value_b: float
    estimate: float
    low: float
    high: float
    verdict: str
    method: str
    unit: str
    paired: bool
    n_a: int
    n_b: int
    note: str = ""
    p_value: float = math.nan


@dataclass
class Comparison:
    """Label ``b`` against label ``a``: one :class:`Row` per quantity."""

    a: str
    b: str
    rows: list[Row] = field(default_factory=list)


UNIT_NAMES = {"evaluate": "test samples", "hessian": "data batches", "featvar": "data batches",
              "surface": "direction pairs"}


def compare_entries(entries: Sequence[Entry], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0,
                    within: float = WITHIN) -> list[Comparison]:
    """Every label against the first (see the module docstring).

    Raises:
        ConfigError: fewer than two labels, a label with one entry beside labels with several, a bad
            level / resamples.
    """
    check_options(level, resamples, within)
    order: list[str] = []
    for e in entries:
        if e.label not in order:
            order.append(e.label)
    if len(order) < 2:
        raise ConfigError(f"every model group is labelled {order[0]!r}: lt compare needs two labels; give --labels, "
                          f"e.g. --labels a,b for two files of one group each" if order else "nothing to compare")
    comparisons = [Comparison(order[0], other) for other in order[1:]]
    kinds = [k for k in ANALYSES if any(e.kind == k for e in entries)]
    for kind in kinds:
        by_label = {lab: [e for e in entries if e.kind == kind and e.label == lab] for lab in order}
        for comp in comparisons:
            side_a, side_b = by_label[comp.a], by_label[comp.b]
            if not side_a or not side_b:
                continue
            counts = {comp.a: len(side_a), comp.b: len(side_b)}
            if min(counts.values()) == 1 and max(counts.values()) > 1:
                raise ConfigError(f"{kind}: label {comp.a!r} has {counts[comp.a]} and {comp.b!r} {counts[comp.b]} "
                                  f"model groups; give at least 2 per label for a comparison across training seeds, "
                                  f"or exactly 1 each for a comparison within one run")
            if counts[comp.a] == 1:
                comp.rows += _within_run(kind, side_a[0], side_b[0], level, resamples, seed, within)
            else:
                comp.rows += _across_seeds(kind, side_a, side_b, level, within)
    empty = [f"{c.b} vs {c.a}" for c in comparisons if not c.rows]
    if empty:
        raise ConfigError(f"nothing to compare for {', '.join(empty)}: no analysis holds both labels (with ensemble "
                          f"sizes in common); give files of the same analysis for each label")
    return comparisons


def check_options(level: float, resamples: int, within: float = WITHIN) -> None:
    if not (isinstance(level, (int, float)) and 0.5 <= float(level) < 1):
        raise ConfigError(f"--level {level!r}: expected a confidence level between 0.5 and 1, e.g. 0.95")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 100:
        raise ConfigError(f"--resamples {resamples!r}: expected a whole number of bootstrap resamples, at least "
                          f"100 (default {RESAMPLES})")
    if not (isinstance(within, (int, float)) and 0 < float(within) < 1):
        raise ConfigError(f"--within {within!r}: expected a fraction between 0 and 1, e.g. 0.02 for 2%")


def _within_run(kind: str, a: Entry, b: Entry, level: float, resamples: int, seed: int, within: float) -> list[Row]:
    paired, why = shared_units(a, b)
    rows = []
    for q in QUANTITIES[kind](a, b, within) if kind == "evaluate" else QUANTITIES[kind](a, b):
        va, vb = q.value(a), q.value(b)
        note = "" if paired else f"unpaired: {why}"
        p_value = math.nan
        n_a = n_b = 0
        if q.units is not None:
            ua, ub = q.units(a), q.units(b)
            n_a, n_b = len(ua), len(ub)
            if paired and n_a != n_b:
                paired, note = False, f"unpaired: {n_a} vs {n_b} {UNIT_NAMES[kind]}"
            if paired:
                keep = ~(np.isnan(ua) | np.isnan(ub))
                interval = paired_t(ua[keep], ub[keep], level) if keep.any() else Interval(math.nan, *[math.nan] * 2,
                                                                                             "none")
                p_value = interval.p_value
            else:
                ua, ub = ua[~np.isnan(ua)], ub[~np.isnan(ub)]
                interval = welch_t(ua, ub, level) if ua.size and ub.size else Interval(math.nan, math.nan, math.nan,
                                                                                       "none")
                p_value = interval.p_value
        elif q.stat is not None:
            n_a, n_b = q.count(a), q.count(b)
            if paired and n_a != n_b:
                paired, note = False, f"unpaired: {n_a} vs {n_b} {UNIT_NAMES[kind]}"
            # the bootstrap (and permutation) seed of one quantity: the run's seed and its name's crc32
            qseed = derive_seed(seed, seeds.COMPARE_QUANTITY, zlib.crc32(f"{kind}/{q.name}".encode()))
            if min(n_a, n_b) < MIN_BOOTSTRAP_UNITS:
                interval = Interval(vb - va, math.nan, math.nan, "none")
                note = (f"only {min(n_a, n_b)} {UNIT_NAMES[kind]}: too few for a bootstrap interval (at least "
                        f"{MIN_BOOTSTRAP_UNITS}); compare several training seeds instead")
            else:
                interval, p_value = statistic_difference(q.stat, q.arrays(a), q.arrays(b), paired, level, resamples,
                                                         qseed)
                if _excludes_zero(interval) and not p_value < 1 - level:
                    note = (f"the bootstrap interval excludes 0 but the permutation test does not reject "
                            f"(p = {p_value:.3g}): no verdict")
        else:
            interval = Interval(vb - va, math.nan, math.nan, "none")
            note = "no per-unit values in the files (written by an older version): no interval"
        if interval.method.startswith("none") and not note:
            note = f"one unit ({UNIT_NAMES[kind]}) per model: no interval"
            if kind == "surface":
                note += " (lt surface --repeats K gives K pairs, paired between models)"
        if interval.method.startswith("exact") and va != vb and not note:
            note = "differences without spread"
        if 0 < min(n_a, n_b) < 5 and not note:
            note = f"only {min(n_a, n_b)} {UNIT_NAMES[kind]}: a rough interval"
        rows.append(Row(kind, q.name, q.metric, q.better, q.wording, va, vb, interval.estimate, interval.low,
                        interval.high, verdict(interval, q.better, p_value, 1 - level), interval.method,
                        f"{UNIT_NAMES[kind]}, within one run", bool(paired), n_a, n_b, note, p_value))
    return rows


def _across_seeds(kind: str, side_a: Sequence[Entry], side_b: Sequence[Entry], level: float, within: float) -> list[Row]:
    rows = []
    quantities = QUANTITIES[kind](side_a[0], side_b[0], within) if kind == "evaluate" else \
        QUANTITIES[kind](side_a[0], side_b[0])
    for q in quantities:
        try:
            va = np.array([_value_like(q, kind, side_a[0], side_b[0], e) for e in side_a])
            vb = np.array([_value_like(q, kind, side_a[0], side_b[0], e) for e in side_b])
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{kind}: the files of one label do not hold the same quantities ({q.name}: {exc}); "
                              f"compare runs made with the same options") from None
        interval = welch_t(va, vb, level)
        note = "values and difference are means over seeds"
        if interval.method.startswith("exact"):
            note += "; no spread across the seeds of either label: the interval is the difference itself"
        rows.append(Row(kind, q.name, q.metric, q.better, q.wording, float(va.mean()), float(vb.mean()),
                        interval.estimate, interval.low, interval.high, verdict(interval, q.better),
                        interval.method + " on per-seed values", "training seeds", False, len(va), len(vb), note,
                        interval.p_value))
    return rows


def _value_like(q: Quantity, kind: str, first_a: Entry, first_b: Entry, e: Entry) -> float:
    """``q``'s summary value of entry ``e`` (a replicate of ``first_a`` or ``first_b``)."""
    if kind == "featvar":            # quantities index layers by position in the first entry of each label
        ref = first_a if e.label == first_a.label else first_b
        if [str(v) for v in e.node["layers"]] != [str(v) for v in ref.node["layers"]]:
            raise ValueError(f"{e.path} has other layers than {ref.path}")
    return q.value(e)


# ----------------------------------------------------------------------------- files and text
def to_nodes(comparisons: Sequence[Comparison]) -> dict[str, dict]:
    """One HDF5 group per comparison, ``B-vs-A``."""
    nodes = {}
    for c in comparisons:
        rows = c.rows

        def col(key, dtype=None):
            values = [getattr(r, key) for r in rows]
            return np.array(values, dtype=dtype) if dtype is not None else np.array(values, dtype=object)
        nodes[f"{c.b}-vs-{c.a}"] = {
            "attrs": {"a": c.a, "b": c.b, "difference": f"{c.b} - {c.a} (B - A)",
                      "verdicts": "favours A | favours B | no detectable difference: the interval excludes 0 on "
                                  "the side better for that model (per quantity, column better), or contains it"},
            "data": {"analysis": col("analysis"), "quantity": col("quantity"), "metric": col("metric"),
                     "better": col("better"), "wording": col("wording"),
                     "value_a": col("value_a", np.float64), "value_b": col("value_b", np.float64),
                     "estimate": (col("estimate", np.float64), {"description": "B - A"}),
                     "low": col("low", np.float64), "high": col("high", np.float64), "verdict": col("verdict"),
                     "method": col("method"), "unit": col("unit"), "paired": col("paired", bool),
                     "n_a": col("n_a", np.int64), "n_b": col("n_b", np.int64), "note": col("note"),
                     "p_value": (col("p_value", np.float64), {"description": "two-sided p-value of the test behind "
                                 "the verdict (t test; permutation test for bootstrap intervals); NaN: none"})}}
    return nodes


def describe_verdict(v: str, a: str, b: str) -> str:
    return {VERDICTS[0]: f"favours {a} (A)", VERDICTS[1]: f"favours {b} (B)"}.get(v, v)


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def table(c: Comparison, level: float) -> str:
    """The printed table of one comparison."""
    lines = [f"{c.b} vs {c.a}: difference = {c.b} - {c.a} (B - A), {level:.0%} interval"]
    head = f"{'quantity':<52} {'A':>10} {'B':>10} {'B - A':>10}  {'interval':<24} verdict"
    lines.append(head)
    current = None
    for r in c.rows:
        if r.analysis != current:
            current = r.analysis
            lines.append(f"[{r.analysis}: {r.unit}{', paired' if r.paired else ''}]")
        ci = f"[{_num(r.low)}, {_num(r.high)}]" if math.isfinite(r.low) else "(no interval)"
        lines.append(f"{r.quantity[:52]:<52} {_num(r.value_a):>10} {_num(r.value_b):>10} {_num(r.estimate):>10}  "
                     f"{ci:<24} {describe_verdict(r.verdict, c.a, c.b)} ({r.wording} is better)"
                     + (f"; {r.note}" if r.note else ""))
    return "\n".join(lines)


def settings(level: float, resamples: int, seed: int, within: float) -> dict[str, Any]:
    """Root attributes recording how the intervals were made."""
    return {"level": float(level), "resamples": int(resamples), "bootstrap_seed": int(seed), "within": float(within),
            "bootstrap_method": BOOTSTRAP_METHOD,
            "methods": json.dumps({
                "means within a run": "paired t (scipy.stats.ttest_rel) when the units are shared, else Welch t "
                                      "(scipy.stats.ttest_ind, equal_var=False)",
                "other statistics within a run": f"{BOOTSTRAP_METHOD} bootstrap over units (scipy.stats.bootstrap, "
                                                 f"{int(resamples)} resamples, seed landscape_tools.seeds."
                                                 f"derive_seed({int(seed)}, COMPARE_QUANTITY, crc32 of kind/quantity "
                                                 f"name)); a verdict also needs the permutation test "
                                                 f"(scipy.stats.permutation_test, {int(resamples)} resamples) to "
                                                 f"reject at 1 - level",
                "across training seeds": "Welch t (scipy.stats.ttest_ind, equal_var=False) on per-seed values"})}


def compare_files(files: Sequence[str], output: str, labels: Sequence[str] | None = None, level: float = LEVEL,
                  resamples: int = RESAMPLES, seed: int = 0, within: float = WITHIN, overwrite: bool = False,
                  command: Sequence[str] | None = None) -> list[Comparison]:
    """What ``lt compare`` does: read ``files``, compare every label against the first and write ``output``.

    Raises:
        ConfigError: bad options or labels (see :func:`collect`, :func:`compare_entries`).
        StoreError: unreadable inputs, or ``output`` exists without ``overwrite``.
    """
    from . import store

    check_options(level, resamples, within)
    store.check_writable(output, overwrite)
    entries = collect([store.read_result(f) for f in files], labels)
    comparisons = compare_entries(entries, level=level, resamples=resamples, seed=seed, within=within)
    config = json.loads(json.dumps({"files": [str(f) for f in files], "labels": None if labels is None else list(labels),
                                    "level": level, "resamples": resamples, "within": within, "seed": seed,
                                    "entries": [f"{e.path}:{e.group}={e.label}" for e in entries]}, default=str))
    root = store.provenance("compare", command=command, config=config, seed=seed, device="cpu")
    root = {k: str(v) if isinstance(v, str) else v for k, v in root.items()}
    root.update(settings(level, resamples, seed, within))
    store.write_result(output, root, to_nodes(comparisons), overwrite=overwrite)
    return comparisons
