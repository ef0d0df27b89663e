"""Predictive metrics and the paper's ensemble-size curves (PAPER.md section 7).

The prediction of an MC-dropout model with ``N`` samples is the mean of the softmax over ``N``
stochastic forward passes (eval mode: BatchNorm on running statistics, dropout on).  For every ``N``
of a sweep we report

* **NLL**: ``-log p(y)`` of the mean probability, averaged over samples (nats).  Probabilities are
  clamped from below at :data:`PROB_FLOOR` (``1e-12``) before the log, so one confidently wrong
  sample costs at most ``-log(1e-12) = 27.6`` nats instead of ``inf``.
* **accuracy**: fraction of samples whose arg-max class (ties: the lowest class index) is the label.
* **ECE**: 10 equal-width bins of the max probability; bin ``b`` holds confidences in
  ``(edges[b], edges[b+1]]`` (the first bin also holds 0); ``ECE = sum_b (n_b / n) |acc_b - conf_b|``.
* **Brier**: ``sum_k (onehot_k - p_k)^2``, averaged over samples (range 0..2).
* a **reliability diagram**: per bin its count, accuracy and mean confidence (NaN for empty bins).
* **per-sample values** for every N (the units ``lt compare`` resamples): ``log p(y)`` of the mean
  probability (floored as in the NLL), correctness of the arg-max, confidence (max probability) and
  the sample's Brier term, in data order (float32; correctness as bool).

A sweep reuses samples: the running sum of probabilities over MC samples ``1..max(N)`` is scored
whenever the count reaches one of the ``N``, so it costs ``max(N)`` forward passes' worth of rows per
batch, not ``sum(N)``.  It streams over the data: only the current batch's probability sums are held.
MC sample ``s`` of batch ``b`` uses the dropout masks of ``mc_dropout(model, True,
seed=derive_seed(seed, seeds.EVALUATE_MC_SAMPLE, b, s))`` (:mod:`landscape_tools.seeds`), so a run is
reproducible for a given seed and batch size.  Several MC samples go through the model in one forward
pass, stacked along the batch dimension, each copy multiplied by its own sample's masks (exactly the
masks of one pass per sample), at most ``max_batch`` rows per pass (:data:`DEFAULT_MAX_BATCH`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import seeds
from .device import Progress, report
from .errors import ConfigError, DataError, NumericalError
from .models import MCDropout, replaced_forwards, sampling_dropout_modules
from .models.mc import _CHANNEL_DROPOUTS
from .seeds import derive_seed
from .streaming import as_sequence, batch_sizes

#: lower clamp of probabilities inside the NLL's log
PROB_FLOOR = 1e-12
#: equal-width confidence bins of the ECE and the reliability diagram
N_BINS = 10
#: the paper's ensemble-size sweep (`lt evaluate --mc` default)
DEFAULT_SIZES = (1, 2, 5, 10, 20, 50)
#: default cap on the rows (MC copies x samples) of one forward pass, per device type (also featvar's).
#: CPU: measured with benchmarks/bench_evaluate.py and bench_featvar.py (docs/readme/evaluate.md): the
#: cost per row is flat from ~16 to 256 rows and grows past that (512 rows: 1.5x), so copies are stacked
#: only up to 128 rows.  CUDA: not measured here; large enough to fill a GPU with CIFAR-sized inputs,
#: halved automatically on out-of-memory.
DEFAULT_MAX_BATCH = {"cpu": 128, "cuda": 4096}


def parse_ensemble_sizes(text: str | Sequence[int], option: str = "--mc") -> tuple[int, ...]:
    """``"1,2,5"`` (or a sequence of ints) -> sorted, de-duplicated positive ensemble sizes.

    Args:
        text: comma-separated whole numbers, or a sequence of ints.
        option: the option name used in error messages.

    Returns:
        ascending tuple of distinct sizes.

    Raises:
        ConfigError: empty list, an entry that is not a whole number, or a size below 1.
    """
    example = "e.g. 1,2,5,10,20,50"
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    if not parts or parts == [""]:
        raise ConfigError(f"{option} is empty; give ensemble sizes (numbers of MC samples), {example}")
    sizes = []
    for part in parts:
        if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
            value = int(part)
        elif isinstance(part, str) and part.isascii() and part.isdigit():  # int("²") fails
            value = int(part)
        else:
            shown = "an empty entry" if part == "" else repr(part)
            raise ConfigError(f"{option} {_show(text)}: {shown} is not a whole number; "
                              f"give comma-separated ensemble sizes, {example}")
        if value < 1:
            raise ConfigError(f"{option} {_show(text)}: ensemble size {value} must be at least 1, {example}")
        sizes.append(value)
    return tuple(sorted(set(sizes)))


def _show(text) -> str:
    return repr(text) if isinstance(text, str) else repr(",".join(str(v) for v in text))


# ----------------------------------------------------------------------------- metrics
def _check_bins(n_bins) -> None:
    if int(n_bins) < 1:
        raise ConfigError(f"n_bins={n_bins} must be at least 1")


class MetricAccumulator:
    """Streaming NLL / accuracy / ECE / Brier / reliability over batches of predicted probabilities.

    ``add`` per batch, then ``metrics()``; :func:`predictive_metrics` is one ``add`` of everything.
    """

    def __init__(self, n_bins: int = N_BINS):
        _check_bins(n_bins)
        self.n_bins = int(n_bins)
        self.edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        self.n = 0
        self.nll_sum = 0.0
        self.correct_sum = 0.0
        self.brier_sum = 0.0
        self.bin_count = np.zeros(self.n_bins, dtype=np.int64)
        self.bin_correct = np.zeros(self.n_bins, dtype=np.float64)
        self.bin_conf = np.zeros(self.n_bins, dtype=np.float64)

    def add(self, probs: Any, labels: Any) -> None:
        """Add a batch: ``probs`` (n, classes) rows of probabilities, ``labels`` (n,) class indices.

        Raises:
            DataError: shapes that do not match, labels outside 0..classes-1.
            NumericalError: non-finite or negative probabilities.
        """
        p = _as_numpy(probs, np.float64)
        y = _as_numpy(labels, None)
        if p.ndim != 2:
            raise DataError(f"probabilities must have shape (samples, classes), got {p.shape}")
        if y.shape != (p.shape[0],):
            raise DataError(f"labels must have shape ({p.shape[0]},) to match the probabilities, got {y.shape}")
        if p.shape[0] == 0:
            return
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"labels must be integer class indices, got {y.dtype}")
        k = p.shape[1]
        if y.min() < 0 or y.max() >= k:
            raise DataError(f"labels range over {int(y.min())}..{int(y.max())} but there are {k} classes (0..{k - 1})")
        if not np.isfinite(p).all() or (p < 0).any():
            raise NumericalError("predicted probabilities contain NaN, inf or negative values: the model's outputs "
                                 "are not finite (check the checkpoint's weights and the input scaling)")
        rows = np.arange(p.shape[0])
        p_true = p[rows, y]
        pred = np.argmax(p, axis=1)
        correct = (pred == y).astype(np.float64)
        conf = p.max(axis=1)
        onehot_sq = (p ** 2).sum(axis=1) - 2.0 * p_true + 1.0  # sum_k (onehot_k - p_k)^2
        self.n += p.shape[0]
        self.nll_sum += float(-np.log(np.maximum(p_true, PROB_FLOOR)).sum())
        self.correct_sum += float(correct.sum())
        self.brier_sum += float(onehot_sq.sum())
        # bin b holds (edges[b], edges[b+1]]; confidence 0 falls into bin 0
        bins = np.clip(np.searchsorted(self.edges[1:-1], conf, side="left"), 0, self.n_bins - 1)
        self.bin_count += np.bincount(bins, minlength=self.n_bins)
        self.bin_correct += np.bincount(bins, weights=correct, minlength=self.n_bins)
        self.bin_conf += np.bincount(bins, weights=conf, minlength=self.n_bins)

    # -- combining accumulators (batches computed apart, e.g. by the ranks of a torchrun job)
    def state_size(self) -> int:
        """Length of :meth:`state`: ``n, nll_sum, correct_sum, brier_sum`` and three per-bin sums."""
        return 4 + 3 * self.n_bins

    def state(self) -> np.ndarray:
        """Every running sum as one float64 vector (counts are exact below 2**53)."""
        return np.concatenate([[float(self.n), self.nll_sum, self.correct_sum, self.brier_sum],
                               self.bin_count.astype(np.float64), self.bin_correct, self.bin_conf])

    @classmethod
    def from_state(cls, state: np.ndarray, n_bins: int = N_BINS) -> "MetricAccumulator":
        """The accumulator whose :meth:`state` is ``state``.

        Raises:
            ConfigError: a state of the wrong length for ``n_bins``.
        """
        acc = cls(n_bins)
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (acc.state_size(),):
            raise ConfigError(f"accumulator state of shape {state.shape}; expected ({acc.state_size()},)")
        k = acc.n_bins
        acc.n = int(state[0])
        acc.nll_sum, acc.correct_sum, acc.brier_sum = (float(v) for v in state[1:4])
        acc.bin_count = state[4:4 + k].astype(np.int64)
        acc.bin_correct = state[4 + k:4 + 2 * k].copy()
        acc.bin_conf = state[4 + 2 * k:].copy()
        return acc

    def merge(self, other: "MetricAccumulator") -> None:
        """Add the sums of ``other`` (same bins).  Adding per-batch accumulators in batch order gives
        bit for bit what :meth:`add` of the batches in that order gives.

        Raises:
            ConfigError: different numbers of bins.
        """
        if other.n_bins != self.n_bins:
            raise ConfigError(f"cannot merge accumulators of {other.n_bins} and {self.n_bins} bins")
        self.n += other.n
        self.nll_sum += other.nll_sum
        self.correct_sum += other.correct_sum
        self.brier_sum += other.brier_sum
        self.bin_count += other.bin_count
        self.bin_correct += other.bin_correct
        self.bin_conf += other.bin_conf

    def metrics(self) -> dict[str, Any]:
        """``nll``, ``accuracy``, ``ece``, ``brier`` (floats), ``num_samples`` and per-bin ``bin_edges``,
        ``bin_counts``, ``bin_accuracy``, ``bin_confidence`` (NaN for empty bins).

        Raises:
            DataError: nothing was added.
        """
        if self.n == 0:
            raise DataError("no samples to score: the data is empty")
        filled = self.bin_count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            bin_acc = np.where(filled, self.bin_correct / self.bin_count, np.nan)
            bin_conf = np.where(filled, self.bin_conf / self.bin_count, np.nan)
        ece = float(np.abs(self.bin_correct - self.bin_conf).sum() / self.n)
        return {"nll": self.nll_sum / self.n, "accuracy": self.correct_sum / self.n, "ece": ece,
                "brier": self.brier_sum / self.n, "num_samples": self.n, "bin_edges": self.edges.copy(),
                "bin_counts": self.bin_count.copy(), "bin_accuracy": bin_acc, "bin_confidence": bin_conf}


def _as_numpy(value: Any, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    return arr.astype(dtype) if dtype is not None else arr


def predictive_metrics(probs: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, Any]:
    """Metrics of predicted class probabilities.

    Args:
        probs: (n, classes) probabilities (numpy or torch; each row sums to 1).
        labels: (n,) integer labels.
        n_bins: equal-width confidence bins of the ECE and reliability diagram.

    Returns:
        dict with ``nll`` (mean ``-log max(p_y, 1e-12)``), ``accuracy``, ``ece``, ``brier``
        (mean ``sum_k (onehot_k - p_k)^2``), ``num_samples``, and the reliability diagram:
        ``bin_edges`` (n_bins+1,), ``bin_counts``, ``bin_accuracy``, ``bin_confidence`` (n_bins,).

    Raises:
        DataError: mismatched shapes, labels out of range, no samples.
        NumericalError: non-finite or negative probabilities.
    """
    acc = MetricAccumulator(n_bins)
    acc.add(probs, labels)
    return acc.metrics()


# ----------------------------------------------------------------------------- ensemble-size sweep
@dataclass
class EnsembleCurve:
    """Metrics of one model for every ensemble size.

    Attributes:
        sizes: the ensemble sizes N, ascending (len S).
        nll, accuracy, ece, brier: float64 arrays (S,).
        bin_edges: (n_bins+1,); bin_counts (S, n_bins) int64; bin_accuracy, bin_confidence (S, n_bins)
            float64, NaN for empty bins.
        num_samples: scored data samples.
        mc_active: whether the model has dropout with p > 0 (otherwise every N is the same prediction).
        forward_passes: MC samples computed per batch (max(N), or 1 without dropout); several may share
            one forward pass (see ``max_batch``).
        seed: the seed of the dropout masks.
        note: a human-readable remark ("" when there is nothing to say).
        sample_log_prob, sample_confidence, sample_brier: float32 (S, num_samples), and sample_correct
            bool (S, num_samples): per data sample (in batch order) and N, ``log max(p_y, 1e-12)`` of the
            mean probability, its max probability, ``sum_k (onehot_k - p_k)^2`` and whether the arg-max
            is the label (None when not computed).
    """

    sizes: np.ndarray
    nll: np.ndarray
    accuracy: np.ndarray
    ece: np.ndarray
    brier: np.ndarray
    bin_edges: np.ndarray
    bin_counts: np.ndarray
    bin_accuracy: np.ndarray
    bin_confidence: np.ndarray
    num_samples: int
    mc_active: bool
    forward_passes: int
    seed: int
    note: str = ""
    sample_log_prob: np.ndarray | None = None
    sample_correct: np.ndarray | None = None
    sample_confidence: np.ndarray | None = None
    sample_brier: np.ndarray | None = None

    def to_node(self, attrs: dict | None = None) -> dict:
        """The HDF5 group of one model (schema: kind ``evaluate``); ``attrs`` are added to its attributes."""
        node_attrs = {"num_samples": int(self.num_samples), "mc_active": bool(self.mc_active),
                      "forward_passes": int(self.forward_passes), "seed": int(self.seed), "note": self.note,
                      "prob_floor": PROB_FLOOR, "ece_bins": int(len(self.bin_edges) - 1)}
        node_attrs.update(attrs or {})
        node = {
            "attrs": node_attrs,
            "data": {
                "n_samples": (self.sizes.astype(np.int64), {"description": "ensemble size N (MC samples averaged)"}),
                "nll": (self.nll, {"description": "mean -log p(label) of the mean softmax, nats",
                                   "prob_floor": PROB_FLOOR}),
                "accuracy": (self.accuracy, {"description": "fraction of arg-max predictions equal to the label"}),
                "ece": (self.ece, {"description": "expected calibration error, equal-width bins of max probability",
                                   "bins": int(len(self.bin_edges) - 1)}),
                "brier": (self.brier, {"description": "mean sum_k (onehot_k - p_k)^2"}),
            },
            "groups": {"reliability": self._reliability()},
        }
        if self.sample_log_prob is not None:
            node["groups"]["per_sample"] = self._per_sample()
        return node

    def _reliability(self) -> dict:
        return {"attrs": {"binning": "bin b holds max probability in (edges[b], edges[b+1]]; empty bins are NaN"},
                "data": {"bin_edges": self.bin_edges, "counts": self.bin_counts.astype(np.int64),
                         "accuracy": self.bin_accuracy, "confidence": self.bin_confidence}}

    def _per_sample(self) -> dict:
        return {"attrs": {"description": "per data sample (columns, in the order of the batches) and ensemble size "
                                         "N (rows, as n_samples): the units lt compare resamples",
                          "dtype": "float32 (rounded from float64; the metrics above are computed in float64), "
                                   "correct as bool"},
                "data": {"log_prob": (self.sample_log_prob.astype(np.float32),
                                      {"description": "log max(p(label), prob_floor) of the mean softmax",
                                       "prob_floor": PROB_FLOOR}),
                         "correct": (self.sample_correct.astype(bool),
                                     {"description": "arg-max class (ties: lowest index) equals the label"}),
                         "confidence": (self.sample_confidence.astype(np.float32),
                                        {"description": "max probability of the mean softmax"}),
                         "brier": (self.sample_brier.astype(np.float32),
                                   {"description": "sum_k (onehot_k - p_k)^2 of the mean softmax"})}}


def check_max_batch(value: Any) -> int | None:
    """``--max-batch``: None, or a whole number of rows per forward pass, at least 1.

    Raises:
        ConfigError: anything else (a bool, a float, a string, a number below 1).
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"--max-batch {value!r}: expected a whole number of rows per forward pass, at least 1 "
                          f"(e.g. 256)")
    return int(value)


