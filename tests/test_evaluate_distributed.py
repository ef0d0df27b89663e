"""`lt evaluate` under torchrun (2 CPU processes, gloo) equals one process; the combining of per-batch
metric sums against a numpy brute force; --precision and --compile."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import distributed as D
from landscape_tools import engine as E
from landscape_tools import evaluate
from landscape_tools import store
from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import load_data
from landscape_tools.errors import DataError
from landscape_tools.evaluate import MetricAccumulator, ensemble_curve, predictive_metrics
from landscape_tools.models import mc_dropout
from landscape_tools.seeds import EVALUATE_MC_SAMPLE, derive_seed
from tiny_files import assert_same_nodes, free_port, tiny_checkpoint_and_data

SIZES = [1, 2, 3]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evdist")
    _, model, data = tiny_checkpoint_and_data(root, arch="resnet_mcdo_18", n=12)
    return {"root": root, "model": str(model), "data": data}


# ----------------------------------------------------------------------------- torchrun, 2 processes
def test_torchrun_two_ranks_equal_single_process(files):
    root = files["root"]
    args = [files["model"], "--data", files["data"], "--split", "train", "--batch-size", "5",  # batches 5, 5, 2
            "--mc", ",".join(map(str, SIZES)), "--seed", "3", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", "evaluate", *args, "-o", "edist.h5"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "batches shared by 2 ranks" in p.stderr
    assert p.stdout.count("m: MC dropout, 12 samples") == 1           # only rank 0 reports
    assert p.stderr.count("result written to edist.h5") == 1
    assert sorted(f.name for f in root.iterdir() if f.name.startswith("edist")) == ["edist.h5"]

    r = CliRunner().invoke(cli, ["evaluate", *args, "-o", str(root / "esingle.h5")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, ref = store.read_result(root / "edist.h5"), store.read_result(root / "esingle.h5")
    assert got.config == ref.config and got.models["m"].attrs == ref.models["m"].attrs
    assert got.models["m"].attrs["mc_active"] and got.models["m"]["nll"].shape == (3,)
    # per-sample values (batches 0 and 2 on rank 0, batch 1 on rank 1) come back in sample order
    assert got.models["m"]["per_sample/log_prob"].shape == (3, 12)
    assert_same_nodes(got.models["m"], ref.models["m"])


# ----------------------------------------------------------------------------- combining, in one process
def brute_metrics(p, y, n_bins=10):
    """NLL, accuracy, Brier, ECE of probabilities ``p`` written out sample by sample."""
    nll = acc = brier = 0.0
    bins = [[] for _ in range(n_bins)]
    for row, label in zip(p, y):
        nll += -np.log(max(row[label], 1e-12))
        pred = int(np.argmax(row))
        acc += pred == label
        brier += sum((float(k == label) - row[k]) ** 2 for k in range(len(row)))
        conf = row.max()
        b = min(max(int(np.ceil(conf * n_bins)) - 1, 0), n_bins - 1)
        bins[b].append((conf, pred == label))
    n = len(y)
    ece = sum(abs(sum(c for c, _ in cell) - sum(ok for _, ok in cell)) for cell in bins) / n
    return {"nll": nll / n, "accuracy": acc / n, "brier": brier / n, "ece": ece,
            "bin_counts": np.array([len(c) for c in bins])}


def random_probs(n, k, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, k))
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), rng.integers(0, k, n)


def test_merging_two_halves_equals_all_and_the_brute_force():
    p, y = random_probs(37, 4, 0)
    first, second = MetricAccumulator(), MetricAccumulator()
    first.add(p[:20], y[:20])
    second.add(p[20:], y[20:])
    merged = MetricAccumulator.from_state(first.state())       # through the state vector, as ranks send it
    merged.merge(MetricAccumulator.from_state(second.state()))
    got, whole, brute = merged.metrics(), predictive_metrics(p, y), brute_metrics(p, y)
    for key in ("nll", "accuracy", "brier", "ece"):
        assert got[key] == pytest.approx(brute[key], rel=1e-12, abs=1e-15), key
        assert got[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15), key
    np.testing.assert_array_equal(got["bin_counts"], brute["bin_counts"])
    np.testing.assert_allclose(got["bin_accuracy"], whole["bin_accuracy"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["bin_confidence"], whole["bin_confidence"], rtol=1e-12, equal_nan=True)
    assert got["num_samples"] == 37


def test_state_round_trip_and_mismatched_bins():
    p, y = random_probs(9, 3, 1)
    acc = MetricAccumulator(5)
    acc.add(p, y)
    back = MetricAccumulator.from_state(acc.state(), 5)
    np.testing.assert_array_equal(back.state(), acc.state())
    assert back.n == 9 and back.bin_count.dtype == np.int64
    from landscape_tools.errors import ConfigError
    with pytest.raises(ConfigError, match=r"accumulator state of shape \(19,\); expected \(34,\)"):
        MetricAccumulator.from_state(acc.state(), 10)
    with pytest.raises(ConfigError, match="cannot merge accumulators of 5 and 10 bins"):
        MetricAccumulator(10).merge(acc)


@pytest.fixture(scope="module")
def tiny(files):
    model, _ = load_checkpoint(files["model"])
    data = load_data(files["data"], split="train", batch_size=5, in_channels=1)
    return model, data.batches()


def old_loop(model, batches, sizes, seed):
    """The sweep as one process computed it before batches could be shared: add per batch, in order."""
    accs = {n: MetricAccumulator() for n in sizes}
    model.eval()
    with torch.no_grad():
        for b, (x, y) in enumerate(batches):
            running = None
            for s in range(max(sizes)):
                with mc_dropout(model, True, seed=derive_seed(seed, EVALUATE_MC_SAMPLE, b, s)):
                    probs = torch.softmax(model(x).double(), dim=1)
                running = probs if running is None else running + probs
                if s + 1 in accs:
                    accs[s + 1].add(running / (s + 1), y)
    return {key: np.array([accs[n].metrics()[key] for n in sizes]) for key in ("nll", "accuracy", "ece", "brier")}


def test_fp32_default_equals_the_plain_loop_and_precision_fp32_is_bit_identical_to_it(tiny):
    """The MC copies go through the model stacked along the batch (15 rows instead of 5): the float32
    convolutions may then block their sums differently, so the curve equals the one-copy-per-pass loop
    to float32 rounding (bit-equal on some CPUs, ~3e-10 relative apart in NLL on others), and
    --precision fp32 is the default's very arithmetic (bit-equal)."""
    model, batches = tiny
    curve = ensemble_curve(model, batches, SIZES, seed=3)
    ref = old_loop(model, batches, SIZES, 3)
    for key, value in ref.items():
        np.testing.assert_allclose(getattr(curve, key), value, rtol=1e-6, atol=1e-9, err_msg=key)
    same = ensemble_curve(model, batches, SIZES, seed=3, precision="fp32")
    np.testing.assert_array_equal(same.nll, curve.nll)


