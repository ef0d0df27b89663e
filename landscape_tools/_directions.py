"""Directions of loss-surface slices: random (normalised), line to a model, plane, PCA, from a file.

Private machinery of :mod:`landscape_tools.surface` (which re-exports the public names).  Every
direction lives on the CPU as a dict ``parameter name -> tensor`` in the parameter's dtype, built
deterministically (seeded CPU generator, CPU arithmetic), so the same recipe gives bit-identical
vectors on any device and a resumed run recognises its own directions.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import ConfigError

NORMS = ("filter", "layer", "weight", "none", "filter-dim0")
IGNORES = ("biasbn", "none")

Vectors = dict[str, torch.Tensor]


@dataclass
class Directions:
    """One or two directions through a centre model, with how they were made.

    Attributes:
        x, y: parameter name -> direction tensor (CPU, parameter dtype); ``y`` is None for 1-D.
        recipe: how they were built (kind random | to | plane | pca | file, norm, ignore, seed...).
        fingerprint: sha256 of the centre model's weights (:func:`model_fingerprint`).
        target: for ``to`` lines, the other model's parameters and floating buffers; points are then
            ``lerp(w0, target, a)``, which is exact at both ends (a = 0 and a = 1).
        points: named coordinates to mark on figures (plane corners, PCA trajectory), label -> (a, b).
        extras: arrays to store beside them (explained variance, distances from the plane).
    """

    x: Vectors
    y: Vectors | None
    recipe: dict
    fingerprint: str
    target: Vectors | None = None
    points: dict[str, tuple[float, float]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return 1 if self.y is None else 2

    def digest(self) -> str:
        """sha256 of every vector (and the target), for result fingerprints."""
        h = hashlib.sha256()
        h.update(json.dumps(self.recipe, sort_keys=True, default=str).encode())
        h.update(self.fingerprint.encode())
        for axis, vecs in (("x", self.x), ("y", self.y), ("target", self.target)):
            if vecs is None:
                continue
            for name in sorted(vecs):
                t = vecs[name].detach().cpu().contiguous()
                h.update(f"{axis}/{name}/{t.dtype}/{tuple(t.shape)}".encode())
                h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's weights: every floating parameter and buffer, by name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        c = t.detach().cpu().contiguous()
        h.update(f"{name}/{c.dtype}/{tuple(c.shape)}".encode())
        h.update((c.float() if c.dtype == torch.bfloat16 else c).numpy().tobytes())
    return h.hexdigest()


def parameters_cpu(model: nn.Module) -> Vectors:
    """The trainable parameters, detached copies on the CPU, in registration order."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- normalisation
def normalize_direction(direction: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                        norm: str = "filter", ignore: str = "biasbn") -> Vectors:
    """Rescale a direction to the scale of the weights it perturbs (Li et al. 2018).

    Args:
        direction: parameter name -> raw direction tensor.
        weights: parameter name -> the centre weights (same shapes).
        norm: ``filter``: each output filter (slice along dim 0) gets the norm of the same filter of
            the weights; ``layer``: each tensor gets the norm of its weight tensor; ``weight``:
            elementwise ``d * |w|``; ``none``: unchanged; ``filter-dim0``: the reference code's
            variant, norms taken over dim 0 (across filters) for each remaining index.
            Tensors with one dimension (biases, BN affine) are rescaled as a whole under
            ``filter`` / ``filter-dim0`` when not ignored.
        ignore: ``biasbn`` zeroes tensors with fewer than 2 dims (biases, BN); ``none`` keeps them.

    Returns:
        a new dict of normalised tensors.  A filter whose weights have zero norm gets a zero
        direction (so it keeps the weights' norm, 0); a zero direction filter stays zero -- no
        division by zero anywhere.

    Raises:
        ConfigError: unknown ``norm`` / ``ignore``.
    """
    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r} is not one of {', '.join(NORMS)}")
    if ignore not in IGNORES:
        raise ConfigError(f"--ignore {ignore!r} is not one of {', '.join(IGNORES)}")
    out: Vectors = {}
    for name, d in direction.items():
        w = weights[name]
        if ignore == "biasbn" and d.dim() < 2:
            out[name] = torch.zeros_like(d)
            continue
        dd, ww = d.double(), w.double()
        if norm == "none":
            r = dd
        elif norm == "weight":
            r = dd * ww.abs()
        elif norm == "layer" or d.dim() < 2:
            r = dd * _ratio(ww.norm(), dd.norm())
        elif norm == "filter":
            dims = tuple(range(1, d.dim()))
            shape = (-1,) + (1,) * (d.dim() - 1)
            vn = torch.linalg.vector_norm
            r = dd * _ratio(vn(ww, dim=dims), vn(dd, dim=dims)).reshape(shape)
        else:  # filter-dim0
            vn = torch.linalg.vector_norm
            r = dd * _ratio(vn(ww, dim=0, keepdim=True), vn(dd, dim=0, keepdim=True))
        out[name] = r.to(d.dtype)
    return out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is 0 (a zero direction stays zero)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


