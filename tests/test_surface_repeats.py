"""``lt surface --repeats K``: K seeded direction pairs per model, their sharpness summaries, shards / merge /
resume of (repeat, grid point) units, in float64 on a tiny model against one-repeat runs and hand computations."""
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import distributed as D
from landscape_tools import engine, plotting, store
from landscape_tools import surface as S
from landscape_tools.cli.main import cli
from landscape_tools.errors import ConfigError, StoreError

from test_surface import tiny, tiny_data
from tiny_files import tiny_checkpoint_and_data

X = np.linspace(-1, 1, 5)
Y = np.linspace(-0.5, 0.5, 3)


def _job(k, seed=3, dims=2, label="m", scale=1.0):
    model, data = tiny(), tiny_data()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    reps = S.repeat_directions(model, k, dims, seed=seed)
    return S.SurfaceJob(label, model, None, data, reps[0], reps[1:])


def _all_arrays(path):
    res = store.read_result(path)
    out = {}
    for label, node in res.models.items():
        out[label] = {k: v for k, v in node.data.items()}
        groups = dict(node.groups.get("repeat_directions", store.Node()).groups, **{"0": node.groups["directions"]})
        for r, g in groups.items():
            for axis, vecs in g.groups.items():
                for name, v in vecs.data.items():
                    out[label][f"rd/{r}/{axis}/{name}"] = v
    return out


def _assert_same(a, b):
    assert list(a) == list(b)
    for label in a:
        assert sorted(a[label]) == sorted(b[label])
        for k in a[label]:
            np.testing.assert_array_equal(a[label][k], b[label][k], err_msg=f"{label}/{k}")


def test_repeat_seeds_are_a_prefix_and_repeat_zero_is_the_run_seed():
    assert S.repeat_seed(7, 0) == 7
    seeds = [S.repeat_seed(7, r) for r in range(5)]
    assert len(set(seeds)) == 5
    assert seeds[1] == engine.derive_seed(7, S.REPEAT_TAG, 1)
    model = tiny()
    three, five = S.repeat_directions(model, 3, 2, seed=7), S.repeat_directions(model, 5, 2, seed=7)
    for a, b in zip(three, five[:3]):
        assert a.digest() == b.digest()
        assert a.recipe["seed"] == b.recipe["seed"]
    assert [d.recipe["seed"] for d in five] == seeds
    for bad in (0, -1, 1.5, "two"):
        with pytest.raises(ConfigError, match=r"--repeats .*expected a whole number"):
            S.check_repeats(bad)


@pytest.mark.parametrize("dims", [1, 2])
def test_each_repeat_equals_a_one_repeat_run_with_its_seed(tmp_path, dims):
    y = Y if dims == 2 else None
    path = S.run_surface([_job(3, dims=dims)], str(tmp_path / "k3.h5"), S.SurfaceOptions(X, y))
    node = store.read_result(path).models["m"]
    assert node.attrs["repeats"] == 3
    grid = (len(X),) if dims == 1 else (len(X), len(Y))
    assert node["loss"].shape == (3,) + grid and node["done"].all()
    np.testing.assert_array_equal(node["repeat_seeds"], [S.repeat_seed(3, r) for r in range(3)])
    for r in range(3):
        model, data = tiny(), tiny_data()
        one = S.SurfaceJob("m", model, None, data, S.random_directions(model, dims, seed=S.repeat_seed(3, r)))
        single = store.read_result(S.run_surface([one], str(tmp_path / f"one{r}.h5"), S.SurfaceOptions(X, y))).models["m"]
        assert "repeats" not in single.attrs and single["loss"].shape == grid      # one repeat: the old layout
        np.testing.assert_array_equal(node["loss"][r], single["loss"])
        np.testing.assert_array_equal(node["accuracy"][r], single["accuracy"])
        stored = node["directions"] if r == 0 else node["repeat_directions"].groups[str(r)]
        for name, vec in single["directions"].groups["x"].data.items():
            np.testing.assert_array_equal(stored.groups["x"].data[name], vec)


