"""Figures of surface results: contour, filled contour, heatmap, 3-D surface, 1-D lines.

One panel per model (across every file given), side by side, sharing one colour scale, so two
models' landscapes compare at a glance.  Plane corners and PCA trajectories stored with the
directions are drawn on 2-D panels; a PCA trajectory's distance of each checkpoint from the plane
gets a panel below.  1-D results are always drawn as lines (loss on the left axis, accuracy on the
right); ``line`` on a 2-D result draws its ``y = 0`` row.  A ``--repeats K`` plane gives K panels (one per
direction pair); a ``--repeats K`` line one panel: the mean over the repeats with their min-max band.  Along Hessian eigenvectors (``lt surface
--directions H.h5``) a line also gets the quadratic model ``L0 + 1/2 * l * a^2`` of its eigenvalue (dashed),
and the axes say which eigenvector and eigenvalue they follow.  Levels (and the 1-D loss axis) are
logarithmic when asked, or by default when the loss spans more than :data:`LOG_RATIO`.
"""
from __future__ import annotations

import json

import numpy as np

from ..errors import ConfigError

KINDS = ("contour", "filled", "heatmap", "3d", "line")


def _panels(results):
    out = []
    for r in results:
        for label, node in r.models.items():
            title = label if len(results) == 1 else f"{label} ({r.path.rsplit('/', 1)[-1]})"
            if int(node.attrs.get("repeats", 1)) > 1:
                out += _repeat_panels(title, node)
            else:
                out.append((title, node))
    if not out:
        raise ConfigError("the result file(s) hold no models to draw")
    return out


def _repeat_panels(title: str, node):
    """The panels of a ``--repeats K`` group: a plane gives one panel per repeat (its grid and directions);
    a line gives one panel: the mean loss and accuracy over the repeats (``loss_band``: their min and max)."""
    from ..store import Node

    k = int(node.attrs["repeats"])
    seeds = np.asarray(node.data.get("repeat_seeds", [-1] * k))
    keep = {n: v for n, v in node.data.items() if n in ("x", "y")}
    if "y" in node.data:
        out = []
        for r in range(k):
            directions = node.groups["directions"] if r == 0 else node.groups["repeat_directions"].groups[str(r)]
            data = dict(keep, loss=node.data["loss"][r], accuracy=node.data["accuracy"][r], done=node.data["done"][r])
            out.append((f"{title}, repeat {r}\n(seed {int(seeds[r])})",
                        Node(attrs=dict(node.attrs), data=data, groups={"directions": directions})))
        return out
    loss, acc = _masked(node, "loss"), _masked(node, "accuracy")
    mean_loss, mean_acc = loss.mean(axis=0), acc.mean(axis=0)        # NaN where a repeat is missing
    data = dict(keep, loss=mean_loss, accuracy=mean_acc, done=np.isfinite(mean_loss),
                loss_band=np.stack([loss.min(axis=0), loss.max(axis=0)]))
    return [(f"{title}, mean of {k} repeats", Node(attrs=dict(node.attrs), data=data,
                                                   groups={"directions": node.groups["directions"]}))]


def _masked(node, metric: str) -> np.ndarray:
    values = np.asarray(node.data[metric], dtype=np.float64)
    done = np.asarray(node.data.get("done", np.ones(values.shape, bool))).astype(bool)
    return np.where(done & np.isfinite(values), values, np.nan)


def _points(node):
    d = node.groups.get("directions")
    if d is None or "point_labels" not in d.data:
        return []
    labels = [str(v) for v in d.data["point_labels"]]
    return list(zip(labels, np.asarray(d.data["point_coords"], dtype=np.float64)))


def hessian_axes(node) -> list[tuple[int, float, float]] | None:
    """``(eigenvector number, eigenvalue, curvature)`` of each axis of a surface along Hessian
    eigenvectors (recipe kind ``hessian``), else None.  The curvature is the eigenvalue less the
    Hessian's weight decay: the second derivative of the surface's loss along the axis."""
    d = node.groups.get("directions")
    if d is None:
        return None
    recipe = d.attrs.get("recipe")
    try:
        recipe = json.loads(recipe) if isinstance(recipe, str) else dict(recipe or {})
    except (TypeError, ValueError):
        return None
    if recipe.get("kind") != "hessian":
        return None
    values = [float(v) for v in recipe.get("eigenvalues") or []]
    curvature = [float(v) for v in recipe.get("curvature") or values]
    return [(int(i), v, c) for i, v, c in zip(recipe.get("eig") or [], values, curvature)]


