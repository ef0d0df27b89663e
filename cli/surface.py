"""`lt surface`: 1-D and 2-D loss-surface slices, resumable and shardable."""
from __future__ import annotations

import glob
import os

import click

from . import common

DEFAULT_RANGE = "-1:1:21"
DEFAULT_TO_RANGE = "-0.5:1.5:21"
AUTO_POINTS = 21
AUTO_MARGIN = 0.25


def _expand(patterns) -> list[str]:
    """``--pca`` values: paths, comma-separated lists or glob patterns (sorted), in the order given."""
    out = []
    for pattern in patterns:
        for part in (s.strip() for s in pattern.split(",")):
            if not part:
                continue
            matches = sorted(glob.glob(os.path.expanduser(part))) if any(c in part for c in "*?[") else [part]
            if not matches:
                from landscape_tools.errors import ConfigError
                raise ConfigError(f"--pca {part!r} matches no checkpoint")
            out.extend(matches)
    return out


def _auto_range(values, option: str):
    """A grid covering ``values`` (plane / PCA coordinates) with a margin on each side."""
    import numpy as np

    lo, hi = float(min(values)), float(max(values))
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    lo, hi = lo - AUTO_MARGIN * span, hi + AUTO_MARGIN * span
    return np.linspace(lo, hi, AUTO_POINTS)


@click.command("surface")
@common.model_arguments
@click.option("--dims", type=click.Choice(["1", "2"]), default=None,
              help="1: a line, 2: a plane [default: 2; 1 with --to].")
@click.option("--x", "x_spec", default=None, metavar="MIN:MAX:NUM",
              help=f"Grid along the first direction [default: {DEFAULT_RANGE}; {DEFAULT_TO_RANGE} with --to; "
                   f"around the models with --plane / --pca].")
@click.option("--y", "y_spec", default=None, metavar="MIN:MAX:NUM", help="Grid along the second direction (2-D).")
@click.option("--norm", type=click.Choice(["filter", "layer", "weight", "none", "filter-dim0"]), default="filter",
              show_default=True, help="Normalisation of random directions (filter: Li et al.; filter-dim0: the "
                                      "reference code's norm over dim 0).")
@click.option("--ignore", type=click.Choice(["biasbn", "none"]), default="biasbn", show_default=True,
              help="biasbn: do not perturb biases and BatchNorm parameters (random directions).")
@click.option("--to", "to_path", default=None, type=click.Path(dir_okay=False), metavar="OTHER.pt",
              help="The line from MODEL (x=0) to another checkpoint (x=1), exact at both ends.")
@click.option("--plane", "plane_paths", nargs=2, default=None, type=click.Path(dir_okay=False), metavar="A.pt B.pt",
              help="The plane through MODEL, A and B (orthonormal axes).")
@click.option("--pca", "pca_paths", multiple=True, metavar="CKPT",
              help="Trajectory checkpoints (repeat, comma-separate or glob 'run/epoch_*.pt'): the plane of "
                   "their top-2 principal directions around MODEL.")
@click.option("--directions", "directions_path", default=None, metavar="FILE.h5[:ROW]",
              help="Reuse the directions of an earlier surface of the same model, exactly; or, from a hessian "
                   "result of `lt hessian --save-vectors`, the model's unit Hessian eigenvectors of row ROW "
                   "[default: 0] (x: eigenvector 1, y: eigenvector 2; --eig to choose).")
@click.option("--eig", "eig_spec", default=None, metavar="I[,J]",
              help="With a hessian --directions file: the eigenvectors (1-based, in the file's --which order) "
                   "of x and y, e.g. --eig 1,3; one number for a line (--dims 1) [default: 1,2; 1 with --dims 1].")
@common.data_options(split="train", batch_size=256)
@click.option("--mc", type=click.IntRange(min=0), default=0, show_default=True,
              help="MC-dropout samples averaged per point (0: dropout off).")
@click.option("--bn", type=click.Choice(["frozen", "recompute"]), default="frozen", show_default=True,
              help="BatchNorm statistics: the centre's running ones, or re-estimated at each point on the data.")
