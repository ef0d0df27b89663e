"""`lt import-gl` (loss-landscape's files in) and `lt export` (CSV, VTP, OBJ out).

GL-layout files are made here the way loss-landscape's plot_surface.py / scheduler.py fill them:
arrays of -1 shaped (nx, ny), each point written at flat index k of ``np.meshgrid(x, y)`` (y-major),
some points left at -1.  Direction files hold ``xdirection/<i>`` per entry of ``parameters()``
(or ``state_dict()``).  Result files of every kind come from the real commands on tiny zoo models.
"""
import copy
import csv
import json
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from landscape_tools import export, interop, plotting, store
from landscape_tools.cli.main import cli
from landscape_tools.models import build_model
from landscape_tools.surface import model_fingerprint
from tiny_files import random_tensors, tiny_checkpoint_and_data


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def error(*args):
    res = run(*args, ok=False)
    assert res.exit_code != 0
    return res.output.strip()


def gl_fill(x, y, value, holes=()):
    """GL's crunch(): -1 everywhere, then ``values.ravel()[k] = value(coords[k])`` for the flat indices k
    not in ``holes``, coords from np.meshgrid(x, y) (scheduler.get_unplotted_indices)."""
    shape = (len(x),) if y is None else (len(x), len(y))
    values = -np.ones(shape)
    if y is None:
        coords = [(float(a),) for a in x]
    else:
        xm, ym = np.meshgrid(x, y)
        coords = list(zip(xm.ravel().tolist(), ym.ravel().tolist()))
    for k, c in enumerate(coords):
        if k not in holes:
            values.ravel()[k] = value(*c)
    return values


def write_gl_surface(path, x, y, splits, dir_file="dirs.h5"):
    """``splits``: name -> (loss array, acc array) already in GL's layout."""
    with h5py.File(path, "w") as f:
        f["dir_file"] = dir_file
        f["xcoordinates"] = x
        if y is not None:
            f["ycoordinates"] = y
        for split, (loss, acc) in splits.items():
            f[f"{split}_loss"] = loss
            f[f"{split}_acc"] = acc
    return path


def write_gl_directions(path, xs, ys=None, extra=None):
    with h5py.File(path, "w") as f:
        for name, entries in (("xdirection", xs), ("ydirection", ys)):
            if entries is None:
                continue
            g = f.create_group(name)
            for i, e in enumerate(entries):
                g.create_dataset(str(i), data=e)
        for k, v in (extra or {}).items():
            f[k] = v
    return path


def loss_fn(a, b=0.0):
    return 1.0 + a * a + 3.0 * b * b + 0.25 * a - 0.5 * a * b


def acc_fn(a, b=0.0):
    return 100.0 * (0.5 + 0.1 * a + 0.05 * b)


# ----------------------------------------------------------------------------- the grid order
@pytest.mark.parametrize("nx,ny", [(3, 3), (3, 4), (5, 2)])
def test_gl_grid_puts_every_value_at_its_coordinates(nx, ny):
    x, y = np.linspace(-1, 1, nx), np.linspace(-2, 3, ny)
    stored = gl_fill(x, y, loss_fn)
    assert stored.shape == (nx, ny)                       # GL's shape, y-major flat order
    grid = interop.gl_grid(stored, nx, ny)
    expected = np.array([[loss_fn(a, b) for b in y] for a in x])
    np.testing.assert_array_equal(grid, expected)
    # a fork storing (ny, nx) has the same flat order
    np.testing.assert_array_equal(interop.gl_grid(stored.reshape(ny, nx), nx, ny), expected)
    # taking GL's array as it is would be wrong even on a square grid (it is the transpose there)
    assert not np.array_equal(stored.reshape(-1), expected.reshape(-1))
    if nx == ny:
        np.testing.assert_array_equal(stored.T, expected)
    # --order ij takes [i, j] as it is
    np.testing.assert_array_equal(interop.gl_grid(expected, nx, ny, "ij"), expected)