def quadratic_model(node, x: np.ndarray, loss: np.ndarray, axis: int = 0, points: int = 201):
    """The quadratic model ``L0 + 1/2 * c * a^2`` along ``axis`` of a surface along Hessian eigenvectors:
    ``(a, values, label)`` on ``points`` evenly spaced ``a`` from ``min(x)`` to ``max(x)``, with ``L0`` the
    stored loss at ``a = 0`` and ``c`` the axis' curvature (its eigenvalue, less the Hessian's weight
    decay); None when the directions are not eigenvectors or the line has no computed point at 0."""
    axes = hessian_axes(node)
    if not axes or axis >= len(axes):
        return None
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    centre = np.flatnonzero(x == 0.0)
    if centre.size == 0 or not np.isfinite(loss[centre[0]]):
        return None
    number, value, curvature = axes[axis]
    l0 = float(loss[centre[0]])
    a = np.linspace(float(x.min()), float(x.max()), points)
    decay = "" if curvature == value else f" - wd (= {curvature:.4g})"
    label = (rf"quadratic model $L_0 + \frac{{1}}{{2}}\lambda_{{{number}}} a^2$, "
             rf"$\lambda_{{{number}}}$ = {value:.4g}{decay}")
    return a, l0 + 0.5 * curvature * a * a, label


def _axis_label(node, axis: int, default: str) -> str:
    axes = hessian_axes(node)
    if not axes or axis >= len(axes):
        return default
    number, value, _ = axes[axis]
    return rf"{default}: eigenvector {number} ($\lambda_{{{number}}}$ = {value:.4g})"


def _is_trajectory(node) -> bool:
    d = node.groups.get("directions")
    return d is not None and "trajectory_coords" in d.data


#: with ``log=None`` (the default of ``lt plot`` and ``--plot``), loss levels are logarithmic when the
#: drawn loss is positive and its largest value is more than this many times its smallest
LOG_RATIO = 100.0


def _log_choice(log: bool | None, metric: str, lo: float, hi: float, where: str) -> bool:
    """Resolve ``log`` (True / False / None = auto) for values spanning ``lo..hi``.

    Raises:
        ConfigError: log forced on values that are not all positive.
    """
    if log is None:
        return metric == "loss" and lo > 0 and hi / lo > LOG_RATIO
    if log and lo <= 0:
        raise ConfigError(f"--log needs positive values, but the smallest {metric} {where} is {lo:.4g}: "
                          f"draw it with linear levels (--no-log)")
    return bool(log)


