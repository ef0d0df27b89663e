"""`lt plot`: figures from result files alone, and its error messages."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from landscape_tools import plotting, store
from landscape_tools.cli.main import cli
from landscape_tools.evaluate import ensemble_curve
from landscape_tools.plotting import evaluate as evaluate_fig


def provenance(kind, **kwargs):
    # str(): store.provenance returns torch.__version__, a str subclass h5py cannot write (reported)
    return {k: str(v) if isinstance(v, str) else v for k, v in store.provenance(kind, **kwargs).items()}


def evaluate_file(path, labels, dropout=0.5, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    nodes = {}
    for i, label in enumerate(labels):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))
        curve = ensemble_curve(model, [(x[:16], y[:16]), (x[16:], y[16:])], (1, 2, 4), seed=i)
        nodes[label] = curve.to_node({"checkpoint": f"{label}.pt", "checkpoint_sha256": "0" * 64, "arch": "mlp",
                                      "num_params": 67, "split": "test", "data_spec": "tensors:x.npz"})
    store.write_result(path, provenance("evaluate", config={}, seed=0), nodes)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    a = evaluate_file(root / "a.h5", ["plain", "smooth"])
    b = evaluate_file(root / "b.h5", ["plain", "deterministic"], dropout=0.0, seed=1)
    other = root / "other.h5"
    store.write_result(other, provenance("featvar", config={}, seed=0),
                       {"m": {"attrs": {}, "data": {"variance": np.ones(3)}}})
    return root, a, b, other


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_evaluate_curves(files, suffix):
    root, a, b, _ = files
    out = root / f"curves{suffix}"
    res = run("plot", a, b, "-o", out)
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"figure written to {out}"
    assert out.stat().st_size > 1000
    if suffix == ".svg":
        text = out.read_text()
        for word in ("ensemble size N (MC samples)", "NLL (nats)", "ECE (%)", "accuracy (%)"):
            assert word in text
        # repeated labels get their file's name; a model without dropout is marked
        assert "plain (a)" in text and "plain (b)" in text and "deterministic (no MC dropout)" in text


def test_dpi_sets_the_png_resolution(files):
    """--dpi scales the pixel size of a png in proportion (the default is 130)."""
    import matplotlib.image as mpimg
    root, a, _, _ = files
    sizes = {}
    for dpi in ("65", None):
        out = root / f"dpi{dpi}.png"
        res = run("plot", a, *(("--dpi", dpi) if dpi else ()), "-o", out)
        assert res.exit_code == 0, res.output
        sizes[dpi] = mpimg.imread(out).shape[:2]
    (h_low, w_low), (h, w) = sizes["65"], sizes[None]
    assert abs(w / w_low - 2.0) < 0.05 and abs(h / h_low - 2.0) < 0.05


def test_plot_evaluate_reliability_and_models(files):
    root, a, _, _ = files
    out = root / "rel.svg"
    res = run("plot", a, "--kind", "reliability", "--models", "smooth", "-o", out)
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "N = 4" in text and "smooth" in text and "confidence (max probability)" in text
    assert "plain" not in text


def test_draw_returns_figure_for_each_kind(files):
    _, a, b, _ = files
    results = [store.read_result(a), store.read_result(b)]
    for kind in (k for k in evaluate_fig.KINDS if k != "corruption"):   # that one: tests/test_corruptions.py
        fig = evaluate_fig.draw(results, kind)
        n_axes = len([ax for ax in fig.axes if ax.get_visible()])
        assert n_axes == (3 if kind == "curves" else 4)
        plotting.pyplot().close(fig)


def test_plot_help_lists_kinds():
    res = run("plot", "--help")
    assert res.exit_code == 0
    assert "Example:" in res.output
    assert "evaluate  curves (default), reliability" in " ".join(res.output.split("\n"))


def test_plot_errors(files, monkeypatch):
    root, a, _, other = files
    cases = [
        (["plot", a, "--kind", "contour", "-o", root / "x.png"],
         "Error: --kind 'contour' is not available for evaluate results; choose one of curves, reliability, "
         "corruption"),
        (["plot", a, "--models", "nobody", "-o", root / "x.png"],
         "Error: --models nobody not found; the files hold plain, smooth"),
        (["plot", a, "--models", "plain,", "-o", root / "x.png"],
         "Error: --models 'plain,' has an empty label; give labels separated by commas, e.g. --models plain,smooth"),
        (["plot", a, other, "-o", root / "x.png"],
         "Error: cannot draw results of different kinds together: evaluate, featvar"),
        (["plot", a, "-o", root / "x.jpg"], f"Error: figure {root / 'x.jpg'} must end in .png, .pdf, .svg"),
        (["plot", a, "-o", root / "missing" / "x.png"],
         f"Error: folder {root / 'missing'} for the figure x.png does not exist; create it first"),
        (["plot", root / "nope.h5", "-o", root / "x.png"], f"Error: result file {root / 'nope.h5'} does not exist"),
        (["plot", a, "--dpi", "5", "-o", root / "x.png"],
         "Error: --dpi 5 is outside 20..1200 (130 is the default; 300 suits print)"),
    ]
    foreign = root / "foreign.h5"
    import h5py
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "something-else"
    cases.append((["plot", foreign, "-o", root / "x.png"],
                  f"Error: {foreign} is not a landscape-tools result file (format 'something-else')"))
    for args, message in cases:
        res = run(*args)
        assert res.exit_code == 1, (args, res.output)
        assert res.output.strip() == message
        assert not (root / "x.png").exists()
    # a result kind whose drawing module is not installed
    bogus = root / "bogus.h5"
    store.write_result(bogus, provenance("bogus", config={}, seed=0), {"m": {"attrs": {}, "data": {}}})
    monkeypatch.setitem(plotting.DRAWERS, "bogus", "no_such_module")
    res = run("plot", bogus, "-o", root / "x.png")
    assert res.exit_code == 1
    assert res.output.strip() == ("Error: figures of bogus results are not available in this installation "
                                  "(no module landscape_tools.plotting.no_such_module)")