@click.option("--repeats", "repeats", type=int, default=1, show_default=True, metavar="K",
              help="K independent random direction pairs (lines with --dims 1) per model, the same K for every "
                   "model (paired); repeat 0 uses --seed, repeat r a seed derived from --seed and r, so --repeats 3 "
                   "are the first 3 of --repeats 5. The file stores each repeat's grid and sharpness; lt plot "
                   "draws K panels (a mean line with a band for --dims 1), lt compare pairs models over them.")
@common.shard_option("grid points")
@common.precision_options(compile_modes=True)
@common.device_option
@common.seed_option
@common.output_option
@common.plot_option
def command(models, arch, model_factory, trust_pickle, labels, dims, x_spec, y_spec, norm, ignore, to_path,
            plane_paths, pca_paths, directions_path, eig_spec, data_spec, split, samples, batch_size, mc, bn, repeats,
            shard_spec, precision, compile_model, device, seed, output, overwrite, plot_path):
    """Loss and accuracy on a 1-D or 2-D slice through each MODEL's weights.

    Each point (a, b) is evaluated at w0 + a*dx + b*dy, written from the centre weights w0 (the
    centre point is the model itself). Directions are seeded Gaussian, filter-normalised, with biases
    and BatchNorm left alone, unless --to, --plane, --pca or --directions says otherwise. Results go
    to OUT.h5.partial as they are computed: an interrupted run resumes when the same command is run
    again. --shard I/N splits the grid between jobs; `lt merge` joins their files.
    --precision bf16/fp16 runs the forward passes under autocast (GPUs; the losses are still summed
    in full precision). --compile auto (the default) compiles the forward pass with torch.compile when
    the grid is large enough for the compilation to pay for itself, and says on stderr why it runs
    eagerly otherwise; --compile on / off decide it yourself.

    \b
    Example:
      lt surface smooth.pt                       # writes smooth.surface.h5 (21 x 21 points)
      lt surface smooth.pt --x -1:1:21 --y -1:1:21 --samples 512 -o surf.h5 --plot surf.png
      lt surface a.pt --to b.pt -o line.h5 --plot line.png
      lt surface final.pt --pca 'run/epoch_*.pt' -o pca.h5 --plot pca.png
      lt surface smooth.pt --shard 0/4   # smooth.surface.shard0of4.h5; ... 1/4 2/4 3/4, then:
      lt merge smooth.surface.shard*.h5 -o surf.h5
      lt surface big.pt --device cuda --precision bf16 --compile on -o surf.h5
      lt hessian smooth.pt --scope dataset --save-vectors -o h.h5
      lt surface smooth.pt --directions h.h5:0 --dims 1 --x -0.5:0.5:41 --plot top.png
      lt surface smooth.pt --directions h.h5 --eig 1,3 -o eig13.h5
      lt surface mcdo.pt smooth.pt --repeats 5 --x -1:1:11 --y -1:1:11 -o rep.h5   # 5 pairs, shared
    """
    from landscape_tools import engine
    from landscape_tools import surface as S
    from landscape_tools.checkpoints import load_checkpoint
    from landscape_tools.device import resolve_device
    from landscape_tools.errors import ConfigError

    modes = [name for name, used in (("--to", to_path), ("--plane", plane_paths), ("--pca", pca_paths),
                                     ("--directions", directions_path)) if used]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)} cannot be combined: choose one way to make the directions")
    mode = modes[0] if modes else "random"
    repeats = S.check_repeats(repeats)
    if repeats > 1 and mode != "random":
        raise ConfigError(f"--repeats {repeats} draws {repeats} independent random direction pairs, but {mode} fixes "
                          f"the directions (there is one such pair): drop --repeats, or drop {mode} for random "
                          f"directions")
    directions_row = None
    if directions_path is not None:
        directions_path, directions_row = S.split_directions_spec(directions_path)
    eig = S.parse_eig(eig_spec)
    if eig is not None and mode != "--directions":
        raise ConfigError(f"--eig {eig_spec} picks Hessian eigenvectors: give the hessian file with --directions "
                          f"H.h5[:ROW] (written by lt hessian --save-vectors)")
    if eig is not None and dims is not None and len(eig) != int(dims):
        raise ConfigError(f"--eig {eig_spec} names {len(eig)} eigenvector(s) but --dims {dims} asks for {dims}: "
                          f"give {dims} (e.g. --eig {'1,2' if dims == '2' else '1'}) or drop --dims")
    if mode in ("--to", "--plane", "--pca") and len(models) != 1:
        raise ConfigError(f"{mode} takes exactly one MODEL (the centre), got {len(models)}")
    if mode == "--to":
        if dims == "2":
            raise ConfigError("--to draws a line: it has one dimension (drop --dims 2, or use --plane A.pt B.pt)")
        n_dims = 1
    elif mode in ("--plane", "--pca"):
        if dims == "1":
            raise ConfigError(f"{mode} spans a plane: it has two dimensions (drop --dims 1)")
        n_dims = 2
    elif eig is not None and dims is None:
        n_dims = len(eig)
    else:
        n_dims = int(dims or 2)
    if n_dims == 1 and y_spec is not None:
        raise ConfigError(f"--y {y_spec!r} given for a 1-D slice: drop it, or use --dims 2")
    pca_list = _expand(pca_paths) if pca_paths else []
    named = [("--to", to_path), *(("--plane", p) for p in plane_paths or ()), *(("--pca", p) for p in pca_list),
             ("--directions", directions_path)]
    for option, path in named:
        if path is not None and not os.path.isfile(path):
            what = ("an earlier surface result or a hessian result with eigenvectors (.h5)"
                    if option == "--directions" else "a checkpoint")
            raise ConfigError(f"{option} {path} does not exist{' (it is a folder)' if os.path.isdir(path) else ''}; "
                              f"give {what}")
    x = S.parse_range(x_spec, "--x") if x_spec else None
    y = S.parse_range(y_spec, "--y") if y_spec else None
    shard = common.parse_shard(shard_spec, "surface")
    output = common.resolve_output(output, overwrite, models, "surface",
                                   engine.shard_suffix(shard))
    dev = resolve_device(device)
    # under torchrun: one process per GPU / CPU worker, each computing the points of --shard RANK/WORLD
    from landscape_tools import distributed
    ctx = distributed.init(dev)
    click.get_current_context().call_on_close(lambda: distributed.destroy(ctx))
    dev = ctx.device

    loaded = common.load_models(models, arch, model_factory, trust_pickle, labels, device=dev)

    def load_other(path):
        other, info = load_checkpoint(path, arch=arch, model=model_factory, trust_pickle=trust_pickle)
        return other, info

    jobs = []
    more = []        # --repeats: the directions of repeats 1 .. K-1 (random directions only)
    for model, info, data in common.data_for_models(loaded, data_spec, split, samples, batch_size, seed, dev):
        if mode == "--to":
            other, oinfo = load_other(to_path)
            directions = S.line_to(model, other, oinfo.label)
        elif mode == "--plane":
            (a, ainfo), (b, binfo) = load_other(plane_paths[0]), load_other(plane_paths[1])
            directions = S.plane_through(model, a, b, (ainfo.label, binfo.label))
        elif mode == "--pca":
            trajectory = []
            for path in pca_list:
                m, minfo = load_other(path)
                trajectory.append((minfo.label, {k: v.detach().cpu() for k, v in m.named_parameters()}))
            directions = S.pca_directions(model, trajectory)
        elif mode == "--directions":
            directions = S.load_directions(directions_path, S.model_fingerprint(model), n_dims, model=model,
                                           row=directions_row, eig=eig)
            if directions.recipe.get("kind") == "hessian" and (mc or bn != "frozen") and ctx.is_main:
                common.info_line(f"note: {info.label}: the Hessian was taken with dropout fixed and BatchNorm on its "
                                 f"running statistics; with {'--mc ' + str(mc) if mc else ''}"
                                 f"{' and ' if mc and bn != 'frozen' else ''}"
                                 f"{'--bn ' + bn if bn != 'frozen' else ''} this surface is another function, "
                                 f"so the quadratic model L0 + l a^2 / 2 that lt plot draws is only indicative")
        else:
            directions, *more = S.repeat_directions(model, repeats, n_dims, norm, ignore, seed)
        jobs.append(S.SurfaceJob(info.label, model, info, data, directions, more))

    if x is None:
        if mode in ("--plane", "--pca"):
            x = _auto_range([c[0] for j in jobs for c in j.directions.points.values()], "--x")
        else:
            x = S.parse_range(DEFAULT_TO_RANGE if mode == "--to" else DEFAULT_RANGE, "--x")
    if n_dims == 2 and y is None:
        if mode in ("--plane", "--pca"):
            y = _auto_range([c[1] for j in jobs for c in j.directions.points.values()], "--y")
        else:
            y = S.parse_range(DEFAULT_RANGE, "--y")

    options = S.SurfaceOptions(x=x, y=y, mc=mc, bn=bn, seed=seed, precision=precision, compile=compile_model)
    config = common.dump_config(models=list(models), dims=n_dims, x=list(options.x),
                                y=None if y is None else list(options.y), norm=norm, ignore=ignore,
                                to=to_path, plane=list(plane_paths) if plane_paths else None,
                                pca=list(pca_paths) or None, directions=directions_path,
                                directions_row=directions_row, eig=eig, data=data_spec, split=split,
                                samples=samples, batch_size=batch_size, mc=mc, bn=bn, shard=shard_spec,
                                precision=options.precision, compile=compile_model, device=str(dev), seed=seed,
                                mode=mode, **({"repeats": repeats} if repeats > 1 else {}))
    n_points = len(x) * (1 if y is None else len(y)) * repeats
    share = n_points if shard is None else len(S.shard_points(n_points, *shard))
    if ctx.distributed:
        share = len(S.shard_points(n_points, ctx.rank, ctx.world_size))
    if ctx.is_main:
        common.info_line(f"surface: {len(jobs)} model(s) x {share} point(s)"
                         f"{f' ({repeats} repeats of the grid)' if repeats > 1 else ''}"
                         f"{'' if shard is None else f' (shard {shard[0]}/{shard[1]} of {n_points})'}"
                         f"{f' per rank x {ctx.world_size} ranks' if ctx.distributed else ''} "
                         f"on {len(jobs[0].data)} samples ({split}), {dev}"
                         f"{'' if options.precision == 'fp32' else f', {options.precision} forward passes'}"
                         f"{', compiled' if options.compile == 'on' else ''}")
    def compute(out, part):
        S.run_surface(jobs, str(out), options, shard=part, overwrite=overwrite, config=config, device=str(dev),
                      notice=(lambda line: common.info_line(f"lt surface: {line}")) if ctx.is_main else None,
                      progress=common.ProgressBar("surface", quiet=not ctx.is_main))

    path = engine.run_ranks(ctx, output, compute, shard=shard, overwrite=overwrite)
    if not ctx.is_main:
        return
    _summary(path)
    if plot_path:
        common.render_plot([str(path)], plot_path)


