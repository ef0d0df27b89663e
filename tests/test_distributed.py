"""`lt surface` under torchrun (2 CPU processes, gloo) and the torch.distributed helpers."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import distributed as D
from landscape_tools import engine as E
from landscape_tools import hessian as H
from landscape_tools import store
from landscape_tools import surface as S
from landscape_tools.checkpoints import load_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import load_data
from landscape_tools.errors import ConfigError, StoreError
from tiny_files import free_port, tiny_checkpoint_and_data

GRID = ("--x", "-1:1:3", "--y", "-0.5:0.5:3")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _, model, data = tiny_checkpoint_and_data(root)
    return {"root": root, "model": str(model), "data": data}


def single(files, out, *extra):
    r = CliRunner().invoke(cli, ["surface", files["model"], "--data", files["data"], "--batch-size", "5", *GRID,
                                 "-o", str(out), *extra], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return store.read_result(out)


def test_torchrun_two_ranks_equal_single_process(files):
    root = files["root"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", "surface", files["model"],
           "--data", files["data"], "--batch-size", "5", *GRID, "--device", "cpu", "-o", "dist.h5"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "per rank x 2 ranks" in p.stderr
    assert p.stdout.count("written to dist.h5") == 1          # only rank 0 reports
    assert sorted(f.name for f in root.iterdir() if f.name.startswith("dist")) == ["dist.h5"]  # shards removed

    ref = single(files, root / "single.h5")
    got = store.read_result(root / "dist.h5")
    a, b = got.models["m"], ref.models["m"]
    assert a.data["done"].all() and a.data["loss"].shape == (3, 3)
    np.testing.assert_allclose(a.data["loss"], b.data["loss"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(a.data["accuracy"], b.data["accuracy"], rtol=0, atol=0)
    assert got.attrs["n_shards"] == 1 and got.attrs["run_fingerprint"] == ref.attrs["run_fingerprint"]
    assert got.attrs["fingerprint"] == ref.attrs["fingerprint"] and "merged_from" not in got.attrs
    assert got.config == ref.config


def _jobs(files, seed=0):
    model, info = load_checkpoint(files["model"])
    data = load_data(files["data"], split="train", batch_size=5, in_channels=1)
    d = S.random_directions(model, 2, "filter", "biasbn", seed)
    return [S.SurfaceJob(info.label, model, info, data, d)]


X, Y = np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 3)


def surface_ranks(ctx, jobs, out, x=X, y=Y, shard=None, **kw):
    """What `lt surface` runs on each rank: the engine's split, vote and merge around run_surface
    (``kw``: the other :class:`SurfaceOptions`)."""
    options = S.SurfaceOptions(x, y, **kw)
    return E.run_ranks(ctx, out, lambda o, part: S.run_surface(jobs, str(o), options, shard=part), shard=shard)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rank_logic_in_one_process_with_reuse_of_a_finished_shard(files, tmp_path, precision):
    """The ranks' steps run one after the other (no process group): rank 1 computes its shard, rank 0
    finds its own shard finished by an earlier job, reuses it and merges."""
    out = tmp_path / "out.h5"
    jobs = _jobs(files)
    kw = {"precision": precision}
    ref = S.run_surface(jobs, str(tmp_path / "ref.h5"), S.SurfaceOptions(X, Y, **kw))
    S.run_surface(jobs, str(E.shard_path(out, 0, 2)), S.SurfaceOptions(X, Y, **kw), shard=(0, 2))   # earlier job's shard 0
    assert surface_ranks(D.Context(rank=1, world_size=2), jobs, out, **kw) == out
    assert not out.exists() and E.shard_path(out, 1, 2).exists()
    assert surface_ranks(D.Context(rank=0, world_size=2), jobs, out, **kw) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "ref.h5"]
    np.testing.assert_array_equal(store.read_result(out).models["m"].data["loss"],
                                  store.read_result(ref).models["m"].data["loss"])


def test_stale_shard_of_another_run_is_refused(files, tmp_path):
    out = tmp_path / "out.h5"
    S.run_surface(_jobs(files, seed=1), str(E.shard_path(out, 0, 2)), S.SurfaceOptions(X, Y), shard=(0, 2))
    with pytest.raises(StoreError, match=r"out.rank0of2.h5.partial holds progress of a different run \(another "
                                         r"directions \(m\)\); rerun the same command to resume it, or pass "
                                         r"--overwrite"):
        surface_ranks(D.Context(rank=0, world_size=2), _jobs(files), out)
    assert not out.exists()
    assert E.shard_path(out, 0, 2).exists() and not store.partial_path(E.shard_path(out, 0, 2)).exists()  # as found


def test_shard_option_under_torchrun_is_refused(files, tmp_path):
    with pytest.raises(ConfigError, match="--shard 0/2 cannot be combined with torchrun or srun ranks"):
        surface_ranks(D.Context(rank=0, world_size=2), _jobs(files), tmp_path / "o.h5", shard=(0, 2))


def test_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not D.launched() and D.env_rank() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not D.launched()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.launched() and D.env_rank() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match=r"RANK=4 is outside 0..3 \(WORLD_SIZE=4\)"):
        D.env_rank()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='two' is not an integer"):
        D.launched()


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = D.init(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.initialised) == (0, 1, True, False, False)
    t = torch.tensor([1.0, 2.0])
    r = D.all_reduce(ctx, t)
    assert torch.equal(r, t) and r is not t
    assert D.all_ok(ctx, True) == [] and D.all_ok(ctx, False) == [0]
    D.barrier(ctx)
    D.destroy(ctx)
    assert D.rank_device(torch.device("cpu"), 3) == torch.device("cpu")
    assert E.shard_path("/a/b/surf.h5", 1, 4).as_posix() == "/a/b/surf.rank1of4.h5"


HESSIAN = ("--batch-size", "4", "--top-k", "2", "--trace", "--trace-probes", "3")


def _equal_nodes(a, b):
    for name, value in b.data.items():
        np.testing.assert_array_equal(a.data[name], value, err_msg=name)
    for name, group in b.groups.items():
        _equal_nodes(a.groups[name], group)


def test_torchrun_hessian_batches_shared_equal_single_process(files):
    root = files["root"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", "hessian", files["model"],
           "--data", files["data"], *HESSIAN, "--device", "cpu", "-o", "hdist.h5"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("m: top eigenvalue (LM)") == 1
    assert sorted(f.name for f in root.iterdir() if f.name.startswith("hdist")) == ["hdist.h5"]
    r = CliRunner().invoke(cli, ["hessian", files["model"], "--data", files["data"], *HESSIAN, "-o",
                                 str(root / "hsingle.h5")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, ref = store.read_result(root / "hdist.h5"), store.read_result(root / "hsingle.h5")
    assert got.models["m"].data["done"].all() and got.models["m"].data["eigenvalues"].shape == (3, 2)
    assert got.attrs["fingerprint"] == ref.attrs["fingerprint"] and got.models["m"].attrs == ref.models["m"].attrs
    _equal_nodes(got.models["m"], ref.models["m"])


def _hjobs(files):
    from landscape_tools import hessian as H
    model, info = load_checkpoint(files["model"])
    data = load_data(files["data"], split="train", batch_size=4, in_channels=1)
    return [H.HessianJob(info.label, model, info, data.batches())]


def test_hessian_rank_logic_in_one_process_resumes_a_finished_rank_file(files, tmp_path):
    from landscape_tools import hessian as H
    jobs, options = _hjobs(files), H.HessianOptions(k=2, trace=True, trace_probes=3)
    H.run_hessian(jobs, str(tmp_path / "ref.h5"), options)
    out = tmp_path / "out.h5"
    H.run_hessian(jobs, str(E.shard_path(out, 0, 2)), options, shard=(0, 2))    # an earlier job's rank 0
    rows = []
    H.run_job(D.Context(rank=1, world_size=2), jobs, out, options, on_row=lambda j, r: rows.append(r))
    assert rows == [1] and not out.exists()
    H.run_job(D.Context(rank=0, world_size=2), jobs, out, options, on_row=lambda j, r: rows.append(r))
    assert rows == [1]                                   # rank 0 found its rows done: nothing recomputed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "ref.h5"]
    _equal_nodes(store.read_result(out).models["m"], store.read_result(tmp_path / "ref.h5").models["m"])


def test_a_failed_rank_stops_the_others_and_keeps_their_work(files, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    monkeypatch.setattr(D, "all_ok", lambda ctx, ok: [] if not ok else [1])   # rank 1 failed elsewhere
    with pytest.raises(D.RankFailed, match=r"rank\(s\) 1 of 2 failed \(see their messages\); finished shards"):
        surface_ranks(D.Context(rank=0, world_size=2), _jobs(files), out)
    assert not out.exists() and E.shard_path(out, 0, 2).exists()


# ----------------------------------------------------------------------------- --scope dataset: shared products
@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    """A 23-parameter user model (bare state_dict) and 13 samples: batches of 5, 5, 3 (uneven)."""
    import lt_user_models
    root = tmp_path_factory.mktemp("dist_mlp")
    torch.manual_seed(0)
    torch.save(lt_user_models.tiny_mlp().state_dict(), root / "mlp.pt")
    rng = np.random.default_rng(0)
    from landscape_tools.data import save_tensors
    save_tensors(root / "mlp.npz", x=rng.normal(size=(13, 4)).astype(np.float32), y=rng.integers(0, 2, 13))
    return {"root": root, "model": str(root / "mlp.pt"), "data": "tensors:" + str(root / "mlp.npz")}


DATASET = ("--model", "lt_user_models:tiny_mlp", "--batch-size", "5", "--top-k", "2", "--scope", "dataset",
           "--trace", "--trace-probes", "3", "--density", "--density-runs", "2", "--density-steps", "5",
           "--weight-decay", "0.01", "--device", "cpu")


def _close_nodes(a, b, where=""):
    assert a.attrs == b.attrs, where
    assert set(a.data) == set(b.data) and set(a.groups) == set(b.groups), where
    for name, value in b.data.items():
        got = a.data[name]
        assert got.dtype == value.dtype and got.shape == value.shape, where + name
        if value.dtype.kind == "f":
            scale = float(np.max(np.abs(value))) if value.size else 0.0
            if name in ("residuals", "certificates"):
                scale = 1.0   # relative errors: at rounding (1e-25 when the basis spans the space) all agree
            np.testing.assert_allclose(got, value, rtol=1e-8, atol=1e-12 * scale, err_msg=where + name)
        else:
            np.testing.assert_array_equal(got, value, err_msg=where + name)
    for name, group in b.groups.items():
        _close_nodes(a.groups[name], group, where + name + "/")


def test_torchrun_hessian_dataset_scope_equals_single_process(mlp_files):
    """2 gloo ranks share the batches (5+3 and 5 samples) of one Hessian; every product is all-reduced."""
    root = mlp_files["root"]
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "landscape_tools.cli.main", "hessian", mlp_files["model"],
           "--data", mlp_files["data"], *DATASET, "-o", "ddist.h5"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "batches shared by 2 ranks (every Hessian-vector product all-reduced)" in p.stderr
    assert p.stdout.count("mlp: top eigenvalue (LM)") == 1                 # only rank 0 reports
    assert sorted(f.name for f in root.iterdir() if f.name.startswith("ddist")) == ["ddist.h5"]
    r = CliRunner().invoke(cli, ["hessian", mlp_files["model"], "--data", mlp_files["data"], *DATASET, "-o",
                                 str(root / "dsingle.h5")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, ref = store.read_result(root / "ddist.h5"), store.read_result(root / "dsingle.h5")
    node = got.models["mlp"]
    assert node.data["done"].all() and node.data["eigenvalues"].shape == (1, 2)
    assert list(node.data["batch_sizes"]) == [5, 5, 3] and node.data["converged"].all()
    assert got.attrs["fingerprint"] == ref.attrs["fingerprint"] and got.config == ref.config
    _close_nodes(node, ref.models["mlp"])
    # and the eigenvalues are those of the dense Hessian of the mean loss
    model, _ = load_checkpoint(mlp_files["model"], model="lt_user_models:tiny_mlp")
    data = load_data(mlp_files["data"], split="train", batch_size=5)
    dense = np.linalg.eigvalsh(_dense_mean_hessian(model, data.batches(), 0.01))
    top = dense[np.argsort(-np.abs(dense))[:2]]
    np.testing.assert_allclose(node.data["eigenvalues"][0], top, rtol=1e-3)


def _dense_mean_hessian(model, batches, weight_decay=0.0, mask_seeds=None):
    """float64 Hessian of sum_b (n_b / N) CE_b + wd/2 |w|^2 by torch.func (hessian = jacfwd(jacrev));
    batch ``b`` with dropout mask seed ``mask_seeds[b]`` when given (randomness="same" lets the
    seeded, identical mask through vmap)."""
    import contextlib

    import torch.nn.functional as F
    from torch.func import functional_call, jacfwd, jacrev

    from landscape_tools.models import mc_dropout

    model = model.double().eval()
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]
    buffers = dict(model.named_buffers())
    n_total = sum(int(x.shape[0]) for x, _ in batches)

    def loss(flat):
        state = dict(buffers)
        state.update(zip(names, [c.view(s) for c, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]))
        total = 0.0
        for b, (x, y) in enumerate(batches):
            masks = (contextlib.nullcontext() if mask_seeds is None
                     else mc_dropout(model, True, seed=mask_seeds[b]))
            with masks:
                logits = functional_call(model, state, (x.double(),))
            total = total + F.cross_entropy(logits, y) * (x.shape[0] / n_total)
        return total + 0.5 * weight_decay * flat.dot(flat)

    return jacfwd(jacrev(loss), randomness="same")(flat0).numpy()


class _Net(torch.nn.Module):
    """A float64 conv net with BatchNorm (eval) and MC dropout: 59 parameters."""

    def __init__(self):
        super().__init__()
        from landscape_tools.models import MCDropout
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)
        self.drop = MCDropout(0.3)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        return self.fc(self.drop(h).flatten(1))


def _net_and_batches():
    torch.manual_seed(3)
    net = _Net().double()
    net.bn.running_mean.uniform_(-0.2, 0.2)
    net.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(11, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    return net, [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]     # 4, 4, 3 samples


def _dense_with_masks(net, batches, mc_seed, weight_decay):
    """The dense Hessian with each batch's fixed dropout mask (as the operator draws it)."""
    from landscape_tools.seeds import HESSIAN_BATCH_MASKS, derive_seed
    return _dense_mean_hessian(net, batches, weight_decay,
                               [derive_seed(mc_seed, HESSIAN_BATCH_MASKS, i) for i in range(len(batches))])


