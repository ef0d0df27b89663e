"""examples/python/*: each script's main() runs at its tiny sizes and its numbers are checked against
an independent computation (dense Hessians, hand-built weights, analytic dropout variance, the file)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "python"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dense_hessian(model, batches) -> np.ndarray:
    """The Hessian of the mean cross-entropy over ``batches`` (equal sizes), by double autograd."""
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(flat):
        chunks, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            chunks[n] = flat[i:i + k].reshape(s)
            i += k
        out = torch.func.functional_call(model, chunks, (torch.cat([x for x, _ in batches]),))
        return F.cross_entropy(out, torch.cat([y for _, y in batches]))

    return torch.autograd.functional.hessian(loss, flat0).numpy()


def top_by_magnitude(h: np.ndarray, k: int) -> np.ndarray:
    w = np.linalg.eigvalsh(h)
    return w[np.argsort(-np.abs(w))[:k]]


def test_hessian_own_model_matches_dense(capsys):
    ex = load("hessian_own_model")
    model, batches, per_batch, whole = ex.main(k=4)
    assert len(batches) == 3
    for i, batch in enumerate(batches):
        want = top_by_magnitude(dense_hessian(model, [batch]), 4)
        np.testing.assert_allclose(per_batch.eigenvalues[i], want, rtol=1e-7, atol=1e-10)
    full = dense_hessian(model, batches)
    np.testing.assert_allclose(whole.eigenvalues[0], top_by_magnitude(full, 4), rtol=1e-7, atol=1e-10)
    assert per_batch.converged.all() and whole.converged.all()
    # the density's quadrature: Ritz values inside the true spectrum, weights of each run summing to 1
    spectrum = np.linalg.eigvalsh(full)
    nodes, weights = whole.density["nodes"][0], whole.density["weights"][0]
    assert nodes.min() >= spectrum[0] - 1e-8 and nodes.max() <= spectrum[-1] + 1e-8
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-8)
    # what it printed is what it computed
    assert f"all data: " + ", ".join(f"{v:+.5f}" for v in whole.eigenvalues[0]) in capsys.readouterr().out


def _loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.x).double(), data.y))


def test_torchvision_surface_matches_hand_built_weights(tmp_path):
    ex = load("torchvision_surface")
    data, model_a, model_b, line, one_d, plane, two_d = ex.main(str(tmp_path), line_points=7, grid_points=3)
    a = one_d["x"]
    np.testing.assert_allclose(a, np.linspace(-0.25, 1.25, 7))
    # the ends of the line are the two checkpoints, read back from the files
    np.testing.assert_allclose(one_d["loss"][1], _loss(ex.load(tmp_path / "A.pt"), data), rtol=1e-5)
    np.testing.assert_allclose(one_d["loss"][5], _loss(ex.load(tmp_path / "B.pt"), data), rtol=1e-5)
    # a = 0.5 and a = 1.25: parameters and BatchNorm statistics interpolated by hand
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for i in (3, 6):
        t = float(a[i])
        mixed = {k: (sa[k] + t * (sb[k] - sa[k])) if sa[k].is_floating_point() else sb[k] for k in sa}
        m = ex.load(tmp_path / "A.pt")
        m.load_state_dict(mixed)
        np.testing.assert_allclose(one_d["loss"][i], _loss(m, data), rtol=1e-4)
    # 2-D: the centre is B; the corner (-1, 1) is w_B - dx + dy with dx, dy the returned directions
    assert two_d["loss"].shape == (3, 3)
    np.testing.assert_allclose(two_d["loss"][1, 1], _loss(model_b, data), rtol=1e-5)
    m = ex.load(tmp_path / "B.pt")
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(-1.0 * plane.x[name].to(p.dtype) + 1.0 * plane.y[name].to(p.dtype))
    np.testing.assert_allclose(two_d["loss"][0, 2], _loss(m, data), rtol=1e-4)
    # filter-normalised: each output filter of a conv direction has the norm of the weights' filter
    w = model_b.state_dict()["layer1.0.conv1.weight"]
    d = plane.x["layer1.0.conv1.weight"]
    np.testing.assert_allclose(d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5)
    assert (plane.x["fc.bias"] == 0).all() and (plane.x["bn1.weight"] == 0).all()
    assert (tmp_path / "surface.png").stat().st_size > 0


def test_mc_dropout_on_off_and_variance_at_named_layers():
    ex = load("mc_dropout_featvar")
    model, x, deterministic, samples, result = ex.main(mc=64)
    # off: the plain eval-mode prediction (nn.Dropout is the identity in eval mode)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(deterministic, model(x), rtol=0, atol=0)
    # on: the passes differ
    assert (samples[0] - samples[1]).abs().max() > 1e-3
    assert list(result.layers.names) == ["drop1", "drop2"]
    # drop1: inverted dropout of h = relu(conv(x)) has variance h^2 p / (1 - p) per entry
    p = 0.25
    with torch.no_grad():
        h = torch.relu(model.conv(x))
    analytic = float((h ** 2).mean()) * p / (1 - p)
    assert result.variance[0] == pytest.approx(analytic, rel=0.05)
    # drop2: brute force over many passes of the same layers (the Bessel-corrected variance per entry)
    torch.manual_seed(123)
    model.drop1.train()
    model.drop2.train()
    with torch.no_grad():
        outs = torch.stack([model.drop2(model.pool(model.drop1(h)).flatten(1)) for _ in range(3000)])
    model.eval()
    brute = float(outs.var(dim=0, unbiased=True).mean())
    assert result.variance[1] == pytest.approx(brute, rel=0.1)


def test_read_result_file_with_h5py(tmp_path):
    from landscape_tools import store
    from landscape_tools.cli.main import cli
    from tiny_files import tiny_checkpoint_and_data

    _, ckpt, spec = tiny_checkpoint_and_data(tmp_path, arch="resnet_mcdo_18", n=24)
    out = tmp_path / "e.h5"
    res = CliRunner().invoke(cli, ["evaluate", str(ckpt), "--data", spec, "--split", "train", "--mc", "1,2,4",
                                   "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    ex = load("read_result_file")
    result, fig = ex.main(str(out), str(tmp_path / "e.png"))
    stored = store.read_result(out)
    assert result["kind"] == "evaluate" and result["config"]["mc"] == [1, 2, 4]
    assert set(result["models"]) == set(stored.models) == {"m"}
    for name, value in stored.models["m"].data.items():
        np.testing.assert_array_equal(np.asarray(result["models"]["m"][name]), np.asarray(value))
    # the drawn curves are the file's numbers: NLL, accuracy (%), ECE (%) against N
    for ax, (key, scale) in zip(fig.axes, (("nll", 1.0), ("accuracy", 100.0), ("ece", 100.0))):
        line = ax.get_lines()[0]
        np.testing.assert_allclose(line.get_xdata(), [1, 2, 4])
        np.testing.assert_allclose(line.get_ydata(), np.asarray(stored.models["m"].data[key]) * scale)
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
