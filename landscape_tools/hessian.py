"""Hessian eigen-spectra of a model's loss: per mini-batch or for the whole data.

The Hessian is that of the mean cross-entropy (plus ``wd/2 * ||w||^2`` with ``weight_decay``) in
eval mode (BatchNorm on running statistics).  Models that sample dropout in eval mode (MC dropout)
get one fixed, seeded dropout mask per batch, so every operator is a fixed symmetric matrix; this is
checked before solving.  ``scope="batch"`` gives one Hessian per batch (the paper's figure);
``scope="dataset"`` the Hessian of the mean loss over all batches, weighted by batch size.

Example (notebook)::

    from landscape_tools.hessian import top_eigenvalues
    res = top_eigenvalues(model, data.batches()[:4], k=5)
    res.eigenvalues          # (4, 5) float64, |value| descending per row
    res.certificates.max()   # <= 1e-4: every value is within that (relative) of an eigenvalue
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import _lanczos, seeds
from ._hvp import FORMS, HessianOperator, default_form, resolve_sub_batch, select_parameters
from .device import Progress, report
from .errors import ConfigError, LTError
from .seeds import derive_seed
from .streaming import as_sequence, batch_sizes, select

__all__ = ["top_eigenvalues", "hessian_operator", "HessianSpectrum", "METHODS", "WHICH", "SCOPES",
           "default_max_iter", "count_hessian_parameters", "summary", "result_layout", "row_values",
           "SharedDataOperator", "PeerFailed", "HessianOptions", "parse_sub_batch", "plan_run", "run_hessian",
           "write_row", "run_job", "run_dataset_ranks", "dataset_share",
           "merge_units"]

METHODS = ("lanczos", "power")
WHICH = _lanczos.WHICH
SCOPES = ("batch", "dataset")
#: warm start: Ritz vectors kept beyond the k wanted, and the weight of the cold start vector mixed in
WARM_GUARDS = 3
WARM_MIX = 0.1
#: density grid points and Gaussian broadening (fraction of each spectrum's width)
DENSITY_GRID = 512
DENSITY_SIGMA = 0.01


def default_max_iter(method: str, k: int) -> int:
    """Lanczos: budget of HVPs; power: HVPs per wanted eigenvalue (``max_iter * k`` in all, the budget
    of single-vector power iteration with ``max_iter`` iterations per eigenvalue)."""
    return max(300, 40 * int(k)) if method == "lanczos" else 1000


@dataclass
class HessianSpectrum:
    """Eigenvalues (and optional trace and density) of one model's Hessian(s).

    Rows are batches (``scope="batch"``) or the single whole-data Hessian (``scope="dataset"``).
    Rows skipped (already done in an earlier run) hold NaN.

    Attributes:
        eigenvalues: (rows, k) float64, signed, in ``which`` order.
        residuals: (rows, k) ``||Hv - lambda v|| / |lambda|``.
        converged: (rows, k) bool, certificate <= tol.
        hvp_count: (rows,) Hessian-vector products the solver used, including its start vector's
            (the determinism check's second product of that vector, and trace / density products, not
            included).
        batch_sizes: (n_batches,) samples per batch used (for ``dataset``: every batch averaged).
        trace: dict of arrays (``samples``, ``estimate``, ``stderr``, ``hutchpp``, ``hutchpp_stderr``)
            or None.
        density: dict (``nodes``, ``weights`` (rows, runs, steps); ``grid``, ``density`` (rows, G);
            ``sigma`` (rows,)) or None.
        eigenvectors: list per row of (k, n) float64 tensors when asked for, else None.
        vectors: with ``save_vectors``, how the eigenvectors go into a file (:func:`vector_meta`):
            one dataset per parameter under ``eigenvectors/`` (see :func:`result_layout`).
        certificates: (rows, k) bound on ``|lambda - theta| / |theta|`` for the eigenvalue ``theta``
            is nearest to (:func:`landscape_tools._lanczos.certificates`): at most the residual, and
            about ``residual**2 * |theta| / gap`` where the Ritz values show a gap.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    hvp_count: np.ndarray
    batch_sizes: np.ndarray
    method: str
    which: str
    k: int
    tol: float
    max_iter: int
    scope: str
    num_params: int
    config: dict = field(default_factory=dict)
    trace: dict | None = None
    density: dict | None = None
    eigenvectors: list | None = None
    certificates: np.ndarray | None = None
    vectors: dict | None = None   # how eigenvectors are stored (vector_meta): layout, dtype, attrs

    def to_node(self, attrs: dict | None = None) -> dict:
        """The HDF5 node of ``store.write_result`` (ARCHITECTURE.md schema v1)."""
        node = result_layout(self.eigenvalues.shape[0], self.k, self.batch_sizes, self.attrs(), self.trace is not None,
                             self.config.get("trace_probes", 0), self.density is not None,
                             self.config.get("density_runs", 0), self.config.get("density_steps", 0),
                             vectors=self.vectors)
        node["attrs"].update(attrs or {})
        for i in range(self.eigenvalues.shape[0]):
            if np.all(np.isnan(self.eigenvalues[i])):
                continue
            for path, value in row_values(self, i).items():
                group = node
                parts = path.split("/")
                for p in parts[:-1]:
                    group = group["groups"][p]
                group["data"][parts[-1]][i] = value
        return node

    def attrs(self) -> dict:
        return {"method": self.method, "which": self.which, "k": self.k, "tol": self.tol, "max_iter": self.max_iter,
                "scope": self.scope, "hessian_params": self.num_params, **{
                    key: self.config[key] for key in ("params", "weight_decay", "mc_seed", "seed", "form", "ncv", "precision",
                                                     "sub_batch", "sub_batch_used", "warm_start")
                    if key in self.config}}


def count_hessian_parameters(model: nn.Module, params: str | Sequence[str] | None = None) -> int:
    """Dimension of the Hessian: entries of the trainable parameters matching ``params``."""
    return int(sum(p.numel() for _, p in select_parameters(model, params)))


def hessian_operator(model: nn.Module, batches, params=None, weight_decay: float = 0.0, mc_seed: int | None = None,
                     batch_indices: Sequence[int] | None = None, form: str = "auto", precision: str = "fp32",
                     sub_batch: int | str | None = "auto"):
    """A matrix-free Hessian (``op(v) -> Hv`` on flat float64 vectors) of the size-weighted mean loss
    over ``batches``; see :class:`landscape_tools._hvp.HessianOperator`.  Close it when done.

    With ``precision`` ``bf16`` / ``fp16`` the model's forward pass runs under
    :func:`landscape_tools.precision.autocast` (the logits, and so the loss, are cast back to the
    model's dtype); ``fp32`` is the plain operator.  ``sub_batch``: samples processed together (the
    matrix is the same; smaller pieces lower the peak memory), ``None`` for whole batches, ``"auto"``
    by device.

    Raises:
        ConfigError: bad ``params`` / ``form`` / ``precision``, or a device without that autocast.
    """
    return _make_operator(model, _as_batches(batches), batch_indices, params, weight_decay,
                          0 if mc_seed is None else mc_seed, form, precision, sub_batch)


def _make_operator(model, batches, batch_indices, params, weight_decay, mc_seed, form, precision="fp32",
                   sub_batch: int | str | None = "auto"):
    from .precision import parse_hessian_precision
    precision = parse_hessian_precision(precision)
    if precision in ("fp32", "tf32"):
        return HessianOperator(model, batches, batch_indices=batch_indices, params=params,
                               weight_decay=weight_decay, mc_seed=mc_seed, form=form, sub_batch=sub_batch,
                               precision=precision)
    restore = _autocast_forward(model, precision)
    try:
        op = HessianOperator(model, batches, batch_indices=batch_indices, params=params,
                             weight_decay=weight_decay, mc_seed=mc_seed, form=form, sub_batch=sub_batch,
                             precision=precision)
    except BaseException:
        restore()
        raise
    return _RestoringOperator(op, restore)