def _summary(path) -> None:
    import numpy as np

    from landscape_tools import store

    res = store.read_result(path)
    for label, node in res.models.items():
        repeats = int(node.attrs.get("repeats", 1))
        if repeats > 1:
            done = node.data["done"].astype(bool)
            rise, curv = node.data["sharpness_rise"], node.data["sharpness_curvature"]
            click.echo(f"{label}: {int(done.sum())}/{done.size} points in {repeats} repeats; centre-to-border rise "
                       f"{np.mean(rise):.4g} (repeats {', '.join(f'{v:.4g}' for v in rise)}); curvature at the "
                       f"centre {', '.join(f'{np.mean(curv[:, i]):.4g} along {a}' for i, a in enumerate('xy'[:curv.shape[1]]))}"
                       f" (means over repeats)")
            continue
        loss, done = node.data["loss"], node.data["done"].astype(bool)
        x = node.data["x"]
        y = node.data.get("y")
        parts = [f"{label}: {int(done.sum())}/{done.size} points"]
        centre = tuple(int(np.argmin(np.abs(v))) for v in ((x,) if y is None else (x, y)))
        if done[centre] and (x[centre[0]] == 0 and (y is None or y[centre[1]] == 0)):
            parts.append(f"centre loss {loss[centre]:.4f} (accuracy {node.data['accuracy'][centre]:.4f})")
        finite = done & np.isfinite(loss)
        if finite.any():
            parts.append(f"loss {np.nanmin(np.where(finite, loss, np.nan)):.4f}..{np.nanmax(np.where(finite, loss, np.nan)):.4f}")
        if (done & ~np.isfinite(loss)).any():
            parts.append(f"{int((done & ~np.isfinite(loss)).sum())} non-finite")
        click.echo(", ".join(parts))
    click.echo(f"written to {path}")
