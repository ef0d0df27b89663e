"""benchmarks/gpu_check.py (issue #17 item 4) at --tiny sizes on the CPU: the same stages as on a GPU;
the table, the JSON, the agreements and the projection are checked against the result files."""
import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape_tools import store

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module          # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    g = load_script()
    root = tmp_path_factory.mktemp("gpu_check")
    printed = []
    compile_before = torch.compile
    report = g.check("cpu", tiny=True, json_path=str(root / "g.json"), compile_backend_name="eager",
                     keep=str(root / "files"), say=lambda *a, **k: printed.append(" ".join(map(str, a))))
    assert torch.compile is compile_before             # the backend patch is undone
    return g, report, root, printed


def node(path):
    return next(iter(store.read_result(path).models.values()))


def test_every_stage_runs_and_agrees(tiny_run):
    g, report, root, _ = tiny_run
    got = [(r.analysis, r.variant) for r in report.rows]
    assert got == [("hessian", "fp32"), ("hessian", "bf16"), ("surface", "fp32 warm-up"), ("surface", "fp32"),
                   ("surface", "bf16 warm-up"), ("surface", "bf16"), ("surface", "compiled"), ("featvar", "fp32"),
                   ("featvar", "bf16"), ("evaluate", "fp32"), ("evaluate", "bf16"), ("evaluate", "compiled"),
                   ("evaluate", "2 ranks")]
    assert report.rows[-1].work == "skipped"          # one CPU device: no 2-rank run unless --distributed on
    for r in report.rows[:-1]:
        assert r.seconds > 0 and r.peak_mib is None   # no CUDA memory counter on a CPU
        compared = r.variant not in ("fp32", "fp32 warm-up")
        assert (r.agreement is not None) == compared
        if compared:
            assert r.ok is True and r.agreement <= r.tolerance
    assert g.exit_status(report) == 0
    assert "5/5 converged" in report.rows[0].note


def test_agreements_recomputed_from_the_files(tiny_run):
    _, report, root, _ = tiny_run
    files = root / "files"
    rows = {(r.analysis, r.variant): r for r in report.rows}

    def rel(a, b):
        return np.max(np.abs(a - b)) / np.max(np.abs(b))

    h32, h16 = node(files / "hessian-fp32.h5"), node(files / "hessian-bf16.h5")
    assert h16.attrs["precision"] == "bf16" and h32.attrs["precision"] == "fp32"
    assert rows[("hessian", "bf16")].agreement == pytest.approx(
        rel(np.sort(h16["eigenvalues"]), np.sort(h32["eigenvalues"])), rel=1e-12)
    full = node(files / "surface-fp32.h5")
    assert full["loss"].shape == (9, 9)
    for variant, step in (("bf16", 2), ("compiled", 2), ("bf16 warm-up", 4)):
        sub = node(files / f"surface-{variant.replace(' ', '-')}.h5")
        # the smaller grid's points are points of the full grid (same directions, every step-th coordinate)
        np.testing.assert_allclose(sub["x"], full["x"][::step], rtol=0, atol=1e-12)
        np.testing.assert_allclose(sub["y"], full["y"][::step], rtol=0, atol=1e-12)
        expected = rel(sub["loss"], full["loss"][::step, ::step])
        assert rows[("surface", variant)].agreement == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert node(files / "surface-compiled.h5").attrs["compile"] is True
    assert node(files / "surface-bf16.h5").attrs["compile"] is False
    assert node(files / "surface-bf16.h5").attrs["precision"] == "bf16"
    f32, f16 = node(files / "featvar-fp32.h5"), node(files / "featvar-bf16.h5")
    assert rows[("featvar", "bf16")].agreement == pytest.approx(rel(f16["variance"], f32["variance"]), rel=1e-12)
    e32 = node(files / "evaluate-fp32.h5")
    np.testing.assert_array_equal(e32["n_samples"], [1, 2, 4])
    assert e32.attrs["num_samples"] == 64
    for variant in ("bf16", "compiled"):
        e = node(files / f"evaluate-{variant}.h5")
        assert rows[("evaluate", variant)].agreement == pytest.approx(rel(e["nll"], e32["nll"]), rel=1e-12, abs=1e-15)
    assert node(files / "evaluate-compiled.h5").attrs["compiled"] is True


def test_table_json_and_projection(tiny_run):
    g, report, root, printed = tiny_run
    saved = json.loads((root / "g.json").read_text())
    assert saved == json.loads(json.dumps(asdict(report)))
    assert saved["tiny"] is True and saved["device"] == "cpu" and saved["card"].startswith("CPU")
    table = printed[-2] if printed[-1].startswith("gpu_check: JSON") else printed[-1]
    assert table.startswith(f"gpu_check on {report.card} (cpu)")
    for r in report.rows:
        assert f"{r.analysis:<9} {r.variant:<13}" in table and f"{r.seconds:8.2f}" in table
    secs = {(r.analysis, r.variant): r.seconds for r in report.rows}
    p = saved["projection"]
    per32 = (secs[("surface", "fp32")] - secs[("surface", "fp32 warm-up")]) / (81 - 9)
    per16 = (secs[("surface", "bf16")] - secs[("surface", "bf16 warm-up")]) / (25 - 9)
    assert p["fp32"]["seconds_per_point"] == pytest.approx(max(per32, 0.0), rel=1e-12)
    assert p["bf16"]["seconds_per_point"] == pytest.approx(max(per16, 0.0), rel=1e-12)
    assert p["fp32"]["full_cifar_51x51_seconds"] == pytest.approx(max(per32, 0.0) * 50000 / 32 * 2601, rel=1e-12)
    assert f"fp32 {p['fp32']['full_cifar_51x51_seconds'] / 60:.1f} min" in table


def test_exit_status_torchrun_arguments_and_no_cuda(monkeypatch, capsys):
    g = load_script()
    bad = g.Report("cuda:0", "card", "2", "12", False,
                   rows=[g.Row("evaluate", "bf16", "w", 1.0, 2.0, 0.5, 0.05, False)])
    assert g.exit_status(bad) == 1
    args = ["evaluate", "m.pt", "--device", "cuda:0", "--mc", "1,2", "-o", "one.h5"]
    cmd = g.torchrun_args(args, Path("two.h5"))
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    tail = cmd[cmd.index("landscape_tools.cli.main") + 1:]
    assert tail == ["evaluate", "m.pt", "--device", "cuda", "--mc", "1,2", "-o", "two.h5"]   # cuda:LOCAL_RANK each
    assert args[-1] == "one.h5"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert g.main(["--device", "cuda"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_a_failing_stage_is_reported_and_the_rest_still_runs(tmp_path):
    g = load_script()
    original = g.stages

    def only_evaluate(*args):
        runs = [r for r in original(*args) if r["analysis"] == "evaluate" and r["variant"] in ("fp32", "bf16")]
        bad = runs[1]["args"]
        bad[bad.index("--mc") + 1] = "0"              # refused by lt evaluate
        return runs
    g.stages = only_evaluate
    report = g.check("cpu", tiny=True, json_path=None, compile_backend_name="eager", say=lambda *a, **k: None)
    rows = {(r.analysis, r.variant): r for r in report.rows}
    assert rows[("evaluate", "fp32")].ok is None and rows[("evaluate", "fp32")].seconds > 0
    bad = rows[("evaluate", "bf16")]
    assert bad.ok is False and bad.note.startswith("FAILED: ") and "ensemble size 0 must be at least 1" in bad.note
    assert "fp32" not in report.projection and g.exit_status(report) == 1      # no surface: no projection
    assert "FAILED" in g.table(report)