# ----------------------------------------------------------------------------- recipes
def random_directions(model: nn.Module, dims: int = 2, norm: str = "filter", ignore: str = "biasbn",
                      seed: int = 0) -> Directions:
    """Seeded Gaussian directions, normalised with :func:`normalize_direction`.

    The draws come from a CPU generator seeded with ``seed``: all of x (parameters in registration
    order), then all of y, so the same seed gives the same vectors on any device.

    Raises:
        ConfigError: dims not 1 or 2, unknown norm / ignore.
    """
    if dims not in (1, 2):
        raise ConfigError(f"--dims {dims} must be 1 or 2")
    weights = parameters_cpu(model)
    gen = torch.Generator().manual_seed(int(seed))
    axes = []
    for _ in range(dims):
        raw = {name: torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype) for name, w in weights.items()}
        axes.append(normalize_direction(raw, weights, norm, ignore))
    recipe = {"kind": "random", "norm": norm, "ignore": ignore, "seed": int(seed), "dims": dims,
              "distribution": "gaussian"}
    return Directions(axes[0], axes[1] if dims == 2 else None, recipe, model_fingerprint(model))


def _check_same_params(a: Vectors, b: Vectors, what: str) -> None:
    if list(a) != list(b) or any(a[k].shape != b[k].shape for k in a):
        diff = [k for k in a if k not in b or a[k].shape != b[k].shape] + [k for k in b if k not in a]
        raise ConfigError(f"{what} has other parameters than the centre model ({', '.join(diff[:5])}...): "
                          f"both must be the same architecture")


