"""`lt featvar`: feature-map variance across MC samples (or over positions), layer by layer."""
from __future__ import annotations

import click

from . import common


@click.command("featvar")
@common.model_arguments
@click.option("--over", type=click.Choice(["mc", "spatial"]), default="mc", show_default=True,
              help="mc: sample variance (Bessel-corrected, 1/(N-1)) of every feature-map entry across --mc "
                   "stochastic passes, averaged over channels, positions and samples. spatial: variance over "
                   "positions of each (sample, channel) map (Bessel-corrected), averaged; deterministic.")
@click.option("--mc", type=click.IntRange(min=2), default=None, metavar="N",
              help="MC samples per input for --over mc  [default: 32]")
@click.option("--source", default=None, metavar="dropout|noise:SIGMA",
              help="Randomness for --over mc: the model's dropout (every dropout switched on, BatchNorm on "
                   "running statistics) or Gaussian input noise of std SIGMA for deterministic models  "
                   "[default: dropout]")
@click.option("--layers", default=None, metavar="stages|blocks|GLOB,...",
              help="Layers: zoo stage outputs after smoothing (stages, the default for zoo models), every "
                   "block (blocks), or comma-separated module-name globs (default for other models: the "
                   "top-level children).")
@click.option("--fourier", is_flag=True, help="Also store each layer's relative log amplitude along the "
                                              "half-diagonal of its 2-D spectrum (0 to pi).")
@common.data_options(split="test", batch_size=64)
@click.option("--max-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N rows (MC copies x samples) per forward pass: the copies of a batch are stacked "
                   "up to N rows, and a batch larger than N runs in pieces of N rows (same masks; each piece "
                   "redraws the batch's masks, so prefer a smaller --batch-size). The numbers do not depend on "
                   "it  [default: copies stacked up to 128 rows on CPU, 4096 on CUDA; batches are not split]")
@common.shard_option("data batches")
@common.precision_options()
@common.device_option
@common.seed_option
@common.output_option
@common.plot_option
def command(models, arch, model_factory, trust_pickle, labels, over, mc, source, layers, fourier, data_spec, split,
            samples, batch_size, max_batch, shard_spec, precision, compile_model, device, seed, output, overwrite,
            plot_path):
    """Feature-map variance of MODELS, layer by layer (Park & Kim 2022, section 6).

    With --over mc (default) each batch is repeated once per MC sample and run as batched
    forward passes (of at most --max-batch rows), every copy with its own seeded dropout masks or
    input noise; the statistics stream in float64, so memory does not grow with --mc. A killed
    run continues where it stopped when the same command is run again. Several models go into one
    file, one group each, and are overlaid by `--plot` against normalised depth.

    Under torchrun (same command line) each process takes every WORLD-th batch on its own device
    (cuda:LOCAL_RANK, or CPU with gloo) into a resumable OUT.rank<r>of<n>.h5.partial; rank 0 adds
    up the per-batch sums and writes the file one process would. --shard I/N computes every N-th
    batch from batch I into its own file; `lt merge` adds the shards up into the same file, bit for
    bit. --compile is refused: the feature hooks change every batch, which compiled graphs do not follow.

    \b
    Example:
      lt featvar mcdo.pt                         # writes mcdo.featvar.h5
      lt featvar mcdo.pt smooth.pt --data digits --split test --mc 32 -o featvar.h5 --plot featvar.png
      lt featvar dnn.pt --source noise:0.1 --layers blocks --fourier -o dnn_featvar.h5
      lt plot dnn_featvar.h5 --kind fourier -o fourier.png
      torchrun --nproc-per-node 4 -m landscape_tools.cli.main featvar smooth.pt --device cuda --precision bf16 -o fv.h5
      lt featvar mcdo.pt --shard 0/2; lt featvar mcdo.pt --shard 1/2   # mcdo.featvar.shard0of2.h5, ...shard1of2.h5
      lt merge mcdo.featvar.shard*.h5 -o mcdo.featvar.h5
    """
    from landscape_tools import distributed, featvar, store
    from landscape_tools.device import resolve_device
    from landscape_tools.errors import ConfigError

    if compile_model:
        raise ConfigError(featvar.COMPILE_REFUSED)
    if over == "spatial" and (mc is not None or source is not None):
        raise click.UsageError("--mc and --source apply to --over mc only; --over spatial is deterministic")
    options = featvar.FeatvarOptions(over=over, mc=mc, source=source if over == "mc" else None, layers=layers,
                                     fourier=fourier, seed=seed, max_batch=max_batch, precision=precision)
    shard = common.parse_shard(shard_spec, "featvar")
    if shard is not None and plot_path:
        raise ConfigError(f"--plot with --shard {shard_spec}: a shard holds only sums of some batches; plot the merged "
                          f"file (lt merge ... -o OUT.h5 --plot FIG.png)")
    from landscape_tools.engine import shard_suffix
    output = common.resolve_output(output, overwrite, models, "featvar", shard_suffix(shard))
    dev = resolve_device(device)
    ctx = distributed.init(dev)          # under torchrun: one process per GPU / CPU worker; else a group of one
    click.get_current_context().call_on_close(lambda: distributed.destroy(ctx))
    dev = ctx.device
    jobs = []
    loaded = common.load_models(models, arch, model_factory, trust_pickle, labels, device=dev)
    for model, info, ds in common.data_for_models(loaded, data_spec, split, samples, batch_size, seed, dev):
        described = ds.describe()
        jobs.append(featvar.Job(info.label, model, dict(info.describe(), data=described), ds.batches(),
                                data={k: v for k, v in described.items() if k != "normalisation"}))
    config = common.dump_config(models=list(models), over=over, mc=mc if over == "mc" else None,
                                source=options.source, layers=layers, fourier=fourier,
                                data=data_spec, split=split, samples=samples, batch_size=batch_size,
                                max_batch=max_batch, seed=seed, precision=options.precision, compile=bool(compile_model),
                                shard=shard_spec)
    attrs = store.provenance("featvar", None, config, seed, str(dev))
    results = featvar.run_to_file(jobs, output, attrs, options, overwrite=overwrite, ctx=ctx, shard=shard,
                                  progress=common.ProgressBar("featvar", quiet=not ctx.is_main))
    if not ctx.is_main:
        return
    if shard is not None:
        click.echo(f"shard {shard[0]}/{shard[1]} written to {output}; `lt merge` joins the {shard[1]} shards")
        return
    for label, res in results.items():
        values = ", ".join(f"{name} {v:.4g}" for name, v in zip(res.layers.names, res.variance))
        click.echo(f"{label}: {res.over} variance ({res.samples} samples, {res.source}) {values}")
    click.echo(f"written to {output}")
    if plot_path:
        common.render_plot([output], plot_path)
