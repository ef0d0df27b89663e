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
    shaded, overs = False, set()
    for n, (res, label, node) in enumerate(_models(results)):
        depth = np.asarray(node["depth"], float)
        var = np.asarray(node["variance"], float)
        smooth = np.asarray(node["is_smoothing"], bool)
        down = np.asarray(node["is_downsampling"], bool)
        overs.add(f"{node.attrs.get('over')}" + (f", {node.attrs.get('samples')} samples, {node.attrs.get('source')}"
                                                 if node.attrs.get("over") == "mc" else ""))
        color = colors[n % len(colors)]
        half = 0.5 / max(len(depth) - 1, 1)
        for d in depth[down]:
            ax.axvspan(d - half, d + half, color="0.85", alpha=0.5 / max(len(results), 1) + 0.2, lw=0,
                       label=None if shaded else "downsampling", zorder=0)
            shaded = True
        ax.plot(depth, var, "o-", color=color, ms=4, label=label, zorder=2)
        if smooth.any():
            ax.plot(depth[smooth], var[smooth], "s", mfc="none", mec=color, ms=10, mew=1.5, zorder=3,
                    label=f"{label}: after smoothing")
    if np.any([np.nanmin(np.asarray(node["variance"], float)) > 0 for _, _, node in _models(results)
               if np.isfinite(np.asarray(node["variance"], float)).any()]):
        ax.set_yscale("log")
    ax.set_xlabel("normalised depth")
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
    cmap = plt.get_cmap("plasma")
    for ax, (label, node) in zip(axes[0], entries):
        freq = np.asarray(node["fourier/frequency"], float)
        amp = np.asarray(node["fourier/amplitude"], float)
        depth = np.asarray(node["depth"], float)
        names = list(node["layers"])
        for i in range(len(depth)):
            keep = np.isfinite(freq[i]) & np.isfinite(amp[i])
            if keep.sum() < 2:
                continue
            ax.plot(freq[i, keep], amp[i, keep], color=cmap(0.9 * depth[i]), lw=1.5, label=str(names[i]))
        ax.set_xticks([0, np.pi / 2, np.pi])
        ax.set_xticklabels(["0", "π/2", "π"])
        ax.set_xlabel("frequency")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δ log amplitude")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1 / 0.9))
    fig.colorbar(sm, ax=list(axes[0]), label="normalised depth", fraction=0.04)
    if title:
        fig.suptitle(title)
    return fig
