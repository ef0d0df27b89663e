"""landscape_tools.hessian against dense float64 Hessians (torch.func) of tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacfwd, jacrev

from landscape_tools import _lanczos
from landscape_tools import seeds
from landscape_tools._hvp import HessianOperator
from landscape_tools.errors import ConfigError, NumericalError
from landscape_tools.hessian import top_eigenvalues
from landscape_tools.models import MCDropout, make_blur, mc_dropout


class Tiny(nn.Module):
    """conv -> BN (eval, non-trivial running stats) -> tanh -> 2x2 blur -> [MC dropout] -> linear: 123 params."""

    def __init__(self, mc: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.blur = make_blur(2)
        self.drop = MCDropout(0.3) if mc else nn.Identity()
        self.fc = nn.Linear(2 * 4 * 4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)
            self.fc.weight.mul_(3.0)

    def forward(self, x):
        x = self.blur(torch.tanh(self.bn(self.conv(x))))
        return self.fc(self.drop(x).flatten(1))


def make(mc=False, seed=0):
    torch.manual_seed(100 + seed)
    model = Tiny(mc, seed).double()
    x = torch.randn(15, 1, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (15,))
    batches = [(x[:6], y[:6]), (x[6:11], y[6:11]), (x[11:], y[11:])]   # uneven sizes 6, 5, 4
    return model, batches


def dense_hessian(model, batches, indices, mc_seed=0, names=None):
    """d^2/dw^2 of sum_b n_b/N CE_b over a flat parameter vector, by torch.func (jacfwd of jacrev)."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    fixed.update(dict(model.named_buffers()))
    total = sum(int(batches[i][0].shape[0]) for i in indices)
    stochastic = any(isinstance(m, MCDropout) for m in model.modules())

    def loss(flat):
        state = dict(fixed)
        for (n, _), part, s in zip(named, torch.split(flat, sizes), shapes):
            state[n] = part.view(s)
        out = 0.0
        for i in indices:
            x, y = batches[i]
            if stochastic:
                with mc_dropout(model, True, seed=seeds.derive_seed(mc_seed, seeds.HESSIAN_BATCH_MASKS, i)):
                    logits = functional_call(model, state, (x,))
            else:
                logits = functional_call(model, state, (x,))
            out = out + F.cross_entropy(logits, y) * (x.shape[0] / total)
        return out

    w = torch.cat([p.detach().reshape(-1) for _, p in named])
    # torch.func.hessian is jacfwd(jacrev); randomness="same" lets the seeded (identical) dropout mask through vmap
    return jacfwd(jacrev(loss), randomness="same")(w).numpy()


def reference(H, k, which):
    ev = np.linalg.eigvalsh(H)
    return ev[_lanczos.order(ev, which)][:k]


def rel(a, b):
    return np.max(np.abs(np.asarray(a) - b) / np.abs(b))


@pytest.fixture(scope="module")
def cases():
    out = {}
    for mc in (False, True):
        model, batches = make(mc)
        out[mc] = (model, batches, [dense_hessian(model, batches, [i]) for i in range(3)])
    return out


# ----------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("mc", [False, True], ids=["det", "mcdropout"])
@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_lanczos_matches_dense_per_batch(cases, mc, which):
    model, batches, dense = cases[mc]
    res = top_eigenvalues(model, batches, k=4, which=which, tol=1e-9, seed=3)
    assert res.eigenvalues.shape == (3, 4) and res.converged.all()
    for i in range(3):
        assert rel(res.eigenvalues[i], reference(dense[i], 4, which)) < 1e-6
    assert (res.hvp_count > 0).all() and (res.certificates <= 1e-9).all()
    for i in range(3):   # each certificate bounds the value's distance to the dense spectrum
        ev = np.linalg.eigvalsh(dense[i])
        err = np.min(np.abs(ev[None, :] - res.eigenvalues[i][:, None]), axis=1) / np.abs(res.eigenvalues[i])
        assert np.all(err <= res.certificates[i] + 1e-12), (err, res.certificates[i])
    assert list(res.batch_sizes) == [6, 5, 4]


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_power_matches_dense(cases, which):
    model, batches, dense = cases[True]
    res = top_eigenvalues(model, batches[:1], k=3, which=which, method="power", tol=1e-5, max_iter=5000, seed=1)
    assert res.converged.all(), res.residuals  # eigenvalue error ~ (tol |lambda|)^2 / gap: far below 1e-6
    assert rel(res.eigenvalues[0], reference(dense[0], 3, which)) < 1e-6