def has_active_dropout(model: nn.Module) -> bool:
    """True when MC sampling switches on a dropout module with p > 0 (see
    :func:`~landscape_tools.models.sampling_dropout_modules`: a zoo ``_dnn`` model has none), i.e.
    MC samples vary."""
    return any(float(getattr(m, "p", 0.0)) > 0.0 for _, m in sampling_dropout_modules(model))


def ensemble_curve(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   ns: Sequence[int] | str = DEFAULT_SIZES, seed: int = 0, n_bins: int = N_BINS,
                   progress: Progress = None, precision: str = "fp32", compile_model: bool = False,
                   max_batch: int | None = None) -> EnsembleCurve:
    """Predictive metrics of the N-sample MC-dropout ensemble for every N in ``ns``.

    The model runs in eval mode (BatchNorm on running statistics) with its MC dropout switched on
    (the modules of :func:`~landscape_tools.models.sampling_dropout_modules`: none for a zoo ``_dnn``
    model); its train/eval mode is restored afterwards.  MC sample ``s`` of batch ``b`` draws
    exactly the masks of ``mc_dropout(model, True, seed=derive_seed(seed, seeds.EVALUATE_MC_SAMPLE, b, s))``
    (:func:`landscape_tools.seeds.derive_seed`); the running sum of softmax probabilities
    (float64) over samples ``1..max(ns)`` is scored when the count reaches each N, so the sweep costs
    ``max(ns)`` forward passes' worth of rows per batch.  A model without MC dropout gives the same
    prediction for every N: it is run once per batch and that prediction scored for all N.

    MC samples are batched: a pass carries several copies of the batch stacked along the batch
    dimension, each copy with its own sample's masks (so each row sees an independent mask, and the
    numbers equal the one-sample-per-pass loop up to float rounding of the larger batch), at most
    ``max_batch`` rows per pass; a batch larger than an explicit ``max_batch`` runs in pieces of
    ``max_batch`` rows whose masks are the rows of the whole batch's masks
    (:func:`~landscape_tools.models.mask_rows`), so the numbers never depend on ``max_batch``.
    Out of memory, a pass is retried with half the copies; a model whose dropout inputs do not have
    one row per sample (the batch as their leading dimension) runs one sample per pass.

    Every batch is scored into its own :class:`MetricAccumulator` and the batches are merged in batch
    order (:func:`curve_from_units`), so the result does not depend on which process computed which
    batch: :func:`run_to_file` splits the batches over ``--shard I/N`` jobs or torchrun / srun ranks
    (their global index ``b`` seeds the masks) and the merge gives the curve of one process, bit for bit.

    Args:
        model: a classifier returning (batch, classes) logits, on the device of the batches, that
            treats samples independently in eval mode (true of the zoo).
        batches: ``(x, y)`` pairs in a fixed order (e.g. ``DataSet.batches()``); floating inputs are
            cast to the model's parameter dtype.
        ns: ensemble sizes (or a string like ``"1,2,5"``).
        seed: seed of the dropout masks.
        n_bins: confidence bins of the ECE / reliability diagram.
        progress: ``progress(done, total, message)`` after every forward pass (of this rank); ``done``
            counts MC samples.
        precision: ``fp32`` (default, no autocast), ``bf16`` or ``fp16``: the forward pass runs under
            :func:`landscape_tools.precision.autocast`; logits are cast back to the model's dtype
            before the softmax (which is taken in float64).
        compile_model: run the forward passes through ``torch.compile(model)``.
        max_batch: at most this many rows (MC copies x samples) per forward pass.  None (default):
            copies of a batch are stacked up to :data:`DEFAULT_MAX_BATCH` rows for the device type and
            a batch is never split.

    Returns:
        an :class:`EnsembleCurve`.

    Raises:
        ConfigError: bad ensemble sizes, precision or ``max_batch``, no ``torch.compile``, a model
            whose dropout inputs are not batch-first with a ``max_batch`` below the batch size.
        DataError: no data, logits of the wrong shape, labels out of range.
        NumericalError: non-finite outputs.
    """
    sizes = parse_ensemble_sizes(ns if isinstance(ns, str) else [int(n) for n in ns], option="ensemble sizes")
    batches = as_sequence(batches)     # streamed batches: each rank reads its own when it gets to them
    if not batches:
        raise DataError("no data batches to evaluate")
    width = MetricAccumulator(n_bins).state_size()
    offsets = _offsets(batches)
    table = np.zeros((len(batches), len(sizes), width))
    per_sample = np.zeros((int(offsets[-1]), len(_PER_SAMPLE), len(sizes)))
    batch_first = np.ones(len(batches), dtype=bool)

    def keep(finished):
        for b, (state, values, first) in finished:
            table[b], per_sample[offsets[b]:offsets[b + 1]], batch_first[b] = state, values, first

    from . import engine
    with batch_scorer(model, batches, sizes, len(batches), seed=seed, n_bins=n_bins, progress=progress,
                      precision=precision, compile_model=compile_model, max_batch=max_batch) as scorer:
        engine.run_units(range(len(batches)), scorer.compute, keep)    # progress per MC sample, from compute
    return curve_from_units(table, per_sample, sizes, n_bins, scorer.active, scorer.passes, seed,
                            bool(batch_first.all()))