def test_shared_operator_equals_dense_hessian_of_the_mean_loss():
    from landscape_tools import hessian as H
    net, batches = _net_and_batches()
    dense = _dense_with_masks(net, batches, mc_seed=5, weight_decay=0.02)
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    # one process holding every batch: the operator itself
    op = H.SharedDataOperator(net, batches, [0, 1, 2], lambda t: t.clone(), mc_seed=5, weight_decay=0.02)
    np.testing.assert_allclose(op(v).numpy(), dense @ v.numpy(), rtol=1e-10, atol=1e-12)
    op.close()
    # two ranks (batches 0, 2 and 1): their parts add up to the whole (weight decay added after the sum,
    # which here is each rank's own part: subtract it once)
    # (also in sub-batches of 3 samples: pieces 3+1, 3+1 and 3, each with its rows of the batch's mask)
    for sub_batch in (None, 3):
        parts = []
        for rank, share in enumerate(([0, 2], [1])):
            with H.SharedDataOperator(net, batches, share, lambda t: t.clone(), rank=rank, world_size=2, mc_seed=5,
                                      weight_decay=0.02, sub_batch=sub_batch) as op:
                parts.append(op(v).numpy() - 0.02 * v.numpy())
        np.testing.assert_allclose(parts[0] + parts[1] + 0.02 * v.numpy(), dense @ v.numpy(), rtol=1e-10,
                                   atol=1e-12)
    # a rank without batches contributes nothing (and never evaluates the model)
    with H.SharedDataOperator(net, batches, [], lambda t: t.clone(), rank=2, world_size=3, mc_seed=5) as op:
        assert torch.count_nonzero(op(v)) == 0
    # the solver on it: the dense top-3 of every kind, as one process computes them
    want = np.linalg.eigvalsh(dense)
    for which, pick in (("LM", want[np.argsort(-np.abs(want))[:3]]), ("SA", want[:3])):
        res = H.top_eigenvalues(net, batches, k=3, which=which, scope="dataset", tol=1e-10, mc_seed=5,
                                weight_decay=0.02, max_iter=2000,
                                make_operator=lambda idx: H.SharedDataOperator(net, batches, [0, 1, 2],
                                                                               lambda t: t.clone(), mc_seed=5,
                                                                               weight_decay=0.02))
        np.testing.assert_allclose(res.eigenvalues[0], pick, rtol=1e-6)
        plain = H.top_eigenvalues(net, batches, k=3, which=which, scope="dataset", tol=1e-10, mc_seed=5,
                                  weight_decay=0.02, max_iter=2000)
        np.testing.assert_allclose(res.eigenvalues[0], plain.eigenvalues[0], rtol=1e-12)
    assert "forward" not in net.__dict__       # model left as it was