# ----------------------------------------------------------------------------- surfaces in
GRIDS = {"square": (np.linspace(-1, 1, 3), np.linspace(-1, 1, 3)),
         "non-square": (np.linspace(-1, 1, 3), np.linspace(-0.5, 1.0, 4)),
         "1-D": (np.linspace(-1, 1, 5), None)}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_import_gl_round_trips_values_on_the_right_axes(tmp_path, grid):
    x, y = GRIDS[grid]
    holes = {1, 4}
    loss, acc = gl_fill(x, y, loss_fn, holes), gl_fill(x, y, acc_fn, holes)
    k_acc = 2                                             # loss written, accuracy not yet: not done
    acc.ravel()[k_acc] = -1
    test_loss, test_acc = gl_fill(x, y, lambda *c: 2 * loss_fn(*c)), gl_fill(x, y, lambda *c: acc_fn(*c) / 2)
    src = write_gl_surface(tmp_path / "gl.h5", x, y, {"train": (loss, acc), "test": (test_loss, test_acc)})
    out = tmp_path / "ours.h5"
    res = run("import-gl", src, "-o", out, "--label", "resnet")
    assert "resnet-train: " in res.output and "resnet-test: " in res.output

    r = store.read_result(out)
    assert r.kind == "surface" and r.attrs["format_version"] == 1 and r.attrs["imported_from"] == str(src)
    assert r.attrs["imported_from_sha256"] and r.attrs["created"] and r.attrs["command"]
    assert list(r.models) == ["resnet-train", "resnet-test"]
    coords = [(a,) for a in x] if y is None else [(a, b) for a in x for b in y]
    shape = (len(x),) if y is None else (len(x), len(y))
    # the flat GL index of each of our points, to know where the holes went
    nx = len(x)
    gl_index = [i for i in range(nx)] if y is None else [j * nx + i for i in range(nx) for j in range(len(y))]
    for name, scale_l, scale_a, missing in (("resnet-train", 1, 1, holes | {k_acc}), ("resnet-test", 2, 0.5, set())):
        node = r.models[name]
        np.testing.assert_array_equal(node["x"], x)
        if y is None:
            assert "y" not in node.data
        else:
            np.testing.assert_array_equal(node["y"], y)
        done = np.array([k not in missing for k in gl_index]).reshape(shape)
        np.testing.assert_array_equal(node["done"], done)
        want_loss = np.array([scale_l * loss_fn(*c) for c in coords]).reshape(shape)
        want_acc = np.array([acc_fn(*c) * scale_a / 100.0 for c in coords]).reshape(shape)
        np.testing.assert_array_equal(node["loss"][done], want_loss[done])
        np.testing.assert_array_equal(node["accuracy"][done], want_acc[done])
        assert np.isnan(node["loss"][~done]).all() and np.isnan(node["accuracy"][~done]).all()
        assert node.attrs["split"] == name.split("-")[1] and node.attrs["source_file"] == str(src)
        assert "mean cross-entropy" in node.attrs["note"] and "percent" in node.attrs["note"]
        assert node.attrs["source_dir_file"] == "dirs.h5"

    # lt plot draws it like ours: the heatmap cells / the line are the file's loss
    fig = plotting.figure([out], models=["resnet-train"], kind="heatmap" if y is not None else None)
    node = r.models["resnet-train"]
    if y is None:
        line = fig.axes[0].get_lines()[0].get_xydata()
        np.testing.assert_array_equal(line[:, 0], x)
        np.testing.assert_array_equal(line[:, 1], node["loss"])
    else:
        mesh = fig.axes[0].collections[0]
        drawn = mesh.get_array()
        np.testing.assert_array_equal(np.ma.getmaskarray(drawn), ~node["done"])
        np.testing.assert_array_equal(np.ma.getdata(drawn)[node["done"]], node["loss"][node["done"]])
    plotting.pyplot().close(fig)
    run("plot", out, "-o", tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_import_gl_one_split_keeps_the_label_and_order_ij(tmp_path):
    x, y = GRIDS["non-square"]
    grid = np.array([[loss_fn(a, b) for b in y] for a in x])
    src = write_gl_surface(tmp_path / "fork.h5", x, y, {"train": (grid, np.full(grid.shape, 50.0))})
    run("import-gl", src, "--order", "ij", "-o", tmp_path / "a.h5")
    node, = store.read_result(tmp_path / "a.h5").models.values()
    np.testing.assert_array_equal(node["loss"], grid)
    assert list(store.read_result(tmp_path / "a.h5").models) == ["gl"]
    # GL's order on a (3, 4) array with values meant as [i, j] gives other numbers: the option matters
    run("import-gl", src, "-o", tmp_path / "b.h5")
    assert not np.array_equal(store.read_result(tmp_path / "b.h5").models["gl"]["loss"], grid)


# ----------------------------------------------------------------------------- directions in
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    model, ckpt, data = tiny_checkpoint_and_data(root)
    model.eval()
    # GL's checkpoints are bare state_dicts: {'state_dict': ..., 'epoch': ...}
    bare = root / "model_300.t7"
    torch.save({"state_dict": model.state_dict(), "epoch": 300}, bare)
    torch.manual_seed(7)
    other = build_model("resnet_dnn_18", width=4, num_classes=3, in_channels=1)
    torch.save({"state_dict": other.state_dict(), "epoch": 1}, root / "other.t7")
    arrays = np.load(root / "d.npz")
    gen = torch.Generator().manual_seed(3)
    dx = [0.05 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
    dy = [0.05 * torch.randn(p.shape, generator=gen) for p in model.parameters()]
    return {"root": root, "model": model, "ckpt": ckpt, "bare": bare, "data": data, "dx": dx, "dy": dy,
            "X": torch.from_numpy(arrays["x"]), "Y": torch.from_numpy(arrays["y"]).long()}


def by_hand(zoo, a, b):
    """GL's set_weights + eval_loss: w + (a dx + b dy), mean cross-entropy, accuracy in percent."""
    m = copy.deepcopy(zoo["model"]).eval()
    with torch.no_grad():
        for p, w, u, v in zip(m.parameters(), zoo["model"].parameters(), zoo["dx"], zoo["dy"]):
            p.copy_(w + (u * a + v * b))
        out = m(zoo["X"])
        correct = int((out.argmax(1) == zoo["Y"]).sum())
        return float(F.cross_entropy(out, zoo["Y"])), 100.0 * correct / len(zoo["Y"]), correct / len(zoo["Y"])


def test_gl_directions_let_lt_surface_extend_the_grid_exactly(zoo, tmp_path):
    root, model = zoo["root"], zoo["model"]
    x, y = np.linspace(-1, 1, 3), np.linspace(-1, 1, 4)
    holes = {0, 7}
    cache = {}

    def point(a, b):
        if (a, b) not in cache:
            cache[a, b] = by_hand(zoo, a, b)
        return cache[a, b]

    loss = gl_fill(x, y, lambda a, b: point(a, b)[0], holes)
    acc = gl_fill(x, y, lambda a, b: point(a, b)[1], holes)
    src = write_gl_surface(tmp_path / "surf.h5", x, y, {"train": (loss, acc)})
    dirs = write_gl_directions(tmp_path / "dirs.h5", [d.numpy() for d in zoo["dx"]], [d.numpy() for d in zoo["dy"]])
    out = tmp_path / "gl.h5"
    res = run("import-gl", src, "--directions", dirs, "--checkpoint", zoo["bare"], "--arch", "resnet_dnn_18", "-o", out)
    assert "directions keyed by parameter name" in res.output

    node, = store.read_result(out).models.values()
    d = node.groups["directions"]
    names = [n for n, _ in model.named_parameters()]
    assert d.attrs["model_fingerprint"] == model_fingerprint(model) and d.attrs["parameters"] == names
    assert json.loads(d.attrs["recipe"])["kind"] == "gl" and json.loads(d.attrs["recipe"])["dir_type"] == "weights"
    for name, u, v in zip(names, zoo["dx"], zoo["dy"]):
        np.testing.assert_array_equal(d["x"][name], u.numpy())
        np.testing.assert_array_equal(d["y"][name], v.numpy())
    assert node.attrs["checkpoint"] == str(zoo["bare"]) and node.attrs["arch"] == "resnet_dnn_18"

    # the same slice, extended: x on 5 points (every GL x among them), the same y
    ext = tmp_path / "ext.h5"
    run("surface", zoo["bare"], "--arch", "resnet_dnn_18", "--data", zoo["data"], "--directions", out,
        "--x", "-1:1:5", "--y", "-1:1:4", "-o", ext)
    e, = store.read_result(ext).models.values()
    assert e["done"].all()
    for i, a in enumerate(e["x"]):
        for j, b in enumerate(e["y"]):
            want_l, _, want_a = by_hand(zoo, float(a), float(b))
            np.testing.assert_allclose(e["loss"][i, j], want_l, rtol=2e-6)
            assert e["accuracy"][i, j] == want_a
    # at GL's own points, the new run reproduces GL's numbers
    gl_done = node["done"]
    np.testing.assert_allclose(e["loss"][::2][gl_done], node["loss"][gl_done], rtol=2e-6)
    # (GL's percent / 100 is the fraction to rounding: 33.33333333333333 / 100 is not float 1 / 3)
    np.testing.assert_allclose(e["accuracy"][::2][gl_done], node["accuracy"][gl_done], rtol=1e-15, atol=0)
    # and refuses another model
    msg = error("surface", root / "other.t7", "--arch", "resnet_dnn_18", "--data", zoo["data"], "--directions", out,
                "--x", "-1:1:3", "--y", "-1:1:4", "-o", tmp_path / "no.h5")
    assert "was made for other weights" in msg
    # 1-D: GL's xdirection only, used with --dims 1
    x1 = np.linspace(-1, 1, 3)
    src1 = write_gl_surface(tmp_path / "s1.h5", x1, None,
                            {"train": (gl_fill(x1, None, lambda a: by_hand(zoo, a, 0)[0]),
                                       gl_fill(x1, None, lambda a: by_hand(zoo, a, 0)[1]))})
    dirs1 = write_gl_directions(tmp_path / "d1.h5", [u.numpy() for u in zoo["dx"]])
    run("import-gl", src1, "--directions", dirs1, "--checkpoint", zoo["ckpt"], "-o", tmp_path / "gl1.h5")
    run("surface", zoo["ckpt"], "--data", zoo["data"], "--directions", tmp_path / "gl1.h5", "--dims", "1",
        "--x", "-1:1:3", "-o", tmp_path / "ext1.h5")
    e1, = store.read_result(tmp_path / "ext1.h5").models.values()
    g1, = store.read_result(tmp_path / "gl1.h5").models.values()
    np.testing.assert_allclose(e1["loss"], g1["loss"], rtol=2e-6)


def test_states_directions_with_zero_buffers_equal_weights_directions(zoo, tmp_path):
    model = zoo["model"]
    src = write_gl_surface(tmp_path / "s.h5", np.linspace(-1, 1, 2), np.linspace(-1, 1, 2),
                           {"train": (np.ones((2, 2)), np.full((2, 2), 40.0))})
    params = dict(model.named_parameters())
    by_name = dict(zip(params, zoo["dx"]))
    states = [(k, by_name[k].numpy() if k in params else np.zeros(tuple(v.shape), np.float32))
              for k, v in model.state_dict().items()]
    sx = write_gl_directions(tmp_path / "states.h5", [e for _, e in states], [e for _, e in states])
    run("import-gl", src, "--directions", sx, "--checkpoint", zoo["ckpt"], "-o", tmp_path / "st.h5")
    wx = write_gl_directions(tmp_path / "w.h5", [d.numpy() for d in zoo["dx"]], [d.numpy() for d in zoo["dx"]],
                             extra={"explained_variance_ratio_": np.array([0.625, 0.25])})     # as GL's PCA files
    run("import-gl", src, "--directions", wx, "--checkpoint", zoo["ckpt"], "-o", tmp_path / "w.h5.h5")
    st = store.read_result(tmp_path / "st.h5").models["m"].groups["directions"]
    w = store.read_result(tmp_path / "w.h5.h5").models["m"].groups["directions"]
    assert json.loads(st.attrs["recipe"])["dir_type"] == "states"
    np.testing.assert_array_equal(w["explained_variance_ratio"], [0.625, 0.25])
    assert list(st["x"].data) == list(w["x"].data)
    for name in w["x"].data:
        np.testing.assert_array_equal(st["x"][name], w["x"][name])
    # a states direction that moves a BatchNorm statistic is refused, naming the entry
    k = next(i for i, (name, _) in enumerate(states) if name.endswith("running_mean"))
    moved = [e.copy() for _, e in states]
    moved[k] = moved[k] + 1.0
    bad = write_gl_directions(tmp_path / "bad.h5", moved, moved)
    msg = error("import-gl", src, "--directions", bad, "--checkpoint", zoo["ckpt"], "-o", tmp_path / "no.h5")
    assert f"xdirection/{k} ({states[k][0]}) is a buffer with a non-zero direction" in msg
    assert "move trainable parameters only" in msg
    # a states file read as weights: the counts differ
    msg = error("import-gl", src, "--directions", sx, "--checkpoint", zoo["ckpt"], "--dir-type", "weights",
                "-o", tmp_path / "no.h5")
    assert f"has {len(states)} entries per direction, but the model has {len(params)} parameters" in msg
    assert not (tmp_path / "no.h5").exists()


def test_bad_gl_input_is_a_clear_error_and_writes_nothing(zoo, tmp_path):
    x = np.linspace(-1, 1, 3)
    good = write_gl_surface(tmp_path / "good.h5", x, x, {"train": (np.ones((3, 3)), np.full((3, 3), 10.0))})
    dx = [d.numpy() for d in zoo["dx"]]
    names = [n for n, _ in zoo["model"].named_parameters()]
    wrong_shape = list(dx)
    wrong_shape[3] = np.zeros((2, 2), np.float32)
    out = tmp_path / "out.h5"
    cases = [
        (["import-gl", write_gl_surface(tmp_path / "a.h5", x, x, {"train": (np.ones((3, 2)), np.ones((3, 2)))}),
          "-o", out], "train_loss has shape (3, 2) but the coordinates make a 3 x 3 grid"),
        (["import-gl", write_gl_surface(tmp_path / "b.h5", x, None, {"train": (np.array([1, -0.5, 1]), np.ones(3))}),
          "-o", out], "train_loss is -0.5 at x = 0; GL's losses are >= 0 and -1 marks a point not computed"),
        (["import-gl", write_gl_surface(tmp_path / "c.h5", x, None, {"train": (np.ones(3), np.array([1, 150, 1.]))}),
          "-o", out], "train_acc is 150 at x = 0; GL's accuracies are percentages 0..100"),
        (["import-gl", write_gl_directions(tmp_path / "d.h5", dx), "-o", out],
         "is a GL direction file (xdirection/...), not a surface file"),
        (["import-gl", good, "--directions", write_gl_directions(tmp_path / "e.h5", dx, dx), "-o", out],
         "--directions needs the model they were made for: --checkpoint CKPT"),
        (["import-gl", good, "--directions", write_gl_directions(tmp_path / "f.h5", wrong_shape, dx),
          "--checkpoint", zoo["ckpt"], "-o", out],
         f"xdirection/3 ({names[3]}) has shape (2, 2) but the model's {names[3]} is "
         f"{tuple(zoo['dx'][3].shape)}"),
        (["import-gl", good, "--directions", write_gl_directions(tmp_path / "g.h5", dx[:-1], dx[:-1]),
          "--checkpoint", zoo["ckpt"], "-o", out], f"has {len(dx) - 1} entries per direction, but the model has "
                                                   f"{len(dx)} parameters"),
        (["import-gl", good, "--directions", write_gl_directions(tmp_path / "h.h5", dx), "--checkpoint", zoo["ckpt"],
          "-o", out], "holds 1-D directions (x only) but the surface file is 2-D"),
        (["import-gl", good, "--split", "test", "-o", out], "holds no test_loss; it has train_loss"),
        (["import-gl", good, "-o", tmp_path / "out.txt"], "should end in .h5"),
        (["import-gl", good, "--label", "a/b", "-o", out], "--label 'a/b' cannot name a model group"),
    ]
    for args, message in cases:
        assert message in error(*args), args
    assert not out.exists()
    run("import-gl", good, "-o", out)
    assert error("import-gl", good, "-o", out) == f"Error: {out} already exists; pass --overwrite to replace it or choose another -o"
    assert "is already a landscape-tools result file (surface)" in error("import-gl", out, "-o", tmp_path / "x.h5")
    run("import-gl", good, "-o", out, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # lt plot on GL's own file says how to import it
    assert "looks like a loss-landscape (tomgoldstein) file: import it with `lt import-gl" in \
        error("plot", good, "-o", tmp_path / "f.png")


# ----------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def holey(tmp_path_factory):
    """An imported GL 4 x 5 surface with two points not computed and one NaN loss."""
    root = tmp_path_factory.mktemp("holey")
    x, y = np.linspace(-1, 1, 4), np.linspace(-2, 2, 5)
    loss, acc = gl_fill(x, y, loss_fn, holes={6, 13}), gl_fill(x, y, acc_fn, holes={6, 13})
    loss.ravel()[17] = np.nan                                  # computed, diverged
    src = write_gl_surface(root / "gl.h5", x, y, {"train": (loss, acc)})
    run("import-gl", src, "-o", root / "s.h5")
    return root / "s.h5"


def read_vtp(path):
    piece = ET.parse(path).getroot().find("PolyData/Piece")

    def array(parent, name, dtype=float):
        node = [a for a in piece.find(parent).findall("DataArray") if a.get("Name") == name][0]
        return np.array(node.text.split(), dtype=dtype)

    return piece, array


def expected_mesh(node, log=False, zmax=None):
    x, y, loss, acc, done = (np.asarray(node[k]) for k in ("x", "y", "loss", "accuracy", "done"))
    valid = done & np.isfinite(loss)
    ij = [(i, j) for i in range(len(x)) for j in range(len(y)) if valid[i, j]]
    z = np.minimum(loss, zmax) if zmax is not None else loss
    z = np.log10(z) if log else z
    cells = [(i, j) for i in range(len(x) - 1) for j in range(len(y) - 1)
             if valid[i, j] and valid[i + 1, j] and valid[i, j + 1] and valid[i + 1, j + 1]]
    return x, y, loss, acc, z, ij, cells


@pytest.mark.parametrize("log,zmax", [(False, None), (True, 3.0)])
def test_vtp_and_obj_hold_the_computed_points_and_their_cells(holey, tmp_path, log, zmax):
    node, = store.read_result(holey).models.values()
    x, y, loss, acc, z, ij, cells = expected_mesh(node, log, zmax)
    assert len(ij) == 20 - 3 and len(cells) < 12
    args = ["export", holey, "--vtp", tmp_path / "s.vtp", "--obj", tmp_path / "s.obj"]
    args += (["--log"] if log else []) + (["--zmax", zmax] if zmax is not None else [])
    res = run(*args)
    assert "17 of 20 points (2 not computed, 1 NaN / infinite: left out)" in res.output

    piece, array = read_vtp(tmp_path / "s.vtp")
    assert int(piece.get("NumberOfPoints")) == len(ij) and int(piece.get("NumberOfPolys")) == 2 * len(cells)
    points = array("Points", "Points").reshape(-1, 3)
    gi, gj = array("PointData", "grid_i", int), array("PointData", "grid_j", int)
    assert list(zip(gi, gj)) == ij
    np.testing.assert_array_equal(points[:, 0], x[gi])
    np.testing.assert_array_equal(points[:, 1], y[gj])
    np.testing.assert_array_equal(points[:, 2], z[gi, gj])
    np.testing.assert_array_equal(array("PointData", "loss"), loss[gi, gj])       # unclipped values
    np.testing.assert_array_equal(array("PointData", "accuracy"), acc[gi, gj])
    conn = array("Polys", "connectivity", int).reshape(-1, 3)
    np.testing.assert_array_equal(array("Polys", "offsets", int), 3 * np.arange(1, len(conn) + 1))
    # each pair of triangles covers one cell of four valid corners, and together they cover every such cell
    corners = sorted(tuple(sorted({ij[k] for k in conn[2 * c]} | {ij[k] for k in conn[2 * c + 1]}))
                     for c in range(len(cells)))
    assert corners == sorted(((i, j), (i, j + 1), (i + 1, j), (i + 1, j + 1)) for i, j in cells)

    lines = (tmp_path / "s.obj").read_text().splitlines()
    v = np.array([ln.split()[1:] for ln in lines if ln.startswith("v ")], dtype=float)
    f = np.array([ln.split()[1:] for ln in lines if ln.startswith("f ")], dtype=int)
    np.testing.assert_array_equal(v, points)
    np.testing.assert_array_equal(f - 1, conn)
    assert any(ln.startswith("# source: ") for ln in lines)
    # the provenance comment stays well-formed XML whatever the command line holds ("--" is not allowed in it)
    export.export_vtp(str(holey), str(tmp_path / "c.vtp"), log=log, zmax=zmax, command=["lt", "--vtp", "a---b-"])
    assert "lt - -vtp a- - -b" in (tmp_path / "c.vtp").read_text()
    assert int(read_vtp(tmp_path / "c.vtp")[0].get("NumberOfPoints")) == len(ij)


def test_mesh_exports_refuse_what_they_cannot_draw(holey, tmp_path):
    x = np.linspace(-1, 1, 3)
    src = write_gl_surface(tmp_path / "l.h5", x, None, {"train": (np.ones(3), np.ones(3))})
    run("import-gl", src, "-o", tmp_path / "line.h5")
    assert "is a 1-D surface (a curve): it has no faces for --vtp / --obj; export it with --csv" in \
        error("export", tmp_path / "line.h5", "--vtp", tmp_path / "a.vtp")
    assert "--zmax -1.0 must be a finite loss > 0 (with --log)" in \
        error("export", holey, "--obj", tmp_path / "a.obj", "--log", "--zmax", "-1")
    zero = write_gl_surface(tmp_path / "z.h5", x, x, {"train": (np.array([[1, 0, 1.]] * 3), np.ones((3, 3)))})
    run("import-gl", zero, "-o", tmp_path / "zero.h5")
    assert error("export", tmp_path / "zero.h5", "--obj", tmp_path / "a.obj", "--log") == \
        "Error: --log needs positive losses, but the loss at x = 0, y = -1 is 0: export without --log"  # GL flat index 1
    assert "not a finite number" in error("export", holey, "--vtp", tmp_path / "a.vtp", "--zmax", "nan")
    assert "nothing to export" in error("export", holey)
    assert "should end in .vtp" in error("export", holey, "--vtp", tmp_path / "a.txt")
    assert "--log shapes the height of --vtp / --obj meshes" in error("export", holey, "--csv", tmp_path / "a.csv",
                                                                      "--log")
    # several models: choose one
    two = write_gl_surface(tmp_path / "two.h5", x, x, {"train": (np.ones((3, 3)), np.ones((3, 3))),
                                                        "test": (np.ones((3, 3)), np.ones((3, 3)))})
    run("import-gl", two, "-o", tmp_path / "two-ours.h5")
    assert "holds 2 models (gl-train, gl-test); a VTP file draws one: choose it with --model LABEL" in \
        error("export", tmp_path / "two-ours.h5", "--vtp", tmp_path / "a.vtp")
    run("export", tmp_path / "two-ours.h5", "--vtp", tmp_path / "a.vtp", "--model", "gl-test")
    # existing outputs are refused, unchanged, and replaced only with --overwrite
    before = (tmp_path / "a.vtp").read_text()
    assert error("export", holey, "--vtp", tmp_path / "a.vtp") == \
        f"Error: {tmp_path / 'a.vtp'} already exists; pass --overwrite to replace it or choose another --vtp file"
    assert (tmp_path / "a.vtp").read_text() == before
    run("export", holey, "--vtp", tmp_path / "a.vtp", "--overwrite")
    assert (tmp_path / "a.vtp").read_text() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_interrupted_export_leaves_no_file(holey, tmp_path, monkeypatch):
    def broken(mesh, notes):
        yield "<?xml"
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "vtp_text", broken)
    with pytest.raises(KeyboardInterrupt):
        export.export_vtp(str(holey), str(tmp_path / "a.vtp"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CSV of every kind
@pytest.fixture(scope="module")
def results(zoo, tmp_path_factory, holey):
    """One file of every kind, made by the real commands on tiny models."""
    root = tmp_path_factory.mktemp("kinds")
    data = zoo["data"]
    run("surface", zoo["ckpt"], "--data", data, "--batch-size", 6, "--x", "-1:1:3", "--y", "-1:1:2", "-o",
        root / "surface.h5")
    run("hessian", zoo["ckpt"], "--data", data, "--batch-size", 6, "--batches", 2, "--top-k", 2, "--tol", "1e-3",
        "--device", "cpu", "-o", root / "hessian.h5")
    tensors = random_tensors(root / "mc.npz", 6, 8, (1, 12, 12))
    torch.manual_seed(1)
    m = build_model("resnet_mcdo_18", num_classes=3, in_channels=1, width=4)
    from landscape_tools.checkpoints import save_checkpoint
    save_checkpoint(root / "mc.pt", m, "resnet_mcdo_18", m.arch_kwargs, {"dataset": f"tensors:{tensors}"})
    run("featvar", root / "mc.pt", "--mc", 2, "--batch-size", 4, "--fourier", "-o", root / "featvar.h5")
    run("evaluate", root / "mc.pt", "--mc", "1,2", "--batch-size", 4, "-o", root / "evaluate.h5")
    return {"surface": root / "surface.h5", "hessian": root / "hessian.h5", "featvar": root / "featvar.h5",
            "evaluate": root / "evaluate.h5", "imported": holey}


def rebuild(path):
    """Every dataset and attribute back from the CSV alone: {(model, quantity): array | value}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(export.CSV_COLUMNS)
    arrays, attrs = {}, {}
    for r in rows:
        key = (r["model"], r["quantity"])
        if r["dtype"] in ("attr", "attr-json"):
            attrs[key] = r["value"] if r["dtype"] == "attr" else json.loads(r["value"])
            continue
        shape = tuple(int(n) for n in r["shape"].split(";")) if r["shape"] else ()
        if key not in arrays:
            arrays[key] = np.empty(shape, dtype=object if r["dtype"] == "str" else np.dtype(r["dtype"]))
        if r["index"] == "" and shape != ():
            continue                                              # the row of an empty dataset
        idx = tuple(int(n) for n in r["index"].split(";")) if r["index"] else ()
        text, dt = r["value"], r["dtype"]
        arrays[key][idx] = text if dt == "str" else (text == "True") if dt == "bool" else \
            int(text) if np.dtype(dt).kind in "iu" else float(text)
    return rows, arrays, attrs


def walk(node, prefix=""):
    for name, value in node.data.items():
        yield prefix + name, value, node.data_attrs.get(name, {})
    for name, child in node.groups.items():
        yield from walk(child, prefix + name + "/")


def group_attrs(node, prefix=""):
    yield prefix.rstrip("/"), node.attrs
    for name, child in node.groups.items():
        yield from group_attrs(child, prefix + name + "/")


def same(a, b):
    return json.loads(json.dumps(export._jsonable(a))) == b


@pytest.mark.parametrize("kind", ["surface", "hessian", "featvar", "evaluate", "imported"])
def test_csv_round_trips_every_dataset(results, tmp_path, kind):
    src = results[kind]
    out = tmp_path / f"{kind}.csv"
    run("export", src, "--csv", out, "--vectors")
    rows, arrays, attrs = rebuild(out)
    r = store.read_result(src)
    assert r.attrs["kind"] in ("surface", "hessian", "featvar", "evaluate")
    n = 0
    for label, node in r.models.items():
        for quantity, value, dattrs in walk(node):
            got = arrays.pop((label, quantity))
            value = np.asarray(value)
            assert got.shape == value.shape, quantity
            if value.dtype.kind in "OUS":
                assert got.tolist() == value.tolist(), quantity
            else:
                assert got.dtype == value.dtype, quantity
                np.testing.assert_array_equal(got, value, err_msg=quantity)      # exact, NaN where NaN
            for key, v in dattrs.items():
                assert same(v, attrs.pop((label, f"{quantity}@{key}"))), (quantity, key)
            n += 1
        for path, a in group_attrs(node):
            for key, v in a.items():
                assert same(v, attrs.pop((label, f"{path}@{key}"))), (path, key)
    assert n > 0 and arrays == {}                   # every dataset, and nothing else
    for key, v in r.attrs.items():
        assert same(v, attrs.pop(("", f"@{key}"))), key
    assert set(attrs) == {("", f"export:{k}") for k in ("exported_by", "created", "command", "source")}
    if kind in ("surface", "imported"):
        # surface values carry their coordinates
        node = next(iter(r.models.values()))
        label = next(iter(r.models))
        for row in rows:
            if row["model"] == label and row["quantity"] == "loss":
                i, j = map(int, row["index"].split(";"))
                assert float(row["x"]) == node["x"][i] and float(row["y"]) == node["y"][j]


def test_csv_leaves_out_the_direction_vectors_unless_asked(results, tmp_path):
    res = run("export", results["surface"], "--csv", tmp_path / "s.csv")
    _, arrays, attrs = rebuild(tmp_path / "s.csv")
    r = store.read_result(results["surface"])
    node = r.models["m"]
    n_values = sum(v.size for g in ("x", "y") for v in node.groups["directions"].groups[g].data.values())
    assert f"the direction vectors ({n_values} values) are left out, --vectors writes them" in res.output
    assert not [q for _, q in arrays if q.startswith(("directions/x/", "directions/y/"))]
    assert ("m", "loss") in arrays and ("m", "directions@model_fingerprint") in attrs
    assert "directions/x (" in attrs[("", "export:left_out")]
    # the CSV refuses to overwrite too
    assert "already exists; pass --overwrite" in error("export", results["surface"], "--csv", tmp_path / "s.csv")