def _autocast_forward(model: nn.Module, precision: str) -> Callable[[], None]:
    """Make ``model``'s forward pass run under autocast at ``precision`` (logits cast back to the
    model's dtype) by shadowing its ``forward`` on the instance, which every HVP form (plain calls and
    ``torch.func.functional_call``) goes through and which leaves parameter names untouched.
    Returns the function that undoes it."""
    from .precision import autocast, full_precision, model_dtype

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with autocast(device, precision):     # refuses an unsupported device / precision before anything changes
        pass
    dtype = model_dtype(model)
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    original = model.forward

    def forward(*args, **kwargs):
        with autocast(device, precision):
            out = original(*args, **kwargs)
        return full_precision(out, dtype)

    model.forward = forward

    def restore() -> None:
        if had_own:
            model.forward = previous
        else:
            model.__dict__.pop("forward", None)

    return restore


class _RestoringOperator:
    """A :class:`HessianOperator` whose :meth:`close` also undoes a change to the model."""

    def __init__(self, op, restore: Callable[[], None]):
        self.op, self._restore = op, restore

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.op(v)

    def __getattr__(self, name):
        return getattr(self.op, name)

    def close(self) -> None:
        try:
            self.op.close()
        finally:
            self._restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PeerFailed(LTError):
    """Another process sharing a :class:`SharedDataOperator` failed while forming its part of a product."""


class SharedDataOperator:
    """The Hessian of the mean loss over all ``batches`` when several processes share them.

    Each process forms the products of its own batches only (``mine``), weighted ``n_b / N`` with
    ``N`` the samples of *all* batches, and ``reduce`` (a sum over the processes, e.g. an all-reduce)
    adds the parts: the sum is exactly the one-process operator ``sum_b (n_b / N) H_b`` (+ ``wd``).
    The weight decay term is added once, after the sum.  Every process must apply the operator to the
    same vectors in the same order (the solvers are deterministic given their seeds, and every
    process receives the same reduced products, so they stay in lock-step).

    A process whose part fails (e.g. a non-finite loss in one of its batches) still takes part in the
    sum, with a failure flag riding along with the product: that process raises its own error and
    every other one :class:`PeerFailed` at the same product, so no process waits for another forever.

    Args:
        model: the model (every process holds a copy).
        batches: every batch of the data (the same list on every process).
        mine: indices into ``batches`` this process computes (may be empty).
        reduce: ``reduce(t) -> t`` summing a float64 tensor over the processes (identity for one).
        rank, world_size: this process's place among them.
        params, weight_decay, mc_seed, form, precision, sub_batch: as :func:`hessian_operator`; batch ``i`` uses the
            dropout mask of batch ``i`` of the whole data, and ``form="auto"`` resolves as it would for
            one process holding every batch.

    Raises:
        ConfigError: as :func:`hessian_operator`, or ``mine`` outside the batches.
    """

    def __init__(self, model: nn.Module, batches, mine: Sequence[int], reduce: Callable[[torch.Tensor], torch.Tensor],
                 rank: int = 0, world_size: int = 1, params=None, weight_decay: float = 0.0, mc_seed: int = 0,
                 form: str = "auto", precision: str = "fp32", sub_batch: int | str | None = "auto"):
        batches = _as_batches(batches)
        if not batches:
            raise ConfigError("no batches to build a Hessian from")
        mine = [int(i) for i in mine]
        if any(not 0 <= i < len(batches) for i in mine):
            raise ConfigError(f"batch indices {mine} are outside 0..{len(batches) - 1}")
        if not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank {rank} is outside 0..{int(world_size) - 1}")
        self.reduce, self.rank, self.world_size = reduce, int(rank), int(world_size)
        self.weight_decay = float(weight_decay)
        sizes = batch_sizes(batches)
        total = sum(sizes)
        local = sum(sizes[i] for i in mine)
        self.empty = not mine
        # a process without batches keeps an operator over batch 0 for the parameter layout only
        # (never applied: its part of every product is zero)
        idx = mine or [0]
        if form == "auto":
            form = default_form(next(model.parameters()).device, len(batches))
        self.inner = _make_operator(model, select(batches, idx), idx, params, 0.0, mc_seed, form, precision,
                                    sub_batch)
        self.scale = 0.0 if self.empty else local / total
        self.dim, self.device, self.dtype = self.inner.dim, self.inner.device, self.inner.dtype
        self.form = self.inner.form
        # the inner operator's determinism check must compare *summed* products (the same on every
        # process, so every process passes or fails it together): shadow its matvec
        target = self.inner.op if isinstance(self.inner, _RestoringOperator) else self.inner
        self._local = target.__class__.matvec.__get__(target)
        target.matvec = self.matvec
        self._target = target
        self.count = 0

    def matvec(self, v: torch.Tensor, form: str | None = None) -> torch.Tensor:
        """``H v`` summed over the processes (float64 on the model's device)."""
        hv = self._summed(lambda: self._local(v, form) * self.scale, "a Hessian-vector product")
        if self.weight_decay:
            hv.add_(v.to(hv), alpha=self.weight_decay)
        self.count += 1
        return hv

    __call__ = matvec

    def free_gradient(self) -> torch.Tensor:
        """The gradient of the mean loss over every process's batches (float64 on the model's device,
        weight decay excluded), summed like a product: the start vector of a one-process run."""
        return self._summed(lambda: self.inner.free_gradient().to(torch.float64) * self.scale, "the gradient")

    def _summed(self, local, what: str) -> torch.Tensor:
        """``local()`` (this process's share, a float64 vector; zero without batches) summed over the
        processes.  A process whose share fails still joins the sum, flagged, so nobody waits forever;
        then it raises its error and the others :class:`PeerFailed` naming ``what``."""
        error = None
        flags = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        try:
            part = torch.zeros(self.dim, dtype=torch.float64, device=self.device) if self.empty else local()
        except Exception as exc:
            error = exc
            part = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
            flags[self.rank] = 1.0
        total = self.reduce(torch.cat([part, flags]))
        failed = [int(r) for r in torch.nonzero(total[self.dim:] > 0).flatten()]
        if error is not None:
            raise error
        if failed:
            raise PeerFailed(f"process(es) {', '.join(map(str, failed))} of {self.world_size} failed while "
                             f"forming {what} (see their messages)")
        return total[:self.dim].contiguous()

    def checked_matvec(self, v: torch.Tensor, label: str = "") -> tuple[float, torch.Tensor]:
        """:meth:`HessianOperator.checked_matvec` of the summed operator: both products go through
        the sum, so every process sees the same difference and passes or fails the check together."""
        return self._target.checked_matvec(v, label=label)

    def close(self) -> None:
        self._target.__dict__.pop("matvec", None)
        self.inner.close()

    def __enter__(self) -> "SharedDataOperator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_batches(batches) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(batches, "batches") and callable(batches.batches):
        return batches.batches()
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        return [batches]
    return as_sequence(batches)     # streamed batches stay unread until used


