"""The run engine: `lt <analysis> --shard I/N` + `lt merge` equals one process for every analysis
(N not dividing the units), merge refusals, the device kind / TF32 / seed scheme in the fingerprint,
and the rank vote surviving a rank that arrives long after the collective timeout."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from landscape_tools import engine as E
from landscape_tools import store
from landscape_tools import surface as S
from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import load_data
from landscape_tools.errors import ConfigError, StoreError
from tiny_files import free_port, tiny_checkpoint_and_data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    _, model, data = tiny_checkpoint_and_data(root, arch="resnet_mcdo_18", n=12)   # MC dropout: seeds matter
    return {"root": root, "model": str(model), "data": data}


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def assert_bit_equal(a, b, where="", timing=()):
    """Every dataset and attribute of two groups equal, bit for bit (NaN where NaN), but the
    attributes in ``timing`` (a measured time in words, e.g. the surface's compile_note)."""
    assert sorted(a.data) == sorted(b.data) and sorted(a.groups) == sorted(b.groups), where
    assert a.attrs.keys() == b.attrs.keys(), where
    for k, v in b.attrs.items():
        if k not in timing:
            np.testing.assert_array_equal(a.attrs[k], v, err_msg=f"{where} attr {k}")
    for name, value in b.data.items():
        np.testing.assert_array_equal(a.data[name], value, err_msg=f"{where}/{name}")
    for name, group in b.groups.items():
        assert_bit_equal(a.groups[name], group, f"{where}/{name}")


# every analysis with options that make its units uneven over the shards: 12 samples in batches of 5
# (5, 5, 2) -> 3 batches in 2 shards (2 + 1); the surface's 3 x 3 grid in 4 shards (3 + 2 + 2 + 2)
ANALYSES = {
    "hessian": (2, ["--batch-size", "5", "--top-k", "2", "--trace", "--trace-probes", "3", "--split", "train"]),
    "surface": (4, ["--batch-size", "5", "--x", "-1:1:3", "--y", "-1:1:3", "--mc", "2", "--split", "train"]),
    "featvar": (2, ["--batch-size", "5", "--mc", "3", "--fourier", "--split", "train"]),
    "evaluate": (2, ["--batch-size", "5", "--mc", "1,2,3", "--split", "train"]),
}


@pytest.mark.parametrize("kind", list(ANALYSES))
def test_shards_and_merge_equal_one_process_bit_for_bit(files, tmp_path, kind):
    n, options = ANALYSES[kind]
    common = [kind, files["model"], "--data", files["data"], *options, "--seed", "4"]
    run(*common, "-o", tmp_path / "one.h5")
    parts = [tmp_path / f"part{i}.h5" for i in range(n)]
    for i in reversed(range(n)):
        run(*common, "--shard", f"{i}/{n}", "-o", parts[i])
    shard_files = [store.read_result(p) for p in parts]
    done = {"hessian": "done", "surface": "done", "featvar": "sums/done", "evaluate": "units/done"}[kind]
    counts = [int(np.asarray(r.models["m"][done]).sum()) for r in shard_files]
    assert len(set(counts)) > 1 and sum(counts) == np.asarray(shard_files[0].models["m"][done]).size  # uneven
    run("merge", *parts[::-1], "-o", tmp_path / "merged.h5")
    one, merged = store.read_result(tmp_path / "one.h5"), store.read_result(tmp_path / "merged.h5")
    assert_bit_equal(merged.models["m"], one.models["m"], kind, timing=("compile_note",))
    for key in ("fingerprint", "run_fingerprint", "run_key", "seed_scheme", "device_kind", "tf32", "shard", "n_shards"):
        assert merged.attrs[key] == one.attrs[key], key
    assert merged.config == one.config
    assert list(merged.attrs["merged_from"]) == [r.attrs["fingerprint"] for r in shard_files]
    assert len(set(merged.attrs["merged_from"])) == n and "merged_from" not in one.attrs
    assert json.loads(one.attrs["run_key"])["kind"] == kind and one.attrs["device_kind"] == "cpu"


def test_merge_refuses_other_runs_missing_and_repeated_shards(files, tmp_path):
    common = ["featvar", files["model"], "--data", files["data"], "--split", "train", "--batch-size", "5", "--mc", "3"]
    for i in range(3):
        run(*common, "--shard", f"{i}/3", "-o", tmp_path / f"a{i}.h5")
    run(*common, "--seed", "9", "--shard", "1/3", "-o", tmp_path / "other1.h5")
    run("evaluate", files["model"], "--data", files["data"], "--split", "train", "--batch-size", "5", "--mc", "1,2",
        "--shard", "0/3", "-o", tmp_path / "e0.h5")
    out = tmp_path / "m.h5"

    def refused(*paths):
        r = CliRunner().invoke(cli, ["merge", *map(str, paths), "-o", str(out)])
        assert r.exit_code == 1 and not out.exists()
        return r.output

    text = refused(tmp_path / "a0.h5", tmp_path / "other1.h5", tmp_path / "a2.h5")
    assert "Error: these shards come from different runs (models, data, options, device or seeds differ): run " in text
    assert "other1.h5" in text
    assert f"Error: shard 1/3 given twice: {tmp_path / 'a1.h5'} and {tmp_path / 'a1.h5'}" in refused(
        tmp_path / "a0.h5", tmp_path / "a1.h5", tmp_path / "a1.h5", tmp_path / "a2.h5")
    assert (f"Error: shard(s) 2/3 missing: 3 were cut and 2 given ({tmp_path / 'a0.h5'}, {tmp_path / 'a1.h5'}); "
            f"compute the missing one(s) with --shard I/3 first") in refused(tmp_path / "a1.h5", tmp_path / "a0.h5")
    assert "results of different kinds" in refused(tmp_path / "a0.h5", tmp_path / "e0.h5")


def test_shard_is_refused_for_a_dataset_scope_hessian_and_with_plot(files, tmp_path):
    r = CliRunner().invoke(cli, ["hessian", files["model"], "--data", files["data"], "--scope", "dataset",
                                 "--shard", "0/2", "-o", str(tmp_path / "h.h5")])
    assert r.exit_code == 1 and "Error: --shard 0/2 with --scope dataset: every product of the one Hessian" in r.output
    r = CliRunner().invoke(cli, ["featvar", files["model"], "--data", files["data"], "--shard", "0/2", "--plot",
                                 str(tmp_path / "f.png"), "-o", str(tmp_path / "f.h5")])
    assert r.exit_code == 1 and "Error: --plot with --shard 0/2: a shard holds only sums" in r.output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the fingerprint's runtime
def _surface_job(files):
    model, info = load_checkpoint(files["model"])
    data = load_data(files["data"], split="train", batch_size=5, in_channels=1)
    return [S.SurfaceJob(info.label, model, info, data, S.random_directions(model, 2, "filter", "biasbn", 0))]


GRID = (np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))