def draw(results, kind: str = "contour", metric: str = "loss", log: bool | None = None, levels: int = 20,
         vmin: float | None = None, vmax: float | None = None, **_ignored):
    """Draw surface results.

    Args:
        results: :class:`landscape_tools.store.Result` objects of kind ``surface``.
        kind: one of :data:`KINDS`.
        metric: ``loss`` or ``accuracy`` (2-D panels).
        log: True: logarithmically spaced contour levels / colour scale (geometric from the smallest to
            the largest value; 3-D: log10 of the values; lines: a log loss axis); False: linear;
            None (default): log for a loss whose largest drawn value exceeds :data:`LOG_RATIO` times
            its smallest (all positive), linear otherwise.
        levels: number of contour levels.
        vmin, vmax: fix the shared colour scale (default: the finite range over all panels).

    Returns:
        a matplotlib Figure.  PCA trajectories (``--pca``) get a second row: each checkpoint's distance
        from the plane.

    Raises:
        ConfigError: unknown kind / metric, nothing computed yet, log forced on values <= 0.
    """
    from . import pyplot
    plt = pyplot()

    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: surface figures are {', '.join(KINDS)}")
    if metric not in ("loss", "accuracy"):
        raise ConfigError(f"metric {metric!r}: expected loss or accuracy")
    panels = _panels(results)
    one_d = all("y" not in node.data for _, node in panels)
    if one_d or kind == "line":
        return _draw_lines(plt, panels, log)
    if any("y" not in node.data for _, node in panels):
        raise ConfigError("cannot draw 1-D and 2-D surfaces in one figure: plot them separately")
    values = [_masked(node, metric) for _, node in panels]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if finite.size == 0:
        raise ConfigError("no point of these surfaces is computed (or finite) yet: nothing to draw")
    lo = float(finite.min()) if vmin is None else float(vmin)
    hi = float(finite.max()) if vmax is None else float(vmax)
    log = _log_choice(log, metric, lo, hi, "on the surface" if vmin is None else "(vmin)")
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-12)
    if log:
        from matplotlib.colors import LogNorm
        norm = LogNorm(vmin=lo, vmax=hi)
        lv = np.geomspace(lo, hi, levels)
    else:
        from matplotlib.colors import Normalize
        norm = Normalize(vmin=lo, vmax=hi)
        lv = np.linspace(lo, hi, levels)

    n = len(panels)
    proj = {"projection": "3d"} if kind == "3d" else {}
    with_distance = any(_distances(node) is not None for _, node in panels)
    fig = plt.figure(figsize=(4.6 * n + 0.8, 4.2 + (1.8 if with_distance else 0.0)))
    grid = fig.add_gridspec(2 if with_distance else 1, n, height_ratios=[4.2, 1.5] if with_distance else None)
    axes = [fig.add_subplot(grid[0, i], **proj) for i in range(n)]
    mappable = None
    for i, (ax, (title, node), z) in enumerate(zip(axes, panels, values)):
        x, y = np.asarray(node.data["x"]), np.asarray(node.data["y"])
        X, Y = np.meshgrid(x, y, indexing="ij")          # loss[i, j] at (x[i], y[j])
        zm = np.ma.masked_invalid(z)
        if kind == "3d":
            zz = np.where(np.isfinite(z), z, np.nan)
            mappable = ax.plot_surface(X, Y, np.log10(zz) if log else zz, cmap="viridis",
                                       norm=None if log else norm, linewidth=0, antialiased=True)
            ax.set_zlabel(f"log10 {metric}" if log else metric)
        elif kind == "heatmap":
            mappable = ax.pcolormesh(X, Y, zm, cmap="viridis", norm=norm, shading="nearest")
        elif kind == "filled":
            if zm.count() >= 4 and min(z.shape) >= 2:
                mappable = ax.contourf(X, Y, zm, levels=lv, cmap="viridis", norm=norm, extend="both")
            else:
                mappable = ax.pcolormesh(X, Y, zm, cmap="viridis", norm=norm, shading="nearest")
        else:
            if zm.count() >= 4 and min(z.shape) >= 2:
                mappable = ax.contour(X, Y, zm, levels=lv, cmap="viridis", norm=norm)
                ax.clabel(mappable, inline=True, fontsize=7, fmt="%.3g")
            else:
                mappable = ax.pcolormesh(X, Y, zm, cmap="viridis", norm=norm, shading="nearest")
        ax.set_xlabel(_axis_label(node, 0, "x"))
        ax.set_ylabel(_axis_label(node, 1, "y"))
        if kind != "3d":
            _overlay(ax, node)
            ax.set_aspect("auto")
        missing = int((~np.isfinite(z)).sum())
        ax.set_title(title + (f"\n{missing} point(s) missing / non-finite" if missing else ""), fontsize=10)
        if with_distance:
            _draw_distance(fig.add_subplot(grid[1, i]), node)
    if mappable is not None and kind != "3d":
        from matplotlib.cm import ScalarMappable
        sm = ScalarMappable(norm=norm, cmap="viridis")
        fig.colorbar(sm, ax=axes, label=metric + (" (log scale)" if log else ""), shrink=0.9)
    return fig


def _distances(node):
    """``(labels, distance)`` of a PCA trajectory's checkpoints from the plane, or None."""
    d = node.groups.get("directions")
    if d is None or "trajectory_distance" not in d.data:
        return None
    labels = [str(v) for v in d.data.get("trajectory_labels", range(len(d.data["trajectory_distance"])))]
    return labels, np.asarray(d.data["trajectory_distance"], dtype=np.float64)


