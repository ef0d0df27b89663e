"""SIGTERM (what Slurm sends at a time limit or a preemption) mid-run: exit status 143, the lock
released, the `.partial` file kept, and the same command run again finishes with the numbers an
uninterrupted run gives.  Real `lt` subprocesses with tiny models."""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.cli.main import cli
from tiny_files import tiny_checkpoint_and_data

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """`lt surface` on a 13 x 13 grid of the tiny zoo model (seconds of work), `lt hessian --scope
    batch` on 40 batches of a 23-parameter MLP, `lt featvar` on 30 batches of 4 samples of the tiny
    model and `lt evaluate` on 60 batches of 2 samples of a tiny MC-dropout model (8 MC samples,
    one pass each: --max-batch 2); each with its uninterrupted reference result."""
    import lt_user_models
    import torch
    from landscape_tools.data import save_tensors

    root = tmp_path_factory.mktemp("sigterm")
    _, model, data = tiny_checkpoint_and_data(root)
    (root / "fv").mkdir()
    _, _, fv_data = tiny_checkpoint_and_data(root / "fv", n=120)        # the same model, 120 samples
    (root / "ev").mkdir()
    _, mcdo, ev_data = tiny_checkpoint_and_data(root / "ev", arch="resnet_mcdo_18", n=120)
    torch.manual_seed(0)
    torch.save(lt_user_models.tiny_mlp().state_dict(), root / "mlp.pt")
    rng = np.random.default_rng(0)
    save_tensors(root / "mlp.npz", x=rng.normal(size=(80, 4)).astype(np.float32), y=rng.integers(0, 2, 80))
    cmds = {
        "surface": (["surface", str(model), "--data", data, "--batch-size", "5", "--x", "-1:1:13", "--y", "-1:1:13",
                     "--device", "cpu"], "m/done", 169),
        "hessian": (["hessian", str(root / "mlp.pt"), "--model", "lt_user_models:tiny_mlp", "--data",
                     f"tensors:{root / 'mlp.npz'}", "--batch-size", "2", "--top-k", "2", "--scope", "batch",
                     "--device", "cpu"], "mlp/done", 40),
        "featvar": (["featvar", str(model), "--data", fv_data, "--split", "train", "--batch-size", "4", "--mc", "4",
                     "--source", "noise:0.1", "--device", "cpu"], "m/sums/done", 30),
        "evaluate": (["evaluate", str(mcdo), "--data", ev_data, "--split", "train", "--batch-size", "2", "--mc", "1,8",
                      "--max-batch", "2", "--seed", "3", "--device", "cpu"], "m/units/done", 60),
    }
    refs = {}
    for name, (args, _, _) in cmds.items():
        r = CliRunner().invoke(cli, [*args, "-o", str(root / f"ref_{name}.h5")], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        refs[name] = store.read_result(root / f"ref_{name}.h5")
    return {"root": root, "cmds": cmds, "refs": refs}


def done_units(partial, flags) -> int:
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f[flags][()].sum())
    except Exception:
        return 0


TIMED = {"compile_note"}      # says how long the eager passes took: differs between any two runs


def assert_same_node(a, b, where=""):
    assert {k: v for k, v in a.attrs.items() if k not in TIMED} == \
        {k: v for k, v in b.attrs.items() if k not in TIMED}, where
    assert set(a.data) == set(b.data) and set(a.groups) == set(b.groups), where
    for name, value in b.data.items():
        np.testing.assert_array_equal(a.data[name], value, err_msg=where + name)
    for name, group in b.groups.items():
        assert_same_node(a.groups[name], group, where + name + "/")


@pytest.mark.parametrize("name", ["surface", "hessian", "featvar", "evaluate"])
def test_sigterm_mid_run_exits_143_and_the_rerun_equals_an_uninterrupted_run(commands, name):
    root = commands["root"]
    args, flags, n_units = commands["cmds"][name]
    out = root / f"term_{name}.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "landscape_tools.cli.main", *args, "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while done_units(store.partial_path(out), flags) == 0:
        assert proc.poll() is None, "ended before any progress was seen: " + proc.stderr.read()
        assert time.monotonic() < end, "no progress within a minute"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Error: terminated (SIGTERM). No half-written result file is left" in err
    assert err.count("Traceback") == err.count("Exception ignored in")   # no traceback but a dropped signal's
    left = sorted(p.name for p in root.iterdir() if f"term_{name}" in p.name or p.name.startswith(".lt-lock"))
    assert left == [f"term_{name}.h5.partial"]                       # no lock, no result, progress kept
    kept = done_units(store.partial_path(out), flags)
    assert 0 < kept < n_units

    r = CliRunner().invoke(cli, [*args, "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert not store.partial_path(out).exists() and not (root / f"term_{name}.h5.lock").exists()
    got, ref = store.read_result(out), commands["refs"][name]
    assert got.attrs["fingerprint"] == ref.attrs["fingerprint"] and set(got.models) == set(ref.models)
    for label in ref.models:
        assert_same_node(got.models[label], ref.models[label], label + "/")