class Stop(Exception):
    pass


def stop_after(n):
    seen = []

    def hook(ji, p):
        seen.append(p)
        if len(seen) == n:
            raise Stop
    return hook


@pytest.mark.parametrize("faked, why", [({"device_kind": "cuda", "tf32": False}, "started with device cuda, this run has "
                                                                                  "cpu"),
                                        ({"device_kind": "cpu", "tf32": True}, "started with TF32 setting True, this "
                                                                               "run has False")])
def test_a_resume_on_another_device_kind_or_tf32_setting_is_refused(files, tmp_path, monkeypatch, faked, why):
    out = str(tmp_path / "s.h5")
    monkeypatch.setattr(E, "runtime", lambda device: dict(faked))       # as if started on a GPU
    with pytest.raises(Stop):
        S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID, mc=2), on_point=stop_after(3), flush_points=1)
    partial = store.read_result(store.partial_path(out))
    assert partial.attrs["device_kind"] == faked["device_kind"] and partial.models["m"].data["done"].sum() == 3
    monkeypatch.undo()
    with pytest.raises(StoreError) as err:
        S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID, mc=2))
    assert str(err.value) == (
        f"{out}.partial holds progress of a different run ({why}: random masks and rounding differ between device "
        f"kinds, so the two cannot be mixed in one result; resume it on a {faked['device_kind']} device with the "
        f"same --precision); rerun the same command to resume it, or pass --overwrite to start again")
    assert store.read_result(store.partial_path(out)).models["m"].data["done"].sum() == 3     # left as it was
    S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID, mc=2), overwrite=True)      # --overwrite starts again on this one
    assert store.read_result(out).attrs["device_kind"] == "cpu"


