"""Figures of ``featvar`` results: variance against normalised depth, and Fourier curves per layer."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

KINDS = ("variance", "fourier")


def _models(results):
    for res in results:
        for label, node in res.models.items():
            yield res, label, node


def draw(results, kind: str = "variance", **options):
    """Draw featvar results.

    Args:
        results: list of :class:`landscape_tools.store.Result` of kind ``featvar``.
        kind: ``variance``: mean variance per layer against normalised depth, every model overlaid,
            log y, downsampling layers shaded, smoothing layers drawn as hollow squares;
            ``fourier``: one panel per model, relative log amplitude against frequency (0 to pi),
            one curve per layer coloured by depth.
        options: ``title`` (str).

    Returns:
        a matplotlib Figure.

    Raises:
        ConfigError: unknown kind, or ``fourier`` for files computed without ``--fourier``.
    """
    if kind == "variance":
        return _variance(results, **options)
    if kind == "fourier":
        return _fourier(results, **options)
    raise ConfigError(f"featvar figures are {', '.join(KINDS)}; got {kind!r}")


def _variance(results, title: str | None = None, **_):
    from . import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    overs = set()
    values = np.concatenate([np.asarray(node["variance"], float) for _, _, node in _models(results)])
    log = bool(np.any(values > 0))
    for n, (res, label, node) in enumerate(_models(results)):
        depth = np.asarray(node["depth"], float)
        var = np.asarray(node["variance"], float)
        if log:                      # layers before the first dropout have exactly zero variance
            var = np.where(var > 0, var, np.nan)
        smooth = np.asarray(node["is_smoothing"], bool)
        down = np.asarray(node["is_downsampling"], bool)
        overs.add(f"{node.attrs.get('over')}" + (f", {node.attrs.get('samples')} samples, {node.attrs.get('source')}"
                                                 if node.attrs.get("over") == "mc" else ""))
        color = colors[n % len(colors)]
        half = 0.5 / max(len(depth) - 1, 1)
        for j, d in enumerate(depth[down]):
            ax.axvspan(d - half, d + half, color=color, alpha=0.12, lw=0, zorder=0,
                       label=f"{label}: downsampling" if j == 0 else None)
        ax.plot(depth, var, "o-", color=color, ms=4, label=label, zorder=2)
        if smooth.any():
            ax.plot(depth[smooth], var[smooth], "s", mfc="none", mec=color, ms=10, mew=1.5, zorder=3,
                    label=f"{label}: after smoothing")
    xlabel = "normalised depth"
    if log:
        ax.set_yscale("log")
        if np.any(values == 0):
            xlabel += " (layers with zero variance are not drawn)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("feature-map variance")
    ax.set_xlim(-0.05, 1.05)
    ax.set_title(title or f"Feature-map variance ({'; '.join(sorted(overs))})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def _fourier(results, title: str | None = None, **_):
    from . import pyplot
    plt = pyplot()
    entries = [(label, node) for _, label, node in _models(results) if "fourier" in node.groups]
    if not entries:
        raise ConfigError("these featvar results hold no Fourier curves; rerun `lt featvar` with --fourier")
    fig, axes = plt.subplots(1, len(entries), figsize=(4.6 * len(entries), 3.8), squeeze=False, sharey=True)
    from matplotlib.colors import ListedColormap
    cmap = ListedColormap(plt.get_cmap("plasma")(np.linspace(0.0, 0.9, 256)))
    for ax, (label, node) in zip(axes[0], entries):
        freq = np.asarray(node["fourier/frequency"], float)
        amp = np.asarray(node["fourier/amplitude"], float)
        depth = np.asarray(node["depth"], float)
        names = list(node["layers"])
        for i in range(len(depth)):
            keep = np.isfinite(freq[i]) & np.isfinite(amp[i])
            if keep.sum() < 2:
                continue
            ax.plot(freq[i, keep], amp[i, keep], color=cmap(depth[i]), lw=1.5, label=str(names[i]))
        ax.set_xticks([0, np.pi / 2, np.pi])
        ax.set_xticklabels(["0", "π/2", "π"])
        ax.set_xlabel("frequency")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δ log amplitude")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=list(axes[0]), label="normalised depth", fraction=0.04)
    if title:
        fig.suptitle(title)
    return fig
