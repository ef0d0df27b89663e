"""`lt merge`: assemble the shard files of one `lt hessian | surface | featvar | evaluate --shard I/N` run."""
from __future__ import annotations

import click

from . import common


@click.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@common.required_output_option
@common.plot_option
def command(shards, output, overwrite, plot_path):
    """Join the SHARDS of one `lt hessian | surface | featvar | evaluate --shard I/N` run into the
    result file one process would have written (bit for bit, apart from the time stamps, the
    command and `merged_from`, which lists the shards' fingerprints).

    Refuses files of different runs (other models, data, options, device kind or seeds: their
    run_fingerprint differs), a shard given twice or missing, and shards that overlap or leave
    units (grid points, batches) uncomputed.

    \b
    Example:
      for i in 0 1 2 3; do lt surface smooth.pt --shard $i/4 -o part$i.h5; done
      lt merge part0.h5 part1.h5 part2.h5 part3.h5 -o surf.h5 --plot surf.png
      for i in 0 1 2; do lt hessian smooth.pt --shard $i/3 -o h$i.h5; done
      lt merge h0.h5 h1.h5 h2.h5 -o hessian.h5
      lt featvar smooth.pt --shard 0/2 -o f0.h5; lt featvar smooth.pt --shard 1/2 -o f1.h5
      lt merge f0.h5 f1.h5 -o featvar.h5

    In a Slurm job array, `lt surface ... --shard slurm` (any of the four) computes the array task's shard
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT) into
    MODEL.surface.shard<k>of<n>.h5; examples/slurm/submit_surface_array.sh submits the array and
    this merge as a job that starts when every task succeeded (afterok).
    """
    import sys

    from landscape_tools.engine import merge

    path = merge(list(shards), output, overwrite=overwrite, command=sys.argv)
    click.echo(f"merged {len(shards)} shard(s) into {path}")
    if plot_path:
        common.render_plot([str(path)], plot_path)