def _validate(k, which, method, tol, max_iter, scope, weight_decay, dim=None):
    """The checks of :func:`top_eigenvalues`' options (and :class:`HessianOptions`'); ``dim``: the
    Hessian's size, when known, which ``k`` may not exceed."""
    if which not in WHICH:
        raise ConfigError(f"--which {which!r} is not one of {', '.join(WHICH)} (LM: largest magnitude, "
                          f"LA: largest algebraic, SA: smallest algebraic)")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ConfigError(f"--scope {scope!r} is not one of {', '.join(SCOPES)}")
    if int(k) < 1:
        raise ConfigError(f"--top-k {k} must be at least 1")
    if dim is not None and int(k) > dim:
        raise ConfigError(f"--top-k {k} is larger than the number of parameters in the Hessian ({dim}); "
                          f"ask for at most {dim} eigenvalues, or widen --params")
    if not tol > 0:
        raise ConfigError(f"--tol {tol} must be positive (a relative eigenvalue accuracy such as 1e-4)")
    if max_iter is not None and int(max_iter) < 1:
        raise ConfigError(f"--max-iter {max_iter} must be at least 1")
    if not weight_decay >= 0:
        raise ConfigError(f"--weight-decay {weight_decay} must be >= 0")


def _validate_form(form) -> None:
    if form not in FORMS + ("auto",):
        raise ConfigError(f"HVP form {form!r} is not one of {', '.join(FORMS)}, auto")


def _validate_estimators(trace, trace_probes, density, density_runs, density_steps) -> None:
    """The checks of the trace and density options (:func:`top_eigenvalues`, :class:`HessianOptions`)."""
    if trace and int(trace_probes) < 3:
        raise ConfigError(f"--trace-probes {trace_probes} must be at least 3 (Hutch++ splits them in three)")
    if density and (int(density_runs) < 1 or int(density_steps) < 2):
        raise ConfigError(f"density needs at least 1 run and 2 steps (got {density_runs} x {density_steps})")


def top_eigenvalues(model: nn.Module, batches, k: int = 5, which: str = "LM", method: str = "lanczos",
                    tol: float = 1e-4, max_iter: int | None = None, params: str | Sequence[str] | None = None,
                    weight_decay: float = 0.0, mc_seed: int | None = None, scope: str = "batch", *,
                    seed: int = 0, trace: bool = False, trace_probes: int = 30, density: bool = False,
                    density_runs: int = 4, density_steps: int = 64, ncv: int | None = None, form: str = "auto",
                    return_vectors: bool = False, skip: Sequence[int] | None = None,
                    on_row: Callable[[int, "HessianSpectrum"], None] | None = None, progress: Progress = None,
                    label: str = "", precision: str = "fp32", sub_batch: int | str | None = "auto",
                    make_operator: Callable[[list[int]], Any] | None = None,
                    warm_start: bool = True, save_vectors: str | None = None) -> HessianSpectrum:
    """Top-k Hessian eigenvalues of ``model``'s loss, per batch or for the whole data.

    Args:
        model: any ``nn.Module`` returning logits (left in its original mode afterwards).
        batches: list of ``(x, y)`` on the model's device, one ``(x, y)`` pair, or a ``DataSet``.
        k: number of eigenvalues.
        which: ``LM`` (largest magnitude, signed; the paper's), ``LA`` or ``SA``.
        method: ``lanczos`` (thick-restart Lanczos) or ``power`` (the paper's deflated power
            iteration, done on a block with Rayleigh-Ritz and locking: no Krylov basis).
        tol: relative eigenvalue accuracy: each value is solved until its certificate (a bound on
            ``|lambda - theta| / |theta|`` for the eigenvalue ``theta`` is nearest to, from its
            residual and the gap to the other Ritz values; see ``certificates`` in the result) is at
            most ``tol``.  ``method="power"`` stops on the residual ``||Hv - lambda v|| <= tol |lambda|``,
            which bounds the same error.
        max_iter: lanczos: HVP budget; power: HVPs per eigenvalue, ``max_iter * k`` in all (default
            :func:`default_max_iter`). Pairs that miss ``tol`` are flagged in ``converged``.
        params: glob(s) of the parameters spanning the Hessian (comma separated; None: all).
        weight_decay: adds ``wd/2 * ||w||^2`` to the loss (every eigenvalue + wd).
        mc_seed: seed of the fixed dropout masks of models that sample dropout in eval mode
            (default 0); batch ``i`` uses the masks of ``mc_dropout(model, True,
            seed=derive_seed(mc_seed, seeds.HESSIAN_BATCH_MASKS, i))`` (:mod:`landscape_tools.seeds`).
        scope: ``batch`` (one Hessian per batch) or ``dataset`` (one for the mean loss).
        seed: seed of start vectors and probes: row ``i``'s solver is seeded
            ``derive_seed(seed, seeds.HESSIAN_START, i)``, its Hutchinson, Hutch++ and SLQ draws
            ``derive_seed(seed, seeds.HESSIAN_HUTCHINSON | HESSIAN_HUTCHPP | HESSIAN_SLQ, i)``.
        trace: also estimate the trace (Hutchinson with ``trace_probes`` probes and Hutch++ with as many).
        density: also compute the stochastic Lanczos quadrature density (``density_runs`` x ``density_steps``).
        ncv: Lanczos basis size before a restart (default ``max(2k + 10, 30)``).
        form: HVP form ``graph``, ``double``, ``func`` or ``auto`` (by device).
        return_vectors: keep the eigenvectors (rows x (k, n) float64) in the result.
        skip: rows not to compute (left NaN), e.g. done by an interrupted earlier run.
        on_row: called with ``(row, result)`` after each finished row (for resumable writes): the
            write of :func:`landscape_tools.engine.run_units`, the loop the rows run in; if a row
            fails or is interrupted, the rows finished before it are still passed to ``on_row``.
        progress: ``progress(done, total, message)`` callback, after each row (and before row 0 is
            solved again for the warm start).
        label: model name used in messages.
        precision: ``fp32`` (default, exact), ``bf16`` or ``fp16``: the forward pass of the loss runs
            under autocast, the loss itself in the model's dtype (an approximate Hessian).
        sub_batch: samples processed together in every product (``None``: whole batches; ``"auto"``:
            32 on a CPU, whole batches on a GPU).  The Hessian does not depend on it; the peak memory
            does (smaller pieces, smaller second-backward buffers).  A product that runs out of memory
            is formed again in pieces of half the samples (down to 1), kept for the rest of the run,
            said once on stderr, and recorded as ``config["sub_batch_used"]`` (an attribute).
        make_operator: ``make_operator(batch_indices) -> operator`` builds each row's operator instead
            of :func:`hessian_operator` (e.g. a :class:`SharedDataOperator` under torchrun).
        warm_start: (``lanczos``, ``scope="batch"``) start every row after the first from the Ritz vectors
            of row 0 (the first batch; its top-k and :data:`WARM_GUARDS` more), mixed with the cold
            start vector: the batches' top eigenspaces overlap, so fewer products reach ``tol``.  Row
            0 is solved again (cold, not stored) when ``skip`` leaves it out, so every row's values
            depend only on its batch, the first batch and the seeds, whichever rows a call computes;
            with and without warm start they agree to within the certificates.
        save_vectors: ``"float32"`` or ``"float64"``: keep the eigenvectors (as ``return_vectors``)
            and lay them out for a file (``eigenvectors/<parameter name>`` (rows, k, *shape) in that
            dtype, with the model's fingerprint: ``lt surface --directions FILE`` reads them).

    Returns:
        :class:`HessianSpectrum`.

    Raises:
        ConfigError: bad option values, ``k`` larger than the Hessian, no matching parameters.
        NumericalError: non-finite loss, or an operator that is not deterministic.
    """
    from . import engine

    out, todo, compute = _row_solver(
        model, batches, k, which, method, tol, max_iter, params, weight_decay, mc_seed, scope, seed=seed,
        trace=trace, trace_probes=trace_probes, density=density, density_runs=density_runs,
        density_steps=density_steps, ncv=ncv, form=form, return_vectors=return_vectors, skip=skip,
        progress=progress, label=label, precision=precision, sub_batch=sub_batch, make_operator=make_operator,
        warm_start=warm_start, save_vectors=save_vectors)
    name = f"{label}: " if label else ""

    def write(finished) -> None:
        if on_row is not None:
            for r, _ in finished:
                on_row(r, out)

    engine.run_units(todo, compute, write, progress=progress, total=len(todo),
                     message=lambda r, res: f"{name}row {r}: top {res.eigenvalues[r][0]:.5g}")
    return out


