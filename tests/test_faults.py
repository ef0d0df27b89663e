"""Faults a real run meets: SIGKILL and Ctrl-C mid-run, two writers of one output, damaged result
files, a full disk.  A real `lt surface` subprocess is interrupted, then the same command is run
again and must give the file an uninterrupted run gives."""
import errno
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

GRID = ("--x", "-1:1:15", "--y", "-1:1:15")      # 225 points: seconds of work, flushed every 64 points
N_POINTS = 15 * 15


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    _, model, data = tiny_checkpoint_and_data(root)
    args = ["surface", str(model), "--data", data, "--batch-size", "5", *GRID,
            "--device", "cpu"]
    files = {"root": root, "args": args}
    ref = root / "ref.h5"
    assert run(files, ref).exit_code == 0
    files["ref"] = store.read_result(ref).models["m"]
    return files


def run(files, out, *extra):
    return CliRunner().invoke(cli, [*files["args"], "-o", str(out), *extra], catch_exceptions=False)


def _ctrl_c_as_in_a_terminal():
    """In the child, before exec: SIGINT back to its default, so the lt started here takes Ctrl-C as it
    does from a terminal.  A test run started in the background by a non-interactive shell
    (`make test &`) inherits SIGINT ignored, and lt rightly keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(files, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.Popen([sys.executable, "-m", "landscape_tools.cli.main", *files["args"], "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def done_points(partial) -> int:
    """Points flagged done in a partial file another process is writing (0 while unreadable)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f["m/done"][()].sum())
    except Exception:
        return 0


def stopped_mid_run(launch, out, count, total, attempts=3):
    """Start a run with ``launch()`` and SIGSTOP it while it is part-way: progress in its partial file
    (``count(partial) > 0``) and not yet finished.  A run that finished before the stop landed (a fast
    machine, or a poll delayed by a busy one) is a matter of timing, not of lt: it is started again
    from scratch, up to ``attempts`` times.  Returns the stopped process."""
    partial = store.partial_path(out)
    for _ in range(attempts):
        proc = launch()
        end = time.monotonic() + 60.0
        while count(partial) == 0:
            assert proc.poll() is None, "the command ended before any progress was seen: " + proc.stderr.read()
            assert time.monotonic() < end, "no progress written within the timeout"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        if proc.poll() is None and 0 < count(partial) < total:
            return proc
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.communicate()
        for path in (str(out), str(partial), f"{out}.lock"):
            if os.path.exists(path):
                os.remove(path)
    pytest.fail(f"the run finished before it could be stopped part-way, {attempts} times")


def interrupt(proc, lock, attempts=20):
    """Wait for a Ctrl-C'ed process to end, pressing Ctrl-C again if it was lost; returns (stdout, stderr).

    CPython drops a KeyboardInterrupt that lands inside a weakref callback or ``__del__`` ("Exception
    ignored in ..."): one Ctrl-C then does nothing and, like a user, we press again, but only while
    the run still holds its ``lock`` half a second later (a run that took the interrupt releases it at
    once, so the second Ctrl-C never lands in its clean-up)."""
    for _ in range(attempts):
        try:
            return proc.communicate(timeout=0.5)
        except subprocess.TimeoutExpired:
            if lock.exists():
                proc.send_signal(signal.SIGINT)
    proc.kill()
    pytest.fail("lt surface did not stop on Ctrl-C")


def assert_equals_reference(files, out):
    node = store.read_result(out).models["m"]
    assert node.data["done"].all()
    np.testing.assert_array_equal(node.data["accuracy"], files["ref"].data["accuracy"])
    np.testing.assert_allclose(node.data["loss"], files["ref"].data["loss"], rtol=1e-7, atol=0)


def leftovers(root, name):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(name) or p.name.startswith("." + name))


def test_sigkill_mid_run_then_resume(files):
    root, out = files["root"], files["root"] / "killed.h5"
    proc = stopped_mid_run(lambda: start(files, out), out, done_points, N_POINTS)
    seen = done_points(store.partial_path(out))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < seen < N_POINTS and not out.exists()
    # the dead process left its lock behind: the rerun takes it over and resumes
    assert leftovers(root, "killed") == ["killed.h5.lock", "killed.h5.partial"]
    r = run(files, out)
    assert r.exit_code == 0, r.output
    assert "resumed" in r.output
    assert leftovers(root, "killed") == ["killed.h5"]
    assert_equals_reference(files, out)