def _offsets(batches) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(batch_sizes(batches))]).astype(np.int64)


class _Scorer:
    """What :func:`batch_scorer` yields: ``compute(b)`` scores batch ``b`` (a unit of
    :func:`landscape_tools.engine.run_units`) and returns ``(state, values, batch_first)``;
    ``active``: the model samples dropout; ``passes``: forward passes per batch."""

    def __init__(self, compute, active: bool, passes: int):
        self.compute, self.active, self.passes = compute, active, passes


@contextlib.contextmanager
def batch_scorer(model: nn.Module, batches: Sequence, sizes: Sequence[int], n_todo: int, seed: int = 0,
                 n_bins: int = N_BINS, progress: Progress = None, precision: str = "fp32",
                 compile_model: bool = False, max_batch: int | None = None) -> Iterator[_Scorer]:
    """The MC-dropout ensemble's batches as units: yields a :class:`_Scorer` whose ``compute(b)``
    scores batch ``b`` (its global index seeds the masks) into ``state`` (len(sizes), state size),
    the :class:`MetricAccumulator` sums of the batch per ensemble size, ``values`` (rows, 4,
    len(sizes)), the per-sample values of :data:`_PER_SAMPLE`, and whether the model's dropout
    inputs were batch-first.  The model is in eval mode with its MC dropout switched on (and
    ``no_grad``) inside the block, in its own mode again after it.  ``progress(done, total,
    message)`` is told after every forward pass, ``done`` counting MC samples of the ``n_todo``
    batches to score (a batch interrupted or failed is not counted).  See :func:`ensemble_curve`.
    """
    from . import precision as P

    precision = P.parse_precision(precision)
    max_batch = check_max_batch(max_batch)
    active = has_active_dropout(model)
    passes = max(sizes) if active else 1
    column = {n: j for j, n in enumerate(sizes)}
    width = MetricAccumulator(n_bins).state_size()
    params = next(iter(model.parameters()), None)
    dtype = params.dtype if params is not None and params.is_floating_point() else None
    out_dtype = P.model_dtype(model)
    total, done = int(n_todo) * passes, 0      # MC samples of the finished batches
    was_training = model.training
    holder: list = [None]
    batch_first = [True]
    model.eval()
    try:
        with torch.no_grad(), _sampling(model, holder, active, compile_model) as forward:
            def compute(b: int):
                nonlocal done
                x, y = batches[b]
                if dtype is not None and x.is_floating_point():
                    x = x.to(dtype)
                rows = int(x.shape[0])
                state = np.zeros((len(sizes), width))
                values = np.zeros((rows, len(_PER_SAMPLE), len(sizes)))
                cap = int(max_batch) if max_batch is not None else DEFAULT_MAX_BATCH.get(x.device.type, 256)
                piece = min(rows, int(max_batch)) if max_batch is not None else rows
                copies = max(1, min(passes, cap // max(piece, 1))) if batch_first[0] else 1
                while True:
                    try:
                        def step(count, b=b):
                            report(progress, done + count, total, f"batch {b + 1}/{len(batches)}, "
                                                                  f"MC sample {count}/{passes}")
                        probs_of = _mc_probabilities(forward, holder, seed, b, x, passes, copies, piece, precision,
                                                     out_dtype, step)
                        running = None
                        for s, probs in enumerate(probs_of):
                            running = probs if running is None else running + probs
                            if active and (s + 1) in column:
                                mean = running / (s + 1)
                                state[column[s + 1]] = _batch_state(mean, y, n_bins)
                                values[:, :, column[s + 1]] = _sample_values(mean, y).T
                        break
                    except _NotBatchFirst as exc:
                        if piece < rows:
                            raise ConfigError(f"a dropout input of shape {exc.shape} does not have the batch as its "
                                              f"leading dimension, so a batch of {rows} cannot be split into pieces "
                                              f"of --max-batch {piece} rows: give --max-batch at least {rows} (or a "
                                              f"smaller --batch-size)") from None
                        batch_first[0], copies = False, 1      # one MC sample per pass, whole masks, as mc_dropout
                    except Exception as exc:          # out of memory: fewer copies per pass, same masks, same answer
                        if not _is_oom(exc) or copies == 1:
                            raise
                        copies = max(1, copies // 2)
                        if x.is_cuda:
                            torch.cuda.empty_cache()
                if not active:
                    state[:] = _batch_state(running, y, n_bins)
                    values[:] = _sample_values(running, y).T[:, :, None]
                done += passes        # only once the batch is finished
                return state, values, batch_first[0]

            yield _Scorer(compute, active, passes)
    finally:
        model.train(was_training)


def curve_from_units(table: np.ndarray, per_sample: np.ndarray, sizes: Sequence[int], n_bins: int, active: bool,
                     passes: int, seed: int, batch_first: bool = True) -> EnsembleCurve:
    """The curve from every batch's accumulator sums ``table`` (n_batches, len(sizes), state size),
    merged in batch order, and the per-sample values ``per_sample`` (n_samples, 4, len(sizes)): what
    one process, a merge of shards and a merge of rank files all compute the same way."""
    sizes = [int(n) for n in sizes]
    accs = {n: MetricAccumulator(n_bins) for n in sizes}
    for b in range(table.shape[0]):
        for j, n in enumerate(sizes):
            accs[n].merge(MetricAccumulator.from_state(table[b, j], n_bins))
    results = [accs[n].metrics() for n in sizes]
    note = ""
    if not active:
        note = ("the model has no MC dropout (or only p = 0): every MC sample is the same deterministic prediction, "
                "so all ensemble sizes give identical metrics (one forward pass per batch was run)")
    elif not batch_first:
        note = ("the model's dropout inputs are not batch-first, so MC samples ran one per forward pass "
                "(not stacked along the batch)")

    def stack(key):
        return np.array([r[key] for r in results], dtype=np.int64 if key == "bin_counts" else np.float64)

    values = np.transpose(per_sample, (1, 2, 0))        # (4, len(sizes), n_samples)
    return EnsembleCurve(sizes=np.array(sizes, dtype=np.int64), nll=stack("nll"), accuracy=stack("accuracy"),
                         ece=stack("ece"), brier=stack("brier"), bin_edges=results[0]["bin_edges"],
                         bin_counts=stack("bin_counts"), bin_accuracy=stack("bin_accuracy"),
                         bin_confidence=stack("bin_confidence"), num_samples=int(results[0]["num_samples"]),
                         mc_active=bool(active), forward_passes=int(passes), seed=int(seed), note=note,
                         sample_log_prob=values[0].astype(np.float32), sample_correct=values[1] > 0.5,
                         sample_confidence=values[2].astype(np.float32), sample_brier=values[3].astype(np.float32))


# ----------------------------------------------------------------------------- runs into a file: the run engine
@dataclass(frozen=True)
class EvaluateOptions:
    """The options of an evaluation run into a file (:func:`run_to_file`, ``lt evaluate``), validated
    once, when it is made; the fields hold the resolved values.

    ``sizes``: the ensemble sizes (``--mc``: comma-separated text or ints; sorted, de-duplicated by
    :func:`parse_ensemble_sizes`); ``seed``, ``n_bins``, ``precision`` (parsed), ``compile``,
    ``max_batch``: as :func:`ensemble_curve`, which keeps them as keywords for one model.  The run's
    fingerprint hashes ``sizes``, ``seed``, ``n_bins`` and ``precision`` (``compile`` and ``max_batch``
    change how the same numbers are computed; :func:`landscape_tools.engine.options_key`); the file
    records them (the ``units`` group's attributes, each model group's ``precision`` and ``compiled``).

    Raises:
        ConfigError: bad sizes (the message names ``--mc``), ``n_bins`` below 1, an unknown precision,
            a bad ``max_batch``.
    """

    sizes: tuple = DEFAULT_SIZES
    seed: int = 0
    n_bins: int = N_BINS
    precision: str = "fp32"
    compile: bool = field(default=False, metadata={"identity": False})
    max_batch: int | None = field(default=None, metadata={"identity": False})

    def __post_init__(self):
        from .precision import parse_precision

        sizes = self.sizes if isinstance(self.sizes, str) else tuple(self.sizes)
        _check_bins(self.n_bins)
        resolved = {"sizes": parse_ensemble_sizes(sizes), "seed": int(self.seed), "n_bins": int(self.n_bins),
                    "precision": parse_precision(self.precision), "compile": bool(self.compile),
                    "max_batch": check_max_batch(self.max_batch)}
        for name, value in resolved.items():
            object.__setattr__(self, name, value)


@dataclass
class Job:
    """One model to evaluate: its label, the network, its group attributes, its data batches, extra
    datasets of its group (e.g. ``sample_indices``), a description of its data (for the fingerprint) and
    extra finished subgroups of its group, written as given (e.g. ``corruptions``, scored beforehand)."""

    label: str
    model: nn.Module
    attrs: dict
    batches: list
    data: dict
    description: Any = None
    groups: dict | None = None


def run_to_file(jobs: Sequence[Job], output, root_attrs: dict, options: EvaluateOptions, *, overwrite: bool = False,
                progress=None, ctx=None, shard: tuple[int, int] | None = None) -> dict[str, EnsembleCurve]:
    """Evaluate every job into ``output`` through the run engine; the units are the data batches.

    Each batch's accumulator sums and per-sample values go to ``OUTPUT.partial`` as soon as it is
    scored, so an interrupted run resumes where it stopped.  ``shard=(i, n)`` scores batches
    ``i, i + n, ...`` into a file of those units only (groups ``units`` and ``sample_units``), which
    ``lt merge`` joins with the other shards (:func:`merge_units`); ranks of a torchrun / srun job
    do the same into rank files that rank 0 merges.  A whole run's file holds the curves
    (:meth:`EnsembleCurve.to_node`) computed by :func:`curve_from_units`, the same arithmetic in
    every case, so a merged file equals one process's bit for bit.  ``options``: the run's
    :class:`EvaluateOptions` (validated when made).

    Returns:
        label -> :class:`EnsembleCurve` when this call wrote a whole run's file (one process, or rank 0
        of a job); empty otherwise (a shard, other ranks).

    Raises:
        ConfigError, DataError, NumericalError, StoreError; RankFailed: another rank failed.
    """
    from . import engine
    from .distributed import Context

    o = options
    sizes, seed, n_bins = o.sizes, o.seed, o.n_bins
    for job in jobs:
        if not job.batches:
            raise DataError(f"no data batches to evaluate for {job.label}")
    root_attrs = {k: str(v) if isinstance(v, str) else v for k, v in root_attrs.items()}
    width = MetricAccumulator(n_bins).state_size()
    layout, prints = {}, []
    for job in jobs:
        active = has_active_dropout(job.model)
        n_rows = int(_offsets(job.batches)[-1])
        layout[job.label] = {"attrs": dict(job.attrs), "data": dict(job.data), "groups": {
            "units": {"attrs": {"sizes": np.array(sizes, dtype=np.int64), "ece_bins": int(n_bins), "seed": int(seed),
                                "mc_active": bool(active), "forward_passes": int(max(sizes) if active else 1),
                                "description": "per data batch: the metric sums of each ensemble size (merged in "
                                               "batch order into the curves)"},
                      "data": {"state": np.zeros((len(job.batches), len(sizes), width)),
                               "batch_first": np.ones(len(job.batches), dtype=bool),
                               "done": np.zeros(len(job.batches), dtype=bool)}},
            "sample_units": {"data": {"values": np.zeros((n_rows, len(_PER_SAMPLE), len(sizes))),
                                      "done": np.zeros(n_rows, dtype=bool)}},
            **(job.groups or {})}}
        prints.append({"label": job.label, "sha256": job.attrs.get("checkpoint_sha256"), "data": job.description,
                       "batch_sizes": batch_sizes(job.batches)})
    key = {"models": prints, "options": engine.options_key(o)}
    p0 = next(iter(jobs[0].model.parameters()), None)     # not the data: a streamed batch would be decoded for it
    device = p0.device if p0 is not None else jobs[0].batches[0][0].device
    curves: dict[str, EnsembleCurve] = {}

    def compute(out, part):
        identity = engine.run_identity("evaluate", key, device, part)
        pr = engine.open_run(out, root_attrs, identity, layout, overwrite=overwrite)
        try:
            for job in jobs:
                base = f"{job.label}/"
                offsets = _offsets(job.batches)
                done = pr.read(base + "units/done").astype(bool)
                todo = [int(b) for b in engine.shard_units(len(job.batches), *part) if not done[b]]

                def write(finished, base=base, offsets=offsets):
                    for b, (state, values, first) in finished:
                        pr.write(base + "units/state", b, state)
                        pr.write(base + "units/batch_first", b, first)
                        pr.write(base + "sample_units/values", slice(offsets[b], offsets[b + 1]), values)
                        pr.write(base + "sample_units/done", slice(offsets[b], offsets[b + 1]), True)
                    pr.flush()
                    for b, _ in finished:
                        pr.write(base + "units/done", b, True)
                    pr.flush()

                if todo:       # the batches are the units; progress per MC sample, told from compute
                    with batch_scorer(job.model, job.batches, sizes, len(todo), seed=seed, n_bins=n_bins,
                                      progress=progress, precision=o.precision, compile_model=o.compile,
                                      max_batch=o.max_batch) as scorer:
                        engine.run_units(todo, scorer.compute, write)
            if part != (0, 1):
                pr.finalize()
                return
            nodes = {}
            for job in jobs:
                result = store_result_node(pr, job.label)
                nodes[job.label] = result[0]
                curves[job.label] = result[1]
            engine.replace_partial(pr, nodes)
        finally:
            pr.close()

    engine.run_ranks(ctx or Context(), output, compute, shard=shard, overwrite=overwrite)
    return curves


def _finished_node(attrs: dict, data: dict, units: dict, samples: np.ndarray,
                   groups: dict | None = None) -> tuple[dict, EnsembleCurve]:
    """A whole run's group from its units: the curves (:func:`curve_from_units`), the extra datasets
    and the extra subgroups (:attr:`Job.groups`)."""
    ua = units["attrs"]
    curve = curve_from_units(units["state"], samples, [int(n) for n in ua["sizes"]], int(ua["ece_bins"]),
                             bool(ua["mc_active"]), int(ua["forward_passes"]), int(ua["seed"]),
                             bool(np.all(units["batch_first"])))
    node = curve.to_node(attrs)
    node["data"].update(data)
    if groups:
        node.setdefault("groups", {}).update(groups)
    return node, curve


def store_result_node(part, label: str) -> tuple[dict, EnsembleCurve]:
    """The finished group of ``label`` from an open partial file whose units are all done."""
    units = {"attrs": part.attrs(f"{label}/units"), "state": part.read(f"{label}/units/state"),
             "batch_first": part.read(f"{label}/units/batch_first")}
    data, groups = {}, {}
    for name in part.file[label]:
        item = part.file[label][name]
        if name in ("units", "sample_units"):
            continue
        if hasattr(item, "keys"):
            from . import engine, store
            groups[name] = engine.node_dict(store._read_node(item))   # finished subgroups, read whole
        else:
            attrs = part.attrs(f"{label}/{name}")
            data[name] = (item[()], attrs) if attrs else item[()]
    return _finished_node(part.attrs(label), data, units, part.read(f"{label}/sample_units/values"), groups)


def merge_units(results) -> dict[str, dict]:
    """The groups of an evaluate result assembled from its shards (the engine's merge): every batch's
    sums and samples from the shard that computed them, then the curves exactly as one process."""
    from . import engine

    merged = {}
    for label in results[0].models:
        node = engine.merge_done(results, label, "units/done")
        samples = engine.merge_done(results, label, "sample_units/done")["groups"]["sample_units"]
        u = node["groups"]["units"]
        units = {"attrs": u["attrs"], "state": engine.array_of(u, "state"),
                 "batch_first": engine.array_of(u, "batch_first")}
        merged[label] = _finished_node(node["attrs"], node["data"], units, engine.array_of(samples, "values"))[0]
    return merged


class _NotBatchFirst(Exception):
    def __init__(self, shape):
        super().__init__(f"dropout input of shape {shape} is not batch-first")
        self.shape = shape


class _Plan:
    """The MC samples the current forward pass carries: one copy of ``rows`` samples per seed, stacked
    along the batch dimension; ``stacked`` False: one whole batch, masked exactly as by ``mc_dropout``
    (whatever the layout of the dropout inputs)."""

    def __init__(self, seeds: Sequence[int], rows: int, stacked: bool):
        self.seeds, self.rows, self.stacked = list(seeds), int(rows), bool(stacked)


def _mc_probabilities(forward, holder: list, seed: int, b: int, x: torch.Tensor, passes: int, copies: int, piece: int,
              precision: str, out_dtype, step) -> Iterator[torch.Tensor]:
    """Softmax probabilities (float64, ``(rows, classes)``) of MC samples ``0 .. passes-1`` of batch ``b``,
    in order, computed ``copies`` samples per pass in row pieces of ``piece``."""
    from . import precision as P
    from .models import mask_rows

    rows = int(x.shape[0])
    pieces = [(r, min(r + piece, rows)) for r in range(0, rows, piece)]
    for start in range(0, passes, copies):
        ks = range(start, min(start + copies, passes))
        parts = []
        for r0, r1 in pieces:
            xin = x[r0:r1]
            if len(ks) > 1:
                xin = xin.repeat((len(ks),) + (1,) * (x.dim() - 1))
            holder[0] = _Plan([derive_seed(seed, seeds.EVALUATE_MC_SAMPLE, b, k) for k in ks], r1 - r0,
                              len(ks) > 1 or len(pieces) > 1)
            split = mask_rows(r0, r1 - r0, rows) if len(pieces) > 1 else contextlib.nullcontext()
            try:
                with split, P.autocast(x.device, precision):
                    logits = forward(xin)
            finally:
                holder[0] = None
            if precision != "fp32":
                logits = P.full_precision(logits, out_dtype)
            if logits.dim() != 2 or logits.shape[0] != xin.shape[0]:
                raise DataError(f"the model returns outputs of shape {tuple(logits.shape)} for a batch of "
                                f"{xin.shape[0]}; expected (batch, classes) logits")
            parts.append(torch.softmax(logits.double(), dim=1).reshape(len(ks), r1 - r0, -1))
        probs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        for j in range(len(ks)):
            yield probs[j]
        step(ks[-1] + 1)


def _copies_dropout(module: nn.Module, index: int, holder: list, channelwise: bool):
    """The forward of sampled dropout module ``index``: copy ``j`` of a stacked pass (rows
    ``j*n .. (j+1)*n``) is multiplied by exactly the mask ``mc_dropout(model, True, seed=seeds[j])``
    draws for it (:func:`~landscape_tools.models.mc.seeded_mask`)."""
    from .models.mc import apply_dropout, seeded_mask

    def forward(x: torch.Tensor) -> torch.Tensor:
        plan = holder[0]
        p = float(getattr(module, "p", 0.0))
        if plan is None or p == 0.0:
            return x
        if not plan.stacked:
            return apply_dropout(x, p, True, derive_seed(plan.seeds[0], seeds.DROPOUT_MODULE, index), channelwise)
        n = len(plan.seeds)
        lead = int(x.shape[0]) if x.dim() else 0
        if lead != n * plan.rows:        # not one row per sample: copies and pieces cannot be matched to rows
            raise _NotBatchFirst(tuple(x.shape))
        if n == 1:
            return x * seeded_mask(x, p, derive_seed(plan.seeds[0], seeds.DROPOUT_MODULE, index), channelwise)
        size = lead // n
        out = torch.empty_like(x)
        for j, s in enumerate(plan.seeds):
            part = x[j * size:(j + 1) * size]
            torch.mul(part, seeded_mask(part, p, derive_seed(s, seeds.DROPOUT_MODULE, index), channelwise),
                      out=out[j * size:(j + 1) * size])
        return out
    return forward


def _copies_mask(holder: list):
    """The masks :func:`_copies_dropout` multiplies by, as a :data:`landscape_tools._compiled.MaskOf` for
    the compiled forward pass: the same seeds, the same generator, the same numbers."""
    from .models.mc import seeded_mask

    def mask_of(index: int, module: nn.Module, shape, dtype, device):
        plan = holder[0]
        p = float(getattr(module, "p", 0.0))
        if plan is None or p == 0.0:
            return None
        channelwise = isinstance(module, _CHANNEL_DROPOUTS)
        if not plan.stacked:
            return seeded_mask(torch.empty(shape, dtype=dtype, device=device), p,
                               derive_seed(plan.seeds[0], seeds.DROPOUT_MODULE, index), channelwise)
        n = len(plan.seeds)
        lead = int(shape[0]) if len(shape) else 0
        if lead != n * plan.rows:
            raise _NotBatchFirst(tuple(shape))
        part = torch.empty((lead // n,) + tuple(shape[1:]), dtype=dtype, device=device)
        return torch.cat([seeded_mask(part, p, derive_seed(s, seeds.DROPOUT_MODULE, index), channelwise)
                          for s in plan.seeds])
    return mask_of


@contextlib.contextmanager
def _sampling(model: nn.Module, holder: list, active: bool, compile_model: bool):
    """For the block: every sampled dropout module of ``model`` runs :func:`_copies_dropout` (masks
    from ``holder[0]``, a :class:`_Plan`), and the yielded forward is the model itself or, with
    ``compile_model``, a :class:`landscape_tools._compiled.SeededCompiled` wrapper: the same masks
    (:func:`_copies_mask`), drawn outside the compiled graph and passed in (one graph, no break at the
    dropout modules, no recompilation per seed); restored on exit.

    Raises:
        ConfigError: ``compile_model`` with MC sampling of ordinary ``nn.Dropout`` modules (user models).
    """

    sampled = sampling_dropout_modules(model) if active else []
    if compile_model and any(not isinstance(m, MCDropout) for _, m in sampled):
        raise ConfigError("--compile supports MC sampling of zoo models (MCDropout layers) and models without "
                          "dropout; this model's torch.nn.Dropout modules are sampled by a forward of ours that "
                          "torch.compile would trace into the graph: drop --compile")
    if compile_model:               # one graph: the masks are drawn outside it and passed in as tensors
        from ._compiled import SeededCompiled
        yield SeededCompiled(model, [m for _, m in sampled], _copies_mask(holder), dynamic=None)
        return
    forwards = [(m, _copies_dropout(m, index, holder, isinstance(m, _CHANNEL_DROPOUTS)))
                for index, (_, m) in enumerate(sampled)]
    with replaced_forwards(forwards):
        yield model


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom and isinstance(exc, oom)) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


#: the per-sample values of :func:`_sample_values`, in order
_PER_SAMPLE = ("log_prob", "correct", "confidence", "brier")


def _sample_values(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(4, rows) float64: ``log max(p_y, PROB_FLOOR)``, correctness (0/1), max probability, Brier term."""
    p = _as_numpy(probs, np.float64)
    y = _as_numpy(labels, None).astype(np.int64)
    p_true = p[np.arange(p.shape[0]), y]
    return np.stack([np.log(np.maximum(p_true, PROB_FLOOR)), (np.argmax(p, axis=1) == y).astype(np.float64),
                     p.max(axis=1), (p ** 2).sum(axis=1) - 2.0 * p_true + 1.0])


def _batch_state(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> np.ndarray:
    acc = MetricAccumulator(n_bins)
    acc.add(probs, labels)
    return acc.state()
