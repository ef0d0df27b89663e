"""``--method power`` (block power iteration with Rayleigh-Ritz and locking) against dense float64
spectra: tiny nets with negative curvature and +l / -l pairs of nearly equal magnitude (issue #12),
exact +-l pairs, and a property test over random symmetric matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jacfwd, jacrev

from landscape_tools import _lanczos, store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors
from landscape_tools.hessian import top_eigenvalues
from landscape_tools.models import build_model, make_blur


# ----------------------------------------------------------------------------- tiny nets
class ConvNet(nn.Module):
    """The net of issue #12: conv -> BN (eval, non-trivial running stats) -> ReLU -> 2x2 blur ->
    strided conv -> tanh -> global average pool -> linear; 163 parameters, weights scaled up so the
    spectrum is indefinite."""

    def __init__(self, seed: int, scale: float):
        super().__init__()
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.blur = make_blur(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            self.bn.running_var.uniform_(0.5, 2.0, generator=gen)
            self.bn.weight.uniform_(0.5, 1.5, generator=gen)
            self.bn.bias.uniform_(-0.2, 0.2, generator=gen)
            for m in (self.conv1, self.conv2, self.fc):
                m.weight.mul_(scale)

    def forward(self, x):
        x = self.blur(F.relu(self.bn(self.conv1(x))))
        return self.fc(torch.tanh(self.conv2(x)).mean((2, 3)))


class MLP(nn.Module):
    """linear -> tanh -> linear: 83 parameters."""

    def __init__(self, seed: int, scale: float):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        with torch.no_grad():
            self.fc1.weight.mul_(scale)
            self.fc2.weight.mul_(scale)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """d^2/dw^2 of the mean cross-entropy over a flat vector of every parameter (torch.func)."""
    model.eval()
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    fixed = dict(model.named_buffers())

    def loss(flat):
        state = dict(fixed)
        for (name, p), part in zip(named, torch.split(flat, sizes)):
            state[name] = part.view(p.shape)
        return F.cross_entropy(functional_call(model, state, (x,)), y)

    w = torch.cat([p.detach().reshape(-1) for _, p in named])
    return jacfwd(jacrev(loss))(w).numpy()


def reference(values: np.ndarray, k: int, which: str) -> np.ndarray:
    return values[_lanczos.order(values, which)][:k]


def net_case(kind: str, seed: int, scale: float, batches: int = 2):
    torch.manual_seed(100 + seed)
    if kind == "conv":
        model, shape = ConvNet(seed, scale).double(), (1, 7, 7)
    else:
        model, shape = MLP(seed, scale).double(), (6,)
    data = [(torch.randn(8, *shape, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(batches)]
    spectra = [np.linalg.eigvalsh(dense_hessian(model, x, y)) for x, y in data]
    return model, data, spectra


@pytest.fixture(scope="module")
def nets():
    # conv seed 0 x4: LM top-6 9.147, -3.627, 2.746, -2.502, 2.164, -2.159: a +-pair of ratio 0.998
    # straddling the 5th place (the pre-fix solver reported 4.68, unconverged, and missed 2.164);
    # conv seed 1 x6: -2.561, 2.481 on top (the pre-fix solver reported a spurious 1.93)
    return {"conv0": net_case("conv", 0, 4.0), "conv1": net_case("conv", 1, 6.0), "mlp": net_case("mlp", 2, 2.5)}


def test_the_issue_net_has_near_equal_plus_minus_pairs(nets):
    _, _, spectra = nets["conv0"]
    top = reference(spectra[0], 6, "LM")
    assert top.min() < 0 < top.max()
    assert top[4] * top[5] < 0 and abs(top[5]) / abs(top[4]) > 0.99
    top = reference(nets["conv1"][2][0], 2, "LM")
    assert top[0] * top[1] < 0 and abs(top[1]) / abs(top[0]) > 0.95


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
@pytest.mark.parametrize("net", ["conv0", "conv1", "mlp"])
def test_power_matches_dense_on_tiny_nets(nets, net, which):
    """Top-5 through ``top_eigenvalues(method="power")``, every batch: converged, and each value
    within the accuracy its residual implies (``|theta - l| <= r |theta|`` for a symmetric operator)."""
    model, data, spectra = nets[net]
    tol = 1e-6
    res = top_eigenvalues(model, data, k=5, which=which, method="power", tol=tol, seed=4)
    assert res.converged.all(), res.residuals
    assert (res.residuals <= tol).all()
    for row, ev in enumerate(spectra):
        theta, ref = res.eigenvalues[row], reference(ev, 5, which)
        assert np.all(np.abs(theta - ref) <= res.residuals[row] * np.abs(theta) + 1e-12), (theta, ref)
        assert ev[0] <= theta.min() and theta.max() <= ev[-1]
    assert (res.hvp_count > 0).all() and (res.hvp_count <= 5 * res.max_iter).all()


def test_power_vectors_and_residuals_are_true(nets):
    model, data, spectra = nets["conv0"]
    x, y = data[0]
    H = dense_hessian(model, x, y)
    res = top_eigenvalues(model, [(x, y)], k=5, which="LM", method="power", tol=1e-5, return_vectors=True)
    V = res.eigenvectors[0].numpy()
    np.testing.assert_allclose(V @ V.T, np.eye(5), atol=1e-12)
    for lam, v, r in zip(res.eigenvalues[0], V, res.residuals[0]):
        true = np.linalg.norm(H @ v - lam * v) / abs(lam)
        assert true <= 1e-5 * 1.01 and abs(true - r) <= 1e-3 * r + 1e-12


def test_cli_method_power_agrees_with_lanczos(tmp_path):
    """`lt hessian --method power` end to end on a tiny float32 zoo ResNet (11,265 parameters)."""
    from click.testing import CliRunner
    torch.manual_seed(0)
    model = build_model("resnet_dnn_18", width=2, num_classes=3, in_channels=1)
    save_checkpoint(tmp_path / "m.pt", model, "resnet_dnn_18", model.arch_kwargs, meta={})
    rng = np.random.default_rng(0)
    save_tensors(tmp_path / "d.npz", x=rng.standard_normal((8, 1, 12, 12)).astype(np.float32),
                 y=(np.arange(8) % 3).astype(np.int64))
    out = tmp_path / "h.h5"
    result = CliRunner().invoke(cli, ["hessian", str(tmp_path / "m.pt"), "--data", f"tensors:{tmp_path / 'd.npz'}",
                                      "--batch-size", "8", "--top-k", "2", "--method", "power", "--tol", "1e-4",
                                      "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    node = store.read_result(out).models["m"]
    assert node.attrs["method"] == "power" and node["converged"][:].all()
    x, y = torch.from_numpy(np.load(tmp_path / "d.npz")["x"]), torch.from_numpy(np.load(tmp_path / "d.npz")["y"])
    ref = top_eigenvalues(model, [(x, y)], k=2, tol=1e-8)
    # float32 products: agreement to what tol 1e-4 and float32 rounding allow
    np.testing.assert_allclose(node["eigenvalues"][0], ref.eigenvalues[0], rtol=1e-4)


# ----------------------------------------------------------------------------- operators
def spectrum_operator(values, seed: int = 0):
    """``Q diag(values) Q^T`` with a random orthogonal ``Q``, as ``(op, dense)``."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(values), len(values))))
    A = (Q * values) @ Q.T
    A = 0.5 * (A + A.T)
    At = torch.from_numpy(A)
    return (lambda v: At @ v.to(torch.float64)), A


