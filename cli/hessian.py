"""`lt hessian`: top Hessian eigenvalues per mini-batch (or for all data), trace and spectral density."""
from __future__ import annotations

import click

from . import common


@click.command("hessian")
@common.model_arguments
@common.data_options(split="train", batch_size=128)
@click.option("--batches", "n_batches", type=common.COUNT_OR_ALL, default=None, metavar="N|all",
              help="Use only the first N batches; more than the data make is an error [default: all].")
@click.option("--scope", default="batch", show_default=True, metavar="batch|dataset",
              help="batch: one Hessian per batch (the paper); dataset: the Hessian of the mean loss over all "
                   "selected batches, weighted by batch size.")
@click.option("--top-k", "top_k", type=common.IntRange(min=1, hint="the number of eigenvalues per Hessian, e.g. "
                                                                  "--top-k 5"),
              default=5, show_default=True, help="Eigenvalues per Hessian.")
@click.option("--which", default="LM", show_default=True, metavar="LM|LA|SA",
              help="LM: largest magnitude, signed (negatives mean non-convexity); LA: largest; SA: smallest.")
@click.option("--method", default="lanczos", show_default=True, metavar="lanczos|power",
              help="lanczos: thick-restart Lanczos; power: deflated power iteration (the paper's procedure).")
@click.option("--tol", type=common.FloatRange(min=0, min_open=True,
                                             hint="a relative eigenvalue accuracy such as --tol 1e-4"),
              default=1e-4, show_default=True,
              help="Relative eigenvalue accuracy: stop when every eigenvalue's certificate, a bound on "
                   "|lambda - theta| / |theta| for the eigenvalue theta it is nearest to (from its residual and "
                   "the gap to the other Ritz values), is at most tol. Stored per value as 'certificates'. "
                   "--method power stops on the residual ||Hv - lambda v|| <= tol * |lambda|, which bounds the "
                   "same error.")
@click.option("--max-iter", "max_iter", type=common.IntRange(min=1, hint="a number of products or iterations, "
                                                                        "e.g. --max-iter 300"),
              default=None, metavar="N",
              help="lanczos: Hessian-vector products allowed [default: max(300, 40k)]; power: products per "
                   "eigenvalue, max-iter x k in all [default: 1000]. Unconverged values are flagged.")
@click.option("--params", "params", default=None, metavar="GLOB",
              help="Only parameters whose names match (comma-separated globs, e.g. 'layer1.*'): that block's spectrum.")
@click.option("--weight-decay", "weight_decay", type=common.FloatRange(min=0, hint="e.g. --weight-decay 5e-4"),
              default=0.0, show_default=True,
              help="Add wd/2*||w||^2 to the loss (shifts every eigenvalue by +wd).")
@click.option("--trace", is_flag=True, help="Also estimate the trace (Hutchinson and Hutch++, with standard errors).")
@click.option("--trace-probes", "trace_probes",
              type=common.IntRange(min=3, hint="Hutch++ splits the probes in three, e.g. --trace-probes 30"),
              default=30, show_default=True,
              help="Probes of each trace estimator.")
@click.option("--density", is_flag=True, help="Also compute the spectral density (stochastic Lanczos quadrature).")
@click.option("--density-runs", "density_runs", type=common.IntRange(min=1, hint="e.g. --density-runs 4"), default=4,
              show_default=True, help="SLQ random start vectors.")
@click.option("--density-steps", "density_steps", type=common.IntRange(min=2, hint="e.g. --density-steps 64"),
              default=64, show_default=True, help="SLQ Lanczos steps per run.")
@click.option("--mc-seed", "mc_seed", type=int, default=None, metavar="S",
              help="Seed of the fixed dropout mask of each batch (MC-dropout models) [default: --seed].")
@click.option("--warm-start/--no-warm-start", "warm_start", default=True, show_default=True,
              help="lanczos, --scope batch: start every batch after the first from the first batch's top "
                   "eigenvectors (the batches' top eigenspaces overlap: fewer products). Each batch's values "
                   "depend only on it and the first batch, so resumed and torchrun runs give the same file "
                   "(the first batch is solved again, unstored, when a run does not compute it).")