def test_shared_operator_sums_every_product_and_stops_on_a_failed_peer():
    from landscape_tools import hessian as H
    net, batches = _net_and_batches()
    seen = []

    def reduce(t):           # another rank (1 of 2) contributes its own part: here the same again
        seen.append(t.clone())
        return t * 2

    op = H.SharedDataOperator(net, batches, [0, 2], reduce, rank=0, world_size=2)
    dim = op.dim
    op.checked_matvec(torch.ones(dim, dtype=torch.float64) / dim ** 0.5)  # both products go through the sum
    assert len(seen) == 2 and torch.equal(seen[0], seen[1]) and not seen[0][dim:].any()

    def peer_failed(t):
        t = t.clone()
        t[dim + 1] += 1.0
        return t

    op.reduce = peer_failed
    with pytest.raises(H.PeerFailed, match=r"process\(es\) 1 of 2 failed while forming a Hessian-vector product"):
        op(torch.ones(dim, dtype=torch.float64))
    op.close()
    # a rank whose own batch fails still joins the sum, flagged, then raises its own error
    bad = [(batches[0][0] * float("nan"), batches[0][1])] + batches[1:]
    sent = []
    op = H.SharedDataOperator(net, bad, [0], lambda t: sent.append(t.clone()) or t, rank=1, world_size=2)
    with pytest.raises(Exception, match="the loss of batch 0 is nan"):
        op(torch.ones(dim, dtype=torch.float64))
    assert len(sent) == 1 and sent[0][dim + 1] == 1 and not sent[0][:dim].any()
    op.close()
    assert "forward" not in net.__dict__ and "matvec" not in op.inner.__dict__


def test_dataset_scope_rank_that_sees_another_fail_before_starting_writes_nothing(files, tmp_path, monkeypatch):
    real = D.all_reduce

    def rank0_failed(ctx, values, op="sum"):
        out = real(ctx, values, op)
        out[0] += 1                      # rank 0 (e.g. its output existed) failed before the first product
        return out

    monkeypatch.setattr(D, "all_reduce", rank0_failed)
    with pytest.raises(D.RankFailed, match=r"rank\(s\) 0 of 2 failed before starting \(see their messages\); "
                                         r"nothing was computed"):
        H.run_job(D.Context(rank=1, world_size=2), _hjobs(files), tmp_path / "d.h5",
                  H.HessianOptions(scope="dataset", k=2))
    assert list(tmp_path.iterdir()) == []


def test_dataset_share_is_balanced():
    from landscape_tools.hessian import dataset_share
    assert [dataset_share(5, r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert dataset_share(1, 1, 2) == [] and dataset_share(7, 2, 3) == [2, 5]
