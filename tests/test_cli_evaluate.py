"""`lt evaluate` end to end on tiny zoo checkpoints and tensors data."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.data import load_data, save_tensors
from landscape_tools.evaluate import ensemble_curve
from landscape_tools.cli.main import cli
from landscape_tools.models import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    data = root / "data.npz"
    save_tensors(data, x=rng.normal(size=(8, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 8),
                 x_test=rng.normal(size=(20, 3, 8, 8)).astype(np.float32), y_test=rng.integers(0, 3, 20))
    paths = {}
    for name in ("resnet_mcdo_18", "resnet_dnn_18"):
        torch.manual_seed(1)
        model = build_model(name, num_classes=3, width=4)
        paths[name] = root / f"{name.split('_')[1]}.pt"
        save_checkpoint(paths[name], model, name, model.arch_kwargs, {"dataset": f"tensors:{data}"})
    return root, data, paths


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_evaluate_writes_schema_and_table(files):
    root, data, paths = files
    out, fig = root / "eval.h5", root / "eval.png"
    res = run("evaluate", paths["resnet_mcdo_18"], paths["resnet_dnn_18"], "--mc", "1,2,3", "--batch-size", "8",
              "--seed", "5", "-o", out, "--plot", fig)
    assert res.exit_code == 0, res.output
    assert "mcdo: MC dropout, 20 samples" in res.output
    assert "dnn: deterministic (no MC dropout), 20 samples" in res.output
    assert "note: dnn: the model has no MC dropout" in res.output
    assert fig.stat().st_size > 0
    result = store.read_result(out)
    assert result.kind == "evaluate" and result.attrs["seed"] == 5
    assert result.config["mc"] == [1, 2, 3]
    assert sorted(result.models) == ["dnn", "mcdo"]
    mcdo, dnn = result.models["mcdo"], result.models["dnn"]
    np.testing.assert_array_equal(mcdo["n_samples"], [1, 2, 3])
    for key in ("nll", "accuracy", "ece", "brier"):
        assert mcdo[key].shape == (3,) and mcdo[key].dtype == np.float64
        assert np.all(dnn[key] == dnn[key][0])
    assert mcdo["reliability/counts"].shape == (3, 10) and mcdo["reliability/bin_edges"].shape == (11,)
    assert mcdo["reliability/counts"].sum(axis=1).tolist() == [20, 20, 20]
    assert mcdo.attrs["split"] == "test" and mcdo.attrs["num_samples"] == 20
    assert mcdo.attrs["mc_active"] is True and dnn.attrs["mc_active"] is False
    assert mcdo.attrs["arch"] == "resnet_mcdo_18" and len(mcdo.attrs["checkpoint_sha256"]) == 64
    # the file holds what the library computes for the same model, data and seed
    from landscape_tools.checkpoints import load_checkpoint
    model, _ = load_checkpoint(paths["resnet_mcdo_18"])
    ds = load_data(f"tensors:{data}", "test", batch_size=8)
    ref = ensemble_curve(model, ds.batches(), (1, 2, 3), seed=5)
    np.testing.assert_allclose(mcdo["nll"], ref.nll, rtol=1e-12)
    # the table prints the same numbers
    assert f"{1:>5}  {ref.nll[0]:8.4f}  {ref.accuracy[0]:8.4f}" in res.output


def test_evaluate_reproducible_and_subset(files):
    root, _, paths = files
    a, b = root / "a.h5", root / "b.h5"
    for out in (a, b):
        res = run("evaluate", paths["resnet_mcdo_18"], "--mc", "2", "--samples", "12", "--seed", "3", "-o", out)
        assert res.exit_code == 0, res.output
    ra, rb = store.read_result(a).models["mcdo"], store.read_result(b).models["mcdo"]
    for key in ("nll", "accuracy", "ece", "brier", "sample_indices"):
        np.testing.assert_array_equal(ra[key], rb[key])
    assert ra["sample_indices"].shape == (12,) and ra.attrs["num_samples"] == 12


@pytest.mark.parametrize("mc, message", [
    ("1,,x", "Error: --mc '1,,x': an empty entry is not a whole number; give comma-separated ensemble sizes, "
             "e.g. 1,2,5,10,20,50"),
    ("0", "Error: --mc '0': ensemble size 0 must be at least 1, e.g. 1,2,5,10,20,50"),
    ("2,x", "Error: --mc '2,x': 'x' is not a whole number; give comma-separated ensemble sizes, e.g. 1,2,5,10,20,50"),
])
def test_evaluate_bad_mc(files, mc, message):
    root, _, paths = files
    out = root / "bad.h5"
    res = run("evaluate", paths["resnet_mcdo_18"], "--mc", mc, "-o", out)
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == message
    assert not out.exists()


def test_evaluate_refuses_existing_output_and_bad_figure(files):
    root, _, paths = files
    out = root / "exists.h5"
    out.write_bytes(b"")
    res = run("evaluate", paths["resnet_mcdo_18"], "--mc", "1", "-o", out)
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {out} already exists; pass --overwrite to replace it or choose another -o"
    res = run("evaluate", paths["resnet_mcdo_18"], "--mc", "1", "-o", root / "new.h5", "--plot", root / "fig.jpg")
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: figure {root / 'fig.jpg'} must end in .png, .pdf, .svg"
    assert not (root / "new.h5").exists()


def test_evaluate_help_has_example():
    res = run("evaluate", "--help")
    assert res.exit_code == 0 and "Example:" in res.output and "--mc" in res.output


def test_evaluate_precision_is_recorded_and_bf16_differs_slightly(files):
    root, _, paths = files
    outs = {}
    for precision in ("fp32", "bf16"):
        outs[precision] = root / f"prec_{precision}.h5"
        res = run("evaluate", paths["resnet_mcdo_18"], "--mc", "1,2", "--batch-size", "8", "--precision", precision,
                  "-o", outs[precision])
        assert res.exit_code == 0, res.output
    a, b = store.read_result(outs["fp32"]), store.read_result(outs["bf16"])
    assert a.config["precision"] == "fp32" and b.config["precision"] == "bf16" and b.config["compile"] is False
    assert b.models["mcdo"].attrs["precision"] == "bf16" and b.models["mcdo"].attrs["compiled"] is False
    assert not np.array_equal(a.models["mcdo"]["nll"], b.models["mcdo"]["nll"])
    np.testing.assert_allclose(a.models["mcdo"]["nll"], b.models["mcdo"]["nll"], rtol=0.05)
    res = run("evaluate", paths["resnet_mcdo_18"], "--precision", "fp8", "-o", root / "fp8.h5")
    assert res.exit_code == 2 and "Invalid value for '--precision': 'fp8' is not one of 'fp32', 'tf32', 'bf16', 'fp16'" \
        in res.output
    assert not (root / "fp8.h5").exists()


def test_evaluate_max_batch_stacks_or_splits_with_the_same_numbers(files):
    """--max-batch bounds the rows per forward pass; the numbers are those of one MC sample per pass."""
    root, _, paths = files
    got = {}
    for cap in (None, "8", "3", "1000"):          # default; one MC sample per pass; pieces of 3; all stacked
        out = root / f"cap_{cap}.h5"
        res = run("evaluate", paths["resnet_mcdo_18"], "--mc", "1,2,4", "--batch-size", "8", "--seed", "2", "-o", out,
                  *(["--max-batch", cap] if cap else []))
        assert res.exit_code == 0, res.output
        got[cap] = store.read_result(out)
    assert got["3"].config["max_batch"] == 3 and got[None].config["max_batch"] is None
    for cap in (None, "3", "1000"):
        for key in ("nll", "accuracy", "ece", "brier"):
            np.testing.assert_allclose(got[cap].models["mcdo"][key], got["8"].models["mcdo"][key], rtol=1e-6,
                                       atol=1e-7, err_msg=f"{cap} {key}")
    res = run("evaluate", paths["resnet_mcdo_18"], "--max-batch", "0", "-o", root / "zero.h5")
    assert res.exit_code == 2 and "Invalid value for '--max-batch': 0 is not in the range x>=1." in res.output
    assert not (root / "zero.h5").exists()
    assert "--max-batch" in run("evaluate", "--help").output
