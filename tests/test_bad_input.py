"""Bad input through the CLI: one `Error:` line naming the value and the fix, exit 1, no traceback,
nothing written; and property-based tests of the option parsers (valid text parses to the right
values, any text raises nothing but the project's error type)."""
import math
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors
from landscape_tools.errors import ConfigError, LTError
from landscape_tools.evaluate import parse_ensemble_sizes
from landscape_tools.featvar import Source, parse_source
from landscape_tools.surface import MAX_AXIS_POINTS, parse_range, parse_shard, shard_points
from landscape_tools.models import build_model

PROPERTY = settings(deadline=None, max_examples=100)


class Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    m = build_model("resnet_mcdo_18", width=4, num_classes=3, in_channels=1)
    save_checkpoint(root / "m.pt", m, "resnet_mcdo_18", m.arch_kwargs, {})
    torch.save(m.state_dict(), root / "bare.pt")
    with torch.no_grad():
        m.get_parameter("layer0.0.weight")[0, 0, 0, 0] = float("nan")
    save_checkpoint(root / "nan.pt", m, "resnet_mcdo_18", m.arch_kwargs, {})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    save_tensors(root / "d.npz", x=x, y=y)
    save_tensors(root / "channels.npz", x=np.repeat(x, 2, axis=1), y=y)
    save_tensors(root / "flat.npz", x=x.reshape(12, 64), y=y)
    save_tensors(root / "labels.npz", x=x, y=np.arange(12))
    save_tensors(root / "negative.npz", x=x, y=-np.ones(12, dtype=np.int64))
    save_tensors(root / "empty.npz", x=x[:0], y=y[:0])
    for name in ("evil_dict.pt", "evil_module.pt"):
        marker = root / (name + ".ran")
        torch.save({"model": Evil(str(marker))} if name == "evil_dict.pt" else Evil(str(marker)), root / name)
    return root


def invoke(root, *args):
    old = os.getcwd()
    os.chdir(root)
    try:
        r = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)
    return r


def error_of(r) -> str:
    """The `Error:` line of a failed command; asserts exit 1, no traceback, one error line."""
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    return errors[0]


DATA = ("--data", "tensors:d.npz")
NAN_ERROR = "Error: nan.pt has NaN or inf weights in layer0.0.weight: the model is broken (diverged training?)"

