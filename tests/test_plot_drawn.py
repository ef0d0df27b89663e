"""What every figure draws: the plotted arrays equal the result file's, with its axis labels and legend.

Result files are made by the real commands (`lt surface`, `lt hessian`, `lt featvar`, `lt evaluate`) on
tiny zoo checkpoints. Figures come from :func:`landscape_tools.plotting.figure`, the code path of
`lt plot` and of every `--plot`; figures drawn by `--plot` and `lt plot` are captured and checked too.
"""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.contour import ContourSet
from matplotlib.patches import Rectangle, StepPatch
from scipy.stats import gaussian_kde

from landscape_tools import _lanczos, plotting, store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.errors import ConfigError
from landscape_tools.models import build_model
from tiny_files import random_tensors, tiny_checkpoint_and_data


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def close(fig):
    plotting.pyplot().close(fig)


@pytest.fixture
def captured(monkeypatch):
    """Figures drawn by `lt plot` / `--plot` during a test, in order."""
    figs = []
    real = plotting.figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        figs.append(fig)
        return fig

    monkeypatch.setattr(plotting, "figure", spy)
    yield figs
    for fig in figs:
        close(fig)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """m.pt (the centre) and p1..p3.pt (other seeds, the same architecture), 12 grey 8x8 samples."""
    root = tmp_path_factory.mktemp("drawn")
    _, ckpt, data = tiny_checkpoint_and_data(root)
    others = []
    for k in (1, 2, 3):
        torch.manual_seed(k)
        m = build_model("resnet_dnn_18", width=4, num_classes=3, in_channels=1)
        others.append(root / f"p{k}.pt")
        save_checkpoint(others[-1], m, "resnet_dnn_18", m.arch_kwargs, {})
    return {"root": root, "m": ckpt, "p": others, "data": data}


def surface(zoo, *args):
    return run("surface", zoo["m"], "--data", zoo["data"], "--batch-size", 6, *args)


@pytest.fixture(scope="module")
def surfaces(zoo):
    """Two models on one 3 x 4 grid (no y = 0), and a 1-D line to another checkpoint."""
    root = zoo["root"]
    run("surface", zoo["m"], zoo["p"][0], "--labels", "a,b", "--data", zoo["data"], "--batch-size", 6,
        "--x", "-1:1:3", "--y", "-1:1:4", "-o", root / "two.h5")
    surface(zoo, "--to", zoo["p"][0], "--x", "-0.5:1.5:5", "-o", root / "line.h5")
    return {"two": root / "two.h5", "line": root / "line.h5"}


def grid_of(path):
    res = store.read_result(path)
    return [(label, np.asarray(n.data["x"]), np.asarray(n.data.get("y")), np.asarray(n.data["loss"]),
             np.asarray(n.data["accuracy"]), n) for label, n in res.models.items()]


def contour_set(ax):
    found = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert len(found) == 1
    return found[0]


def colorbar_label(fig):
    return fig.axes[-1].get_ylabel()


def assert_vertices_on_levels(cs, x, y, z, per_level):
    """Every contour vertex on a grid edge (not at a grid node) sits where the file's values along that edge,
    linearly interpolated, cross its level (``per_level``: path k is level k) or one of the levels (filled
    bands).  Checked as the fraction along the edge, so it holds whatever the scale of the values."""
    levels = np.asarray(cs.levels, dtype=float)
    on_edges = 0
    for k, path in enumerate(cs.get_paths()):
        for vx, vy in path.vertices:
            ix, iy = np.flatnonzero(np.abs(x - vx) <= 1e-12), np.flatnonzero(np.abs(y - vy) <= 1e-12)
            if len(ix) == len(iy):                           # at a node, or inside a cell (inline labels)
                continue
            if len(ix):                                      # on the line x = x[i], between y[j] and y[j + 1]
                i = ix[0]
                j = min(int(np.searchsorted(y, vy)) - 1, len(y) - 2)
                t, z0, z1 = (vy - y[j]) / (y[j + 1] - y[j]), z[i, j], z[i, j + 1]
            else:
                j = iy[0]
                i = min(int(np.searchsorted(x, vx)) - 1, len(x) - 2)
                t, z0, z1 = (vx - x[i]) / (x[i + 1] - x[i]), z[i, j], z[i + 1, j]
            crossing = (levels[[k]] if per_level else levels) - z0
            assert np.min(np.abs(crossing / (z1 - z0) - t)) <= 1e-9, (vx, vy, levels[k] if per_level else levels)
            on_edges += 1
    assert on_edges > 0