def test_sharpness_summaries_equal_a_hand_computation(tmp_path):
    path = S.run_surface([_job(2)], str(tmp_path / "k2.h5"), S.SurfaceOptions(X, Y))
    node = store.read_result(path).models["m"]
    h, k = 0.5, 0.5                                  # X: -1..1 step 0.5 (centre index 2); Y: step 0.5 (centre 1)
    for r in range(2):
        g = node["loss"][r]
        border = [g[i, j] for i in range(5) for j in range(3) if i in (0, 4) or j in (0, 2)]
        assert len(border) == 12
        assert node["sharpness_rise"][r] == pytest.approx(sum(border) / 12 - g[2, 1], rel=1e-12, abs=1e-15)
        cx = (g[3, 1] - 2 * g[2, 1] + g[1, 1]) / h ** 2
        cy = (g[2, 2] - 2 * g[2, 1] + g[2, 0]) / k ** 2
        np.testing.assert_allclose(node["sharpness_curvature"][r], [cx, cy], rtol=1e-10, atol=1e-12)
    line = store.read_result(S.run_surface([_job(2, dims=1)], str(tmp_path / "l.h5"), S.SurfaceOptions(X))).models["m"]
    for r in range(2):
        g = line["loss"][r]
        assert line["sharpness_rise"][r] == pytest.approx((g[0] + g[4]) / 2 - g[2], rel=1e-12, abs=1e-15)
        assert line["sharpness_curvature"][r, 0] == pytest.approx((g[3] - 2 * g[2] + g[1]) / 0.25, rel=1e-10)


def test_uneven_grid_second_difference():
    x = np.array([-0.5, 0.0, 0.25, 1.0])
    f = 3 * x ** 2 + x                                # a parabola: the three-point formula is exact
    assert S.centre_curvature(f, x)[0, 0] == pytest.approx(6.0, rel=1e-12)


def test_shards_and_merge_equal_one_process_and_resume(tmp_path):
    jobs = lambda: [_job(3, label="a"), _job(3, label="b", scale=1.3)]
    single = S.run_surface(jobs(), str(tmp_path / "single.h5"), S.SurfaceOptions(X, Y))
    parts = [str(S.run_surface(jobs(), str(tmp_path / f"p{i}.h5"), S.SurfaceOptions(X, Y), shard=(i, 4))) for i in range(4)]
    p0 = store.read_result(parts[0]).models["a"]
    assert int(p0["done"].sum()) == len(range(0, 3 * 15, 4))                 # units (repeat, point) interleaved
    assert np.isnan(p0["sharpness_rise"]).all()                              # a shard has no whole grid
    merged = S.merge_shards(parts[::-1], str(tmp_path / "merged.h5"))
    _assert_same(_all_arrays(single), _all_arrays(merged))

    out = str(tmp_path / "resumed.h5")

    class Stop(Exception):
        pass

    def stop(j, u):
        if j == 1 and u == 20:          # model b, inside repeat 1
            raise Stop

    with pytest.raises(Stop):
        S.run_surface(jobs(), out, S.SurfaceOptions(X, Y), on_point=stop, flush_points=4)
    done = store.read_result(out + ".partial").models["b"]["done"]
    assert 0 < done.sum() < done.size
    S.run_surface(jobs(), out, S.SurfaceOptions(X, Y))
    _assert_same(_all_arrays(single), _all_arrays(out))


def test_torchrun_rank_steps_of_a_repeats_run_equal_one_process(tmp_path):
    """What `lt surface --repeats 3` runs on each of 2 torchrun ranks (the engine's split, vote and merge
    around run_surface), the ranks' steps one after the other in this process: the merged file is the
    one-process file, every (repeat, grid point) unit and every repeat's directions, bit for bit."""
    jobs = lambda: [_job(3, label="a"), _job(3, label="b", scale=1.3)]
    single = S.run_surface(jobs(), str(tmp_path / "single.h5"), S.SurfaceOptions(X, Y))
    out = tmp_path / "ranks.h5"

    def rank(r):
        return engine.run_ranks(D.Context(rank=r, world_size=2), out,
                                lambda o, part: S.run_surface(jobs(), str(o), S.SurfaceOptions(X, Y), shard=part))

    assert rank(1) == out and not out.exists()
    shard = store.read_result(engine.shard_path(out, 1, 2)).models["a"]["done"]
    assert int(shard.sum()) == len(range(1, 3 * 15, 2))              # rank 1: every other (repeat, point) unit
    assert rank(0) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.h5", "single.h5"]   # shards merged and removed
    _assert_same(_all_arrays(single), _all_arrays(out))
    assert int(store.read_result(out).models["b"].attrs["repeats"]) == 3


