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
from landscape_tools.models import MCDropout, mc_dropout


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
    with pytest.raises(ConfigError, match=r"--precision 'int8' is not one of fp32, tf32, bf16, fp16"):
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
        S.run_surface([_job()], out, S.SurfaceOptions(X, Y, precision="bf16"), flush_points=1, on_point=_interrupt_after(4))
    with pytest.raises(StoreError, match=r"s\.h5\.partial holds progress of a different run \(another --precision: "
                                         r"fp32, the partial file has bf16\); rerun the same command"):
        S.run_surface([_job()], out, S.SurfaceOptions(X, Y))
    with pytest.raises(StoreError, match=r"another --precision: fp16, the partial file has bf16"):
        S.run_surface([_job()], out, S.SurfaceOptions(X, Y, precision="fp16"))
    resumed = []
    S.run_surface([_job()], out, S.SurfaceOptions(X, Y, precision="bf16"), on_point=lambda j, p: resumed.append(p))
    assert len(resumed) == 9 - 4
    full = S.run_surface([_job()], str(tmp_path / "full.h5"), S.SurfaceOptions(X, Y, precision="bf16"))
    a, b = store.read_result(out).models["m"], store.read_result(full).models["m"]
    np.testing.assert_array_equal(a.data["loss"], b.data["loss"])
    assert a.attrs["precision"] == "bf16" and a.attrs["compile"] == False  # noqa: E712 (numpy bool)
    # the fingerprint hashes the options, the precision included; --compile is not part of it
    from landscape_tools.engine import options_key
    assert options_key(S.SurfaceOptions(X, Y, mc=1, seed=2, precision="BF16", compile="on")) == {
        "x": tuple(X), "y": tuple(Y), "mc": 1, "bn": "frozen", "seed": 2, "precision": "bf16",
        "options_class": "SurfaceOptions"}


def test_precision_is_checked_before_any_file_is_written(tmp_path):
    out = tmp_path / "s.h5"
    with pytest.raises(ConfigError, match="needs a float32 model"):
        S.run_surface([_job(torch.float64)], str(out), S.SurfaceOptions(X, Y, precision="fp16"))
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
        S.run_surface([job], out, S.SurfaceOptions(X, Y), flush_points=1, on_point=_interrupt_after(3))
    S.run_surface([job], out, S.SurfaceOptions(X, Y, compile=True))
    node = store.read_result(out).models["m"]
    np.testing.assert_allclose(node.data["loss"], eager["loss"], rtol=1e-10, atol=0)
    assert node.attrs["compile"] == "mixed" and node.attrs["precision"] == "fp32"


class TinyMC(Tiny):
    """Tiny with the zoo's MCDropout (its seed is a Python attribute, set for every MC sample)."""

    def __init__(self):
        super().__init__()
        self.drop = MCDropout(0.3)


def tiny_mc():
    torch.manual_seed(0)
    return TinyMC().eval()


def _compilations():
    """Frames dynamo has compiled so far in this process (each recompilation counts again)."""
    from torch._dynamo.utils import counters
    return counters["frames"]["total"]