def _row_solver(model: nn.Module, batches, k: int = 5, which: str = "LM", method: str = "lanczos",
                tol: float = 1e-4, max_iter: int | None = None, params: str | Sequence[str] | None = None,
                weight_decay: float = 0.0, mc_seed: int | None = None, scope: str = "batch", *,
                seed: int = 0, trace: bool = False, trace_probes: int = 30, density: bool = False,
                density_runs: int = 4, density_steps: int = 64, ncv: int | None = None, form: str = "auto",
                return_vectors: bool = False, skip: Sequence[int] | None = None, progress: Progress = None,
                label: str = "", precision: str = "fp32", sub_batch: int | str | None = "auto",
                make_operator: Callable[[list[int]], Any] | None = None,
                warm_start: bool = True,
                save_vectors: str | None = None) -> tuple[HessianSpectrum, list[int], Callable[[int], HessianSpectrum]]:
    """The rows of :func:`top_eigenvalues` as units of :func:`landscape_tools.engine.run_units`:
    the options validated, the result with every row NaN, the rows to compute (all but ``skip``) and
    ``compute(row)``, which solves one row into the result and returns it.

    ``compute`` holds the warm start's anchor (row 0's Ritz vectors) between the rows it is given:
    kept from row 0 when row 0 is computed first, else row 0 solved again (cold, not stored) before
    the first other row, with ``progress`` told so; a row interrupted or failed leaves the anchor as
    it was.  Arguments as :func:`top_eigenvalues`.
    """
    batch_list = _as_batches(batches)
    if not batch_list:
        raise ConfigError("no batches given: nothing to take a Hessian of")
    dim = count_hessian_parameters(model, params)
    _validate(k, which, method, tol, max_iter, scope, weight_decay, dim)
    vectors_meta = vector_meta(model, params, which, save_vectors) if save_vectors else None
    return_vectors = bool(return_vectors or save_vectors)
    _validate_form(form)
    from .precision import parse_hessian_precision
    precision = parse_hessian_precision(precision)
    k = int(k)
    max_iter = int(max_iter) if max_iter is not None else default_max_iter(method, k)
    mc_seed = 0 if mc_seed is None else int(mc_seed)
    sub_batch = resolve_sub_batch(sub_batch, next(model.parameters()).device)
    sizes = np.asarray(batch_sizes(batch_list), dtype=np.int64)
    groups = [[i] for i in range(len(batch_list))] if scope == "batch" else [list(range(len(batch_list)))]
    rows = len(groups)
    config = {"params": params, "weight_decay": float(weight_decay), "mc_seed": mc_seed, "seed": int(seed),
              "form": form, "ncv": ncv, "trace_probes": int(trace_probes) if trace else 0,
              "density_runs": int(density_runs) if density else 0,
              "density_steps": int(density_steps) if density else 0, "precision": precision,
              "sub_batch": _sub_batch_attr(sub_batch), "warm_start": _warm(warm_start, method, scope)}
    out = HessianSpectrum(
        eigenvalues=np.full((rows, k), np.nan), residuals=np.full((rows, k), np.nan),
        certificates=np.full((rows, k), np.nan),
        converged=np.zeros((rows, k), dtype=bool), hvp_count=np.full(rows, -1, dtype=np.int64),
        batch_sizes=sizes, method=method, which=which, k=k, tol=float(tol), max_iter=max_iter, scope=scope,
        num_params=dim, config=config,
        trace=_empty_trace(rows, trace_probes) if trace else None,
        density=_empty_density(rows, density_runs, density_steps) if density else None,
        eigenvectors=[None] * rows if return_vectors else None, vectors=vectors_meta)
    _validate_estimators(trace, trace_probes, density, density_runs, density_steps)
    skip_set = set(int(s) for s in (skip or ()))
    todo = [r for r in range(rows) if r not in skip_set]
    name = f"{label}: " if label else ""
    # warm start (scope batch, lanczos): every row after the first starts from the Ritz vectors of
    # row 0 (the first batch), never from whatever row this process happened to solve before, so a
    # row's result depends only on its batch, the first batch and the seeds (resume and torchrun
    # give the same numbers); row 0 is solved again, cold, when this call does not compute it
    warm = _warm(warm_start, method, scope) and rows > 1
    keep = k + WARM_GUARDS if warm else 0

    # pieces made smaller by an out-of-memory error stay smaller for the rest of the run
    pieces = {"size": sub_batch}

    def operator(r):
        idx = groups[r]
        return (make_operator(idx) if make_operator is not None else
                _make_operator(model, select(batch_list, idx), idx, params, weight_decay, mc_seed, form,
                               precision, pieces["size"]))

    def note_pieces(op):
        used = getattr(op, "sub_batch", pieces["size"])
        if used != pieces["size"] and (pieces["size"] is None or (used is not None and used < pieces["size"])):
            pieces["size"] = used
            out.config["sub_batch_used"] = _sub_batch_attr(used)

    def solve(op, r, warm_vectors, vectors):
        row_seed = derive_seed(seed, seeds.HESSIAN_START, r)
        common = {"which": which, "tol": tol, "seed": row_seed, "device": op.device, "return_vectors": vectors}
        # the start vector's product is formed twice (the determinism check of this very
        # operator) inside the solver, which alone holds the vectors
        start = lambda: _checked_start(op, dim, which, row_seed, label, warm=warm_vectors)  # noqa: E731
        if method == "lanczos":
            return _lanczos.thick_restart_lanczos(op, dim, k, max_hvps=max_iter, ncv=ncv,
                                                  basis_dtype=_basis_dtype(op, tol), start=start,
                                                  precision=_precision(op), **common)
        return _lanczos.deflated_power(op, dim, k, max_iter=max_iter, start=start, precision=_precision(op), **common)

    state = {"anchor": None, "computed": 0}

    def compute(r: int) -> HessianSpectrum:
        anchor = state["anchor"]
        if warm and r != 0 and anchor is None:
            report(progress, state["computed"], len(todo), f"{name}row 0 again (the warm start of the others)")
            op = operator(0)
            try:
                anchor = state["anchor"] = _anchor(solve(op, 0, None, keep).vectors, op)
            finally:
                note_pieces(op)
                op.close()
        op = operator(r)
        try:
            vectors = keep if warm and r == 0 else return_vectors
            pairs = solve(op, r, anchor if warm and r != 0 else None, vectors)
            if warm and r == 0:
                state["anchor"] = _anchor(pairs.vectors, op)
            out.eigenvalues[r] = pairs.values
            out.residuals[r] = pairs.residuals
            out.certificates[r] = pairs.certificates
            out.converged[r] = pairs.converged
            out.hvp_count[r] = pairs.hvps
            if return_vectors:
                out.eigenvectors[r] = pairs.vectors[:k]
            pairs = None
            if trace:
                hut = _lanczos.hutchinson(op, dim, int(trace_probes), seed=derive_seed(seed, seeds.HESSIAN_HUTCHINSON, r),
                                          device=op.device)
                hpp = _lanczos.hutchpp(op, dim, int(trace_probes), seed=derive_seed(seed, seeds.HESSIAN_HUTCHPP, r),
                                       device=op.device)
                out.trace["samples"][r] = hut["samples"]
                out.trace["estimate"][r] = hut["estimate"]
                out.trace["stderr"][r] = hut["stderr"]
                out.trace["hutchpp"][r] = hpp["estimate"]
                out.trace["hutchpp_stderr"][r] = hpp["stderr"]
            if density:
                nodes, weights = _lanczos.slq(op, dim, int(density_runs), int(density_steps),
                                              seed=derive_seed(seed, seeds.HESSIAN_SLQ, r), device=op.device,
                                              basis_dtype=_density_basis_dtype(op))
                grid, dens, sigma = _density_on_grid(nodes, weights)
                out.density["nodes"][r] = nodes
                out.density["weights"][r] = weights
                out.density["grid"][r] = grid
                out.density["density"][r] = dens
                out.density["sigma"][r] = sigma
        finally:
            note_pieces(op)
            op.close()
        state["computed"] += 1
        return out

    return out, todo, compute


