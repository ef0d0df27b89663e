"""`lt compare` (issue #16 item 2): intervals against scipy.stats on fixed arrays, their coverage by
simulation, verdict directions, two copies of one model (no detectable difference anywhere), a model
against a clearly worse one (detected on NLL), seeds as replicates, the file it writes and its forest plot."""
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from landscape_tools import compare as C
from landscape_tools import plotting, store
from landscape_tools.cli.main import cli
from landscape_tools.errors import ConfigError
from landscape_tools.evaluate import predictive_metrics
from tiny_files import tiny_checkpoint_and_data


def run(*args, code=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


A = np.array([0.31, 0.52, 0.18, 0.77, 0.45, 0.62, 0.29, 0.51, 0.40, 0.58])
B = np.array([0.35, 0.49, 0.30, 0.81, 0.52, 0.70, 0.33, 0.50, 0.47, 0.66])


# ----------------------------------------------------------------------------- intervals = scipy.stats
def test_paired_t_is_scipy_ttest_rel():
    got = C.paired_t(A, B, 0.95)
    ci = stats.ttest_rel(B, A).confidence_interval(0.95)
    assert (got.low, got.high) == (ci.low, ci.high)
    assert got.estimate == pytest.approx(np.mean(B - A), abs=1e-15)
    assert C.paired_t(A, B, 0.9).low == stats.ttest_rel(B, A).confidence_interval(0.9).low


def test_welch_t_is_scipy_ttest_ind_unequal_variances():
    got = C.welch_t(A[:4], B, 0.95)
    ci = stats.ttest_ind(B, A[:4], equal_var=False).confidence_interval(0.95)
    assert (got.low, got.high) == (ci.low, ci.high)
    assert got.estimate == pytest.approx(B.mean() - A[:4].mean(), abs=1e-15)


def test_bootstrap_is_scipy_bootstrap_with_the_same_generator():
    def median_diff(i, axis=-1):
        return np.median(B[i], axis=-1) - np.median(A[i], axis=-1)
    got = C.bootstrap_difference(lambda i: median_diff(i), len(A), resamples=500, seed=7)
    ref = stats.bootstrap((np.arange(len(A)),), median_diff, n_resamples=500, method="BCa", vectorized=True,
                          rng=np.random.default_rng(7), batch=2_000_000 // len(A)).confidence_interval
    assert (got.low, got.high) == (ref.low, ref.high)
    assert got.estimate == np.median(B) - np.median(A) and "BCa" in got.method
    # unpaired: A's and B's units resampled independently
    got = C.bootstrap_difference(lambda i: A[i].mean(-1), len(A), len(B) - 2, lambda j: B[:-2][j].mean(-1),
                                 resamples=500, seed=3)
    ref = stats.bootstrap((np.arange(len(A)), np.arange(len(B) - 2)),
                          lambda i, j, axis=-1: B[:-2][j].mean(-1) - A[i].mean(-1), n_resamples=500, method="BCa",
                          vectorized=True, rng=np.random.default_rng(3), batch=2_000_000 // len(A)).confidence_interval
    assert (got.low, got.high) == (ref.low, ref.high)


def test_identical_units_give_an_exact_zero_interval():
    for interval in (C.paired_t(A, A), C.welch_t(A[:1].repeat(3), A[:1].repeat(3)),
                     C.bootstrap_difference(lambda i: A[i].mean(-1) - A[i].mean(-1), len(A), resamples=200)):
        assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
        assert C.verdict(interval, "lower") == "no detectable difference"
    one = C.paired_t(A[:1], B[:1])                     # one unit: no interval, no verdict either way
    assert math.isnan(one.low) and C.verdict(one, "lower") == "no detectable difference"


def test_ece_is_evaluates_ece():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2, size=(300, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 300)
    correct = (p.argmax(1) == y).astype(float)
    assert float(C.ece(p.max(1), correct)) == pytest.approx(predictive_metrics(p, y)["ece"], rel=1e-12)


def test_verdict_direction_per_quantity():
    up = C.Interval(0.3, 0.1, 0.5, "t")                  # B - A clearly positive
    down = C.Interval(-0.3, -0.5, -0.1, "t")
    assert C.verdict(up, "lower") == "favours A" and C.verdict(up, "higher") == "favours B"
    assert C.verdict(down, "lower") == "favours B" and C.verdict(down, "higher") == "favours A"
    assert C.verdict(C.Interval(0.1, -0.1, 0.3, "t"), "lower") == "no detectable difference"


# ----------------------------------------------------------------------------- coverage by simulation
def rate(method, shift, trials=200):
    """Share of ``trials`` seeded synthetic comparisons (seed family 0) whose verdict is a detected difference."""
    detected = 0
    for t in range(trials):
        rng = np.random.default_rng([t, 0])
        interval, p = method(rng, shift)
        detected += C.verdict(interval, "lower", p, 0.05) != "no detectable difference"
    return detected / trials


def paired_units(rng, shift):          # 40 test samples seen by both models, correlated per-sample losses
    base = rng.gamma(2.0, 0.5, 40)
    interval = C.paired_t(base + rng.normal(0, 0.2, 40), base + shift + rng.normal(0, 0.2, 40))
    return interval, interval.p_value


def seeds(rng, shift):                 # 3 training seeds per model
    interval = C.welch_t(rng.normal(1.0, 0.05, 3), rng.normal(1.0 + shift, 0.05, 3))
    return interval, interval.p_value


def median_units(rng, shift):          # median |top eigenvalue| of 30 batches, paired, 99 resamples
    base = rng.normal(5.0, 1.0, 30)
    a, b = base + rng.normal(0, 0.3, 30), base + shift + rng.normal(0, 0.3, 30)
    return C.statistic_difference(lambda v: np.median(v, axis=-1), (a,), (b,), True, resamples=99,
                                  seed=int(rng.integers(1 << 31)))


def ece_units(rng, shift, n=150):      # ECE of 150 test samples, paired, 99 resamples; B over-confident by `shift`
    z = rng.normal(1.0, 1.0, n)
    conf_a, conf_b = (1 / (1 + np.exp(-(z + rng.normal(0, 0.3, n)))) for _ in range(2))
    ok_a, ok_b = rng.random(n) < conf_a, rng.random(n) < np.clip(conf_b - shift, 0, 1)
    return C.statistic_difference(C.ece, (conf_a, ok_a), (conf_b, ok_b), True, resamples=99,
                                  seed=int(rng.integers(1 << 31)))


@pytest.mark.parametrize("method, large", [(paired_units, 0.3), (seeds, 0.3), (median_units, 1.0), (ece_units, 0.3)])
def test_coverage_no_difference_and_large_difference(method, large):
    assert 1 - rate(method, 0.0) >= 0.93          # a true zero difference: "no detectable difference"
    assert rate(method, large) >= 0.95            # a large one: detected


# ----------------------------------------------------------------------------- real files
@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Every analysis of one tiny MC-dropout checkpoint, computed twice in one file (labels a, b)."""
    root = tmp_path_factory.mktemp("cmp")
    _, m, data = tiny_checkpoint_and_data(root, arch="resnet_mcdo_18", n=24)
    common = ["--data", data, "--split", "train", "--batch-size", 3]
    files = {k: root / f"{k}.h5" for k in ("evaluate", "hessian", "featvar", "surface")}
    run("evaluate", m, m, "--labels", "a,b", *common, "--mc", "1,3", "-o", files["evaluate"])
    run("hessian", m, m, "--labels", "a,b", *common, "--batches", 8, "--top-k", 2, "--tol", "1e-2", "--max-iter", 10,
        "-o", files["hessian"])
    run("featvar", m, m, "--labels", "a,b", *common, "--mc", 3, "-o", files["featvar"])
    run("surface", m, m, "--labels", "a,b", *common, "--x", "-1:1:3", "--y", "-1:1:3", "-o", files["surface"])
    return root, files


def test_two_copies_of_one_model_differ_nowhere(copies):
    root, files = copies
    out = root / "same.h5"
    res = run("compare", *files.values(), "-o", out)
    assert "b vs a: difference = b - a (B - A), 95% interval" in res.output
    node = store.read_result(out).models["b-vs-a"]
    analyses = set(node["analysis"])
    assert analyses == {"evaluate", "hessian", "featvar", "surface"}
    assert set(node["verdict"]) == {"no detectable difference"}
    assert np.all(node["estimate"] == 0) and np.all(node["paired"])
    quantities = list(node["quantity"])
    for q in ("NLL at N=3", "ECE at N=1", "accuracy at N=3", "Brier at N=1", "median |top eigenvalue| over batches",
              "negative eigenvalues per batch", "mean variance over layers",
              "rise from the centre to the border (sharpness)"):
        assert q in quantities
    assert any(q.startswith("MC samples to come within 2%") for q in quantities)


def test_file_records_method_and_provenance_and_is_never_overwritten(copies):
    root, files = copies
    out = root / "rec.h5"
    run("compare", files["evaluate"], "--level", 0.9, "--resamples", 300, "--seed", 5, "-o", out)
    res = store.read_result(out)
    assert res.kind == "compare" and res.attrs["format"] == "landscape-tools"
    assert res.attrs["level"] == 0.9 and res.attrs["resamples"] == 300 and res.attrs["bootstrap_seed"] == 5
    assert "ttest_rel" in res.attrs["methods"] and res.config["files"] == [str(files["evaluate"])]
    assert "generated_by" in res.attrs and "command" in res.attrs and res.attrs["seed"] == 5
    node = res.models["b-vs-a"]
    assert set(node["method"]) >= {"exact (no spread)"}
    shown = run("info", out).output
    assert "comparison b-vs-a:" in shown and "parameters, checkpoint ?" not in shown, shown
    again = run("compare", files["evaluate"], "-o", out, code=1)
    assert "already exists; pass --overwrite" in again.output
    run("compare", files["evaluate"], "-o", out, "--overwrite")


def test_forest_plot_draws_the_files_differences_and_intervals(copies, tmp_path):
    root, files = copies
    # a file whose differences are not all zero: the evaluate file against a copy relabelled
    out = tmp_path / "c.h5"
    run("compare", files["featvar"], files["hessian"], "-o", out)
    res = store.read_result(out)
    node = res.models["b-vs-a"]
    fig = plotting.figure([out])
    try:
        axes = [ax for ax in fig.axes if ax.get_visible()]
        layout = plotting.drawer("compare").panels(node)
        assert len(axes) == len(layout)
        for ax, (metric, rows) in zip(axes, layout):
            assert ax.get_title().startswith(metric)
            xs = np.concatenate([line.get_xdata() for line in ax.get_lines() if line.get_marker() == "o"])
            ys = np.concatenate([line.get_ydata() for line in ax.get_lines() if line.get_marker() == "o"])
            order = np.argsort(-ys)
            np.testing.assert_array_equal(np.asarray(xs)[order], node["estimate"][rows])
            segs = [s for coll in ax.collections for s in coll.get_segments()]
            finite = np.isfinite(node["low"][rows])
            assert len(segs) == finite.sum()
            for s, lo, hi in zip(segs, node["low"][rows][finite], node["high"][rows][finite]):
                assert (s[0][0], s[1][0]) == (lo, hi)
            labels = [t.get_text() for t in ax.get_yticklabels()]
            assert [lab.replace(" (no interval)", "") for lab in labels] == list(node["quantity"][rows])
    finally:
        plotting.pyplot().close(fig)
    run("plot", out, "-o", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_seeds_as_replicates_use_welch_on_per_seed_values(copies, tmp_path):
    root, files = copies
    out = tmp_path / "seeds.h5"
    # each label twice: the same file twice gives no spread, so the interval is exact and the verdict "none"
    run("compare", files["evaluate"], files["evaluate"], "-o", out)
    node = store.read_result(out).models["b-vs-a"]
    assert set(node["unit"]) == {"training seeds"} and set(node["n_a"]) == {2}
    assert set(node["verdict"]) == {"no detectable difference"}


def test_bad_inputs_are_explained(copies, tmp_path):
    root, files = copies
    res = run("compare", files["evaluate"], "--labels", "a,b,c", "-o", tmp_path / "x.h5", code=1)
    assert "--labels gives 3 labels for 2 model groups" in res.output
    res = run("compare", files["evaluate"], "--labels", "a,a", "-o", tmp_path / "x.h5", code=1)
    assert "lt compare needs two labels" in res.output
    res = run("compare", files["evaluate"], files["evaluate"], "--labels", "a,b,a,a", "-o", tmp_path / "x.h5", code=1)
    assert "label 'a' has 3 and 'b' 1 model groups" in res.output
    res = run("compare", files["evaluate"], files["hessian"], "--labels", "a,x,y,b", "-o", tmp_path / "x.h5", code=1)
    assert "nothing to compare for y vs a, b vs a: no analysis holds both labels" in res.output
    res = run("compare", files["evaluate"], "--level", 1.5, "-o", tmp_path / "x.h5", code=1)
    assert "--level 1.5: expected a confidence level between 0.5 and 1" in res.output
    assert not (tmp_path / "x.h5").exists()


# ----------------------------------------------------------------------------- a clearly worse model
def test_worse_model_is_detected_on_nll(tmp_path):
    """A small MLP trained on the built-in digits, against itself with every weight scaled by 0.5."""
    from landscape_tools.data import load_data

    from compare_models import digits_mlp

    train = load_data("digits", "train", batch_size=256)
    torch.manual_seed(0)
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = train.x, train.y
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "good.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    torch.save(model.state_dict(), tmp_path / "half.pt")
    ev = tmp_path / "ev.h5"
    run("evaluate", tmp_path / "good.pt", tmp_path / "half.pt", "--model", "compare_models:digits_mlp",
        "--data", "digits", "--mc", "1,5", "-o", ev)
    out = tmp_path / "c.h5"
    res = run("compare", ev, "-o", out)
    node = store.read_result(out).models["half-vs-good"]
    q = list(node["quantity"])
    for n in (1, 5):
        i = q.index(f"NLL at N={n}")
        assert node["verdict"][i] == "favours A" and node["low"][i] > 0 and node["paired"][i]
    assert "favours good (A)" in res.output
