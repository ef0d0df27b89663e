"""Figures of ``evaluate`` results: ensemble-size curves and reliability diagrams.

``curves`` (default): NLL, accuracy and ECE against the ensemble size N on a log axis, every model
of every file overlaid (the paper's figure).  ``reliability``: the reliability diagram of each
model's largest N, side by side.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

KINDS = ("curves", "reliability", "corruption")

_PANELS = (("nll", "NLL (nats)", 1.0), ("accuracy", "accuracy (%)", 100.0), ("ece", "ECE (%)", 100.0))


def _entries(results) -> list[tuple[str, object, object]]:
    """``(legend label, node, result)`` for every model; labels repeated across files get the file stem."""
    pairs = [(label, node, r) for r in results for label, node in r.models.items()]
    counts: dict[str, int] = {}
    for label, _, _ in pairs:
        counts[label] = counts.get(label, 0) + 1
    return [(f"{label} ({Path(r.path).stem})" if counts[label] > 1 else label, node, r) for label, node, r in pairs]


def _subtitle(results) -> str:
    parts = []
    for r in results:
        for node in r.models.values():
            part = f"{node.attrs.get('data_spec', '?')} {node.attrs.get('split', '')} split, " \
                   f"{node.attrs.get('num_samples', '?')} samples"
            if part not in parts:
                parts.append(part)
    return "; ".join(parts)


def draw(results, kind: str, **options):
    """Draw ``evaluate`` results.

    Args:
        results: list of :class:`landscape_tools.store.Result` of kind ``evaluate``.
        kind: one of :data:`KINDS`.
        options: ``title`` (figure title).

    Returns:
        a matplotlib Figure.
    """
    entries = _entries(results)
    if kind == "reliability":
        return _reliability(entries, results, **options)
    if kind == "corruption":
        from . import corruption
        return corruption.draw(entries, results, **options)
    return _curves(entries, results, **options)


def _curves(entries, results, title: str | None = None, **_):
    from . import pyplot
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.6), constrained_layout=True)
    all_n: set[int] = set()
    for i, (label, node, _) in enumerate(entries):
        n = np.asarray(node.data["n_samples"], dtype=float)
        all_n.update(int(v) for v in n)
        deterministic = not bool(node.attrs.get("mc_active", True))
        color = f"C{i % 10}"
        for ax, (key, _, scale) in zip(axes, _PANELS):
            ax.plot(n, np.asarray(node.data[key]) * scale, marker="o", ms=4, color=color,
                    linestyle="--" if deterministic else "-",
                    label=f"{label} (no MC dropout)" if deterministic else label)
    ticks = sorted(all_n)
    for ax, (key, ylabel, _) in zip(axes, _PANELS):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(ticks) == 1:
            ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
        ax.set_xlabel("ensemble size N (MC samples)")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0])
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title or f"Predictive performance vs. ensemble size\n{_subtitle(results)}", fontsize=10)
    return fig


def _reliability(entries, results, title: str | None = None, **_):
    from . import pyplot
    plt = pyplot()

    cols = min(len(entries), 4) or 1
    rows = -(-len(entries) // cols) if entries else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.ravel()[len(entries):]:
        ax.set_visible(False)
    for ax, (label, node, _) in zip(axes.ravel(), entries):
        rel = node.groups["reliability"]
        n_values = np.asarray(node.data["n_samples"])
        j = int(np.argmax(n_values))
        edges = np.asarray(rel.data["bin_edges"], dtype=float)
        counts = np.asarray(rel.data["counts"])[j]
        acc = np.asarray(rel.data["accuracy"], dtype=float)[j]
        conf = np.asarray(rel.data["confidence"], dtype=float)[j]
        centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        filled = counts > 0
        share = counts / max(int(counts.sum()), 1)
        ax.bar(centres[filled], acc[filled], width=widths[filled], color="C0", alpha=0.75, edgecolor="black",
               linewidth=0.6, label="accuracy", zorder=2)
        gap_low = np.minimum(acc, conf)[filled]
        ax.bar(centres[filled], np.abs(acc - conf)[filled], bottom=gap_low, width=widths[filled], facecolor="none",
               edgecolor="C3", hatch="///", linewidth=0.8, label="gap to mean confidence", zorder=3)
        ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=0.8, label="perfect calibration", zorder=4)
        ax.stairs(share, edges, color="black", linewidth=1.2, label="share of samples in the bin", zorder=5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max probability)")
        ax.set_ylabel("accuracy")
        ece = float(np.asarray(node.data["ece"])[j]) * 100
        mode = "" if bool(node.attrs.get("mc_active", True)) else ", no MC dropout"
        ax.set_title(f"{label}\nN = {int(n_values[j])}{mode}, ECE {ece:.1f}%", fontsize=9)
        ax.set_aspect("equal")
    if entries:
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(title or f"Reliability diagrams (largest ensemble size)\n{_subtitle(results)}", fontsize=10)
    return fig