def test_a_partial_file_without_seed_scheme_is_refused(files, tmp_path, monkeypatch):
    out = str(tmp_path / "s.h5")
    with pytest.raises(Stop):
        S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID), on_point=stop_after(2), flush_points=1)
    import h5py
    with h5py.File(store.partial_path(out), "r+") as f:        # as written by an lt before the engine
        del f.attrs["seed_scheme"]
        f.attrs["fingerprint"] = "0" * 64
    with pytest.raises(StoreError, match=r"written by an older lt whose seeds were derived otherwise \(no "
                                         r"seed_scheme\): resuming it would mix dropout masks"):
        S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID))


def test_a_partial_file_of_an_older_seed_scheme_is_refused_and_overwrite_recomputes(files, tmp_path, monkeypatch):
    out = str(tmp_path / "s.h5")
    monkeypatch.setattr(E, "SEED_SCHEME", 1)                      # as an lt of seed scheme 1 wrote it
    with pytest.raises(Stop):
        S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID, mc=2), on_point=stop_after(3), flush_points=1)
    monkeypatch.undo()
    import h5py
    with h5py.File(store.partial_path(out), "r+") as f:
        assert f.attrs["seed_scheme"] == 1 and json.loads(f.attrs["run_key"])["seed_scheme"] == 1
        loss = f["m/loss"]
        done = np.asarray(f["m/done"]).astype(bool)
        assert done.sum() == 3
        values = np.asarray(loss)
        values[done] = 123.0                                      # what the other scheme's masks gave
        loss[...] = values
    assert E.SEED_SCHEME == 2
    with pytest.raises(StoreError) as err:
        S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID, mc=2))
    assert str(err.value) == (
        f"{out}.partial holds progress of a different run (written with seed scheme 1, this lt derives its seeds "
        f"with scheme 2 (landscape_tools.seeds): resuming it would mix dropout masks, start vectors and probes of "
        f"two schemes); rerun the same command to resume it, or pass --overwrite to start again")
    assert store.read_result(store.partial_path(out)).models["m"].data["done"].sum() == 3     # left as it was
    S.run_surface(_surface_job(files), out, S.SurfaceOptions(*GRID, mc=2), overwrite=True)      # --overwrite: every point again
    S.run_surface(_surface_job(files), str(tmp_path / "fresh.h5"), S.SurfaceOptions(*GRID, mc=2))
    again, fresh = store.read_result(out), store.read_result(tmp_path / "fresh.h5")
    assert again.attrs["seed_scheme"] == 2 and not (np.asarray(again.models["m"].data["loss"]) == 123.0).any()
    assert_bit_equal(again.models["m"], fresh.models["m"], timing=("compile_note",))