def line_to(model: nn.Module, other: nn.Module, label: str = "other") -> Directions:
    """The line from ``model`` (a = 0) to ``other`` (a = 1), exact at both ends.

    Parameters and floating buffers (BN running statistics) are interpolated with ``torch.lerp``,
    which returns each end bit for bit.  ``x`` holds ``other - model`` for reference.
    """
    w0, w1 = parameters_cpu(model), parameters_cpu(other)
    _check_same_params(w0, w1, label)
    target = {k: v.detach().cpu().clone() for k, v in other.state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    own = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if set(target) != own:
        raise ConfigError(f"{label} has other buffers than the centre model: both must be the same architecture")
    x = {k: w1[k] - w0[k] for k in w0}
    recipe = {"kind": "to", "target": label, "target_fingerprint": model_fingerprint(other), "norm": "none",
              "ignore": "none", "dims": 1}
    return Directions(x, None, recipe, model_fingerprint(model), target=target,
                      points={"centre": (0.0, 0.0), label: (1.0, 0.0)})


def _flat(vecs: Vectors, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([vecs[n].reshape(-1).double() for n in names])


def _unflat(flat: torch.Tensor, like: Vectors) -> Vectors:
    out, i = {}, 0
    for name, t in like.items():
        n = t.numel()
        out[name] = flat[i:i + n].reshape(t.shape).to(t.dtype)
        i += n
    return out


def plane_through(model: nn.Module, a: nn.Module, b: nn.Module, labels: tuple[str, str] = ("A", "B")) -> Directions:
    """The plane through three models: ``model`` at the origin, orthonormal axes.

    x = (a - model) / |a - model|; y = the part of (b - model) orthogonal to x, normalised.
    Coordinates (in weight-space distance) of the three models are stored in ``points``.

    Raises:
        ConfigError: different architectures, or the three models are (nearly) on one line.
    """
    w0, wa, wb = parameters_cpu(model), parameters_cpu(a), parameters_cpu(b)
    _check_same_params(w0, wa, labels[0])
    _check_same_params(w0, wb, labels[1])
    names = list(w0)
    da, db = _flat(wa, names) - _flat(w0, names), _flat(wb, names) - _flat(w0, names)
    na = da.norm()
    if na == 0:
        raise ConfigError(f"{labels[0]} has the same weights as the centre model: no plane through them")
    u = da / na
    pb = db @ u
    rest = db - pb * u
    nr = rest.norm()
    if nr <= 1e-9 * max(float(db.norm()), 1e-300):
        raise ConfigError(f"the centre, {labels[0]} and {labels[1]} lie on one line: no plane through them")
    v = rest / nr
    recipe = {"kind": "plane", "models": list(labels), "norm": "none", "ignore": "none", "dims": 2,
              "fingerprints": [model_fingerprint(a), model_fingerprint(b)]}
    la, lb = unique_labels(labels, taken=("centre",))
    points = {"centre": (0.0, 0.0), la: (float(na), 0.0), lb: (float(pb), float(nr))}
    return Directions(_unflat(u, w0), _unflat(v, w0), recipe, model_fingerprint(model), points=points)


def unique_labels(labels: Sequence[str], taken: Sequence[str] = ()) -> list[str]:
    """``labels`` with each repeat (of an earlier label or of ``taken``) suffixed `` (2)``, `` (3)``, ...,
    so that checkpoints with the same file stem (``run1/epoch_10.pt``, ``run2/epoch_10.pt``) stay
    separate points of a figure instead of one overwriting the other."""
    seen, out = set(taken), []
    for label in labels:
        name, n = str(label), 1
        while name in seen:
            n += 1
            name = f"{label} ({n})"
        seen.add(name)
        out.append(name)
    return out


def pca_directions(model: nn.Module, trajectory: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> Directions:
    """Top-2 principal directions of a training trajectory around ``model`` (Li et al. 2018, sec. 7).

    Rows ``w_i - w0`` (every trainable parameter) are centred on their mean; the two leading right
    singular vectors are the unit-norm directions.  Stored: explained variance ratio of each, each
    checkpoint's coordinates ``(<w_i - w0, x>, <w_i - w0, y>)`` and its distance from the plane.

    Args:
        model: the centre (usually the final checkpoint).
        trajectory: ``(label, parameters)`` of each checkpoint, in training order.

    Raises:
        ConfigError: fewer than 2 checkpoints, other architectures, or a trajectory without two
            independent directions.
    """
    if len(trajectory) < 2:
        raise ConfigError(f"--pca needs at least 2 checkpoints of the trajectory, got {len(trajectory)}")
    w0 = parameters_cpu(model)
    names = list(w0)
    c0 = _flat(w0, names)
    rows = []
    for label, params in trajectory:
        params = {k: v for k, v in params.items() if k in w0} if set(w0) <= set(params) else dict(params)
        _check_same_params(w0, params, label)
        rows.append(_flat(params, names) - c0)
    m = torch.stack(rows)                        # (k, n) float64
    centred = m - m.mean(dim=0, keepdim=True)
    gram = centred @ centred.T                   # (k, k): cheap even for millions of parameters
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp(min=0), evecs[:, order]
    total = float(evals.sum())
    if total <= 0 or len(evals) < 2 or evals[1] <= 1e-12 * evals[0]:
        raise ConfigError("the trajectory checkpoints do not span two independent directions "
                          "(identical or collinear weights): PCA has no plane")
    axes = []
    for k in range(2):
        vec = centred.T @ evecs[:, k]
        vec = vec / vec.norm()
        axes.append(vec)
    u, v = axes
    coords = torch.stack([m @ u, m @ v], dim=1)  # (k, 2)
    resid = m - coords[:, :1] * u - coords[:, 1:] * v
    distance = resid.norm(dim=1)
    labels = unique_labels([label for label, _ in trajectory])
    recipe = {"kind": "pca", "checkpoints": labels, "norm": "none", "ignore": "none", "dims": 2,
              "centred": True}
    extras = {"explained_variance_ratio": (evals[:2] / total).numpy(), "trajectory_labels": np.array(labels),
              "trajectory_coords": coords.numpy(), "trajectory_distance": distance.numpy()}
    points = {label: (float(a), float(b)) for label, (a, b) in zip(labels, coords.tolist())}
    return Directions(_unflat(u, w0), _unflat(v, w0), recipe, model_fingerprint(model), points=points, extras=extras)


# ----------------------------------------------------------------------------- storage
def to_node(d: Directions) -> dict:
    """The ``directions`` group of a surface result."""
    groups = {"x": {"data": {k: v.numpy() for k, v in _storable(d.x).items()}}}
    if d.y is not None:
        groups["y"] = {"data": {k: v.numpy() for k, v in _storable(d.y).items()}}
    if d.target is not None:
        groups["target"] = {"data": {k: v.numpy() for k, v in _storable(d.target).items()}}
    data: dict[str, Any] = {}
    if d.points:
        labels = list(d.points)
        data["point_labels"] = np.array(labels)
        data["point_coords"] = np.array([d.points[k] for k in labels], dtype=np.float64)
    for key, value in d.extras.items():
        data[key] = np.asarray(value)
    return {"attrs": {"recipe": json.dumps(d.recipe, sort_keys=True), "model_fingerprint": d.fingerprint,
                      "dims": d.dims, "digest": d.digest(), "parameters": list(d.x)},
            "data": data, "groups": groups}


def _storable(vecs: Vectors) -> Vectors:
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().contiguous() for k, v in vecs.items()}


def from_node(node, source: str = "file") -> Directions:
    """Rebuild :class:`Directions` from a stored ``directions`` group (a :class:`store.Node`)."""
    def vectors(group) -> Vectors:
        order = node.attrs.get("parameters") or list(group.data)
        return {k: torch.from_numpy(np.array(group.data[k])) for k in order if k in group.data} \
            if group is not None else None

    recipe = node.attrs.get("recipe", "{}")
    recipe = json.loads(recipe) if isinstance(recipe, str) else dict(recipe)
    x = vectors(node.groups["x"])
    y = vectors(node.groups["y"]) if "y" in node.groups else None
    target = None
    if "target" in node.groups:
        tg = node.groups["target"]
        target = {k: torch.from_numpy(np.array(v)) for k, v in tg.data.items()}
    points = {}
    if "point_labels" in node.data:
        points = {str(k): (float(a), float(b)) for k, (a, b) in zip(node.data["point_labels"], node.data["point_coords"])}
    extras = {k: v for k, v in node.data.items() if k not in ("point_labels", "point_coords")}
    return Directions(x, y, recipe, str(node.attrs.get("model_fingerprint", "")), target=target, points=points,
                      extras=extras)


# ----------------------------------------------------------------------------- Hessian eigenvectors
def parse_eig(spec: str | Sequence[int] | None, option: str = "--eig") -> list[int] | None:
    """``"1,3"`` -> ``[1, 3]``: 1-based eigenvector indices (None stays None).

    Raises:
        ConfigError: not a comma-separated list of whole numbers >= 1, or an index repeated.
    """
    if spec is None:
        return None
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    try:
        out = [int(p) for p in parts]
        if any(str(p).strip() != str(int(p)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{option} {spec!r} is not a list of eigenvector numbers: expected e.g. {option} 1,2 "
                          f"(1 is the first eigenvector of the file, in its --which order)") from None
    if not out or len(out) > 2 or any(i < 1 for i in out):
        raise ConfigError(f"{option} {spec!r}: give one (1-D) or two (2-D) eigenvector numbers, each >= 1, "
                          f"e.g. {option} 1,2")
    if len(set(out)) != len(out):
        raise ConfigError(f"{option} {spec!r} names eigenvector {out[0]} twice: the two axes must be two "
                          f"eigenvectors, e.g. {option} {out[0]},{out[0] + 1}")
    return out


def hessian_directions(model: nn.Module, node, *, row: int = 0, eig: Sequence[int] = (1, 2),
                       source: str = "hessian.h5", label: str = "", run: Mapping[str, Any] | None = None) -> Directions:
    """Unit Hessian eigenvectors of ``model`` as surface directions (x: ``eig[0]``, y: ``eig[1]`` if given).

    ``node`` is the model's group of a hessian result (a :class:`store.Node`) with an ``eigenvectors``
    group (``lt hessian --save-vectors``): attrs ``model_fingerprint``, ``params``, ``dtype``, ``which``;
    one dataset per covered parameter, named as in ``model.named_parameters()``, shaped
    ``(rows, k, *param.shape)``.  Parameters without a dataset are zero in every direction.  Each
    vector is renormalised in float64 to unit norm over all parameters (float32 storage leaves it
    about 1e-7 off), so the axes are in the parameters' own units; no filter normalisation.

    The recipe (kind ``hessian``) records the source file and its run fingerprint, the row, the
    eigenvector numbers, their eigenvalues and ``curvature``: each eigenvalue less the Hessian's weight
    decay, the second derivative of the surface's loss (which has no weight-decay term) along the axis.

    Raises:
        ConfigError: eigenvectors of other weights (fingerprint), a row out of range, not done or with
            NaN vectors, an eigenvector number beyond the file's k, datasets that are not parameters of
            ``model`` or have other shapes, a zero vector.
    """
    where = f"--directions {source}:{row}" + (f" (model {label})" if label else "")
    vec = node.groups.get("eigenvectors") if hasattr(node, "groups") else None
    if vec is None:
        raise ConfigError(f"{where} holds no eigenvectors: run lt hessian with --save-vectors")
    fp = model_fingerprint(model)
    if str(vec.attrs.get("model_fingerprint", "")) != fp:
        raise ConfigError(f"{where}: the eigenvectors were computed for other weights (fingerprint "
                          f"{str(vec.attrs.get('model_fingerprint', ''))[:12]}), not this model ({fp[:12]}); "
                          f"run lt hessian --save-vectors on this checkpoint")
    eigenvalues = np.asarray(node.data["eigenvalues"], dtype=np.float64)
    rows, k = eigenvalues.shape
    if not 0 <= int(row) < rows:
        raise ConfigError(f"--directions {source}:{row}: row {row} does not exist; the file has rows 0..{rows - 1} "
                          f"(one per batch with --scope batch, one with --scope dataset)")
    row = int(row)
    done = np.asarray(node.data.get("done", np.ones(rows, bool))).astype(bool)
    if not done[row]:
        raise ConfigError(f"{where}: row {row} is not computed (the hessian run was interrupted or ran only some "
                          f"rows); finish it with the same lt hessian command, or choose a done row "
                          f"({', '.join(str(int(r)) for r in np.flatnonzero(done)[:8]) or 'none'})")
    eig = [int(i) for i in eig]
    beyond = [i for i in eig if not 1 <= i <= k]
    if beyond:
        raise ConfigError(f"{where}: --eig {','.join(map(str, eig))} asks for eigenvector {beyond[0]}, but the file "
                          f"holds {k} per row (1..{k}); choose --eig within 1..{k} or rerun lt hessian with "
                          f"--top-k {max(beyond)}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = [n for n in vec.data if n not in params]
    if unknown:
        raise ConfigError(f"{where}: eigenvector entries {', '.join(unknown[:5])} are not trainable parameters "
                          f"of this model; the file belongs to another architecture")
    if not vec.data:
        raise ConfigError(f"{where}: the eigenvectors group holds no parameters; rerun lt hessian --save-vectors")
    axes = []
    for i in eig:
        raw = {}
        for name, p in params.items():
            if name not in vec.data:
                continue
            data = vec.data[name]
            want = (rows, k, *p.shape)
            if tuple(data.shape) != want:
                raise ConfigError(f"{where}: eigenvectors/{name} has shape {tuple(data.shape)}, expected {want} "
                                  f"(rows, k, parameter shape); the file belongs to another model")
            raw[name] = torch.from_numpy(np.array(data[row, i - 1], dtype=np.float64))
        bad = [n for n, t in raw.items() if not torch.isfinite(t).all()]
        if bad:
            raise ConfigError(f"{where}: eigenvector {i} is NaN / not finite ({', '.join(bad[:3])}): the row was not "
                              f"saved; rerun lt hessian --save-vectors for it")
        norm = math.sqrt(sum(float((t * t).sum()) for t in raw.values()))
        if not norm > 0:
            raise ConfigError(f"{where}: eigenvector {i} is zero; rerun lt hessian --save-vectors")
        axes.append({name: (raw[name] / norm).to(p.dtype) if name in raw else torch.zeros_like(p.detach().cpu())
                     for name, p in params.items()})
    run = dict(run or {})
    wd = float(node.attrs.get("weight_decay", 0.0) or 0.0)
    values = [float(eigenvalues[row, i - 1]) for i in eig]
    nan = [i for i, v in zip(eig, values) if not math.isfinite(v)]
    if nan:
        raise ConfigError(f"{where}: the eigenvalue of eigenvector {nan[0]} is NaN / not finite; rerun lt hessian "
                          f"for this row")
    recipe = {"kind": "hessian", "source": str(source), "source_fingerprint": run.get("fingerprint"),
              "source_created": run.get("created"), "model": label, "row": row, "eig": eig,
              "eigenvalues": values, "weight_decay": wd, "curvature": [v - wd for v in values],
              "which": _attr(vec, node, "which"), "params": _attr(vec, node, "params"),
              "scope": node.attrs.get("scope"), "vector_dtype": vec.attrs.get("dtype"),
              "norm": "none", "ignore": "none", "dims": len(eig)}
    return Directions(axes[0], axes[1] if len(axes) == 2 else None, recipe, fp)


def _attr(vec, node, key: str):
    """``key`` of the eigenvectors group, else of the model group; ``"null"`` and ``""`` (no selection) are None."""
    value = vec.attrs.get(key, node.attrs.get(key))
    return None if value in ("null", "") else value
