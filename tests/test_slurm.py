"""Slurm without torchrun: ranks from an srun step's SLURM_* variables, the rendezvous at the first host
of the step's node list, `--shard slurm` in job arrays.  Two real `lt` tasks started by a stand-in
`srun -n 2` (no RANK; gloo) equal one process for every analysis in tests/test_slurm_jobs.py, which
runs them through the job files of examples/slurm."""
import os

import pytest
from click.testing import CliRunner

from landscape_tools import distributed as D
from landscape_tools import store
from landscape_tools.cli import common
from landscape_tools.cli.main import cli
from landscape_tools.errors import ConfigError
from tiny_files import assert_same_nodes, tiny_checkpoint_and_data

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for k in {*LAUNCHER_VARS, *(k for k in os.environ if k.startswith("SLURM_"))}:
        monkeypatch.setenv(k, "")      # recorded, so what adopt_slurm_environment exports is undone too
        monkeypatch.delenv(k)
    return monkeypatch


@pytest.mark.parametrize("spec, hosts", [
    ("gpu[03-05,07]", ["gpu03", "gpu04", "gpu05", "gpu07"]),
    ("a1,b[1-2]", ["a1", "b1", "b2"]),
    ("node001", ["node001"]),
    ("x[9-11]", ["x9", "x10", "x11"]),
    ("x[009-011]", ["x009", "x010", "x011"]),
    ("r[1-2]n[01-02],login", ["r1n01", "r1n02", "r2n01", "r2n02", "login"]),
    ("c-[1-2]-ib", ["c-1-ib", "c-2-ib"]),
    (" localhost ", ["localhost"]),
])
def test_hostlist_expansion(spec, hosts):
    assert D.expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec, problem", [
    ("gpu[03-05", "unbalanced brackets"), ("gpu03]", "unbalanced brackets"), ("a[[1]]", "unbalanced brackets"),
    ("a,,b", "an empty host name"), ("", "an empty host name"),
    ("gpu[x]", "[x] is not a list of numbers"), ("gpu[5-3]", "[5-3] is not a list of numbers and LO-HI ranges"),
])
def test_bad_hostlists_are_named(spec, problem):
    with pytest.raises(ConfigError) as err:
        D.expand_hostlist(spec)
    assert str(err.value).startswith(f"host list {spec!r}") and problem in str(err.value)
    assert "e.g. gpu[03-05,07]" in str(err.value)


def test_ranks_from_an_srun_step(clean_env):
    env = clean_env
    assert D.slurm_step() is None and D.env_rank() == (0, 1, 0) and not D.launched()
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "4")
    assert D.slurm_step() is None and not D.launched()     # the batch script itself: one process
    env.setenv("SLURM_STEP_ID", "0")
    env.setenv("SLURM_PROCID", "3")
    env.setenv("SLURM_LOCALID", "1")
    assert D.launched() and D.env_rank() == (3, 4, 1)
    env.setenv("SLURM_STEP_NUM_TASKS", "6")                 # the step's task count wins over the job's
    assert D.env_rank() == (3, 6, 1)
    env.setenv("RANK", "1")                                 # torchrun inside the step: torchrun wins
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_RANK", "0")
    assert D.env_rank() == (1, 2, 0)
    env.delenv("RANK")
    env.setenv("SLURM_PROCID", "6")
    with pytest.raises(ConfigError, match=r"SLURM_PROCID=6 is outside 0..5 \(SLURM_NTASKS=6\)"):
        D.env_rank()
    env.setenv("SLURM_PROCID", "x")
    with pytest.raises(ConfigError, match=r"SLURM_PROCID='x' is not an integer; it is set by srun"):
        D.launched()
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_STEP_NUM_TASKS", "1")                 # srun -n 1: a single process
    assert not D.launched() and D.env_rank() == (0, 1, 0) and not D.adopt_slurm_environment()