def assert_geometric(levels):
    ratios = np.asarray(levels[1:]) / np.asarray(levels[:-1])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    assert ratios[0] > 1


# ----------------------------------------------------------------------------- surfaces
@pytest.mark.parametrize("log", [False, True])
def test_contour_draws_the_files_loss_on_linear_or_geometric_levels(surfaces, log):
    panels = grid_of(surfaces["two"])
    lo = min(float(p[3].min()) for p in panels)
    hi = max(float(p[3].max()) for p in panels)
    fig = plotting.figure([surfaces["two"]], kind="contour", log=log)
    expected = np.geomspace(lo, hi, 20) if log else np.linspace(lo, hi, 20)
    for ax, (label, x, y, loss, _, _) in zip(fig.axes, panels):
        assert ax.get_title() == label and (ax.get_xlabel(), ax.get_ylabel()) == ("x", "y")
        cs = contour_set(ax)
        np.testing.assert_allclose(cs.levels, expected, rtol=1e-12)
        assert (cs.zmin, cs.zmax) == (loss.min(), loss.max())
        assert_vertices_on_levels(cs, x, y, loss, per_level=True)
    if log:
        assert_geometric(contour_set(fig.axes[0]).levels)
    assert colorbar_label(fig) == ("loss (log scale)" if log else "loss")
    close(fig)


def test_filled_bands_are_bounded_by_the_files_levels(surfaces):
    panels = grid_of(surfaces["two"])
    lo = min(float(p[3].min()) for p in panels)
    hi = max(float(p[3].max()) for p in panels)
    fig = plotting.figure([surfaces["two"]], kind="filled", log=False)
    for ax, (label, x, y, loss, _, _) in zip(fig.axes, panels):
        cs = contour_set(ax)
        assert cs.filled and ax.get_title() == label
        np.testing.assert_allclose(cs.levels, np.linspace(lo, hi, 20), rtol=1e-12)
        assert (cs.zmin, cs.zmax) == (loss.min(), loss.max())
        assert_vertices_on_levels(cs, x, y, loss, per_level=False)
    assert colorbar_label(fig) == "loss"
    close(fig)


def test_heatmap_cells_are_the_files_loss(surfaces):
    fig = plotting.figure([surfaces["two"]], kind="heatmap", log=False)
    panels = grid_of(surfaces["two"])
    for ax, (label, x, y, loss, _, _) in zip(fig.axes, panels):
        mesh = ax.collections[0]
        np.testing.assert_array_equal(np.ma.getdata(mesh.get_array()), loss)     # loss[i, j] at (x[i], y[j])
        corners = mesh.get_coordinates()                                         # (nx + 1, ny + 1, 2) edges
        np.testing.assert_allclose((corners[:-1, :-1, 0] + corners[1:, 1:, 0]) / 2, np.repeat(x[:, None], len(y), 1))
        np.testing.assert_allclose((corners[:-1, :-1, 1] + corners[1:, 1:, 1]) / 2, np.repeat(y[None, :], len(x), 0))
        assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("x", "y", label)
    assert colorbar_label(fig) == "loss"
    close(fig)


