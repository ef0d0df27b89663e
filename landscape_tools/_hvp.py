"""Hessian-vector products of a model's mean cross-entropy loss (private machinery of ``hessian``).

:class:`HessianOperator` is the symmetric matrix ``H = d^2 L / dw^2`` of

    L(w) = sum_b (n_b / N) * CE_b(w)  [+ wd/2 * ||w||^2]

over one or more batches ``b`` (``n_b`` samples each, ``N`` in total), restricted to a chosen set of
parameters, with the model in eval mode (BatchNorm on running statistics).  Models that draw dropout
masks in eval mode (MC dropout) get one fixed, seeded mask per batch, so the operator is a
deterministic matrix.  Vectors come in and go out as flat float64 tensors on the model's device; the
products themselves run in the parameters' dtype.

Three ways to form a product (same matrix, different cost):
  ``graph``   keep the first-order graph of each batch and differentiate it again for every product
              (one extra backward per product; fastest on CPU, memory of one retained graph per batch);
  ``double``  fresh forward + double backward per product (nothing retained between products);
  ``func``    ``torch.func`` forward-over-reverse (``jvp`` of ``grad``; least memory on GPU).

Each batch may be processed in sub-batches of ``sub_batch`` samples (the loss of a piece is its
summed loss over the batch size, so the pieces add up to the batch's mean loss; dropout masks are
the matching rows of the whole batch's mask).  The matrix is the same; what changes is memory: the
retained graphs of the pieces together hold what one graph of the whole batch holds, but the
transient buffers of a product's second backward pass are those of one piece.  On a CPU, pieces
of 32 samples cut the peak by about a quarter at no cost in time (measured on a CIFAR ResNet-20,
batch 128: 440 instead of 600 MiB, 1.00 instead of 1.04 s per product), which is the default there;
on a GPU the whole batch runs at once (smaller pieces would leave it idle).

A product (or the gradient, or the retained graph) that runs out of device memory is formed again
in pieces of half the samples, down to 1 sample; the smaller size is kept for the rest of the
operator's life (``sub_batch``), said once on stderr (or through ``notice``), and the matrix is the
same (the pieces' losses add up to the batch's, with the whole batch's dropout masks).  Out of
memory with 1-sample pieces is raised as is (the CLI turns it into its one ``Error:`` line).

Every product (and the graph it differentiates) runs with TF32 off unless the operator's precision
is ``tf32`` (:func:`landscape_tools.precision.fp32_math`), and on CUDA with cuDNN's deterministic
algorithms and no autotuning (``torch.backends.cudnn.deterministic`` / ``benchmark``), restored
afterwards: the operator must be a fixed matrix, and the determinism check of
:meth:`HessianOperator.checked_matvec` compares two products at the precision the forward pass
really ran in (a bf16 autocast forward is compared at bf16's rounding).  An fp16 forward pass is
refused: without loss scaling its second derivatives underflow.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import precision as P
from . import seeds
from .device import is_out_of_memory, memory_notice
from .errors import ConfigError, NumericalError
from .seeds import derive_seed
from .streaming import as_sequence, batch_sizes

FORMS = ("graph", "double", "func")
#: samples per piece of a batch on a CPU (see the module docstring)
CPU_SUB_BATCH = 32


def default_sub_batch(device: torch.device) -> int | None:
    """Samples per piece when ``sub_batch="auto"``: :data:`CPU_SUB_BATCH` on a CPU, the whole batch
    (``None``) on a GPU."""
    return None if device.type == "cuda" else CPU_SUB_BATCH


def resolve_sub_batch(sub_batch, device: torch.device) -> int | None:
    """``"auto"`` / ``None`` / a positive int -> samples per piece (``None``: whole batches)."""
    if sub_batch is None:
        return None
    if isinstance(sub_batch, str):
        if sub_batch == "auto":
            return default_sub_batch(device)
        raise ConfigError(f"sub-batch {sub_batch!r} is neither 'auto' nor a number of samples")
    if int(sub_batch) < 1:
        raise ConfigError(f"sub-batch {sub_batch} must be a positive number of samples (or 'auto')")
    return int(sub_batch)


def default_form(device: torch.device, n_batches: int) -> str:
    """The measured-fastest form: retained graph on CPU for one batch, forward-over-reverse on GPU.

    A retained graph per batch costs the memory of every batch's activations at once, so operators
    over several batches (``scope=dataset``) recompute instead.
    """
    if device.type == "cuda":
        return "func"
    return "graph" if n_batches == 1 else "double"


def select_parameters(model: nn.Module, params: str | Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose names match a glob (or any of several, comma separated).

    Raises:
        ConfigError: no parameter matches.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters: nothing to take a Hessian of")
    if params is None:
        return named
    globs = [g.strip() for g in (params.split(",") if isinstance(params, str) else params) if g.strip()]
    chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not chosen:
        sample = ", ".join(n for n, _ in named[:6]) + (", ..." if len(named) > 6 else "")
        raise ConfigError(f"--params {params!r} matches no trainable parameter; names look like: {sample} "
                          f"(use globs such as 'layer1.*' or '*.conv1.weight')")
    return chosen


class HessianOperator:
    """The Hessian of the size-weighted mean loss over ``batches``, as a matrix-free operator.

    Args:
        model: any ``nn.Module`` returning logits; put in eval mode while the operator lives
            (restored by :meth:`close`).
        batches: list of ``(x, y)`` on the model's device.
        batch_indices: position of each batch in the whole data (seeds its dropout mask).
        params: glob(s) of the parameters spanning the Hessian (None: all trainable ones).
        weight_decay: adds ``wd/2 * ||w||^2`` to the loss, i.e. ``wd * v`` to every product.
        mc_seed: seed of the fixed dropout masks (used when the model samples dropout in eval mode):
            batch ``b`` draws those of ``mc_dropout(model, True, seed=derive_seed(mc_seed,
            seeds.HESSIAN_BATCH_MASKS, batch_indices[b]))``.
        form: ``graph``, ``double``, ``func`` or ``auto`` (see the module docstring).
        sub_batch: samples per piece of a batch, ``None`` for whole batches, or ``"auto"`` (by
            device; see the module docstring).  The matrix does not depend on it.
        precision: ``fp32`` (TF32 off), ``tf32`` or ``bf16`` (a forward pass the caller runs under
            :func:`landscape_tools.precision.autocast`, e.g. ``hessian.hessian_operator``); sets TF32
            in the products and the determinism check's tolerance.  A forward pass that enters a
            lower precision than this is noticed and compared at its own.
        notice: called with one line when an out-of-memory error makes the pieces smaller (default:
            a line on stderr).

    Raises:
        ConfigError: unknown form, no matching parameters, empty batches, fp16 (here or in a
            product's forward pass).
        NumericalError: the loss is not finite.
    """

    def __init__(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 batch_indices: Sequence[int] | None = None, params: str | Sequence[str] | None = None,
                 weight_decay: float = 0.0, mc_seed: int = 0, form: str = "auto", sub_batch: int | str | None = "auto",
                 precision: str = "fp32", notice=None):
        self.precision = P.parse_hessian_precision(precision)
        #: the precisions the forward passes of the products have entered (see :meth:`_note_precision`)
        self.seen_precisions: set[str] = set()
        if not batches:
            raise ConfigError("no batches to build a Hessian from")
        self.model = model
        self.batches = as_sequence(batches)     # streamed batches are read when a product needs them
        self.batch_indices = list(range(len(self.batches))) if batch_indices is None else list(batch_indices)
        self.named = select_parameters(model, params)
        self.params = [p for _, p in self.named]
        self.names = [n for n, _ in self.named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = int(sum(self.numels))
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.weight_decay = float(weight_decay)
        self.mc_seed = int(mc_seed)
        sizes = batch_sizes(self.batches)
        total = float(sum(sizes))
        self.batch_sizes = sizes
        self.weights = [s / total for s in sizes]
        if form == "auto":
            form = default_form(self.device, len(self.batches))
        if form not in FORMS:
            raise ConfigError(f"unknown HVP form {form!r}: expected one of {', '.join(FORMS)} or auto")
        self.form = form
        self.sub_batch = resolve_sub_batch(sub_batch, self.device)
        #: per batch, the (start, stop) sample ranges processed together
        self.pieces = [_pieces(n, self.sub_batch) for n in sizes]
        self.notice = notice
        #: the requested samples per piece (``sub_batch`` may shrink after out-of-memory errors)
        self.requested_sub_batch = self.sub_batch
        self._was_training = model.training
        model.eval()
        self.stochastic = _draws_dropout(model)
        self.count = 0
        self._grads: list[list[tuple[torch.Tensor, ...]]] | None = None  # per batch and piece, built on first use

    # ------------------------------------------------------------------ pieces
    def _mask_context(self, b: int, piece: tuple[int, int]):
        if not self.stochastic:
            return contextlib.nullcontext()
        from .models import mask_rows, mc_dropout
        stack = contextlib.ExitStack()
        seed = derive_seed(self.mc_seed, seeds.HESSIAN_BATCH_MASKS, self.batch_indices[b])
        stack.enter_context(mc_dropout(self.model, True, seed=seed))
        start, stop = piece
        stack.enter_context(mask_rows(start, stop - start, self.batch_sizes[b]))
        return stack

    def _loss(self, b: int, piece: tuple[int, int], model_call=None) -> torch.Tensor:
        """The piece's share of batch ``b``'s mean loss (its summed loss over the batch size)."""
        x, y = self.batches[b]
        start, stop = piece
        whole = stop - start == self.batch_sizes[b]
        if not whole:
            x, y = x[start:stop], y[start:stop]
        with self._mask_context(b, piece):
            logits = self.model(x) if model_call is None else model_call(x)
        if whole:
            loss = F.cross_entropy(logits, y)
        else:
            loss = F.cross_entropy(logits, y, reduction="sum") / self.batch_sizes[b]
        if not torch.isfinite(loss):
            raise NumericalError(f"the loss of batch {self.batch_indices[b]} is {float(loss.detach())}: the weights or inputs "
                                 f"hold NaN/inf values (check the checkpoint, e.g. with `lt evaluate`)")
        return loss

    def piece_size(self) -> int:
        """The largest number of samples processed together now."""
        return max(self.batch_sizes) if self.sub_batch is None else min(self.sub_batch, max(self.batch_sizes))

    def _shrink(self) -> None:
        """Halve the piece size (out of memory): new pieces, no retained graph, cached memory freed."""
        self.sub_batch = max(1, self.piece_size() // 2)
        self.pieces = [_pieces(n, self.sub_batch) for n in self.batch_sizes]
        self._grads = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fitting(self, work):
        """``work()``, formed again in pieces of half the samples while it runs out of memory (down to
        1 sample; then the error is raised).  Each piece's loss is its summed loss over the batch size
        and its dropout masks the matching rows of the whole batch's, so the result is the same up to
        rounding."""
        before = self.piece_size()
        while True:
            try:
                out = work()
                break
            except Exception as exc:      # noqa: BLE001 -- only out-of-memory errors are retried
                if not is_out_of_memory(exc) or self.piece_size() <= 1:
                    raise
            self._shrink()                # outside the except block: the failed attempt's tensors are freed
        if self.piece_size() < before:
            memory_notice(f"the Hessian-vector products ran out of memory with pieces of {before} samples; "
                          f"continuing with pieces of {self.piece_size()} (--sub-batch {self.piece_size()}: "
                          f"the same Hessian)", self.notice)
        return out

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Flat float64 vector -> list of tensors shaped (and typed) like the parameters."""
        v = v.to(device=self.device, dtype=self.dtype)
        return [c.view(s) for c, s in zip(torch.split(v, self.numels), self.shapes)]

    def flat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in parts]).to(torch.float64)

    def parameter_vector(self) -> torch.Tensor:
        return self.flat([p.detach() for p in self.params])

    def _build_graph(self) -> None:
        if self._grads is None:
            self._grads = [[torch.autograd.grad(self._loss(b, piece), self.params, create_graph=True)
                            for piece in self.pieces[b]] for b in range(len(self.batches))]

    def free_gradient(self) -> torch.Tensor:
        """The gradient of the loss (flat float64, weight decay excluded), the solvers' start vector
        (:func:`landscape_tools.hessian._checked_start`), the same in every form: in the ``graph`` form
        the first-order result every product differentiates again (free: the graph is built now if it
        was not yet); in the ``double`` and ``func`` forms one forward and backward pass per batch piece
        (about a third of a product), summed batch by batch."""
        total = None
        with self._arithmetic():
            for b, w in enumerate(self.weights):
                part = self._fitting(lambda b=b: self._gradient_batch(b))
                total = part * w if total is None else total.add_(part, alpha=w)
        return total

    def _gradient_batch(self, b: int) -> torch.Tensor:
        if self.form == "graph":
            self._build_graph()
            grads = self._grads[b]
        else:
            grads = [torch.autograd.grad(self._loss(b, piece), self.params) for piece in self.pieces[b]]
        return self.flat(_add_up([[g.detach() for g in piece] for piece in grads]))

    def _hvp_batch(self, b: int, vs: list[torch.Tensor], form: str) -> list[torch.Tensor]:
        if form == "graph":
            self._build_graph()
            return _add_up([torch.autograd.grad(grads, self.params, grad_outputs=vs, retain_graph=True)
                            for grads in self._grads[b]])
        parts = []
        for piece in self.pieces[b]:
            if form == "double":
                grads = torch.autograd.grad(self._loss(b, piece), self.params, create_graph=True)
                parts.append(torch.autograd.grad(grads, self.params, grad_outputs=vs))
                del grads
            else:
                parts.append(self._hvp_func(b, piece, vs))
        return _add_up(parts)

    def _hvp_func(self, b: int, piece: tuple[int, int], vs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from torch.func import functional_call, grad, jvp

        names = self.names
        fixed = {n: p.detach() for n, p in self.model.named_parameters() if n not in set(names)}
        fixed.update(dict(self.model.named_buffers()))

        def loss_of(primals):
            state = dict(fixed)
            state.update(zip(names, primals))
            return self._loss(b, piece, lambda x: functional_call(self.model, state, (x,)))

        primals = tuple(p.detach() for p in self.params)
        _, out = jvp(grad(loss_of), (primals,), (tuple(vs),))
        return out

    # ------------------------------------------------------------------ public
    def matvec(self, v: torch.Tensor, form: str | None = None) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (any float dtype); returns float64 on the model's device."""
        form = form or self.form
        vs = self.split(v)
        total = None
        with self._arithmetic():
            for b, w in enumerate(self.weights):
                part = self._fitting(lambda b=b: self.flat(self._hvp_batch(b, vs, form)))
                total = part * w if total is None else total.add_(part, alpha=w)
        if self.weight_decay:
            total.add_(v.to(total), alpha=self.weight_decay)
        self.count += 1
        return total

    __call__ = matvec

    def checked_matvec(self, v: torch.Tensor, label: str = "") -> tuple[float, torch.Tensor]:
        """``H v`` formed twice, the second time through a fresh forward pass, and compared: the
        determinism check of the operator that is solved (its form, its sub-batch pieces, its
        dropout masks, every batch it sums over), at the cost of one extra product.

        The ``graph`` form drops its retained graph after the first product and rebuilds it for the
        second (the rebuilt graph is the one kept for the solve), so the two graphs never coexist and
        the check adds nothing to the peak memory; the other forms run a fresh forward pass in every
        product anyway.  Whatever draws fresh random numbers or changes state in a forward pass, in
        any sample of any batch, makes the two products differ.

        Returns:
            ``(relative difference, H v)``; ``H v`` counts as one product of the operator.

        Raises:
            NumericalError: the two products differ beyond floating-point noise.
        """
        count = self.count
        a = self.matvec(v)
        if self.form == "graph":
            self._grads = None
        b = self.matvec(v)
        self.count = count + 1
        diff = float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-300))
        self._raise_if_different(diff, label)
        return diff, b

    # ------------------------------------------------------------------ arithmetic
    @contextlib.contextmanager
    def _arithmetic(self):
        """The settings every product runs under: TF32 per the precision, deterministic cuDNN without
        autotuning (an autotuned algorithm may differ between the two products of the determinism
        check), and the watch on the forward pass's precision; all restored afterwards."""
        cudnn = torch.backends.cudnn
        previous = (cudnn.deterministic, cudnn.benchmark)
        try:
            cudnn.deterministic, cudnn.benchmark = True, False
            self._note_outer_autocast()
            with P.fp32_math(self.precision), P.watch_precisions(self._note_precision):
                yield
        finally:
            cudnn.deterministic, cudnn.benchmark = previous

    def _note_precision(self, precision: str) -> None:
        """Called before each autocast block of a product's forward pass: refuse fp16, remember the rest."""
        P.parse_hessian_precision(precision)
        self.seen_precisions.add(precision)

    def _note_outer_autocast(self) -> None:
        """A caller's own ``torch.autocast`` around the products counts like one entered inside."""
        kind = self.device.type
        try:
            enabled = torch.is_autocast_enabled(kind)
        except (TypeError, RuntimeError):   # a device type autocast does not know
            return
        if enabled:
            dtype = torch.get_autocast_dtype(kind)
            name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
            if name is not None:
                self._note_precision(name)

    def rounding(self) -> float:
        """Relative rounding of one product: the lowest precision its forward passes ran in."""
        return max(P.rounding(p, self.dtype) for p in {self.precision, *self.seen_precisions})

    def tolerance(self) -> float:
        """The determinism check's limit on the relative difference of two products: 1e-10 for a
        float64 model, 1e-4 for float32, and 8 roundings of a lower precision (TF32: 8e-3, bf16:
        6e-2) when the products ran in one."""
        if self.dtype == torch.float64 and self.rounding() <= float(torch.finfo(torch.float64).eps):
            return 1e-10
        return max(1e-4, 8.0 * self.rounding())

    def _raise_if_different(self, diff: float, label: str) -> None:
        limit = self.tolerance()
        if not diff <= limit:
            where = f" of {label}" if label else ""
            batches = ", ".join(str(i) for i in self.batch_indices[:5]) + (", ..." if len(self.batch_indices) > 5 else "")
            ran = sorted({self.precision, *self.seen_precisions}, key=P.PRECISIONS.index)
            lowest = max(ran, key=lambda p: P.rounding(p, self.dtype))     # ties: the first, fp32 before tf32
            at = "" if lowest == "fp32" else f" at {lowest}"
            raise NumericalError(
                f"the Hessian{where} (batch {batches}) is not a fixed matrix: two products with the same vector "
                f"differ by {diff:.2e} (relative; at most {limit:.0e} is rounding{at}). Something in the forward "
                f"pass draws fresh random numbers or changes state in eval mode (a custom noise or dropout layer "
                f"that mc_dropout does not control, augmentation inside the model, BatchNorm kept in train mode by "
                f"an overridden eval()). Make the forward pass deterministic in eval mode (use nn.Dropout or the "
                f"zoo's MCDropout, whose masks --mc-seed fixes). On CUDA the products already run with "
                f"torch.backends.cudnn.deterministic=True and benchmark=False; for other nondeterministic kernels "
                f"in your own layers call torch.use_deterministic_algorithms(True, warn_only=True) and set "
                f"CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before the run (not the strict "
                f"use_deterministic_algorithms(True): AdaptiveAvgPool2d's backward and reflect padding have no "
                f"deterministic CUDA kernel and raise under it)")

    def close(self) -> None:
        """Free retained graphs and restore the model's train/eval mode."""
        self._grads = None
        self.model.train(self._was_training)

    def __enter__(self) -> "HessianOperator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pieces(n: int, sub_batch: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of ``sub_batch`` samples (the last one shorter) covering ``n``."""
    if sub_batch is None or sub_batch >= n:
        return [(0, n)]
    return [(s, min(s + sub_batch, n)) for s in range(0, n, sub_batch)]


def _add_up(parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Element-wise sum of several per-parameter tensor lists (the first one's tensors reused)."""
    total = list(parts[0])
    for more in parts[1:]:
        for i, t in enumerate(more):
            total[i] = total[i] + t
    return total


def _draws_dropout(model: nn.Module) -> bool:
    from .models import has_stochastic_dropout
    return has_stochastic_dropout(model)
