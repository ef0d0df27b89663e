"""Files of the reference loss-landscape code (tomgoldstein/loss-landscape, "GL") into schema v1.

GL's **surface file** (written by its ``plot_surface.py``) holds

* ``xcoordinates`` (nx,) and, for a plane, ``ycoordinates`` (ny,): ``np.linspace`` grids;
* ``train_loss`` / ``train_acc`` (and ``test_loss`` / ``test_acc`` where a run computed them), created
  as ``-np.ones(shape)`` with ``shape = (nx,)`` or ``(nx, ny)``: **-1 marks a point not computed yet**;
* ``dir_file``: the path of its direction file.

Each point is written as ``values.ravel()[k] = value`` where the coordinates of the flat index ``k``
come from ``np.meshgrid(x, y)`` (``'xy'`` indexing, x running fastest): ``k = j * nx + i`` is the point
``(x[i], y[j])``.  The flat order is therefore **y-major**, while the array is shaped ``(nx, ny)``.  GL's
own readers (``plot_2D``, ``h52vtp``) pair the stored array with the same meshgrid, which lines up only
when ``nx == ny`` -- non-square GL files hold the right numbers in a shape that scrambles them.
Un-scrambled, in our ``(nx, ny)`` order (``loss[i, j]`` at ``x[i], y[j]``)::

    loss[i, j] = stored.ravel()[j * nx + i]        i.e.  loss = stored.reshape(ny, nx).T

so a square GL grid is transposed, not taken as it is (:func:`gl_grid`).  ``train_acc`` is in percent
(``100 * correct / total``); ``train_loss`` is GL's ``eval_loss``: the criterion averaged over the
samples of the split with the network in eval mode (BatchNorm running statistics, dropout off), by
default ``nn.CrossEntropyLoss`` -- the mean NLL ``lt surface`` measures.  A run with GL's
``--loss_name mse`` holds the mean squared error of the softmax instead; nothing in the file says which,
so the import records the cross-entropy assumption in its ``note``.

GL's **direction file** holds ``xdirection/0 .. xdirection/n-1`` (and ``ydirection/...`` for a plane),
one dataset per entry of ``net.parameters()`` (``--dir_type weights``, GL's default) or of
``net.state_dict()`` (``--dir_type states``).  A point is ``w + a * dx + b * dy`` (GL's
``set_weights``), the same as ours, so the entries become our ``directions/x|y`` keyed by parameter
name (:func:`gl_directions`).  Our surfaces move parameters only: a ``states`` file is accepted when
its entries for buffers (BatchNorm running statistics, ``num_batches_tracked``) and frozen
parameters are all zero (GL's ``--xignore biasbn`` zeroes them), and refused otherwise.

Library use::

    from landscape_tools.interop import import_gl
    import_gl("surf.h5", "ours.h5", directions="dirs.h5", model=model, info=info)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import store
from .errors import ConfigError

__all__ = ["GL_SPLITS", "ORDERS", "DIR_TYPES", "GLSurface", "gl_grid", "read_gl_surface", "gl_directions",
           "import_gl", "LOSS_ASSUMPTION"]

#: the splits GL can hold, as ``<split>_loss`` / ``<split>_acc``
GL_SPLITS = ("train", "test")
#: ``gl``: GL's y-major flat order (every GL file); ``ij``: already ``values[i, j]`` at ``(x[i], y[j])``
ORDERS = ("gl", "ij")
DIR_TYPES = ("auto", "weights", "states")
UNFINISHED = -1.0
LOSS_ASSUMPTION = ("the loss is taken to be GL's default criterion, the mean cross-entropy (NLL of the "
                   "softmax) over the samples of the split with the network in eval mode, as lt surface "
                   "measures it; a GL run with --loss_name mse holds mean squared errors instead")
GL_URL = "https://github.com/tomgoldstein/loss-landscape"


@dataclass
class GLSurface:
    """A GL surface file read back in our order.

    Attributes:
        path: the file.
        x, y: grid coordinates (``y`` None for a 1-D file).
        splits: split -> ``{"loss", "accuracy", "done"}`` arrays shaped ``(nx,)`` or ``(nx, ny)``;
            loss / accuracy NaN where not done; accuracy a fraction.
        dir_file: GL's ``dir_file`` entry (the direction file it used), or None.
        order: how the arrays were un-scrambled (``gl`` or ``ij``).
        sha256: of the file.
    """

    path: str
    x: np.ndarray
    y: np.ndarray | None
    splits: dict[str, dict[str, np.ndarray]]
    dir_file: str | None = None
    order: str = "gl"
    sha256: str = ""
    keys: list[str] = field(default_factory=list)

    @property
    def dims(self) -> int:
        return 1 if self.y is None else 2


# ----------------------------------------------------------------------------- surfaces
def gl_grid(values: np.ndarray, nx: int, ny: int | None, order: str = "gl", name: str = "values") -> np.ndarray:
    """GL's stored array -> our ``(nx[, ny])`` grid (``out[i, j]`` at ``x[i], y[j]``).

    Args:
        values: the stored array.
        nx, ny: grid sizes (``ny`` None: 1-D).
        order: ``gl``: the flat order is y-major (``values.ravel()[j * nx + i]`` is the point
            ``(x[i], y[j])``), whatever the stored shape (GL stores ``(nx, ny)``; a ``(ny, nx)`` array
            of a fork that fixed the shape has the same flat order); ``ij``: ``values[i, j]`` is
            already at ``(x[i], y[j])`` (shape ``(nx, ny)``).

    Raises:
        ConfigError: an unknown order, or a shape that does not fit the coordinates.
    """
    if order not in ORDERS:
        raise ConfigError(f"--order {order!r} is not one of {', '.join(ORDERS)}")
    values = np.asarray(values)
    if ny is None:
        if values.shape != (nx,):
            raise ConfigError(f"{name} has shape {values.shape} but xcoordinates has {nx} values: expected ({nx},); "
                              f"the file is damaged or not a GL surface file")
        return values.copy()
    if order == "ij":
        if values.shape != (nx, ny):
            raise ConfigError(f"{name} has shape {values.shape}; --order ij expects (len(x), len(y)) = ({nx}, {ny}): "
                              f"use --order gl for GL's own files")
        return values.copy()
    if values.shape not in ((nx, ny), (ny, nx)):
        raise ConfigError(f"{name} has shape {values.shape} but the coordinates make a {nx} x {ny} grid: expected "
                          f"({nx}, {ny}) as GL writes it; the file is damaged or not a GL surface file")
    return values.reshape(-1).reshape(ny, nx).T.copy()


def _coords_text(x: np.ndarray, y: np.ndarray | None, idx: tuple[int, ...]) -> str:
    if y is None:
        return f"x = {x[idx[0]]:.6g}"
    return f"x = {x[idx[0]]:.6g}, y = {y[idx[1]]:.6g}"


def _axis(data: dict, key: str, path: str) -> np.ndarray:
    arr = np.asarray(data[key])
    if arr.ndim != 1 or arr.size < 1 or arr.dtype.kind not in "fiu" or not np.all(np.isfinite(arr)):
        raise ConfigError(f"{path}: {key} should be a 1-D array of finite coordinates (GL's np.linspace grid), "
                          f"found shape {arr.shape}, dtype {arr.dtype}; the file is damaged or not a GL surface file")
    return arr.astype(np.float64)


def read_gl_surface(path: str, order: str = "gl") -> GLSurface:
    """Read a GL surface file (see the module docstring for its layout).

    ``done`` is where neither the loss nor the accuracy holds GL's -1 marker (GL writes the two arrays
    one after the other, so a point whose accuracy was not yet written is not done).  Losses that are
    NaN or infinite are kept as computed (done), as ``lt surface`` keeps them.

    Raises:
        ConfigError: not a GL surface file, shapes that do not fit the coordinates, a loss below 0 other
            than the -1 marker, an accuracy outside 0..100 percent, a loss without its accuracy.
        StoreError: missing or unreadable file; one of our own result files.
    """
    from .checkpoints import file_sha256

    data, attrs = store.read_foreign(path)
    if attrs.get("format") == store.FORMAT:
        raise ConfigError(f"{path} is already a landscape-tools result file ({attrs.get('kind')}): nothing to import; "
                          f"use it as it is")
    if "xcoordinates" not in data:
        have = ", ".join(sorted(data)[:8]) or "no datasets"
        if "xdirection/0" in data:
            raise ConfigError(f"{path} is a GL direction file (xdirection/...), not a surface file: give the surface "
                              f"file as SURFACE.h5 and this one as --directions")
        raise ConfigError(f"{path} has no 'xcoordinates' dataset ({have}): not a loss-landscape (GL) surface file")
    x = _axis(data, "xcoordinates", path)
    y = _axis(data, "ycoordinates", path) if "ycoordinates" in data else None
    nx, ny = len(x), None if y is None else len(y)
    splits: dict[str, dict[str, np.ndarray]] = {}
    for split in GL_SPLITS:
        lk, ak = f"{split}_loss", f"{split}_acc"
        if lk not in data and ak not in data:
            continue
        if lk not in data or ak not in data:
            missing, present = (lk, ak) if lk not in data else (ak, lk)
            raise ConfigError(f"{path} has {present} but no {missing}: GL writes both; the file is incomplete")
        loss = gl_grid(data[lk], nx, ny, order, lk).astype(np.float64)
        acc = gl_grid(data[ak], nx, ny, order, ak).astype(np.float64)
        done = (loss != UNFINISHED) & (acc != UNFINISHED)
        bad = done & (loss < 0)
        if bad.any():
            idx = tuple(int(v[0]) for v in np.nonzero(bad))
            raise ConfigError(f"{path}: {lk} is {loss[idx]:.6g} at {_coords_text(x, y, idx)}; GL's losses are >= 0 and "
                              f"-1 marks a point not computed: the file was edited or is not a GL surface file")
        bad = done & ~((acc >= 0) & (acc <= 100))
        if bad.any():
            idx = tuple(int(v[0]) for v in np.nonzero(bad))
            raise ConfigError(f"{path}: {ak} is {acc[idx]:.6g} at {_coords_text(x, y, idx)}; GL's accuracies are "
                              f"percentages 0..100 (-1: not computed): the file was edited or is not a GL surface file")
        splits[split] = {"loss": np.where(done, loss, np.nan), "accuracy": np.where(done, acc / 100.0, np.nan),
                         "done": done}
    if not splits:
        raise ConfigError(f"{path} holds coordinates but no train_loss / test_loss: GL has not computed any "
                          f"point of it yet; nothing to import")
    dir_file = data.get("dir_file")
    dir_file = None if dir_file is None else str(dir_file.item() if isinstance(dir_file, np.ndarray) else dir_file)
    return GLSurface(str(path), x, y, splits, dir_file, order, file_sha256(path), sorted(data))


# ----------------------------------------------------------------------------- directions
def _entries(data: dict, axis: str, path: str) -> list[np.ndarray]:
    prefix = f"{axis}direction/"
    names = [k[len(prefix):] for k in data if k.startswith(prefix)]
    if not names:
        return []
    if sorted(names, key=lambda s: (len(s), s)) != [str(i) for i in range(len(names))]:
        odd = [n for n in names if not n.isdigit()][:3] or sorted(names)[:3]
        raise ConfigError(f"{path}: {axis}direction should hold datasets 0..{len(names) - 1} (one per parameter, "
                          f"as GL writes them), found {', '.join(odd)}...; the file is damaged or not a GL direction file")
    return [np.asarray(data[prefix + str(i)]) for i in range(len(names))]


def gl_directions(path: str, model, dims: int, dir_type: str = "auto"):
    """GL's direction file -> :class:`landscape_tools.surface.Directions` for ``model``.

    Entry ``i`` of ``xdirection`` (``ydirection``) is the direction of the ``i``-th tensor of
    ``model.parameters()`` (``weights``) or of ``model.state_dict()`` (``states``); ``auto`` picks by
    the number of entries.  Each entry's shape must equal its tensor's; values are cast to the
    parameter's dtype (as GL's ``set_weights`` does).  Entries of buffers and of frozen parameters
    must be zero (our surfaces move trainable parameters only) and are dropped.

    Raises:
        ConfigError: not a GL direction file, the number of dimensions differs from the surface's,
            counts or shapes that do not fit the model, non-finite values, a ``states`` direction
            that moves BatchNorm statistics or frozen parameters.
    """
    import torch

    from ._directions import Directions, model_fingerprint

    if dir_type not in DIR_TYPES:
        raise ConfigError(f"--dir-type {dir_type!r} is not one of {', '.join(DIR_TYPES)}")
    from .checkpoints import file_sha256

    data, attrs = store.read_foreign(path)
    if attrs.get("format") == store.FORMAT:
        raise ConfigError(f"--directions {path} is a landscape-tools result file; lt import-gl reads GL's direction "
                          f"files (xdirection/0, ...). Use it directly: lt surface MODEL --directions {path}")
    xs, ys = _entries(data, "x", path), _entries(data, "y", path)
    if not xs:
        hint = " (it is a GL surface file: give it as SURFACE.h5)" if "xcoordinates" in data else ""
        raise ConfigError(f"--directions {path} has no xdirection/0 dataset{hint}: not a loss-landscape (GL) "
                          f"direction file")
    have = 2 if ys else 1
    if have != dims:
        raise ConfigError(f"--directions {path} holds {have}-D directions ({'x and y' if ys else 'x only'}) but the "
                          f"surface file is {dims}-D; give the direction file this surface was computed with")
    if ys and len(ys) != len(xs):
        raise ConfigError(f"--directions {path}: xdirection has {len(xs)} entries but ydirection {len(ys)}; "
                          f"the file is damaged")
    params = list(model.named_parameters())
    states = list(model.state_dict().items())
    n = len(xs)
    if dir_type == "auto":
        if n == len(params):
            dir_type = "weights"
        elif n == len(states):
            dir_type = "states"
        else:
            raise ConfigError(f"--directions {path} has {n} entries per direction, but the model has {len(params)} "
                              f"parameters (GL --dir_type weights) and {len(states)} state_dict entries (states): "
                              f"it was made for another architecture; give the model GL used (--arch / --model)")
    tensors = params if dir_type == "weights" else states
    if n != len(tensors):
        what = "parameters" if dir_type == "weights" else "state_dict entries"
        raise ConfigError(f"--directions {path} has {n} entries per direction, but the model has {len(tensors)} "
                          f"{what} (--dir-type {dir_type}): another architecture, or the other --dir-type")
    trainable = {name for name, p in params if p.requires_grad}
    axes = []
    for axis, entries in (("x", xs), ("y", ys)):
        if not entries:
            continue
        vectors: dict[str, torch.Tensor] = {}
        for i, ((name, t), arr) in enumerate(zip(tensors, entries)):
            where = f"{axis}direction/{i} ({name})"
            if tuple(arr.shape) != tuple(t.shape):
                raise ConfigError(f"--directions {path}: {where} has shape {tuple(arr.shape)} but the model's {name} "
                                  f"is {tuple(t.shape)}: the file was made for another architecture "
                                  f"(or --dir-type {'states' if dir_type == 'weights' else 'weights'})")
            if arr.dtype.kind not in "fiub":
                raise ConfigError(f"--directions {path}: {where} holds {arr.dtype} values, not numbers")
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ConfigError(f"--directions {path}: {where} holds NaN or infinite values; every point along "
                                  f"it would be NaN: recompute the directions")
            if name not in trainable:
                if np.any(arr != 0):
                    kind = "a frozen parameter" if any(name == p for p, _ in params) else "a buffer"
                    raise ConfigError(f"--directions {path}: {where} is {kind} with a non-zero direction; lt surfaces "
                                      f"move trainable parameters only (GL's --dir_type states also moves BatchNorm "
                                      f"statistics, unless --xignore/--yignore biasbn zeroed them). Compute the "
                                      f"directions with lt surface instead (--to B.pt interpolates the statistics too)")
                continue
            vectors[name] = torch.from_numpy(np.array(arr)).to(dtype=t.dtype).cpu()
        # registration order of the parameters, as our own directions
        axes.append({name: vectors[name] for name, p in params if name in vectors})
    extras = {}
    if "explained_variance_ratio_" in data:   # GL's PCA direction files
        extras["explained_variance_ratio"] = np.asarray(data["explained_variance_ratio_"], dtype=np.float64)
    recipe = {"kind": "gl", "dims": dims, "dir_type": dir_type, "norm": None, "ignore": None,
              "source": str(path), "source_sha256": file_sha256(path),
              "note": "GL (loss-landscape) direction file; GL records no normalisation in it"}
    return Directions(axes[0], axes[1] if dims == 2 else None, recipe, model_fingerprint(model), extras=extras)


# ----------------------------------------------------------------------------- import
def _check_label(label: str) -> str:
    label = str(label)
    if not label.strip() or "/" in label or label in (".", ".."):
        raise ConfigError(f"--label {label!r} cannot name a model group: use a non-empty name without '/'")
    return label


def import_gl(surface: str, output: str, *, directions: str | None = None, model=None, info=None,
              label: str | None = None, splits: Sequence[str] | None = None, order: str = "gl",
              dir_type: str = "auto", overwrite: bool = False, command: Sequence[str] | None = None) -> Path:
    """Write a GL surface file (and its directions) as a landscape-tools ``surface`` result.

    Args:
        surface: GL's surface file.
        output: our ``.h5`` result (refused when it exists unless ``overwrite``; written atomically).
        directions: GL's direction file; needs ``model`` (the centre GL used).
        model, info: the centre model and its :class:`ModelInfo` (from ``load_checkpoint``); the group
            records the checkpoint and the directions the model's fingerprint, so that
            ``lt surface CKPT --directions OUT.h5`` recognises them.
        label: model group name (default: the checkpoint's label, else ``gl``).  When several splits
            are imported, each group is ``<label>-<split>``.
        splits: which of GL's splits to import (default: every one in the file).
        order: ``gl`` (GL's files) or ``ij`` (see :func:`gl_grid`).
        dir_type: ``auto``, ``weights`` or ``states`` (see :func:`gl_directions`).
        command: provenance (default ``sys.argv``).

    Raises:
        ConfigError, StoreError: see :func:`read_gl_surface`, :func:`gl_directions`; the output exists.
    """
    store.check_writable(output, overwrite)
    if directions is not None and model is None:
        raise ConfigError("--directions needs the model they were made for: --checkpoint CKPT (with --arch NAME or "
                          "--model PKG.MOD:FACTORY for a bare state_dict); their entries are named after its "
                          "parameters")
    gl = read_gl_surface(surface, order)
    chosen = list(gl.splits) if not splits else list(dict.fromkeys(splits))
    for split in chosen:
        if split not in GL_SPLITS:
            raise ConfigError(f"--split {split!r} is not one of {', '.join(GL_SPLITS)}")
        if split not in gl.splits:
            raise ConfigError(f"{surface} holds no {split}_loss; it has {', '.join(f'{s}_loss' for s in gl.splits)}")
    d = None
    if directions is not None:
        d = gl_directions(directions, model, gl.dims, dir_type)
    from ._directions import to_node
    base = _check_label(label if label is not None else (info.label if info is not None else "gl"))
    note = (f"imported by lt import-gl from the loss-landscape ({GL_URL}) surface file {gl.path} "
            f"(sha256 {gl.sha256}); grid un-scrambled from "
            + ("GL's y-major flat order: values[i, j] = stored.ravel()[j * nx + i]" if gl.order == "gl"
               else "--order ij: values[i, j] = stored[i, j]")
            + "; points still -1 (GL's marker of a point not computed) are not done; accuracy converted from "
              f"percent to a fraction; {LOSS_ASSUMPTION}")
    models: dict[str, dict] = {}
    for split in chosen:
        values = gl.splits[split]
        data: dict[str, Any] = {"x": gl.x, "loss": values["loss"], "accuracy": values["accuracy"],
                                "done": values["done"]}
        if gl.y is not None:
            data["y"] = gl.y
        attrs: dict[str, Any] = dict(info.describe()) if info is not None else {}
        attrs.update({"split": split, "dims": gl.dims, "bn": "frozen", "mc": 0,
                      "directions_kind": "gl" if d is not None else "none",
                      "source": "loss-landscape", "source_file": gl.path, "source_sha256": gl.sha256,
                      "source_loss": f"{split}_loss", "source_accuracy": f"{split}_acc",
                      "source_dir_file": gl.dir_file, "order": gl.order, "note": note})
        node: dict[str, Any] = {"attrs": attrs, "data": data}
        if d is not None:
            node["groups"] = {"directions": to_node(d)}
        name = base if len(chosen) == 1 else f"{base}-{split}"
        models[_check_label(name)] = node
    config = {"surface": str(surface), "directions": directions, "label": label, "splits": chosen, "order": order,
              "dir_type": None if d is None else d.recipe["dir_type"],
              "checkpoint": None if info is None else info.path}
    root = store.provenance("surface", command, config)
    root = {k: (str(v) if isinstance(v, str) else v) for k, v in root.items()}
    root.update({"dims": gl.dims, "imported_from": gl.path, "imported_from_sha256": gl.sha256,
                 "source_format": f"loss-landscape surface file ({GL_URL})", "note": note,
                 "source_keys": json.dumps(gl.keys)})
    return store.write_result(output, root, models, overwrite=overwrite)