@pytest.mark.parametrize("log", [False, True])
def test_3d_faces_are_the_files_loss(surfaces, log):
    fig = plotting.figure([surfaces["two"]], kind="3d", log=log)
    for ax, (label, x, y, loss, _, _) in zip(fig.axes, grid_of(surfaces["two"])):
        z = np.log10(loss) if log else loss
        faces = ax.collections[0]
        # each face's value is the mean of its four corners, faces in (x, y) row order
        quad = (z[:-1, :-1] + z[1:, :-1] + z[:-1, 1:] + z[1:, 1:]).ravel() / 4
        np.testing.assert_allclose(np.asarray(faces.get_array()), quad, rtol=1e-12)
        assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()) == ("x", "y", "log10 loss" if log else "loss")
        assert ax.get_title() == label
    close(fig)


def test_line_draws_loss_and_accuracy_of_the_file(surfaces, captured):
    (label, x, _, loss, acc, node), = grid_of(surfaces["line"])
    run("plot", surfaces["line"], "-o", surfaces["line"].with_suffix(".png"))
    fig, = captured
    ax, twin = fig.axes
    np.testing.assert_array_equal(ax.get_lines()[0].get_xydata(), np.c_[x, loss])
    np.testing.assert_array_equal(twin.get_lines()[0].get_xydata(), np.c_[x, acc])
    assert ax.get_xlabel() == "x" and ax.get_ylabel() == "loss (NLL)" and twin.get_ylabel() == "accuracy"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "accuracy"]
    assert ax.get_yscale() == "linear"
    # the two checkpoints of --to are marked at x = 0 and x = 1
    marks = sorted(float(line.get_xdata()[0]) for line in ax.get_lines()[1:])
    assert marks == [0.0, 1.0]
    run("plot", surfaces["line"], "--log", "-o", surfaces["line"].with_suffix(".png"))
    assert captured[1].axes[0].get_yscale() == "log"
    assert captured[1].axes[0].get_ylabel() == "loss (NLL), log scale"


def test_line_of_a_2d_surface_is_its_row_nearest_y_0(surfaces):
    fig = plotting.figure([surfaces["two"]], kind="line")
    for ax, (label, x, y, loss, acc, _) in zip([a for a in fig.axes if a.get_title()], grid_of(surfaces["two"])):
        j = int(np.argmin(np.abs(y)))
        np.testing.assert_array_equal(ax.get_lines()[0].get_xydata(), np.c_[x, loss[:, j]])
        assert ax.get_title() == f"{label} (y = {y[j]:.3g})"
    close(fig)


def test_loss_spanning_decades_gets_log_levels_by_default(zoo, captured):
    root = zoo["root"]
    wide, fig_path = root / "wide.h5", root / "wide.png"
    surface(zoo, "--x", "-20:20:5", "--y", "-20:20:5", "-o", wide, "--plot", fig_path)
    (_, x, y, loss, _, _), = grid_of(wide)
    assert loss.min() > 0 and loss.max() / loss.min() > 100        # the premise: decades of loss
    run("plot", wide, "--kind", "filled", "-o", fig_path)
    run("plot", wide, "--no-log", "-o", fig_path)
    by_plot, filled, forced_linear = captured
    for fig in (by_plot, filled):
        cs = contour_set(fig.axes[0])
        np.testing.assert_allclose(cs.levels, np.geomspace(loss.min(), loss.max(), 20), rtol=1e-12)
        assert colorbar_label(fig) == "loss (log scale)"
    assert_vertices_on_levels(contour_set(by_plot.axes[0]), x, y, loss, per_level=True)
    np.testing.assert_allclose(contour_set(forced_linear.axes[0]).levels,
                               np.linspace(loss.min(), loss.max(), 20), rtol=1e-12)
    assert colorbar_label(forced_linear) == "loss"


def test_narrow_loss_stays_linear_by_default(surfaces):
    fig = plotting.figure([surfaces["two"]])
    levels = contour_set(fig.axes[0]).levels
    np.testing.assert_allclose(np.diff(levels), np.diff(levels)[0], rtol=1e-9)
    assert colorbar_label(fig) == "loss"
    close(fig)


def test_log_on_values_not_all_positive_is_a_clear_error(surfaces):
    with pytest.raises(ConfigError, match=r"--log needs positive values, but the smallest loss \(vmin\) is 0: "
                                          r"draw it with linear levels \(--no-log\)"):
        plotting.figure([surfaces["two"]], log=True, vmin=0.0)