def _warm(warm_start: bool, method: str, scope: str) -> bool:
    """Whether rows are warm-started: asked for, Lanczos, one Hessian per batch."""
    return bool(warm_start) and method == "lanczos" and scope == "batch"


def parse_sub_batch(value) -> int | str | None:
    """A ``--sub-batch`` value: ``"auto"``, ``"whole"`` / None (whole batches: None) or a positive
    number of samples (an int or its text).

    Raises:
        ConfigError: anything else.
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "whole"):
        return None if text == "whole" else "auto"
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"--sub-batch {value!r} is not a positive number of samples, 'auto' or 'whole' "
                          f"(e.g. --sub-batch 32)")
    return number


def _sub_batch_attr(sub_batch: int | None):
    """A resolved sub-batch as stored in results: samples per piece, or ``"whole"``."""
    return "whole" if sub_batch is None else sub_batch


def _basis_dtype(op, tol: float) -> torch.dtype:
    """float32 Krylov basis storage (half the memory) for a float32 operator at ``tol >= 1e-6``,
    where its ~1e-7 loss of orthogonality is far below both the tolerance and the products' own
    rounding; float64 otherwise."""
    return torch.float32 if getattr(op, "dtype", torch.float64) == torch.float32 and tol >= 1e-6 else torch.float64


def _density_basis_dtype(op) -> torch.dtype:
    """The SLQ basis's storage: float64 for a float64 model (exact to its rounding), float32 for
    every other (half the memory; its ~1e-7 relative rounding is that of the products themselves)."""
    return torch.float64 if getattr(op, "dtype", torch.float64) == torch.float64 else torch.float32


def _precision(op) -> float:
    """Relative rounding of an operator's products: the lowest precision its forward passes ran in
    (``op.rounding()``), else its model's dtype's machine epsilon."""
    if callable(getattr(op, "rounding", None)):
        return float(op.rounding())
    dtype = getattr(op, "dtype", torch.float64)
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(torch.finfo(torch.float64).eps)


def _anchor(vectors: torch.Tensor, op) -> torch.Tensor:
    """Warm-start vectors as kept between rows: in the operator's dtype (float32 for float32 models,
    half the memory; they only steer the next start vector)."""
    dtype = getattr(op, "dtype", torch.float64)
    return vectors.to(dtype if dtype in (torch.float32, torch.float64) else torch.float64)


def _checked_start(op, dim: int, which: str, seed: int, label: str = "",
                   warm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The solvers' start ``(v, H v)``, ``H v`` formed twice and compared (the determinism check).

    For the top of the spectrum (LM, LA) ``v`` is the unit gradient plus a seeded unit random
    vector, normalised: the gradient of a trained net lies mostly in the top eigenspace (gradient
    descent happens in a tiny subspace, Gur-Ari et al. 2018), so the top pairs converge in fewer
    products, and the random half keeps every other direction in the Krylov space; every product form
    gives it (``free_gradient``).  For SA, for operators without ``free_gradient``, or a zero gradient,
    ``v`` is the seeded random unit vector.

    ``warm`` (rows: orthonormal Ritz vectors of a related Hessian, e.g. another batch's): ``v`` is
    their unit sum plus :data:`WARM_MIX` times the vector above.  A Krylov space started from a
    vector in a p-dimensional invariant subspace is that subspace after p products; the closer the
    rows are to this Hessian's top eigenvectors, the fewer products it takes.
    """
    v = _lanczos._random_unit(dim, seed, "cpu").to(op.device)
    g = None if which == "SA" or getattr(op, "free_gradient", None) is None else op.free_gradient()
    if g is not None:
        norm = float(torch.linalg.vector_norm(g))
        if np.isfinite(norm) and norm > 0.0:
            v.add_(g.to(v), alpha=1.0 / norm)
            v /= torch.linalg.vector_norm(v)
        del g  # freed before the products: nothing extra alive at their memory peak
    if warm is not None and warm.shape[0]:
        w = warm.to(device=v.device, dtype=torch.float64).sum(0)
        norm = float(torch.linalg.vector_norm(w))
        if np.isfinite(norm) and norm > 0.0:
            v = w.div_(norm).add_(v, alpha=WARM_MIX)
            v /= torch.linalg.vector_norm(v)
        del w
    return v, op.checked_matvec(v, label=label)[1]


def _density_on_grid(nodes: np.ndarray, weights: np.ndarray, points: int = DENSITY_GRID,
                     sigma_frac: float = DENSITY_SIGMA) -> tuple[np.ndarray, np.ndarray, float]:
    ok = np.isfinite(nodes)
    lo, hi = float(nodes[ok].min()), float(nodes[ok].max())
    width = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1e-300))
    sigma = sigma_frac * width
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    return grid, _lanczos.smooth_density(nodes, weights, grid, sigma), sigma


def _empty_trace(rows: int, probes: int) -> dict:
    return {"samples": np.full((rows, probes), np.nan), "estimate": np.full(rows, np.nan),
            "stderr": np.full(rows, np.nan), "hutchpp": np.full(rows, np.nan), "hutchpp_stderr": np.full(rows, np.nan)}


def _empty_density(rows: int, runs: int, steps: int) -> dict:
    return {"nodes": np.full((rows, runs, steps), np.nan), "weights": np.zeros((rows, runs, steps)),
            "grid": np.full((rows, DENSITY_GRID), np.nan), "density": np.full((rows, DENSITY_GRID), np.nan),
            "sigma": np.full(rows, np.nan)}


# ----------------------------------------------------------------------------- result files
VECTOR_DTYPES = ("float32", "float64")


def vector_meta(model: nn.Module, params, which: str, dtype: str) -> dict:
    """How one model's eigenvectors are stored: the Hessian's parameters in the order of its flat
    vectors (name, shape), the storage dtype, and the attributes of the ``eigenvectors`` group (the
    model's fingerprint, so the vectors are never used as directions of another model)."""
    from ._directions import model_fingerprint

    if dtype not in VECTOR_DTYPES:
        raise ConfigError(f"eigenvector dtype {dtype!r} is not one of {', '.join(VECTOR_DTYPES)} "
                          f"(e.g. --vector-dtype float32, the default)")
    return {"layout": [(name, tuple(int(d) for d in p.shape)) for name, p in select_parameters(model, params)],
            "dtype": dtype,
            "attrs": {"model_fingerprint": model_fingerprint(model), "params": "" if params is None else
                      (params if isinstance(params, str) else ",".join(params)), "dtype": dtype,
                      "which": str(which).upper(),
                      "note": "eigenvector i of row r is eigenvectors/<name>[r, i] over every parameter together, "
                              "unit norm, paired with eigenvalues[r, i]; parameters not listed are zero"}}


