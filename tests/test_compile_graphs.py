"""--compile compiles once (issue #18 item 8): MC-dropout seeds are graph inputs, not constants, and the
dropout modules do not break the graph; the compiled numbers equal eager ones."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from landscape_tools import surface as S
from landscape_tools._directions import random_directions
from landscape_tools.data import load_data, save_tensors
from landscape_tools.evaluate import ensemble_curve
from landscape_tools.models import MCDropout


def tiny():
    torch.manual_seed(0)
    # momentum=None: a cumulative average, whose train-mode update reads num_batches_tracked (--bn recompute)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(), MCDropout(0.3),
                         nn.Conv2d(4, 4, 3), nn.ReLU(), MCDropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "d.npz"
    rng = np.random.default_rng(0)
    save_tensors(path, x=rng.normal(size=(24, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 24))
    return load_data(f"tensors:{path}", batch_size=8)          # 3 batches


def _compiling(fn):
    """``fn()`` on fresh compile caches, and what dynamo did: (graphs compiled, graph breaks, recompiles)."""
    torch._dynamo.reset()
    counters.clear()
    out = fn()
    stats = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()),
             sum(counters["recompiles"].values()))
    torch._dynamo.reset()
    return out, stats


def test_evaluate_compiles_one_graph_for_every_seed(data):
    model = tiny()
    eager = ensemble_curve(model, data.batches(), [1, 2, 4], seed=3)
    got, (graphs, breaks, recompiles) = _compiling(
        lambda: ensemble_curve(model, data.batches(), [1, 2, 4], seed=3, compile_model=True))
    # 3 batches x 4 samples (stacked 4 copies per pass, 12 seeds per dropout module): one graph
    assert (graphs, breaks, recompiles) == (1, 0, 0)
    for key in ("nll", "accuracy", "ece", "brier", "sample_log_prob"):
        np.testing.assert_allclose(getattr(got, key), getattr(eager, key), rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("bn", ["frozen", "recompute"])
def test_surface_compiles_one_graph_for_every_seed(data, bn):
    model = tiny()
    d = random_directions(model, 1, seed=1)
    points = [0.0, 0.25, 0.5]
    with S.SurfaceEvaluator(model, data, d, mc=4, bn=bn, seed=2) as ev:
        eager = [ev(a) for a in points]

    def compiled():
        with S.SurfaceEvaluator(model, data, d, mc=4, bn=bn, seed=2, compile="on", points=3) as ev:
            return [ev(a) for a in points], ev.compiled

    (got, was_compiled), (graphs, breaks, recompiles) = _compiling(compiled)
    assert was_compiled and (graphs, breaks, recompiles) == (1, 0, 0)    # 3 points x 3 batches x 4 seeds
    np.testing.assert_allclose(np.array(got), np.array(eager), rtol=0, atol=1e-6)


def test_evaluate_model_compiled_does_not_recompile_per_seed(data):
    model = tiny()
    eager = S.evaluate_model(model, data, mc=4, seed=5)
    got, (graphs, breaks, recompiles) = _compiling(lambda: S.evaluate_model(model, data, mc=4, seed=5, compile=True))
    assert (graphs, breaks, recompiles) == (1, 0, 0)
    np.testing.assert_allclose(got, eager, rtol=0, atol=1e-6)