def _draw_distance(ax, node) -> None:
    """Each trajectory checkpoint's distance from the PCA plane, in training order."""
    found = _distances(node)
    if found is None:
        ax.set_visible(False)
        return
    labels, dist = found
    ax.plot(np.arange(len(dist)), dist, "-o", color="red", ms=3, lw=1, label="distance from the plane")
    ax.set_xticks(np.arange(len(dist)))
    ax.set_xticklabels(labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center",
                       fontsize=7)
    ax.set_xlabel("checkpoint (training order)")
    ax.set_ylabel("distance from\nthe plane", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _overlay(ax, node) -> None:
    pts = _points(node)
    if not pts:
        return
    if _is_trajectory(node):
        d = node.groups["directions"]
        # every checkpoint in training order (the points are keyed by label: repeated labels collapse)
        xy = np.asarray(d.data["trajectory_coords"], dtype=np.float64)
        names = [str(v) for v in d.data.get("trajectory_labels", [p[0] for p in pts])]
        ax.plot(xy[:, 0], xy[:, 1], "-o", color="red", ms=3, lw=1, label="trajectory")
        ax.annotate(names[0], xy[0], fontsize=7, color="red")
        ax.annotate(names[-1], xy[-1], fontsize=7, color="red")
        ax.plot([0], [0], "*", color="white", mec="black", ms=10, label="centre (MODEL)")
        if "explained_variance_ratio" in d.data:
            ev = np.asarray(d.data["explained_variance_ratio"], dtype=float)
            ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}%)")
            ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}%)")
        ax.legend(fontsize=7, loc="best")
        return
    for label, (a, b) in pts:
        ax.plot([a], [b], "o", color="red", mec="white", ms=7)
        ax.annotate(label, (a, b), textcoords="offset points", xytext=(4, 4), fontsize=8, color="red")


def _rows(panels):
    """``(title, node, x, loss, accuracy, on_axis)`` of each panel; a 2-D result gives its ``y = 0`` row
    (``on_axis``: the row is the x axis itself, ``y`` exactly 0)."""
    out = []
    for title, node in panels:
        x = np.asarray(node.data["x"])
        loss, acc = _masked(node, "loss"), _masked(node, "accuracy")
        on_axis = True
        if loss.ndim == 2:
            j = int(np.argmin(np.abs(np.asarray(node.data["y"]))))
            loss, acc = loss[:, j], acc[:, j]
            on_axis = float(node.data["y"][j]) == 0.0
            title += f" (y = {float(node.data['y'][j]):.3g})"
        out.append((title, node, x, loss, acc, on_axis))
    return out


def _draw_lines(plt, panels, log: bool | None = None):
    rows = _rows(panels)
    finite = np.concatenate([r[3][np.isfinite(r[3])] for r in rows])
    if finite.size == 0:
        raise ConfigError("no point of these surfaces is computed (or finite) yet: nothing to draw")
    log = _log_choice(log, "loss", float(finite.min()), float(finite.max()), "on the line")
    n = len(rows)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
    for ax, (title, node, x, loss, acc, on_axis) in zip(axes[0], rows):
        ax.plot(x, loss, "-o", color="tab:blue", ms=3, label="loss")
        handles, names = ax.get_lines()[:1], ["loss"]
        band = node.data.get("loss_band")
        acc_name = "accuracy"
        if band is not None and loss.ndim == 1 and np.shape(band) == (2, len(x)):   # a --repeats line
            k = int(node.attrs["repeats"])
            handles.append(ax.fill_between(x, band[0], band[1], color="tab:blue", alpha=0.2, lw=0,
                                           label=f"min-max of {k} repeats"))
            names[0] = f"mean loss of {k} repeats"
            names.append(f"min-max of {k} repeats")
            acc_name = f"mean accuracy of {k} repeats"
        if log:
            ax.set_yscale("log")
        quad = quadratic_model(node, x, loss) if on_axis else None
        if quad is not None:   # kept within the measured curve's loss range: a steep parabola leaves the panel
            limits = ax.get_ylim()
            a, q, qlabel = quad
            handles += ax.plot(a, q, "--", color="tab:green", lw=1.2, label=qlabel)
            names.append(qlabel)
            ax.set_ylim(limits)
        ax.set_xlabel(_axis_label(node, 0, "x"))
        ax.set_ylabel("loss (NLL)" + (", log scale" if log else ""), color="tab:blue")
        twin = ax.twinx()
        twin.plot(x, acc, "--s", color="tab:orange", ms=3, label="accuracy")
        twin.set_ylabel("accuracy", color="tab:orange")
        for label, (a, _) in _points(node):
            ax.axvline(a, color="grey", lw=0.8, ls=":")
            ax.annotate(label, (a, ax.get_ylim()[1]), fontsize=8, color="grey", va="top")
        ax.legend(handles + twin.get_lines()[:1], names + [acc_name], fontsize=7, loc="best")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
