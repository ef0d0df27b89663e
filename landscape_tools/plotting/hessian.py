"""Figures of ``hessian`` results: the paper's split eigenvalue density, and the SLQ spectral density."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

KINDS = ("spectrum", "density")


def _models(results):
    for res in results:
        for label, node in res.models.items():
            yield label, node


def draw(results, kind: str = "spectrum", **options):
    """Draw hessian results, one curve per model, overlaid.

    Args:
        results: list of :class:`landscape_tools.store.Result` of kind ``hessian``.
        kind: ``spectrum`` (the paper's figure): Gaussian-KDE density of every computed eigenvalue
            pooled over batches, in a negative panel and a positive panel with their own y-scales
            (one KDE per sign, scaled by that sign's share of the values); files made with
            ``--density`` get the SLQ spectral density (as ``density``) in a second row below;
            ``density``: the stochastic-Lanczos-quadrature spectral density (files made with
            ``--density``), averaged over rows and re-smoothed from the stored nodes and weights.
        options: ``title`` (str), ``bandwidth`` (KDE bandwidth factor, spectrum only).

    Returns:
        a matplotlib Figure.

    Raises:
        ConfigError: unknown kind, no eigenvalues, or ``density`` for files without ``--density``.
    """
    if kind == "spectrum":
        return _spectrum(results, **options)
    if kind == "density":
        return _density(results, **options)
    raise ConfigError(f"hessian figures are {', '.join(KINDS)}; got {kind!r}")


def _kde(values: np.ndarray, grid: np.ndarray, bandwidth=None) -> np.ndarray:
    """Gaussian KDE of ``values`` on ``grid`` (a narrow Gaussian when the values are all equal)."""
    from scipy.stats import gaussian_kde

    if values.size >= 2 and np.ptp(values) > 0:
        try:
            return gaussian_kde(values, bw_method=bandwidth)(grid)
        except np.linalg.LinAlgError:
            pass
    width = max(np.ptp(grid) / 50, 1e-12)
    return np.exp(-0.5 * ((grid[:, None] - values[None, :]) / width) ** 2).sum(1) / (
        values.size * width * np.sqrt(2 * np.pi))


def _spectrum(results, title: str | None = None, bandwidth=None, **_):
    from . import pyplot
    plt = pyplot()
    pooled = {}
    for label, node in _models(results):
        ev = np.asarray(node["eigenvalues"], float).ravel()
        ev = ev[np.isfinite(ev)]
        if ev.size:
            pooled[label] = (ev, node.attrs)
    if not pooled:
        raise ConfigError("the hessian file(s) hold no computed eigenvalues yet; finish the run first")
    everything = np.concatenate([v for v, _ in pooled.values()])
    neg_lo = float(min(everything.min(), 0.0))
    pos_hi = float(max(everything.max(), 0.0))
    density = _density_curves(results, required=False)
    fig = plt.figure(figsize=(9.0, 3.6 + (3.4 if density else 0.0)))
    layout = fig.add_gridspec(2 if density else 1, 2, width_ratios=[1, 2] if neg_lo < 0 else [1, 3],
                            height_ratios=[1, 1] if density else None)
    ax_n, ax_p = fig.add_subplot(layout[0, 0]), fig.add_subplot(layout[0, 1])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    span = max(pos_hi - neg_lo, 1e-12)
    for n, (label, (ev, attrs)) in enumerate(pooled.items()):
        color = colors[n % len(colors)]
        # each sign gets its own KDE (its own bandwidth), scaled by its share of the values, so the
        # many positive values do not leak into the negative panel
        n_neg = int(np.sum(ev < 0))
        for ax, part, grid, text in (
                (ax_n, ev[ev < 0], np.linspace(min(neg_lo, -0.02 * span) * 1.05, 0.0, 400), f"{label} ({n_neg} neg.)"),
                (ax_p, ev[ev >= 0], np.linspace(0.0, max(pos_hi, 0.02 * span) * 1.05, 600), f"{label} (n={ev.size})")):
            if part.size == 0:
                ax.plot([], [], color=color, label=text)
                continue
            dens = _kde(part, grid, bandwidth) * (part.size / ev.size)
            ax.plot(grid, dens, color=color, label=text)
            ax.fill_between(grid, dens, color=color, alpha=0.15)
    attrs = next(iter(pooled.values()))[1]
    ax_n.set_title("negative eigenvalues")
    ax_p.set_title("positive eigenvalues")
    for ax in (ax_n, ax_p):
        ax.set_xlabel("eigenvalue")
        ax.set_ylim(bottom=0)
    ax_n.set_ylabel("density")
    if neg_lo >= 0:
        ax_n.text(0.5, 0.5, "none", ha="center", va="center", transform=ax_n.transAxes, color="0.4")
    ax_p.legend(fontsize=8, loc="upper right")
    ax_n.legend(fontsize=7, loc="upper left")
    fig.suptitle(title or f"Hessian top-{attrs.get('k')} ({attrs.get('which')}) eigenvalues, "
                          f"{attrs.get('scope')} scope, pooled", fontsize=10)
    if density:
        ax_d = fig.add_subplot(layout[1, :])
        _draw_density(ax_d, *density)
        ax_d.set_title(f"spectral density (SLQ, Gaussian broadening sigma={density[2]:.3g})", fontsize=10)
    fig.tight_layout()
    return fig


def _density_curves(results, required: bool = True):
    """``(curves, grid, sigma)`` of the SLQ densities in ``results``: per model ``(label, density on grid,
    rows, runs)``, each the mean over computed rows of the Gaussian-broadened density of the stored
    nodes and weights, on one grid and one sigma (the median of the rows' stored sigmas) for all.

    Returns None when nothing is there and ``required`` is False.

    Raises:
        ConfigError: (``required``) no density group, or no row computed.
    """
    from .. import _lanczos

    have = [(label, node) for label, node in _models(results) if "density" in node.groups]
    if not have:
        if not required:
            return None
        raise ConfigError("no spectral density in these files: rerun `lt hessian` with --density")
    rows_of = []
    for label, node in have:
        d = node.groups["density"].data
        nodes, weights = np.asarray(d["nodes"], float), np.asarray(d["weights"], float)
        rows = np.flatnonzero(np.any(np.isfinite(nodes.reshape(nodes.shape[0], -1)), axis=1))
        if rows.size:
            rows_of.append((label, nodes[rows], weights[rows], np.asarray(d["sigma"], float)[rows]))
    if not rows_of:
        if not required:
            return None
        raise ConfigError("the spectral density has not been computed for any batch yet; finish the run first")
    finite = np.concatenate([c[1][np.isfinite(c[1])] for c in rows_of])
    lo, hi = float(finite.min()), float(finite.max())
    sigma = float(np.nanmedian(np.concatenate([c[3] for c in rows_of])))
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000)
    curves = []
    for label, nodes, weights, _ in rows_of:
        dens = np.mean([_lanczos.smooth_density(nodes[r], weights[r], grid, sigma) for r in range(nodes.shape[0])],
                       axis=0)
        curves.append((label, dens, nodes.shape[0], nodes.shape[1]))
    return curves, grid, sigma


#: densities below this are drawn at it (log axis)
DENSITY_FLOOR = 1e-12


def _draw_density(ax, curves, grid, sigma) -> None:
    for label, dens, rows, runs in curves:
        ax.semilogy(grid, np.maximum(dens, DENSITY_FLOOR), label=f"{label} ({rows} x {runs} runs)")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_ylim(bottom=max(1e-8, ax.get_ylim()[0]))
    ax.legend(fontsize=8)


def _density(results, title: str | None = None, **_):
    from . import pyplot
    plt = pyplot()
    curves, grid, sigma = _density_curves(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    _draw_density(ax, curves, grid, sigma)
    ax.set_title(title or f"Spectral density (SLQ, Gaussian broadening sigma={sigma:.3g})", fontsize=10)
    fig.tight_layout()
    return fig
