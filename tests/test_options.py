"""The analyses' frozen options dataclasses (issue #13): validated once, resolved, hashed into the
run's fingerprint, and a partial file written before the options were a dataclass is refused by name."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_tools import engine, store
from landscape_tools import hessian as H
from landscape_tools.errors import ConfigError, StoreError


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    return model, [(x[:5], y[:5]), (x[5:], y[5:])]


# ----------------------------------------------------------------------------- hessian
def test_hessian_options_are_resolved_once_and_frozen():
    o = H.HessianOptions(k=3, which="sa", method="power", mc_seed=None, precision="float32", sub_batch="whole",
                         warm_start=True)
    assert (o.which, o.max_iter, o.mc_seed, o.precision, o.sub_batch) == ("SA", 1000, 0, "fp32", None)
    assert o.warm_start is False                        # warm start is Lanczos-only
    assert H.HessianOptions(k=10).max_iter == 400 and H.HessianOptions(sub_batch="16").sub_batch == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.k = 4
    assert H.HessianOptions(**{f.name: getattr(o, f.name) for f in dataclasses.fields(o)}) == o   # idempotent


@pytest.mark.parametrize("kwargs, message", [
    ({"which": "XX"}, "--which 'XX' is not one of LM, LA, SA"),
    ({"method": "arnoldi"}, "--method 'arnoldi' is not one of lanczos, power"),
    ({"scope": "all"}, "--scope 'all' is not one of batch, dataset"),
    ({"k": 0}, "--top-k 0 must be at least 1"),
    ({"tol": 0.0}, "--tol 0.0 must be positive"),
    ({"precision": "fp16"}, "--precision fp16 is refused for Hessians"),
    ({"sub_batch": "lots"}, "--sub-batch 'lots' is not a positive number of samples, 'auto' or 'whole'"),
    ({"trace": True, "trace_probes": 2}, "--trace-probes 2 must be at least 3"),
    ({"save_vectors": "int8"}, "--vector-dtype 'int8' is not float32 or float64"),
])
def test_hessian_options_refuse_bad_values_by_name(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        H.HessianOptions(**kwargs)


def test_hessian_fingerprint_hashes_the_options_but_not_the_sub_batch():
    model, batches = _tiny()
    jobs = [H.HessianJob("m", model, None, batches)]
    plan = H.plan_run(jobs, H.HessianOptions(k=2, sub_batch=2))
    expected = {k: v for k, v in dataclasses.asdict(plan.options).items() if k != "sub_batch"}
    assert json.loads(plan.identity["run_key"])["run"]["options"] == dict(expected, options_class="HessianOptions")
    assert H.plan_run(jobs, H.HessianOptions(k=2, sub_batch=None)).fingerprint == plan.fingerprint
    assert H.plan_run(jobs, H.HessianOptions(k=2, tol=1e-5)).fingerprint != plan.fingerprint
    with pytest.raises(ConfigError, match=r"--top-k 40 is larger than the number of parameters in the Hessian \(31\)"):
        H.plan_run(jobs, H.HessianOptions(k=40))


def test_hessian_partial_file_of_the_keyword_options_is_refused_not_resumed(tmp_path):
    model, batches = _tiny()
    jobs = [H.HessianJob("m", model, None, batches)]
    options = H.HessianOptions(k=2, seed=1)
    out = tmp_path / "h.h5"
    plan = H.plan_run(jobs, options)
    # what the keyword-argument code keyed a run by: its options dict, without options_class
    old_options = {k: v for k, v in plan.key["options"].items() if k not in ("options_class", "precision")}
    old = engine.run_identity("hessian", dict(plan.key, options=dict(old_options, tol_kind="certified eigenvalue "
                                                                                           "error")), "cpu")
    engine.open_run(out, plan.root, old, plan.layout).close()
    with pytest.raises(StoreError, match=r"h\.h5\.partial holds progress of a different run \(written by an older lt "
                                         r"that recorded its options one by one, before they were validated as one "
                                         r"HessianOptions: .*pass --overwrite"):
        H.run_hessian(jobs, str(out), options)
    ref = H.run_hessian(jobs, str(tmp_path / "ref.h5"), options)
    H.run_hessian(jobs, str(out), options, overwrite=True)
    got = store.read_result(out).models["m"].data["eigenvalues"]
    np.testing.assert_array_equal(got, ref["m"].eigenvalues)


# ----------------------------------------------------------------------------- surface
def test_surface_options_are_resolved_once_and_refuse_bad_values():
    from landscape_tools import surface as S

    o = S.SurfaceOptions(np.linspace(-1, 1, 3), [0, 1], mc=2, precision="bfloat16", compile=True)
    assert (o.x, o.y, o.mc, o.precision, o.compile, o.grid) == ((-1.0, 0.0, 1.0), (0.0, 1.0), 2, "bf16", "on", (3, 2))
    for kwargs, message in [({"bn": "train"}, "--bn 'train' is not one of frozen, recompute"),
                            ({"mc": -1}, "--mc -1 must be 0"), ({"precision": "fp8"}, "--precision 'fp8' is not one"),
                            ({"compile": "maybe"}, "--compile 'maybe' is not one of auto, on, off"),
                            ({"y": []}, "the grid's y coordinates")]:
        with pytest.raises(ConfigError, match=message):
            S.SurfaceOptions([0.0], **kwargs)
    with pytest.raises(ConfigError, match=r"the grid's x coordinates \[nan\] are not a list of finite numbers"):
        S.SurfaceOptions([float("nan")])


# ----------------------------------------------------------------------------- featvar
def test_featvar_options_are_resolved_once_and_refuse_bad_values():
    from landscape_tools import featvar

    o = featvar.FeatvarOptions(mc=None, source="noise:0.10", layers=["a.*", "b"], precision="half")
    assert (o.mc, o.source, o.layers, o.precision) == (featvar.DEFAULT_MC, "noise:0.1", ("a.*", "b"), "fp16")
    assert featvar.FeatvarOptions(over="spatial", mc=None).mc == 1
    assert "max_batch" not in engine.options_key(featvar.FeatvarOptions(max_batch=8))
    for kwargs, message in [({"over": "time"}, "--over 'time': expected one of mc, spatial"),
                            ({"mc": 1}, "--mc 1: the sample variance needs at least 2 MC samples"),
                            ({"source": "noise:-1"}, "--source 'noise:-1': expected 'dropout' or 'noise:SIGMA'"),
                            ({"over": "spatial", "source": "noise:0.1"}, "--source applies to --over mc only"),
                            ({"max_batch": 0}, "max-batch"), ({"precision": "int8"}, "--precision 'int8'")]:
        with pytest.raises(ConfigError, match=message):
            featvar.FeatvarOptions(**kwargs)


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_options_are_resolved_once_and_refuse_bad_values():
    from landscape_tools import evaluate

    o = evaluate.EvaluateOptions("5,1,5", seed=2, precision="float16", compile=1, max_batch=64)
    assert (o.sizes, o.precision, o.compile, o.max_batch) == ((1, 5), "fp16", True, 64)
    assert evaluate.EvaluateOptions([2, 1]).sizes == (1, 2)
    assert engine.options_key(o) == {"sizes": (1, 5), "seed": 2, "n_bins": evaluate.N_BINS, "precision": "fp16",
                                     "options_class": "EvaluateOptions"}
    for kwargs, message in [({"sizes": "1,x"}, "--mc '1,x': 'x' is not a whole number"),
                            ({"sizes": ()}, "--mc is empty"), ({"n_bins": 0}, "n_bins=0 must be at least 1"),
                            ({"max_batch": 1.5}, "--max-batch 1.5: expected a whole number"),
                            ({"precision": "fp64"}, "--precision 'fp64' is not one of")]:
        with pytest.raises(ConfigError, match=message):
            evaluate.EvaluateOptions(**kwargs)
