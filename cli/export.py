"""`lt export`: result files out to CSV (any kind), ParaView (.vtp) and OBJ meshes (surfaces)."""
from __future__ import annotations

import click


class ZMax(click.ParamType):
    """A finite number (NaN and infinity refused, with the option's meaning)."""

    name = "loss"

    def convert(self, value, param, ctx):
        import math
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number (the loss at which the height is clipped, e.g. --zmax 10).",
                      param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number (the loss at which the height is clipped, e.g. --zmax 10).",
                      param, ctx)
        return number


@click.command("export")
@click.argument("source", type=click.Path(dir_okay=False), metavar="RESULT.h5")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), metavar="OUT.csv",
              help="Every dataset and attribute, one value per row (model, quantity, index, x, y, value, dtype, "
                   "shape); any result kind.")
@click.option("--vtp", "vtp_path", default=None, type=click.Path(dir_okay=False), metavar="OUT.vtp",
              help="A 2-D surface as VTK XML PolyData for ParaView: points, triangles, loss and accuracy.")
@click.option("--obj", "obj_path", default=None, type=click.Path(dir_okay=False), metavar="OUT.obj",
              help="A 2-D surface as a Wavefront OBJ mesh (3-D printing, renderers).")
@click.option("--model", "model", default=None, metavar="LABEL",
              help="The model to export (required for --vtp / --obj when the file holds several; --csv: only it).")
@click.option("--log", is_flag=True, help="--vtp / --obj: height log10(loss) instead of the loss.")
@click.option("--zmax", type=ZMax(), default=None, metavar="Z",
              help="--vtp / --obj: clip the loss at Z before the height is taken (the point data keep the values).")
@click.option("--vectors", is_flag=True,
              help="--csv: include the surface direction vectors (one row per weight of the model; left out by "
                   "default).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def command(source, csv_path, vtp_path, obj_path, model, log, zmax, vectors, overwrite):
    """Export RESULT.h5 for other programs: CSV, ParaView (.vtp) or a mesh (.obj).

    The mesh formats hold the computed points of a 2-D surface at (x, y, loss) and two triangles per
    grid cell whose four corners are computed: points not computed (or NaN) are left out with their
    triangles, never filled in. Any grid shape; imported GL surfaces too. Each output is written to a
    temporary file and renamed when complete; an existing one is refused unless --overwrite.

    \b
    Example:
      lt export surf.h5 --vtp surf.vtp                    # open in ParaView
      lt export surf.h5 --vtp surf-log.vtp --log --zmax 10
      lt export surf.h5 --obj surf.obj --model smooth
      lt export hessian.h5 --csv hessian.csv              # any result kind
      lt export surf.h5 --csv surf.csv --vectors          # with the direction vectors
    """
    import sys

    from landscape_tools import export as E
    from landscape_tools.errors import ConfigError

    outputs = [(kind, path) for kind, path in (("csv", csv_path), ("vtp", vtp_path), ("obj", obj_path)) if path]
    if not outputs:
        raise ConfigError("nothing to export: give --csv OUT.csv, --vtp OUT.vtp and/or --obj OUT.obj")
    paths = [str(p) for _, p in outputs]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"the outputs must be different files, got {', '.join(paths)}")
    if not (vtp_path or obj_path):
        for flag, used in (("--log", log), ("--zmax", zmax is not None)):
            if used:
                raise ConfigError(f"{flag} shapes the height of --vtp / --obj meshes; the CSV keeps every value as it is")
    if vectors and not csv_path:
        raise ConfigError("--vectors adds the direction vectors to --csv; give --csv OUT.csv")
    for kind, path in outputs:         # every output checked before anything is written
        E.check_output(path, kind, overwrite)
    if csv_path:
        done = E.export_csv(source, csv_path, models=[model] if model else None, vectors=vectors, overwrite=overwrite,
                            command=sys.argv)
        left = ""
        if done.skipped:
            n = sum(v for _, _, v, _ in done.skipped)
            left = f"; the direction vectors ({n} values) are left out, --vectors writes them"
        click.echo(f"{done.rows} rows written to {done.path}{left}")
    for kind, path in outputs:
        if kind == "csv":
            continue
        write = E.export_vtp if kind == "vtp" else E.export_obj
        mesh = write(source, path, model=model, log=log, zmax=zmax, overwrite=overwrite, command=sys.argv)
        nx, ny = mesh.grid_shape
        left = []
        if mesh.not_done:
            left.append(f"{mesh.not_done} not computed")
        if mesh.non_finite:
            left.append(f"{mesh.non_finite} NaN / infinite")
        left = f" ({', '.join(left)}: left out)" if left else ""
        click.echo(f"{mesh.label}: {len(mesh.points)} of {nx * ny} points{left}, {len(mesh.triangles)} triangles, "
                   f"z = {mesh.z} -> {path}")
