"""The job files in examples/slurm run, so they cannot rot: each is submitted with a stand-in `sbatch`
(tests/fake_slurm: it runs the job at once on this machine, `srun` starts the tasks as local processes
with the SLURM_* variables real srun sets) on CPU with a tiny model, the sizes shrunk through the job
files' LT_* variables.  What two `srun` tasks (no torchrun) write equals the job's own `lt` line run
again in one process, for every analysis; the requeue-safe job is sent SIGTERM mid-run, requeues itself
and resumes; the array job's shards are merged after it (afterok)."""
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.cli.main import cli
from tiny_files import free_port, random_tensors, tiny_checkpoint_and_data

TESTS = Path(__file__).resolve().parent
JOBS = TESTS.parent / "examples" / "slurm"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def first_job_id() -> int:
    """A job id whose srun rendezvous port (20000 + id % 20000) and the next few are free here."""
    for _ in range(200):
        port = free_port()
        if 20000 <= port < 39000:
            return 40000 + port - 20000
    pytest.skip("no free port in 20000..38999")


@pytest.fixture
def cluster(tmp_path):
    """A tiny MC-dropout smoothing model with train and test data, and the environment of a login
    node whose PATH has the stand-in Slurm commands and `lt`.  Each task gets one CPU
    (FAKE_SLURM_CPUS_PER_TASK: the job files' 8..32 would make every task start that many torch
    threads, the job files' OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK, on this 2-core machine)."""
    _, model, _ = tiny_checkpoint_and_data(tmp_path, arch="resnet_mcdo_smoothing_18")
    random_tensors(tmp_path / "data.npz", 12, 12, (1, 8, 8))
    state = tmp_path / "slurm-state"
    state.mkdir()
    (state / "next_job_id").write_text(str(first_job_id()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LT_")) and k not in LAUNCHER_VARS}
    env.update(PATH=os.pathsep.join([str(TESTS / "fake_slurm"), str(Path(sys.executable).parent), env["PATH"]]),
               FAKE_SLURM_STATE=str(state), FAKE_SLURM_CPUS_PER_TASK="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               LT_MODEL="m.pt", LT_DATA="tensors:data.npz", LT_DEVICE="cpu")
    return {"root": tmp_path, "env": env}


def submit(cluster, *args, timeout=300, **lt_vars):
    env = dict(cluster["env"], **lt_vars)
    return subprocess.run(["sbatch", *map(str, args)], cwd=cluster["root"], env=env, capture_output=True, text=True,
                          timeout=timeout)


def replay_in_one_process(root, result, monkeypatch):
    """Run the `lt` command line recorded in ``result`` again, here, into ``root/one.h5``."""
    argv = shlex.split(store.read_result(root / result).attrs["command"])[1:]
    argv[argv.index("-o") + 1] = "one.h5"
    monkeypatch.chdir(root)
    r = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return store.read_result(root / "one.h5")


#: residual norms of converged eigenpairs (absolute, ~1e-5): round-off level, so they agree only to within the solver's tolerance
LOOSE = {"certificates": 1e-6, "residuals": 1e-6}


def assert_same_nodes(a, b, rtol=1e-6):
    """Every dataset of ``b`` equal in ``a`` to ``rtol`` (NaN where NaN), recursively."""
    assert sorted(a.data) == sorted(b.data) and sorted(a.groups) == sorted(b.groups)
    for name, value in b.data.items():
        if value.dtype.kind in "fc":
            np.testing.assert_allclose(a.data[name], value, rtol=rtol, atol=LOOSE.get(name, 0), equal_nan=True,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(a.data[name], value, err_msg=name)
    for name, group in b.groups.items():
        assert_same_nodes(a.groups[name], group, rtol)


SIZES = {
    "hessian": dict(LT_BATCH_SIZE="6", LT_BATCHES="2", LT_TOP_K="2"),
    "surface": dict(LT_X="-1:1:3", LT_Y="-0.5:0.5:3", LT_SAMPLES="12", LT_BATCH_SIZE="6"),
    "featvar": dict(LT_MC="3", LT_BATCH_SIZE="5"),
    "evaluate": dict(LT_MC="1,3", LT_BATCH_SIZE="5"),
}


@pytest.mark.parametrize("analysis", list(SIZES))
def test_analysis_job_file_with_two_srun_tasks_equals_one_process(cluster, analysis, monkeypatch):
    root = cluster["root"]
    p = submit(cluster, "--ntasks=2", JOBS / f"{analysis}.sbatch", **SIZES[analysis], LT_OUT="two.h5")
    assert p.returncode == 0 and p.stdout.startswith("Submitted batch job"), p.stdout + p.stderr
    assert sorted(f.name for f in root.iterdir() if f.name.startswith(("two", ".lt-lock"))) == ["two.h5"]
    two = store.read_result(root / "two.h5")
    one = replay_in_one_process(root, "two.h5", monkeypatch)
    assert two.config == one.config
    assert_same_nodes(two.models["m"], one.models["m"], rtol=1e-6)


def test_requeue_job_stops_on_sigterm_requeues_and_resumes(cluster, monkeypatch):
    root = cluster["root"]
    env = dict(cluster["env"], LT_X="-1:1:15", LT_Y="-1:1:15", LT_SAMPLES="12", LT_BATCH_SIZE="6", LT_OUT="surf.h5",
               LT_LOCK_STALE_AFTER="5")
    job = subprocess.Popen(["sbatch", str(JOBS / "requeue.sbatch")], cwd=root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    partial, end = root / "surf.h5.partial", time.monotonic() + 120
    while True:                                       # wait for finished points, then the time limit comes
        try:
            with h5py.File(partial, "r", locking=False) as f:
                if f["m/done"][()].any():
                    break
        except Exception:
            pass
        assert job.poll() is None, "the job ended before any progress: " + job.stderr.read()
        assert time.monotonic() < end, "no progress within two minutes"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)                   # the fake sbatch passes it to the batch shell (B:TERM)
    out, err = job.communicate(timeout=240)
    log = out + err
    assert job.returncode == 0 and out.startswith("Submitted batch job"), log
    assert "SIGTERM: stopping lt (it keeps its progress) and requeueing job" in log
    assert "Error: terminated (SIGTERM). No half-written result file is left" in log
    assert "requeued (restart 1)" in log and "start 1 on" in log
    assert "resumed" in log                           # the second run continued the partial file
    assert sorted(f.name for f in root.iterdir() if f.name.startswith(("surf", ".lt-lock"))) == ["surf.h5"]
    one = replay_in_one_process(root, "surf.h5", monkeypatch)
    got = store.read_result(root / "surf.h5")
    assert got.models["m"].data["done"].all()
    for name in ("accuracy", "done"):
        assert (got.models["m"].data[name] == one.models["m"].data[name]).all(), name
    np.testing.assert_allclose(got.models["m"].data["loss"], one.models["m"].data["loss"], rtol=1e-7, atol=0)


def test_array_job_with_shard_slurm_then_afterok_merge(cluster, monkeypatch):
    root = cluster["root"]
    p = subprocess.run([str(JOBS / "submit_surface_array.sh")], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(cluster["env"], LT_ARRAY="4-6", LT_X="-1:1:4", LT_Y="-0.5:0.5:3", LT_SAMPLES="12",
                                LT_BATCH_SIZE="6", LT_OUT="merged.h5"))
    assert p.returncode == 0, p.stdout + p.stderr
    for k in range(3):                                # array tasks 4, 5, 6 are shards 0, 1, 2 of 3
        assert f"lt: --shard slurm is --shard {k}/3 (array task {k + 1} of 3)" in p.stderr
    assert "merged 3 shard(s) into merged.h5" in p.stderr     # the jobs' output (stdout is the job ids)
    assert (root / "merged.png").exists()
    merged = store.read_result(root / "merged.h5")
    argv = shlex.split(store.read_result(root / "m.surface.shard0of3.h5").attrs["command"])[1:]
    i = argv.index("--shard")
    del argv[i:i + 2]
    monkeypatch.chdir(root)
    r = CliRunner().invoke(cli, [*argv, "-o", "one.h5"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert_same_nodes(merged.models["m"], store.read_result(root / "one.h5").models["m"], rtol=1e-6)


def test_merge_waits_for_every_array_task_afterok(cluster):
    p = subprocess.run([str(JOBS / "submit_surface_array.sh")], cwd=cluster["root"], capture_output=True, text=True,
                       timeout=300, env=dict(cluster["env"], LT_ARRAY="0", LT_MODEL="missing.pt"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Error: " in p.stderr and "dependency afterok:" in p.stderr and "did not succeed" in p.stderr
    assert not (cluster["root"] / "missing.surface.h5").exists()


def test_multi_node_torchrun_job_file(cluster, monkeypatch):
    """Two "nodes" (both this machine), one torchrun agent each started by srun, one CPU rank per node."""
    root = cluster["root"]
    p = submit(cluster, JOBS / "multi_node_torchrun.sbatch", LT_NPROC_PER_NODE="1", MASTER_PORT=str(free_port()),
               SLURM_CPUS_PER_TASK="1", LT_X="-1:1:3", LT_Y="-0.5:0.5:3", LT_SAMPLES="12", LT_BATCH_SIZE="6",
               LT_OUT="tr.h5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "per rank x 2 ranks" in p.stderr
    assert sorted(f.name for f in root.iterdir() if f.name.startswith(("tr", ".lt-lock"))) == ["tr.h5"]
    one = replay_in_one_process(root, "tr.h5", monkeypatch)
    assert_same_nodes(store.read_result(root / "tr.h5").models["m"], one.models["m"], rtol=1e-6)
