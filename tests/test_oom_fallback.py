"""Automatic out-of-memory fallbacks (smaller pieces, the same numbers), tested by injecting the error
on a CPU: a forward pass over more samples than a limit raises the CUDA out-of-memory error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_tools import _hvp, _lanczos, seeds
from landscape_tools._hvp import HessianOperator
from landscape_tools.device import is_out_of_memory, out_of_memory_error
from landscape_tools.hessian import hessian_operator, top_eigenvalues
from landscape_tools.models import MCDropout


class Small(nn.Module):
    """linear -> tanh -> [MC dropout] -> linear, float64: 3*6+6 + 6*3+3 = 45 parameters."""

    def __init__(self, mc: bool = False):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(3, 6)
        self.drop = MCDropout(0.3) if mc else nn.Identity()
        self.b = nn.Linear(6, 3)
        with torch.no_grad():
            self.b.weight.mul_(3.0)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


def make(mc=False):
    model = Small(mc).double()
    torch.manual_seed(7)
    x = torch.randn(19, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (19,))
    return model, [(x[:8], y[:8]), (x[8:15], y[8:15]), (x[15:], y[15:])]   # sizes 8, 7, 4


def oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139 GiB total)")


@pytest.fixture
def limit(monkeypatch):
    """``limit(n)``: every Hessian loss over more than ``n`` samples raises out of memory; returns the
    list of piece sizes tried."""
    tried = []

    def install(n):
        original = HessianOperator._loss

        def loss(self, b, piece, model_call=None):
            tried.append(piece[1] - piece[0])
            if piece[1] - piece[0] > n:
                raise oom()
            return original(self, b, piece, model_call)

        monkeypatch.setattr(HessianOperator, "_loss", loss)
        return tried

    return install


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("form", ["graph", "double", "func"])
@pytest.mark.parametrize("mc", [False, True])
def test_products_fall_back_to_smaller_pieces_with_the_same_values(limit, form, mc):
    model, batches = make(mc)
    torch.manual_seed(11)
    vs = [torch.randn(45, dtype=torch.float64) for _ in range(3)]
    with HessianOperator(model, batches, form=form, sub_batch=None) as free:
        expected = [free.matvec(v) for v in vs]
        grad = free.free_gradient()
    notes = []
    tried = limit(3)
    with HessianOperator(model, batches, form=form, sub_batch=None, notice=notes.append) as op:
        got = [op.matvec(v) for v in vs]
        got_grad = op.free_gradient()
        assert op.sub_batch == 2            # 8 -> 4 -> 2 samples: the first size within the limit
        assert op.requested_sub_batch is None
    assert max(tried) == 8 and 4 in tried   # it did run out of memory, then halved
    for a, b in zip(got, expected):
        assert _rel(a, b) <= 1e-10
    assert _rel(got_grad, grad) <= 1e-10
    assert len(notes) == 1 and "pieces of 8 samples" in notes[0] and "--sub-batch 2" in notes[0]


def test_nothing_fits_raises_the_out_of_memory_error_and_other_errors_are_not_retried(limit, monkeypatch):
    model, batches = make()
    tried = limit(0)
    with HessianOperator(model, batches, form="double", sub_batch=4, notice=lambda line: None) as op:
        with pytest.raises(torch.cuda.OutOfMemoryError) as info:
            op.matvec(torch.ones(45, dtype=torch.float64))
        assert op.sub_batch == 1 and tried == [4, 2, 1]
    assert is_out_of_memory(info.value)
    message = str(out_of_memory_error(info.value, "hessian"))
    assert "lt hessian ran out of memory" in message and "--sub-batch" in message

    calls = []

    def loss(self, b, piece, model_call=None):
        calls.append(piece)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(HessianOperator, "_loss", loss)
    with HessianOperator(model, batches, form="double", sub_batch=4) as op:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            op.matvec(torch.ones(45, dtype=torch.float64))
        assert op.sub_batch == 4 and calls == [(0, 4)]


@pytest.mark.parametrize("mc", [False, True])
def test_top_eigenvalues_keep_the_smaller_pieces_say_it_once_and_record_them(limit, capsys, mc):
    model, batches = make(mc)
    kw = dict(k=2, tol=1e-10, trace=True, trace_probes=6, density=True, density_runs=2, density_steps=6, seed=5)
    free = top_eigenvalues(model, batches, **kw)
    assert "sub_batch_used" not in free.config
    capsys.readouterr()
    tried = limit(3)
    res = top_eigenvalues(model, batches, **kw)
    err = capsys.readouterr().err
    assert err.count("ran out of memory") == 1, err
    assert res.config["sub_batch"] == 32 and res.config["sub_batch_used"] == 2
    assert res.attrs()["sub_batch_used"] == 2
    assert tried.count(8) == 1              # rows after the first start at the smaller size
    np.testing.assert_allclose(res.eigenvalues, free.eigenvalues, rtol=1e-10, atol=0)
    np.testing.assert_allclose(res.trace["estimate"], free.trace["estimate"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.density["nodes"], free.density["nodes"], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(res.density["weights"], free.density["weights"], rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- SLQ basis storage
def _dense(op, n):
    return torch.stack([op(e) for e in torch.eye(n, dtype=torch.float64)]).T


class _Recording(_lanczos._Basis):
    made: list = []

    def __init__(self, capacity, n, dtype, device):
        super().__init__(capacity, n, dtype, device)
        _Recording.made.append(self)


def test_slq_float32_basis_matches_float64_and_halves_its_memory(monkeypatch):
    model, batches = make()
    monkeypatch.setattr(_lanczos, "_Basis", _Recording)
    _Recording.made = []
    with hessian_operator(model, batches, sub_batch=None) as op:
        H = _dense(op, 45)
        exact = np.sort(np.linalg.eigvalsh(H.numpy()))
        n64, w64 = _lanczos.slq(op, 45, runs=3, steps=20, seed=2, basis_dtype=torch.float64)
        n32, w32 = _lanczos.slq(op, 45, runs=3, steps=20, seed=2, basis_dtype=torch.float32)
        full, _ = _lanczos.slq(op, 45, runs=1, steps=45, seed=2, basis_dtype=torch.float32)
    radius = float(np.abs(exact).max())
    # stored in float32: nodes and weights move by ~1e-7 relative; the stated tolerance is 1e-5
    assert np.isfinite(n32).all() and np.isfinite(n64).all()
    np.testing.assert_allclose(n32, n64, rtol=0, atol=1e-5 * radius)
    np.testing.assert_allclose(w32, w64, rtol=0, atol=1e-5)
    np.testing.assert_allclose(w32.sum(1), 1.0, atol=1e-12)
    # against the dense Hessian: the quadrature's moments are those of each run's start vector
    # (v^T H^p v, exact for p < 2 * steps), and with all n steps allowed every node is an eigenvalue
    for r in range(3):
        v = _lanczos._random_unit(45, seeds.derive_seed(2, seeds.SLQ_RUN, r), "cpu", kind="rademacher",
                                  draw_on_device=True)
        for p in range(6):
            moment = float(v @ torch.linalg.matrix_power(H, p) @ v)
            assert abs(float((w32[r] * n32[r] ** p).sum()) - moment) <= 1e-5 * radius ** p
    got = full[0][np.isfinite(full[0])]
    assert len(got) >= 20
    assert np.abs(got[:, None] - exact[None, :]).min(axis=1).max() <= 1e-5 * radius
    # the stored basis: float32 rows, half the bytes of the float64 one of the same run
    b64, b32 = _Recording.made[0], _Recording.made[3]
    assert b64.dtype == torch.float64 and b32.dtype == torch.float32
    bytes64 = sum(b.numel() * b.element_size() for b in b64.blocks)
    bytes32 = sum(b.numel() * b.element_size() for b in b32.blocks)
    assert bytes64 == 20 * 45 * 8 and bytes32 * 2 == bytes64
    assert all(b.dtype == torch.float32 for b in b32.blocks)


def test_top_eigenvalues_density_stores_a_float32_basis_for_a_float32_model(monkeypatch):
    model, batches = make()
    model = model.float()
    batches = [(x.float(), y) for x, y in batches]
    monkeypatch.setattr(_lanczos, "_Basis", _Recording)
    _Recording.made = []
    res = top_eigenvalues(model, batches[:1], k=1, density=True, density_runs=2, density_steps=10, seed=1)
    dens = [b for b in _Recording.made if b.capacity == 10]
    assert len(dens) == 2 and all(b.dtype == torch.float32 for b in dens)
    ref = top_eigenvalues(model.double(), [(x.double(), y) for x, y in batches[:1]], k=1, density=True,
                          density_runs=2, density_steps=10, seed=1)
    radius = float(np.nanmax(np.abs(ref.density["nodes"])))
    np.testing.assert_allclose(res.density["nodes"], ref.density["nodes"], rtol=0, atol=1e-4 * radius)
    np.testing.assert_allclose(res.density["weights"], ref.density["weights"], rtol=0, atol=1e-4)


def test_run_hessian_records_the_smaller_pieces_in_the_file_and_keeps_them_for_the_next_model(limit, tmp_path):
    import h5py

    from landscape_tools.hessian import HessianJob, HessianOptions, run_hessian

    model, batches = make()
    other, _ = make(mc=True)
    jobs = lambda: [HessianJob("a", model, None, batches), HessianJob("b", other, None, batches)]  # noqa: E731
    options = HessianOptions(k=2, tol=1e-10, seed=3, sub_batch=None)
    free = run_hessian(jobs(), str(tmp_path / "free.h5"), options)
    tried = limit(3)
    got = run_hessian(jobs(), str(tmp_path / "oom.h5"), options)
    assert tried.count(8) == 1                      # model b starts at the smaller size
    with h5py.File(tmp_path / "oom.h5", "r") as f:
        assert f["a"].attrs["sub_batch"] == "whole" and f["a"].attrs["sub_batch_used"] == 2
        assert f["b"].attrs["sub_batch_used"] == 2
        values = {k: f[k]["eigenvalues"][()] for k in ("a", "b")}
    with h5py.File(tmp_path / "free.h5", "r") as f:
        assert "sub_batch_used" not in f["a"].attrs
        for k in ("a", "b"):
            np.testing.assert_allclose(values[k], f[k]["eigenvalues"][()], rtol=1e-10, atol=0)
            np.testing.assert_allclose(got[k].eigenvalues, free[k].eigenvalues, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- surface forward passes
def _surface_case():
    from landscape_tools import surface as S
    from landscape_tools.data import DataSet

    model = Small(mc=True).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(19, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (19,), generator=g)
    data = DataSet(x, y, "tensors:test", "train", 3, 8)          # batches of 8, 8, 3
    return S, model, data, S.random_directions(model, 2, seed=1)


@pytest.fixture
def forward_limit(monkeypatch):
    """``forward_limit(n)``: a forward pass over more than ``n`` samples raises out of memory."""
    tried = []

    def install(n, error=oom):
        original = Small.forward

        def forward(self, x):
            tried.append(int(x.shape[0]))
            if x.shape[0] > n:
                raise error()
            return original(self, x)

        monkeypatch.setattr(Small, "forward", forward)
        return tried

    return install


@pytest.mark.parametrize("mc", [0, 3])
def test_surface_points_fall_back_to_smaller_pieces_with_the_same_values(forward_limit, mc):
    S, model, data, d = _surface_case()
    xs, ys = np.array([-0.5, 0.0, 0.7]), np.array([-0.3, 0.4])
    free = S.surface(model, data, d, xs, ys, mc=mc, seed=7)
    notes = []
    tried = forward_limit(3, error=lambda: RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB"))
    got = S.surface(model, data, d, xs, ys, mc=mc, seed=7, notice=notes.append)
    assert tried.count(8) == 1 and 4 in tried       # ran out once, then halved: 8 -> 4 -> 2, kept after
    assert max(tried[tried.index(4) + 1:]) <= 3
    np.testing.assert_allclose(got["loss"], free["loss"], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(got["accuracy"], free["accuracy"])
    assert len(notes) == 1 and "with 8 samples at once" in notes[0] and "continuing with 2" in notes[0]
    with S.SurfaceEvaluator(model, data, d, mc=mc, seed=7, notice=notes.append) as ev:
        assert ev(0.7, 0.4) == pytest.approx(tuple(free_v[2, 1] for free_v in (free["loss"], free["accuracy"])),
                                              rel=1e-12)
        assert ev.pieces.size == 2                  # the size used, recorded on the evaluator


def test_surface_mc_masks_of_pieces_are_those_of_the_whole_batch(forward_limit):
    """With MC dropout a split batch that drew fresh masks would change the loss: it does not."""
    S, model, data, d = _surface_case()
    whole = S.evaluate_model(model, data, mc=4, seed=3)
    forward_limit(1)
    assert S.evaluate_model(model, data, mc=4, seed=3) == pytest.approx(whole, rel=1e-12)
    assert whole != pytest.approx(S.evaluate_model(model, data, mc=4, seed=4), rel=1e-6)  # masks matter here


def test_surface_nothing_fits_raises_the_out_of_memory_error(forward_limit):
    S, model, data, d = _surface_case()
    tried = forward_limit(0)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        S.surface(model, data, d, np.array([0.0]), np.array([0.0]), notice=lambda line: None)
    assert tried == [8, 4, 2, 1]                    # halved down to one sample before giving up
    assert "--batch-size" in str(out_of_memory_error(info.value, "surface"))


def test_run_surface_records_the_rows_per_pass_and_keeps_them_for_the_next_model(forward_limit, tmp_path):
    import h5py

    S, model, data, d = _surface_case()
    other = Small(mc=True).double().eval()
    with torch.no_grad():
        other.a.weight.mul_(1.5)
    d_other = S.random_directions(other, 2, seed=2)
    jobs = lambda: [S.SurfaceJob("a", model, None, data, d), S.SurfaceJob("b", other, None, data, d_other)]  # noqa: E731
    xs, ys = np.array([-0.5, 0.5]), np.array([0.0, 0.3])
    S.run_surface(jobs(), str(tmp_path / "free.h5"), S.SurfaceOptions(xs, ys, mc=2, seed=1))
    tried = forward_limit(5)
    S.run_surface(jobs(), str(tmp_path / "oom.h5"), S.SurfaceOptions(xs, ys, mc=2, seed=1), notice=lambda line: None)
    assert tried.count(8) == 1                      # model b starts at the smaller size
    with h5py.File(tmp_path / "oom.h5", "r") as f, h5py.File(tmp_path / "free.h5", "r") as ref:
        for k in ("a", "b"):
            assert f[k].attrs["rows_per_pass"] == 4 and "rows_per_pass" not in ref[k].attrs
            np.testing.assert_allclose(f[k]["loss"][()], ref[k]["loss"][()], rtol=1e-12, atol=0)
            np.testing.assert_array_equal(f[k]["accuracy"][()], ref[k]["accuracy"][()])


# ----------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from landscape_tools.checkpoints import save_checkpoint
    from landscape_tools.data import save_tensors
    from landscape_tools.models import build_model

    root = tmp_path_factory.mktemp("oom_cli")
    torch.manual_seed(0)
    m = build_model("resnet_dnn_18", width=4, num_classes=3, in_channels=1)
    save_checkpoint(root / "m.pt", m, "resnet_dnn_18", m.arch_kwargs, {})
    rng = np.random.default_rng(0)
    save_tensors(root / "d.npz", x=rng.normal(size=(12, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 12))
    return root


def _lt(*args):
    from click.testing import CliRunner

    from landscape_tools.cli.main import cli
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result, result.output          # stdout and stderr, interleaved


def test_cli_hessian_falls_back_says_it_once_and_errors_when_nothing_fits(cli_files, limit, tmp_path):
    from landscape_tools import store

    common = ["hessian", cli_files / "m.pt", "--data", f"tensors:{cli_files / 'd.npz'}", "--batch-size", "6",
              "--top-k", "1", "--tol", "1e-3", "--device", "cpu", "--sub-batch", "whole"]
    free, _ = _lt(*common, "-o", tmp_path / "free.h5")
    assert free.exit_code == 0, free.output
    limit(2)
    res, text = _lt(*common, "-o", tmp_path / "oom.h5")
    assert res.exit_code == 0, text
    assert text.count("ran out of memory") == 1 and "--sub-batch 1" in text
    got, ref = store.read_result(tmp_path / "oom.h5"), store.read_result(tmp_path / "free.h5")
    node = got.models["m"]
    assert node.attrs["sub_batch_used"] == 1 and "sub_batch_used" not in ref.models["m"].attrs
    np.testing.assert_allclose(node.data["eigenvalues"], ref.models["m"].data["eigenvalues"], rtol=1e-4)
    limit(0)
    res, text = _lt(*common, "-o", tmp_path / "none.h5")
    assert res.exit_code == 1 and "Error: lt hessian ran out of memory" in text and "--sub-batch" in text, text


def test_cli_surface_falls_back_and_errors_when_nothing_fits(cli_files, monkeypatch, tmp_path):
    from landscape_tools import store
    from landscape_tools import surface as S

    common = ["surface", cli_files / "m.pt", "--data", f"tensors:{cli_files / 'd.npz'}", "--batch-size", "6",
              "--x", "-1:1:3", "--device", "cpu"]
    free, _ = _lt(*common, "-o", tmp_path / "free.h5")
    assert free.exit_code == 0, free.output
    original = S._logits

    def limited(n):
        def logits(forward, bx, precision, dtype):
            if bx.shape[0] > n:
                raise oom()
            return original(forward, bx, precision, dtype)
        monkeypatch.setattr(S, "_logits", logits)

    limited(4)
    res, text = _lt(*common, "-o", tmp_path / "oom.h5")
    assert res.exit_code == 0, text
    assert text.count("ran out of memory") == 1 and "continuing with 3" in text
    assert "--compile auto: running eagerly: a batch of 6 samples does not fit in memory at once" in text
    got, ref = store.read_result(tmp_path / "oom.h5"), store.read_result(tmp_path / "free.h5")
    assert got.models["m"].attrs["rows_per_pass"] == 3
    np.testing.assert_allclose(got.models["m"].data["loss"], ref.models["m"].data["loss"], rtol=1e-5)
    limited(0)
    res, text = _lt(*common, "-o", tmp_path / "none.h5")
    assert res.exit_code == 1 and "Error: lt surface ran out of memory" in text and "--batch-size" in text, text