def test_a_partial_file_with_another_repeat_count_is_refused(tmp_path):
    out = str(tmp_path / "s.h5")

    def stop(j, u):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.run_surface([_job(2)], out, S.SurfaceOptions(X, Y), on_point=stop)
    with pytest.raises(StoreError, match=r"different run \(another --repeats: 3, the partial file has 2\)"):
        S.run_surface([_job(3)], out, S.SurfaceOptions(X, Y))
    with pytest.raises(StoreError, match=r"different run \(another --repeats: 1, the partial file has 2\)"):
        S.run_surface([_job(1)], out, S.SurfaceOptions(X, Y))
    S.run_surface([_job(2)], out, S.SurfaceOptions(X, Y))                    # the same run resumes


def test_models_with_different_repeat_counts_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="same number of repeats"):
        S.run_surface([_job(2, label="a"), _job(3, label="b")], str(tmp_path / "x.h5"), S.SurfaceOptions(X, Y))
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


# ----------------------------------------------------------------------------- the command and its figures
def lt(*args, code=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repeats")
    _, ckpt, data = tiny_checkpoint_and_data(root)
    return {"root": root, "m": ckpt, "data": data}


def test_cli_repeats_equal_one_repeat_runs_and_are_drawn_as_panels(zoo):
    root, common = zoo["root"], ["--data", zoo["data"], "--batch-size", 6, "--x", "-1:1:3", "--y", "-1:1:3"]
    out = root / "rep.h5"
    res = lt("surface", zoo["m"], *common, "--repeats", 3, "--seed", 5, "-o", out)
    assert "3 repeats; centre-to-border rise" in res.output
    node = store.read_result(out).models["m"]
    assert store.read_result(out).config["repeats"] == 3
    r2 = root / "one.h5"
    lt("surface", zoo["m"], *common, "--seed", S.repeat_seed(5, 2), "-o", r2)
    one = store.read_result(r2)
    assert "repeats" not in one.config
    np.testing.assert_array_equal(node["loss"][2], one.models["m"]["loss"])
    fig = plotting.figure([str(out)], kind="heatmap")
    try:
        panels = [ax for ax in fig.axes if ax.get_title().startswith("m, repeat")]
        assert len(panels) == 3
        for r, ax in enumerate(panels):
            assert ax.get_title() == f"m, repeat {r}\n(seed {S.repeat_seed(5, r)})"
            drawn = np.ma.filled(ax.collections[0].get_array().astype(float), np.nan).reshape(3, 3)
            np.testing.assert_array_equal(drawn, node["loss"][r])
    finally:
        plotting.pyplot().close(fig)


def test_cli_repeats_line_is_drawn_as_a_mean_with_a_band(zoo):
    out = zoo["root"] / "line.h5"
    lt("surface", zoo["m"], "--data", zoo["data"], "--batch-size", 6, "--dims", 1, "--x", "-1:1:5",
       "--repeats", 4, "-o", out)
    node = store.read_result(out).models["m"]
    loss, x = node["loss"], node["x"]
    assert loss.shape == (4, 5)
    fig = plotting.figure([str(out)])
    try:
        ax = fig.axes[0]
        assert ax.get_title() == "m, mean of 4 repeats"
        np.testing.assert_array_equal(ax.get_lines()[0].get_xydata(), np.c_[x, loss.mean(axis=0)])
        twin = [a for a in fig.axes if a is not ax and a.bbox.bounds == ax.bbox.bounds][0]
        np.testing.assert_array_equal(twin.get_lines()[0].get_xydata(), np.c_[x, node["accuracy"].mean(axis=0)])
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "mean loss of 4 repeats", "min-max of 4 repeats", "mean accuracy of 4 repeats"]
        band = [c for c in ax.collections][0].get_paths()[0].vertices
        for xi, lo, hi in zip(x, loss.min(axis=0), loss.max(axis=0)):
            assert np.any(np.all(np.isclose(band, [xi, lo], rtol=0, atol=1e-12), axis=1))
            assert np.any(np.all(np.isclose(band, [xi, hi], rtol=0, atol=1e-12), axis=1))
        assert lo < hi
    finally:
        plotting.pyplot().close(fig)


