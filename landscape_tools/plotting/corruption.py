"""The ``corruption`` figure of ``evaluate`` results: NLL, accuracy and ECE against corruption severity.

Per model (one colour) and for its largest and smallest ensemble size N (solid / dashed), the metric
averaged over the corruptions evaluated at each severity (the mean of the ``corruptions/<name>/``
rows of that severity, every corruption weighted equally, as CIFAR-C results are reported);
severity 0 is the clean test split (the model group's top-level arrays) when the file says so
(``corruptions`` attribute ``clean``; not for the published files, whose folder has no clean split).
"""
from __future__ import annotations

import json

import numpy as np

from ..errors import ConfigError

PANELS = (("nll", "NLL (nats)", 1.0), ("accuracy", "accuracy (%)", 100.0), ("ece", "ECE (%)", 100.0))


def severity_curves(node, metric: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{N: (severities, mean metric over corruptions)}`` of one model group, for every N stored.

    Severity 0 (clean) is included when the ``corruptions`` group's ``clean`` attribute is true.

    Raises:
        ConfigError: the group has no ``corruptions`` results.
    """
    group = node.groups.get("corruptions")
    if group is None:
        raise ConfigError("no corruption results in this model group: run lt evaluate --corrupt all (or --data "
                          "cifar100c:DIR) first")
    sizes = [int(n) for n in np.asarray(node.data["n_samples"])]
    by_severity: dict[int, list[np.ndarray]] = {}
    for sub in group.groups.values():
        sev = np.asarray(sub.data["severity"], dtype=int)
        values = np.asarray(sub.data[metric], dtype=float)
        for s, row in zip(sev, values):
            by_severity.setdefault(int(s), []).append(row)
    if bool(group.attrs.get("clean", False)):
        by_severity[0] = [np.asarray(node.data[metric], dtype=float)]
    severities = np.array(sorted(by_severity), dtype=int)
    means = np.stack([np.mean(by_severity[s], axis=0) for s in severities])      # (severities, N)
    return {n: (severities, means[:, j]) for j, n in enumerate(sizes)}


def draw(entries, results, title: str | None = None, **_):
    """Draw ``(label, node, result)`` entries (see :mod:`landscape_tools.plotting.evaluate`)."""
    from . import pyplot
    plt = pyplot()

    with_results = [(label, node) for label, node, _ in entries if "corruptions" in node.groups]
    if not with_results:
        files = ", ".join(str(r.path) for r in results)
        raise ConfigError(f"{files} holds no corruption results: run lt evaluate --corrupt all (or --data "
                          f"cifar100c:DIR), or draw --kind curves / reliability")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), constrained_layout=True)
    names: list[str] = []
    for i, (label, node) in enumerate(with_results):
        group = node.groups["corruptions"]
        for name in json.loads(group.attrs.get("corruptions", "[]")):
            if name not in names:
                names.append(name)
        color = f"C{i % 10}"
        for ax, (key, _, scale) in zip(axes, PANELS):
            curves = severity_curves(node, key)
            ns = sorted(curves)
            for n, style in ((ns[-1], "-"), (ns[0], "--")) if len(ns) > 1 else ((ns[0], "-"),):
                sev, mean = curves[n]
                ax.plot(sev, mean * scale, marker="o", ms=4, color=color, linestyle=style, label=f"{label}, N = {n}")
    for ax, (_, ylabel, _) in zip(axes, PANELS):
        ax.set_xlabel("corruption severity (0: clean)")
        ax.set_xticks(range(0, 6))
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0])
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    shown = ", ".join(names[:9]) + (f" and {len(names) - 9} more" if len(names) > 9 else "")
    fig.suptitle(title or f"Predictive performance vs. corruption severity (mean over {len(names)} corruptions)\n"
                          f"{shown}", fontsize=10)
    return fig