def test_rendezvous_from_the_node_list_and_job_id(clean_env):
    env = clean_env
    with pytest.raises(ConfigError, match="export MASTER_ADDR=<first node's host name>"):
        D.slurm_rendezvous()
    env.setenv("SLURM_JOB_NODELIST", "cpu[1-4]")
    env.setenv("SLURM_STEP_NODELIST", "gpu[07-09],cpu1")
    with pytest.raises(ConfigError, match="export MASTER_PORT=<a free port, the same in every task>"):
        D.slurm_rendezvous()
    env.setenv("SLURM_JOB_ID", "1234567")
    assert D.slurm_rendezvous() == ("gpu07", 20000 + 1234567 % 20000)
    env.delenv("SLURM_STEP_NODELIST")
    assert D.slurm_rendezvous() == ("cpu1", 20000 + 1234567 % 20000)
    env.setenv("MASTER_ADDR", "10.0.0.1")
    env.setenv("MASTER_PORT", "29500")
    assert D.slurm_rendezvous() == ("10.0.0.1", 29500)
    env.delenv("MASTER_ADDR")
    env.delenv("MASTER_PORT")
    for k, v in {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}.items():
        env.setenv(k, v)
    assert D.adopt_slurm_environment()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "cpu1", "MASTER_PORT": "34567"}
    assert D.env_rank() == (1, 2, 0)


def test_shard_slurm_is_the_array_tasks_position(clean_env):
    env = clean_env
    with pytest.raises(ConfigError) as err:
        common.slurm_array_shard()
    assert str(err.value) == ("--shard slurm needs SLURM_ARRAY_TASK_ID, which Slurm sets in the tasks of a job "
                              "array; submit with `sbatch --array=0-N` or give the shard yourself: --shard I/N")
    env.setenv("SLURM_ARRAY_TASK_ID", "5")
    env.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert common.slurm_array_shard() == (5, 8)
    env.setenv("SLURM_ARRAY_TASK_MIN", "2")                 # --array=2-9
    assert common.slurm_array_shard() == (3, 8)
    env.setenv("SLURM_ARRAY_TASK_STEP", "2")                # --array=2-16:2, task 6 is the third
    env.setenv("SLURM_ARRAY_TASK_ID", "6")
    assert common.slurm_array_shard() == (2, 8)
    env.setenv("SLURM_ARRAY_TASK_ID", "7")
    with pytest.raises(ConfigError, match=r"array task 7 .* is not one of 8 evenly spaced tasks; submit a "
                                          r"contiguous array \(--array=0-7\)"):
        common.slurm_array_shard()
    env.setenv("SLURM_ARRAY_TASK_ID", "6")
    assert common.resolve_shard_args(["m.pt", "--shard", "slurm", "-o", "x.h5"]) == \
        ["m.pt", "--shard", "2/8", "-o", "x.h5"]
    assert common.resolve_shard_args(["m.pt", "--shard=SLURM"]) == ["m.pt", "--shard=2/8"]
    assert common.resolve_shard_args(["m.pt", "--shard", "1/4", "--", "--shard", "slurm"]) == \
        ["m.pt", "--shard", "1/4", "--", "--shard", "slurm"]


def test_shard_slurm_through_lt_surface(clean_env, tmp_path):
    _, model, data = tiny_checkpoint_and_data(tmp_path)
    clean_env.chdir(tmp_path)
    args = ["surface", str(model), "--data", data, "--batch-size", "6", "--x", "-1:1:5", "--device", "cpu"]
    parts = []
    for task in (3, 4):                                     # sbatch --array=3-4
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2"}
        r = CliRunner(env=env).invoke(cli, [*args, "--shard", "slurm"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert f"lt: --shard slurm is --shard {task - 3}/2 (array task {task - 2} of 2)" in r.output
        parts.append(f"m.surface.shard{task - 3}of2.h5")
        assert (tmp_path / parts[-1]).exists()
    r = CliRunner().invoke(cli, ["merge", *parts, "-o", "merged.h5"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*args, "-o", "one.h5"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert_same_nodes(store.read_result(tmp_path / "merged.h5").models["m"],
                      store.read_result(tmp_path / "one.h5").models["m"], rtol=1e-6)
    r = CliRunner().invoke(cli, [*args, "--shard", "slurm"])
    assert r.exit_code == 1 and "Error: --shard slurm needs SLURM_ARRAY_TASK_ID" in r.output