def eval_jobs(model, batches):
    return [evaluate.Job("m", model, {"arch": "resnet_mcdo_18"}, batches, {}, {"spec": "tiny"})]


ATTRS = store.provenance("evaluate", ["lt", "evaluate"], {}, 3)


def test_shards_merge_into_the_one_process_file(tiny, tmp_path, monkeypatch):
    """3 batches (5, 5, 2) in 2 shards: shard 0 scores batches 0 and 2, shard 1 batch 1; lt merge
    adds the per-batch sums in batch order and gives the one-process file, bit for bit."""
    model, batches = tiny
    seen = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (seen.append(int(x.shape[0])), original(x))[1])
    parts = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i in (1, 0):
        assert evaluate.run_to_file(eval_jobs(model, batches), parts[i], ATTRS, evaluate.EvaluateOptions(SIZES, seed=3), shard=(i, 2)) == {}
    assert seen == [3 * 5, 3 * 5, 3 * 2]           # each batch once, its 3 MC samples stacked in one pass
    monkeypatch.undo()
    s0 = store.read_result(parts[0]).models["m"]
    np.testing.assert_array_equal(s0["units/done"], [True, False, True])
    assert s0["sample_units/done"].tolist() == [True] * 5 + [False] * 5 + [True] * 2
    curves = evaluate.run_to_file(eval_jobs(model, batches), tmp_path / "one.h5", ATTRS, evaluate.EvaluateOptions(SIZES, seed=3))
    ref = ensemble_curve(model, batches, SIZES, seed=3)
    for key in ("nll", "accuracy", "ece", "brier", "bin_counts", "bin_accuracy", "bin_confidence"):
        np.testing.assert_array_equal(getattr(curves["m"], key), getattr(ref, key), err_msg=key)
    got = store.read_result(E.merge([str(p) for p in parts[::-1]], tmp_path / "merged.h5"))
    one = store.read_result(tmp_path / "one.h5")
    assert_same_nodes(got.models["m"], one.models["m"])
    assert got.models["m"].attrs == one.models["m"].attrs and got.attrs["fingerprint"] == one.attrs["fingerprint"]
    assert sorted(one.models["m"].groups) == ["per_sample", "reliability"]      # no units in a whole run's file
    assert got.models["m"]["per_sample/log_prob"].shape == (3, 12) and curves["m"].num_samples == 12


