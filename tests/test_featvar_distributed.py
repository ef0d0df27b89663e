"""`lt featvar` under torchrun (2 CPU processes, gloo) equals one process; each rank's share in one
process (summed == all batches, resumable rank files, a failed rank stops all); --precision; --compile refused."""
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from landscape_tools import distributed as D
from landscape_tools import engine as E
from landscape_tools import featvar, store
from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import load_data
from tiny_files import assert_same_nodes, free_port, tiny_checkpoint_and_data



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fvdist")
    _, model, data = tiny_checkpoint_and_data(root, arch="resnet_mcdo_smoothing_18", n=12)
    return {"root": root, "model": str(model), "data": data}


# ----------------------------------------------------------------------------- torchrun, 2 processes
def test_torchrun_two_ranks_equal_single_process(files):
    root = files["root"]
    args = [files["model"], "--data", files["data"], "--split", "train", "--batch-size", "5",  # batches 5, 5, 2
            "--mc", "3", "--fourier", "--seed", "5", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", "featvar", *args, "-o", "fdist.h5"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("written to fdist.h5") == 1                     # only rank 0 reports
    assert sorted(f.name for f in root.iterdir() if f.name.startswith("fdist")) == ["fdist.h5"]  # rank files gone

    r = CliRunner().invoke(cli, ["featvar", *args, "-o", str(root / "fsingle.h5")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, ref = store.read_result(root / "fdist.h5"), store.read_result(root / "fsingle.h5")
    assert got.config == ref.config and got.attrs["fingerprint"] == ref.attrs["fingerprint"]
    assert got.models["m"].attrs == ref.models["m"].attrs
    assert got.models["m"]["sums/done"].all() and got.models["m"]["sums/var_sum"].shape == (3, 5)
    assert np.all(got.models["m"]["variance"][1:] > 0)
    assert got.models["m"]["batch_variance"].shape == (3, 5) and np.all(got.models["m"]["batch_variance"][:, 1:] > 0)
    assert_same_nodes(got.models["m"], ref.models["m"])


# ----------------------------------------------------------------------------- rank logic in one process
def make_jobs(files):
    model, info = load_checkpoint(files["model"])
    ds = load_data(files["data"], split="train", batch_size=5, in_channels=1)
    return [featvar.Job(info.label, model, info.describe(), ds.batches())]


ATTRS = store.provenance("featvar", ["lt", "featvar"], {}, 5)


def test_shards_merge_into_the_one_process_file_and_the_brute_force_mean(files, tmp_path):
    """3 batches (5, 5, 2) in 2 shards (batches 0, 2 and 1): lt merge's sums equal one process, bit for bit."""
    kw = dict(over="mc", mc=3, fourier=True, seed=5)
    parts = [str(tmp_path / f"s{i}.h5") for i in range(2)]
    for i in (1, 0):
        assert featvar.run_to_file(make_jobs(files), parts[i], ATTRS, featvar.FeatvarOptions(**kw), shard=(i, 2)) == {}
    s1 = store.read_result(parts[1]).models["m"]
    np.testing.assert_array_equal(s1["sums/done"], [False, True, False])
    assert np.all(s1["sums/var_sum"][[0, 2]] == 0) and np.all(np.isnan(s1["variance"]))   # only its sums
    featvar.run_to_file(make_jobs(files), str(tmp_path / "ref.h5"), ATTRS, featvar.FeatvarOptions(**kw))
    merged = E.merge(parts[::-1], tmp_path / "merged.h5")
    got, ref = store.read_result(merged), store.read_result(tmp_path / "ref.h5")
    assert_same_nodes(got.models["m"], ref.models["m"])
    assert got.models["m"].attrs == ref.models["m"].attrs and got.attrs["fingerprint"] == ref.attrs["fingerprint"]
    assert list(got.attrs["merged_from"]) == [store.read_result(p).attrs["fingerprint"] for p in parts]
    m = ref.models["m"]
    # the variance is the mean over every entry of every batch: sum of sums / sum of counts
    brute = m["sums/var_sum"].sum(axis=0) / m["sums/count"].sum(axis=0)
    np.testing.assert_allclose(got.models["m"]["variance"], brute, rtol=1e-12)
    # and each batch's sums equal the in-memory analysis of that batch alone (global batch index)
    job = make_jobs(files)[0]
    analysis = featvar.FeatureVariance(job.model, job.batches[0][0], "mc", 3, fourier=True, seed=5)
    np.testing.assert_array_equal(s1["sums/var_sum"][1], analysis.batch_stats(1, job.batches[1][0]).var_sum)


def test_an_interrupted_shard_resumes_its_own_batches(files, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"

    def interrupt(done, total, message):
        if done == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        featvar.run_to_file(make_jobs(files), str(out), ATTRS, featvar.FeatvarOptions(mc=3, fourier=True, seed=5), shard=(0, 2), progress=interrupt)
    computed = []
    original = featvar.FeatureVariance.batch_stats
    monkeypatch.setattr(featvar.FeatureVariance, "batch_stats",
                        lambda self, i, x: (computed.append(i), original(self, i, x))[1])
    featvar.run_to_file(make_jobs(files), str(out), ATTRS, featvar.FeatvarOptions(mc=3, fourier=True, seed=5), shard=(0, 2))
    assert computed == [2]                                   # batch 0 was done before the interruption
    np.testing.assert_array_equal(store.read_result(out).models["m"]["sums/done"], [True, False, True])
    # a partial file of other options is refused, not mixed in
    with pytest.raises(KeyboardInterrupt):
        featvar.run_to_file(make_jobs(files), str(tmp_path / "o.h5"), ATTRS, featvar.FeatvarOptions(mc=3, seed=5), shard=(0, 2), progress=interrupt)
    with pytest.raises(Exception, match=r"holds progress of a different run \(another models\[0\]\.samples: 4, "
                                        r"the partial file has 3\)"):
        featvar.run_to_file(make_jobs(files), str(tmp_path / "o.h5"), ATTRS, featvar.FeatvarOptions(mc=4, seed=5), shard=(0, 2))


def test_a_failed_rank_stops_the_others_writes_nothing_and_keeps_the_rank_file(files, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    monkeypatch.setattr(D, "all_ok", lambda ctx, ok: [] if not ok else [1])   # rank 1 failed elsewhere
    with pytest.raises(D.RankFailed, match=r"rank\(s\) 1 of 2 failed \(see their messages\); finished shards and "
                                           r"partial progress are kept"):
        featvar.run_to_file(make_jobs(files), str(out), ATTRS, featvar.FeatvarOptions(mc=3, seed=5), ctx=D.Context(rank=0, world_size=2))
    assert not out.exists() and E.shard_path(out, 0, 2).exists()
    assert not store.partial_path(out).exists()


# ----------------------------------------------------------------------------- precision and compile
def test_bf16_is_close_to_fp32_but_not_identical(files):
    job = make_jobs(files)[0]
    ref = featvar.feature_variance(job.model, job.batches, mc=3, seed=5, fourier=True)
    low = featvar.feature_variance(job.model, job.batches, mc=3, seed=5, fourier=True, precision="bf16")
    assert not np.array_equal(low.variance, ref.variance)
    np.testing.assert_allclose(low.variance, ref.variance, rtol=0.1, atol=1e-12)
    # low frequencies agree; the highest ones sit near the 1e-6 floor of the log, where bf16 is all noise
    np.testing.assert_allclose(low.fourier[:, :2], ref.fourier[:, :2], atol=0.05)
    assert ref.variance[0] == 0 and low.variance[0] == 0     # before any dropout: same masks, no variance


def test_compile_is_refused(files, tmp_path):
    r = CliRunner().invoke(cli, ["featvar", files["model"], "--data", files["data"], "--mc", "3", "--compile",
                                 "-o", str(tmp_path / "o.h5")])
    assert r.exit_code == 1 and r.output.startswith("Error: --compile is not supported by lt featvar: its forward "
                                                    "hooks and per-copy dropout masks")
    assert not any(tmp_path.iterdir())
