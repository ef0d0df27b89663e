"""Checkpoint loading: every supported kind, strict keys, the pickle guard, damaged files."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from landscape_tools.checkpoints import NATIVE_FORMAT, file_sha256, load_checkpoint, save_checkpoint
from landscape_tools.errors import CheckpointError
from landscape_tools.models import build_model

ARCH = "resnet_mcdo_smoothing_18"


class TinyNet(nn.Module):
    """A user module pickled whole (importable from this test module)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x).tanh()


class PlantedPickle:
    """Unpickling this object opens (creates) ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _zoo(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"num_classes": 3, "width": 4, **kwargs}
    model = build_model(ARCH, **kwargs).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a reload that forgot buffers would show
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn_like(buf))
            elif name.endswith("running_var"):
                buf.copy_(1 + 0.5 * torch.rand_like(buf))
    return model


def _x(channels=3):
    return torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(5))


def _outputs_equal(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    from landscape_tools.models import mc_dropout
    with torch.no_grad(), mc_dropout(a, False), mc_dropout(b, False):
        return torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------- native
def test_native_round_trip(tmp_path):
    model = _zoo(in_channels=1)
    path = tmp_path / "model.pt"
    meta = {"dataset": "digits", "metrics": {"test": {"accuracy": 0.5}}, "history": [{"epoch": 1}]}
    assert save_checkpoint(path, model, ARCH, model.arch_kwargs, meta) == path
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    assert info.kind == "native" and info.arch == ARCH and info.label == "model"
    assert info.meta == meta and info.dataset == "digits"
    assert info.arch_kwargs == model.arch_kwargs and info.arch_kwargs["in_channels"] == 1
    assert info.sha256 == file_sha256(path) and len(info.sha256) == 64
    assert info.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info.describe() == {"checkpoint": str(path), "checkpoint_sha256": info.sha256, "arch": ARCH,
                               "num_params": info.num_params, "checkpoint_kind": "native",
                               "arch_kwargs": model.arch_kwargs}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert _outputs_equal(model, loaded, _x(1))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == NATIVE_FORMAT and raw["version"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    _, named = load_checkpoint(path, label="smooth")
    assert named.label == "smooth"


def test_native_refuses_overwrite_and_unknown_arch(tmp_path):
    model = _zoo()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, ARCH, model.arch_kwargs, {"dataset": "digits"})
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, _zoo(seed=1), ARCH, model.arch_kwargs)
    assert str(err.value) == f"{path} already exists; pass --overwrite to replace it or choose another -o"
    assert path.read_bytes() == before
    other = _zoo(seed=1)
    save_checkpoint(path, other, ARCH, other.arch_kwargs, overwrite=True)
    assert _outputs_equal(other, load_checkpoint(path)[0], _x())
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet_dnn_7'"):
        save_checkpoint(tmp_path / "n.pt", model, "resnet_dnn_7", {})
    assert not (tmp_path / "n.pt").exists()


def test_native_newer_version_refused(tmp_path):
    model = _zoo()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, ARCH, model.arch_kwargs)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 2
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="is a version 2 landscape-tools checkpoint; this version reads 1"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- reference and bare state_dicts
def test_reference_name_state_dict(tmp_path):
    model = _zoo(width=8, num_classes=5)
    path = tmp_path / "ref.pt"
    torch.save({"name": ARCH, "state_dict": model.state_dict()}, path)
    loaded, info = load_checkpoint(path)
    assert info.kind == "reference" and info.arch == ARCH
    assert info.arch_kwargs["width"] == 8 and info.arch_kwargs["num_classes"] == 5  # inferred from the weights
    assert info.meta == {} and info.dataset is None
    assert _outputs_equal(model, loaded, _x())


def test_bare_state_dict_needs_arch(tmp_path):
    model = _zoo()
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    n = len(model.state_dict())
    assert str(err.value).startswith(f"{path} is a bare state_dict ({n} tensors) that does not say which architecture")
    assert "pass --arch NAME" in str(err.value) and "--model torchvision:NAME" in str(err.value)
    loaded, info = load_checkpoint(path, arch=ARCH)
    assert info.kind == "state_dict" and info.arch == ARCH
    assert _outputs_equal(model, loaded, _x())
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet_foo'"):
        load_checkpoint(path, arch="resnet_foo")


def test_bare_state_dict_user_factory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import lt_user_models
    torch.manual_seed(0)
    model = lt_user_models.tiny_mlp(hidden=5, num_classes=3)
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    loaded, info = load_checkpoint(path, model="lt_user_models:tiny_mlp", arch_kwargs={"hidden": 5, "num_classes": 3})
    assert info.kind == "state_dict" and info.arch == "lt_user_models:tiny_mlp"
    assert info.num_params == 4 * 5 + 5 + 5 * 3 + 3
    x = torch.randn(6, 4)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="lt_user_models has no callable 'nope'"):
        load_checkpoint(path, model="lt_user_models:nope")
    with pytest.raises(CheckpointError, match="returned a int, not a torch.nn.Module"):
        load_checkpoint(path, model="lt_user_models:not_a_module")
    with pytest.raises(CheckpointError, match="cannot import 'no_such_module_xyz'"):
        load_checkpoint(path, model="no_such_module_xyz:f")
    with pytest.raises(CheckpointError, match="expected pkg.module:factory or torchvision:NAME"):
        load_checkpoint(path, model="lt_user_models")


def test_key_errors_listed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import lt_user_models
    state = lt_user_models.tiny_mlp().state_dict()
    del state["2.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["0.weight"] = torch.zeros(3, 5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model="lt_user_models:tiny_mlp")
    assert str(err.value) == (
        "the state_dict does not fit lt_user_models:tiny_mlp: missing: 2.bias; unexpected: extra.weight; "
        "mismatched shapes: 0.weight (checkpoint (3, 5), model (3, 4)). "
        "Check --arch / --model and its options (num_classes, width, in_channels)")


def test_zoo_width_mismatch_listed(tmp_path):
    model = _zoo(width=4)
    path = tmp_path / "w4.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch=ARCH, arch_kwargs={"width": 8})
    msg = str(err.value)
    assert msg.startswith(f"the state_dict does not fit {ARCH}: mismatched shapes: layer0.0.weight "
                          f"(checkpoint (4, 3, 3, 3), model (8, 3, 3, 3))")
    assert "in all)" in msg  # many shapes differ: the list is cut and counted


def test_torchvision_num_classes_inferred(tmp_path):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    path = tmp_path / "tv.pt"
    torch.save(model.state_dict(), path)
    loaded, info = load_checkpoint(path, model="torchvision:resnet18")
    assert info.kind == "state_dict" and info.arch == "torchvision:resnet18"
    assert loaded.fc.out_features == 7
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_torchscript(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.randn(4, 3)
    for how, obj in (("script", torch.jit.script(net)), ("trace", torch.jit.trace(net, x))):
        path = tmp_path / f"{how}.pt"
        obj.save(str(path))
        loaded, info = load_checkpoint(path)
        assert info.kind == "torchscript" and info.arch == "torchscript"
        assert info.num_params == 3 * 2 + 2
        assert torch.equal(loaded(x), net(x))


# ----------------------------------------------------------------------------- whole pickled modules
def test_pickled_module_needs_trust(tmp_path):
    torch.manual_seed(0)
    net = TinyNet()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} contains pickled Python objects (a whole model?), and unpickling can run "
                          f"arbitrary code, so it was not loaded. If you trust the file, pass --trust-pickle")
    loaded, info = load_checkpoint(path, trust_pickle=True)
    assert info.kind == "pickle" and info.arch == "TinyNet"
    assert not loaded.training
    x = torch.randn(3, 3)
    assert torch.equal(loaded(x), net(x))


def test_refusal_unpickles_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": PlantedPickle(marker)}, path)
    with pytest.raises(CheckpointError, match="contains pickled Python objects"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="contains pickled Python objects"):
        load_checkpoint(path, arch=ARCH)
    assert not marker.exists()
    # the planted file is live: trusting it runs its code (then it is no checkpoint anyway)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, trust_pickle=True)
    assert marker.exists()


# ----------------------------------------------------------------------------- damaged files
def test_truncated_and_text_files(tmp_path):
    model = _zoo()
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, ARCH, model.arch_kwargs)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(truncated)
    assert str(err.value).startswith(f"{truncated} is not a readable PyTorch checkpoint (truncated or another kind "
                                     f"of file?): ")
    for i, text in enumerate(["hello world\n", '{"arch": "resnet"}\n', "# notes\n", "x" * 64]):
        path = tmp_path / f"text{i}.pt"
        path.write_text(text)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, arch=ARCH)
        assert str(err.value) == (f"{path} is not a PyTorch checkpoint: neither a torch.save zip archive nor a "
                                  f"pickle (a text file, or another kind of file?)")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {empty} is empty")):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {tmp_path / 'no.pt'} does not exist")):
        load_checkpoint(tmp_path / "no.pt")
    with pytest.raises(CheckpointError, match=re.escape("(it is a folder)")):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint_object(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint"):
        load_checkpoint(path)
    path = tmp_path / "dict.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="is a dict with keys epoch, lr, not a state_dict"):
        load_checkpoint(path)


def test_nan_weights_refused(tmp_path):
    model = _zoo()
    with torch.no_grad():
        model.layer0[0].weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model, ARCH, model.arch_kwargs)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    name = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert str(err.value) == (f"{path} has NaN or inf weights in {', '.join(name)}: the model is broken "
                              f"(diverged training?)")
    loaded, _ = load_checkpoint(path, check_finite=False)
    assert torch.isnan(loaded.state_dict()[name[0]]).any()
