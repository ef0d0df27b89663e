"""Loss surfaces against brute force in float64, direction properties, resume, shards and merge."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape_tools import seeds, store
from landscape_tools import surface as S
from landscape_tools.data import DataSet
from landscape_tools.errors import ConfigError, StoreError
from landscape_tools.models import mc_dropout

# the machine's few cores are shared: OpenMP threads fighting each other make tiny models 100x slower


class Tiny(nn.Module):
    """75 parameters: conv (with a bias) -> BN -> ReLU -> pool -> dropout -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(torch.flatten(h, 1)))


def tiny(seed=0):
    torch.manual_seed(seed)
    m = Tiny().double()
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_(0, 0.1)
    return m.eval()


def tiny_data(n=17, batch_size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataSet(x, y, "tensors:test", "train", 3, batch_size)


def set_weights(model, d, a, b):
    """Brute force: a fresh copy with w0 + a*dx + b*dy, computed from the state dict."""
    m = copy.deepcopy(model)
    sd = m.state_dict()
    for name in d.x:
        w = sd[name] + a * d.x[name].double() + (b * d.y[name].double() if d.y is not None else 0)
        sd[name] = w
    m.load_state_dict(sd)
    return m


def brute_loss(model, data):
    """Mean NLL and accuracy in one batch, no dropout."""
    with torch.no_grad(), mc_dropout(model, False):
        out = model.eval()(data.x)
    return F.cross_entropy(out, data.y).item(), (out.argmax(1) == data.y).double().mean().item()


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- brute force
def test_surface_equals_brute_force_on_a_3x5_grid():
    model, data = tiny(), tiny_data()
    d = S.random_directions(model, 2, seed=3)
    x, y = np.array([-1.0, 0.0, 0.5]), np.linspace(-0.8, 0.8, 5)
    res = S.surface(model, data, d, x, y)
    assert res["loss"].shape == (3, 5) and res["accuracy"].shape == (3, 5)
    for i, a in enumerate(x):
        for j, b in enumerate(y):
            loss, acc = brute_loss(set_weights(model, d, a, b), data)
            assert res["loss"][i, j] == pytest.approx(loss, rel=1e-12, abs=1e-14)
            assert res["accuracy"][i, j] == pytest.approx(acc, abs=1e-15)
    assert np.ptp(res["loss"]) > 1e-3                    # the slice is not flat


def test_grid_orientation_loss_ij_is_at_x_i_y_j():
    """x moves the output bias of class 0 (loss changes); y is a zero direction (loss constant)."""
    model, data = tiny(), tiny_data()
    dx = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    dy = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    dx["fc.bias"][0] = 1.0
    d = S.Directions(dx, dy, {"kind": "manual"}, S.model_fingerprint(model))
    x, y = np.linspace(-2, 2, 3), np.linspace(-1, 1, 5)
    res = S.surface(model, data, d, x, y)
    loss = res["loss"]
    assert loss.shape == (3, 5)
    assert np.all(np.ptp(loss, axis=1) == 0)            # constant along y (columns)
    assert np.all(np.abs(np.diff(loss[:, 0])) > 1e-3)   # changing along x (rows)
    for i, a in enumerate(x):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.fc.bias[0] += a
        assert loss[i, 2] == pytest.approx(brute_loss(m, data)[0], rel=1e-12)


def test_centre_is_the_model_and_model_is_restored_exactly():
    model, data = tiny(), tiny_data()
    model.train()                                        # the user's mode must come back too
    before = copy.deepcopy(model)
    d = S.random_directions(model, 2, seed=1)
    res = S.surface(model, data, d, S.parse_range("-0.3:0.3:3"), S.parse_range("-0.7:0.7:5"))
    assert state_equal(model, before) and model.training and model.bn.training
    own = S.evaluate_model(model, data)
    assert res["loss"][1, 2] == own[0] and res["accuracy"][1, 2] == own[1]
    assert model.training                                 # evaluate_model restores the mode too
    assert res["loss"][1, 2] == pytest.approx(brute_loss(model, data)[0], rel=1e-13)


def test_model_restored_after_an_exception_mid_grid(tmp_path):
    model, data = tiny(), tiny_data()
    before = copy.deepcopy(model)
    d = S.random_directions(model, 2, seed=1)
    job = S.SurfaceJob("m", model, None, data, d)

    def boom(job_index, point):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        S.run_surface([job], str(tmp_path / "s.h5"), S.SurfaceOptions(np.linspace(-1, 1, 3), np.linspace(-1, 1, 3)), on_point=boom)
    assert state_equal(model, before)


def test_bn_recompute_uses_the_statistics_of_the_whole_data():
    """13 samples in batches of 4, 4, 4, 1: the recomputed BN statistics are those of all 13 samples
    (batches weighted by size), not an equal-weight average of the four batches' statistics."""
    model, data = tiny(), tiny_data(n=13, batch_size=4)
    assert [len(by) for _, by in data.batches()] == [4, 4, 4, 1]
    d = S.random_directions(model, 2, seed=2)
    x, y = np.array([0.0, 0.6]), np.array([-0.4, 0.0])
    res = S.surface(model, data, d, x, y, bn="recompute")
    for i, a in enumerate(x):
        for j, b in enumerate(y):
            m = set_weights(model, d, a, b)
            with torch.no_grad():
                h = m.conv(data.x)                       # the BN's inputs, all 13 samples at once
                m.bn.running_mean.copy_(h.mean(dim=(0, 2, 3)))
                m.bn.running_var.copy_(h.var(dim=(0, 2, 3), unbiased=True))
            assert res["loss"][i, j] == pytest.approx(brute_loss(m, data)[0], rel=1e-10)
            # and the equal-weight average of the batches' statistics is a different surface
            with torch.no_grad():
                hs = [m.conv(bx) for bx, _ in data.batches()]
                m.bn.running_mean.copy_(torch.stack([t.mean(dim=(0, 2, 3)) for t in hs]).mean(0))
                m.bn.running_var.copy_(torch.stack([t.var(dim=(0, 2, 3)) for t in hs]).mean(0))
            assert abs(res["loss"][i, j] - brute_loss(m, data)[0]) > 1e-6
    assert model.bn.momentum == 0.1                      # restored
    frozen = S.surface(model, data, d, x, y)
    assert not np.allclose(frozen["loss"], res["loss"])  # recompute does change something


class TwoBN(nn.Module):
    """conv -> BN2d -> ReLU -> conv -> BN2d -> ReLU -> pool -> linear -> BN1d -> linear, with dropout."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc1, self.bn3, self.fc2 = nn.Linear(16, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(self.drop(h)))), 2)
        return self.fc2(self.bn3(self.fc1(torch.flatten(h, 1))))


def test_recompute_bn_statistics_by_hand_with_uneven_batches():
    """10 samples in batches of 4, 4, 2. By hand: every batch through the layers with each BN
    normalising by that batch's own (biased) statistics, dropout off; then each BN's inputs of all
    batches concatenated, their mean and unbiased variance in float64."""
    torch.manual_seed(0)
    model = TwoBN().double()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = 2.0 + torch.randn(10, 1, 4, 4, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 10)[:, None, None, None].double()
    batches = [x[0:4], x[4:8], x[8:10]]

    def train_bn(h, bn):
        return F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)

    inputs = {1: [], 2: [], 3: []}
    with torch.no_grad():
        for bx in batches:
            h1 = model.conv1(bx)
            h2 = model.conv2(F.relu(train_bn(h1, model.bn1)))
            h3 = model.fc1(torch.flatten(F.adaptive_avg_pool2d(F.relu(train_bn(h2, model.bn2)), 2), 1))
            for k, h in zip((1, 2, 3), (h1, h2, h3)):
                inputs[k].append(h)
    expected = {}
    for k, hs in inputs.items():
        h = torch.cat(hs)
        dims = (0, 2, 3) if h.dim() == 4 else (0,)
        expected[k] = (h.mean(dim=dims), h.var(dim=dims, unbiased=True))
    assert S.recompute_bn_statistics(model, batches) == 3
    for k, bn in ((1, model.bn1), (2, model.bn2), (3, model.bn3)):
        torch.testing.assert_close(bn.running_mean, expected[k][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bn.running_var, expected[k][1], rtol=1e-12, atol=1e-14)
        # not the equal-weight average of the three batches' statistics
        dims = (0, 2, 3) if inputs[k][0].dim() == 4 else (0,)
        equal = torch.stack([h.var(dim=dims) for h in inputs[k]]).mean(0)
        assert not torch.allclose(bn.running_var, equal, rtol=1e-3)
        assert int(bn.num_batches_tracked) == 3
    assert not model.training and not model.bn1.training and "forward" not in model.drop.__dict__   # modes restored


def test_mc_dropout_averages_probabilities_with_fixed_masks():
    model, data = tiny(), tiny_data()
    d = S.random_directions(model, 1, seed=0)
    x = np.array([0.0, 0.5])
    r1 = S.surface(model, data, d, x, mc=3, seed=7)
    r2 = S.surface(model, data, d, x, mc=3, seed=7)
    r0 = S.surface(model, data, d, x, mc=0)
    np.testing.assert_array_equal(r1["loss"], r2["loss"])   # same masks at every evaluation
    assert not np.allclose(r1["loss"], r0["loss"])
    # reference: mean of the 3 samples' probabilities, each drawn with the run's mask seeds
    total = 0.0
    with torch.no_grad():
        for bi, (bx, by) in enumerate(data.batches()):
            probs = []
            for s in range(3):
                with mc_dropout(model, True, seed=seeds.derive_seed(7, seeds.SURFACE_MC_SAMPLE, bi, s)):
                    probs.append(F.softmax(model(bx), 1))
            p = torch.stack(probs).mean(0)
            total += -torch.log(p[torch.arange(len(by)), by]).sum().item()
    assert r1["loss"][0] == pytest.approx(total / len(data), rel=1e-12)


def test_non_finite_losses_are_kept_as_computed():
    model, data = tiny(), tiny_data()
    d = S.random_directions(model, 1, norm="none", seed=0)
    res = S.surface(model, data, d, np.array([0.0, 1e308]))
    assert np.isfinite(res["loss"][0]) and not np.isfinite(res["loss"][1])


# ----------------------------------------------------------------------------- directions
def test_filter_normalisation_properties():
    model = tiny()
    with torch.no_grad():
        model.conv.weight[1].zero_()                     # a dead filter: zero norm, no crash
    d = S.random_directions(model, 2, norm="filter", ignore="biasbn", seed=0)
    w = dict(model.named_parameters())
    for axis in (d.x, d.y):
        for name, t in axis.items():
            if w[name].dim() < 2:
                assert torch.count_nonzero(t) == 0, name
            else:
                dn = t.flatten(1).norm(dim=1)
                wn = w[name].detach().flatten(1).norm(dim=1)
                torch.testing.assert_close(dn, wn, rtol=1e-12, atol=0)
    assert torch.count_nonzero(d.x["conv.weight"][1]) == 0
    assert not torch.equal(d.x["conv.weight"], d.y["conv.weight"])


def test_zero_bn_bias_with_ignore_none_does_not_crash():
    """loss-landscapes divides by zero when a BN bias is zero, as at initialisation."""
    model = tiny()
    with torch.no_grad():
        model.bn.bias.zero_()
    d = S.random_directions(model, 1, norm="filter", ignore="none", seed=0)
    assert torch.count_nonzero(d.x["bn.bias"]) == 0
    assert d.x["bn.weight"].norm() == pytest.approx(model.bn.weight.norm().item(), rel=1e-12)
    for t in d.x.values():
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("norm", ["layer", "weight", "none", "filter-dim0"])
def test_other_normalisations(norm):
    model = tiny()
    w = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    raw = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in w.items()}
    d = S.normalize_direction(raw, w, norm, "biasbn")
    for n, t in d.items():
        if w[n].dim() < 2:
            assert torch.count_nonzero(t) == 0
        elif norm == "layer":
            assert t.norm().item() == pytest.approx(w[n].norm().item(), rel=1e-12)
        elif norm == "weight":
            torch.testing.assert_close(t, raw[n] * w[n].abs(), rtol=1e-15, atol=0)
        elif norm == "none":
            assert torch.equal(t, raw[n])
        else:
            torch.testing.assert_close(t.norm(dim=0), w[n].norm(dim=0), rtol=1e-12, atol=0)


def test_directions_are_seeded_and_refuse_unknown_options():
    model = tiny()
    a, b = S.random_directions(model, 2, seed=4), S.random_directions(model, 2, seed=4)
    assert a.digest() == b.digest()
    assert a.digest() != S.random_directions(model, 2, seed=5).digest()
    raw = torch.cat([t.flatten() for t in S.random_directions(model, 1, norm="none", seed=0).x.values()])
    assert abs(raw.mean().item()) < 0.3 and 0.75 < raw.std().item() < 1.25   # Gaussian, not uniform [0, 1)
    assert (raw < 0).float().mean().item() > 0.3
    with pytest.raises(ConfigError, match="--norm 'filterr' is not one of"):
        S.random_directions(model, 2, norm="filterr")
    with pytest.raises(ConfigError, match="--dims 3 must be 1 or 2"):
        S.random_directions(model, 3)


def test_line_to_hits_both_models_exactly():
    a, b, data = tiny(0), tiny(1), tiny_data()
    d = S.line_to(a, b, "b")
    x = S.parse_range("-0.5:1.5:21")
    assert 0.0 in x and 1.0 in x
    res = S.surface(a, data, d, x)
    assert res["loss"][list(x).index(0.0)] == S.evaluate_model(a, data)[0]
    assert res["loss"][list(x).index(1.0)] == S.evaluate_model(b, data)[0]
    mid = set_weights(a, d, 0.5, 0)
    with torch.no_grad():   # buffers are interpolated too
        mid.bn.running_mean.copy_((a.bn.running_mean + b.bn.running_mean) / 2)
        mid.bn.running_var.copy_((a.bn.running_var + b.bn.running_var) / 2)
    assert res["loss"][list(x).index(0.5)] == pytest.approx(brute_loss(mid, data)[0], rel=1e-12)


def test_plane_through_three_models():
    m0, ma, mb = tiny(0), tiny(1), tiny(2)
    d = S.plane_through(m0, ma, mb, ("A", "B"))
    u = torch.cat([t.flatten() for t in d.x.values()])
    v = torch.cat([t.flatten() for t in d.y.values()])
    assert u.norm().item() == pytest.approx(1, abs=1e-12) and v.norm().item() == pytest.approx(1, abs=1e-12)
    assert abs((u @ v).item()) < 1e-12
    for label, other in (("A", ma), ("B", mb)):
        a, b = d.points[label]
        rebuilt = set_weights(m0, d, a, b)
        for (n, p), (_, q) in zip(rebuilt.named_parameters(), other.named_parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_pca_recovers_a_known_plane():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(w0.numel(), 2, generator=gen, dtype=torch.float64))
    coefs = torch.randn(6, 2, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0])
    trajectory = []
    for k, c in enumerate(coefs):
        flat = w0 + basis @ c
        params, i = {}, 0
        for n, p in model.named_parameters():
            params[n] = flat[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        trajectory.append((f"epoch{k}", params))
    d = S.pca_directions(model, trajectory)
    u = torch.cat([d.x[n].flatten() for n in names])
    v = torch.cat([d.y[n].flatten() for n in names])
    # the recovered plane is the known one: projecting its basis onto (u, v) keeps the full norm
    proj = torch.stack([basis.T @ u, basis.T @ v])
    torch.testing.assert_close(proj.T @ proj, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-10)
    assert np.allclose(d.extras["trajectory_distance"], 0, atol=1e-10)
    assert d.extras["explained_variance_ratio"].sum() == pytest.approx(1, abs=1e-10)
    assert d.extras["explained_variance_ratio"][0] >= d.extras["explained_variance_ratio"][1]
    for (label, params), (a, b) in zip(trajectory, d.extras["trajectory_coords"]):
        flat = torch.cat([params[n].flatten() for n in names])
        torch.testing.assert_close(w0 + a * u + b * v, flat, rtol=0, atol=1e-10)


def test_pca_reports_distance_from_the_plane():
    model = tiny()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    e = {n: torch.zeros_like(t) for n, t in w.items()}
    trajectory = []
    for k, (a, b, c) in enumerate([(1, 0, 0), (0, 1, 0), (2, 1, 0), (1, 1, 0.5)]):
        p = {n: t.clone() for n, t in w.items()}
        p["fc.weight"][0, 0] += a
        p["fc.weight"][1, 1] += b
        p["conv.weight"][0, 0, 0, 0] += c * 1e-3          # small: stays out of the top-2 plane
        trajectory.append((str(k), p))
    d = S.pca_directions(model, trajectory)
    dist = d.extras["trajectory_distance"]
    assert dist[:3] == pytest.approx([0, 0, 0], abs=2e-4) and dist[3] > 2e-4
    del e


# ----------------------------------------------------------------------------- grids and shards
@pytest.mark.parametrize("spec", ["-1:1", "a:b:3", "1:-1:5", "-1:1:1", "0:1:0", "", "1:2:3:4"])
def test_bad_ranges_are_refused(spec):
    with pytest.raises(ConfigError, match=r"expected MIN:MAX:NUM"):
        S.parse_range(spec, "--x")


def test_shard_points_is_a_balanced_partition():
    for n_points, n in [(21, 4), (441, 7), (3, 5)]:
        shards = [S.shard_points(n_points, i, n) for i in range(n)]
        allp = np.concatenate(shards)
        assert sorted(allp.tolist()) == list(range(n_points))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError):
        S.parse_shard("4/4")
    assert S.parse_shard("2/8") == (2, 8)


# ----------------------------------------------------------------------------- resumable runs
def _job(seed=0, dims=2, label="m"):
    model, data = tiny(), tiny_data()
    return S.SurfaceJob(label, model, None, data, S.random_directions(model, dims, seed=seed))


GRID = (np.linspace(-1, 1, 3), np.linspace(-1, 1, 4))


def _arrays(path):
    res = store.read_result(path)
    return {label: {k: node.data[k] for k in ("x", "y", "loss", "accuracy", "done")} for label, node in res.models.items()}


def _assert_same(a, b):
    assert list(a) == list(b)
    for label in a:
        for k in a[label]:
            np.testing.assert_array_equal(a[label][k], b[label][k])


def test_resume_after_an_interruption_equals_a_full_run(tmp_path):
    full = S.run_surface([_job()], str(tmp_path / "full.h5"), S.SurfaceOptions(*GRID))
    out = str(tmp_path / "s.h5")
    calls = []

    def interrupt(job_index, point):
        calls.append(point)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.run_surface([_job()], out, S.SurfaceOptions(*GRID), flush_points=2, on_point=interrupt)
    partial = store.read_result(out + ".partial").models["m"]
    assert partial.data["done"].sum() == 5                      # the unflushed tail was saved on the way out
    assert np.isnan(partial.data["loss"][~partial.data["done"].astype(bool)]).all()
    resumed = []
    S.run_surface([_job()], out, S.SurfaceOptions(*GRID), on_point=lambda j, p: resumed.append(p))
    assert len(resumed) == 12 - 5
    _assert_same(_arrays(full), _arrays(out))
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".lock")


def test_kill_9_then_resume_equals_a_full_run(tmp_path):
    """A real SIGKILL in the middle of a run (no cleanup at all), then the same call again."""
    out = str(tmp_path / "k.h5")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np
        import test_surface as T
        from landscape_tools import surface as S
        n = []
        def hook(j, p):
            n.append(p)
            if len(n) == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        S.run_surface([T._job()], {out!r}, S.SurfaceOptions(*T.GRID), flush_points=3, on_point=hook)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -9, proc.stderr.decode()
    assert os.path.exists(out + ".partial") and os.path.exists(out + ".lock")
    done = store.read_result(out + ".partial").models["m"].data["done"]
    assert done.sum() == 6                                       # two flushed batches of 3; the 7th point lost
    S.run_surface([_job()], out, S.SurfaceOptions(*GRID))
    full = S.run_surface([_job()], str(tmp_path / "full.h5"), S.SurfaceOptions(*GRID))
    _assert_same(_arrays(full), _arrays(out))


def test_partial_file_of_another_run_is_refused(tmp_path):
    out = str(tmp_path / "s.h5")

    def stop(j, p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.run_surface([_job(seed=0)], out, S.SurfaceOptions(*GRID), on_point=stop)
    with pytest.raises(StoreError, match=r"holds progress of a different run \(another directions \(m\)\)"):
        S.run_surface([_job(seed=1)], out, S.SurfaceOptions(*GRID))
    with pytest.raises(StoreError, match=r"another grid \(--x\)"):
        S.run_surface([_job(seed=0)], out, S.SurfaceOptions(np.linspace(-2, 2, 3), GRID[1]))
    S.run_surface([_job(seed=1)], out, S.SurfaceOptions(*GRID), overwrite=True)
    with pytest.raises(StoreError, match="already exists"):
        S.run_surface([_job(seed=1)], out, S.SurfaceOptions(*GRID))


def test_shards_merge_into_the_single_run(tmp_path):
    single = S.run_surface([_job()], str(tmp_path / "single.h5"), S.SurfaceOptions(*GRID))
    parts = [str(S.run_surface([_job()], str(tmp_path / f"p{i}.h5"), S.SurfaceOptions(*GRID), shard=(i, 3))) for i in range(3)]
    part0 = store.read_result(parts[0])
    assert part0.attrs["shard"] == 0 and part0.attrs["n_shards"] == 3
    assert part0.models["m"].data["done"].sum() == 4
    merged = S.merge_shards(parts[::-1], str(tmp_path / "merged.h5"))
    _assert_same(_arrays(single), _arrays(merged))
    a, b = store.read_result(single).models["m"], store.read_result(merged).models["m"]
    for axis in ("x", "y"):
        for name, vec in a["directions"].groups[axis].data.items():
            np.testing.assert_array_equal(vec, b["directions"].groups[axis].data[name])


def test_merge_refuses_inconsistent_shards(tmp_path):
    p = [str(S.run_surface([_job()], str(tmp_path / f"p{i}.h5"), S.SurfaceOptions(*GRID), shard=(i, 2))) for i in range(2)]
    other = str(S.run_surface([_job(seed=9)], str(tmp_path / "o1.h5"), S.SurfaceOptions(*GRID), shard=(1, 2)))
    with pytest.raises(ConfigError, match="different runs"):
        S.merge_shards([p[0], other], str(tmp_path / "m.h5"))
    with pytest.raises(ConfigError, match=r"shard 0/2 given twice"):
        S.merge_shards([p[0], p[0]], str(tmp_path / "m.h5"))
    with pytest.raises(ConfigError, match=r"shard\(s\) 1/2 missing: 2 were cut and 1 given \(.*p0.h5\); compute the "
                                          r"missing one\(s\) with --shard I/2 first"):
        S.merge_shards([p[0]], str(tmp_path / "m.h5"))
    assert not os.path.exists(tmp_path / "m.h5")


def test_direction_files_are_reused_exactly_and_checked(tmp_path):
    job = _job(seed=3)
    path = S.run_surface([job], str(tmp_path / "a.h5"), S.SurfaceOptions(*GRID))
    d = S.load_directions(str(path), S.model_fingerprint(job.model), 2)
    assert d.digest() == job.directions.digest()
    again = S.run_surface([S.SurfaceJob("m", job.model, None, job.data, d)], str(tmp_path / "b.h5"), S.SurfaceOptions(*GRID))
    _assert_same(_arrays(path), _arrays(again))
    line = S.run_surface([_job(dims=1)], str(tmp_path / "line.h5"), S.SurfaceOptions(GRID[0]))
    with pytest.raises(ConfigError, match=r"holds 1-D directions but this run is 2-D"):
        S.load_directions(str(line), S.model_fingerprint(job.model), 2)
    with pytest.raises(ConfigError, match="was made for other weights"):
        S.load_directions(str(path), S.model_fingerprint(tiny(5)), 2)
    with pytest.raises(ConfigError, match="directions were made for another model"):
        S.SurfaceEvaluator(tiny(5), job.data, d)


def test_stored_layout(tmp_path):
    job = _job()
    path = S.run_surface([job], str(tmp_path / "a.h5"), S.SurfaceOptions(*GRID))
    res = store.read_result(path)
    node = res.models["m"]
    assert res.kind == "surface" and node.data["loss"].dtype == np.float64
    assert node.data["loss"].shape == (3, 4) and node.data["done"].all()
    dirs = node.groups["directions"]
    assert set(dirs.groups["x"].data) == {n for n, _ in job.model.named_parameters()}
    assert dirs.attrs["model_fingerprint"] == S.model_fingerprint(job.model)
    assert json.loads(dirs.attrs["recipe"])["norm"] == "filter"
    assert node.attrs["bn"] == "frozen" and node.attrs["norm"] == "filter" and node.attrs["split"] == "train"