def test_pca_draws_trajectory_and_each_checkpoints_distance_from_the_plane(zoo, captured):
    root = zoo["root"]
    out = root / "pca.h5"
    surface(zoo, "--pca", ",".join(str(p) for p in zoo["p"]), "--x", "-1:1:3", "--y", "-1:1:3", "-o", out,
            "--plot", root / "pca.png")
    run("plot", out, "--kind", "heatmap", "-o", root / "pca-heat.png")
    d = store.read_result(out).models["m"].groups["directions"]
    coords, dist = d.data["trajectory_coords"], d.data["trajectory_distance"]
    labels = [str(v) for v in d.data["trajectory_labels"]]
    ev = d.data["explained_variance_ratio"]
    assert labels == ["p1", "p2", "p3"] and np.all(dist > 0)
    for fig in captured:
        top, bottom = fig.axes[0], fig.axes[1]
        trajectory = [line for line in top.get_lines() if line.get_label() == "trajectory"]
        np.testing.assert_array_equal(trajectory[0].get_xydata(), coords)
        assert top.get_xlabel() == f"PC1 ({100 * ev[0]:.1f}%)" and top.get_ylabel() == f"PC2 ({100 * ev[1]:.1f}%)"
        assert [t.get_text() for t in top.get_legend().get_texts()] == ["trajectory", "centre (MODEL)"]
        np.testing.assert_array_equal(bottom.get_lines()[0].get_xydata(), np.c_[np.arange(3), dist])
        assert [t.get_text() for t in bottom.get_xticklabels()] == labels
        assert bottom.get_xlabel() == "checkpoint (training order)"
        assert bottom.get_ylabel() == "distance from\nthe plane"


# ----------------------------------------------------------------------------- hessian
@pytest.fixture(scope="module")
def hessian_file(zoo):
    out = zoo["root"] / "h.h5"
    run("hessian", zoo["m"], "--data", zoo["data"], "--batch-size", 6, "--batches", 2, "--top-k", 3, "--tol", "1e-3",
        "--density", "--density-runs", 2, "--density-steps", 6, "--device", "cpu", "-o", out)
    return out


def expected_density(node, grid):
    d = node.groups["density"].data
    nodes, weights = np.asarray(d["nodes"]), np.asarray(d["weights"])
    sigma = float(np.median(d["sigma"]))
    np.testing.assert_allclose(grid[[0, -1]], [nodes.min() - 5 * sigma, nodes.max() + 5 * sigma], rtol=1e-12)
    dens = np.mean([_lanczos.smooth_density(nodes[r], weights[r], grid, sigma) for r in range(len(nodes))], axis=0)
    return np.maximum(dens, 1e-12), sigma


def check_density_axes(ax, node):
    line, = ax.get_lines()
    grid, drawn = line.get_xdata(), line.get_ydata()
    expected, _ = expected_density(node, grid)
    np.testing.assert_allclose(drawn, expected, rtol=1e-12)
    assert abs(np.trapezoid(drawn, grid) - 1) < 1e-3          # each run's weights sum to 1
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) == ("eigenvalue", "density (log)", "log")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["m (2 x 2 runs)"]


def test_spectrum_with_density_draws_both(zoo, hessian_file, captured):
    run("plot", hessian_file, "-o", zoo["root"] / "h.png")
    fig, = captured
    node = store.read_result(hessian_file).models["m"]
    ev = np.asarray(node["eigenvalues"]).ravel()
    ax_n, ax_p, ax_d = fig.axes
    assert (ax_n.get_title(), ax_p.get_title()) == ("negative eigenvalues", "positive eigenvalues")
    for ax, part, text in ((ax_n, ev[ev < 0], f"m ({int((ev < 0).sum())} neg.)"), (ax_p, ev[ev >= 0], "m (n=6)")):
        assert ax.get_xlabel() == "eigenvalue"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [text]
        line, = ax.get_lines()
        if part.size == 0:
            assert line.get_xydata().size == 0
            continue
        assert part.size >= 2 and np.ptp(part) > 0         # a real KDE, not the one-value fallback
        grid = line.get_xdata()
        np.testing.assert_allclose(line.get_ydata(), gaussian_kde(part)(grid) * part.size / ev.size, rtol=1e-10)
    assert ax_n.get_ylabel() == "density"
    check_density_axes(ax_d, node)
    assert ax_d.get_title().startswith("spectral density (SLQ")


