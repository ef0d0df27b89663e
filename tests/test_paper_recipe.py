"""examples/paper/: the tiny profile of reproduce.sh end to end as a real process (killed once and
resumed), every number of its report checked against the result files read with h5py, and slurm.sh's
submission graph on the fake Slurm of tests/fake_slurm/."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
REPRODUCE = ROOT / "examples" / "paper" / "reproduce.sh"
SLURM = ROOT / "examples" / "paper" / "slurm.sh"
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"
LT = f"{sys.executable} -m landscape_tools.cli.main"
MODELS = ("dnn", "dnn_smoothing", "mcdo", "mcdo_smoothing")


def env(**extra):
    e = dict(os.environ, LT_PROFILE="tiny", LT=LT, LT_PYTHON=sys.executable, LT_DEVICE="cpu", MPLBACKEND="Agg")
    e.pop("LT_DATA", None)
    e.update(extra)
    return e


def table(report: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header starts with ``header_start``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def close(text: str, value: float, decimals: int) -> bool:
    return abs(float(text) - value) <= 0.51 * 10 ** -decimals + 1e-12


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny pipeline, SIGTERMed once after its first evaluate file appears and run again to the end."""
    out = tmp_path_factory.mktemp("paper") / "out"
    first = subprocess.Popen([str(REPRODUCE), str(out)], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 1800
    while not (out / "evaluate" / "dnn.h5").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the tiny pipeline did not reach its evaluate stage"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGTERM)
    first_log = first.communicate(timeout=300)[0]
    assert first.returncode != 0, first_log
    assert not (out / "report.md").exists()
    kept = {p: p.stat().st_mtime_ns for p in [*(out / "models").glob("*.pt"), out / "evaluate" / "dnn.h5"]}
    assert len(kept) == 5
    start = time.monotonic()
    second = subprocess.run([str(REPRODUCE), str(out)], env=env(), capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stdout + second.stderr
    return out, kept, second.stderr, time.monotonic() - start


def test_rerun_after_kill_continues(tiny_run):
    out, kept, log, _ = tiny_run
    # what was finished before the kill is reused, not recomputed
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, path
        assert f"done already: {path}" in log
    assert "run_lt train" not in log
    assert (out / "report.md").exists()


def test_report_numbers_are_the_files_numbers(tiny_run):
    out, _, _, _ = tiny_run
    report = (out / "report.md").read_text()
    # ours beside the published numbers
    published = {}
    with open(ROOT / "examples" / "paper" / "published.csv") as f:
        for r in csv.DictReader(line for line in f if not line.startswith("#")):
            published[(r["model"], int(r["n"]))] = (float(r["nll"]), float(r["accuracy_pct"]), float(r["ece_pct"]))
    rows = table(report, "| model | N | NLL | published NLL")
    assert [(r[0], int(r[1])) for r in rows] == [(m, n) for m in MODELS for n in (1, 2, 50)]
    for model, n, nll, p_nll, acc, p_acc, ece, p_ece in rows:
        pair = model.replace("_smoothing", "")
        with h5py.File(out / "evaluate" / f"{pair}.h5", "r") as f:
            g = f[model]
            j = list(g["n_samples"][()]).index(int(n))
            assert close(nll, g["nll"][j], 4) and close(acc, 100 * g["accuracy"][j], 2)
            assert close(ece, 100 * g["ece"][j], 2)
        pub = published.get((model, int(n))) or published[(model, 1)]
        assert (float(p_nll), float(p_acc), float(p_ece)) == pytest.approx(pub)
    # the key numbers, column per model
    key = {r[0]: dict(zip(MODELS, r[1:])) for r in table(report, "| | dnn | dnn_smoothing | mcdo | mcdo_smoothing |")}
    for model in MODELS:
        pair = model.replace("_smoothing", "")
        with h5py.File(out / "hessian" / f"{pair}.h5", "r") as f:
            ev = f[model]["eigenvalues"][()]
            assert ev.shape == (2, 5)
            assert close(key["Hessian: median top abs(eigenvalue) over batches"][model], np.median(np.abs(ev[:, 0])), 4)
            assert key["Hessian: negative eigenvalues"][model] == f"{int((ev < 0).sum())} of 10"
        with h5py.File(out / "featvar" / f"{pair}.h5", "r") as f:
            row = "feature-map MC variance, mean over stages" if pair == "mcdo" else \
                "feature-map spatial variance, mean over stages"
            assert close(key[row][model], np.nanmean(f[model]["variance"][()]), 4)
        with h5py.File(out / "robustness" / f"{pair}.h5", "r") as f:
            groups = f[model]["corruptions"]
            assert len(groups) == 9
            nll = np.mean([groups[c]["nll"][()] for c in groups], axis=(0, 1))      # corruptions x severities
            acc = np.mean([groups[c]["accuracy"][()] for c in groups], axis=(0, 1))
            assert all(groups[c]["severity"][()].tolist() == [1, 2, 3, 4, 5] for c in groups)
            assert close(key["corrupted NLL, N = 1, mean over corruptions x severities"][model], nll[0], 4)
            assert close(key["corrupted accuracy, N = 5, mean over corruptions x severities"][model], acc[-1], 4)
        if pair == "mcdo":
            for name, grid in (("mcdo", "[-1, 1]^2: rise, border minus centre"),
                               ("mcdo_ref", "[-0.1, 0.1]^2 (filter-dim0): rise")):
                with h5py.File(out / "surface" / f"{name}.h5", "r") as f:
                    loss = f[model]["loss"][()]
                    assert loss.shape == (5, 5)
                    border = np.concatenate([loss[0], loss[-1], loss[1:-1, 0], loss[1:-1, -1]])
                    assert close(key[f"surface {grid}"][model], border.mean() - loss[2, 2], 4)
                    cfg = f.attrs["config"]
                    assert ('"filter-dim0"' in cfg) == (name == "mcdo_ref")
        else:
            assert key["surface [-1, 1]^2: rise, border minus centre"][model] == "-"
    # each claim's verdict follows the lt compare verdicts of its quantities
    wanted = {"smoothing improves NLL and accuracy": ["NLL at N=50", "accuracy at N=50"],
              "smoothing gives smaller-magnitude Hessian eigenvalues and fewer negative ones":
                  ["median |top eigenvalue| over batches", "negative eigenvalues per batch"],
              "smoothing flattens the loss surface": ["rise from the centre to the border (sharpness)"],
              "smoothing lowers feature-map variance across MC samples": ["mean variance over layers"]}
    claims = table(report, "| pair | claim (Park & Kim 2022) | verdict |")
    judged = {(r[0], r[1]): r[2].strip("*") for r in claims}
    assert ("mcdo", "smoothing flattens the loss surface") in judged
    assert ("dnn", "smoothing flattens the loss surface") not in judged     # no surfaces of the dnn pair
    for pair in ("dnn", "mcdo"):
        with h5py.File(out / "compare" / f"{pair}.h5", "r") as f:
            node = f[f"{pair}_smoothing-vs-{pair}"]
            names = [q.decode() if isinstance(q, bytes) else str(q) for q in node["quantity"][()]]
            verdicts = dict(zip(names, [v.decode() if isinstance(v, bytes) else str(v) for v in node["verdict"][()]]))
        for claim, quantities in wanted.items():
            if (pair, claim) not in judged:
                continue
            vs = [verdicts[q] for q in quantities]
            verdict = judged[(pair, claim)]
            if all(v == "favours B" for v in vs):
                assert verdict == "yes"
            elif all(v == "no detectable difference" for v in vs):
                assert verdict == "no detectable difference"
            elif all(v == "favours A" for v in vs):
                assert verdict.startswith("no: the opposite")
            else:
                assert verdict.startswith(("partly", "mixed"))
        assert (pair, "smoothing improves robustness under corruption") in judged
    # every figure the report embeds is a png in the folder
    figures = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(figures) == 11
    for fig in figures:
        assert (out / fig).read_bytes()[:4] == b"\x89PNG", fig


def test_finished_run_is_skipped_and_other_settings_refused(tiny_run):
    out, _, _, _ = tiny_run
    h5 = sorted(out.glob("*/*.h5"))
    before = {p: p.stat().st_mtime_ns for p in h5}
    again = subprocess.run([str(REPRODUCE), str(out), "hessian"], env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("done already") == 2
    assert {p: p.stat().st_mtime_ns for p in h5} == before
    other = subprocess.run([str(REPRODUCE), str(out), "hessian"], env=env(LT_SEED="1"), capture_output=True, text=True)
    assert other.returncode == 2
    assert "use the same LT_PROFILE, LT_DATA and LT_SEED, or another OUTDIR" in other.stderr


@pytest.mark.parametrize("args, extra, words", [
    (["STAGE"], {}, "unknown stage 'STAGE': expected all or one of train evaluate"),
    (["train", "resnet"], {}, "stage train has no item 'resnet': expected one of dnn dnn_smoothing mcdo"),
    (["surface", "dnn"], {}, "stage surface has no item 'dnn': expected one of mcdo"),
    ([], {"LT_PROFILE": "huge"}, "LT_PROFILE=huge: expected paper or tiny"),
    (["evaluate"], {}, "needs"),
])
def test_bad_input(tmp_path, args, extra, words):
    res = subprocess.run([str(REPRODUCE), str(tmp_path / "o"), *args], env=env(**extra), capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert words in res.stderr


def test_slurm_submits_the_stages_as_a_dependency_graph(tmp_path):
    """slurm.sh on the fake Slurm: each job's --dependency names the jobs of the stages it reads, the
    arrays run one item per task, and a failed job keeps its dependants from starting."""
    calls = tmp_path / "calls.txt"
    ran = tmp_path / "ran.txt"
    stub = tmp_path / "reproduce_stub.sh"
    # stands in for reproduce.sh: records the stage item it was asked for, fails where told to
    stub.write_text('#!/bin/bash\necho "$2 ${3:-} $SLURM_JOB_ID" >> ' + str(ran) + '\n'
                    '[[ "$2 ${3:-}" != "${FAIL_ITEM:-none}" ]]\n')
    stub.chmod(0o755)
    sbatch = tmp_path / "sbatch_logged"
    sbatch.write_text(f'#!/bin/bash\necho "$*" >> {calls}\nexec {FAKE_SLURM}/sbatch "$@"\n')
    sbatch.chmod(0o755)
    e = env(PATH=f"{FAKE_SLURM}:{os.environ['PATH']}", FAKE_SLURM_STATE=str(tmp_path / "state"),
            LT_REPRODUCE=str(stub), SBATCH=str(sbatch), LT_SBATCH="--time=01:00:00")
    res = subprocess.run([str(SLURM), str(tmp_path / "out")], env=e, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    jobs = {}
    for line in calls.read_text().splitlines():
        name = line.split("--job-name=lt-paper-")[1].split()[0]
        dep = line.split("--dependency=afterok:")[1].split()[0] if "--dependency" in line else ""
        array = line.split("--array=")[1].split()[0] if "--array" in line else ""
        assert "--time=01:00:00" in line
        jobs[name] = {"deps": dep.split(":") if dep else [], "array": array}
    order = ["train", "evaluate", "hessian", "surface", "featvar", "robustness", "compare", "report"]
    assert list(jobs) == order
    ids = dict(re.findall(r"(\w+) (\d+)", res.stdout.split("submitted: ")[1]))
    assert jobs["train"] == {"deps": [], "array": "0-3"}
    for s in ("evaluate", "hessian", "featvar", "robustness"):
        assert jobs[s] == {"deps": [ids["train"]], "array": "0-1"}
    assert jobs["surface"] == {"deps": [ids["train"]], "array": ""}
    assert jobs["compare"]["deps"] == [ids[s] for s in ("evaluate", "hessian", "surface", "featvar")]
    assert jobs["report"] == {"deps": [ids["compare"], ids["robustness"]], "array": ""}
    done = [line.rsplit(" ", 1)[0].strip() for line in ran.read_text().splitlines()]
    assert sorted(done[:4]) == sorted(f"train {m}" for m in MODELS)
    assert sorted(done) == sorted([f"train {m}" for m in MODELS] + [f"{s} {p}" for s in
                                  ("evaluate", "hessian", "featvar", "robustness", "compare") for p in ("dnn", "mcdo")]
                                  + ["surface mcdo", "report"])
    assert done[-1] == "report"
    # one training task fails: nothing after it starts
    ran.unlink()
    e["FAIL_ITEM"] = "train mcdo"
    res = subprocess.run([str(SLURM), str(tmp_path / "out2")], env=e, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(line.rsplit(" ", 1)[0] for line in ran.read_text().splitlines()) == \
        sorted(f"train {m}" for m in MODELS)
    assert "dependency afterok" in res.stderr


def test_paper_profile_commands_are_valid_lt_command_lines(tmp_path):
    """The paper profile's command lines (recorded by a stand-in for lt that only creates each -o file)
    parse with lt's own option parser, with the paper's settings."""
    import click

    from landscape_tools.cli.main import cli

    record = tmp_path / "commands.txt"
    stub = tmp_path / "lt_stub.sh"
    stub.write_text('#!/bin/bash\nprintf "%s\\x1f" "$@" >> ' + str(record) + '\necho >> ' + str(record) + '\n'
                    'while [[ $# -gt 0 ]]; do\n'
                    '  [[ $1 == -o ]] && { mkdir -p "$(dirname "$2")"; touch "$2"; }; shift\ndone\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    e = env(LT_PROFILE="paper", LT=str(stub), HOME=str(tmp_path))
    for stage in ("train", "evaluate", "hessian", "surface", "featvar", "robustness", "compare"):
        res = subprocess.run([str(REPRODUCE), str(out), stage], env=e, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    commands = [line.rstrip("\x1f").split("\x1f") for line in record.read_text().splitlines()]
    assert [c[0] for c in commands] == ["train"] * 4 + ["evaluate"] * 2 + ["hessian"] * 2 + ["surface"] * 2 + \
        ["featvar"] * 2 + ["evaluate"] * 2 + ["compare"] * 2
    for args in commands:
        command = cli.get_command(None, args[0])
        # under lt's own context (its -h/--help): a context without that parent leaves the command's
        # help option cached as --help only, and `lt COMMAND -h` fails in every later test of the process
        parent = click.Context(cli, info_name="lt", **cli.context_settings)
        ctx = command.make_context(args[0], list(args[1:]), parent=parent)      # raises on an invalid option
        p = ctx.params
        if args[0] == "train":
            assert (p["width"], p["epochs"], p["batch_size"], p["lr"], p["momentum"], p["weight_decay"]) == \
                (64, 200, 128, 0.1, 0.9, 5e-4)
            assert (p["warmup_epochs"], p["schedule"], p["milestones"], p["gamma"], p["flip"], p["translate"]) == \
                (1, "step", [60, 120, 160], 0.2, True, 4)
            assert p["data_spec"] == f"cifar100:{tmp_path}/data"
        if args[0] == "surface":
            assert args[args.index("--mc") + 1] == "1"
            assert args[args.index("--x") + 1] in ("-1:1:21", "-0.1:0.1:21")
            assert ("filter-dim0" in args) == (args[args.index("--x") + 1] == "-0.1:0.1:21")
        if args[0] == "evaluate" and "--corrupt" in args:
            assert args[args.index("--corrupt") + 1] == "all"
        elif args[0] == "evaluate":
            assert args[args.index("--mc") + 1] == "1,2,3,4,5,10,20,50"
        if args[0] == "hessian":
            assert args[args.index("--top-k") + 1] == "5" and args[args.index("--batches") + 1] == "all"
