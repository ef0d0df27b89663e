"""`lt evaluate`: NLL, accuracy, ECE and Brier of MC-dropout ensembles of every size (the paper's curves)."""
from __future__ import annotations

import click

from . import common


@click.command("evaluate")
@common.model_arguments
@click.option("--mc", default="1,2,5,10,20,50", show_default=True, metavar="N1,N2,...",
              help="Ensemble sizes: numbers of MC-dropout samples averaged per prediction. "
                   "The sweep costs max(N) MC samples per batch (several per forward pass, see --max-batch).")
@common.data_options(split="test", batch_size=256)
@click.option("--max-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="At most N rows (MC copies x samples) per forward pass: the MC samples of a batch are "
                   "stacked along the batch dimension up to N rows, and a batch larger than N runs in "
                   "pieces of N rows (same masks; each piece redraws the batch's masks, so prefer a smaller "
                   "--batch-size). The numbers do not depend on it  [default: copies stacked up to 128 rows "
                   "on CPU, 4096 on CUDA; batches are not split]")
@common.shard_option("data batches")
@common.precision_options()
@common.device_option
@common.seed_option
@common.output_option
@common.plot_option
def command(models, arch, model_factory, trust_pickle, labels, mc, data_spec, split, samples, batch_size, max_batch,
            shard_spec, precision, compile_model, device, seed, output, overwrite, plot_path):
    """Predictive metrics of MC-dropout ensembles of N samples, for every N in --mc.

    For each N the prediction is the mean softmax of N stochastic forward passes (eval mode,
    BatchNorm on running statistics, every dropout on): NLL (probabilities clamped at 1e-12),
    accuracy, ECE (10 equal-width confidence bins), Brier score, and a reliability diagram.
    Larger N reuse the samples of smaller N, and several MC samples run in one forward pass
    (stacked along the batch, each with its own masks; --max-batch bounds the rows). A model
    without dropout gives the same prediction for every N (said in the output). The result file
    holds one group per model; a table per model is printed.

    Under torchrun (same command line) each process takes every WORLD-th batch on its own device
    (cuda:LOCAL_RANK, or CPU with gloo) into a rank file; rank 0 merges the per-batch sums and
    writes the same file as one process would. --shard I/N scores every N-th batch from batch I
    into its own file and `lt merge` joins the shards into that same file, bit for bit. Scored
    batches are kept in OUT.h5.partial: an interrupted run resumes when the same command is run again.

    \b
    Example:
      lt evaluate smooth.pt                      # writes smooth.evaluate.h5
      lt evaluate plain.pt smooth.pt --mc 1,2,5,10,20,50 -o evaluate.h5 --plot evaluate.png
      lt evaluate smooth.pt --data cifar100:~/data --samples 2000 --device cuda --precision bf16 -o eval.h5
      torchrun --nproc-per-node 4 -m landscape_tools.cli.main evaluate smooth.pt --device cuda -o eval.h5
      lt evaluate smooth.pt --shard 0/2; lt evaluate smooth.pt --shard 1/2   # smooth.evaluate.shard0of2.h5, ...
      lt merge smooth.evaluate.shard*.h5 -o smooth.evaluate.h5
    """
    from pathlib import Path

    from landscape_tools import distributed, store
    from landscape_tools.device import resolve_device
    from landscape_tools.engine import shard_suffix
    from landscape_tools.errors import ConfigError
    from landscape_tools.evaluate import Job, parse_ensemble_sizes, run_to_file
    from landscape_tools.plotting import check_figure_path

    sizes = parse_ensemble_sizes(mc)
    shard = common.parse_shard(shard_spec, "evaluate")
    if shard is not None and plot_path:
        raise ConfigError(f"--plot with --shard {shard_spec}: a shard holds only some batches' sums; plot the merged "
                          f"file (lt merge ... -o OUT.h5 --plot FIG.png)")
    if plot_path:
        check_figure_path(plot_path)
    output = common.resolve_output(output, overwrite, models, "evaluate", shard_suffix(shard))
    dev = resolve_device(device)
    ctx = distributed.init(dev)          # under torchrun: one process per GPU / CPU worker; else a group of one
    click.get_current_context().call_on_close(lambda: distributed.destroy(ctx))
    dev = ctx.device
    say = common.info_line if ctx.is_main else (lambda message: None)
    loaded = common.load_models(models, arch, model_factory, trust_pickle, labels, device=dev)
    jobs = []
    shared = f", batches shared by {ctx.world_size} ranks" if ctx.distributed else ""
    shared += f", shard {shard[0]}/{shard[1]}" if shard is not None else ""
    for model, info, ds in common.data_for_models(loaded, data_spec, split, samples, batch_size, seed, dev):
        say(f"evaluating {info.label} ({info.arch}) on {ds.spec} {split} ({len(ds)} samples), "
            f"N = {','.join(map(str, sizes))}, on {dev}, {precision}{' compiled' if compile_model else ''}{shared}")
        data = ds.describe()
        attrs = dict(info.describe(), split=split, data_spec=ds.spec, precision=precision,
                     compiled=bool(compile_model),
                     data=common.dump_config(**{k: v for k, v in data.items() if k != "indices"}))
        extra = {}
        if data["indices"] is not None:
            extra["sample_indices"] = (data["indices"], {"description": f"indices into the {split} split "
                                                                       f"(seed {ds.sample_seed})"})
        jobs.append(Job(info.label, model, attrs, ds.batches(), extra, data))
    config = common.dump_config(models=list(models), labels=labels, mc=list(sizes), data=data_spec, split=split,
                                samples=samples, batch_size=batch_size, max_batch=max_batch, device=str(dev), seed=seed,
                                arch=arch, model=model_factory, precision=precision, compile=bool(compile_model),
                                shard=shard_spec)
    root = store.provenance("evaluate", config=config, seed=seed, device=str(dev))
    run_to_file(jobs, output, root, sizes, seed=seed, precision=precision, compile_model=compile_model,
                max_batch=max_batch, overwrite=overwrite, ctx=ctx, shard=shard,
                progress=common.ProgressBar("evaluate", quiet=not ctx.is_main))
    if not ctx.is_main:
        return
    if shard is not None:
        click.echo(f"shard {shard[0]}/{shard[1]} written to {output}; `lt merge` joins the {shard[1]} shards")
        return
    res = store.read_result(output)
    for label, node in res.models.items():
        click.echo(_table(label, node))
        if node.attrs.get("note"):
            common.info_line(f"note: {label}: {node.attrs['note']}")
    common.info_line(f"result written to {Path(output)}")
    if plot_path:
        common.render_plot([output], plot_path)


def _table(label: str, node) -> str:
    """The printed table of one model's group of the result file."""
    mode = "MC dropout" if node.attrs.get("mc_active") else "deterministic (no MC dropout)"
    lines = [f"{label}: {mode}, {int(node.attrs['num_samples'])} samples",
             f"{'N':>5}  {'NLL':>8}  {'accuracy':>8}  {'ECE':>8}  {'Brier':>8}"]
    d = node.data
    for i, n in enumerate(d["n_samples"]):
        lines.append(f"{int(n):>5}  {d['nll'][i]:8.4f}  {d['accuracy'][i]:8.4f}  {d['ece'][i]:8.4f}  "
                     f"{d['brier'][i]:8.4f}")
    return "\n".join(lines)