def test_thick_restart_with_small_basis(cases):
    model, batches, dense = cases[False]
    res = top_eigenvalues(model, batches[1:2], k=5, which="LM", tol=1e-9, ncv=8, seed=2)
    assert res.converged.all()
    assert rel(res.eigenvalues[0], reference(dense[1], 5, "LM")) < 1e-6
    assert res.hvp_count[0] > 8  # restarted at least once


def test_reported_residuals_are_true_residuals(cases):
    model, batches, dense = cases[True]
    ev = np.linalg.eigvalsh(dense[0])
    for method in ("lanczos", "power"):
        res = top_eigenvalues(model, batches[:1], k=3, tol=1e-5, method=method, return_vectors=True, max_iter=5000)
        V = res.eigenvectors[0].numpy()
        for lam, v, r, c in zip(res.eigenvalues[0], V, res.residuals[0], res.certificates[0]):
            true = np.linalg.norm(dense[0] @ v - lam * v) / abs(lam)
            assert abs(true - r) <= 1e-3 * r + 1e-12
            # --tol is the certified eigenvalue accuracy: power reaches it through the residual itself,
            # lanczos through the gap bound (its residual may be far larger than tol)
            assert c <= 1e-5 and np.min(np.abs(ev - lam)) / abs(lam) <= c + 1e-12
            if method == "power":
                assert true <= 1e-5 * 1.01


def spectrum_operator(values, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(values), len(values))))
    A = torch.from_numpy((Q * np.asarray(values)) @ Q.T)
    return lambda v: A @ v.to(A.dtype)


@pytest.mark.parametrize("solver", [_lanczos.thick_restart_lanczos, _lanczos.deflated_power])
def test_negative_eigenvalue_of_largest_magnitude_comes_first(solver):
    values = np.concatenate([[-5.0, 3.0, -2.0, 1.5], np.linspace(-0.5, 0.8, 36)])
    kw = {"max_iter": 5000} if solver is _lanczos.deflated_power else {}
    pairs = solver(spectrum_operator(values), 40, 3, which="LM", tol=1e-7, **kw)
    np.testing.assert_allclose(pairs.values, [-5.0, 3.0, -2.0], rtol=1e-8)
    assert pairs.converged.all()


def test_model_with_negative_top_eigenvalue():
    """A real model whose largest-magnitude Hessian eigenvalue is negative: every label is the least
    likely class, so the indefinite second-order term of the network dominates."""
    model, batches = make(False, 4)
    x = batches[0][0]
    with torch.no_grad():
        y = model.eval()(x).argmin(1)
    H = dense_hessian(model, [(x, y)], [0])
    ref = reference(H, 3, "LM")
    assert ref[0] < 0 and abs(ref[0]) > 1.05 * abs(ref[1])
    for method in ("lanczos", "power"):
        res = top_eigenvalues(model, [(x, y)], k=3, method=method, tol=1e-10 if method == "lanczos" else 1e-5,
                              max_iter=5000)
        assert res.eigenvalues[0, 0] < 0 and res.converged.all()
        assert rel(res.eigenvalues[0], ref) < 1e-6


# ----------------------------------------------------------------------------- operator variants
def test_dataset_scope_equals_dense_mean_loss(cases):
    model, batches, _ = cases[True]
    H = dense_hessian(model, batches, [0, 1, 2])
    for method in ("lanczos", "power"):
        res = top_eigenvalues(model, batches, k=3, scope="dataset", tol=1e-9 if method == "lanczos" else 1e-5,
                              method=method, max_iter=5000)
        assert res.eigenvalues.shape == (1, 3)
        assert rel(res.eigenvalues[0], reference(H, 3, "LM")) < 1e-6