def test_an_interrupted_evaluate_resumes_and_a_failing_rank_stops_every_rank(tiny, tmp_path, monkeypatch):
    model, batches = tiny
    out = tmp_path / "e.h5"

    def interrupt(done, total, message):
        if done == 6:                       # batch 1's 3 MC samples ran (one stacked pass); batch 0 is written
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_to_file(eval_jobs(model, batches), out, ATTRS, evaluate.EvaluateOptions(SIZES, seed=3), progress=interrupt)
    assert store.partial_path(out).exists() and not out.exists()
    scored = []
    original = evaluate._batch_state
    monkeypatch.setattr(evaluate, "_batch_state", lambda p, y, n: (scored.append(int(y.shape[0])), original(p, y, n))[1])
    evaluate.run_to_file(eval_jobs(model, batches), out, ATTRS, evaluate.EvaluateOptions(SIZES, seed=3))
    assert scored == [5] * 3 + [2] * 3                   # batches 1 and 2 (one state per N), not batch 0 again
    monkeypatch.undo()
    evaluate.run_to_file(eval_jobs(model, batches), tmp_path / "ref.h5", ATTRS, evaluate.EvaluateOptions(SIZES, seed=3))
    assert_same_nodes(store.read_result(out).models["m"], store.read_result(tmp_path / "ref.h5").models["m"])

    monkeypatch.setattr(D, "all_ok", lambda ctx, ok: [1])                  # rank 1 failed elsewhere
    with pytest.raises(D.RankFailed, match=r"rank\(s\) 1 of 2 failed \(see their messages\); finished shards"):
        evaluate.run_to_file(eval_jobs(model, batches), tmp_path / "r.h5", ATTRS, evaluate.EvaluateOptions(SIZES), ctx=D.Context(0, 2))
    assert not (tmp_path / "r.h5").exists() and E.shard_path(tmp_path / "r.h5", 0, 2).exists()
    bad = [(x, y + 7) for x, y in batches]                                 # labels out of range on this rank
    monkeypatch.setattr(D, "all_ok", lambda ctx, ok: [] if ok else [ctx.rank])
    with pytest.raises(DataError, match="labels range over"):
        evaluate.run_to_file(eval_jobs(model, bad), tmp_path / "b.h5", ATTRS, evaluate.EvaluateOptions(SIZES), ctx=D.Context(1, 2))


# ----------------------------------------------------------------------------- precision and compile
def test_bf16_is_close_to_fp32_but_not_identical(tiny):
    model, batches = tiny
    ref = ensemble_curve(model, batches, SIZES, seed=3)
    low = ensemble_curve(model, batches, SIZES, seed=3, precision="bf16")
    assert not np.array_equal(low.nll, ref.nll)
    np.testing.assert_allclose(low.nll, ref.nll, rtol=0.05)
    np.testing.assert_allclose(low.brier, ref.brier, rtol=0.05)
    assert next(model.parameters()).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def test_compile_gives_the_same_curve_with_the_same_masks():
    """A tiny MC-dropout net: its MCDropout layer runs outside the compiled graph, seeded as in eager mode."""
    from landscape_tools.errors import ConfigError
    from landscape_tools.models import MCDropout
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), MCDropout(0.3), torch.nn.Flatten(),
                              torch.nn.Linear(2 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 1])) for _ in range(2)]
    ref = ensemble_curve(net, batches, [1, 3], seed=3)
    got = ensemble_curve(net, batches, [1, 3], seed=3, compile_model=True)
    np.testing.assert_allclose(got.nll, ref.nll, rtol=1e-5)
    np.testing.assert_allclose(got.brier, ref.brier, rtol=1e-5)
    assert "forward" not in net[2].__dict__                   # the layer is restored
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 3))
    with pytest.raises(ConfigError, match="--compile supports MC sampling of zoo models"):
        ensemble_curve(plain, batches, [1, 2], compile_model=True)
