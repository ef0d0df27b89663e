"""Result file(s) -> matplotlib figure.  The only package that imports matplotlib (lazily).

:func:`figure` reads files with :mod:`landscape_tools.store`, picks the drawer registered for their
``kind`` (and ``--kind`` variant) and returns the Figure; :func:`render` saves it as png / pdf / svg.  Each analysis has its own module here
(``hessian``, ``surface``, ``featvar``, ``evaluate``, ``compare``) defining ``KINDS`` (variant names, the first the
default) and ``draw(results, kind, **options) -> Figure`` taking a list of
:class:`landscape_tools.store.Result`.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError

#: result kind -> drawing module
DRAWERS = {"hessian": "hessian", "surface": "surface", "featvar": "featvar", "evaluate": "evaluate",
           "compare": "compare"}
FORMATS = (".png", ".pdf", ".svg")


def _matplotlib():
    import matplotlib
    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def drawer(kind: str):
    """The drawing module of a result kind.

    Raises:
        ConfigError: unknown kind, or its drawing module is not part of this installation.
    """
    if kind not in DRAWERS:
        raise ConfigError(f"no figure for results of kind {kind!r}; known: {', '.join(DRAWERS)}")
    name = f"{__name__}.{DRAWERS[kind]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ConfigError(f"figures of {kind} results are not available in this installation "
                          f"(no module {name})") from None


def check_figure_path(output: str | os.PathLike) -> Path:
    """Validate a figure path before any work: known extension, existing folder.

    Raises:
        ConfigError: another extension, or the folder does not exist.
    """
    out = Path(output)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"figure {out} must end in {', '.join(FORMATS)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"folder {parent} for the figure {out.name} does not exist; create it first")
    return out


def available_kinds(result_kind: str) -> tuple[str, ...]:
    return tuple(drawer(result_kind).KINDS)


#: raster resolution of png figures unless asked otherwise
DEFAULT_DPI = 130


def figure(paths: Sequence[str], kind: str | None = None, models: Sequence[str] | None = None, **options):
    """Read result files and draw them into a matplotlib Figure, without saving it.

    The same code path as :func:`render` (and so as `lt plot` and every `--plot`); tests inspect the
    returned Figure to check what is drawn.  The caller closes it (``pyplot().close(fig)``).

    Args:
        paths, kind, models, options: as :func:`render`.

    Raises:
        ConfigError: unknown variant or label; mixed result kinds; an option the kind does not take.
    """
    from .. import store

    results = [store.read_result(p) for p in paths]
    kinds = {r.kind for r in results}
    if len(kinds) != 1:
        raise ConfigError(f"cannot draw results of different kinds together: {', '.join(sorted(kinds))}")
    result_kind = kinds.pop()
    module = drawer(result_kind)
    variant = kind or module.KINDS[0]
    if variant not in module.KINDS:
        raise ConfigError(f"--kind {variant!r} is not available for {results[0].kind} results; "
                          f"choose one of {', '.join(module.KINDS)}")
    if options.get("log") is not None and result_kind != "surface":
        raise ConfigError(f"--{'log' if options['log'] else 'no-log'} applies to surface figures only, "
                          f"not to {result_kind} results (their log axes are fixed)")
    if models:
        known = [label for r in results for label in r.models]
        unknown = [m for m in models if m not in known]
        if unknown:
            raise ConfigError(f"--models {', '.join(unknown)} not found; the files hold {', '.join(known)}")
        for r in results:
            r.models = {k: v for k, v in r.models.items() if k in models}
    _matplotlib()
    return module.draw(results, variant, **options)


def render(paths: Sequence[str], output: str, kind: str | None = None, models: Sequence[str] | None = None,
           dpi: int = DEFAULT_DPI, **options) -> Path:
    """Draw result files into ``output``.

    Args:
        paths: one or more result files of the same kind.
        output: figure path ending in .png, .pdf or .svg.
        kind: variant (e.g. ``contour``, ``heatmap``, ``3d`` for surfaces); default per result kind.
        models: only these model labels (default: all, in file order).
        dpi: dots per inch of a png (pdf / svg are vector figures; their embedded images use it too).
        options: passed to the drawer (e.g. ``title``; ``log`` for surfaces: True / False / None = auto).

    Raises:
        ConfigError: unknown format, variant or label; mixed result kinds.
    """
    out = check_figure_path(output)
    if not 20 <= int(dpi) <= 1200:
        raise ConfigError(f"--dpi {dpi} is outside 20..1200 ({DEFAULT_DPI} is the default; 300 suits print)")
    fig = figure(paths, kind=kind, models=models, **options)
    plt = _matplotlib()
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        fig.savefig(tmp, dpi=int(dpi), bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return out


def pyplot():
    """matplotlib.pyplot with a non-interactive backend (for drawer modules)."""
    return _matplotlib()
