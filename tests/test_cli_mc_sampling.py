"""Which dropout modules the commands sample: zoo `_dnn` models are deterministic (VGG / AlexNet keep
their classifier nn.Dropout off, as the reference code has it), and every command says on stderr what
it samples."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.models import build_model
from tiny_files import random_tensors

NAMES = ("vgg_dnn_11", "alexnet_dnn", "vgg_mcdo_11")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc_sampling")
    data = random_tensors(root / "data.npz", 6, 10, (3, 32, 32))
    paths = {}
    for name in NAMES:
        torch.manual_seed(1)
        model = build_model(name, num_classes=3, width=1)
        paths[name] = root / f"{name}.pt"
        save_checkpoint(paths[name], model, name, model.arch_kwargs, {"dataset": f"tensors:{data}"})
    return root, data, paths


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


DNN_LINE = ("{command}: {label}: no MC dropout: no dropout module is sampled, every forward pass in eval mode is "
            "deterministic; not sampled, off in eval mode: classifier.2.dropout1, classifier.2.dropout2 (Dropout p=0.5)")


def test_evaluate_of_dnn_models_gives_identical_rows_for_every_n(files):
    root, _, paths = files
    out = root / "eval.h5"
    res = run("evaluate", paths["vgg_dnn_11"], paths["alexnet_dnn"], paths["vgg_mcdo_11"], "--mc", "1,2,5",
              "--batch-size", "4", "-o", out)
    assert res.exit_code == 0, res.output
    for label in ("vgg_dnn_11", "alexnet_dnn"):
        assert DNN_LINE.format(command="lt evaluate", label=label) in res.stderr.splitlines()
    assert ("lt evaluate: vgg_mcdo_11: MC sampling switches on 8 dropout modules: layer0.0.dropout, layer1.1.dropout, "
            "layer2.1.dropout, layer2.2.dropout, layer3.1.dropout, layer3.2.dropout and 2 more (MCDropout p=0.3); "
            "not sampled, off in eval mode: classifier.2.dropout1, classifier.2.dropout2 (Dropout p=0.5)"
            ) in res.stderr.splitlines()
    result = store.read_result(out)
    for label in ("vgg_dnn_11", "alexnet_dnn"):
        node = result.models[label]
        assert node.attrs["mc_active"] is False
        for key in ("nll", "accuracy", "ece", "brier", "reliability/counts", "reliability/confidence"):
            rows = np.asarray(node[key])
            assert rows.shape[0] == 3
            np.testing.assert_array_equal(rows, np.broadcast_to(rows[:1], rows.shape), err_msg=f"{label} {key}")
    mcdo = result.models["vgg_mcdo_11"]
    assert mcdo.attrs["mc_active"] is True and len(set(np.asarray(mcdo["nll"]).tolist())) == 3


def test_featvar_of_a_dnn_zoo_model_needs_noise(files):
    root, _, paths = files
    out = root / "fv.h5"
    res = run("featvar", paths["vgg_dnn_11"], "--mc", "3", "-o", out)
    assert res.exit_code == 1
    assert DNN_LINE.format(command="lt featvar", label="vgg_dnn_11") in res.stderr.splitlines()
    assert ("Error: vgg_dnn_11 has no MC dropout, so --source dropout gives zero variance; use --source noise:SIGMA "
            "(Gaussian input noise, e.g. noise:0.1) or --over spatial") in res.output
    assert not out.exists()


def test_hessian_and_surface_say_what_they_sample(files):
    root, data, paths = files
    res = run("hessian", paths["alexnet_dnn"], "--batches", "1", "--batch-size", "4", "--top-k", "1",
              "--params", "classifier.*", "--device", "cpu", "-o", root / "h.h5")
    assert res.exit_code == 0, res.output
    assert DNN_LINE.format(command="lt hessian", label="alexnet_dnn") in res.stderr.splitlines()
    res = run("surface", paths["alexnet_dnn"], "--x", "-1:1:2", "--batch-size", "5", "--mc", "2",
              "-o", root / "s.h5")
    assert res.exit_code == 0, res.output
    assert DNN_LINE.format(command="lt surface", label="alexnet_dnn") in res.stderr.splitlines()
