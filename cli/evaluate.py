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
@click.option("--corrupt", "corrupt", multiple=True, metavar="NAME[:SEVERITY]|all",
              help="Also score the data corrupted CIFAR-C style, generated from the clean split (seeded by --seed): "
                   "NAME at severities 1-5, NAME:SEVERITY at one (1..5), 'all' every corruption at 1-5 "
                   "(repeatable, or comma-separated). NAME: gaussian_noise, shot_noise, impulse_noise, "
                   "speckle_noise, gaussian_blur, defocus_blur, contrast, brightness, pixelate. With --data "
                   "cifar100c:DIR / cifar10c:DIR it picks the published files' sets instead (default there: all).")
@common.precision_options()
@common.device_option
@common.seed_option
@common.output_option
@common.plot_option
def command(models, arch, model_factory, trust_pickle, labels, mc, data_spec, split, samples, batch_size, max_batch,
            corrupt, precision, compile_model, device, seed, output, overwrite, plot_path):
    """Predictive metrics of MC-dropout ensembles of N samples, for every N in --mc.

    For each N the prediction is the mean softmax of N stochastic forward passes (eval mode,
    BatchNorm on running statistics, every dropout on): NLL (probabilities clamped at 1e-12),
    accuracy, ECE (10 equal-width confidence bins), Brier score, and a reliability diagram.
    Larger N reuse the samples of smaller N, and several MC samples run in one forward pass
    (stacked along the batch, each with its own masks; --max-batch bounds the rows). A model
    without dropout gives the same prediction for every N (said in the output). The result file
    holds one group per model; a table per model is printed.

    --corrupt scores CIFAR-C-style corruptions of the data too (generated from the clean images in
    [0, 1] pixel space, seeded, severities 1-5), and --data cifar100c:DIR / cifar10c:DIR the published
    corrupted files: one row per severity and column per N in the group corruptions/<name>/ of each
    model (`lt plot --kind corruption` draws them against severity).

    Under torchrun (same command line) each process takes every WORLD-th batch on its own device
    (cuda:LOCAL_RANK, or CPU with gloo); the per-batch sums are all-reduced and rank 0 writes the
    same file as one process would.

    \b
    Example:
      lt evaluate smooth.pt                      # writes smooth.evaluate.h5
      lt evaluate plain.pt smooth.pt --mc 1,2,5,10,20,50 -o evaluate.h5 --plot evaluate.png
      lt evaluate smooth.pt --data cifar100:~/data --samples 2000 --device cuda --precision bf16 -o eval.h5
      lt evaluate smooth.pt --data imagefolder:~/imagenet --image-size 224 --data-memory 8GiB --device cuda -o in.h5
      lt evaluate plain.pt smooth.pt --corrupt all -o robust.h5    # + 9 corruptions x severities 1-5
      lt evaluate smooth.pt --corrupt gaussian_noise:3 --corrupt contrast -o robust.h5
      lt evaluate smooth.pt --data cifar100c:~/data/CIFAR-100-C -o c.h5   # the published corrupted files
      lt plot robust.h5 --kind corruption -o robust.png                  # NLL / accuracy / ECE vs severity
      torchrun --nproc-per-node 4 -m landscape_tools.cli.main evaluate smooth.pt --device cuda -o eval.h5
    """
    from pathlib import Path

    from landscape_tools import distributed, store
    from landscape_tools.device import resolve_device
    from landscape_tools.evaluate import ensemble_curve, parse_ensemble_sizes
    from landscape_tools import corruptions as C
    from landscape_tools.data import CIFAR_C_KINDS, parse_spec
    from landscape_tools.plotting import check_figure_path

    sizes = parse_ensemble_sizes(mc)
    pairs = C.parse_corruptions(corrupt) if corrupt else None
    published = data_spec is not None and parse_spec(data_spec)[0] in CIFAR_C_KINDS
    if published and split != "test":
        raise click.UsageError(f"--data {data_spec} holds corrupted test images only; drop --split {split}")
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

    def score(model, info, ds, what=""):
        return ensemble_curve(model, ds.batches(), sizes, seed=seed, precision=precision,
                              compile_model=compile_model, ctx=ctx, max_batch=max_batch,
                              progress=common.ProgressBar(f"evaluate {info.label}{what}", quiet=not ctx.is_main))

    for model, info, ds, robust in _data_and_corruptions(loaded, data_spec, split, samples, batch_size, seed, dev,
                                                          pairs, published, score):
        say(f"evaluating {info.label} ({info.arch}) on {ds.spec} {split} ({len(ds)} samples), "
            f"N = {','.join(map(str, sizes))}, on {dev}, {precision}{' compiled' if compile_model else ''}{shared}"
            f"{f', {robust.count} corrupted sets' if robust is not None else ''}")
        curve = None if published else score(model, info, ds)
        if robust is not None:
            robust = robust.evaluate()
        if published:
            curve = C.pool_curves(list(robust.curves.values()))
        data = ds.describe()
        if published:
            data["num_samples"] = curve.num_samples
            data["normalisation"] = {k: v for k, v in data["normalisation"].items() if k != "corruption"}
        attrs = dict(info.describe(), split=split, data_spec=ds.spec, precision=precision,
                     compiled=bool(compile_model),
                     data=common.dump_config(**{k: v for k, v in data.items() if k != "indices"}))
        node = curve.to_node(attrs)
        if data["indices"] is not None:
            where = "each corrupted set (the same in every set)" if published else f"the {split} split"
            node["data"]["sample_indices"] = (data["indices"], {"description": f"indices into {where} "
                                                                              f"(seed {ds.sample_seed})"})
        if robust is not None:
            node.setdefault("groups", {})["corruptions"] = robust.to_node()
            if published:
                node["attrs"]["note"] = (f"top-level arrays: all {len(robust.curves)} corrupted sets of {ds.spec} "
                                         f"pooled (the clean split is not part of the folder)"
                                         + (f"; {curve.note}" if curve.note else ""))
        nodes[info.label] = node
        tables.append(_table(info.label, curve))
        if robust is not None:
            tables.append(_corruption_table(info.label, robust))
        if curve.note:
            notes.append(f"note: {info.label}: {curve.note}")
    config = common.dump_config(models=list(models), labels=labels, mc=list(sizes), data=data_spec, split=split,
                                samples=samples, batch_size=batch_size, max_batch=max_batch, device=str(dev), seed=seed,
                                arch=arch, model=model_factory, precision=precision, compile=bool(compile_model),
                                corrupt=[f"{n}:{s}" for n, s in pairs] if pairs else None)
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


