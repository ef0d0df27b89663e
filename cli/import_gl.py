"""`lt import-gl`: a loss-landscape (tomgoldstein, "GL") surface file, and its directions, into our schema."""
from __future__ import annotations

import click

from . import common


@click.command("import-gl")
@click.argument("surface", type=click.Path(dir_okay=False), metavar="SURFACE.h5")
@click.option("--directions", "directions_path", default=None, type=click.Path(dir_okay=False), metavar="DIR.h5",
              help="GL's direction file (xdirection/0.., ydirection/0..); needs --checkpoint, the model GL used.")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), metavar="CKPT",
              help="The centre model GL perturbed: names the direction entries and records the model.")
@click.option("--arch", default=None, metavar="NAME", help="Zoo architecture for a bare state_dict checkpoint.")
@click.option("--model", "model_factory", default=None, metavar="PKG.MOD:FACTORY",
              help="Factory of a user model for a bare state_dict, or torchvision:NAME.")
@click.option("--trust-pickle", is_flag=True, help="Allow a whole pickled module (runs code from the file!).")
@click.option("--label", default=None, metavar="NAME",
              help="Model group name [default: the checkpoint's file stem, else gl]; with both splits "
                   "NAME-train and NAME-test.")
@click.option("--split", "splits", type=click.Choice(["train", "test"]), multiple=True,
              help="Import only this split (repeat for both) [default: every split in the file].")
@click.option("--order", type=click.Choice(["gl", "ij"]), default="gl", show_default=True,
              help="gl: GL's y-major flat order (every GL file, square or not); ij: values[i, j] already at "
                   "(x[i], y[j]), for forks that store it so.")
@click.option("--dir-type", type=click.Choice(["auto", "weights", "states"]), default="auto", show_default=True,
              help="GL's --dir_type: entries per parameters() (weights) or per state_dict() (states); auto: by "
                   "their number.")
@common.required_output_option
@common.plot_option
def command(surface, directions_path, checkpoint, arch, model_factory, trust_pickle, label, splits, order, dir_type,
            output, overwrite, plot_path):
    """Read a loss-landscape (GL) SURFACE.h5 into a landscape-tools surface result.

    GL's xcoordinates / ycoordinates, train_loss and train_acc (test_* too, when present) become x, y,
    loss, accuracy (a fraction, from GL's percent) and done (False where GL still holds -1, its marker
    of a point not computed). GL fills its (nx, ny) arrays in y-major flat order, which only square
    grids survive in its own plots; the import puts loss[i, j] at (x[i], y[j]) for every grid shape.
    The loss is taken to be GL's default mean cross-entropy (recorded in the file's note).

    With --directions and --checkpoint, GL's direction file becomes directions/x|y keyed by parameter
    name (shapes checked), so `lt surface CKPT --directions OUT.h5` computes more points of the same
    slice: a bigger grid, a finer one, or the test split.

    \b
    Example:
      lt import-gl 'model_300.t7_weights.h5_[-1.0,1.0,51]x[-1.0,1.0,51].h5' -o gl.h5 --plot gl.png
      lt import-gl SURF.h5 --directions DIR.h5 --checkpoint model_300.t7 --arch resnet_dnn_18 -o gl.h5
      lt surface model_300.t7 --arch resnet_dnn_18 --directions gl.h5 --x -2:2:101 --y -2:2:101 -o wider.h5
      lt import-gl SURF.h5 --split test --label resnet -o gl-test.h5
    """
    import os
    import sys

    from landscape_tools.errors import ConfigError
    from landscape_tools.interop import import_gl
    from landscape_tools.store import check_writable

    check_writable(output, overwrite)
    for option, path in (("SURFACE.h5", surface), ("--directions", directions_path), ("--checkpoint", checkpoint)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{option} {path} does not exist{' (it is a folder)' if os.path.isdir(path) else ''}")
    if (arch or model_factory) and checkpoint is None:
        raise ConfigError(f"{'--arch' if arch else '--model'} builds the model of a checkpoint: give --checkpoint CKPT")
    model = info = None
    if checkpoint is not None:
        from landscape_tools.checkpoints import load_checkpoint
        model, info = load_checkpoint(checkpoint, arch=arch, model=model_factory, trust_pickle=trust_pickle)
    path = import_gl(surface, output, directions=directions_path, model=model, info=info, label=label,
                     splits=list(splits) or None, order=order, dir_type=dir_type, overwrite=overwrite,
                     command=sys.argv)
    from landscape_tools.store import read_result
    res = read_result(path)
    for name, node in res.models.items():
        done = node.data["done"]
        extra = ", directions keyed by parameter name" if "directions" in node.groups else ""
        click.echo(f"{name}: {int(done.sum())}/{done.size} points computed ({node.attrs.get('split')} split){extra}")
    click.echo(f"written to {path}")
    if plot_path:
        common.render_plot([str(path)], plot_path)
