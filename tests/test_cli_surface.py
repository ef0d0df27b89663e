"""`lt surface` and `lt merge` through the CLI on a tiny zoo checkpoint (width 4) and tensors data."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors
from landscape_tools.models import build_model



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("surf")
    paths = {}
    for k in range(3):
        torch.manual_seed(k)
        m = build_model("resnet_dnn_18", width=4, num_classes=3, in_channels=1)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
        paths[f"m{k}"] = str(root / f"m{k}.pt")
        save_checkpoint(paths[f"m{k}"], m, "resnet_dnn_18", m.arch_kwargs, {})
    rng = np.random.default_rng(0)
    paths["data"] = "tensors:" + str(root / "d.npz")
    save_tensors(root / "d.npz", x=rng.normal(size=(12, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 12))
    paths["root"] = root
    return paths


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def surf(files, *args):
    return run("surface", files["m0"], "--data", files["data"], "--batch-size", 5, *args)


def test_surface_3x5_file_and_figure(files):
    out, fig = files["root"] / "s.h5", files["root"] / "s.png"
    r = surf(files, "--x", "-1:1:3", "--y", "-0.5:0.5:5", "-o", out, "--plot", fig)
    assert r.exit_code == 0, r.output
    assert "m0: 15/15 points, centre loss" in r.output and fig.exists()
    res = store.read_result(out)
    node = res.models["m0"]
    assert node.data["loss"].shape == (3, 5) and node.data["done"].all()
    assert node.attrs["checkpoint_sha256"] and node.attrs["arch"] == "resnet_dnn_18"
    assert node.attrs["norm"] == "filter" and node.attrs["ignore"] == "biasbn" and node.attrs["bn"] == "frozen"
    assert res.config["x"] == [-1.0, 0.0, 1.0]
    assert "layer0.0.weight" in node.groups["directions"].groups["x"].data
    r = surf(files, "--x", "-1:1:3", "--y", "-0.5:0.5:5", "-o", out)
    assert r.exit_code == 1 and f"Error: {out} already exists; pass --overwrite" in r.output


@pytest.mark.parametrize("spec", ["-1:1", "x:1:3", "1:-1:3"])
def test_malformed_range_is_a_clear_error(files, spec):
    r = surf(files, "--x", spec, "-o", files["root"] / "bad.h5")
    assert r.exit_code == 1
    assert f"Error: --x '{spec}' is not a" in r.output
    assert "expected MIN:MAX:NUM, e.g. --x -1:1:21 (MIN < MAX, NUM >= 2 points)" in r.output
    assert not (files["root"] / "bad.h5").exists()


@pytest.mark.parametrize("spec", ["2/2", "a/3", "1-3"])
def test_malformed_shard_is_a_clear_error(files, spec):
    r = surf(files, "--shard", spec, "-o", files["root"] / "bad.h5")
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: --shard '{spec}' is not a shard: expected I/N with 0 <= I < N, e.g. "
                                f"--shard 0/4 (shards are counted from 0, like Slurm array tasks and torch ranks), "
                                f"or --shard slurm in a Slurm job array")


def test_to_hits_both_checkpoints(files):
    line, c0, c1 = (files["root"] / n for n in ("line.h5", "c0.h5", "c1.h5"))
    assert surf(files, "--to", files["m1"], "--x", "0:1:3", "-o", line).exit_code == 0
    assert surf(files, "--dims", "1", "--x", "-1:1:3", "-o", c0).exit_code == 0
    r = run("surface", files["m1"], "--data", files["data"], "--batch-size", 5, "--dims", 1, "--x", "-1:1:3", "-o", c1)
    assert r.exit_code == 0, r.output
    loss = store.read_result(line).models["m0"].data["loss"]
    assert loss[0] == store.read_result(c0).models["m0"].data["loss"][1]
    assert loss[2] == store.read_result(c1).models["m1"].data["loss"][1]
    r = surf(files, "--to", files["m1"], "--dims", "2", "-o", files["root"] / "bad.h5")
    assert r.exit_code == 1 and "Error: --to draws a line: it has one dimension" in r.output
    r = surf(files, "--to", files["m1"], "--plane", files["m1"], files["m2"], "-o", files["root"] / "bad.h5")
    assert r.exit_code == 1 and "Error: --to and --plane cannot be combined" in r.output


def test_one_d_direction_file_refused_for_two_d_run(files):
    line = files["root"] / "d1.h5"
    assert surf(files, "--dims", "1", "--x", "-1:1:3", "-o", line).exit_code == 0
    r = surf(files, "--directions", line, "--x", "-1:1:3", "--y", "-1:1:3", "-o", files["root"] / "bad.h5")
    assert r.exit_code == 1
    assert f"Error: --directions {line} holds 1-D directions but this run is 2-D (--dims 2)" in r.output
    r = run("surface", files["m1"], "--data", files["data"], "--dims", 1, "--directions", line, "-o",
            files["root"] / "bad.h5")
    assert r.exit_code == 1 and "was made for other weights" in r.output


def test_shards_and_merge(files):
    root = files["root"]
    grid = ("--x", "-1:1:3", "--y", "-1:1:3")
    assert surf(files, *grid, "-o", root / "one.h5").exit_code == 0
    for i in range(2):
        r = surf(files, *grid, "--shard", f"{i}/2", "-o", root / f"part{i}.h5")
        assert r.exit_code == 0, r.output
        assert f"(shard {i}/2 of 9)" in r.output
    r = run("merge", root / "part0.h5", "-o", root / "merged.h5")
    assert r.exit_code == 1
    assert (f"Error: shard(s) 1/2 missing: 2 were cut and 1 given ({root / 'part0.h5'}); compute the missing one(s) "
            f"with --shard I/2 first") in r.output
    r = run("merge", root / "part0.h5", root / "part1.h5", "-o", root / "merged.h5", "--plot", root / "merged.png")
    assert r.exit_code == 0, r.output
    a, b = store.read_result(root / "one.h5").models["m0"], store.read_result(root / "merged.h5").models["m0"]
    np.testing.assert_array_equal(a.data["loss"], b.data["loss"])
    np.testing.assert_array_equal(a.data["accuracy"], b.data["accuracy"])


def test_plane_and_pca_runs_store_their_points(files):
    root = files["root"]
    r = surf(files, "--plane", files["m1"], files["m2"], "--x", "-2:2:3", "--y", "-2:2:3", "-o", root / "plane.h5",
             "--plot", root / "plane.png")
    assert r.exit_code == 0, r.output
    d = store.read_result(root / "plane.h5").models["m0"].groups["directions"]
    assert [str(v) for v in d.data["point_labels"]] == ["centre", "m1", "m2"]
    r = surf(files, "--pca", str(root / "m*.pt"), "--x", "-1:1:3", "--y", "-1:1:3", "-o", root / "pca.h5",
             "--plot", root / "pca.png")
    assert r.exit_code == 0, r.output
    node = store.read_result(root / "pca.h5").models["m0"]
    d = node.groups["directions"]
    assert d.data["trajectory_coords"].shape == (3, 2) and d.data["explained_variance_ratio"].shape == (2,)
    assert node.data["loss"].shape == (3, 3)


def test_plane_default_grid_covers_the_models():
    from landscape_tools.cli.surface import _auto_range
    xs = _auto_range([0.0, 4.0, 1.0], "--x")
    assert len(xs) == 21 and xs[0] == -1.0 and xs[-1] == 5.0


def test_resumes_with_the_same_command_and_refuses_another(files):
    root = files["root"]
    out = root / "r.h5"
    # a partial file as a killed run leaves it: the first rows computed, the rest not
    from landscape_tools import surface as S
    from landscape_tools.errors import StoreError

    def stop_after(k):
        seen = []

        def hook(j, p):
            seen.append(p)
            if len(seen) == k:
                raise StoreError("simulated interruption")
        return hook

    original = S.run_surface

    def interrupted(*a, **kw):
        return original(*a, **dict(kw, on_point=stop_after(3), flush_points=1))

    S.run_surface = interrupted
    try:
        r = surf(files, "--x", "-1:1:3", "--y", "-1:1:3", "-o", out)
    finally:
        S.run_surface = original
    assert r.exit_code == 1 and "simulated interruption" in r.output
    r = surf(files, "--x", "-1:1:5", "--y", "-1:1:3", "-o", out)
    assert r.exit_code == 1
    assert f"Error: {out}.partial holds progress of a different run (another grid (--x)); rerun the same " \
           f"command to resume it, or pass --overwrite to start again" in r.output
    r = surf(files, "--x", "-1:1:3", "--y", "-1:1:3", "-o", out)
    assert r.exit_code == 0, r.output
    assert "3/9" in r.output                      # progress restarted from the saved points
    full = root / "r_full.h5"
    assert surf(files, "--x", "-1:1:3", "--y", "-1:1:3", "-o", full).exit_code == 0
    np.testing.assert_array_equal(store.read_result(out).models["m0"].data["loss"],
                                  store.read_result(full).models["m0"].data["loss"])


def test_precision_is_recorded_and_bad_values_are_refused(files):
    out = files["root"] / "bf16.h5"
    r = surf(files, "--x", "-1:1:3", "--y", "-1:1:3", "--precision", "bf16", "-o", out)
    assert r.exit_code == 0, r.output
    assert "bf16 forward passes" in r.output
    res = store.read_result(out)
    node = res.models["m0"]
    assert node.attrs["precision"] == "bf16" and not node.attrs["compile"]
    assert res.config["precision"] == "bf16" and res.config["compile"] == "auto"
    fp32 = files["root"] / "fp32.h5"
    assert surf(files, "--x", "-1:1:3", "--y", "-1:1:3", "-o", fp32).exit_code == 0
    a, b = node.data["loss"], store.read_result(fp32).models["m0"].data["loss"]
    assert not np.array_equal(a, b) and np.allclose(a, b, rtol=5e-2)
    assert store.read_result(fp32).models["m0"].attrs["precision"] == "fp32"
    r = surf(files, "--precision", "int8", "-o", files["root"] / "bad.h5")
    assert r.exit_code == 2 and "Invalid value for '--precision': 'int8' is not one of 'fp32', 'tf32', 'bf16', 'fp16'" \
        in r.output


# ----------------------------------------------------------------------------- --compile auto|on|off
def compile_lines(r):
    return [line for line in r.stderr.splitlines() if line.startswith("lt surface: --compile")]


def test_compile_auto_is_the_default_and_says_why_it_runs_eagerly(files):
    root = files["root"]
    r = surf(files, "--x", "-1:1:3", "--y", "-1:1:3", "-o", root / "auto.h5")
    assert r.exit_code == 0, r.output
    lines = compile_lines(r)
    assert len(lines) == 1 and lines[0].startswith(
        "lt surface: --compile auto: running eagerly: 9 point(s) x 1 pass(es) x 2 batch(es) of 5 = 18 forward passes "
        "of ~") and lines[0].endswith("(--compile on compiles anyway)")
    res = store.read_result(root / "auto.h5")
    node = res.models["m0"]
    assert node.attrs["compile"] == False and node.attrs["compile_option"] == "auto"  # noqa: E712 (numpy bool)
    assert "lt surface: " + node.attrs["compile_note"] == lines[0] and res.config["compile"] == "auto"
    r = surf(files, "--x", "-1:1:3", "--y", "-1:1:3", "--compile", "off", "-o", root / "off.h5")
    assert r.exit_code == 0 and compile_lines(r) == []
    off = store.read_result(root / "off.h5").models["m0"]
    assert off.attrs["compile_option"] == "off" and off.attrs["compile"] == False  # noqa: E712
    np.testing.assert_array_equal(off.data["loss"], node.data["loss"])
    r = surf(files, "--compile", "sometimes", "-o", root / "bad.h5")
    assert r.exit_code == 2 and "'sometimes' is not one of auto, on, off (a bare --compile means on" in r.output
    r = run("surface", "--compile", files["m0"], "--data", files["data"], "-o", root / "bad.h5")
    assert r.exit_code == 2 and "put --compile after the models" in r.output


@pytest.fixture(scope="module")
def mlp(files):
    """A user model (4 -> 3 -> 2 MLP: compiles in seconds) and 20 samples, batches of 6, 6, 6, 2."""
    import lt_user_models

    torch.manual_seed(0)
    path = files["root"] / "mlp.pt"
    torch.save(lt_user_models.tiny_mlp().state_dict(), path)
    rng = np.random.default_rng(1)
    save_tensors(files["root"] / "v.npz", x=rng.normal(size=(20, 4)).astype(np.float32), y=rng.integers(0, 2, 20))
    return ["surface", str(path), "--model", "lt_user_models:tiny_mlp", "--data", "tensors:" + str(files["root"] / "v.npz"),
            "--batch-size", "6", "--dims", "1", "--x", "-1:1:5"]


def test_compile_auto_compiles_when_it_pays_within_1e_6_of_eager_and_falls_back(files, mlp, monkeypatch):
    from landscape_tools import surface as S

    root = files["root"]
    assert run(*mlp, "--compile", "off", "-o", root / "e.h5").exit_code == 0
    eager = store.read_result(root / "e.h5").models["mlp"]
    # a compilation said to cost nothing and to be faster: auto compiles
    monkeypatch.setattr(S, "estimated_compile_seconds", lambda model, graphs=1: 0.0)
    monkeypatch.setattr(S, "AUTO_COMPILE_MAX_RATIO", float("inf"))
    r = run(*mlp, "-o", root / "c.h5")
    assert r.exit_code == 0, r.output
    lines = compile_lines(r)
    assert len(lines) == 1 and lines[0].startswith("lt surface: --compile auto: compiling the forward pass (~0 s; "
                                                   "5 point(s) x 1 pass(es) x 3 batch(es) of 6 = 15 forward passes")
    node = store.read_result(root / "c.h5").models["mlp"]
    assert node.attrs["compile"] == True and node.attrs["compile_note"].startswith("--compile auto: compiled in ")  # noqa: E712
    np.testing.assert_allclose(node.data["loss"], eager.data["loss"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(node.data["accuracy"], eager.data["accuracy"])
    # a bare --compile is on
    r = run(*mlp, "-o", root / "on.h5", "--compile")
    assert r.exit_code == 0 and compile_lines(r) == []
    on = store.read_result(root / "on.h5").models["mlp"]
    assert on.attrs["compile_option"] == "on" and on.attrs["compile"] == True  # noqa: E712
    # no working compiler: one line, and the eager numbers
    def broken(*args, **kwargs):
        raise RuntimeError("CppCompileError: no C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    r = run(*mlp, "-o", root / "f.h5")
    assert r.exit_code == 0, r.output
    fallback = [line for line in compile_lines(r) if "running eagerly" in line]
    assert fallback == ["lt surface: --compile auto: running eagerly: torch.compile failed here "
                        "(RuntimeError: CppCompileError: no C++ compiler)"]
    node = store.read_result(root / "f.h5").models["mlp"]
    np.testing.assert_array_equal(node.data["loss"], eager.data["loss"])
    assert node.attrs["compile"] == False and "torch.compile failed here" in node.attrs["compile_note"]  # noqa: E712
    r = run(*mlp, "-o", root / "g.h5", "--compile", "on")
    assert r.exit_code == 1
    assert "Error: --compile on: torch.compile failed here (RuntimeError: CppCompileError: no C++ compiler); " \
           "use --compile off" in r.output
