"""Figures of ``compare`` results: a forest plot of the differences B - A with their intervals."""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

KINDS = ("forest",)
#: marker colour per verdict
COLORS = {"favours A": "tab:blue", "favours B": "tab:orange", "no detectable difference": "0.45"}


def panels(node) -> list[tuple[str, np.ndarray]]:
    """``(metric, row indices)`` of one comparison, metrics in file order: one forest panel each."""
    metrics = [str(m) for m in node["metric"]]
    order = list(dict.fromkeys(metrics))
    return [(m, np.array([i for i, v in enumerate(metrics) if v == m])) for m in order]


def draw(results, kind: str = "forest", title: str | None = None, **_):
    """Draw compare results.

    Args:
        results: list of :class:`landscape_tools.store.Result` of kind ``compare``.
        kind: ``forest``: one column per comparison (B vs A), one panel per metric (its own x scale),
            one row per quantity: the difference B - A as a dot coloured by its verdict and its
            interval as a horizontal bar (none where the file has no interval), a line at 0.
        title: figure title (default: the comparisons and the confidence level).

    Returns:
        a matplotlib Figure.

    Raises:
        ConfigError: unknown kind, or a file without comparisons.
    """
    if kind not in KINDS:
        raise ConfigError(f"compare figures are {', '.join(KINDS)}; got {kind!r}")
    from matplotlib.ticker import MaxNLocator

    from . import pyplot
    plt = pyplot()
    columns = [(res, label, node) for res in results for label, node in res.models.items()]
    if not columns:
        raise ConfigError(f"{results[0].path} holds no comparisons to draw")
    layouts = [panels(node) for _, _, node in columns]
    n_panels = max(len(p) for p in layouts)
    heights = [max(max((len(p[k][1]) if k < len(p) else 0) for p in layouts), 1) + 1.2 for k in range(n_panels)]
    fig, axes = plt.subplots(n_panels, len(columns), squeeze=False, gridspec_kw={"height_ratios": heights},
                             figsize=(6.2 * len(columns), 0.32 * sum(heights) + 1.2))
    for c, ((res, label, node), layout) in enumerate(zip(columns, layouts)):
        a, b = node.attrs.get("a", "A"), node.attrs.get("b", "B")
        est, low, high = (np.asarray(node[k], dtype=float) for k in ("estimate", "low", "high"))
        verdicts = [str(v) for v in node["verdict"]]
        quantities = [str(q) for q in node["quantity"]]
        for k in range(n_panels):
            ax = axes[k, c]
            if k >= len(layout):
                ax.set_visible(False)
                continue
            metric, rows = layout[k]
            y = -np.arange(len(rows), dtype=float)
            finite = np.isfinite(low[rows]) & np.isfinite(high[rows])
            ax.hlines(y[finite], low[rows][finite], high[rows][finite], color="black", linewidth=1.4,
                      label="interval")
            ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--", zorder=0)
            for v, color in COLORS.items():
                pick = np.array([verdicts[i] == v for i in rows], dtype=bool)
                if pick.any():
                    ax.plot(est[rows][pick], y[pick], "o", color=color, markersize=5, linestyle="none", zorder=3,
                            label={"favours A": f"favours {a}", "favours B": f"favours {b}"}.get(v, v))
            reach = np.concatenate([np.abs(est[rows]), np.abs(low[rows][finite]), np.abs(high[rows][finite])])
            reach = reach[np.isfinite(reach)]
            half = float(reach.max()) * 1.15 if reach.size and reach.max() > 0 else 1.0
            ax.set_xlim(-half, half)                 # symmetric about 0: the side of an interval reads at once
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.set_yticks(y)
            ax.set_yticklabels([quantities[i] + ("" if ok else " (no interval)") for i, ok in zip(rows, finite)],
                               fontsize=8)
            ax.set_ylim(y.min() - 0.7, 0.7)
            better = str(node["wording"][rows[0]])
            ax.set_title(f"{metric} ({better} is better)", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            if k == len(layout) - 1:
                ax.set_xlabel(f"difference {b} - {a}")
        axes[0, c].annotate(f"{b} vs {a}", (0.5, 1.0), xycoords="axes fraction", xytext=(0, 18),
                            textcoords="offset points", ha="center", fontsize=11, weight="bold")
    handles, names = [], []
    for ax in axes.ravel():
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    level = results[0].attrs.get("level")
    level_text = f"{float(level):.0%} intervals" if level is not None and math.isfinite(float(level)) else "intervals"
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(title or f"differences between models, {level_text}", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    return fig