@click.option("--save-vectors", "save_vectors", is_flag=True, default=False,
              help="Also store each Hessian's converged eigenvectors, per parameter name, with the model's "
                   "fingerprint: `lt surface MODEL --directions OUT.h5[:ROW]` then slices the loss along them.")
@click.option("--vector-dtype", "vector_dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Storage of --save-vectors (float32: half the file; the surface "
                                      "renormalises the directions).")
@click.option("--sub-batch", "sub_batch", default="auto", show_default=True, metavar="N|auto|whole",
              help="Samples processed together in each Hessian-vector product. The Hessian is the same; smaller "
                   "pieces lower the peak memory (auto: 32 on a CPU, about a quarter less memory at batch 128 and "
                   "no loss of speed; whole batches on a GPU).")
@common.shard_option("batches (--scope batch)")
@common.precision_options(compile_option=False, hessian=True)
@common.device_option
@common.seed_option
@common.output_option
@common.plot_option
def command(models, arch, model_factory, trust_pickle, labels, data_spec, split, samples, batch_size, n_batches,
            scope, top_k, which, method, tol, max_iter, params, weight_decay, trace, trace_probes, density,
            density_runs, density_steps, mc_seed, warm_start, save_vectors, vector_dtype, sub_batch, shard_spec,
            precision, device, seed, output, overwrite, plot_path):
    """Top-k Hessian eigenvalues of each MODEL's loss, per mini-batch or for all the data.

    The loss is the mean cross-entropy in eval mode (BatchNorm running statistics); MC-dropout models
    use one fixed, seeded dropout mask per batch, and every Hessian is checked to be a fixed matrix
    before it is solved. Each eigenvalue comes with its certificate (a bound on its relative error),
    its residual ||Hv - lambda v|| / |lambda| and a converged flag. With --scope batch every finished batch is saved at once: an interrupted run
    continues where it stopped when the same command is run again. Several models go into one file,
    one group each; the figure overlays them.

    Under torchrun the processes share the work: --scope batch gives each process every N-th batch;
    --scope dataset gives each process every N-th batch of the one Hessian and adds up every
    Hessian-vector product over the processes, so the result equals a one-process run.
    --shard I/N (--scope batch) computes every N-th batch's Hessian from batch I into its own file
    and `lt merge` joins the files into the one-process file, bit for bit.
    --precision bf16/fp16 runs the forward pass of the loss under autocast (an approximation;
    the default fp32 is exact).

    \b
    Example:
      lt hessian smooth.pt                       # writes smooth.hessian.h5
      lt hessian plain.pt smooth.pt --batches 20 -o hessian.h5 --plot hessian.png
      lt hessian smooth.pt --scope dataset --samples 2048 --top-k 10 --trace -o full.h5
      lt hessian smooth.pt --params 'layer4.*' --which SA --batches 4 -o layer4.h5
      lt hessian smooth.pt --scope dataset --save-vectors -o top.h5 && lt surface smooth.pt --directions top.h5 --dims 1
      lt hessian smooth.pt --batches 20 --shard 0/3   # smooth.hessian.shard0of3.h5; ... 1/3 2/3, then:
      lt merge smooth.hessian.shard*.h5 -o hessian.h5
    """
    from landscape_tools import hessian as H
    from landscape_tools.device import resolve_device
    from landscape_tools.streaming import batch_sizes
    from landscape_tools.errors import ConfigError

    options = H.HessianOptions(k=top_k, which=which, method=method, tol=tol, max_iter=max_iter, params=params,
                               weight_decay=weight_decay, mc_seed=seed if mc_seed is None else mc_seed, scope=scope,
                               seed=seed, trace=trace, trace_probes=trace_probes, density=density,
                               density_runs=density_runs, density_steps=density_steps, precision=precision,
                               sub_batch=sub_batch, warm_start=warm_start,
                               save_vectors=vector_dtype if save_vectors else None)
    shard = common.parse_shard(shard_spec, "hessian")
    if shard is not None and scope == "dataset":
        raise ConfigError(f"--shard {shard_spec} with --scope dataset: every product of the one Hessian needs every "
                          f"batch, so independent jobs cannot share it; use --scope batch, or share the products "
                          f"between the ranks of one torchrun / srun job")
    from landscape_tools.engine import shard_suffix
    output = common.resolve_output(output, overwrite, models, "hessian", shard_suffix(shard))
    dev = resolve_device(device)
    # under torchrun: one process per GPU / CPU worker, each computing every WORLD-th batch
    # (--scope dataset: each forming the products of every WORLD-th batch, all-reduced)
    from landscape_tools import distributed
    ctx = distributed.init(dev)
    click.get_current_context().call_on_close(lambda: distributed.destroy(ctx))
    dev = ctx.device

    loaded = common.load_models(models, arch, model_factory, trust_pickle, labels, device=dev)
    jobs, described = [], {}
    for model, info, data in common.data_for_models(loaded, data_spec, split, samples, batch_size, seed, dev):
        batches = data.batches()
        if n_batches is not None and n_batches > len(batches):
            raise ConfigError(f"--batches {n_batches} asks for more batches than there are: the {len(data)} samples of "
                              f"the {split} split of {data.spec} make {len(batches)} batch(es) of --batch-size "
                              f"{batch_size}; use --batches {len(batches)} or --batches all")
        batches = batches[:n_batches] if n_batches else batches
        described[info.label] = data.describe()
        jobs.append(H.HessianJob(info.label, model, info, batches))

    config = common.dump_config(models=list(models), data=data_spec, split=split, samples=samples,
                                batch_size=batch_size, batches=n_batches, scope=scope, top_k=top_k,
                                which=options.which, method=method, tol=tol, max_iter=max_iter, params=params,
                                weight_decay=weight_decay, trace=trace, trace_probes=trace_probes, density=density,
                                density_runs=density_runs, density_steps=density_steps, mc_seed=options.mc_seed,
                                sub_batch=options.sub_batch, precision=options.precision, device=str(dev), seed=seed,
                                warm_start=warm_start, shard=shard_spec, save_vectors=options.save_vectors)
    first = jobs[0]
    rows = len(first.batches) if scope == "batch" else 1
    if ctx.is_main:
        common.info_line(f"hessian: {len(jobs)} model(s) x {rows} Hessian(s) of "
                         f"{'one batch' if scope == 'batch' else 'all batches'}"
                         f" ({sum(batch_sizes(first.batches))} samples, {split}), top-{top_k} {options.which} "
                         f"by {method}, {dev}"
                         f"{'' if options.precision == 'fp32' else f', {options.precision} forward passes'}"
                         f"{_sharing(scope, ctx.world_size) if ctx.distributed else ''}")
        if options.precision != "fp32":
            common.info_line(f"warning: --precision {options.precision} runs the loss's forward pass in "
                             f"{options.precision}; "
                             f"the Hessian is approximate (use fp32, the default, for exact eigenvalues)")
    data_description = described if len(set(map(str, described.values()))) > 1 else described[first.label]
    H.run_job(ctx, jobs, output, options, shard=shard, overwrite=overwrite, config=config, device=str(dev),
              data_description=data_description,
              progress=common.ProgressBar("hessian", quiet=not ctx.is_main))
    if not ctx.is_main:
        return
    _summary(output)
    if plot_path:
        common.render_plot([output], plot_path)


def _sharing(scope: str, world: int) -> str:
    if scope == "batch":
        return f", batches shared by {world} ranks"
    return f", batches shared by {world} ranks (every Hessian-vector product all-reduced)"


def _summary(path) -> None:
    from landscape_tools import store
    from landscape_tools.hessian import summary

    res = store.read_result(path)
    for label, node in res.models.items():
        click.echo(summary(label, node.data["eigenvalues"], node.attrs.get("which", "LM"), node.data["converged"]))
