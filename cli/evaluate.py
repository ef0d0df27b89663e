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
@common.precision_options()
@common.device_option
@common.seed_option
@common.output_option
@common.plot_option
def command(models, arch, model_factory, trust_pickle, labels, mc, data_spec, split, samples, batch_size, max_batch,
            precision, compile_model, device, seed, output, overwrite, plot_path):
    """Predictive metrics of MC-dropout ensembles of N samples, for every N in --mc.

    For each N the prediction is the mean softmax of N stochastic forward passes (eval mode,
    BatchNorm on running statistics, every dropout on): NLL (probabilities clamped at 1e-12),
    accuracy, ECE (10 equal-width confidence bins), Brier score, and a reliability diagram.
    Larger N reuse the samples of smaller N, and several MC samples run in one forward pass
    (stacked along the batch, each with its own masks; --max-batch bounds the rows). A model
    without dropout gives the same prediction for every N (said in the output). The result file
    holds one group per model; a table per model is printed.

    Under torchrun (same command line) each process takes every WORLD-th batch on its own device
    (cuda:LOCAL_RANK, or CPU with gloo); the per-batch sums are all-reduced and rank 0 writes the
    same file as one process would.

    \b
    Example:
      lt evaluate smooth.pt                      # writes smooth.evaluate.h5
      lt evaluate plain.pt smooth.pt --mc 1,2,5,10,20,50 -o evaluate.h5 --plot evaluate.png
      lt evaluate smooth.pt --data cifar100:~/data --samples 2000 --device cuda --precision bf16 -o eval.h5
      lt evaluate smooth.pt --data imagefolder:~/imagenet --image-size 224 --data-memory 8GiB --device cuda -o in.h5
      torchrun --nproc-per-node 4 -m landscape_tools.cli.main evaluate smooth.pt --device cuda -o eval.h5
    """
    from pathlib import Path

    from landscape_tools import distributed, store
    from landscape_tools.device import resolve_device
    from landscape_tools.evaluate import ensemble_curve, parse_ensemble_sizes
    from landscape_tools.plotting import check_figure_path

    sizes = parse_ensemble_sizes(mc)
    if plot_path:
        check_figure_path(plot_path)
    output = common.resolve_output(output, overwrite, models, "evaluate")
    dev = resolve_device(device)
    ctx = distributed.init(dev)          # under torchrun: one process per GPU / CPU worker; else a group of one
    click.get_current_context().call_on_close(lambda: distributed.destroy(ctx))
    dev = ctx.device
    say = common.info_line if ctx.is_main else (lambda message: None)
    loaded = common.load_models(models, arch, model_factory, trust_pickle, labels, device=dev)
    nodes, tables, notes = {}, [], []
    shared = f", batches shared by {ctx.world_size} ranks" if ctx.distributed else ""
    for model, info, ds in common.data_for_models(loaded, data_spec, split, samples, batch_size, seed, dev):
        say(f"evaluating {info.label} ({info.arch}) on {ds.spec} {split} ({len(ds)} samples), "
            f"N = {','.join(map(str, sizes))}, on {dev}, {precision}{' compiled' if compile_model else ''}{shared}")
        curve = ensemble_curve(model, ds.batches(), sizes, seed=seed, precision=precision,
                               compile_model=compile_model, ctx=ctx, max_batch=max_batch,
                               progress=common.ProgressBar(f"evaluate {info.label}", quiet=not ctx.is_main))
        data = ds.describe()
        attrs = dict(info.describe(), split=split, data_spec=ds.spec, precision=precision,
                     compiled=bool(compile_model),
                     data=common.dump_config(**{k: v for k, v in data.items() if k != "indices"}))
        node = curve.to_node(attrs)
        if data["indices"] is not None:
            node["data"]["sample_indices"] = (data["indices"], {"description": f"indices into the {split} split "
                                                                              f"(seed {ds.sample_seed})"})
        nodes[info.label] = node
        tables.append(_table(info.label, curve))
        if curve.note:
            notes.append(f"note: {info.label}: {curve.note}")
    config = common.dump_config(models=list(models), labels=labels, mc=list(sizes), data=data_spec, split=split,
                                samples=samples, batch_size=batch_size, max_batch=max_batch, device=str(dev), seed=seed,
                                arch=arch, model=model_factory, precision=precision, compile=bool(compile_model))
    error = None
    if ctx.is_main:
        try:
            root = store.provenance("evaluate", config=config, seed=seed, device=str(dev))
            root = {k: str(v) if isinstance(v, str) else v for k, v in root.items()}  # torch.__version__: str subclass
            store.write_result(output, root, nodes, overwrite=overwrite)
        except Exception as exc:
            error = exc
    if ctx.distributed:              # rank 0 may fail to write: then every rank fails
        failed = distributed.all_ok(ctx, error is None)
        if error is None and failed:
            raise distributed.RankFailed(f"rank 0 could not write {output} (see its message)")
    if error is not None:
        raise error
    if not ctx.is_main:
        return
    for table in tables:
        click.echo(table)
    for note in notes:
        common.info_line(note)
    common.info_line(f"result written to {Path(output)}")
    if plot_path:
        common.render_plot([output], plot_path)


def _table(label: str, curve) -> str:
    mode = "MC dropout" if curve.mc_active else "deterministic (no MC dropout)"
    lines = [f"{label}: {mode}, {curve.num_samples} samples",
             f"{'N':>5}  {'NLL':>8}  {'accuracy':>8}  {'ECE':>8}  {'Brier':>8}"]
    for i, n in enumerate(curve.sizes):
        lines.append(f"{int(n):>5}  {curve.nll[i]:8.4f}  {curve.accuracy[i]:8.4f}  {curve.ece[i]:8.4f}  "
                     f"{curve.brier[i]:8.4f}")
    return "\n".join(lines)