def test_spectrum_without_density_has_no_density_panel(zoo):
    out = zoo["root"] / "h-plain.h5"
    run("hessian", zoo["m"], "--data", zoo["data"], "--batch-size", 6, "--batches", 1, "--top-k", 2, "--tol", "1e-3",
        "--device", "cpu", "-o", out)
    fig = plotting.figure([out])
    assert [ax.get_title() for ax in fig.axes] == ["negative eigenvalues", "positive eigenvalues"]
    close(fig)


def test_density_kind_is_the_files_slq_density(hessian_file):
    fig = plotting.figure([hessian_file], kind="density")
    ax, = fig.axes
    check_density_axes(ax, store.read_result(hessian_file).models["m"])
    close(fig)


def test_log_is_refused_for_other_kinds(hessian_file, tmp_path):
    res = CliRunner().invoke(cli, ["plot", str(hessian_file), "--log", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 1
    assert res.output.strip() == ("Error: --log applies to surface figures only, not to hessian results "
                                  "(their log axes are fixed)")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- featvar, evaluate
@pytest.fixture(scope="module")
def mc_models(tmp_path_factory):
    """Two MC-dropout zoo models (one with smoothing layers) and 12x12 data with a test split."""
    root = tmp_path_factory.mktemp("drawn_mc")
    data = random_tensors(root / "data.npz", 6, 10, (1, 12, 12))
    paths = []
    for name, label in (("resnet_mcdo_18", "mcdo"), ("resnet_mcdo_smoothing_18", "smooth")):
        torch.manual_seed(1)
        model = build_model(name, num_classes=3, in_channels=1, width=4)
        paths.append(root / f"{label}.pt")
        save_checkpoint(paths[-1], model, name, model.arch_kwargs, {"dataset": f"tensors:{data}"})
    return root, f"tensors:{data}", paths


@pytest.fixture(scope="module")
def featvar_file(mc_models):
    root, data, paths = mc_models
    out = root / "featvar.h5"
    run("featvar", *paths, "--data", data, "--mc", 4, "--batch-size", 4, "--fourier", "-o", out)
    return out


def test_featvar_variance_against_depth(featvar_file, captured):
    run("plot", featvar_file, "-o", featvar_file.with_suffix(".png"))
    fig, = captured
    ax, = fig.axes
    models = store.read_result(featvar_file).models
    expected_legend = []
    for label, node in models.items():
        var = np.asarray(node["variance"], float)
        line, = [ln for ln in ax.get_lines() if ln.get_label() == label]
        np.testing.assert_array_equal(line.get_xydata(), np.c_[node["depth"], np.where(var > 0, var, np.nan)])
        smooth, down = np.asarray(node["is_smoothing"], bool), np.asarray(node["is_downsampling"], bool)
        if smooth.any():
            marks, = [ln for ln in ax.get_lines() if ln.get_label() == f"{label}: after smoothing"]
            np.testing.assert_array_equal(marks.get_xydata(), np.c_[node["depth"][smooth], var[smooth]])
            expected_legend.append(f"{label}: after smoothing")
        if down.any():
            expected_legend.append(f"{label}: downsampling")
        expected_legend.append(label)
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(expected_legend)
    assert ax.get_xlabel().startswith("normalised depth") and ax.get_ylabel() == "feature-map variance"
    assert ax.get_yscale() == "log"


def test_featvar_fourier_curves_per_layer(featvar_file):
    fig = plotting.figure([featvar_file], kind="fourier")
    models = store.read_result(featvar_file).models
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == list(models)
    for ax, node in zip(panels, models.values()):
        freq, amp = np.asarray(node["fourier/frequency"]), np.asarray(node["fourier/amplitude"])
        drawn = {line.get_label(): line.get_xydata() for line in ax.get_lines()}
        names = [str(n) for n in node["layers"]]
        expected = {}
        for i, name in enumerate(names):
            keep = np.isfinite(freq[i]) & np.isfinite(amp[i])
            if keep.sum() >= 2:
                expected[name] = np.c_[freq[i, keep], amp[i, keep]]
        assert list(drawn) == list(expected) and expected
        for name in expected:
            np.testing.assert_array_equal(drawn[name], expected[name])
        assert ax.get_xlabel() == "frequency"
    assert panels[0].get_ylabel() == "Δ log amplitude"
    assert fig.axes[-1].get_ylabel() == "normalised depth"
    close(fig)


@pytest.fixture(scope="module")
def evaluate_file(mc_models):
    root, data, paths = mc_models
    out = root / "evaluate.h5"
    run("evaluate", *paths, "--data", data, "--mc", "1,2,4", "--batch-size", 4, "-o", out)
    return out


def test_evaluate_curves_against_ensemble_size(evaluate_file):
    fig = plotting.figure([evaluate_file], kind="curves")
    models = store.read_result(evaluate_file).models
    panels = (("nll", "NLL (nats)", 1.0), ("accuracy", "accuracy (%)", 100.0), ("ece", "ECE (%)", 100.0))
    assert len(fig.axes) == 3
    for ax, (key, ylabel, scale) in zip(fig.axes, panels):
        for line, (label, node) in zip(ax.get_lines(), models.items()):
            assert line.get_label() == label
            np.testing.assert_allclose(line.get_xydata(), np.c_[node["n_samples"], np.asarray(node[key]) * scale],
                                       rtol=1e-12)
        assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale()) == ("ensemble size N (MC samples)", ylabel, "log")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(models)
    close(fig)


def test_evaluate_reliability_bars_are_the_files_bins(evaluate_file):
    fig = plotting.figure([evaluate_file], kind="reliability")
    models = store.read_result(evaluate_file).models
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(models)
    for ax, (label, node) in zip(panels, models.items()):
        rel = node.groups["reliability"].data
        j = int(np.argmax(node["n_samples"]))
        edges = np.asarray(rel["bin_edges"], float)
        counts, acc, conf = np.asarray(rel["counts"])[j], np.asarray(rel["accuracy"])[j], np.asarray(rel["confidence"])[j]
        filled = counts > 0
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        n = int(filled.sum())
        assert len(bars) == 2 * n
        accuracy_bars, gap_bars = bars[:n], bars[n:]
        np.testing.assert_allclose([b.get_height() for b in accuracy_bars], acc[filled], rtol=1e-12)
        np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in accuracy_bars],
                                   ((edges[:-1] + edges[1:]) / 2)[filled], rtol=1e-12)
        np.testing.assert_allclose([b.get_height() for b in gap_bars], np.abs(acc - conf)[filled], rtol=1e-12)
        np.testing.assert_allclose([b.get_y() for b in gap_bars], np.minimum(acc, conf)[filled], rtol=1e-12)
        stairs, = [p for p in ax.patches if isinstance(p, StepPatch)]
        np.testing.assert_allclose(stairs.get_data().values, counts / counts.sum(), rtol=1e-12)
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("confidence (max probability)", "accuracy")
        assert ax.get_title().startswith(f"{label}\nN = {int(node['n_samples'][j])}")
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == [
        "accuracy", "gap to mean confidence", "perfect calibration", "share of samples in the bin"]
    close(fig)


def test_plot_help_shows_log_examples():
    res = run("plot", "--help")
    text = " ".join(res.output.split())
    assert "--log / --no-log" in text
    assert "lt plot surface.h5 --log -o surface-log.png" in text
    assert "lt plot surface.h5 --kind filled --no-log -o lin.png" in text