def result_layout(rows: int, k: int, batch_sizes: Sequence[int], attrs: dict, trace: bool = False,
                  trace_probes: int = 0, density: bool = False, density_runs: int = 0,
                  density_steps: int = 0, vectors: dict | None = None) -> dict:
    """The full-size HDF5 node of one model (NaN / False / -1 where not computed) for
    ``store.write_result`` or ``store.open_partial``; ``done`` (rows,) marks finished rows.
    ``vectors`` (:func:`vector_meta`) adds ``eigenvectors/<parameter name>`` (rows, k, *shape)."""
    node = {"attrs": dict(attrs), "data": {
        "eigenvalues": np.full((rows, k), np.nan), "residuals": np.full((rows, k), np.nan),
        "certificates": np.full((rows, k), np.nan), "converged": np.zeros((rows, k), dtype=bool),
        "hvp_count": np.full(rows, -1, dtype=np.int64),
        "batch_sizes": np.asarray(batch_sizes, dtype=np.int64), "done": np.zeros(rows, dtype=bool)},
        "groups": {}}
    if trace:
        node["groups"]["trace"] = {"attrs": {"probes": int(trace_probes), "distribution": "rademacher",
                                             "hutchpp_hvps": int(trace_probes)},
                                   "data": _empty_trace(rows, int(trace_probes))}
    if density:
        node["groups"]["density"] = {"attrs": {"runs": int(density_runs), "steps": int(density_steps),
                                               "method": "stochastic Lanczos quadrature, full reorthogonalisation",
                                               "broadening": "gaussian", "sigma_fraction": DENSITY_SIGMA},
                                     "data": _empty_density(rows, int(density_runs), int(density_steps))}
    if vectors:
        node["groups"]["eigenvectors"] = {
            "attrs": dict(vectors["attrs"]),
            "data": {name: np.full((rows, k, *shape), np.nan, dtype=vectors["dtype"])
                     for name, shape in vectors["layout"]}}
    return node


def row_values(result: HessianSpectrum, row: int) -> dict[str, Any]:
    """Slash path (inside a model's group) -> value of row ``row``, for writing it into a file."""
    vals = {"eigenvalues": result.eigenvalues[row], "residuals": result.residuals[row],
            "certificates": (result.certificates[row] if result.certificates is not None
                             else np.full(result.k, np.nan)), "converged": result.converged[row],
            "hvp_count": result.hvp_count[row], "done": True}
    if result.trace is not None:
        for key, arr in result.trace.items():
            vals[f"trace/{key}"] = arr[row]
    if result.density is not None:
        for key, arr in result.density.items():
            vals[f"density/{key}"] = arr[row]
    if result.vectors and result.eigenvectors is not None and result.eigenvectors[row] is not None:
        flat = result.eigenvectors[row][:result.k].detach().to("cpu", torch.float64)
        offset = 0
        for name, shape in result.vectors["layout"]:
            size = int(np.prod(shape, dtype=np.int64))
            vals[f"eigenvectors/{name}"] = flat[:, offset:offset + size].reshape(result.k, *shape).numpy().astype(
                result.vectors["dtype"])
            offset += size
    return vals


def summary(label: str, eigenvalues: np.ndarray, which: str = "LM", converged: np.ndarray | None = None) -> str:
    """One line: median and extremes of each row's first eigenvalue, negative count, convergence."""
    ev = np.asarray(eigenvalues, dtype=np.float64)
    done = ~np.all(np.isnan(ev), axis=1)
    ev = ev[done]
    if ev.size == 0:
        return f"{label}: no eigenvalues computed"
    top = ev[:, 0]
    neg = int(np.sum(ev < 0))
    rows = ev.shape[0]
    text = (f"{label}: top eigenvalue ({which}) median {np.median(top):.4g}, min {top.min():.4g}, "
            f"max {top.max():.4g} over {rows} {'Hessian' if rows == 1 else 'Hessians'}; "
            f"{neg} of {ev.size} eigenvalues negative")
    if converged is not None:
        bad = int(np.sum(~np.asarray(converged)[done]))
        if bad:
            text += f"; {bad} not converged (raise --max-iter)"
    return text


# ----------------------------------------------------------------------------- resumable runs into a file
@dataclass(frozen=True)
class HessianOptions:
    """The options of a Hessian run into a file (:func:`run_hessian`, :func:`run_job`, ``lt hessian``),
    validated once, when it is made; the fields hold the resolved values.

    The fields mean what :func:`top_eigenvalues`' arguments of the same names mean (``k``: ``--top-k``),
    which that per-model routine keeps as keywords.  Resolved on creation: ``which`` upper case,
    ``max_iter`` None -> :func:`default_max_iter`, ``mc_seed`` None -> 0, ``precision`` parsed
    (fp16 refused), ``sub_batch`` ``"auto"`` / None (whole batches) / samples, ``warm_start`` only
    with Lanczos on ``scope="batch"``.  The run's fingerprint hashes every field but ``sub_batch``
    (the Hessian does not depend on it; :func:`landscape_tools.engine.options_key`); the file
    records them as each model group's attributes.

    Raises:
        ConfigError: a value that is not one of the choices or out of range (its message names the
            option, the value and what is expected).
    """

    k: int = 5
    which: str = "LM"
    method: str = "lanczos"
    tol: float = 1e-4
    max_iter: int | None = None
    params: str | None = None
    weight_decay: float = 0.0
    mc_seed: int | None = None
    scope: str = "batch"
    seed: int = 0
    trace: bool = False
    trace_probes: int = 30
    density: bool = False
    density_runs: int = 4
    density_steps: int = 64
    form: str = "auto"
    precision: str = "fp32"
    sub_batch: int | str | None = field(default="auto", metadata={"identity": False})
    warm_start: bool = True
    save_vectors: str | None = None

    def __post_init__(self):
        from .precision import parse_hessian_precision

        which = str(self.which).upper()
        _validate(self.k, which, self.method, self.tol, self.max_iter, self.scope, self.weight_decay)
        _validate_estimators(self.trace, self.trace_probes, self.density, self.density_runs, self.density_steps)
        _validate_form(self.form)
        if self.save_vectors not in (None, "float32", "float64"):
            raise ConfigError(f"--vector-dtype {self.save_vectors!r} is not float32 or float64")
        k = int(self.k)
        resolved = {"k": k, "which": which, "tol": float(self.tol),
                    "max_iter": int(self.max_iter) if self.max_iter is not None else default_max_iter(self.method, k),
                    "weight_decay": float(self.weight_decay),
                    "mc_seed": 0 if self.mc_seed is None else int(self.mc_seed), "seed": int(self.seed),
                    "trace": bool(self.trace), "trace_probes": int(self.trace_probes), "density": bool(self.density),
                    "density_runs": int(self.density_runs), "density_steps": int(self.density_steps),
                    "precision": parse_hessian_precision(self.precision), "sub_batch": parse_sub_batch(self.sub_batch),
                    "warm_start": _warm(self.warm_start, self.method, self.scope),
                    "save_vectors": self.save_vectors or None}
        for name, value in resolved.items():
            object.__setattr__(self, name, value)


