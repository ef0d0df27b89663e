"""`lt train` end to end on a tiny synthetic tensors file."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors
from landscape_tools.models import build_model, mc_dropout

ARCH = "resnet_mcdo_smoothing_18"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    data = root / "F.npz"
    save_tensors(data, x=rng.normal(size=(16, 3, 32, 32)).astype(np.float32), y=np.arange(16) % 3,
                 x_test=rng.normal(size=(8, 3, 32, 32)).astype(np.float32), y_test=np.arange(8) % 3)
    out = root / "m.pt"
    res = run("train", ARCH, "--width", "4", "--data", f"tensors:{data}", "--epochs", "1", "--batch-size", "8",
              "--device", "cpu", "--seed", "3", "-o", out)
    return root, data, out, res


def test_train_writes_native_checkpoint(trained):
    root, data, out, res = trained
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1].startswith(f"{out}: {ARCH}, test accuracy ")
    model, info = load_checkpoint(out)
    assert info.kind == "native" and info.arch == ARCH
    assert info.arch_kwargs["width"] == 4 and info.arch_kwargs["num_classes"] == 3
    assert info.arch_kwargs["in_channels"] == 3
    meta = info.meta
    assert meta["dataset"] == f"tensors:{data}" and info.dataset == f"tensors:{data}"
    assert meta["epochs"] == 1 and meta["train_samples"] == 16 and meta["num_classes"] == 3
    assert meta["input_shape"] == [3, 32, 32] and meta["sample_indices"] is None
    assert meta["train"]["seed"] == 3 and meta["train"]["batch_size"] == 8
    assert [h["epoch"] for h in meta["history"]] == [1]
    assert set(meta["history"][0]) == {"epoch", "loss", "accuracy", "lr"}
    assert np.isfinite(meta["history"][0]["loss"])
    test = meta["metrics"]["test"]
    assert test["samples"] == 8 and 0.0 <= test["accuracy"] <= 1.0
    # the stored test metrics are those of the saved weights: recompute them
    x = torch.from_numpy(np.load(data)["x_test"])
    y = torch.from_numpy(np.load(data)["y_test"])
    with torch.no_grad(), mc_dropout(model, False):
        logits = model(x)
    nll = float(torch.nn.functional.cross_entropy(logits.double(), y))
    assert test["nll"] == pytest.approx(nll, rel=1e-5)
    assert test["accuracy"] == float((logits.argmax(1) == y).double().mean())
    assert f"{test['accuracy']:.4f}, NLL {test['nll']:.4f}" in res.output
    # training changed the weights
    torch.manual_seed(0)
    fresh = build_model(ARCH, num_classes=3, width=4)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_train_refuses_overwrite(trained):
    root, data, out, _ = trained
    before = out.read_bytes()
    res = run("train", ARCH, "--width", "4", "--data", f"tensors:{data}", "--epochs", "1", "-o", out)
    assert res.exit_code == 1
    assert res.output == f"Error: {out} already exists; pass --overwrite to replace it or choose another -o\n"
    assert out.read_bytes() == before


def test_train_unknown_architecture(trained):
    root, data, _, _ = trained
    res = run("train", "resnet_foo", "--data", f"tensors:{data}", "-o", root / "n.pt")
    assert res.exit_code == 1
    assert res.output == (
        "Error: unknown architecture 'resnet_foo': expected {resnet,preresnet}_{dnn,mcdo}[_smoothing]_"
        "{18,34,50,101,152}, vgg_{dnn,mcdo}[_smoothing]_{11,13,16,19} or alexnet_{dnn,mcdo}[_smoothing] "
        "(`lt info --zoo` lists them all). Did you mean one of: resnet_dnn_18, resnet_dnn_34, resnet_dnn_50, "
        "resnet_dnn_101?\n")
    assert not (root / "n.pt").exists()


def test_train_bad_options(trained):
    root, data, _, _ = trained
    res = run("train", ARCH, "--width", "4", "--data", f"tensors:{data}", "--blur-filter", "1,-1",
              "--device", "cpu", "-o", root / "n.pt")
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == "Error: blur filter (1.0, -1.0) must be non-empty with a non-zero sum"
    res = run("train", ARCH, "--data", "mnist", "-o", root / "n.pt")
    assert res.exit_code == 1
    assert res.output == ("Error: unknown data spec 'mnist': expected digits, cifar10:DIR, cifar100:DIR, "
                          "imagefolder:DIR or tensors:FILE\n")
    assert not (root / "n.pt").exists()


def test_train_help_has_example():
    res = run("train", "-h")
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert "Example:" in [line.strip() for line in lines]
    at = [line.strip() for line in lines].index("Example:")
    assert lines[at + 1].strip() == ("lt train resnet_mcdo_smoothing_18 --width 16 --data digits --epochs 15 "
                                     "-o smooth.pt")
    assert "--blur-filter" in res.output and "--overwrite" in res.output


def test_checkpoint_records_the_data_path_absolutely(trained, monkeypatch):
    root, data, _, _ = trained
    monkeypatch.chdir(root)
    out = root / "rel.pt"
    res = run("train", ARCH, "--width", "4", "--data", f"tensors:{data.name}", "--epochs", "1", "--batch-size", "8",
              "--device", "cpu", "-o", out)
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out)[1].dataset == f"tensors:{data.resolve()}"
