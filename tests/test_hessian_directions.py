"""Hessian eigenvectors as surface directions (issue #15 item 1).

Proof: along a unit eigenvector with eigenvalue l, the second difference of the stored 1-D surface at the
centre, (L(h) - 2 L(0) + L(-h)) / h^2, is l (float64, tiny nets, 1e-4 relative).  The hessian files are
written here in the layout of `lt hessian --save-vectors` from the library's `top_eigenvalues(...,
return_vectors=True)`; the surface's loss is the function the Hessian was taken of (the same data, eval
mode, BatchNorm on running statistics, dropout off, no weight decay in the loss).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_tools import store
from landscape_tools import surface as S
from landscape_tools._directions import parse_eig
from landscape_tools._hvp import select_parameters
from landscape_tools.data import DataSet
from landscape_tools.errors import ConfigError
from landscape_tools.hessian import top_eigenvalues

H = 1e-3          # the second difference's step: truncation ~ h^2 L''''/12, rounding ~ 4 eps L / h^2


class Net(nn.Module):
    """69 parameters: linear -> BatchNorm (running statistics not the defaults) -> tanh -> dropout -> linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def net(seed=0):
    torch.manual_seed(seed)
    m = Net().double()
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 0.3)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def data(n=20, batch_size=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataSet(x, y, "tensors:test", "train", 3, batch_size)


def spectrum(model, batches, k=3, **kw):
    return top_eigenvalues(model, batches, k=k, tol=1e-10, max_iter=2000, return_vectors=True, **kw)


def hessian_node(model, spec, params=None, dtype="float32"):
    """One model's group as `lt hessian --save-vectors` writes it: the spectrum, and per covered parameter
    (named as in named_parameters) the vectors (rows, k, *shape), NaN for rows not computed."""
    node = spec.to_node()
    rows, k = spec.eigenvalues.shape
    vectors, offset = {}, 0
    for name, p in select_parameters(model, params):
        n = p.numel()
        arr = np.full((rows, k, *p.shape), np.nan, dtype=dtype)
        for r, v in enumerate(spec.eigenvectors):
            if v is not None:
                arr[r] = v[:, offset:offset + n].reshape(k, *p.shape).numpy().astype(dtype)
        vectors[name] = arr
        offset += n
    node["groups"]["eigenvectors"] = {"attrs": {"model_fingerprint": S.model_fingerprint(model),
                                                "params": params, "dtype": dtype, "which": spec.which},
                                      "data": vectors}
    return node


def write_hessian(path, nodes: dict):
    root = store.provenance("hessian", ["lt", "hessian", "test"], {}, 0, "cpu")
    root["fingerprint"] = "run-fingerprint-of-the-test"
    return str(store.write_result(path, root, nodes))


def line(tmp_path, model, d, directions, name="s.h5", h=H, **kw):
    """The stored 1-D surface at -h, 0, h."""
    path = S.run_surface([S.SurfaceJob("m", model, None, d, directions)], str(tmp_path / name),
                         S.SurfaceOptions(np.array([-h, 0.0, h]), **kw))
    node = store.read_result(path).models["m"]
    assert node.data["done"].all()
    return node


def second_difference(loss, h=H):
    return (loss[2] - 2 * loss[1] + loss[0]) / h ** 2


# ----------------------------------------------------------------------------- the proof
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_second_difference_along_a_unit_eigenvector_is_its_eigenvalue(tmp_path, dtype):
    model, d = net(), data()
    spec = spectrum(model, d.batches(), scope="dataset")
    path = write_hessian(tmp_path / "h.h5", {"m": hessian_node(model, spec, dtype=dtype)})
    for i in (1, 2, 3):
        directions = S.load_directions(path, S.model_fingerprint(model), 1, model=model, eig=[i])
        flat = torch.cat([t.reshape(-1) for t in directions.x.values()])
        assert abs(float(flat.norm()) - 1.0) < 1e-14                  # renormalised after float32 storage
        node = line(tmp_path, model, d, directions, f"s{i}.h5")
        lam = spec.eigenvalues[0, i - 1]
        assert abs(second_difference(node.data["loss"]) - lam) <= 1e-4 * abs(lam), (i, lam)
        recipe = json.loads(node.groups["directions"].attrs["recipe"])
        assert recipe["kind"] == "hessian" and recipe["eig"] == [i] and recipe["row"] == 0
        assert recipe["eigenvalues"] == [lam] and recipe["curvature"] == [lam]
        assert recipe["source"] == path and recipe["source_fingerprint"] == "run-fingerprint-of-the-test"
        assert recipe["vector_dtype"] == dtype and recipe["which"] == "LM" and recipe["scope"] == "dataset"
        assert node.attrs["directions_kind"] == "hessian" and node.attrs["norm"] == "none"


def test_only_the_chosen_vectors_are_read_from_the_file(tmp_path, monkeypatch):
    """The eigenvectors of a hessian file stay on disk: the whole-file reader is never used and each
    parameter's dataset is read at the one (row, eigenvector) asked for, with the values stored there."""
    import h5py

    model, d = net(), data()
    spec = spectrum(model, d.batches(), scope="batch")
    path = write_hessian(tmp_path / "h.h5", {"m": hessian_node(model, spec, dtype="float64")})
    reads = []
    real = h5py.Dataset.__getitem__

    def recording(self, key):
        if "/eigenvectors/" in self.name:
            reads.append((self.name, key))
        return real(self, key)

    def whole_file(*a, **kw):
        raise AssertionError("the whole hessian file was read")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    monkeypatch.setattr(store, "read_result", whole_file)
    directions = S.load_directions(path, S.model_fingerprint(model), 1, model=model, row=2, eig=[3])
    names = [n for n, _ in model.named_parameters()]
    assert sorted(reads) == sorted((f"/m/eigenvectors/{n}", (2, 2)) for n in names)
    want = spec.eigenvectors[2][2].numpy()
    got = np.concatenate([directions.x[n].numpy().reshape(-1) for n in names])
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=0, atol=1e-15)


