"""The short command lines work as written: `lt hessian model.pt`, `lt surface model.pt --dims 2`,
`lt featvar model.pt` and `lt evaluate model.pt`, with no other option, on a checkpoint written by
`lt train`, write `model.<command>.h5` in the working folder; the same call again is refused (the
result exists) or resumes a partial result."""
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MC-dropout ResNet trained by `lt train` on a 16-sample tensors file (it records the data)."""
    root = tmp_path_factory.mktemp("defaults")
    rng = np.random.default_rng(0)
    data = root / "data.npz"
    save_tensors(data, x=rng.normal(size=(16, 1, 12, 12)).astype(np.float32), y=np.arange(16) % 3,
                 x_test=rng.normal(size=(8, 1, 12, 12)).astype(np.float32), y_test=np.arange(8) % 3)
    res = run("train", "resnet_mcdo_18", "--width", "4", "--data", f"tensors:{data}", "--epochs", "1",
              "--batch-size", "8", "--device", "cpu", "-o", root / "model.pt")
    assert res.exit_code == 0, res.output
    return root


SHORT = {"hessian": ["hessian", "model.pt"],
         "surface": ["surface", "model.pt", "--dims", "2"],
         "featvar": ["featvar", "model.pt"],
         "evaluate": ["evaluate", "model.pt"]}


@pytest.mark.parametrize("command", sorted(SHORT))
def test_short_command_line_writes_default_output_then_refuses(trained, monkeypatch, command):
    work = trained / command          # each command in its own working folder
    work.mkdir()
    (work / "model.pt").symlink_to(trained / "model.pt")
    monkeypatch.chdir(work)
    out = work / f"model.{command}.h5"
    first = run(*SHORT[command])
    assert first.exit_code == 0, first.output
    assert f"lt {command}: writing model.{command}.h5 (-o chooses another file)" in first.stderr
    assert out.is_file() and not store.partial_path(out).exists()
    assert store.read_result(out).kind == command
    assert sorted(p.name for p in work.iterdir()) == sorted(["model.pt", out.name])
    before = out.read_bytes()
    again = run(*SHORT[command])
    assert again.exit_code == 1
    assert again.output == (f"Error: model.{command}.h5 already exists; pass --overwrite to replace it or "
                            f"choose another -o\n")
    assert out.read_bytes() == before


def test_short_command_line_resumes_a_partial_result(trained, monkeypatch):
    """A partial `model.hessian.h5.partial` is continued, not recomputed: a value planted in its
    finished row comes out in the final file."""
    work = trained / "resume"
    work.mkdir()
    (work / "model.pt").symlink_to(trained / "model.pt")
    monkeypatch.chdir(work)
    first = run("hessian", "model.pt")
    assert first.exit_code == 0, first.output
    out = work / "model.hessian.h5"
    out.rename(store.partial_path(out))
    with h5py.File(store.partial_path(out), "r+") as f:
        f["model/eigenvalues"][0, 0] = 123.0
    again = run("hessian", "model.pt")
    assert again.exit_code == 0, again.output
    assert "lt hessian: writing model.hessian.h5" in again.stderr
    assert not store.partial_path(out).exists()
    assert store.read_result(out).models["model"]["eigenvalues"][0, 0] == 123.0


def test_o_still_chooses_and_merge_still_needs_it(trained, monkeypatch):
    monkeypatch.chdir(trained)
    res = run("evaluate", "model.pt", "--mc", "1,2", "-o", "chosen.h5")
    assert res.exit_code == 0, res.output
    assert "writing" not in res.stderr and (trained / "chosen.h5").is_file()
    assert not (trained / "model.evaluate.h5").exists()
    res = run("merge", "chosen.h5")
    assert res.exit_code == 2 and "Missing option '-o' / '--output'" in res.output