def test_params_glob_gives_the_dense_sub_block(cases):
    model, batches, dense = cases[False]
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)
                          if n.startswith(("conv.", "bn."))])
    block = dense[2][np.ix_(idx, idx)]
    res = top_eigenvalues(model, batches[2:], k=3, which="LA", params="conv.*,bn.*", tol=1e-10)
    assert res.num_params == len(idx) == 24
    assert rel(res.eigenvalues[0], reference(block, 3, "LA")) < 1e-6


def test_weight_decay_shifts_every_eigenvalue(cases):
    model, batches, dense = cases[False]
    wd = 0.37
    res = top_eigenvalues(model, batches[:1], k=4, which="SA", weight_decay=wd, tol=1e-10)
    shifted = dense[0] + wd * np.eye(dense[0].shape[0])
    assert rel(res.eigenvalues[0], reference(shifted, 4, "SA")) < 1e-6
    np.testing.assert_allclose(res.eigenvalues[0] - wd, reference(dense[0], 4, "SA"), rtol=1e-6, atol=1e-9)


def test_hvp_forms_agree_with_dense(cases):
    model, batches, _ = cases[True]
    H = dense_hessian(model, batches, [0, 1])
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for form in ("graph", "double", "func"):
        with HessianOperator(model, batches[:2], batch_indices=[0, 1], form=form) as op:
            np.testing.assert_allclose(op(v).numpy(), H @ v.numpy(), rtol=1e-9, atol=1e-11)


def test_model_mode_restored_and_eval_used(cases):
    model, batches, dense = cases[False]
    model.train()
    stats = model.bn.running_mean.clone()
    res = top_eigenvalues(model, batches[:1], k=2, tol=1e-9)
    assert model.training and torch.equal(stats, model.bn.running_mean)
    assert rel(res.eigenvalues[0], reference(dense[0], 2, "LM")) < 1e-6  # BN running stats, not batch stats
    model.eval()


# ----------------------------------------------------------------------------- trace and density
def test_trace_estimators_within_statistical_tolerance(cases):
    model, batches, dense = cases[False]
    H = dense[0]
    exact = np.trace(H)
    probes = 60
    res = top_eigenvalues(model, batches[:1], k=1, trace=True, trace_probes=probes, seed=11)
    t = {k: v[0] for k, v in res.trace.items()}
    # Rademacher Hutchinson variance per probe: 2 (||H||_F^2 - sum diag^2)
    sd = np.sqrt(2 * (np.sum(H ** 2) - np.sum(np.diag(H) ** 2)) / probes)
    assert abs(t["estimate"] - exact) < 4 * sd
    assert 0.5 * sd < t["stderr"] < 2 * sd
    assert abs(t["hutchpp"] - exact) < 4 * t["hutchpp_stderr"] + 1e-9
    np.testing.assert_allclose(t["samples"].mean(), t["estimate"])
    # a sketch that spans the whole space makes Hutch++ exact
    op = lambda v: torch.from_numpy(H) @ v  # noqa: E731
    full = _lanczos.hutchpp(op, H.shape[0], 3 * H.shape[0] + 6, seed=1)
    assert abs(full["estimate"] - exact) < 1e-8 * np.abs(H).sum()


def test_slq_nodes_are_eigenvalues_and_moments_match(cases):
    model, batches, dense = cases[False]
    H = dense[1]
    ev = np.linalg.eigvalsh(H)
    n = H.shape[0]
    res = top_eigenvalues(model, batches[1:2], k=1, density=True, density_runs=3, density_steps=n, seed=4)
    nodes, weights = res.density["nodes"][0], res.density["weights"][0]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-10)
    ok = weights > 1e-8
    gap = np.min(np.abs(nodes[ok][:, None] - ev[None, :]), axis=1)
    assert np.all(gap < 1e-6 * np.abs(ev).max())
    # first moment of each run = v^T H v / ||v||^2, whose mean is tr(H)/n
    op = lambda v: torch.from_numpy(H) @ v  # noqa: E731
    many_n, many_w = _lanczos.slq(op, n, runs=40, steps=12, seed=9)
    first = np.nansum(many_n * many_w, axis=1)
    assert abs(first.mean() - np.trace(H) / n) < 4 * first.std(ddof=1) / np.sqrt(40)
    grid, dens = res.density["grid"][0], res.density["density"][0]
    assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-3


