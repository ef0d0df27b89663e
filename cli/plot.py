"""`lt plot`: draw result files (any kind) into a png / pdf / svg figure, without recomputing."""
from __future__ import annotations

import click

from landscape_tools.plotting import DEFAULT_DPI

from . import common


def figure_kinds() -> list[tuple[str, str]]:
    """``(result kind, its figure kinds)`` rows for the help; drawing modules not installed are said so."""
    from landscape_tools.errors import LTError
    from landscape_tools.plotting import DRAWERS, available_kinds

    rows = []
    for result_kind in DRAWERS:
        try:
            kinds = available_kinds(result_kind)
            text = f"{kinds[0]} (default)" + "".join(f", {k}" for k in kinds[1:])
        except LTError:
            text = "(not available in this installation)"
        except Exception as exc:  # a broken drawing module must not break `lt plot --help`
            text = f"(unavailable: {type(exc).__name__}: {exc})"
        rows.append((result_kind, text))
    return rows


class PlotCommand(click.Command):
    """Adds the figure kinds of every result kind to the help, looked up when the help is shown."""

    def format_epilog(self, ctx, formatter):
        with formatter.section("Figure kinds (--kind) per result kind"):
            formatter.write_dl(figure_kinds())
        super().format_epilog(ctx, formatter)


@click.command("plot", cls=PlotCommand)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--kind", default=None, metavar="KIND",
              help="Figure kind for the files' result kind (listed below); default: the first one.")
@click.option("--models", default=None, metavar="LABEL,...",
              help="Only these model labels, in any of the files (default: all).")
@click.option("--title", default=None, help="Figure title (default: describes the data).")
@click.option("--log/--no-log", "log", default=None,
              help="Surfaces: logarithmic contour levels and colour scale (3-D: log10 height; lines: a log "
                   "loss axis), or linear ones [default: log when the loss is positive and its largest value "
                   "is more than 100 times its smallest]. --log on a loss <= 0 is an error.")
@click.option("--dpi", type=int, default=DEFAULT_DPI, show_default=True,
              help="Resolution of a .png figure in dots per inch (300 for print).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="FIG.png",
              help="Figure file: .png, .pdf or .svg (replaced if it exists).")
def command(files, kind, models, title, log, dpi, output):
    """Draw one or more result files of the same kind into one figure.

    Works from the files alone: every number is read back, nothing is recomputed. The models of
    all FILES are overlaid (curves, spectra) or set side by side (diagrams, surfaces); labels that
    repeat across files get the file name appended. Every `--plot` option of the analysis
    commands draws through this same code.

    \b
    Example:
      lt plot evaluate.h5 -o curves.png
      lt plot evaluate.h5 --kind reliability --models smooth -o reliability.pdf
      lt plot plain.h5 smooth.h5 -o hessian.svg
      lt plot surface.h5 --kind heatmap --dpi 300 -o surface.png
      lt plot surface.h5 --log -o surface-log.png          # geometric contour levels
      lt plot surface.h5 --kind filled --no-log -o lin.png  # linear even when the loss spans decades
      lt plot compare.h5 -o forest.png                      # lt compare: differences with intervals
    """
    from landscape_tools.errors import ConfigError
    from landscape_tools.plotting import render

    labels = None
    if models is not None:
        labels = [m.strip() for m in models.split(",")]
        if not all(labels):
            raise ConfigError(f"--models {models!r} has an empty label; give labels separated by commas, "
                              f"e.g. --models plain,smooth")
    options = {"title": title} if title else {}
    if log is not None:
        options["log"] = log
    out = render(list(files), output, kind=kind, models=labels, dpi=dpi, **options)
    common.info_line(f"figure written to {out}")