def test_second_writer_refused_then_ctrl_c_and_resume(files):
    root, out = files["root"], files["root"] / "busy.h5"
    # stopped: holds the lock, mid-run, for as long as the check takes
    proc = stopped_mid_run(lambda: start(files, out), out, done_points, N_POINTS)
    r = run(files, out)                    # the same output while the first process writes it
    assert r.exit_code == 1
    assert f"Error: {out} is being written by another lt process ({proc.pid}@" in r.output
    assert f"wait for it to finish, or remove {out}.lock if that process is gone" in r.output
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = interrupt(proc, root / "busy.h5.lock")
    assert proc.returncode == 130, err
    assert "Error: interrupted. No half-written result file is left" in err
    assert err.count("Traceback") == err.count("Exception ignored in")    # no traceback but a dropped Ctrl-C's
    assert leftovers(root, "busy") == ["busy.h5.partial"]     # Ctrl-C releases the lock
    assert 0 < done_points(store.partial_path(out)) < N_POINTS
    r = run(files, out)
    assert r.exit_code == 0 and "resumed" in r.output, r.output
    assert leftovers(root, "busy") == ["busy.h5"]
    assert_equals_reference(files, out)


def _damaged(root):
    good = root / "ref.h5"
    data = good.read_bytes()
    (root / "truncated.h5").write_bytes(data[: len(data) // 2])
    (root / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))
    return [root / "truncated.h5", root / "garbage.h5"]


@pytest.mark.parametrize("command", ["info", "plot", "merge"])
def test_damaged_result_file_is_a_clear_error(files, command):
    for bad in _damaged(files["root"]):
        args = {"info": ["info", bad], "plot": ["plot", bad, "-o", files["root"] / "fig.png"],
                "merge": ["merge", bad, "-o", files["root"] / "merged.h5"]}[command]
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 1, r.output
        assert r.output.startswith(f"Error: {bad} is not a readable HDF5 file (truncated or corrupt?)"), r.output
        assert "Recompute it; it cannot be repaired" in r.output and "Traceback" not in r.output
        assert not (files["root"] / "fig.png").exists() and not (files["root"] / "merged.h5").exists()


def test_disk_full_mid_run_keeps_earlier_points(files, monkeypatch):
    root, out = files["root"], files["root"] / "full.h5"
    calls = {"n": 0, "done": None}
    real_flush = h5py.File.flush

    def flush(self):
        calls["n"] += 1
        if calls["n"] > 2:     # the first batch (values, then done flags) fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        if calls["n"] == 2:    # the done flags of the one batch that reaches the disk (64 points, or fewer
            calls["done"] = int(np.asarray(self["m/done"]).sum())    # when 5 s pass first on a busy machine)
        return real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flush)
    r = run(files, out)
    assert r.exit_code == 1
    assert (f"Error: no space left on the device holding {out}.partial: free some space or write elsewhere with -o; "
            f"earlier results are untouched") in r.output
    assert "Traceback" not in r.output
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    assert leftovers(root, "full") == ["full.h5.partial"]      # no final file, lock or temporary file
    node = store.read_result(store.partial_path(out)).models["m"]
    done = node.data["done"].astype(bool)
    assert 1 <= calls["done"] <= 64 and done.sum() == calls["done"]     # exactly the flushed batch
    np.testing.assert_allclose(node.data["loss"][done], files["ref"].data["loss"][done], rtol=1e-7)
    r = run(files, out)
    assert r.exit_code == 0 and "resumed" in r.output, r.output
    assert_equals_reference(files, out)


def test_disk_full_while_merging_leaves_no_half_written_file(files, monkeypatch, tmp_path):
    for i in range(2):
        r = run(files, tmp_path / f"p{i}.h5", "--shard", f"{i}/2", "--x", "-1:1:3", "--y", "-1:1:3")
        assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_node", full)
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "p0.h5"), str(tmp_path / "p1.h5"), "-o",
                                 str(tmp_path / "all.h5")])
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: no space left on the device holding {tmp_path / 'all.h5'}: free some space "
                                f"or write elsewhere with -o; earlier results are untouched")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # shards intact, nothing new


