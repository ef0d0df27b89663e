"""What the user asked is done or refused, never silently changed: `--samples` or `--batches` larger
than the data is an error naming what exists, and every option is checked before any checkpoint or
data is loaded."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors
from landscape_tools.models import build_model


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code in (1, 2) and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    torch.manual_seed(0)
    model = build_model("resnet_mcdo_18", width=4, num_classes=3, in_channels=1)
    rng = np.random.default_rng(0)
    save_tensors(root / "d.npz", x=rng.normal(size=(12, 1, 8, 8)).astype(np.float32), y=np.arange(12) % 3,
                 x_test=rng.normal(size=(5, 1, 8, 8)).astype(np.float32), y_test=np.arange(5) % 3)
    save_checkpoint(root / "m.pt", model, "resnet_mcdo_18", model.arch_kwargs, {"dataset": f"tensors:{root / 'd.npz'}"})
    return root


@pytest.mark.parametrize("command, split, n", [("hessian", "train", 12), ("surface", "train", 12),
                                                ("featvar", "test", 5), ("evaluate", "test", 5)])
def test_more_samples_than_the_data_has_is_an_error(files, command, split, n):
    out = files / f"{command}.samples.h5"
    res = run(command, files / "m.pt", "--samples", "100", "-o", out)
    assert res.exit_code == 1
    assert error_line(res) == (f"Error: --samples 100 asks for more samples than the {split} split of "
                               f"tensors:{files / 'd.npz'} has ({n}); use --samples {n} or --samples all")
    assert not out.exists() and not store.partial_path(out).exists()


def test_samples_all_and_exactly_all_use_every_sample(files):
    for value in ("all", "ALL", "5"):
        out = files / f"eval.{value}.h5"
        res = run("evaluate", files / "m.pt", "--mc", "1", "--samples", value, "-o", out)
        assert res.exit_code == 0, res.output
        node = store.read_result(out).models["m"]
        assert node.attrs["num_samples"] == 5 and "sample_indices" not in node.data


def test_more_batches_than_the_data_make_is_an_error(files):
    out = files / "batches.h5"
    res = run("hessian", files / "m.pt", "--batch-size", "8", "--batches", "50", "--top-k", "1", "-o", out)
    assert res.exit_code == 1
    assert error_line(res) == (f"Error: --batches 50 asks for more batches than there are: the 12 samples of the "
                               f"train split of tensors:{files / 'd.npz'} make 2 batch(es) of --batch-size 8; "
                               f"use --batches 2 or --batches all")
    assert not out.exists() and not store.partial_path(out).exists()
    res = run("hessian", files / "m.pt", "--samples", "6", "--batch-size", "4", "--batches", "3", "--top-k", "1",
              "-o", out)
    assert "the 6 samples of the train split" in error_line(res) and "make 2 batch(es) of --batch-size 4" in res.output
    res = run("hessian", files / "m.pt", "--batch-size", "8", "--batches", "all", "--top-k", "1", "--tol", "1e-2",
              "-o", out)
    assert res.exit_code == 0, res.output
    assert list(store.read_result(out).models["m"]["batch_sizes"]) == [8, 4]


# (arguments after the command, text the `Error:` line must hold): each names the option and the bad value
EARLY = {
    "hessian-top-k": (["hessian", "--top-k", "0"], "'--top-k': 0 is not in the range x>=1 (the number of "
                                                   "eigenvalues per Hessian, e.g. --top-k 5)."),
    "hessian-tol": (["hessian", "--tol", "0"], "'--tol': 0.0 is not in the range x>0"),
    "hessian-tol-nan": (["hessian", "--tol", "nan"], "'--tol': 'nan' is not a finite number"),
    "hessian-max-iter": (["hessian", "--max-iter", "0"], "'--max-iter': 0 is not in the range x>=1"),
    "hessian-weight-decay": (["hessian", "--weight-decay", "-1"], "'--weight-decay': -1.0 is not in the range x>=0"),
    "hessian-trace-probes": (["hessian", "--trace", "--trace-probes", "2"],
                             "'--trace-probes': 2 is not in the range x>=3 (Hutch++ splits the probes in three"),
    "hessian-density-runs": (["hessian", "--density-runs", "0"], "'--density-runs': 0 is not in the range x>=1"),
    "hessian-density-steps": (["hessian", "--density-steps", "1"], "'--density-steps': 1 is not in the range x>=2"),
    "hessian-which": (["hessian", "--which", "XX"], "--which 'XX' is not one of LM, LA, SA"),
    "hessian-method": (["hessian", "--method", "newton"], "--method 'newton' is not one of"),
    "hessian-scope": (["hessian", "--scope", "all"], "--scope 'all' is not one of"),
    "hessian-sub-batch": (["hessian", "--sub-batch", "0"], "--sub-batch '0' is not a positive number"),
    "hessian-batches": (["hessian", "--batches", "0"], "'--batches': '0' is not a whole number >= 1 or 'all'"),
    "hessian-plot": (["hessian", "--plot", "fig.jpg"], "figure fig.jpg must end in .png, .pdf, .svg"),
    "samples": (["evaluate", "--samples", "some"], "'--samples': 'some' is not a whole number >= 1 or 'all'"),
    "samples-zero": (["surface", "--samples", "0"], "'--samples': '0' is not a whole number >= 1 or 'all'"),
    "surface-x": (["surface", "--x", "1:-1:5"], "--x '1:-1:5' is not a valid range"),
    "surface-shard": (["surface", "--shard", "2/2"], "--shard '2/2' is not a shard"),
    "surface-mc": (["surface", "--mc", "-1"], "'--mc': -1 is not in the range x>=0"),
    "surface-to": (["surface", "--to", "nowhere.pt"], "--to nowhere.pt does not exist; give a checkpoint"),
    "surface-pca": (["surface", "--pca", "run/epoch_*.pt"], "--pca 'run/epoch_*.pt' matches no checkpoint"),
    "surface-directions": (["surface", "--directions", "none.h5"], "--directions none.h5 does not exist"),
    "featvar-mc": (["featvar", "--mc", "1"], "'--mc': 1 is not in the range x>=2"),
    "featvar-source": (["featvar", "--source", "noise:0"], "--source 'noise:0': expected 'dropout' or 'noise:SIGMA'"),
    "featvar-over": (["featvar", "--over", "spatial", "--mc", "4"], "--mc and --source apply to --over mc only"),
    "evaluate-mc": (["evaluate", "--mc", "1,0"], "--mc '1,0'"),
    "evaluate-plot": (["evaluate", "--plot", "fig.gif"], "figure fig.gif must end in .png, .pdf, .svg"),
}


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Any checkpoint or data loading fails the test."""
    import landscape_tools.checkpoints
    import landscape_tools.data

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint or data set was loaded before the options were checked")
    monkeypatch.setattr(landscape_tools.checkpoints, "load_checkpoint", refuse)
    monkeypatch.setattr(landscape_tools.data, "load_data", refuse)