def test_compiled_mc_dropout_and_bn_recompute_equal_eager_without_recompiling():
    """Seeded MCDropout masks (18 seeds: 3 points x 3 samples x 2 full batches) and train-mode BN
    passes (run eagerly) through the compiled module: within 1e-6 of eager, and the compilations do not
    grow with the seeds (the MCDropout layer runs outside the graph: without that, 24 compilations here
    and 7 more for the next seed); the short last batch runs eagerly."""
    model, data = tiny_mc(), tiny_data(n=11, batch_size=4)          # batches of 4, 4 and 3
    d = S.random_directions(model, 1, seed=2)
    x = np.array([-0.5, 0.0, 1.0])
    eager = S.surface(model, data, d, x, bn="recompute", mc=3, seed=7)
    before = _compilations()
    compiled = S.surface(model, data, d, x, bn="recompute", mc=3, seed=7, compile="on")
    assert _compilations() - before <= 2          # the code before and after the MCDropout layer, once
    before = _compilations()
    S.surface(model, data, d, x[:1], bn="recompute", mc=3, seed=8, compile="on")
    assert _compilations() == before              # other seeds: nothing recompiled
    np.testing.assert_allclose(compiled["loss"], eager["loss"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(compiled["accuracy"], eager["accuracy"])
    frozen = S.surface(model, data, d, x, mc=3, seed=7)
    assert not np.allclose(frozen["loss"], eager["loss"])        # recompute changed the statistics
    assert model.bn.momentum == 0.1 and not model.bn.training
    assert "forward" not in model.drop.__dict__                   # MCDropout's own forward is back


def test_auto_compiles_when_it_pays_and_says_why_it_runs_eagerly(monkeypatch):
    model, data = tiny(), tiny_data()
    d = S.random_directions(model, 2, seed=3)
    eager = S.surface(model, data, d, X, Y)
    said = []
    # a 3x3 grid of a 75-parameter model: compiling (estimated ~13 s) cannot pay
    with S.SurfaceEvaluator(model, data, d, compile="auto", points=9, notice=said.append) as ev:
        assert not ev.compiled and ev.forward is model
    assert len(said) == 1 and said[0].startswith("--compile auto: running eagerly: 9 point(s) x 1 pass(es) x "
                                                 "3 batch(es) of 5 = 27 forward passes of ~")
    assert "(--compile on compiles anyway)" in said[0] and ev.compile_note == said[0]
    # told that compiling is free and always faster, auto compiles: the same numbers to 1e-6
    monkeypatch.setattr(S, "estimated_compile_seconds", lambda model, graphs=1: 0.0)
    monkeypatch.setattr(S, "AUTO_COMPILE_MAX_RATIO", float("inf"))
    said.clear()
    compiled = S.surface(model, data, d, X, Y, compile="auto", notice=said.append)
    np.testing.assert_allclose(compiled["loss"], eager["loss"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(compiled["accuracy"], eager["accuracy"])
    assert len(said) == 1 and said[0].startswith("--compile auto: compiling the forward pass")
    # ... and keeps it only when a compiled batch is faster than an eager one
    monkeypatch.setattr(S, "AUTO_COMPILE_MAX_RATIO", 0.0)
    said.clear()
    with S.SurfaceEvaluator(model, data, d, compile="auto", points=9, notice=said.append) as ev:
        assert not ev.compiled and ev.forward is model
    assert said[-1].startswith("--compile auto: running eagerly: the compiled forward pass is not faster here "
                               "(a batch of 5: ")


def test_a_failing_compiler_falls_back_to_eager_in_one_line_or_is_refused(monkeypatch):
    model, data = tiny(), tiny_data()
    d = S.random_directions(model, 2, seed=3)
    eager = S.surface(model, data, d, X, Y)

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\nno compiler found")
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(S, "estimated_compile_seconds", lambda model, graphs=1: 0.0)
    said = []
    res = S.surface(model, data, d, X, Y, compile="auto", notice=said.append)
    np.testing.assert_array_equal(res["loss"], eager["loss"])     # eager: bit for bit
    assert said[-1] == ("--compile auto: running eagerly: torch.compile failed here "
                        "(RuntimeError: InductorError: CppCompileError: C++ compile error)")
    assert sum("running eagerly" in line for line in said) == 1
    with pytest.raises(ConfigError, match=r"--compile on: torch\.compile failed here \(RuntimeError: InductorError: "
                                          r"CppCompileError: C\+\+ compile error\); use --compile off"):
        S.surface(model, data, d, X, Y, compile="on")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny().state_dict().values()))


def test_compile_values_and_mc_of_torch_dropout():
    model, data = tiny(), tiny_data()
    d = S.random_directions(model, 1, seed=3)
    assert [S.parse_compile(v) for v in (True, False, None, "AUTO", " on", "off")] == ["on", "off", "off", "auto",
                                                                                     "on", "off"]
    with pytest.raises(ConfigError, match=r"--compile 'yes' is not one of auto, on, off: auto \(the default\)"):
        S.parse_compile("yes")
    # MC sampling of torch.nn.Dropout modules would recompile at every seed: refused when asked for ...
    with pytest.raises(ConfigError, match=r"--compile on: --mc 2 samples this model's torch\.nn\.Dropout module\(s\) "
                                          r"\(drop\) with a new seed each time.*; use --compile off"):
        S.surface(model, data, d, X, mc=2, compile=True)
    # ... and eager under auto, whatever the grid
    said = []
    res = S.surface(model, data, d, X, mc=2, compile="auto", notice=said.append)
    np.testing.assert_array_equal(res["loss"], S.surface(model, data, d, X, mc=2)["loss"])
    assert said == ["--compile auto: running eagerly: --mc 2 samples this model's torch.nn.Dropout module(s) (drop) "
                    "with a new seed each time, which a compiled graph would recompile for (only the zoo's MCDropout "
                    "layers can run outside it)"]


def test_merge_of_shards_that_ran_differently_records_mixed(tmp_path):
    import h5py

    job = _job()
    parts = [str(tmp_path / f"p{i}.h5") for i in range(2)]
    for i, part in enumerate(parts):
        S.run_surface([job], part, S.SurfaceOptions(X, Y, compile="off"), shard=(i, 2))
    same = store.read_result(S.merge_shards(parts, str(tmp_path / "same.h5"))).models["m"]
    assert same.attrs["compile"] == False and same.attrs["compile_option"] == "off"  # noqa: E712 (numpy bool)
    with h5py.File(parts[1], "r+") as f:                 # as if shard 1 had run compiled
        f["m"].attrs["compile"] = True
    merged = store.read_result(S.merge_shards(parts, str(tmp_path / "m.h5"))).models["m"]
    assert merged.attrs["compile"] == "mixed"
    assert merged.attrs["compile_note"] == f"the shards ran eagerly ({parts[0]}), compiled ({parts[1]})"
    np.testing.assert_array_equal(merged.data["loss"], same.data["loss"])