@pytest.mark.parametrize("args,match", [
    (["--repeats", 0], r"--repeats 0: expected a whole number of independent direction pairs, at least 1"),
    (["--repeats", 2, "--to", "OTHER"], r"--repeats 2 draws 2 independent random direction pairs, but --to fixes"),
    (["--repeats", 3, "--directions", "OTHER"], r"--repeats 3 draws 3 .* but --directions fixes the directions .*: "
                                                r"drop --repeats, or drop --directions"),
])
def test_cli_bad_repeats_are_refused_before_any_file(zoo, args, match):
    args = [zoo["m"] if a == "OTHER" else a for a in args]
    out = zoo["root"] / "bad.h5"
    res = lt("surface", zoo["m"], "--data", zoo["data"], *args, "-o", out, code=1)
    assert re.search(match, res.output), res.output
    assert not out.exists() and not (zoo["root"] / "bad.h5.partial").exists()


# ----------------------------------------------------------------------------- lt compare over the repeats
def test_compare_pairs_models_over_the_repeats(tmp_path):
    from scipy import stats

    from landscape_tools import compare as C

    jobs = [_job(6, dims=1, label="a"), _job(6, dims=1, label="same"), _job(6, dims=1, label="sharp", scale=2.0)]
    path = str(S.run_surface(jobs, str(tmp_path / "rep.h5"), S.SurfaceOptions(X)))
    comps = {c.b: c for c in C.compare_files([path], str(tmp_path / "cmp.h5"))}
    nodes = store.read_result(path).models
    for c in comps.values():
        assert [r.metric for r in c.rows] == ["surface sharpness", "surface curvature"]
    for row in comps["same"].rows:
        assert row.verdict == "no detectable difference" and row.estimate == 0
        assert row.paired and row.n_a == row.n_b == 6 and row.unit == "direction pairs, within one run"
    rise, curv = comps["sharp"].rows
    for row, name, reduce in ((rise, "sharpness_rise", lambda v: v), (curv, "sharpness_curvature",
                                                                      lambda v: v.mean(axis=1))):
        ua, ub = reduce(nodes["a"][name]), reduce(nodes["sharp"][name])          # the stored per-repeat values
        ref = stats.ttest_rel(ub, ua)
        ci = ref.confidence_interval(0.95)
        assert row.method == "paired t (scipy.stats.ttest_rel)" and row.paired and row.n_a == 6
        assert row.estimate == pytest.approx(float(np.mean(ub - ua)), rel=1e-12)
        assert (row.low, row.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
        assert row.verdict == "favours A", (row.quantity, row.low, row.high)    # a (unscaled) is the flatter
    cmp = store.read_result(str(tmp_path / "cmp.h5")).models["sharp-vs-a"]
    assert list(cmp["method"]) == ["paired t (scipy.stats.ttest_rel)"] * 2 and list(cmp["paired"]) == [True, True]


def test_compare_does_not_pair_different_direction_seeds(tmp_path):
    from landscape_tools import compare as C

    p1 = str(S.run_surface([_job(3, dims=1, label="a", seed=1)], str(tmp_path / "a.h5"), S.SurfaceOptions(X)))
    p2 = str(S.run_surface([_job(3, dims=1, label="b", seed=2)], str(tmp_path / "b.h5"), S.SurfaceOptions(X)))
    (c,) = C.compare_files([p1, p2], str(tmp_path / "cmp.h5"))
    for row in c.rows:
        assert not row.paired and "different" in row.note and row.method.startswith("Welch")


def test_cli_shards_of_a_repeats_run_merge_into_the_one_process_file(zoo):
    root = zoo["root"]
    common = ["--data", zoo["data"], "--batch-size", 6, "--x", "-1:1:3", "--y", "-1:1:3", "--repeats", 2]
    lt("surface", zoo["m"], *common, "-o", root / "whole.h5")
    for i in range(3):
        lt("surface", zoo["m"], *common, "--shard", f"{i}/3", "-o", root / f"sh{i}.h5")
    lt("merge", *(root / f"sh{i}.h5" for i in range(3)), "-o", root / "merged.h5")
    _assert_same(_all_arrays(root / "whole.h5"), _all_arrays(root / "merged.h5"))
    assert np.isfinite(store.read_result(root / "merged.h5").models["m"]["sharpness_rise"]).all()