class _Generated:
    """The generated corruptions of one model's clean data, scored on ``evaluate()`` (after the clean curve)."""

    def __init__(self, model, info, ds, pairs, seed, score):
        from landscape_tools import corruptions as C

        C.pixel_stats(ds)               # data of unknown pixel scale: refused before any work
        self.model, self.info, self.ds, self.pairs, self.seed, self.score = model, info, ds, pairs, seed, score
        self.count = len(pairs)

    def evaluate(self):
        from landscape_tools import corruptions as C

        return C.evaluate_corruptions(self.ds, self.pairs, lambda d, n, s: self.score(self.model, self.info, d,
                                                                                        f" {n}:{s}"), self.seed)


class _Published:
    """The sets of a cifar10c:DIR / cifar100c:DIR folder for one model: the first read and checked at once
    (``first``), every set read and scored on ``evaluate()``."""

    def __init__(self, model, info, spec, pairs, samples, seed, batch_size, dev, score):
        from landscape_tools import corruptions as C

        self.model, self.info, self.spec, self.seed, self.score = model, info, spec, seed, score
        self.args = (samples, seed, batch_size, common.model_in_channels(model), dev)
        self.pairs, sets = C.cifar_c_sets(spec, pairs, *self.args)
        _, _, self.first = next(sets)
        common.check_data_fits(model, info, self.first)
        self.count = len(self.pairs)

    def evaluate(self):
        from landscape_tools import corruptions as C

        _, sets = C.cifar_c_sets(self.spec, self.pairs, *self.args)
        curves = {(name, severity): self.score(self.model, self.info, ds, f" {name}:{severity}")
                  for name, severity, ds in sets}
        return C.CorruptionResults(curves, self.spec, False, self.seed)


def _data_and_corruptions(loaded, data_spec, split, samples, batch_size, seed, dev, pairs, published, score):
    """``(model, info, DataSet, _Generated | _Published | None)`` per model: the clean data (generated
    corruptions or none) or the first published set."""
    if not published:
        for model, info, ds in common.data_for_models(loaded, data_spec, split, samples, batch_size, seed, dev):
            yield model, info, ds, (_Generated(model, info, ds, pairs, seed, score) if pairs else None)
        return
    for model, info in loaded:
        sets = _Published(model, info, data_spec, pairs, samples, seed, batch_size, dev, score)
        yield model, info, sets.first, sets


def _corruption_table(label: str, robust) -> str:
    lines = [f"{label}: corrupted data ({'generated from the clean split' if robust.clean else robust.source}), "
             f"largest N",
             f"{'corruption':<16} {'sev':>3}  {'N':>4}  {'NLL':>8}  {'accuracy':>8}  {'ECE':>8}"]
    for (name, severity), curve in robust.curves.items():
        lines.append(f"{name:<16} {severity:>3}  {int(curve.sizes[-1]):>4}  {curve.nll[-1]:8.4f}  "
                     f"{curve.accuracy[-1]:8.4f}  {curve.ece[-1]:8.4f}")
    return "\n".join(lines)


def _table(label: str, curve) -> str:
    mode = "MC dropout" if curve.mc_active else "deterministic (no MC dropout)"
    lines = [f"{label}: {mode}, {curve.num_samples} samples",
             f"{'N':>5}  {'NLL':>8}  {'accuracy':>8}  {'ECE':>8}  {'Brier':>8}"]
    for i, n in enumerate(curve.sizes):
        lines.append(f"{int(n):>5}  {curve.nll[i]:8.4f}  {curve.accuracy[i]:8.4f}  {curve.ece[i]:8.4f}  "
                     f"{curve.brier[i]:8.4f}")
    return "\n".join(lines)