@pytest.mark.parametrize("case", sorted(EARLY))
def test_options_are_checked_before_anything_is_loaded(tmp_path, monkeypatch, nothing_loaded, case):
    """A checkpoint that does not exist: the error is about the option, and no loader ran."""
    args, expected = EARLY[case]
    monkeypatch.chdir(tmp_path)
    res = run(args[0], "missing.pt", *args[1:])
    line = error_line(res)
    assert expected in line, line
    assert "missing.pt" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expected", [
    (["--lr", "0"], "--lr 0.0 must be a positive finite number"),
    (["--lr", "nan"], "--lr nan must be a positive finite number"),
    (["--lr", "inf"], "--lr inf must be a positive finite number"),
    (["--weight-decay", "nan"], "--weight-decay nan must be a finite number >= 0"),
    (["--momentum", "1"], "--momentum 1.0 must be in [0, 1)"),
    (["--tau", "0"], "'--tau': 0.0 is not in the range x>0"),
    (["--blur-filter", "1,x"], "'1,x' is not a comma-separated list of numbers"),
    (["--samples", "0"], "'--samples': '0' is not a whole number >= 1 or 'all'"),
])
def test_train_options_are_checked_before_the_data_is_read(tmp_path, monkeypatch, nothing_loaded, args, expected):
    monkeypatch.chdir(tmp_path)
    line = error_line(run("train", "resnet_mcdo_18", *args, "-o", "m.pt"))
    assert expected in line, line
    assert list(tmp_path.iterdir()) == []


def test_train_more_samples_than_the_data_has(tmp_path):
    line = error_line(run("train", "resnet_mcdo_18", "--samples", "5000", "-o", tmp_path / "m.pt"))
    assert line == ("Error: --samples 5000 asks for more samples than the train split of digits has (1347); "
                    "use --samples 1347 or --samples all")
    assert list(tmp_path.iterdir()) == []