@dataclass
class HessianJob:
    """One model to analyse: its label, the module, its checkpoint info (or None) and its batches."""

    label: str
    model: nn.Module
    info: Any
    batches: list


def _short(description):
    """A data description without per-sample indices (HDF5 attributes must stay small)."""
    if isinstance(description, dict):
        return {k: (f"{len(v)} indices (in the run fingerprint)" if k == "indices" and isinstance(v, list) else _short(v))
                for k, v in description.items()}
    return description


@dataclass
class RunPlan:
    """What :func:`run_hessian` writes: the options, the sub-batch resolved for the models' device,
    the run's fingerprint, root attributes and the full-size layout of every model's group (see
    :func:`plan_run`)."""

    options: HessianOptions
    sub_batch: int | None
    identity: dict
    root: dict
    layout: dict
    rows: list
    key: dict

    @property
    def fingerprint(self) -> str:
        """What the partial file is resumed by (:func:`landscape_tools.engine.run_identity`)."""
        return self.identity["fingerprint"]


def plan_run(jobs: Sequence[HessianJob], options: HessianOptions, *, command: Sequence[str] | None = None,
             config: dict | None = None, device: str = "cpu", data_description: dict | None = None,
             shard: tuple[int, int] = (0, 1)) -> RunPlan:
    """Check the options against the models and lay out the result file (nothing is computed or written).

    ``shard``: ``(i, n)`` of a ``--shard I/N`` run (or a rank's file): part of the file's identity.

    Raises:
        ConfigError: no jobs; ``k`` larger than a model's Hessian; a shard of a ``dataset`` scope run.
    """
    from . import engine, store

    if not jobs:
        raise ConfigError("no models to analyse")
    o = options
    for job in jobs:
        _validate(o.k, o.which, o.method, o.tol, o.max_iter, o.scope, o.weight_decay,
                  count_hessian_parameters(job.model, o.params))
    if o.scope == "dataset" and int(shard[1]) > 1:
        raise ConfigError(f"--shard {shard[0]}/{shard[1]} with --scope dataset: every product of the one Hessian "
                          f"needs every batch, so independent jobs cannot share it; use --scope batch, or share the "
                          f"products between the ranks of one torchrun / srun job")
    key = {"options": engine.options_key(o), "data": data_description,
           "models": [{"label": j.label, "sha256": getattr(j.info, "sha256", None),
                       "batch_sizes": batch_sizes(j.batches)} for j in jobs]}
    p0 = next(iter(jobs[0].model.parameters()), None)
    identity = engine.run_identity("hessian", key, p0.device if p0 is not None else "cpu", shard)
    # str() because torch.__version__ is a str subclass that h5py cannot store as an attribute
    root = {key: str(value) if isinstance(value, str) else value
            for key, value in store.provenance("hessian", command, config, o.seed, device).items()}
    sub_batch = resolve_sub_batch(o.sub_batch, next(jobs[0].model.parameters()).device)
    layout, rows_of = {}, []
    for job in jobs:
        rows = len(job.batches) if o.scope == "batch" else 1
        rows_of.append(rows)
        attrs = dict(job.info.describe()) if job.info is not None else {}
        attrs.update({"method": o.method, "which": o.which, "k": o.k, "tol": o.tol, "max_iter": o.max_iter,
                      "scope": o.scope, "hessian_params": count_hessian_parameters(job.model, o.params),
                      "params": o.params, "weight_decay": o.weight_decay, "mc_seed": o.mc_seed,
                      "seed": o.seed, "precision": o.precision, "warm_start": o.warm_start,
                      "sub_batch": _sub_batch_attr(sub_batch),
                      "data": _short(data_description)})
        vectors = vector_meta(job.model, o.params, o.which, o.save_vectors) if o.save_vectors else None
        layout[job.label] = result_layout(rows, o.k, batch_sizes(job.batches), attrs, o.trace,
                                          o.trace_probes, o.density, o.density_runs, o.density_steps, vectors=vectors)
    return RunPlan(o, sub_batch, identity, root, layout, rows_of, key)


def _solve(job: HessianJob, o: HessianOptions, sub_batch, rows: bool = False, **kwargs):
    """:func:`top_eigenvalues` of one job with the run's options (``kwargs``: skip, on_row, label,
    make_operator, scope); ``rows``: :func:`_row_solver`'s ``(result, rows to do, compute)`` instead,
    for a caller that runs the rows itself."""
    kwargs.setdefault("scope", o.scope)
    return (_row_solver if rows else top_eigenvalues)(
        job.model, job.batches, k=o.k, which=o.which, method=o.method, tol=o.tol, max_iter=o.max_iter,
        params=o.params, weight_decay=o.weight_decay, mc_seed=o.mc_seed, seed=o.seed, trace=o.trace,
        trace_probes=o.trace_probes, density=o.density, density_runs=o.density_runs,
        density_steps=o.density_steps, form=o.form, precision=o.precision, sub_batch=sub_batch,
        warm_start=o.warm_start, save_vectors=o.save_vectors, **kwargs)


def write_row(part, label: str, row: int, res: HessianSpectrum) -> None:
    """Write one finished row of ``res`` into an open partial file: the values, a flush, then the
    row's ``done`` flag and a flush (a kill at any moment leaves either a finished row or none)."""
    values = row_values(res, row)
    done_flag = values.pop("done")
    for path, value in values.items():
        part.write(f"{label}/{path}", row, value)
    part.flush()
    part.write(f"{label}/done", row, done_flag)
    part.flush()


def run_hessian(jobs: Sequence[HessianJob], output: str, options: HessianOptions, *, overwrite: bool = False,
                command: Sequence[str] | None = None, config: dict | None = None, device: str = "cpu",
                data_description: dict | None = None, progress: Progress = None,
                on_row: Callable[[int, int], None] | None = None,
                shard: tuple[int, int] | None = None) -> dict:
    """Compute every job's spectra into ``output``, resumably, one finished row at a time.

    Rows go into ``output + ".partial"`` (values first, then the row's ``done`` flag, then a flush),
    so a run killed at any moment keeps every finished batch, and the same call later computes only
    the rest; the finished file is renamed to ``output``.  The result equals an uninterrupted run's
    because every row depends only on its batch and the seeds (with ``warm_start``, also on the first
    batch, whose Ritz vectors a call that does not compute row 0 solves again: the file is the same
    whichever rows each call or rank computes).

    Args:
        jobs: models with their batches.
        output: final ``.h5`` path.
        options: the run's :class:`HessianOptions` (validated when made).
        overwrite: replace an existing output or a partial file of another run.
        command, config, device: provenance (root attributes).
        data_description: stored in the fingerprint and in each group's ``data`` attribute.
        progress: ``progress(done, total, message)`` over all rows of all models.
        on_row: test hook called as ``on_row(job_index, row)`` after a row is computed (the unit
            loop's ``on_unit``: the row is written even if the hook raises).
        shard: ``(i, n)``: compute only the rows of ``--shard i/n`` (:func:`landscape_tools.engine.shard_units`:
            ``i, i + n, ...``; the others stay NaN / not done in the file, which ``lt merge`` assembles
            with the other shards), e.g. a rank's share; None: all.  ``--scope batch`` only.

    Returns:
        label -> :class:`HessianSpectrum` with the values computed in this call (rows done earlier NaN).

    Raises:
        ConfigError, NumericalError: as :func:`top_eigenvalues`; StoreError: output exists, is being
        written by another process, or a partial file of a different run is present.
    """
    from . import engine

    plan = plan_run(jobs, options, command=command, config=config, device=device,
                    data_description=data_description, shard=shard or (0, 1))
    part = engine.open_run(output, plan.root, plan.identity, plan.layout, overwrite=overwrite)
    results = {}
    try:
        done_before = {job.label: np.asarray(part.read(f"{job.label}/done"), dtype=bool) for job in jobs}
        if shard is not None:  # rows outside the share count as done here: never computed, never counted
            done_before = {label: d | ~np.isin(np.arange(d.size), engine.shard_units(d.size, *shard))
                           for label, d in done_before.items()}
        total = sum(int((~d).sum()) for d in done_before.values())
        count = 0
        pieces = plan.sub_batch
        for ji, job in enumerate(jobs):
            skip = [int(i) for i in np.flatnonzero(done_before[job.label])]
            res, todo, compute = _solve(job, options, pieces, rows=True, skip=skip, label=job.label)
            results[job.label] = res

            def write(finished, _label=job.label) -> None:
                for row, value in finished:
                    write_row(part, _label, row, value)

            # the rows are the units: each written as it finishes, an interrupted row dropped
            count = engine.run_units(
                todo, compute, write, progress=progress, done=count, total=total,
                message=lambda row, value, _label=job.label: f"{_label} row {row}: top {value.eigenvalues[row][0]:.5g}",
                on_unit=None if on_row is None else (lambda row, _ji=ji: on_row(_ji, row)))
            used = results[job.label].config.get("sub_batch_used")
            if used is not None:        # out of memory made the pieces smaller: kept for the next model
                pieces = None if used == "whole" else int(used)
            if pieces != plan.sub_batch:     # and recorded next to the requested sub_batch
                part.set_attrs(job.label, {"sub_batch_used": _sub_batch_attr(pieces)})
        part.finalize()
    finally:
        part.close()
    return results