# ----------------------------------------------------------------------------- lt hessian --scope batch, lt featvar
@pytest.fixture(scope="module")
def batch_files(tmp_path_factory):
    """A 23-parameter MLP (bare state_dict, `lt_user_models:tiny_mlp`) with 160 samples for `lt hessian`
    (80 batches of 2, about 30 ms each) and the tiny zoo model with 160 samples for `lt featvar`
    (40 batches of 4)."""
    import lt_user_models
    import torch
    from landscape_tools.data import save_tensors

    root = tmp_path_factory.mktemp("faults_batches")
    _, model, data = tiny_checkpoint_and_data(root, n=160)
    torch.manual_seed(0)
    torch.save(lt_user_models.tiny_mlp().state_dict(), root / "mlp.pt")
    rng = np.random.default_rng(0)
    save_tensors(root / "mlp.npz", x=rng.normal(size=(160, 4)).astype(np.float32), y=rng.integers(0, 2, 160))
    commands = {
        "hessian": (["hessian", str(root / "mlp.pt"), "--model", "lt_user_models:tiny_mlp", "--data",
                     f"tensors:{root / 'mlp.npz'}", "--batch-size", "2", "--top-k", "2", "--scope", "batch",
                     "--device", "cpu"], "mlp", "mlp/done", 80),
        "featvar": (["featvar", str(model), "--data", data, "--split", "train", "--batch-size", "4", "--mc", "4",
                     "--source", "noise:0.1", "--device", "cpu"], "m", "m/sums/done", 40),
    }
    refs = {}
    for name, (args, label, _, _) in commands.items():
        ref = root / f"ref_{name}.h5"
        r = CliRunner().invoke(cli, [*args, "-o", str(ref)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        refs[name] = store.read_result(ref)
    return {"root": root, "commands": commands, "refs": refs}


def start_command(args, out):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "landscape_tools.cli.main", *args, "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)


def done_rows(partial, flags) -> int:
    """Rows flagged done at ``flags`` in a partial file another process is writing (0 while unreadable)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f[flags][()].sum())
    except Exception:
        return 0


def assert_same_result(got, ref):
    """Every dataset and attribute of every model group equal (the root differs in time and command)."""
    assert set(got.models) == set(ref.models) and got.attrs["fingerprint"] == ref.attrs["fingerprint"]
    for label, node in ref.models.items():
        _assert_same_node(got.models[label], node, label + "/")


def _assert_same_node(a, b, where):
    assert a.attrs == b.attrs, where
    assert set(a.data) == set(b.data) and set(a.groups) == set(b.groups), where
    for name, value in b.data.items():
        np.testing.assert_array_equal(a.data[name], value, err_msg=where + name)
    for name, group in b.groups.items():
        _assert_same_node(a.groups[name], group, where + name + "/")


@pytest.mark.parametrize("name", ["hessian", "featvar"])
def test_sigkill_mid_run_then_resume_batch_commands(batch_files, name):
    root = batch_files["root"]
    args, label, flags, n_rows = batch_files["commands"][name]
    out = root / f"killed_{name}.h5"
    proc = stopped_mid_run(lambda: start_command(args, out), out, lambda p: done_rows(p, flags), n_rows)
    seen = done_rows(store.partial_path(out), flags)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    kept = done_rows(store.partial_path(out), flags)
    assert 0 < seen <= kept < n_rows and not out.exists()
    assert leftovers(root, f"killed_{name}") == [f"killed_{name}.h5.lock", f"killed_{name}.h5.partial"]
    r = CliRunner().invoke(cli, [*args, "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert leftovers(root, f"killed_{name}") == [f"killed_{name}.h5"]
    assert_same_result(store.read_result(out), batch_files["refs"][name])


def test_ctrl_c_hessian_keeps_finished_batches_and_resumes(batch_files):
    root = batch_files["root"]
    args, label, flags, n_rows = batch_files["commands"]["hessian"]
    out = root / "ctrlc_hessian.h5"
    proc = stopped_mid_run(lambda: start_command(args, out), out, lambda p: done_rows(p, flags), n_rows)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = interrupt(proc, root / "ctrlc_hessian.h5.lock")
    assert proc.returncode == 130, err
    assert "Error: interrupted. No half-written result file is left" in err
    assert err.count("Traceback") == err.count("Exception ignored in")
    assert leftovers(root, "ctrlc_hessian") == ["ctrlc_hessian.h5.partial"]     # the lock is released
    kept = done_rows(store.partial_path(out), flags)
    assert 0 < kept < n_rows
    partial = store.read_result(store.partial_path(out)).models[label]
    ref = batch_files["refs"]["hessian"].models[label]
    done = partial.data["done"].astype(bool)
    np.testing.assert_array_equal(partial.data["eigenvalues"][done], ref.data["eigenvalues"][done])
    r = CliRunner().invoke(cli, [*args, "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert leftovers(root, "ctrlc_hessian") == ["ctrlc_hessian.h5"]
    assert_same_result(store.read_result(out), batch_files["refs"]["hessian"])
