"""`lt compare`: differences between models with confidence intervals and verdicts."""
from __future__ import annotations

import click

from . import common


@click.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--labels", default=None, metavar="A,A,B,B",
              help="One label per model group of FILES, in order (files in the order given, groups in file "
                   "order); groups with the same label pool as replicates (training seeds). [default: the "
                   "groups' own labels]")
@click.option("--level", type=float, default=0.95, show_default=True,
              help="Confidence level of the two-sided intervals.")
@click.option("--resamples", type=int, default=2000, show_default=True,
              help="Bootstrap resamples (ECE, MC samples needed, median top eigenvalue).")
@click.option("--within", type=float, default=0.02, show_default=True,
              help="'MC samples needed': the smallest N whose NLL is within this fraction of the NLL at "
                   "the largest N.")
@common.seed_option
@common.output_option
@common.plot_option
def command(files, labels, level, resamples, within, seed, output, overwrite, plot_path):
    """Compare models: each difference B - A with a confidence interval and a verdict.

    FILES are evaluate, hessian, featvar or surface result files (any mix): one file with several
    model groups, or several files. A is the first label, B each other label in turn. For each
    quantity the files support (evaluate: NLL, accuracy, Brier and ECE at every N, MC samples to
    come within --within of the largest N's NLL; hessian: median |top eigenvalue| and negative
    eigenvalues per batch; featvar: variance per layer and its mean; surface: rise from the centre
    to the border) it prints B - A, its --level interval and a verdict: "favours A", "favours B"
    or "no detectable difference".

    \b
    One file per label: the units inside the files are resampled (test samples, data batches,
    direction pairs), paired when both models saw the same units (checked from the files' data
    descriptions), else unpaired (said). Means get a t interval (paired: scipy.stats.ttest_rel;
    unpaired: Welch), other statistics a percentile bootstrap (scipy.stats.bootstrap, --resamples,
    --seed). This covers test-data noise only: train several seeds to cover training noise.
    Several files per label (training seeds): each file's value is one observation and the seed
    means are compared with a Welch t interval.

    \b
    Example:
      lt compare evaluate.h5                               # its two groups, e.g. mcdo and smooth
      lt compare evaluate.h5 hessian.h5 featvar.h5 surface.h5 -o compare.h5 --plot compare.png
      lt compare s0/evaluate.h5 s1/evaluate.h5 s2/evaluate.h5   # groups mcdo, smooth: 3 seeds each
      lt compare a.evaluate.h5 b.evaluate.h5 --labels a,b --level 0.99
    """
    from pathlib import Path

    from landscape_tools import compare
    from landscape_tools.errors import ConfigError
    from landscape_tools.plotting import check_figure_path

    compare.check_options(level, resamples, within)
    names = None
    if labels is not None:
        names = [s.strip() for s in labels.split(",")]
        if not all(names):
            raise ConfigError(f"--labels {labels!r} has an empty label; give one label per model group, "
                              f"e.g. --labels a,a,b,b")
    if plot_path:
        check_figure_path(plot_path)
    output = common.resolve_output(output, overwrite, list(files), "compare")
    comparisons = compare.compare_files(list(files), output, names, level=level, resamples=resamples, seed=seed,
                                        within=within, overwrite=overwrite)
    for c in comparisons:
        click.echo(compare.table(c, level))
    common.info_line(f"result written to {Path(output)}")
    if plot_path:
        common.render_plot([output], plot_path)
