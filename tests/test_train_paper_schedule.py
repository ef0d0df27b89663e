"""`lt train`'s paper options: warm-up + step schedule at milestones (x gamma), translations of
--translate pixels; the learning rate the optimiser used is checked against a hand computation."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors
from landscape_tools.errors import ConfigError
from landscape_tools.training import TrainConfig, _lr_at, train


def paper_lr(epoch: float) -> float:
    """The paper's rate by hand: 0.1, one linear warm-up epoch, x0.2 from epochs 60, 120 and 160."""
    if epoch < 1:
        return 0.1 * (epoch + 1e-3)
    return 0.1 * 0.2 ** ((epoch >= 60) + (epoch >= 120) + (epoch >= 160))


@pytest.mark.parametrize("epoch", [0.0, 0.5, 0.999, 1.0, 30.0, 59.99, 60.0, 61.5, 119.9, 120.0, 159.0, 160.0, 199.9])
def test_paper_schedule_matches_hand_computation(epoch):
    cfg = TrainConfig(epochs=200, lr=0.1, schedule="step", milestones=[60, 120, 160], gamma=0.2, warmup_epochs=1)
    cfg.validate()
    assert _lr_at(cfg, epoch) == pytest.approx(paper_lr(epoch), rel=1e-12)


def test_step_size_schedule_unchanged_without_milestones():
    cfg = TrainConfig(epochs=100, lr=0.1, schedule="step", step_size=30, gamma=0.1, warmup_epochs=0)
    assert [_lr_at(cfg, e) for e in (0, 29.9, 30, 65)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def _data(root, n=12):
    rng = np.random.default_rng(0)
    path = root / "F.npz"
    save_tensors(path, x=rng.normal(size=(n, 3, 8, 8)).astype(np.float32), y=np.arange(n) % 3,
                 x_test=rng.normal(size=(6, 3, 8, 8)).astype(np.float32), y_test=np.arange(6) % 3)
    return path


def test_optimiser_gets_the_scheduled_rate(tmp_path, monkeypatch):
    """Every step's rate, as the optimiser saw it, equals the schedule at (epoch + step / steps)."""
    from landscape_tools.data import load_data
    from landscape_tools.models import build_model

    seen = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    ds = load_data(f"tensors:{_data(tmp_path)}", "train", batch_size=4)
    torch.manual_seed(0)
    model = build_model("resnet_dnn_18", num_classes=3, in_channels=3, width=2)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=0.1, schedule="step", milestones=[2, 3], gamma=0.2,
                      warmup_epochs=1, pad=1)
    result = train(model, ds, None, cfg)
    steps = 3
    expected = []
    for e in range(4):
        for b in range(steps):
            t = e + b / steps
            expected.append(0.1 * (t + 1e-3) if t < 1 else 0.1 * 0.2 ** ((t >= 2) + (t >= 3)))
    assert len(seen) == 12
    for groups, want in zip(seen, expected):
        assert groups == pytest.approx([want, want], rel=1e-12)
    assert [h["lr"] for h in result.history] == pytest.approx([expected[2], expected[5], expected[8], expected[11]])


def test_cli_records_paper_options(tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "m.pt"
    res = CliRunner().invoke(cli, ["train", "resnet_dnn_18", "--width", "2", "--data", f"tensors:{data}",
                                   "--epochs", "3", "--batch-size", "6", "--lr", "0.1", "--schedule", "step",
                                   "--milestones", "1,2", "--gamma", "0.2", "--warmup-epochs", "0",
                                   "--translate", "3", "--flip", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    meta = load_checkpoint(out)[1].meta
    assert meta["train"]["milestones"] == [1, 2] and meta["train"]["gamma"] == 0.2
    assert meta["train"]["pad"] == 3 and meta["train"]["warmup_epochs"] == 0 and meta["train"]["flip"] is True
    # the last step of epochs 1, 2, 3: no warm-up, x0.2 from epoch 1 and again from epoch 2
    assert [h["lr"] for h in meta["history"]] == pytest.approx([0.1, 0.02, 0.004])


@pytest.mark.parametrize("args, words", [
    (["--milestones", "60,120"], "needs --schedule step"),
    (["--schedule", "step", "--milestones", "120,60"], "increasing whole epochs"),
    (["--schedule", "step", "--milestones", "0,2"], "increasing whole epochs"),
    (["--schedule", "step", "--milestones", "2,5"], "milestone 5 is not before the end"),
    (["--schedule", "step", "--milestones", "a,b"], "comma-separated list of whole epochs"),
    (["--gamma", "0"], "--gamma 0.0 must be a positive finite factor"),
    (["--gamma", "nan"], "must be a positive finite factor"),
    (["--warmup-epochs", "-1"], "-1"),
    (["--translate", "-2"], "-2"),
])
def test_cli_refuses_bad_schedule(tmp_path, args, words):
    out = tmp_path / "m.pt"
    res = CliRunner().invoke(cli, ["train", "resnet_dnn_18", "--width", "2", "--data", f"tensors:{_data(tmp_path)}",
                                   "--epochs", "5", "--device", "cpu", "-o", str(out), *args])
    assert res.exit_code != 0
    assert words in res.output
    assert not out.exists()


def test_translate_moves_images_by_at_most_pad_pixels():
    """A single bright pixel ends up within --translate pixels of where it was, every shift occurring."""
    from landscape_tools.training import augment_batch

    x = torch.zeros(400, 1, 12, 12)
    x[:, 0, 6, 6] = 1.0
    out = augment_batch(x, 3, False, torch.Generator().manual_seed(0))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 12 - 6, pos % 12 - 6
    assert out.sum(dim=(1, 2, 3)).eq(1).all()
    assert set(rows.tolist()) == set(range(-3, 4)) and set(cols.tolist()) == set(range(-3, 4))


def test_config_validate_refuses_milestones_beyond_training():
    with pytest.raises(ConfigError, match="not before the end"):
        TrainConfig(epochs=10, schedule="step", milestones=[5, 10]).validate()
    assert _lr_at(TrainConfig(epochs=10, lr=0.05, schedule="step", milestones=[5]), 7.0) == pytest.approx(0.005)