def test_identity_and_shards():
    a = E.run_identity("surface", {"x": 1}, "cpu")
    b = E.run_identity("surface", {"x": 1}, "cpu", (1, 3))
    assert a["run_fingerprint"] == b["run_fingerprint"] and a["fingerprint"] != b["fingerprint"]
    assert a["fingerprint"] == a["run_fingerprint"] and (b["shard"], b["n_shards"]) == (1, 3)
    assert E.run_identity("hessian", {"x": 1}, "cpu")["run_fingerprint"] != a["run_fingerprint"]
    assert E.run_identity("surface", {"x": 2}, "cpu")["run_fingerprint"] != a["run_fingerprint"]
    assert json.loads(a["run_key"]) == {"kind": "surface", "seed_scheme": E.SEED_SCHEME,
                                        "runtime": {"device_kind": "cpu", "tf32": False}, "run": {"x": 1}}
    parts = [E.shard_units(10, i, 3).tolist() for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ConfigError, match=r"--shard '3/3' is not a shard: expected I/N with 0 <= I < N"):
        E.parse_shard("3/3")
    assert E.derive_seed(1, 2) == E.derive_seed(1, 2) != E.derive_seed(2, 1) and 0 <= E.derive_seed(5) < 2 ** 63


def test_one_seed_derivation_with_distinct_purposes():
    from landscape_tools import seeds
    assert E.derive_seed is seeds.derive_seed and E.SEED_SCHEME == seeds.SEED_SCHEME == 2
    # the documented formula, by hand: SHA-256 of the decimal parts joined by commas, 8 bytes little-endian, >> 1
    import hashlib
    for parts in [(0,), (7, seeds.HESSIAN_START, 3), (-5, 1, 2, 3), (2 ** 70, seeds.DROPOUT_MODULE, 0)]:
        by_hand = int.from_bytes(hashlib.sha256(",".join(map(str, parts)).encode()).digest()[:8], "little") >> 1
        assert E.derive_seed(*parts) == by_hand
    assert E.derive_seed(2 ** 32 + 1, 1) != E.derive_seed(1, 1)          # every bit of a large seed counts
    # one number per purpose, none reused; the surface's repeat tag is the one it always had
    assert len(set(seeds.PURPOSES.values())) == len(seeds.PURPOSES) >= 19
    assert S.REPEAT_TAG == seeds.SURFACE_REPEAT == 0x5EED_16
    # a row's start vector, its probes and its SLQ runs: different seeds
    row = [E.derive_seed(0, p, 1) for p in (seeds.HESSIAN_START, seeds.HESSIAN_HUTCHINSON, seeds.HESSIAN_HUTCHPP,
                                             seeds.HESSIAN_SLQ)]
    assert len(set(row)) == len(row)


# ----------------------------------------------------------------------------- the vote waits for a slow rank
VOTE_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from landscape_tools import distributed as D, engine as E
    ctx = D.init(torch.device("cpu"))
    slow = float(sys.argv[1])
    if ctx.rank == 1:
        time.sleep(slow)                      # far more work than rank 0
    E.vote(ctx, None, "x")                    # rank 0 waits here `slow` seconds
    print(f"rank {ctx.rank} voted", flush=True)
    if sys.argv[2] == "control":              # the same wait at a collective of the job's group
        if ctx.rank == 1:
            time.sleep(slow)
        try:
            D.all_reduce(ctx, torch.ones(1))
            print(f"rank {ctx.rank} reduced", flush=True)
        except Exception as exc:
            print(f"rank {ctx.rank} timed out: {type(exc).__name__}", flush=True)
            import os
            os._exit(0)
    D.destroy(ctx)
""")


def test_a_rank_that_finishes_early_waits_at_the_vote_past_the_collective_timeout(tmp_path):
    script = tmp_path / "vote.py"
    script.write_text(VOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", LT_COLLECTIVE_TIMEOUT="1")           # 1 s for the job's (gloo) group
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), "4", "control"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert "rank 0 voted" in out and "rank 1 voted" in out, out        # waited 4 s at the vote: no timeout
    assert "rank 0 timed out" in out, out          # while the job's group gives up after 1 s: the test can fail