# ----------------------------------------------------------------------------- shards, ranks and merging
def run_job(ctx, jobs: Sequence[HessianJob], output: str, options: HessianOptions, *,
            shard: tuple[int, int] | None = None, overwrite: bool = False, command: Sequence[str] | None = None,
            **kwargs):
    """:func:`run_hessian` on one process, on a ``--shard I/N`` or on the ranks of a torchrun / srun job.

    ``options.scope == "batch"``: the rows (one Hessian per batch) are the units; rank ``r`` of ``n`` computes
    rows ``r, r + n, ...`` into its rank file and rank 0 merges (:func:`landscape_tools.engine.run_ranks`);
    every row depends only on its batch and the seeds, so the file equals one process's bit for bit.
    ``"dataset"``: one Hessian of the mean loss, its products' batch partial sums shared and
    all-reduced (:func:`run_dataset_ranks`).  ``kwargs``: as :func:`run_hessian`.

    Returns:
        The output path (on every rank).
    """
    from pathlib import Path

    from . import engine

    if options.scope == "dataset" and ctx.distributed:
        engine.check_shard(ctx, shard)
        run_dataset_ranks(ctx, jobs, output, options, overwrite=overwrite, command=command, **kwargs)
        return Path(output)
    return engine.run_ranks(ctx, output, lambda out, part: run_hessian(
        jobs, str(out), options, shard=None if part == (0, 1) else part, overwrite=overwrite, command=command,
        **kwargs), shard=shard, overwrite=overwrite)


def dataset_share(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` forms the products of under ``--scope dataset``: every
    ``world_size``-th one from ``rank`` (balanced to within one batch; may be empty)."""
    from . import engine
    return [int(i) for i in engine.shard_units(int(n_batches), int(rank), int(world_size))]


def run_dataset_ranks(ctx, jobs: Sequence[HessianJob], output, options: HessianOptions, *, overwrite: bool = False,
                      command=None, progress: Progress = None, on_row=None, **kwargs) -> None:
    """``--scope dataset`` on the ranks of a job: the products of every model's Hessian are shared
    between the ranks and all-reduced (:class:`SharedDataOperator`); the units are the batches'
    partial sums of each product.

    Every rank validates the options and runs the same solvers on the same seeded vectors (they stay
    in lock-step because every rank receives the same summed products); rank 0 alone opens
    ``output``'s partial file, writes each finished model and renames the file at the end.  Each step
    that can fail on one rank only (opening the file, a product, a write, the final rename) is
    followed by a vote (:func:`landscape_tools.engine.vote`), so a failing rank stops the others
    instead of leaving them waiting; a model finished before a failure (or an earlier kill) stays in
    the partial file and is not recomputed when the same command runs again.
    """
    from . import engine, store
    from .distributed import all_reduce

    n_models = len(jobs)
    error, part, plan = None, None, None
    done = torch.zeros(n_models, dtype=torch.int64)
    try:
        plan = plan_run(jobs, options, command=command, **kwargs)
        if ctx.is_main:
            part = engine.open_run(output, plan.root, plan.identity, plan.layout, overwrite=overwrite)
            for i, job in enumerate(jobs):
                done[i] = int(bool(np.asarray(part.read(f"{job.label}/done")).all()))
    except Exception as exc:  # every rank must reach the collective below
        error = exc
    # one collective: who failed, and which models rank 0 found finished in a partial file
    flags = torch.zeros(ctx.world_size + n_models, dtype=torch.int64)
    flags[ctx.rank] = 0 if error is None else 1
    if ctx.is_main:
        flags[ctx.world_size:] = done
    flags = all_reduce(ctx, flags, "sum")
    failed = [int(r) for r in torch.nonzero(flags[:ctx.world_size]).flatten()]
    try:
        if error is not None:
            raise error
        if failed:
            raise engine.RankFailed(f"rank(s) {', '.join(map(str, failed))} of {ctx.world_size} failed before "
                                    f"starting (see their messages); nothing was computed")
        done = flags[ctx.world_size:].bool().tolist()
        o, sub_batch = plan.options, plan.sub_batch
        todo = [i for i in range(n_models) if not done[i]]

        def reduce(t):
            return all_reduce(ctx, t, "sum")

        for count, ji in enumerate(todo, start=1):
            job = jobs[ji]
            share = dataset_share(len(job.batches), ctx.rank, ctx.world_size)

            def make(idx, _job=job, _share=share):
                return SharedDataOperator(_job.model, select(_job.batches, idx), _share, reduce,
                                          rank=ctx.rank, world_size=ctx.world_size, params=o.params,
                                          weight_decay=o.weight_decay, mc_seed=o.mc_seed,
                                          form=o.form, precision=o.precision, sub_batch=sub_batch)

            error = None
            try:
                res = _solve(job, o, sub_batch, make_operator=make, label=job.label)
                if ctx.is_main:
                    write_row(part, job.label, 0, res)
            except Exception as exc:
                error = exc
            engine.vote(ctx, error, f"while computing {job.label} (see their messages); finished models are kept in "
                                    f"{store.partial_path(output)}: rerun the same command to resume")
            if ctx.is_main:
                report(progress, count, len(todo), f"{job.label}: top {res.eigenvalues[0][0]:.5g}")
                if on_row is not None:
                    on_row(ji, 0)
        error = None
        if ctx.is_main:
            try:
                part.finalize()
            except Exception as exc:
                error = exc
        engine.vote(ctx, error, f"writing {output} (see rank 0's message)")
    finally:
        if part is not None:
            part.close()


def merge_units(results) -> dict[str, dict]:
    """The model groups of a hessian result assembled from its shards (the engine's merge): every
    row (and its trace / density / vectors entries) from the shard that computed it."""
    from . import engine
    return {label: engine.merge_done(results, label, "done") for label in results[0].models}
