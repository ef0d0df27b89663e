"""`lt info`, `lt --help/--version`, and the README covering every command."""
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from landscape_tools import __version__, store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import COMMANDS, cli
from landscape_tools.models import build_model, list_models

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_version_and_help():
    assert run("--version").output.strip() == f"lt, version {__version__}"
    out = run("-h").output
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_example(name):
    result = run(name, "-h")
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"lt {name}" in result.output.split("Example:")[1]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_documented_in_readme(name):
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^#+ .*`lt {name}", readme, re.M), f"README has no section heading for `lt {name}`"
    assert f"lt {name} " in readme


def test_readme_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_zoo_listing():
    names = run("info", "--zoo").output.split()
    assert names == list_models()
    assert "resnet_mcdo_smoothing_18" in names and "alexnet_dnn" in names and "vgg_mcdo_smoothing_19" in names


def test_info_of_checkpoint(tmp_path):
    model = build_model("resnet_mcdo_smoothing_18", width=4, in_channels=1)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "resnet_mcdo_smoothing_18", model.arch_kwargs,
                    {"dataset": "digits", "input_shape": [1, 32, 32], "num_classes": 10,
                     "metrics": {"test": {"accuracy": 0.5, "nll": 1.25, "samples": 450}}, "epochs": 3, "seconds": 2.0})
    out = run("info", str(path)).output
    assert "native checkpoint of resnet_mcdo_smoothing_18" in out
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in out
    assert "spatial smoothing: smooth1, smooth2, smooth3, smooth4" in out
    assert "dataset: digits" in out and "test accuracy 0.5000, NLL 1.2500" in out


def test_info_of_result_file(tmp_path):
    path = tmp_path / "r.h5"
    attrs = store.provenance("hessian", ["lt", "hessian"], {"k": 5}, 3, "cpu")
    store.write_result(path, attrs, {"a": {"attrs": {"arch": "x", "num_params": 7, "checkpoint": "a.pt"},
                                           "data": {"eigenvalues": np.zeros((2, 5))}}})
    out = run("info", str(path)).output
    assert "landscape-tools hessian result (format_version 1)" in out
    assert "model a: x, 7 parameters" in out
    assert "eigenvalues: float64 (2, 5)" in out


def test_info_errors(tmp_path):
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "none.pt")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: checkpoint {tmp_path / 'none.pt'} does not exist"
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 1
    assert "Error: give a result file or checkpoint" in result.output
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    result = CliRunner().invoke(cli, ["info", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {bad} is not a readable HDF5 file")