CASES = {
    "range": (["surface", "m.pt", *DATA, "--x", "-1:1", "-o", "o.h5"],
              "Error: --x '-1:1' is not a range: expected MIN:MAX:NUM, e.g. --x -1:1:21 (MIN < MAX, NUM >= 2 points)"),
    "range-order": (["surface", "m.pt", *DATA, "--dims", "1", "--x", "1:-1:5", "-o", "o.h5"],
                    "Error: --x '1:-1:5' is not a valid range: expected MIN:MAX:NUM, e.g. --x -1:1:21 (MIN < MAX, "
                    "NUM >= 2 points)"),
    "range-huge": (["surface", "m.pt", *DATA, "--y", "0:1:1000000000", "-o", "o.h5"],
                   f"Error: --y '0:1:1000000000' asks for 1000000000 points; at most {MAX_AXIS_POINTS} per axis (each "
                   f"point is a pass over the data): use fewer points, e.g. --y -1:1:51"),
    "range-overflow": (["surface", "m.pt", *DATA, "--x", "-1e308:1e308:5", "-o", "o.h5"],
                       "Error: --x '-1e308:1e308:5': the range is wider than float64 holds; use coordinates of "
                       "reasonable size, e.g. --x -1:1:21"),
    "shard": (["surface", "m.pt", *DATA, "--shard", "4/4", "-o", "o.h5"],
              "Error: --shard '4/4' is not a shard: expected I/N with 0 <= I < N, e.g. --shard 0/4 (shards are "
              "counted from 0, like Slurm array tasks and torch ranks), or --shard slurm in a Slurm job array"),
    "arch": (["surface", "bare.pt", "--arch", "resnet_nope", *DATA, "-o", "o.h5"],
             "Error: unknown architecture 'resnet_nope': expected {resnet,preresnet}_{dnn,mcdo}[_smoothing]_"
             "{18,34,50,101,152}, vgg_{dnn,mcdo}[_smoothing]_{11,13,16,19} or alexnet_{dnn,mcdo}[_smoothing] "
             "(`lt info --zoo` lists them all). Did you mean one of: resnet_dnn_18, resnet_dnn_34, resnet_dnn_50, "
             "resnet_dnn_101?"),
    "channels": (["hessian", "m.pt", "--data", "tensors:channels.npz", "-o", "o.h5"],
                 "Error: data 'tensors:channels.npz' has 2 channels but the model expects 1"),
    "labels": (["surface", "m.pt", "--data", "tensors:labels.npz", "-o", "o.h5"],
               "Error: labels of 'tensors:labels.npz' go up to 11 but m has 3 outputs; use data with labels 0..2 "
               "or a model with num_classes >= 12"),
    "negative-labels": (["evaluate", "m.pt", "--data", "tensors:negative.npz", "--split", "train", "-o", "o.h5"],
                        "Error: data 'tensors:negative.npz' has negative labels (min -1); labels must be 0..C-1"),
    "nan-surface": (["surface", "nan.pt", *DATA, "-o", "o.h5"],
                    NAN_ERROR),
    "nan-hessian": (["hessian", "nan.pt", *DATA, "-o", "o.h5"],
                    NAN_ERROR),
    "empty": (["featvar", "m.pt", "--data", "tensors:empty.npz", "--split", "train", "--mc", "2", "-o", "o.h5"],
              "Error: data 'tensors:empty.npz' (train) is empty: nothing to analyse"),
    "top-k": (["hessian", "m.pt", *DATA, "--top-k", "100000", "-o", "o.h5"],
              "Error: --top-k 100000 is larger than the number of parameters in the Hessian (44319); ask for at "
              "most 44319 eigenvalues, or widen --params"),
    "mc-list": (["evaluate", "m.pt", *DATA, "--split", "train", "--mc", "1,two", "-o", "o.h5"],
                "Error: --mc '1,two': 'two' is not a whole number; give comma-separated ensemble sizes, "
                "e.g. 1,2,5,10,20,50"),
    "source": (["featvar", "m.pt", *DATA, "--split", "train", "--mc", "2", "--source", "noise:-1", "-o", "o.h5"],
               "Error: --source 'noise:-1': expected 'dropout' or 'noise:SIGMA' with SIGMA a positive number "
               "(the std of Gaussian input noise), e.g. noise:0.1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error(f, case):
    args, expected = CASES[case]
    assert error_of(invoke(f, *args)) == expected
    assert not (f / "o.h5").exists() and not (f / "o.h5.partial").exists() and not (f / "o.h5.lock").exists()


def test_non_image_data_for_an_image_model(f):
    line = error_of(invoke(f, "surface", "m.pt", "--data", "tensors:flat.npz", "-o", "o.h5"))
    assert line.startswith("Error: data 'tensors:flat.npz' (inputs of shape (64,)) does not fit m (resnet_mcdo_18): ")
    assert line.endswith(". Use data shaped as the model was trained on")
    assert not (f / "o.h5").exists()


@pytest.mark.parametrize("name", ["evil_dict.pt", "evil_module.pt"])
@pytest.mark.parametrize("command", ["info", "surface"])
def test_pickled_checkpoint_never_runs_code_without_trust_pickle(f, name, command):
    args = ["info", name] if command == "info" else ["surface", name, *DATA, "-o", "o.h5"]
    line = error_of(invoke(f, *args))
    assert line.startswith(f"Error: {name} contains pickled Python objects (a whole model?), and unpickling can run "
                           f"arbitrary code, so it was not loaded. If you trust the file, pass --trust-pickle")
    assert not (f / (name + ".ran")).exists()


# ----------------------------------------------------------------------------- parsers, property-based
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@PROPERTY
@given(lo=finite, width=st.floats(min_value=1e-3, max_value=1e6), num=st.integers(2, 500))
def test_range_parses_to_evenly_spaced_grid(lo, width, num):
    hi = lo + width
    values = parse_range(f"{lo!r}:{hi!r}:{num}", "--x")
    assert values.dtype == np.float64 and values.shape == (num,)
    tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
    assert abs(values[0] - lo) <= tol and abs(values[-1] - hi) <= tol
    np.testing.assert_allclose(np.diff(values), (hi - lo) / (num - 1), rtol=1e-6, atol=tol)
    if lo <= 0 <= hi and np.isclose(values, 0, atol=1e-12 * (hi - lo)).any():
        assert 0.0 in values        # a grid through 0 hits it exactly


@PROPERTY
@given(st.text(alphabet=st.sampled_from("0123456789.:-+eE, /xinfa\t"), max_size=30) | st.text(max_size=30))
def test_range_text_raises_only_config_error(text):
    try:
        values = parse_range(text, "--y")
    except ConfigError as exc:
        assert str(exc).startswith(f"--y {text!r}")
    else:
        assert np.isfinite(values).all() and 1 <= len(values) <= MAX_AXIS_POINTS


@PROPERTY
@given(n=st.integers(1, 10 ** 6), data=st.data())
def test_shard_parses_and_shards_partition_the_points(n, data):
    i = data.draw(st.integers(0, n - 1))
    assert parse_shard(f"{i}/{n}") == (i, n) == parse_shard(f" {i} / {n} ")
    points = data.draw(st.integers(0, 50))
    k = min(n, 6)
    parts = [shard_points(points, j, k) for j in range(k)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(points))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@PROPERTY
@given(st.text(alphabet=st.sampled_from("0123456789/ -+.a"), max_size=12) | st.text(max_size=20))
def test_shard_text_raises_only_config_error(text):
    try:
        i, n = parse_shard(text)
    except ConfigError as exc:
        assert str(exc).startswith(f"--shard {text!r} is not a shard")
    else:
        assert 0 <= i < n


@PROPERTY
@given(st.lists(st.integers(1, 10 ** 6), min_size=1, max_size=10), st.sampled_from([",", ", ", " ,"]))
def test_mc_list_parses_sorted_distinct(sizes, sep):
    assert parse_ensemble_sizes(sep.join(map(str, sizes))) == tuple(sorted(set(sizes)))


@PROPERTY
@given(st.text(alphabet=st.sampled_from("0123456789,- x.²"), max_size=20) | st.text(max_size=20))
def test_mc_list_text_raises_only_config_error(text):
    try:
        sizes = parse_ensemble_sizes(text)
    except ConfigError as exc:
        assert str(exc).startswith("--mc ")
    else:
        assert sizes and all(isinstance(s, int) and s >= 1 for s in sizes) and list(sizes) == sorted(set(sizes))


@PROPERTY
@given(st.floats(min_value=1e-300, max_value=1e300))
def test_source_parses_noise_sigma(sigma):
    assert parse_source(f"noise:{sigma!r}") == Source("noise", sigma)
    assert parse_source("dropout") == Source("dropout") == parse_source(None)


@PROPERTY
@given(st.text(max_size=20).map(lambda s: "noise:" + s) | st.text(max_size=20))
def test_source_text_raises_only_config_error(text):
    try:
        src = parse_source(text)
    except ConfigError as exc:
        assert str(exc).startswith(f"--source {text!r}: expected 'dropout' or 'noise:SIGMA'")
    else:
        assert src.kind == "dropout" or (src.kind == "noise" and math.isfinite(src.sigma) and src.sigma > 0)


def test_parser_errors_are_lt_errors():
    for call in (lambda: parse_range("a"), lambda: parse_shard("1"), lambda: parse_ensemble_sizes(""),
                 lambda: parse_source("noise")):
        with pytest.raises(LTError):
            call()
    assert re.match(r"^--mc '1,²': '²' is not a whole number", _message(lambda: parse_ensemble_sizes("1,²")))


def _message(call) -> str:
    try:
        call()
    except LTError as exc:
        return str(exc)
    raise AssertionError("no error raised")