# ----------------------------------------------------------------------------- failures
class Noisy(Tiny):
    def forward(self, x):
        return super().forward(x) + 0.1 * torch.randn(x.shape[0], 3, dtype=x.dtype)


@pytest.mark.parametrize("form", ["graph", "double"])
def test_determinism_check_fires(form):
    model = Noisy().double()
    x, y = torch.randn(5, 1, 3, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(NumericalError, match=r"is not a fixed matrix: two products with the same vector differ by"):
        top_eigenvalues(model, [(x, y)], k=2, form=form)
    v = torch.ones(123, dtype=torch.float64) / 123 ** 0.5
    with HessianOperator(Tiny(mc=True).double(), [(x, y)], form=form) as op:  # the seeded mask passes
        diff, hv = op.checked_matvec(v)
        assert diff < 1e-12 and op.count == 1  # one of the two products is the solver's
        torch.testing.assert_close(hv, op(v), rtol=1e-12, atol=1e-14)


class NoisyLate(Tiny):
    """Fresh noise only in the samples after the 16th of whatever it is given (nothing in the first 16)."""

    def forward(self, x):
        out = super().forward(x)
        noise = torch.zeros_like(out)
        noise[16:] = 0.1 * torch.randn(max(x.shape[0] - 16, 0), 3, dtype=x.dtype)
        return out + noise


class NoisyMarked(Tiny):
    """Fresh noise only in the samples whose first pixel is exactly 1 (the second batch below)."""

    def forward(self, x):
        marked = (x[:, 0, 0, 0] == 1.0).to(x.dtype)[:, None]
        return super().forward(x) + 0.1 * marked * torch.randn(x.shape[0], 3, dtype=x.dtype)


@pytest.mark.parametrize("form", ["graph", "double", "func"])
def test_determinism_check_sees_every_sample_of_the_solved_operator(form):
    """The check applies the operator that is solved (its pieces, its masks, all its samples)."""
    x, y = torch.randn(24, 1, 3, 3, dtype=torch.float64), torch.randint(0, 3, (24,))
    with pytest.raises(NumericalError, match=r"is not a fixed matrix"):   # noise in samples 17..24 only
        top_eigenvalues(NoisyLate().double(), [(x, y)], k=1, form=form, sub_batch=None)
    # the same model is deterministic on the first 16 samples: nothing to report there
    res = top_eigenvalues(NoisyLate().double(), [(x[:16], y[:16])], k=1, form=form, sub_batch=None)
    assert res.converged.all()


@pytest.mark.parametrize("sub_batch", [None, 3])
def test_determinism_check_sees_the_second_batch_in_dataset_scope(sub_batch):
    x, y = torch.randn(12, 1, 3, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    x[:, 0, 0, 0] = 0.0
    x[6:, 0, 0, 0] = 1.0           # the second batch alone is marked
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    with pytest.raises(NumericalError, match=r"\(batch 0, 1\) is not a fixed matrix"):
        top_eigenvalues(NoisyMarked().double(), batches, k=1, scope="dataset", sub_batch=sub_batch)
    # per batch, the first Hessian passes and the second is caught
    rows = []
    with pytest.raises(NumericalError, match=r"\(batch 1\) is not a fixed matrix"):
        top_eigenvalues(NoisyMarked().double(), batches, k=1, sub_batch=sub_batch, on_row=lambda r, _: rows.append(r))
    assert rows == [0]


@pytest.mark.parametrize("form", ["graph", "double"])
def test_determinism_check_costs_one_extra_product_per_hessian(form, monkeypatch):
    model, batches = make(mc=True)
    calls = []
    original = HessianOperator.matvec

    def counting(self, v, form=None):
        calls.append(1)
        return original(self, v, form)

    monkeypatch.setattr(HessianOperator, "matvec", counting)
    monkeypatch.setattr(HessianOperator, "__call__", counting)
    res = top_eigenvalues(model, batches, k=2, form=form, sub_batch=2)
    # each row: the solver's products (start included) plus exactly one for the check
    assert len(calls) == int(res.hvp_count.sum()) + len(batches)


def test_bad_input_errors(cases):
    model, batches, _ = cases[False]
    with pytest.raises(ConfigError, match=r"^--top-k 124 is larger than the number of parameters in the Hessian "
                                          r"\(123\); ask for at most 123 eigenvalues, or widen --params$"):
        top_eigenvalues(model, batches, k=124)
    with pytest.raises(ConfigError, match=r"^--which 'XX' is not one of LM, LA, SA"):
        top_eigenvalues(model, batches, which="XX")
    with pytest.raises(ConfigError, match=r"^--params 'nothing\.\*' matches no trainable parameter"):
        top_eigenvalues(model, batches, params="nothing.*")
    with pytest.raises(ConfigError, match=r"--method 'arnoldi'"):
        top_eigenvalues(model, batches, method="arnoldi")
    bad = Tiny().double()
    with torch.no_grad():
        bad.fc.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"the loss of batch 0 is nan"):
        top_eigenvalues(bad, batches[:1], k=1)


def test_skip_and_on_row(cases):
    model, batches, _ = cases[False]
    seen = []
    full = top_eigenvalues(model, batches, k=2, seed=7)
    part = top_eigenvalues(model, batches, k=2, seed=7, skip=[1], on_row=lambda r, res: seen.append(r))
    assert seen == [0, 2] and np.isnan(part.eigenvalues[1]).all()
    np.testing.assert_array_equal(part.eigenvalues[[0, 2]], full.eigenvalues[[0, 2]])


def test_shared_operator_check_goes_through_the_sum():
    from landscape_tools import hessian as H
    model, batches = make()
    sent = []

    def other_rank_adds_the_same(t):   # this is rank 0 of 2; rank 1 holds the same batches
        sent.append(t.clone())
        return t * 2

    with H.SharedDataOperator(model, batches, [0, 2], other_rank_adds_the_same, rank=0, world_size=2) as op:
        v = torch.ones(op.dim, dtype=torch.float64) / op.dim ** 0.5
        diff, hv = op.checked_matvec(v)
        # both products are sums over the processes, so every process sees the same difference
        assert diff < 1e-12 and len(sent) == 2 and torch.equal(sent[0], sent[1])
        torch.testing.assert_close(hv, sent[0][:op.dim] * 2)
    # noise in one process's batch makes the *summed* products differ: every process raises together
    x, y = torch.randn(8, 1, 3, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    with H.SharedDataOperator(Noisy().double(), [(x, y)], [0], lambda t: t * 2, rank=1, world_size=2) as op:
        with pytest.raises(NumericalError, match="is not a fixed matrix"):
            op.checked_matvec(torch.ones(op.dim, dtype=torch.float64) / op.dim ** 0.5)


# ----------------------------------------------------------------------------- start vector, basis storage
def test_free_gradient_is_the_dense_gradient_of_the_weighted_loss(cases):
    model, batches, _ = cases[False]
    with HessianOperator(model, batches, form="graph") as op:
        g = op.free_gradient()
        w = op.parameter_vector().clone().requires_grad_(True)
        named = [(n, p) for n, p in model.named_parameters()]
        state = dict(model.named_buffers())
        parts = torch.split(w, [p.numel() for _, p in named])
        state.update({n: t.view(p.shape) for (n, p), t in zip(named, parts)})
        total = sum(F.cross_entropy(functional_call(model, state, (x,)), y) * (len(y) / 15) for x, y in batches)
        (dense,) = torch.autograd.grad(total, w)
        torch.testing.assert_close(g, dense, rtol=1e-12, atol=1e-14)
    for form in ("double", "func"):       # one forward and backward pass there, the same gradient
        with HessianOperator(model, batches, form=form) as op:
            torch.testing.assert_close(op.free_gradient(), dense, rtol=1e-12, atol=1e-14)


def test_checked_start_mixes_gradient_and_random_and_counts_one_product(cases):
    from landscape_tools.hessian import _checked_start
    model, batches, dense = cases[True]
    with HessianOperator(model, batches[:1], form="graph") as op:
        v, hv = _checked_start(op, op.dim, "SA", 1)   # SA: the seeded random start
        torch.testing.assert_close(v, _lanczos._random_unit(op.dim, 1, "cpu"))
        v, hv = _checked_start(op, op.dim, "LM", 1)
        g = op.free_gradient()
        assert abs(float(torch.linalg.vector_norm(v)) - 1) < 1e-12 and op.count == 2
        np.testing.assert_allclose(hv.numpy(), dense[0] @ v.numpy(), rtol=1e-9, atol=1e-12)
        cos = float(v @ g) / float(torch.linalg.vector_norm(g))
        assert 0.5 < cos < 0.9  # half gradient, half random (nearly orthogonal to it)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_float32_basis_storage_keeps_float64_accuracy_at_moderate_tolerances(which):
    values = np.concatenate([[-5.0, 3.0, -2.0, 1.5], np.linspace(-0.5, 0.8, 196)])
    op = spectrum_operator(values, seed=4)
    ref = _lanczos.thick_restart_lanczos(op, 200, 4, which=which, tol=1e-10, seed=1)
    low = _lanczos.thick_restart_lanczos(op, 200, 4, which=which, tol=1e-5, seed=1, ncv=10, basis_dtype=torch.float32,
                                         return_vectors=True)
    assert low.converged.all() and low.hvps > 10  # restarted with the float32 basis
    np.testing.assert_allclose(low.values, ref.values, rtol=1e-7)
    A = op(torch.eye(200, dtype=torch.float64))
    for lam, v, r, c in zip(low.values, low.vectors, low.residuals, low.certificates):
        # the reported residuals are the true ones (to the float32 basis's rounding, ~6e-8 |A| / |lam|),
        # and the certificates (whose rounding floor covers that) bound the true errors
        true = float(torch.linalg.vector_norm(A @ v - lam * v)) / abs(lam)
        assert abs(true - r) <= 1e-3 * r + 1e-6
        assert c <= 1e-5 and np.min(np.abs(values - lam)) / abs(lam) <= c


def test_basis_dtype_choice():
    from landscape_tools.hessian import _basis_dtype

    class Op:
        def __init__(self, dtype):
            self.dtype = dtype
    assert _basis_dtype(Op(torch.float32), 1e-4) == torch.float32
    assert _basis_dtype(Op(torch.float32), 1e-8) == torch.float64   # tight tolerance: full storage
    assert _basis_dtype(Op(torch.float64), 1e-4) == torch.float64   # float64 models keep float64
    assert _basis_dtype(object(), 1e-4) == torch.float64


def test_float32_model_matches_dense_float64_hessian():
    model, batches = make(False, 5)
    dense = dense_hessian(model, batches, [0])
    model32 = model.float()
    res = top_eigenvalues(model32, [(batches[0][0].float(), batches[0][1])], k=3, tol=1e-4, seed=1)
    assert res.converged.all()
    # the float32 products themselves carry ~1e-6 relative rounding
    assert rel(res.eigenvalues[0], reference(dense, 3, "LM")) < 1e-4


# ----------------------------------------------------------------------------- sub-batches
@pytest.mark.parametrize("mc", [False, True], ids=["det", "mcdropout"])
@pytest.mark.parametrize("form", ["graph", "double", "func"])
def test_sub_batches_give_the_dense_matrix_of_the_whole_batches(cases, mc, form):
    """Batches of 6 and 5 samples in pieces of 2 (the last piece of one sample) or 4: every product
    equals the dense Hessian of the whole batches' weighted mean loss, MC-dropout masks included (the
    pieces take the matching rows of each whole batch's mask)."""
    model, batches, _ = cases[mc]
    H = dense_hessian(model, batches, [0, 1])
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for sub_batch in (2, 4):
        with HessianOperator(model, batches[:2], batch_indices=[0, 1], form=form, sub_batch=sub_batch) as op:
            assert op.pieces == ([[(0, 2), (2, 4), (4, 6)], [(0, 2), (2, 4), (4, 5)]] if sub_batch == 2 else
                                 [[(0, 4), (4, 6)], [(0, 4), (4, 5)]])
            np.testing.assert_allclose(op(v).numpy(), H @ v.numpy(), rtol=1e-9, atol=1e-11)
            if form == "graph":
                with HessianOperator(model, batches[:2], batch_indices=[0, 1], form="graph", sub_batch=None) as whole:
                    assert whole.pieces == [[(0, 6)], [(0, 5)]]
                    torch.testing.assert_close(op.free_gradient(), whole.free_gradient(), rtol=1e-12, atol=1e-14)


def test_sub_batched_eigenvalues_match_dense(cases):
    model, batches, dense = cases[True]
    res = top_eigenvalues(model, batches, k=3, which="LM", tol=1e-9, seed=2, sub_batch=2)
    assert res.converged.all() and res.config["sub_batch"] == 2
    for i in range(3):
        assert rel(res.eigenvalues[i], reference(dense[i], 3, "LM")) < 1e-6


def test_sub_batch_resolution():
    from landscape_tools._hvp import CPU_SUB_BATCH, resolve_sub_batch
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_sub_batch("auto", cpu) == CPU_SUB_BATCH == 32 and resolve_sub_batch("auto", gpu) is None
    assert resolve_sub_batch(None, cpu) is None and resolve_sub_batch(7, gpu) == 7
    for bad, message in ((0, "sub-batch 0 must be a positive number of samples"),
                         ("half", "sub-batch 'half' is neither 'auto' nor a number of samples")):
        with pytest.raises(ConfigError, match=message):
            resolve_sub_batch(bad, cpu)


def test_basis_rows_are_allocated_as_they_are_used(monkeypatch):
    B = _lanczos._Basis(20, 5, torch.float64, "cpu")
    for i in range(17):
        B[i] = torch.full((5,), float(i), dtype=torch.float64)
    assert [b.shape[0] for b in B.blocks] == [8, 8, 4] and [b.shape[0] for b in B.head(10)] == [8, 2]
    torch.testing.assert_close(B.columns(17, 1, 3), torch.arange(17.0, dtype=torch.float64)[:, None].repeat(1, 2))
    B.set_columns(10, 2, 5, torch.zeros(10, 3, dtype=torch.float64))
    assert float(B[9][2:].abs().sum()) == 0.0 and float(B[9][:2].sum()) == 18.0 and float(B[10][2]) == 10.0
    with pytest.raises(IndexError):
        B[20] = torch.zeros(5, dtype=torch.float64)
    # a solve that converges early holds only the rows it used; one that restarts fills the basis
    made = []

    class Recorded(_lanczos._Basis):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(_lanczos, "_Basis", Recorded)
    values = np.concatenate([[10.0, -1.0], np.linspace(-0.5, 0.5, 198)])
    op = spectrum_operator(values, seed=3)
    fast = _lanczos.thick_restart_lanczos(op, 200, 1, tol=1e-4, seed=1, ncv=30)
    assert fast.converged.all() and fast.hvps <= 8 and sum(b.shape[0] for b in made[-1].blocks) == 8
    slow = _lanczos.thick_restart_lanczos(op, 200, 2, tol=1e-10, seed=1, ncv=13, return_vectors=True)
    assert slow.converged.all() and slow.hvps > 13 and [b.shape[0] for b in made[-1].blocks] == [8, 5]
    np.testing.assert_allclose(slow.values, [10.0, -1.0], rtol=1e-10)
    A = op(torch.eye(200, dtype=torch.float64))
    for lam, v, r in zip(slow.values, slow.vectors, slow.residuals):   # reported residuals are true ones
        true = float(torch.linalg.vector_norm(A @ v - lam * v)) / abs(lam)
        assert abs(true - r) <= 1e-3 * r + 1e-14
    assert np.all(np.abs(slow.values - [10.0, -1.0]) / np.abs(slow.values) <= slow.certificates)
