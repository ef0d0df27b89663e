"""Predictive metrics against hand-computed values, and the ensemble-size sweep against a brute-force loop."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_tools.errors import ConfigError, DataError, NumericalError
from landscape_tools.evaluate import PROB_FLOOR, ensemble_curve, parse_ensemble_sizes, predictive_metrics
from landscape_tools.models import mc_dropout
from landscape_tools.seeds import EVALUATE_MC_SAMPLE, derive_seed

NAN = float("nan")


# 4 samples, 3 classes; every expected number below is worked out by hand in the comments.
PROBS = np.array([[0.65, 0.25, 0.10],   # y=0: right, conf .65 -> bin 6 (.6,.7]
                  [0.20, 0.45, 0.35],   # y=2: wrong (says 1), conf .45 -> bin 4 (.4,.5]
                  [0.30, 0.25, 0.45],   # y=2: right, conf .45 -> bin 4
                  [0.05, 0.85, 0.10]])  # y=1: right, conf .85 -> bin 8 (.8,.9]
LABELS = np.array([0, 2, 2, 1])


def test_predictive_metrics_hand_computed():
    m = predictive_metrics(PROBS, LABELS)
    # NLL = -(ln .65 + ln .35 + ln .45 + ln .85) / 4 = (0.4307829 + 1.0498221 + 0.7985077 + 0.1625189) / 4
    assert m["nll"] == pytest.approx(-(math.log(0.65) + math.log(0.35) + math.log(0.45) + math.log(0.85)) / 4, abs=1e-15)
    assert m["nll"] == pytest.approx(0.6104079, abs=1e-7)
    assert m["accuracy"] == 0.75
    # bin 4: n=2, acc 1/2, conf .45 -> 2/4 * .05 = .025; bin 6: 1/4 * |1 - .65| = .0875; bin 8: 1/4 * .15 = .0375
    assert m["ece"] == pytest.approx(0.025 + 0.0875 + 0.0375, abs=1e-15)
    assert m["ece"] == pytest.approx(0.15, abs=1e-15)
    # Brier per sample: .35^2+.25^2+.1^2 = .195; .2^2+.45^2+.65^2 = .665; .3^2+.25^2+.55^2 = .455;
    # .05^2+.15^2+.1^2 = .035; mean 1.35 / 4
    assert m["brier"] == pytest.approx(0.3375, abs=1e-15)
    assert m["num_samples"] == 4
    np.testing.assert_array_equal(m["bin_counts"], [0, 0, 0, 0, 2, 0, 1, 0, 1, 0])
    np.testing.assert_allclose(m["bin_accuracy"], [NAN] * 4 + [0.5, NAN, 1.0, NAN, 1.0, NAN], equal_nan=True)
    np.testing.assert_allclose(m["bin_confidence"], [NAN] * 4 + [0.45, NAN, 0.65, NAN, 0.85, NAN], equal_nan=True,
                               atol=1e-15)
    np.testing.assert_allclose(m["bin_edges"], np.arange(11) / 10, atol=1e-15)


def test_predictive_metrics_edges_ties_and_floor():
    probs = np.array([[0.5, 0.5, 0.0],    # y=2: p_y = 0 -> NLL clamped to -ln(1e-12); tie -> class 0 (wrong);
                      [1.0, 0.0, 0.0]])   # conf .5 is the upper edge of bin 4.  y=0: conf 1 -> bin 9, right
    m = predictive_metrics(probs, np.array([2, 0]))
    assert m["nll"] == pytest.approx(-math.log(PROB_FLOOR) / 2, abs=1e-12)   # (27.631021 + 0) / 2
    assert m["nll"] == pytest.approx(13.8155106, abs=1e-7)
    assert m["accuracy"] == 0.5
    np.testing.assert_array_equal(m["bin_counts"], [0, 0, 0, 0, 1, 0, 0, 0, 0, 1])
    assert m["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)                   # bin 4: |0 - .5|, bin 9: |1 - 1|
    assert m["brier"] == pytest.approx((0.25 + 0.25 + 1.0 + 0.0) / 2)


def test_predictive_metrics_torch_input_and_bins():
    m = predictive_metrics(torch.tensor(PROBS), torch.tensor(LABELS), n_bins=2)
    # bins (0, .5] and (.5, 1]: bin 0 holds samples 1, 2 (acc .5, conf .45), bin 1 samples 0, 3 (acc 1, conf .75)
    np.testing.assert_array_equal(m["bin_counts"], [2, 2])
    assert m["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.25)


def test_predictive_metrics_bad_input():
    with pytest.raises(DataError, match=r"labels range over 0\.\.3 but there are 3 classes"):
        predictive_metrics(PROBS, np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match=r"labels must have shape \(4,\)"):
        predictive_metrics(PROBS, np.array([0, 1]))
    with pytest.raises(NumericalError, match="NaN"):
        predictive_metrics(np.array([[NAN, 1.0]]), np.array([0]))
    with pytest.raises(DataError, match="no samples"):
        predictive_metrics(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))


def test_parse_ensemble_sizes():
    assert parse_ensemble_sizes("1,2,5,10") == (1, 2, 5, 10)
    assert parse_ensemble_sizes(" 5, 1,5 ") == (1, 5)
    assert parse_ensemble_sizes([3, 1]) == (1, 3)
    with pytest.raises(ConfigError, match=r"--mc '1,,x': an empty entry is not a whole number"):
        parse_ensemble_sizes("1,,x")
    with pytest.raises(ConfigError, match=r"--mc '1,x': 'x' is not a whole number"):
        parse_ensemble_sizes("1,x")
    with pytest.raises(ConfigError, match=r"--mc '0,2': ensemble size 0 must be at least 1"):
        parse_ensemble_sizes("0,2")
    with pytest.raises(ConfigError, match="--mc is empty"):
        parse_ensemble_sizes("")
    with pytest.raises(ConfigError, match="'-1' is not a whole number"):
        parse_ensemble_sizes("-1")


# ----------------------------------------------------------------------------- the sweep
def tiny_model(dropout: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout is not None else []) + [nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def tiny_batches(n: int = 10, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def brute_force(model, batches, sizes, seed):
    """Every MC sample of every batch stored, then the mean of the first N scored on the whole set."""
    model.eval()
    per_batch = []
    with torch.no_grad():
        for b, (x, _) in enumerate(batches):
            samples = []
            for s in range(max(sizes)):
                with mc_dropout(model, True, seed=derive_seed(seed, EVALUATE_MC_SAMPLE, b, s)):
                    samples.append(torch.softmax(model(x).double(), dim=1))
            per_batch.append(torch.stack(samples))            # (S, batch, classes)
    labels = torch.cat([y for _, y in batches])
    return {n: predictive_metrics(torch.cat([p[:n].mean(0) for p in per_batch]), labels) for n in sizes}


def test_curve_matches_brute_force():
    model, batches, sizes = tiny_model(), tiny_batches(), (1, 2, 3, 5)
    curve = ensemble_curve(model, batches, sizes, seed=7)
    ref = brute_force(model, batches, sizes, seed=7)
    assert curve.mc_active and curve.forward_passes == 5 and curve.num_samples == 10 and curve.note == ""
    np.testing.assert_array_equal(curve.sizes, sizes)
    for i, n in enumerate(sizes):
        for key in ("nll", "accuracy", "ece", "brier"):
            assert getattr(curve, key)[i] == pytest.approx(ref[n][key], abs=1e-12), (key, n)
        np.testing.assert_array_equal(curve.bin_counts[i], ref[n]["bin_counts"])
        np.testing.assert_allclose(curve.bin_accuracy[i], ref[n]["bin_accuracy"], atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(curve.bin_confidence[i], ref[n]["bin_confidence"], atol=1e-12, equal_nan=True)
    # the samples really differ: the 1-sample and 5-sample ensembles are not the same prediction
    assert curve.nll[0] != pytest.approx(curve.nll[-1], abs=1e-6)


def test_sweep_costs_max_n_passes_and_reuses_samples():
    model, batches = tiny_model(), tiny_batches()
    calls = []
    handle = model.register_forward_hook(lambda module, inp, out: calls.append(int(inp[0].shape[0])))
    sizes = [int(x.shape[0]) for x, _ in batches]                # 4, 4, 2
    try:
        curve = ensemble_curve(model, batches, (1, 2, 5), seed=3)
        assert calls == [5 * n for n in sizes]          # max(N) samples per batch, not 1 + 2 + 5, in one pass
        calls.clear()
        alone = ensemble_curve(model, batches, (5,), seed=3, max_batch=4)
        assert calls == [4] * 5 + [4] * 5 + [4, 4, 2]   # one sample per pass; two per pass for the batch of 2
    finally:
        handle.remove()
    # N=5 scored in a sweep is the same ensemble as N=5 alone: samples 1..5 are shared
    for key in ("nll", "accuracy", "ece", "brier"):
        assert getattr(curve, key)[-1] == getattr(alone, key)[0]


def test_seeded_reproducible():
    model, batches = tiny_model(), tiny_batches()
    a = ensemble_curve(model, batches, (1, 4), seed=11)
    b = ensemble_curve(model, batches, (1, 4), seed=11)
    c = ensemble_curve(model, batches, (1, 4), seed=12)
    for key in ("nll", "accuracy", "ece", "brier", "bin_counts"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.nll, c.nll)
    assert model.training    # the caller's mode is restored


def test_model_without_dropout_identical_for_all_n():
    model, batches = tiny_model(dropout=None), tiny_batches()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    curve = ensemble_curve(model, batches, (1, 2, 10), seed=0)
    handle.remove()
    assert not curve.mc_active and curve.forward_passes == 1 and len(calls) == len(batches)
    assert "no MC dropout" in curve.note
    for key in ("nll", "accuracy", "ece", "brier"):
        values = getattr(curve, key)
        assert np.all(values == values[0]), key
    # and it is the plain deterministic prediction
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x), 1) for x, _ in batches])
    ref = predictive_metrics(probs, torch.cat([y for _, y in batches]))
    assert curve.nll[0] == pytest.approx(ref["nll"], abs=1e-14)
    # a dropout of p = 0 is no dropout either
    assert not ensemble_curve(tiny_model(dropout=0.0), batches, (1, 2)).mc_active


def test_curve_bad_input():
    model, batches = tiny_model(), tiny_batches()
    with pytest.raises(ConfigError, match="ensemble size 0 must be at least 1"):
        ensemble_curve(model, batches, (0, 2))
    with pytest.raises(DataError, match="no data batches"):
        ensemble_curve(model, [], (1,))
    bad = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)).double()
    with pytest.raises(DataError, match=r"expected \(batch, classes\) logits"):
        ensemble_curve(bad, batches, (1,))


def test_to_node_layout():
    curve = ensemble_curve(tiny_model(), tiny_batches(), (1, 2))
    node = curve.to_node({"split": "test"})
    assert set(node["data"]) == {"n_samples", "nll", "accuracy", "ece", "brier"}
    rel = node["groups"]["reliability"]["data"]
    assert rel["counts"].shape == (2, 10) and rel["bin_edges"].shape == (11,)
    assert node["attrs"]["split"] == "test" and node["attrs"]["mc_active"] is True