def test_2d_plane_of_two_eigenvectors_has_their_curvatures_and_no_cross_term(tmp_path):
    model, d = net(1), data()
    spec = spectrum(model, d.batches(), scope="dataset")
    path = write_hessian(tmp_path / "h.h5", {"m": hessian_node(model, spec)})
    directions = S.load_directions(path, S.model_fingerprint(model), 2, model=model, eig=[3, 1])
    res = S.surface(model, d, directions, [-H, 0.0, H], [-H, 0.0, H])
    loss = res["loss"]
    l3, l1 = spec.eigenvalues[0, 2], spec.eigenvalues[0, 0]
    assert abs(second_difference(loss[:, 1]) - l3) <= 1e-4 * abs(l3)
    assert abs(second_difference(loss[1, :]) - l1) <= 1e-4 * abs(l1)
    cross = (loss[2, 2] - loss[2, 0] - loss[0, 2] + loss[0, 0]) / (4 * H * H)   # v3' H v1 = 0
    assert abs(cross) <= 1e-4 * abs(l1)
    assert json.loads(json.dumps(directions.recipe))["eigenvalues"] == [l3, l1]


def test_default_is_row_0_eigenvectors_1_and_2(tmp_path):
    model, d = net(), data()
    spec = spectrum(model, d.batches(), scope="dataset")
    path = write_hessian(tmp_path / "h.h5", {"m": hessian_node(model, spec, dtype="float64")})
    two = S.load_directions(path, S.model_fingerprint(model), 2, model=model)
    one = S.load_directions(path, S.model_fingerprint(model), 1, model=model)
    assert two.recipe["eig"] == [1, 2] and one.recipe["eig"] == [1] and one.y is None
    v = spec.eigenvectors[0]
    names = [n for n, _ in model.named_parameters()]
    np.testing.assert_allclose(torch.cat([two.y[n].reshape(-1) for n in names]).numpy(),
                               (v[1] / v[1].norm()).numpy(), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(torch.cat([one.x[n].reshape(-1) for n in names]).numpy(),
                                  torch.cat([two.x[n].reshape(-1) for n in names]).numpy())


def test_a_batch_row_is_the_curvature_of_that_batchs_loss(tmp_path):
    model, d = net(2), data()
    spec = spectrum(model, d.batches(), k=2, scope="batch")
    path = write_hessian(tmp_path / "h.h5", {"m": hessian_node(model, spec)})
    bx, by = d.batches()[1]
    batch = DataSet(bx, by, "tensors:test", "train", 3, 7)
    directions = S.load_directions(path, S.model_fingerprint(model), 1, model=model, row=1)
    node = line(tmp_path, model, batch, directions)
    lam = spec.eigenvalues[1, 0]
    assert abs(second_difference(node.data["loss"]) - lam) <= 1e-4 * abs(lam)
    assert json.loads(node.groups["directions"].attrs["recipe"])["row"] == 1


def test_params_subset_leaves_the_other_parameters_alone(tmp_path):
    model, d = net(3), data()
    spec = spectrum(model, d.batches(), k=2, scope="dataset", params="fc2.*")
    path = write_hessian(tmp_path / "h.h5", {"m": hessian_node(model, spec, params="fc2.*")})
    directions = S.load_directions(path, S.model_fingerprint(model), 1, model=model)
    for name, t in directions.x.items():
        assert bool(t.any()) == name.startswith("fc2."), name
    node = line(tmp_path, model, d, directions)
    lam = spec.eigenvalues[0, 0]
    assert abs(second_difference(node.data["loss"]) - lam) <= 1e-4 * abs(lam)
    assert directions.recipe["params"] == "fc2.*"


def test_weight_decay_is_taken_off_the_curvature_of_the_surfaces_loss(tmp_path):
    model, d = net(4), data()
    wd = 0.05
    spec = spectrum(model, d.batches(), k=1, scope="dataset", weight_decay=wd)
    path = write_hessian(tmp_path / "h.h5", {"m": hessian_node(model, spec)})
    directions = S.load_directions(path, S.model_fingerprint(model), 1, model=model)
    lam = spec.eigenvalues[0, 0]
    assert directions.recipe["weight_decay"] == wd and directions.recipe["curvature"] == [lam - wd]
    node = line(tmp_path, model, d, directions)
    assert abs(second_difference(node.data["loss"]) - (lam - wd)) <= 1e-4 * abs(lam - wd)


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def two_models(tmp_path):
    """A hessian file of models a and b (each with its eigenvectors), and a third model c."""
    d = data()
    a, b, c = net(0), net(1), net(2)
    nodes = {}
    for label, m in (("a", a), ("b", b)):
        nodes[label] = hessian_node(m, spectrum(m, d.batches(), k=2, scope="batch"))
    nodes["a"]["data"]["done"][2] = False
    nodes["a"]["data"]["eigenvalues"][2] = np.nan
    for arr in nodes["a"]["groups"]["eigenvectors"]["data"].values():
        arr[2] = np.nan
    nodes["b"]["groups"]["eigenvectors"]["data"]["fc1.weight"][1, 0, 0, 0] = np.nan
    return write_hessian(tmp_path / "h.h5", nodes), a, b, c


def load(path, model, dims=1, **kw):
    return S.load_directions(path, S.model_fingerprint(model), dims, model=model, **kw)


def test_each_model_gets_its_own_groups_eigenvectors(two_models):
    path, a, b, _ = two_models
    assert load(path, a).recipe["model"] == "a" and load(path, b).recipe["model"] == "b"
    da = load(path, a)
    with pytest.raises(ConfigError, match="directions were made for another model"):
        S.SurfaceEvaluator(b, data(), da)


def test_another_models_file_is_refused_naming_file_row_and_models(two_models):
    path, _, _, c = two_models
    fp = S.model_fingerprint(c)[:12]
    with pytest.raises(ConfigError) as err:
        load(path, c, row=1)
    text = str(err.value)
    assert f"--directions {path}:1: the eigenvectors were computed for other weights" in text
    assert "model a (" in text and ", b (" in text and f"not this model ({fp})" in text
    assert "run lt hessian --save-vectors on this checkpoint" in text


def test_rows_not_done_or_nan_and_eig_beyond_k_are_refused(two_models):
    path, a, b, _ = two_models
    with pytest.raises(ConfigError, match=r":2 \(model a\): row 2 is not computed .* choose a done row \(0, 1\)"):
        load(path, a, row=2)
    with pytest.raises(ConfigError, match=r"row 5 does not exist; the file has rows 0\.\.2"):
        load(path, a, row=5)
    with pytest.raises(ConfigError, match=r"eigenvector 1 is NaN / not finite \(fc1.weight\)"):
        load(path, b, row=1)
    with pytest.raises(ConfigError, match=r"--eig 1,3 asks for eigenvector 3, but the file holds 2 per row .*"
                                          r"--top-k 3"):
        load(path, a, dims=2, eig=[1, 3])
    with pytest.raises(ConfigError, match=r"--eig 1 names 1 eigenvector\(s\) but this run is 2-D"):
        load(path, a, dims=2, eig=[1])


def test_a_hessian_file_without_eigenvectors_says_save_vectors(tmp_path):
    model, d = net(), data()
    node = spectrum(model, d.batches(), k=1, scope="dataset").to_node()
    path = write_hessian(tmp_path / "h.h5", {"m": node})
    with pytest.raises(ConfigError, match="without stored eigenvectors: run lt hessian with --save-vectors"):
        load(path, model)


def test_eigenvectors_of_another_architecture_are_refused(tmp_path):
    model, d = net(), data()
    node = hessian_node(model, spectrum(model, d.batches(), k=1, scope="dataset"))
    node["groups"]["eigenvectors"]["data"]["fc3.weight"] = np.zeros((1, 1, 2, 2))
    path = write_hessian(tmp_path / "h.h5", {"m": node})
    with pytest.raises(ConfigError, match="fc3.weight are not trainable parameters of this model"):
        load(path, model)


def test_surface_files_take_no_row_or_eig(tmp_path):
    model, d = net(), data()
    directions = S.random_directions(model, 1)
    path = str(S.run_surface([S.SurfaceJob("m", model, None, d, directions)], str(tmp_path / "s.h5"), S.SurfaceOptions(np.array([0.0]))))
    with pytest.raises(ConfigError, match=r"a :ROW picks a Hessian of a hessian file, .* drop :1"):
        load(path, model, row=1)
    with pytest.raises(ConfigError, match="--eig 1 picks eigenvectors of a hessian file"):
        load(path, model, eig=[1])
    assert load(path, model).digest() == directions.digest()


def test_parse_eig_and_split_directions_spec(tmp_path):
    assert parse_eig("1,3") == [1, 3] and parse_eig(" 2 ") == [2] and parse_eig(None) is None
    for bad, why in (("0", "each >= 1"), ("1,2,3", "one .1-D. or two"), ("a", "not a list"), ("2,2", "twice"),
                     ("1.5", "not a list")):
        with pytest.raises(ConfigError, match=why):
            parse_eig(bad)
    odd = tmp_path / "run:7.h5"
    odd.write_bytes(b"")
    assert S.split_directions_spec(str(odd)) == (str(odd), None)
    assert S.split_directions_spec(str(tmp_path / "h.h5:3")) == (str(tmp_path / "h.h5"), 3)
    assert S.split_directions_spec(str(tmp_path / "h.h5")) == (str(tmp_path / "h.h5"), None)


# ----------------------------------------------------------------------------- through the CLI
class DoubleNet(Net):
    """:class:`Net` for `--model test_hessian_directions:double_net`: float64, taking the float32 data."""

    def forward(self, x):
        return super().forward(x.to(torch.float64))


def double_net():
    return DoubleNet().double()


def cli(*args):
    from click.testing import CliRunner

    from landscape_tools.cli.main import cli as main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """n.pt and other.pt (bare state dicts of DoubleNet), tensors data, and h.h5: n.pt's dataset Hessian
    (k = 3) with its eigenvectors in float32, taken of the data exactly as lt surface loads it."""
    from landscape_tools.checkpoints import load_checkpoint
    from landscape_tools.data import load_data, save_tensors

    root = tmp_path_factory.mktemp("hdir")
    for name, seed in (("n", 0), ("other", 1)):
        m = DoubleNet().double()
        m.load_state_dict(net(seed).state_dict())
        torch.save(m.state_dict(), root / f"{name}.pt")
    rng = np.random.default_rng(0)
    save_tensors(root / "d.npz", x=rng.normal(size=(20, 4)).astype(np.float32), y=rng.integers(0, 3, 20))
    spec_ = "tensors:" + str(root / "d.npz")
    model, _ = load_checkpoint(root / "n.pt", model="test_hessian_directions:double_net")
    ds = load_data(spec_, split="train", batch_size=7)
    spec = spectrum(model.eval(), ds.batches(), scope="dataset")
    path = write_hessian(root / "h.h5", {"n": hessian_node(model, spec)})
    return {"root": root, "data": spec_, "h": path, "spectrum": spec, "model": model}


def cli_surface(files, ckpt, *args):
    return cli("surface", files["root"] / ckpt, "--model", "test_hessian_directions:double_net", "--data",
               files["data"], "--batch-size", 7, "--compile", "off", *args)


def test_cli_line_along_eigenvector_1_has_its_eigenvalue_as_second_difference(cli_files):
    out = cli_files["root"] / "line.h5"
    r = cli_surface(cli_files, "n.pt", "--directions", f"{cli_files['h']}:0", "--dims", 1, "--x", "-1e-3:1e-3:3",
                    "-o", out)
    assert r.exit_code == 0, r.output
    node = store.read_result(out).models["n"]
    lam = cli_files["spectrum"].eigenvalues[0, 0]
    assert abs(second_difference(node.data["loss"]) - lam) <= 1e-4 * abs(lam)
    recipe = json.loads(node.groups["directions"].attrs["recipe"])
    assert recipe["eig"] == [1] and recipe["eigenvalues"] == [lam] and recipe["row"] == 0
    v = cli_files["spectrum"].eigenvectors[0][0]
    stored = node.groups["directions"].groups["x"].data
    flat = np.concatenate([stored[n].reshape(-1) for n, _ in cli_files["model"].named_parameters()])
    np.testing.assert_allclose(flat, (v / v.norm()).numpy(), rtol=0, atol=1e-7)   # float32 storage
    assert abs(np.linalg.norm(flat) - 1) < 1e-14


def test_cli_says_when_the_surface_is_not_the_function_the_hessian_was_taken_of(cli_files):
    """--bn recompute changes the loss away from the Hessian's (running statistics): one note on stderr;
    the default (--bn frozen, --mc 0) prints none."""
    args = ("--directions", cli_files["h"], "--dims", 1, "--x", "-1e-3:1e-3:3")
    r = cli_surface(cli_files, "n.pt", *args, "--bn", "recompute", "-o", cli_files["root"] / "bn.h5")
    assert r.exit_code == 0, r.output
    assert "--bn recompute this surface is another function" in r.output and "only indicative" in r.output
    r = cli_surface(cli_files, "n.pt", *args, "-o", cli_files["root"] / "frozen.h5")
    assert r.exit_code == 0 and "only indicative" not in r.output, r.output


def test_cli_eig_picks_the_vectors_and_sets_the_dimensions(cli_files):
    out = cli_files["root"] / "e3.h5"
    r = cli_surface(cli_files, "n.pt", "--directions", cli_files["h"], "--eig", 3, "--x", "-1e-3:1e-3:3", "-o", out)
    assert r.exit_code == 0, r.output
    node = store.read_result(out).models["n"]
    lam = cli_files["spectrum"].eigenvalues[0, 2]
    assert "y" not in node.data and abs(second_difference(node.data["loss"]) - lam) <= 1e-4 * abs(lam)
    out = cli_files["root"] / "e21.h5"
    r = cli_surface(cli_files, "n.pt", "--directions", cli_files["h"], "--eig", "2,1", "--x", "-1:1:2", "--y", "0:0:1",
                    "-o", out)
    assert r.exit_code == 0, r.output
    recipe = json.loads(store.read_result(out).models["n"].groups["directions"].attrs["recipe"])
    assert recipe["eig"] == [2, 1] and recipe["eigenvalues"] == list(cli_files["spectrum"].eigenvalues[0, [1, 0]])


@pytest.mark.parametrize("args, message", [
    (("--directions", "{h}:0", "--dims", 1), "Error: --directions {h}:0: the eigenvectors were computed for other "
                                              "weights (model n ("),
    (("--directions", "{h}:1", "--dims", 1), "row 1 does not exist; the file has rows 0..0"),
    (("--directions", "{h}", "--eig", 4), "--eig 4 asks for eigenvector 4, but the file holds 3 per row"),
    (("--eig", "1,2"), "Error: --eig 1,2 picks Hessian eigenvectors: give the hessian file with --directions"),
    (("--directions", "{h}", "--eig", 1, "--dims", 2), "Error: --eig 1 names 1 eigenvector(s) but --dims 2 asks for 2"),
    (("--directions", "{h}", "--eig", "1,1"), "names eigenvector 1 twice"),
])
def test_cli_refusals(cli_files, args, message):
    ckpt = "other.pt" if "other weights" in message else "n.pt"
    args = [str(a).format(h=cli_files["h"]) for a in args]
    r = cli_surface(cli_files, ckpt, *args, "-o", cli_files["root"] / "bad.h5")
    assert r.exit_code != 0 and message.format(h=cli_files["h"]) in r.output, r.output
    assert not (cli_files["root"] / "bad.h5").exists()


# ----------------------------------------------------------------------------- figures
def quadratic_line(ax):
    found = [ln for ln in ax.get_lines() if ln.get_label().startswith("quadratic model")]
    return found[0] if found else None


def test_plot_draws_the_quadratic_model_of_the_files_eigenvalue_over_the_measured_line(cli_files, monkeypatch):
    from landscape_tools import plotting

    out, png = cli_files["root"] / "wide.h5", cli_files["root"] / "wide.png"
    figs = []
    real = plotting.figure
    monkeypatch.setattr(plotting, "figure", lambda *a, **k: figs.append(real(*a, **k)) or figs[-1])
    r = cli_surface(cli_files, "n.pt", "--directions", cli_files["h"], "--eig", 2, "--x", "-4:4:9", "-o", out,
                    "--plot", png)
    assert r.exit_code == 0, r.output
    r = cli("plot", out, "-o", cli_files["root"] / "again.png")
    assert r.exit_code == 0, r.output
    assert png.exists() and len(figs) == 2
    node = store.read_result(out).models["n"]
    x, loss = node.data["x"], node.data["loss"]
    lam = json.loads(node.groups["directions"].attrs["recipe"])["eigenvalues"][0]
    assert lam == cli_files["spectrum"].eigenvalues[0, 1]
    try:
        for fig in figs:
            ax = fig.axes[0]
            measured = ax.get_lines()[0]
            np.testing.assert_array_equal(measured.get_xdata(), x)
            np.testing.assert_array_equal(measured.get_ydata(), loss)
            quad = quadratic_line(ax)
            a = np.asarray(quad.get_xdata())
            assert a[0] == -4 and a[-1] == 4 and len(a) == 201
            np.testing.assert_allclose(quad.get_ydata(), loss[4] + 0.5 * lam * a ** 2, rtol=1e-15, atol=0)
            assert quad.get_linestyle() == "--" and f"= {lam:.4g}" in quad.get_label()
            assert "quadratic model" in [t.get_text().split(" $")[0] for t in ax.get_legend().get_texts()]
            assert ax.get_xlabel() == f"x: eigenvector 2 ($\\lambda_{{2}}$ = {lam:.4g})"
            lo, hi = ax.get_ylim()                     # the measured curve sets the range, not the parabola
            assert lo <= np.nanmin(loss) and np.nanmax(loss) <= hi < lam * 8
    finally:
        for fig in figs:
            plotting.pyplot().close(fig)


def test_plane_of_eigenvectors_labels_its_axes_and_its_line_gets_the_x_quadratic(cli_files):
    from landscape_tools import plotting

    out = cli_files["root"] / "plane.h5"
    r = cli_surface(cli_files, "n.pt", "--directions", cli_files["h"], "--x", "-2:2:5", "--y", "-1:1:3", "-o", out)
    assert r.exit_code == 0, r.output
    node = store.read_result(out).models["n"]
    l1, l2 = cli_files["spectrum"].eigenvalues[0, :2]
    fig = plotting.figure([out], kind="contour")
    try:
        ax = fig.axes[0]
        assert ax.get_xlabel() == f"x: eigenvector 1 ($\\lambda_{{1}}$ = {l1:.4g})"
        assert ax.get_ylabel() == f"y: eigenvector 2 ($\\lambda_{{2}}$ = {l2:.4g})"
    finally:
        plotting.pyplot().close(fig)
    fig = plotting.figure([out], kind="line")
    try:
        quad = quadratic_line(fig.axes[0])
        a = np.asarray(quad.get_xdata())
        np.testing.assert_allclose(quad.get_ydata(), node.data["loss"][2, 1] + 0.5 * l1 * a ** 2, rtol=1e-15, atol=0)
    finally:
        plotting.pyplot().close(fig)


def test_no_quadratic_model_for_other_directions_or_a_line_without_its_centre(cli_files):
    from landscape_tools import plotting

    random_line, off_centre = cli_files["root"] / "rand.h5", cli_files["root"] / "off.h5"
    assert cli_surface(cli_files, "n.pt", "--dims", 1, "--x", "-1:1:5", "-o", random_line).exit_code == 0
    assert cli_surface(cli_files, "n.pt", "--directions", cli_files["h"], "--dims", 1, "--x", "0.5:1.5:4",
                       "-o", off_centre).exit_code == 0
    for path in (random_line, off_centre):
        fig = plotting.figure([path])
        try:
            assert quadratic_line(fig.axes[0]) is None and len(fig.axes[0].get_legend().get_texts()) == 2
        finally:
            plotting.pyplot().close(fig)


# ----------------------------------------------------------------------------- end to end: lt hessian --save-vectors
@pytest.mark.parametrize("vector_dtype", [None, "float64"])
def test_lt_hessian_save_vectors_then_lt_surface_line_has_the_eigenvalue_as_second_difference(cli_files,
                                                                                              vector_dtype):
    root = cli_files["root"]
    h = root / f"saved-{vector_dtype}.h5"
    extra = () if vector_dtype is None else ("--vector-dtype", vector_dtype)
    r = cli("hessian", root / "n.pt", "--model", "test_hessian_directions:double_net", "--data", cli_files["data"],
            "--batch-size", 7, "--scope", "dataset", "--top-k", 2, "--tol", "1e-10", "--save-vectors", *extra, "-o", h)
    assert r.exit_code == 0, r.output
    hnode = store.read_result(h).models["n"]
    vec = hnode.groups["eigenvectors"]
    assert vec.attrs["model_fingerprint"] == S.model_fingerprint(cli_files["model"])
    assert vec.data["fc1.weight"].dtype == np.dtype(vector_dtype or "float32")
    for i in (1, 2):
        out = root / f"e2e-{vector_dtype}-{i}.h5"
        r = cli_surface(cli_files, "n.pt", "--directions", f"{h}:0", "--eig", i, "--x", "-1e-3:1e-3:3", "-o", out)
        assert r.exit_code == 0, r.output
        node = store.read_result(out).models["n"]
        lam = hnode.data["eigenvalues"][0, i - 1]
        assert abs(second_difference(node.data["loss"]) - lam) <= 1e-4 * abs(lam), (i, lam)
        recipe = json.loads(node.groups["directions"].attrs["recipe"])
        assert recipe["eigenvalues"] == [lam] and recipe["vector_dtype"] == (vector_dtype or "float32")
        assert recipe["params"] is None and recipe["which"] == "LM" and recipe["scope"] == "dataset"
    r = cli_surface(cli_files, "other.pt", "--directions", f"{h}:0", "--dims", 1, "-o", root / "e2e-bad.h5")
    assert r.exit_code != 0 and f"--directions {h}:0: the eigenvectors were computed for other weights" in r.output
