"""Result files out to other programs: CSV (every result kind), VTK PolyData ``.vtp`` (ParaView) and
Wavefront ``.obj`` (3-D printing, renderers) of surfaces.

Every output is written to a temporary file in the same folder and renamed when complete, and an
existing file is refused unless ``overwrite`` -- the rules of :mod:`landscape_tools.store`.

**CSV** (:func:`export_csv`): long format, one value per row, columns :data:`CSV_COLUMNS`:

* ``model``: the model group (empty for the file's own attributes);
* ``quantity``: the dataset's path in the group (``loss``, ``eigenvalues``, ``reliability/counts``,
  ``directions/point_coords``), or ``PATH@NAME`` for an attribute (``@checkpoint`` of the group,
  ``directions@recipe``, ``nll@description``);
* ``index``: the element's index in the dataset, ``;``-separated (``3;4``; empty for a scalar) -- the
  row of a per-batch or per-N array;
* ``x``, ``y``: the grid coordinates of surface values (``loss``, ``accuracy``, ``done``), else empty;
* ``value``: floats with ``repr`` (the shortest text that reads back to the same float: exact
  round trip; ``nan``, ``inf``), integers, ``True``/``False``, text as it is; attributes as text
  (dtype ``attr``) or JSON (``attr-json``);
* ``dtype`` (numpy name, ``str`` for text) and ``shape`` (``;``-separated, empty for a scalar), so the
  file alone rebuilds every dataset exactly.  An empty dataset has one row with empty index and value.

The direction vectors of surfaces (``directions/x|y|target/<parameter>``, one value per weight of the
model) are left out unless ``vectors=True``; the CSV says how many were left out in an
``export:left_out`` row.

**VTP / OBJ** (:func:`surface_mesh`): the points of a 2-D surface that are computed and finite, at
``(x, y, z)`` with ``z`` the loss (``zmax``: clipped at that loss; ``log``: ``log10`` of the clipped
loss), and two triangles for every grid cell whose four corners are such points.  Points not computed
(or non-finite) are left out with every triangle that touches them: nothing is interpolated.  The
VTP file is ASCII VTK XML PolyData with the point data ``loss`` and ``accuracy`` (the values of the
file, unclipped) and ``grid_i`` / ``grid_j`` (each point's grid index).
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import store
from .errors import ConfigError, StoreError

__all__ = ["CSV_COLUMNS", "VECTOR_GROUPS", "csv_rows", "export_csv", "Mesh", "surface_mesh", "export_vtp",
           "export_obj", "check_output", "pick_model"]

CSV_COLUMNS = ("model", "quantity", "index", "x", "y", "value", "dtype", "shape")
#: groups of per-parameter vectors (as many values as the model has weights), left out of CSVs by default
VECTOR_GROUPS = ("directions/x", "directions/y", "directions/target")
_SUFFIXES = {"csv": ".csv", "vtp": ".vtp", "obj": ".obj"}
_SURFACE_GRID = ("loss", "accuracy", "done")


# ----------------------------------------------------------------------------- atomic text files
def check_output(path: str | os.PathLike, what: str, overwrite: bool = False) -> Path:
    """Refuse an output before any work: wrong extension, existing file (without ``overwrite``), no folder.

    Raises:
        StoreError: as above, with the fix.
    """
    p = Path(path)
    suffix = _SUFFIXES[what]
    if p.suffix.lower() != suffix:
        raise StoreError(f"--{what} {p} should end in {suffix}")
    if p.is_dir():
        raise StoreError(f"--{what} {p} is a folder; give a file name ending in {suffix}")
    if p.exists() and not overwrite:
        raise StoreError(f"{p} already exists; pass --overwrite to replace it or choose another --{what} file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise StoreError(f"folder {parent} for the output {p.name} does not exist; create it first")
    return p


def _write_atomically(path: Path, write: Callable[[io.TextIOBase], Any], overwrite: bool, newline: str | None = None):
    """``write(file)`` into a temporary file beside ``path``, then rename; nothing is left on failure."""
    tmp = store._tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            result = write(f)
        if path.exists() and not overwrite:        # appeared while we were writing
            raise StoreError(f"{path} was created by someone else meanwhile; pass --overwrite to replace it")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise store._disk_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _export_notes(source: str, command: Sequence[str] | None) -> dict[str, str]:
    from . import __version__
    return {"exported_by": f"landscape-tools {__version__}",
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "command": " ".join(command if command is not None else sys.argv),
            "source": str(source)}


def pick_model(result: store.Result, label: str | None, what: str) -> tuple[str, Any]:
    """The model group to export (``label``, or the only one).

    Raises:
        ConfigError: an unknown label, or several models and none chosen.
    """
    labels = list(result.models)
    if label is not None:
        if label not in result.models:
            raise ConfigError(f"--model {label!r} is not in {result.path}; it holds {', '.join(labels) or 'no models'}")
        return label, result.models[label]
    if len(labels) != 1:
        raise ConfigError(f"{result.path} holds {len(labels)} models ({', '.join(labels)}); a {what} file draws one: "
                          f"choose it with --model LABEL")
    return labels[0], result.models[labels[0]]


# ----------------------------------------------------------------------------- CSV
def _dtype_name(arr: np.ndarray) -> str:
    return "str" if arr.dtype.kind in "OUS" else arr.dtype.name


def _text(v: Any, kind: str) -> str:
    if kind == "f":
        return repr(float(v))
    if kind in "iu":
        return str(int(v))
    if kind == "b":
        return "True" if bool(v) else "False"
    if kind == "c":
        return repr(complex(v))
    if isinstance(v, bytes):
        return v.decode()
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    return v


def _attr_rows(label: str, quantity: str, attrs: dict) -> Iterator[list[str]]:
    for key, value in attrs.items():
        if isinstance(value, str):
            yield [label, f"{quantity}@{key}", "", "", "", value, "attr", ""]
        else:
            yield [label, f"{quantity}@{key}", "", "", "", json.dumps(_jsonable(value)), "attr-json", ""]


def _array_rows(label: str, quantity: str, arr: np.ndarray, coords=None) -> Iterator[list[str]]:
    arr = np.asarray(arr)
    dtype, kind = _dtype_name(arr), arr.dtype.kind
    shape = ";".join(str(n) for n in arr.shape)
    if arr.size == 0:
        yield [label, quantity, "", "", "", "", dtype, shape]
        return
    if arr.ndim == 0:
        yield [label, quantity, "", "", "", _text(arr.item(), kind), dtype, shape]
        return
    x, y = coords if coords is not None else (None, None)
    for idx in np.ndindex(arr.shape):
        cx = repr(float(x[idx[0]])) if x is not None else ""
        cy = repr(float(y[idx[1]])) if y is not None and len(idx) > 1 else ""
        yield [label, quantity, ";".join(map(str, idx)), cx, cy, _text(arr[idx], kind), dtype, shape]


def _node_rows(label: str, node, prefix: str, vectors: bool, grid, skipped: list) -> Iterator[list[str]]:
    yield from _attr_rows(label, prefix.rstrip("/"), node.attrs)
    for name, arr in node.data.items():
        quantity = prefix + name
        yield from _attr_rows(label, quantity, node.data_attrs.get(name, {}))
        coords = None
        if grid is not None and prefix == "" and name in _SURFACE_GRID and np.shape(arr) == grid[0]:
            coords = grid[1]
        yield from _array_rows(label, quantity, arr, coords)
    for name, child in node.groups.items():
        path = prefix + name
        if not vectors and path in VECTOR_GROUPS:
            skipped.append((label, path, sum(int(np.size(v)) for v in child.data.values()), len(child.data)))
            yield from _attr_rows(label, path, child.attrs)
            continue
        yield from _node_rows(label, child, path + "/", vectors, grid, skipped)


def csv_rows(result: store.Result, models: Sequence[str] | None = None, vectors: bool = False,
             skipped: list | None = None) -> Iterator[list[str]]:
    """The CSV rows (without the header) of a result: the file's attributes, then each model's.

    Args:
        result: a read result file.
        models: only these labels (default: all).
        vectors: include the per-parameter direction vectors of surfaces (:data:`VECTOR_GROUPS`).
        skipped: a list that receives ``(model, group, values, datasets)`` for each vector group left out.
    """
    skipped = [] if skipped is None else skipped
    yield from _attr_rows("", "", result.attrs)
    for label, node in result.models.items():
        if models is not None and label not in models:
            continue
        grid = None
        if result.kind == "surface" and "x" in node.data:
            x = np.asarray(node.data["x"])
            y = np.asarray(node.data["y"]) if "y" in node.data else None
            grid = ((len(x),) if y is None else (len(x), len(y)), (x, y))
        yield from _node_rows(label, node, "", vectors, grid, skipped)


@dataclass
class CSVExport:
    path: Path
    rows: int
    skipped: list


def export_csv(source: str, output: str, models: Sequence[str] | None = None, vectors: bool = False,
               overwrite: bool = False, command: Sequence[str] | None = None) -> CSVExport:
    """Write every dataset (and attribute) of a result file as long-format CSV; see the module docstring.

    Raises:
        StoreError: unreadable source, existing output (without ``overwrite``), disk full.
        ConfigError: an unknown model label.
    """
    out = check_output(output, "csv", overwrite)
    result = store.read_result(source)
    if models is not None:
        unknown = [m for m in models if m not in result.models]
        if unknown:
            raise ConfigError(f"--model {', '.join(unknown)} not in {source}; it holds {', '.join(result.models)}")
    skipped: list = []

    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        n = 0
        for row in csv_rows(result, models, vectors, skipped):
            w.writerow(row)
            n += 1
        notes = _export_notes(source, command)
        if skipped:
            notes["left_out"] = "; ".join(f"{m}: {g} ({k} parameter vectors, {v} values; --vectors writes them)"
                                          for m, g, v, k in skipped)
        for key, value in notes.items():
            w.writerow(["", f"export:{key}", "", "", "", value, "attr", ""])
        return n

    rows = _write_atomically(out, write, overwrite, newline="")
    return CSVExport(out, rows, skipped)


# ----------------------------------------------------------------------------- meshes
@dataclass
class Mesh:
    """The computed part of a 2-D surface as points and triangles.

    Attributes:
        label: the model.
        ij: (n, 2) grid index ``(i, j)`` of each point (row-major over the grid).
        points: (n, 3) ``x[i], y[j], z``.
        loss, accuracy: (n,) the file's values at the points (unclipped).
        triangles: (t, 3) point indices; two per grid cell with four valid corners.
        grid_shape: ``(nx, ny)``.
        not_done: grid points not computed (left out); non_finite: computed but NaN / inf (left out).
        z: what the height is, in words.
    """

    label: str
    ij: np.ndarray
    points: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    triangles: np.ndarray
    grid_shape: tuple[int, int]
    not_done: int
    non_finite: int
    z: str


def surface_mesh(node, label: str = "", log: bool = False, zmax: float | None = None) -> Mesh:
    """Points and triangles of a 2-D surface result's model group (see the module docstring).

    Args:
        node: the model group (:class:`store.Node`) of a surface result.
        log: height ``log10(loss)`` (of the clipped loss); every exported loss must be > 0.
        zmax: clip the loss at this value before the height is taken (the point data keep the values).

    Raises:
        ConfigError: a 1-D surface, no computed point, ``zmax`` not finite (or <= 0 with ``log``), ``log``
            with a loss <= 0.
    """
    if "y" not in node.data:
        raise ConfigError(f"{label or 'the model'} is a 1-D surface (a curve): it has no faces for --vtp / --obj; "
                          f"export it with --csv")
    x, y = np.asarray(node.data["x"], np.float64), np.asarray(node.data["y"], np.float64)
    loss = np.asarray(node.data["loss"], np.float64)
    acc = np.asarray(node.data["accuracy"], np.float64)
    done = np.asarray(node.data.get("done", np.ones(loss.shape, bool))).astype(bool)
    if loss.shape != (len(x), len(y)):
        raise ConfigError(f"{label}: loss has shape {loss.shape} but x, y make a {len(x)} x {len(y)} grid: damaged file")
    valid = done & np.isfinite(loss) & np.isfinite(acc)
    not_done, non_finite = int((~done).sum()), int((done & ~valid).sum())
    if not valid.any():
        raise ConfigError(f"{label}: no point of the surface is computed (and finite): nothing to export")
    if zmax is not None:
        zmax = float(zmax)
        if not np.isfinite(zmax) or (log and zmax <= 0):
            raise ConfigError(f"--zmax {zmax!r} must be a finite loss{' > 0 (with --log)' if log else ''}, e.g. --zmax 10")
    height = np.minimum(loss, zmax) if zmax is not None else loss.copy()
    what = "loss" if zmax is None else f"min(loss, {zmax!r})"
    if log:
        lo = float(height[valid].min())
        if lo <= 0:
            idx = np.unravel_index(int(np.argmin(np.where(valid, height, np.inf))), loss.shape)
            raise ConfigError(f"--log needs positive losses, but the loss at x = {x[idx[0]]:.6g}, y = {y[idx[1]]:.6g} "
                              f"is {lo:.6g}: export without --log")
        with np.errstate(divide="ignore", invalid="ignore"):
            height = np.log10(height)
        what = f"log10({what})"
    ii, jj = np.nonzero(valid)                          # row-major: the point order
    index = np.full(loss.shape, -1, dtype=np.int64)
    index[ii, jj] = np.arange(len(ii))
    cell = valid[:-1, :-1] & valid[1:, :-1] & valid[1:, 1:] & valid[:-1, 1:]
    ci, cj = np.nonzero(cell)
    a, b, c, d = index[ci, cj], index[ci + 1, cj], index[ci + 1, cj + 1], index[ci, cj + 1]
    triangles = np.stack([np.stack([a, b, c], 1), np.stack([a, c, d], 1)], 1).reshape(-1, 3)
    points = np.stack([x[ii], y[jj], height[ii, jj]], 1)
    return Mesh(label, np.stack([ii, jj], 1), points, loss[ii, jj], acc[ii, jj], triangles, loss.shape,
                not_done, non_finite, what)


def _numbers(values: Iterable, per_line: int = 6, indent: str = "          ") -> Iterator[str]:
    line = []
    for v in values:
        line.append(v)
        if len(line) == per_line:
            yield indent + " ".join(line) + "\n"
            line = []
    if line:
        yield indent + " ".join(line) + "\n"


def _comment(text: str) -> str:
    text = text.replace("--", "- -")
    while "--" in text:
        text = text.replace("--", "- -")
    return text.rstrip("-")


def vtp_text(mesh: Mesh, notes: dict[str, str]) -> Iterator[str]:
    """The VTK XML PolyData (ASCII) of a mesh, in pieces."""
    f = lambda v: repr(float(v))  # noqa: E731
    yield '<?xml version="1.0"?>\n'
    info = "; ".join(f"{k}: {v}" for k, v in notes.items())
    yield f"<!-- landscape-tools surface {_comment(mesh.label)}: z = {mesh.z}; {_comment(info)} -->\n"
    yield '<VTKFile type="PolyData" version="0.1" byte_order="LittleEndian">\n  <PolyData>\n'
    yield (f'    <Piece NumberOfPoints="{len(mesh.points)}" NumberOfVerts="0" NumberOfLines="0" NumberOfStrips="0" '
           f'NumberOfPolys="{len(mesh.triangles)}">\n')
    yield '      <PointData Scalars="loss">\n'
    for name, values in (("loss", mesh.loss), ("accuracy", mesh.accuracy)):
        yield f'        <DataArray type="Float64" Name="{name}" NumberOfComponents="1" format="ascii">\n'
        yield from _numbers(f(v) for v in values)
        yield "        </DataArray>\n"
    for k, name in enumerate(("grid_i", "grid_j")):
        yield f'        <DataArray type="Int64" Name="{name}" NumberOfComponents="1" format="ascii">\n'
        yield from _numbers(str(int(v)) for v in mesh.ij[:, k])
        yield "        </DataArray>\n"
    yield "      </PointData>\n      <Points>\n"
    yield '        <DataArray type="Float64" Name="Points" NumberOfComponents="3" format="ascii">\n'
    yield from _numbers((f(v) for v in mesh.points.reshape(-1)), per_line=6)
    yield "        </DataArray>\n      </Points>\n      <Polys>\n"
    yield '        <DataArray type="Int64" Name="connectivity" format="ascii">\n'
    yield from _numbers(str(int(v)) for v in mesh.triangles.reshape(-1))
    yield "        </DataArray>\n"
    yield '        <DataArray type="Int64" Name="offsets" format="ascii">\n'
    yield from _numbers(str(3 * (k + 1)) for k in range(len(mesh.triangles)))
    yield "        </DataArray>\n      </Polys>\n    </Piece>\n  </PolyData>\n</VTKFile>\n"


def obj_text(mesh: Mesh, notes: dict[str, str]) -> Iterator[str]:
    """The Wavefront OBJ of a mesh: ``v x y z`` per point, ``f a b c`` (1-based) per triangle."""
    yield f"# landscape-tools surface {mesh.label}: vertices (x, y, z = {mesh.z}), triangles over the grid cells\n"
    yield "# whose four corners are computed; points not computed are left out, not interpolated\n"
    for k, v in notes.items():
        yield f"# {k}: {' '.join(str(v).split())}\n"
    name = "_".join(mesh.label.split()) or "surface"
    yield f"o {name}\n"
    for x, y, z in mesh.points:
        yield f"v {float(x)!r} {float(y)!r} {float(z)!r}\n"
    for a, b, c in mesh.triangles:
        yield f"f {a + 1} {b + 1} {c + 1}\n"


def _export_mesh(kind: str, source: str, output: str, model: str | None, log: bool, zmax: float | None,
                 overwrite: bool, command) -> Mesh:
    out = check_output(output, kind, overwrite)
    result = store.read_result(source)
    if result.kind != "surface":
        raise ConfigError(f"{source} is a {result.kind} result; --{kind} draws surfaces (lt surface, lt import-gl). "
                          f"Export it with --csv")
    label, node = pick_model(result, model, kind.upper())
    mesh = surface_mesh(node, label, log, zmax)
    notes = _export_notes(source, command)
    text = vtp_text if kind == "vtp" else obj_text

    def write(f):
        for chunk in text(mesh, notes):
            f.write(chunk)

    _write_atomically(out, write, overwrite)
    return mesh


def export_vtp(source: str, output: str, model: str | None = None, log: bool = False, zmax: float | None = None,
               overwrite: bool = False, command: Sequence[str] | None = None) -> Mesh:
    """A surface as VTK XML PolyData (ParaView); returns the :class:`Mesh` written.

    Raises:
        ConfigError: not a surface, a 1-D one, several models and no ``model``, see :func:`surface_mesh`.
        StoreError: unreadable source, existing output, disk full.
    """
    return _export_mesh("vtp", source, output, model, log, zmax, overwrite, command)


def export_obj(source: str, output: str, model: str | None = None, log: bool = False, zmax: float | None = None,
               overwrite: bool = False, command: Sequence[str] | None = None) -> Mesh:
    """A surface as a Wavefront OBJ mesh; returns the :class:`Mesh` written (see :func:`export_vtp`)."""
    return _export_mesh("obj", source, output, model, log, zmax, overwrite, command)