def test_exact_plus_minus_pairs_converge_in_lm():
    values = np.concatenate([[5.0, -5.0, 3.0, -3.0001, 2.0, -2.0], np.linspace(-1.0, 1.0, 34)])
    op, _ = spectrum_operator(values, seed=3)
    for k, expect in [(1, [5.0]), (2, [5.0, -5.0]), (4, [5.0, -5.0, -3.0001, 3.0]),
                      (6, [5.0, -5.0, -3.0001, 3.0, 2.0, -2.0])]:
        pairs = _lanczos.deflated_power(op, len(values), k, which="LM", tol=1e-8, seed=k)
        assert pairs.converged.all(), (k, pairs)
        # +5 and -5 tie exactly: rounding decides which comes first (and which is the top-1)
        np.testing.assert_allclose(np.abs(pairs.values), np.abs(expect), rtol=1e-8)
        if k > 1:
            np.testing.assert_allclose(np.sort(pairs.values), np.sort(expect), rtol=1e-8)


def test_start_pair_is_the_first_product():
    values = np.concatenate([[4.0, -3.0, 2.5], np.linspace(-1.0, 1.0, 27)])
    op, A = spectrum_operator(values, seed=1)
    calls = []

    def counted(v):
        calls.append(1)
        return op(v)

    v = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v /= torch.linalg.vector_norm(v)
    hv = op(v)
    for start in ((v, hv), lambda: (v, hv)):
        calls.clear()
        pairs = _lanczos.deflated_power(counted, 30, 3, tol=1e-9, start=start, return_vectors=True)
        assert pairs.hvps == len(calls) + 1
        np.testing.assert_allclose(pairs.values, [4.0, -3.0, 2.5], rtol=1e-9)
        Y = pairs.vectors.numpy()
        np.testing.assert_allclose(Y @ Y.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(np.einsum("ij,jk,ik->i", Y, A, Y), pairs.values, rtol=1e-12)


def test_small_dimension_zero_operator_and_zero_eigenvalues():
    op, _ = spectrum_operator([2.0, -1.0, 0.0], seed=2)
    for k in (1, 2, 3):        # k >= 2: the block (k + min(k, 4)) is clamped to n = 3, Ritz pairs exact
        pairs = _lanczos.deflated_power(op, 3, k, which="LA", tol=1e-12)
        assert pairs.converged.all() and (pairs.hvps == 3 or k == 1)
        np.testing.assert_allclose(pairs.values, [2.0, 0.0, -1.0][:k], atol=1e-14)
    with np.errstate(all="raise"):
        pairs = _lanczos.deflated_power(lambda v: torch.zeros_like(v), 10, 2, tol=1e-6)
    assert pairs.converged.all() and np.array_equal(pairs.values, [0.0, 0.0])
    # rank 2, k beyond it: the zero eigenvalues are found to rounding, but a relative residual
    # (floored at 1e-12 |lambda_max|, as Lanczos's) of 1e-6 is out of reach for them: flagged
    op, _ = spectrum_operator(np.concatenate([[3.0, -2.0], np.zeros(18)]), seed=5)
    with np.errstate(all="raise"):
        pairs = _lanczos.deflated_power(op, 20, 4, which="LM", tol=1e-6, max_iter=20)
    assert pairs.converged[:2].all() and pairs.hvps <= 80
    np.testing.assert_allclose(pairs.values, [3.0, -2.0, 0.0, 0.0], atol=1e-14)


def test_budget_exhausted_gives_flagged_rayleigh_quotients():
    values = np.concatenate([[1.0, 0.999, -0.998], np.linspace(-0.99, 0.99, 57)])   # no gap to speak of
    op, _ = spectrum_operator(values, seed=7)
    pairs = _lanczos.deflated_power(op, 60, 3, which="LM", tol=1e-10, max_iter=4)
    assert pairs.hvps <= 12 and not pairs.converged.all()
    assert np.all(np.isfinite(pairs.values)) and np.all(np.abs(pairs.values) <= 1.0 + 1e-12)


# ----------------------------------------------------------------------------- property test
@st.composite
def problems(draw):
    n = draw(st.integers(2, 30))
    kind = draw(st.sampled_from(["normal", "repeated", "pairs", "zeros", "clustered"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        values = rng.standard_normal(n)
    elif kind == "repeated":
        values = rng.choice(rng.standard_normal(3), size=n)
    elif kind == "pairs":
        half = rng.uniform(0.1, 3.0, size=(n + 1) // 2)
        values = np.concatenate([half, -half * (1 + rng.uniform(-1e-3, 1e-3, size=half.size))])[:n]
    elif kind == "zeros":
        values = np.where(rng.random(n) < 0.6, 0.0, rng.standard_normal(n))
    else:
        values = 1.0 + 1e-3 * rng.standard_normal(n)
    values = values * 10.0 ** draw(st.integers(-3, 3))
    k = draw(st.integers(1, min(5, n)))
    which = draw(st.sampled_from(["LM", "LA", "SA"]))
    max_iter = draw(st.sampled_from([1, 3, 10, 1000]))
    tol = draw(st.sampled_from([1e-3, 1e-6]))
    return values, seed, k, which, max_iter, tol


def _key(values, which):
    """Larger is further up in ``which`` order."""
    return {"LM": np.abs, "LA": np.asarray, "SA": np.negative}[which](values)


@settings(deadline=None, max_examples=60)
@given(problems())
def test_every_reported_value_is_in_the_spectrum_range_and_converged_ones_are_right(problem):
    values, seed, k, which, max_iter, tol = problem
    n = len(values)
    op, A = spectrum_operator(values, seed=seed)
    ev = np.linalg.eigvalsh(A)
    scale = max(float(np.max(np.abs(ev))), 1e-300)
    eps = 1e-10 * scale
    pairs = _lanczos.deflated_power(op, n, k, which=which, tol=tol, max_iter=max_iter, seed=seed % 1000,
                                    return_vectors=True)
    theta = pairs.values
    assert theta.shape == (k,) and pairs.hvps <= max_iter * k
    assert np.all(np.isfinite(theta)), theta
    assert np.all(theta >= ev[0] - eps) and np.all(theta <= ev[-1] + eps), (theta, ev[0], ev[-1])
    assert np.all(_lanczos.order(theta, which) == np.arange(k))
    # every value is the Rayleigh quotient of its (orthonormal) vector; residuals are true ones
    Y = pairs.vectors.numpy()
    np.testing.assert_allclose(Y @ Y.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(np.einsum("ij,jk,ik->i", Y, A, Y), theta, atol=eps)
    true = np.linalg.norm(Y @ A - theta[:, None] * Y, axis=1)
    big = np.abs(theta) > 1e-9 * scale   # (the solver floors |theta| at 1e-12 max |theta| seen)
    assert np.all(np.abs(true - pairs.residuals * np.abs(theta))[big] <= 1e-12 * scale), (true, pairs.residuals)
    floor = np.maximum(np.abs(theta), 1e-12 * scale)
    # interlacing: the i-th Ritz value never lies beyond the i-th eigenvalue in `which` order (|value|
    # for LM, where +l / -l may trade places), converged or not
    ref = reference(ev, k, which)
    assert np.all(_key(theta, which) <= _key(ref, which) + eps), (theta, ref)
    keys = _key(ev, which)
    for i in np.flatnonzero(pairs.converged):
        bound = tol * floor[i] + eps
        assert np.min(np.abs(ev - theta[i])) <= bound, (i, theta, ref)
        # and it is the i-th, not one further down: a residual test cannot tell eigenvalues apart
        # that lie within a few tol |theta| of each other (a random vector of such a cluster passes),
        # so this holds where the next eigenvalue down is farther than 10 tol |theta|
        below = _key(ref[i], which) - keys[keys < _key(ref[i], which) - bound]
        if below.size == 0 or below.min() > 10 * bound:
            assert abs(_key(theta[i], which) - _key(ref[i], which)) <= bound, (i, theta, ref, pairs.converged)
