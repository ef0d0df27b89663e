"""Per-unit values in result files (issue #16 item 1): evaluate's per-sample values for every N and
featvar's per-batch variance per layer, consistent with the summary numbers of the same file."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.cli.main import cli
from landscape_tools.evaluate import PROB_FLOOR, ensemble_curve, predictive_metrics
from landscape_tools.models import build_model
from tiny_files import tiny_checkpoint_and_data


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("perunit")
    _, model, data = tiny_checkpoint_and_data(root, arch="resnet_mcdo_18", n=12)
    return {"root": root, "model": model, "data": data}


def test_evaluate_file_holds_per_sample_values_matching_its_metrics(files):
    out = files["root"] / "e.h5"
    run("evaluate", files["model"], "--data", files["data"], "--split", "train", "--batch-size", "5",
        "--mc", "1,3", "--seed", "2", "-o", out)
    node = store.read_result(out).models["m"]
    per = node.groups["per_sample"]
    assert per.data["log_prob"].shape == (2, 12) and per.data["log_prob"].dtype == np.float32
    assert per.data["correct"].dtype == bool and "float32" in per.attrs["dtype"]
    np.testing.assert_allclose(-per.data["log_prob"].astype(np.float64).mean(axis=1), node["nll"], rtol=1e-6)
    np.testing.assert_allclose(per.data["correct"].mean(axis=1), node["accuracy"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(per.data["brier"].astype(np.float64).mean(axis=1), node["brier"], rtol=1e-6)
    assert np.all((per.data["confidence"] > 0) & (per.data["confidence"] <= 1 + 1e-6))


def test_per_sample_values_in_data_order_against_numpy():
    """Each column is the sample of that position: scored alone it gives the same numbers."""
    torch.manual_seed(0)
    model = build_model("resnet_dnn_18", width=4, num_classes=3, in_channels=1)
    x, y = torch.randn(7, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    curve = ensemble_curve(model, [(x[:3], y[:3]), (x[3:], y[3:])], [1, 2])
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=1).numpy()
    p_true = p[np.arange(7), y.numpy()]
    for j in range(2):                  # no dropout: both N are the same prediction
        np.testing.assert_allclose(curve.sample_log_prob[j], np.log(np.maximum(p_true, PROB_FLOOR)), rtol=1e-6)
        np.testing.assert_array_equal(curve.sample_correct[j], p.argmax(1) == y.numpy())
        np.testing.assert_allclose(curve.sample_confidence[j], p.max(1), rtol=1e-6)
    ref = predictive_metrics(p, y.numpy())
    np.testing.assert_allclose(curve.sample_brier[0].mean(), ref["brier"], rtol=1e-6)


def test_featvar_file_holds_per_batch_variance(files):
    out = files["root"] / "f.h5"
    run("featvar", files["model"], "--data", files["data"], "--split", "train", "--batch-size", "5",
        "--mc", "3", "--layers", "stages", "-o", out)
    node = store.read_result(out).models["m"]
    bv = node["batch_variance"]
    assert bv.shape == (3, len(node["layers"]))          # batches of 5, 5, 2
    sums = node.groups["sums"].data
    np.testing.assert_allclose(bv, sums["var_sum"] / sums["count"], rtol=1e-12)
    # the whole-data variance is the entry-weighted mean of the batches'
    np.testing.assert_allclose((bv * sums["count"]).sum(0) / sums["count"].sum(0), node["variance"], rtol=1e-10)
