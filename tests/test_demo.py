"""`lt demo --quick`: every checkpoint, result file, figure and the report; reproducible; refuses to clobber."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import store
from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.demo import (ANALYSES, FIGURES, MODELS, ONE_SEED, DemoConfig, claim_verdict, compared_claims,
                                  judge_claims, key_numbers)

LABELS = [label for label, _, _ in MODELS]
KEY_ARRAYS = {"evaluate": ("nll", "accuracy", "ece", "brier"), "hessian": ("eigenvalues", "residuals"),
              "surface": ("loss", "accuracy"), "featvar": ("variance",)}


def _demo(out, *extra):
    result = CliRunner().invoke(cli, ["demo", "--quick", "--device", "cpu", "-o", str(out), *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    _demo(out)
    return out


def _arrays(out):
    values = {}
    for kind in ANALYSES:
        res = store.read_result(out / f"{kind}.h5")
        for label in LABELS:
            for name in KEY_ARRAYS[kind]:
                values[kind, label, name] = np.asarray(res.models[label].data[name])
    return values


def test_quick_demo_writes_everything(demo_dir):
    for label, arch, _ in MODELS:
        model, info = load_checkpoint(demo_dir / f"{label}.pt")
        assert info.kind == "native" and info.arch == arch and info.dataset == "digits"
        assert info.meta["demo"]["config"]["name"] == "quick"
    for kind in ANALYSES:
        res = store.read_result(demo_dir / f"{kind}.h5")
        assert res.kind == kind
        assert list(res.models) == LABELS
        for label in LABELS:
            node = res.models[label]
            assert node.attrs["checkpoint"] == str(demo_dir / f"{label}.pt")
            assert {"checkpoint_sha256", "arch", "num_params"} <= set(node.attrs)
    assert not list(demo_dir.glob("*.partial")) and not list(demo_dir.glob("*.lock"))
    report = (demo_dir / "report.md").read_text()
    for label, arch, _ in MODELS:
        assert label in report and arch in report
    for _, _, fig, _ in FIGURES:
        png = demo_dir / fig
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({fig})" in report
    for claim in ("NLL and accuracy", "fewer MC samples", "Hessian eigenvalues", "loss surface",
                  "feature-map variance"):
        assert claim in report
    compared = store.read_result(demo_dir / "compare.h5")
    assert compared.kind == "compare" and list(compared.models) == ["smooth-vs-mcdo"]
    assert set(compared.models["smooth-vs-mcdo"]["analysis"]) == set(ANALYSES)
    assert (demo_dir / "compare_forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](compare_forest.png)" in report


def test_report_numbers_are_the_files_numbers(demo_dir):
    numbers = key_numbers({k: demo_dir / f"{k}.h5" for k in ANALYSES},
                          {label: demo_dir / f"{label}.pt" for label in LABELS})
    for label in LABELS:
        ev = store.read_result(demo_dir / "evaluate.h5").models[label].data
        assert numbers[label]["nll_max"] == ev["nll"][-1] and numbers[label]["accuracy_1"] == ev["accuracy"][0]
        eig = store.read_result(demo_dir / "hessian.h5").models[label].data["eigenvalues"]
        assert numbers[label]["negatives"] == int((eig < 0).sum())
        assert numbers[label]["top_max"] == np.abs(eig[:, 0]).max()
        loss = store.read_result(demo_dir / "surface.h5").models[label].data["loss"]
        c = loss.shape[0] // 2
        border = np.concatenate([loss[0], loss[-1], loss[1:-1, 0], loss[1:-1, -1]])
        assert numbers[label]["surface_rise"] == pytest.approx(border.mean() - loss[c, c])
    report = (demo_dir / "report.md").read_text()
    comparison = store.read_result(demo_dir / "compare.h5").models["smooth-vs-mcdo"]
    claims = compared_claims(judge_claims(numbers), comparison, numbers["mcdo"]["n_max"], 1)
    for claim in claims:              # one seed: no verdict, the intervals within the run beside the numbers
        assert f"| {claim['claim']} | **{ONE_SEED}** | {claim['evidence']} |" in report
        assert "within this run (test data only): " in claim["evidence"]
    nll = list(comparison["quantity"]).index(f"NLL at N={numbers['mcdo']['n_max']}")
    assert f"smooth - mcdo = {comparison['estimate'][nll]:.3g} [{comparison['low'][nll]:.3g}, " in claims[0]["evidence"]


def test_same_seed_same_numbers(demo_dir, tmp_path):
    _demo(tmp_path / "again")
    first, again = _arrays(demo_dir), _arrays(tmp_path / "again")
    for key, value in first.items():
        np.testing.assert_array_equal(value, again[key], err_msg=str(key))
    for label in LABELS:
        a = torch.load(demo_dir / f"{label}.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "again" / f"{label}.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_a_finished_demo_and_reuses_an_interrupted_one(demo_dir, tmp_path):
    before = (demo_dir / "report.md").read_text()
    result = CliRunner().invoke(cli, ["demo", "--quick", "-o", str(demo_dir)])
    assert result.exit_code == 1
    assert result.output.strip().endswith(f"Error: {demo_dir / 'report.md'} already exists (a finished demo); "
                                          f"pass --overwrite to run it again, or choose another -o")
    assert (demo_dir / "report.md").read_text() == before
    # an "interrupted" run: everything but the featvar file and the report
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in [f"{label}.pt" for label in LABELS] + [f"{k}.h5" for k in ANALYSES if k != "featvar"]:
        (partial / name).write_bytes((demo_dir / name).read_bytes())
    result = _demo(partial)
    assert "reused from an earlier run: mcdo.pt, smooth.pt, evaluate.h5, hessian.h5, surface.h5" in result.output
    np.testing.assert_array_equal(store.read_result(partial / "featvar.h5").models["smooth"].data["variance"],
                                  store.read_result(demo_dir / "featvar.h5").models["smooth"].data["variance"])
    # outputs of another seed are not mixed in
    (partial / "report.md").unlink()
    result = CliRunner().invoke(cli, ["demo", "--quick", "--seed", "1", "-o", str(partial)])
    assert result.exit_code == 1
    assert result.output.strip().endswith(f"Error: {partial / 'mcdo.pt'} was not made by this demo configuration "
                                          f"(quick, seed 1); pass --overwrite to replace it, or choose another -o")


def test_claims_are_computed_from_the_numbers():
    base = {"nll_max": 0.2, "accuracy_max": 0.9, "n_needed": 5, "nll_gain": 0.05, "n_max": 20, "top_median": 10.0,
            "negatives": 2, "eigenvalues": 20, "surface_rise": 1.0, "featvar_mean": 2.0,
            "featvar": {"a": 1.0, "b": 3.0}}
    better = dict(base, nll_max=0.1, accuracy_max=0.95, n_needed=2, nll_gain=0.01, top_median=5.0, negatives=0,
                  surface_rise=0.5, featvar_mean=1.0, featvar={"a": 0.5, "b": 1.5})
    verdicts = [c["verdict"] for c in judge_claims({"mcdo": base, "smooth": better})]
    assert verdicts == ["yes"] * 5
    verdicts = [c["verdict"] for c in judge_claims({"mcdo": better, "smooth": base})]
    assert verdicts == ["no"] * 5
    mixed = dict(better, accuracy_max=0.85, nll_gain=0.1, negatives=3, featvar={"a": 0.5, "b": 3.5})
    verdicts = [c["verdict"] for c in judge_claims({"mcdo": base, "smooth": mixed})]
    assert verdicts == ["mixed", "mixed", "mixed", "yes", "mixed"]
    # ties say nothing: equal accuracy leaves NLL to decide, no negatives anywhere leaves the magnitude
    tie = dict(better, accuracy_max=0.9, n_needed=5, negatives=0, featvar={"a": 1.0, "b": 1.5})
    verdicts = [c["verdict"] for c in judge_claims({"mcdo": dict(base, negatives=0), "smooth": tie})]
    assert verdicts == ["yes"] * 5


def test_quick_config_is_smaller_than_full():
    quick, full = DemoConfig.quick(), DemoConfig.full()
    assert quick.digest() != full.digest() and DemoConfig.quick(1).digest() != quick.digest()
    assert quick.epochs < full.epochs and quick.surface_points < full.surface_points


def test_claim_verdict_from_compare_verdicts():
    assert claim_verdict(["favours B", "favours B"]) == "yes"
    assert claim_verdict(["favours A"]) == "no: the opposite (favours mcdo)"
    assert claim_verdict(["favours A", "favours B"]) == "mixed"
    assert claim_verdict(["favours B", "no detectable difference"]).startswith("partly (1 of 2 favour smoothing")
    assert claim_verdict(["no detectable difference"] * 2) == "no detectable difference"


def test_two_seeds_compare_across_training_runs(demo_dir, tmp_path):
    """--seeds 2: seed 0 (copied from the one-seed demo, so reused) and seed 1 in their own folders,
    compare.h5 across the seeds (Welch t on per-seed values) and a report whose verdicts come from it."""
    out = tmp_path / "seeds"
    (out / "seed0").mkdir(parents=True)
    for name in [f"{label}.pt" for label in LABELS] + [f"{k}.h5" for k in ANALYSES] + ["report.md"]:
        (out / "seed0" / name).write_bytes((demo_dir / name).read_bytes())
    result = _demo(out, "--seeds", 2)
    assert "seeds 0..1" in result.output and "reused from an earlier run: mcdo.pt, smooth.pt" in result.output
    for seed in (0, 1):
        assert (out / f"seed{seed}" / "report.md").exists() and (out / f"seed{seed}" / "compare.h5").exists()
    node = store.read_result(out / "compare.h5").models["smooth-vs-mcdo"]
    assert set(node["unit"]) == {"training seeds"} and set(node["n_a"]) == {2} and set(node["n_b"]) == {2}
    i = list(node["quantity"]).index("mean variance over layers")
    per_seed = [float(np.nanmean(store.read_result(out / f"seed{s}" / "featvar.h5").models["smooth"]["variance"]))
                for s in (0, 1)]
    assert node["value_b"][i] == pytest.approx(np.mean(per_seed))
    report = (out / "report.md").read_text()
    numbers = {label: key_numbers({k: out / f"seed{s}" / f"{k}.h5" for k in ANALYSES},
                                  {lab: out / f"seed{s}" / f"{lab}.pt" for lab in LABELS})[label]
               for label in LABELS for s in (0,)}
    for claim in compared_claims(judge_claims(numbers), node, numbers["mcdo"]["n_max"], 2):
        assert f"| {claim['claim']} | **{claim['verdict']}** |" in report
        assert claim["verdict"] != ONE_SEED
    assert "[seed1/report.md](seed1/report.md)" in report and "](compare_forest.png)" in report


def test_a_demo_folder_of_another_seed_scheme_is_not_reused(monkeypatch):
    # its checkpoints were initialised and its analyses seeded by other derivations: refused, not mixed
    from landscape_tools import seeds
    now = DemoConfig.quick().digest()
    monkeypatch.setattr(seeds, "SEED_SCHEME", 1)
    assert DemoConfig.quick().digest() != now
