"""`lt featvar` end to end on tiny zoo checkpoints (width 4) and tensors data."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import featvar, store
from landscape_tools.checkpoints import load_checkpoint, save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import load_data, save_tensors
from landscape_tools.models import build_model
from landscape_tools.plotting import render


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("featvar")
    rng = np.random.default_rng(0)
    data = root / "data.npz"
    save_tensors(data, x=rng.normal(size=(6, 1, 12, 12)).astype(np.float32), y=rng.integers(0, 3, 6),
                 x_test=rng.normal(size=(10, 1, 12, 12)).astype(np.float32), y_test=rng.integers(0, 3, 10))
    paths = {}
    for name in ("resnet_mcdo_18", "resnet_mcdo_smoothing_18", "resnet_dnn_18"):
        torch.manual_seed(1)
        model = build_model(name, num_classes=3, in_channels=1, width=4)
        paths[name] = root / f"{name.replace('resnet_', '').replace('_18', '')}.pt"
        save_checkpoint(paths[name], model, name, model.arch_kwargs, {"dataset": f"tensors:{data}"})
    return root, data, paths


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_featvar_two_models_one_file_and_figures(files):
    root, data, paths = files
    out, fig = root / "mc.h5", root / "mc.png"
    res = run("featvar", paths["resnet_mcdo_18"], paths["resnet_mcdo_smoothing_18"], "--mc", "4", "--batch-size", "4",
              "--fourier", "--seed", "3", "-o", out, "--plot", fig)
    assert res.exit_code == 0, res.output
    assert "mcdo: mc variance (4 samples, dropout) layer0 " in res.output
    assert "mcdo_smoothing: mc variance (4 samples, dropout) layer0 " in res.output
    assert fig.stat().st_size > 0 and not store.partial_path(out).exists()
    result = store.read_result(out)
    assert result.kind == "featvar" and result.attrs["seed"] == 3 and result.config["mc"] == 4
    assert list(result.models) == ["mcdo", "mcdo_smoothing"]
    smooth = result.models["mcdo_smoothing"]
    assert list(smooth["layers"]) == ["layer0", "smooth1", "smooth2", "smooth3", "smooth4"]
    np.testing.assert_allclose(smooth["depth"], [0, 0.25, 0.5, 0.75, 1])
    assert smooth["is_smoothing"].tolist() == [False, True, True, True, True]
    assert smooth["is_downsampling"].tolist() == [False, False, True, True, True]
    assert smooth.attrs["over"] == "mc" and smooth.attrs["samples"] == 4 and smooth.attrs["source"] == "dropout"
    assert smooth.attrs["arch"] == "resnet_mcdo_smoothing_18" and len(smooth.attrs["checkpoint_sha256"]) == 64
    assert smooth.attrs["num_samples"] == 10
    assert smooth["variance"].shape == (5,) and np.all(smooth["variance"][1:] > 0)
    assert smooth["fourier/amplitude"].shape == smooth["fourier/frequency"].shape
    assert np.all(smooth["fourier/amplitude"][:, 0] == 0)
    # the file holds exactly what the library computes on the same data
    model, _ = load_checkpoint(paths["resnet_mcdo_smoothing_18"])
    ds = load_data(f"tensors:{data}", "test", batch_size=4, in_channels=1)
    direct = featvar.feature_variance(model, ds.batches(), mc=4, seed=3, fourier=True)
    np.testing.assert_array_equal(direct.variance, smooth["variance"])
    four = root / "fourier.png"
    render([str(out)], str(four), kind="fourier")
    assert four.stat().st_size > 0


def test_featvar_spatial_blocks_and_noise(files):
    root, data, paths = files
    out = root / "spatial.h5"
    res = run("featvar", paths["resnet_dnn_18"], "--over", "spatial", "--layers", "blocks", "--data", f"tensors:{data}",
              "--split", "train", "-o", out)
    assert res.exit_code == 0, res.output
    node = store.read_result(out).models["dnn"]
    assert node.attrs["over"] == "spatial" and node.attrs["samples"] == 1 and node.attrs["source"] == "none"
    assert len(node["layers"]) == 11 and "fourier" not in node.groups and node.attrs["num_samples"] == 6
    noise = root / "noise.h5"
    res = run("featvar", paths["resnet_dnn_18"], "--source", "noise:0.1", "--mc", "3", "--layers", "layer1.?,layer4",
              "-o", noise)
    assert res.exit_code == 0, res.output
    node = store.read_result(noise).models["dnn"]
    assert list(node["layers"]) == ["layer1.0", "layer1.1", "layer4"] and node.attrs["source"] == "noise:0.1"
    assert np.all(node["variance"] > 0)
    res = run("plot", noise, "--kind", "fourier", "-o", root / "nf.png")
    assert res.exit_code == 1
    assert "Error: these featvar results hold no Fourier curves; rerun `lt featvar` with --fourier" in res.output


@pytest.mark.parametrize("args, message", [
    (["--over", "bogus"], "Error: Invalid value for '--over': 'bogus' is not one of 'mc', 'spatial'."),
    (["--source", "noise:abc"], "Error: --source 'noise:abc': expected 'dropout' or 'noise:SIGMA' with SIGMA a "
                                "positive number (the std of Gaussian input noise), e.g. noise:0.1"),
    (["--layers", "layer1.0,nothing*"], "Error: --layers 'nothing*' matches no module of the model; available names "
                                        "include layer0, layer1, smooth1, layer2, smooth2, layer3, smooth3, layer4, "
                                        "smooth4, classifier, layer0.0, layer0.1 (globs like 'layer*' match by name)"),
    (["--over", "spatial", "--mc", "4"], "Error: --mc and --source apply to --over mc only; --over spatial is "
                                         "deterministic"),
    (["--mc", "1"], "Error: Invalid value for '--mc': 1 is not in the range x>=2."),
])
def test_bad_input(files, args, message):
    root, _, paths = files
    out = root / "bad.h5"
    res = run("featvar", paths["resnet_mcdo_18"], *args, "-o", out)
    assert res.exit_code in (1, 2) and message in res.output, res.output
    assert not out.exists() and not store.partial_path(out).exists()


def test_deterministic_model_needs_noise_and_existing_output_is_kept(files):
    root, _, paths = files
    out = root / "dnn.h5"
    res = run("featvar", paths["resnet_dnn_18"], "-o", out)
    assert res.exit_code == 1
    assert ("Error: resnet_dnn_18 has no MC dropout, so --source dropout gives zero variance; use --source noise:SIGMA "
            "(Gaussian input noise, e.g. noise:0.1) or --over spatial") in res.output
    assert not out.exists() and not store.partial_path(out).exists()
    out.write_bytes(b"keep")
    res = run("featvar", paths["resnet_mcdo_18"], "-o", out)
    assert res.exit_code == 1 and f"Error: {out} already exists; pass --overwrite" in res.output
    assert out.read_bytes() == b"keep"


def test_help_documents_bessel_and_example():
    res = run("featvar", "--help")
    assert res.exit_code == 0
    assert "Bessel-corrected" in res.output and "Example:" in res.output and "noise:SIGMA" in res.output


def test_featvar_precision_is_recorded(files):
    root, _, paths = files
    out = root / "bf16.h5"
    res = run("featvar", paths["resnet_mcdo_18"], "--mc", "3", "--batch-size", "5", "--precision", "bf16", "-o", out)
    assert res.exit_code == 0, res.output
    result = store.read_result(out)
    assert result.config["precision"] == "bf16" and result.config["compile"] is False
    assert result.models["mcdo"].attrs["precision"] == "bf16"
    assert np.all(result.models["mcdo"]["variance"][1:] > 0)


def test_featvar_max_batch_below_the_batch_size_gives_the_same_numbers(files):
    root, _, paths = files
    got = {}
    for cap in ("1000", "3"):                      # every copy in one pass; the batch of 10 in pieces of 3 rows
        out = root / f"fv_cap_{cap}.h5"
        res = run("featvar", paths["resnet_mcdo_18"], "--mc", "3", "--batch-size", "10", "--max-batch", cap,
                  "-o", out)
        assert res.exit_code == 0, res.output
        got[cap] = store.read_result(out).models["mcdo"]["variance"]
    np.testing.assert_allclose(got["3"], got["1000"], rtol=1e-6, atol=0)
    assert np.all(got["1000"][1:] > 0)
