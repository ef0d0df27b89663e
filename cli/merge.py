"""`lt merge`: assemble the shard files of one `lt surface --shard I/N` run."""
from __future__ import annotations

import click

from . import common


@click.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@common.required_output_option
@common.plot_option
def command(shards, output, overwrite, plot_path):
    """Join the SHARDS of one `lt surface --shard I/N` run into a complete result file.

    Refuses shards of different runs (other models, data, grid, directions or options), shards that
    overlap, and sets that leave points uncomputed.

    \b
    Example:
      for i in 0 1 2 3; do lt surface smooth.pt --shard $i/4 -o part$i.h5; done
      lt merge part0.h5 part1.h5 part2.h5 part3.h5 -o surf.h5 --plot surf.png

    In a Slurm job array, `lt surface ... --shard slurm` computes the array task's shard
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT) into
    MODEL.surface.shard<k>of<n>.h5; examples/slurm/submit_surface_array.sh submits the array and
    this merge as a job that starts when every task succeeded (afterok).
    """
    import sys

    from landscape_tools.surface import merge_shards

    path = merge_shards(list(shards), output, overwrite=overwrite, command=sys.argv)
    click.echo(f"merged {len(shards)} shard(s) into {path}")
    if plot_path:
        common.render_plot([str(path)], plot_path)
