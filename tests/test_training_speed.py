"""`lt train` without per-step host syncs and with batched crops (issue #18 item 9): the same numbers as
the loop it replaced, read back once per epoch, divergence still caught."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from landscape_tools.data import DataSet
from landscape_tools.errors import NumericalError
from landscape_tools.training import TrainConfig, augment_batch, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402  (the old loop, kept there for the side-by-side benchmark)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(3 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _data(n=40):
    g = torch.Generator().manual_seed(2)
    return DataSet(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g), "tensors:t", "train", 3)


def _config(**kw):
    return TrainConfig(**dict(dict(epochs=2, batch_size=16, lr=0.05, flip=True, pad=2, seed=4, warmup_epochs=1), **kw))


@pytest.mark.parametrize("flip,pad", [(True, 2), (False, 1), (True, 0)])
def test_batched_crops_equal_the_per_sample_crops(flip, pad):
    x = torch.randn(9, 2, 5, 7)
    new = augment_batch(x, pad, flip, torch.Generator().manual_seed(5))
    old = bench_train.old_augment_batch(x, pad, flip, torch.Generator().manual_seed(5))
    assert torch.equal(new, old)
    assert augment_batch(torch.randn(4, 3), 2, True, torch.Generator()).shape == (4, 3)   # not images: as is


def test_crop_offsets_cover_every_translation_uniformly():
    """Offsets 0..2*pad in each axis, uniform: every one of the 25 translations of pad 2 shows up."""
    x = torch.zeros(2000, 1, 3, 3)
    x[:, :, 1, 1] = 1.0                      # a single lit pixel: its position after the crop is the offset
    out = augment_batch(x, 2, False, torch.Generator().manual_seed(0))
    seen = out.flatten(1).argmax(1)[out.flatten(1).amax(1) > 0]
    assert len(seen) > 2000 * 9 / 25 * 0.8   # lit pixel stays inside for 9 of 25 offsets
    counts = torch.bincount(seen, minlength=9).float()
    assert counts.min() > 0.7 * counts.mean()


def test_train_gives_the_old_loops_numbers():
    cfg = _config()
    old_model, new_model = Small(), Small()
    history = bench_train.old_train(old_model, _data(), cfg)
    result = train(new_model, _data(), None, cfg)
    assert [h["accuracy"] for h in result.history] == [h["accuracy"] for h in history]
    assert [h["lr"] for h in result.history] == [h["lr"] for h in history]
    for a, b in zip(result.history, history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    for p, q in zip(new_model.state_dict().values(), old_model.state_dict().values()):
        assert torch.equal(p, q)


def test_train_is_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        model = Small()
        runs.append((train(model, _data(), _data(12), _config()), model.state_dict()))
    assert runs[0][0].history == runs[1][0].history and runs[0][0].test == runs[1][0].test
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__format__", "numpy")


def _count_reads(monkeypatch):
    counter = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


@pytest.mark.parametrize("flip", [True, False])
def test_tensor_reads_per_epoch_not_per_step(monkeypatch, flip):
    """Reading a device tensor on the host waits for the device; a step must not (the old loop read
    three values per step and cut the crops one sample at a time from offsets read back as lists)."""
    counter = _count_reads(monkeypatch)
    reads = {}
    for batch_size in (20, 5):                      # 2 and 8 steps per epoch
        counter["n"] = 0
        train(Small(), _data(), None, _config(batch_size=batch_size, flip=flip))
        reads[batch_size] = counter["n"]
    assert reads[20] == reads[5] <= 2 * 2, reads    # at most two per epoch, whatever the number of steps


class Diverging(Small):
    """Returns NaN logits from the ``bad``-th call on."""

    def __init__(self, bad):
        super().__init__()
        self.calls, self.bad = 0, bad

    def forward(self, x):
        self.calls += 1
        out = super().forward(x)
        return out * float("nan") if self.calls >= self.bad else out


def test_divergence_is_reported_with_its_epoch_and_step():
    with pytest.raises(NumericalError, match=r"training diverged in epoch 2 \(the loss was not finite from step 2 "
                                             r"of 3 on\); lower --lr \(now 0\.05\)"):
        train(Diverging(bad=5), _data(), None, _config())      # 3 steps per epoch: call 5 is step 2 of epoch 2


def test_cli_train_out_of_memory_is_one_error_line(tmp_path, monkeypatch):
    """An injected CUDA out-of-memory error in `lt train` ends in one `Error:` line naming --batch-size."""
    import numpy as np
    from click.testing import CliRunner

    import landscape_tools.training as T
    from landscape_tools.cli.main import cli
    from landscape_tools.data import save_tensors

    rng = np.random.default_rng(0)
    save_tensors(tmp_path / "d.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32),
                 y=(np.arange(8) % 3).astype(np.int64))

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.7 GiB total)\nmore")

    monkeypatch.setattr(T, "train", oom)
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(cli, ["train", "resnet_dnn_18", "--width", "2", "--data", f"tensors:{tmp_path / 'd.npz'}",
                                      "--epochs", "1", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert ("Error: lt train ran out of memory on cpu (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.7 "
            "GiB total)); lower the peak with a smaller --batch-size") in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_out_of_memory_messages_name_each_commands_knob():
    from landscape_tools.device import is_out_of_memory, out_of_memory_error
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x")) and is_out_of_memory(RuntimeError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))
    exc = RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
    assert "--sub-batch N (pieces of each batch processed in turn; the same Hessian)" in str(out_of_memory_error(exc, "hessian"))
    assert "a smaller --max-batch" in str(out_of_memory_error(exc, "featvar", "cuda:0"))
    assert "on cuda:0 (CUDA out of memory. Tried to allocate 1.00 GiB)" in str(out_of_memory_error(exc, "featvar", "cuda:0"))
    assert "--batch-size" in str(out_of_memory_error(exc, "surface")) and "--batch-size" in str(out_of_memory_error(exc))


def test_progress_once_per_step_with_the_epochs_figures_at_its_end():
    calls = []
    train(Small(), _data(), None, _config(), progress=lambda done, total, msg: calls.append((done, total, msg)))
    assert [c[0] for c in calls] == list(range(1, 7)) and all(c[1] == 6 for c in calls)
    assert calls[0][2] == "epoch 1/2" and calls[3][2].startswith("epoch 2/2 (epoch 1: loss ")
    assert calls[2][2].startswith("epoch 1/2 (epoch 1: loss ") and " acc " in calls[5][2]


def test_every_command_turns_out_of_memory_into_one_error_line(tmp_path, monkeypatch):
    """The lt group catches an out-of-memory error of any command (here lt hessian, injected into the
    solver) and prints one `Error:` line naming that command's knob, no traceback."""
    from click.testing import CliRunner

    import landscape_tools.hessian as H
    from landscape_tools.cli.main import cli
    from tiny_files import tiny_checkpoint_and_data

    _, ckpt, data = tiny_checkpoint_and_data(tmp_path)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(H, "top_eigenvalues", oom)     # the library call, and the rows of lt hessian's run:
    monkeypatch.setattr(H, "_row_solver", oom)
    result = CliRunner().invoke(cli, ["hessian", str(ckpt), "--data", data, "--batches", "1", "--batch-size", "4",
                                      "--top-k", "1", "-o", str(tmp_path / "h.h5")])
    assert result.exit_code == 1, result.output
    assert "Error: lt hessian ran out of memory" in result.output and "--sub-batch" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "h.h5").exists()
