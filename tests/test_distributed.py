"""`lt surface` under torchrun (2 CPU processes, gloo) and the torch.distributed helpers."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import distributed as D
from landscape_tools import store
from landscape_tools import surface as S
from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import load_data
from landscape_tools.errors import ConfigError, StoreError
from tiny_files import tiny_checkpoint_and_data

GRID = ("--x", "-1:1:3", "--y", "-0.5:0.5:3")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _, model, data = tiny_checkpoint_and_data(root)
    return {"root": root, "model": str(model), "data": data}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single(files, out, *extra):
    r = CliRunner().invoke(cli, ["surface", files["model"], "--data", files["data"], "--batch-size", "5", *GRID,
                                 "-o", str(out), *extra], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return store.read_result(out)


def test_torchrun_two_ranks_equal_single_process(files):
    root = files["root"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", "surface", files["model"],
           "--data", files["data"], "--batch-size", "5", *GRID, "--device", "cpu", "-o", "dist.h5"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "per rank x 2 ranks" in p.stderr
    assert p.stdout.count("written to dist.h5") == 1          # only rank 0 reports
    assert sorted(f.name for f in root.iterdir() if f.name.startswith("dist")) == ["dist.h5"]  # shards removed

    ref = single(files, root / "single.h5")
    got = store.read_result(root / "dist.h5")
    a, b = got.models["m"], ref.models["m"]
    assert a.data["done"].all() and a.data["loss"].shape == (3, 3)
    np.testing.assert_allclose(a.data["loss"], b.data["loss"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(a.data["accuracy"], b.data["accuracy"], rtol=0, atol=0)
    assert got.attrs["n_shards"] == 1 and got.attrs["surface_fingerprint"] == ref.attrs["surface_fingerprint"]
    assert got.config == ref.config


def _jobs(files, seed=0):
    model, info = load_checkpoint(files["model"])
    data = load_data(files["data"], split="train", batch_size=5, in_channels=1)
    d = S.random_directions(model, 2, "filter", "biasbn", seed)
    return [S.SurfaceJob(info.label, model, info, data, d)]


X, Y = np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 3)


def test_rank_logic_in_one_process_with_reuse_of_a_finished_shard(files, tmp_path):
    """The ranks' steps run one after the other (no process group): rank 1 computes its shard, rank 0
    finds its own shard finished by an earlier job, reuses it and merges."""
    out = tmp_path / "out.h5"
    jobs = _jobs(files)
    ref = S.run_surface(jobs, str(tmp_path / "ref.h5"), X, Y)
    S.run_surface(jobs, str(D.shard_path(out, 0, 2)), X, Y, shard=(0, 2))      # the earlier job's shard 0
    assert D.run_surface(D.Context(rank=1, world_size=2), jobs, out, X, Y) == out
    assert not out.exists() and D.shard_path(out, 1, 2).exists()
    assert D.run_surface(D.Context(rank=0, world_size=2), jobs, out, X, Y) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "ref.h5"]
    np.testing.assert_array_equal(store.read_result(out).models["m"].data["loss"],
                                  store.read_result(ref).models["m"].data["loss"])


def test_stale_shard_of_another_run_is_refused(files, tmp_path):
    out = tmp_path / "out.h5"
    S.run_surface(_jobs(files, seed=1), str(D.shard_path(out, 0, 2)), X, Y, shard=(0, 2))
    with pytest.raises(StoreError, match=r"out.rank0of2.h5 holds a shard of a different run; remove it or pass "
                                         r"--overwrite"):
        D.run_surface(D.Context(rank=0, world_size=2), _jobs(files), out, X, Y)
    assert not out.exists()


def test_shard_option_under_torchrun_is_refused(files, tmp_path):
    with pytest.raises(ConfigError, match="--shard cannot be combined with torchrun"):
        D.run_surface(D.Context(rank=0, world_size=2), _jobs(files), tmp_path / "o.h5", X, Y, shard=(0, 2))


def test_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not D.launched() and D.env_rank() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not D.launched()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.launched() and D.env_rank() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match=r"RANK=4 is outside 0..3 \(WORLD_SIZE=4\)"):
        D.env_rank()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='two' is not an integer"):
        D.launched()


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = D.init(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.initialised) == (0, 1, True, False, False)
    t = torch.tensor([1.0, 2.0])
    r = D.all_reduce(ctx, t)
    assert torch.equal(r, t) and r is not t
    assert D.all_ok(ctx, True) == [] and D.all_ok(ctx, False) == [0]
    D.barrier(ctx)
    D.destroy(ctx)
    assert D.rank_device(torch.device("cpu"), 3) == torch.device("cpu")
    assert D.shard_path("/a/b/surf.h5", 1, 4).as_posix() == "/a/b/surf.rank1of4.h5"


HESSIAN = ("--batch-size", "4", "--top-k", "2", "--trace", "--trace-probes", "3")


def _equal_nodes(a, b):
    for name, value in b.data.items():
        np.testing.assert_array_equal(a.data[name], value, err_msg=name)
    for name, group in b.groups.items():
        _equal_nodes(a.groups[name], group)


def test_torchrun_hessian_batches_shared_equal_single_process(files):
    root = files["root"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", "hessian", files["model"],
           "--data", files["data"], *HESSIAN, "--device", "cpu", "-o", "hdist.h5"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("m: top eigenvalue (LM)") == 1
    assert sorted(f.name for f in root.iterdir() if f.name.startswith("hdist")) == ["hdist.h5"]
    r = CliRunner().invoke(cli, ["hessian", files["model"], "--data", files["data"], *HESSIAN, "-o",
                                 str(root / "hsingle.h5")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, ref = store.read_result(root / "hdist.h5"), store.read_result(root / "hsingle.h5")
    assert got.models["m"].data["done"].all() and got.models["m"].data["eigenvalues"].shape == (3, 2)
    assert got.attrs["fingerprint"] == ref.attrs["fingerprint"] and got.models["m"].attrs == ref.models["m"].attrs
    _equal_nodes(got.models["m"], ref.models["m"])


def _hjobs(files):
    from landscape_tools import hessian as H
    model, info = load_checkpoint(files["model"])
    data = load_data(files["data"], split="train", batch_size=4, in_channels=1)
    return [H.HessianJob(info.label, model, info, data.batches())]


def test_hessian_rank_logic_in_one_process_resumes_a_finished_rank_file(files, tmp_path):
    from landscape_tools import hessian as H
    jobs, kw = _hjobs(files), {"k": 2, "trace": True, "trace_probes": 3}
    H.run_hessian(jobs, str(tmp_path / "ref.h5"), **kw)
    out = tmp_path / "out.h5"
    H.run_hessian(jobs, str(D.shard_path(out, 0, 2)), only_rows=[0, 2], **kw)    # an earlier job's rank 0
    rows = []
    D.run_hessian(D.Context(rank=1, world_size=2), jobs, out, on_row=lambda j, r: rows.append(r), **kw)
    assert rows == [1] and not out.exists()
    D.run_hessian(D.Context(rank=0, world_size=2), jobs, out, on_row=lambda j, r: rows.append(r), **kw)
    assert rows == [1]                                   # rank 0 found its rows done: nothing recomputed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "ref.h5"]
    _equal_nodes(store.read_result(out).models["m"], store.read_result(tmp_path / "ref.h5").models["m"])
    with pytest.raises(ConfigError, match="--scope dataset is one Hessian of all the data"):
        D.run_hessian(D.Context(rank=0, world_size=2), jobs, tmp_path / "d.h5", scope="dataset", **kw)


def test_a_failed_rank_stops_the_others_and_keeps_their_work(files, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    monkeypatch.setattr(D, "all_ok", lambda ctx, ok: [] if not ok else [1])   # rank 1 failed elsewhere
    with pytest.raises(D.RankFailed, match=r"rank\(s\) 1 of 2 failed \(see their messages\); finished shards"):
        D.run_surface(D.Context(rank=0, world_size=2), _jobs(files), out, X, Y)
    assert not out.exists() and D.shard_path(out, 0, 2).exists()
