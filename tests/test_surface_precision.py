"""`lt surface --precision bf16|fp16` and `--compile`: against brute force, against fp32 / eager, resume rules."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape_tools import store
from landscape_tools import surface as S
from landscape_tools.data import DataSet
from landscape_tools.errors import ConfigError, StoreError
from landscape_tools.models import mc_dropout


class Tiny(nn.Module):
    """75 parameters: conv (with a bias) -> BN -> ReLU -> pool -> dropout -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(torch.flatten(h, 1)))


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_(0, 0.1)
        m.fc.weight.mul_(3.0)                  # logits of a few units: rounding shows in the loss
    return m.to(dtype).eval()


def tiny_data(dtype=torch.float32, n=17, batch_size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataSet(x, y, "tensors:test", "train", 3, batch_size)


# coordinates that are powers of two (or 0): a*dx is exact, so the brute-force copy and the in-place
# update hold the very same float32 weights and any difference comes from the forward pass alone
X, Y = np.array([-1.0, 0.0, 0.5]), np.array([-0.5, 0.0, 1.0])


def set_weights(model, d, a, b):
    m = copy.deepcopy(model)
    sd = m.state_dict()
    for name in d.x:
        sd[name] = sd[name] + a * d.x[name].to(sd[name].dtype) + b * d.y[name].to(sd[name].dtype)
    m.load_state_dict(sd)
    return m


def brute_autocast_loss(model, data, dtype):
    """Mean NLL and accuracy with the forward pass under torch.autocast(cpu, dtype), logits cast to
    float32 before the loss; the same batches as the run (oneDNN may pick kernels by batch size)."""
    total, correct = 0.0, 0
    with torch.no_grad(), mc_dropout(model, False):
        model.eval()
        for bx, by in data.batches():
            with torch.autocast("cpu", dtype=dtype):
                out = model(bx)
            assert out.dtype == dtype                          # autocast really ran the layers in 16 bits
            out = out.float()
            total += F.cross_entropy(out, by, reduction="sum").double().item()
            correct += int((out.argmax(1) == by).sum())
    return total / len(data), correct / len(data)


# ----------------------------------------------------------------------------- precision
def test_fp32_is_the_default_bit_for_bit():
    model, data = tiny(torch.float64), tiny_data(torch.float64)
    d = S.random_directions(model, 2, seed=3)
    default = S.surface(model, data, d, X, Y)
    explicit = S.surface(model, data, d, X, Y, precision="fp32", compile=False)
    np.testing.assert_array_equal(default["loss"], explicit["loss"])
    assert explicit["loss"][1, 1] == S.evaluate_model(model, data, precision="fp32")[0]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_equals_autocast_brute_force_and_differs_from_fp32(precision, dtype):
    model, data = tiny(), tiny_data()
    before = copy.deepcopy(model)
    d = S.random_directions(model, 2, seed=3)
    low = S.surface(model, data, d, X, Y, precision=precision)
    full = S.surface(model, data, d, X, Y)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    for i, a in enumerate(X):
        for j, b in enumerate(Y):
            loss, acc = brute_autocast_loss(set_weights(model, d, a, b), data, dtype)
            assert low["loss"][i, j] == pytest.approx(loss, rel=1e-6)
            assert low["accuracy"][i, j] == pytest.approx(acc, abs=1e-12)
    diff = np.abs(low["loss"] - full["loss"])
    # close to fp32 (16-bit rounding of the logits and activations: ~1e-3 relative for bf16, less for fp16) ...
    assert np.all(diff <= (3e-2 if precision == "bf16" else 5e-3) * np.abs(full["loss"]))
    # ... but not the same numbers: the reduced precision really ran
    assert diff.max() > 1e-6
    assert S.evaluate_model(model, data, precision=precision)[0] == low["loss"][1, 1]


def test_bad_precisions_are_refused():
    model, data = tiny(torch.float64), tiny_data(torch.float64)
    d = S.random_directions(model, 1, seed=0)
    with pytest.raises(ConfigError, match=r"--precision bf16 needs a float32 model, but this one's parameters "
                                          r"are float64 .*use --precision fp32"):
        S.surface(model, data, d, X, precision="bf16")
    with pytest.raises(ConfigError, match=r"--precision 'int8' is not one of fp32, bf16, fp16"):
        S.surface(tiny(), tiny_data(), S.random_directions(tiny(), 1, seed=0), X, precision="int8")


def _job(dtype=torch.float32):
    model, data = tiny(dtype), tiny_data(dtype)
    return S.SurfaceJob("m", model, None, data, S.random_directions(model, 2, seed=5))


def _interrupt_after(k):
    seen = []

    def hook(j, p):
        seen.append(p)
        if len(seen) == k:
            raise KeyboardInterrupt
    return hook


def test_resume_with_another_precision_is_refused(tmp_path):
    out = str(tmp_path / "s.h5")
    with pytest.raises(KeyboardInterrupt):
        S.run_surface([_job()], out, X, Y, precision="bf16", flush_points=1, on_point=_interrupt_after(4))
    with pytest.raises(StoreError, match=r"s\.h5\.partial holds progress of a different run \(another --precision: "
                                         r"fp32, the partial file has bf16\); rerun the same command"):
        S.run_surface([_job()], out, X, Y)
    with pytest.raises(StoreError, match=r"another --precision: fp16, the partial file has bf16"):
        S.run_surface([_job()], out, X, Y, precision="fp16")
    resumed = []
    S.run_surface([_job()], out, X, Y, precision="bf16", on_point=lambda j, p: resumed.append(p))
    assert len(resumed) == 9 - 4
    full = S.run_surface([_job()], str(tmp_path / "full.h5"), X, Y, precision="bf16")
    a, b = store.read_result(out).models["m"], store.read_result(full).models["m"]
    np.testing.assert_array_equal(a.data["loss"], b.data["loss"])
    assert a.attrs["precision"] == "bf16" and a.attrs["compile"] == False  # noqa: E712 (numpy bool)
    # fp32 keeps the fingerprint of files made before --precision existed (torchrun shard reuse checks it)
    assert S.surface_options(1, "frozen", 2) == {"mc": 1, "bn": "frozen", "seed": 2}
    assert S.surface_options(1, "frozen", 2, "bf16") == {"mc": 1, "bn": "frozen", "seed": 2, "precision": "bf16"}


def test_precision_is_checked_before_any_file_is_written(tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(ConfigError, match="needs a float32 model"):
        S.run_surface([_job(torch.float64)], str(out), X, Y, precision="fp16")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_surface_equals_eager_at_every_point_and_resumes_an_eager_run(tmp_path):
    """The compiled module shares the parameters: the in-place update of each point must reach it."""
    model, data = tiny(torch.float64), tiny_data(torch.float64)
    before = copy.deepcopy(model)
    d = S.random_directions(model, 2, seed=3)
    eager = S.surface(model, data, d, X, Y)
    compiled = S.surface(model, data, d, X, Y, compile=True)
    np.testing.assert_allclose(compiled["loss"], eager["loss"], rtol=1e-10, atol=0)
    np.testing.assert_array_equal(compiled["accuracy"], eager["accuracy"])
    assert np.ptp(eager["loss"]) > 1e-2                           # the points differ: not the centre nine times
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    # an eager run interrupted, finished compiled: the same numbers, and the file says it was mixed
    job = S.SurfaceJob("m", model, None, data, d)
    out = str(tmp_path / "s.h5")
    with pytest.raises(KeyboardInterrupt):
        S.run_surface([job], out, X, Y, flush_points=1, on_point=_interrupt_after(3))
    S.run_surface([job], out, X, Y, compile=True)
    node = store.read_result(out).models["m"]
    np.testing.assert_allclose(node.data["loss"], eager["loss"], rtol=1e-10, atol=0)
    assert node.attrs["compile"] == "mixed" and node.attrs["precision"] == "fp32"


def test_compiled_bn_recompute_and_mc_dropout_equal_eager():
    """Train-mode BN passes (whole-data statistics, run eagerly) and seeded MC-dropout masks through the compiled module."""
    model, data = tiny(torch.float64), tiny_data(torch.float64, n=8, batch_size=4)
    d = S.random_directions(model, 1, seed=2)
    x = np.array([-0.5, 0.0, 1.0])
    eager = S.surface(model, data, d, x, bn="recompute", mc=2, seed=7)
    compiled = S.surface(model, data, d, x, bn="recompute", mc=2, seed=7, compile=True)
    np.testing.assert_allclose(compiled["loss"], eager["loss"], rtol=1e-10, atol=0)
    frozen = S.surface(model, data, d, x, mc=2, seed=7)
    assert not np.allclose(frozen["loss"], eager["loss"])        # recompute changed the statistics
    assert model.bn.momentum == 0.1 and not model.bn.training
