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
@common.shard_option("data batches")
@common.precision_options()
@common.device_option
@common.seed_option
@common.output_option
@common.plot_option
def command(models, arch, model_factory, trust_pickle, labels, mc, data_spec, split, samples, batch_size, max_batch,
            corrupt, shard_spec, precision, compile_model, device, seed, output, overwrite, plot_path):
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
    (cuda:LOCAL_RANK, or CPU with gloo) into a rank file; rank 0 merges the per-batch sums and
    writes the same file as one process would. --shard I/N scores every N-th batch from batch I
    into its own file and `lt merge` joins the shards into that same file, bit for bit. Scored
    batches are kept in OUT.h5.partial: an interrupted run resumes when the same command is run again.

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
      lt evaluate smooth.pt --shard 0/2; lt evaluate smooth.pt --shard 1/2   # smooth.evaluate.shard0of2.h5, ...
      lt merge smooth.evaluate.shard*.h5 -o smooth.evaluate.h5
    """
    from landscape_tools import distributed, store
    from landscape_tools.device import resolve_device
    from landscape_tools.engine import shard_suffix
    from landscape_tools.errors import ConfigError
    from landscape_tools.evaluate import EvaluateOptions, Job, ensemble_curve, run_to_file
    from landscape_tools.plotting import check_figure_path
    from landscape_tools import corruptions as C
    from landscape_tools.data import CIFAR_C_KINDS, parse_spec

    options = EvaluateOptions(sizes=mc, seed=seed, precision=precision, compile=compile_model, max_batch=max_batch)
    sizes = options.sizes
    shard = common.parse_shard(shard_spec, "evaluate")
    pairs = C.parse_corruptions(corrupt) if corrupt else None
    published = data_spec is not None and parse_spec(data_spec)[0] in CIFAR_C_KINDS
    if published and split != "test":
        raise click.UsageError(f"--data {data_spec} holds corrupted test images only; drop --split {split}")
    if shard is not None and plot_path:
        raise ConfigError(f"--plot with --shard {shard_spec}: a shard holds only some batches' sums; plot the merged "
                          f"file (lt merge ... -o OUT.h5 --plot FIG.png)")
    what = "--corrupt" if pairs else f"--data {data_spec}"
    if (pairs or published) and shard is not None:
        raise ConfigError(f"{what} with --shard {shard_spec}: corrupted sets are scored whole in one process; "
                          f"drop --shard (or shard the clean evaluation alone, without {what})")
    if plot_path:
        check_figure_path(plot_path)
    output = common.resolve_output(output, overwrite, models, "evaluate", shard_suffix(shard))
    dev = resolve_device(device)
    ctx = distributed.init(dev)          # under torchrun: one process per GPU / CPU worker; else a group of one
    click.get_current_context().call_on_close(lambda: distributed.destroy(ctx))
    dev = ctx.device
    if (pairs or published) and ctx.distributed:
        raise ConfigError(f"{what} under torchrun / srun ({ctx.world_size} ranks): corrupted sets are scored whole "
                          f"in one process; run it as one process, or without {what}")
    say = common.info_line if ctx.is_main else (lambda message: None)
    loaded = common.load_models(models, arch, model_factory, trust_pickle, labels, device=dev)

    def score(model, info, ds, what=""):
        return ensemble_curve(model, ds.batches(), sizes, seed=seed, precision=options.precision,
                              compile_model=options.compile, max_batch=options.max_batch,
                              progress=common.ProgressBar(f"evaluate {info.label}{what}", quiet=not ctx.is_main))

    config = common.dump_config(models=list(models), labels=labels, mc=list(sizes), data=data_spec, split=split,
                                samples=samples, batch_size=batch_size, max_batch=max_batch, device=str(dev), seed=seed,
                                arch=arch, model=model_factory, precision=options.precision, compile=bool(compile_model),
                                corrupt=[f"{n}:{s}" for n, s in pairs] if pairs else None, shard=shard_spec)
    root = store.provenance("evaluate", config=config, seed=seed, device=str(dev))
    if published:
        _published_run(loaded, data_spec, split, samples, batch_size, seed, dev, pairs, sizes,
                       options.precision, options.compile, score, root, output, overwrite, plot_path)
        return
    jobs, robust_tables = [], []
    shared = f", batches shared by {ctx.world_size} ranks" if ctx.distributed else ""
    shared += f", shard {shard[0]}/{shard[1]}" if shard is not None else ""
    for model, info, ds, robust in _data_and_corruptions(loaded, data_spec, split, samples, batch_size, seed, dev,
                                                          pairs, False, score):
        say(f"evaluating {info.label} ({info.arch}) on {ds.spec} {split} ({len(ds)} samples), "
            f"N = {','.join(map(str, sizes))}, on {dev}, {options.precision}"
            f"{' compiled' if options.compile else ''}{shared}"
            f"{f', {robust.count} corrupted sets' if robust is not None else ''}")
        groups = {}
        if robust is not None:          # scored first, whole (not resumable); the clean batches resume
            robust = robust.evaluate()
            groups["corruptions"] = robust.to_node()
            robust_tables.append(_corruption_table(info.label, robust))
        data = ds.describe()
        attrs = dict(info.describe(), split=split, data_spec=ds.spec, precision=options.precision,
                     compiled=options.compile,
                     data=common.dump_config(**{k: v for k, v in data.items() if k != "indices"}))
        extra = {}
        if data["indices"] is not None:
            extra["sample_indices"] = (data["indices"], {"description": f"indices into the {split} split "
                                                                       f"(seed {ds.sample_seed})"})
        description = dict(data, corrupt=[f"{n}:{s}" for n, s in pairs] if pairs else None)
        jobs.append(Job(info.label, model, attrs, ds.batches(), extra, description, groups=groups))
    run_to_file(jobs, output, root, options, overwrite=overwrite, ctx=ctx, shard=shard,
                progress=common.ProgressBar("evaluate", quiet=not ctx.is_main))
    if not ctx.is_main:
        return
    if shard is not None:
        click.echo(f"shard {shard[0]}/{shard[1]} written to {output}; `lt merge` joins the {shard[1]} shards")
        return
    _report(output, robust_tables, plot_path)


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


def _published_run(loaded, data_spec, split, samples, batch_size, seed, dev, pairs, sizes, precision, compile_model,
                   score, root, output, overwrite, plot_path) -> None:
    """--data cifar100c:DIR / cifar10c:DIR: every published set scored whole in one process; the
    top-level arrays of each model are all its sets pooled (the folder has no clean images)."""
    from landscape_tools import corruptions as C
    from landscape_tools import store

    nodes, tables = {}, []
    for model, info, ds, robust in _data_and_corruptions(loaded, data_spec, split, samples, batch_size, seed, dev,
                                                          pairs, True, score):
        common.info_line(f"evaluating {info.label} ({info.arch}) on {robust.count} corrupted sets of {data_spec} "
                         f"({len(ds)} samples each), N = {','.join(map(str, sizes))}, on {dev}, {precision}"
                         f"{' compiled' if compile_model else ''}")
        robust = robust.evaluate()
        curve = C.pool_curves(list(robust.curves.values()))
        data = ds.describe()
        data["num_samples"] = curve.num_samples
        data["normalisation"] = {k: v for k, v in data["normalisation"].items() if k != "corruption"}
        attrs = dict(info.describe(), split=split, data_spec=ds.spec, precision=precision,
                     compiled=bool(compile_model),
                     data=common.dump_config(**{k: v for k, v in data.items() if k != "indices"}))
        node = curve.to_node(attrs)
        if data["indices"] is not None:
            node["data"]["sample_indices"] = (data["indices"], {"description": f"indices into each corrupted set "
                                                                              f"(the same in every set) (seed "
                                                                              f"{ds.sample_seed})"})
        node.setdefault("groups", {})["corruptions"] = robust.to_node()
        node["attrs"]["note"] = (f"top-level arrays: all {len(robust.curves)} corrupted sets of {ds.spec} pooled "
                                 f"(the clean split is not part of the folder)" + (f"; {curve.note}" if curve.note else ""))
        nodes[info.label] = node
        tables.append(_corruption_table(info.label, robust))
    root = {k: str(v) if isinstance(v, str) else v for k, v in root.items()}   # torch.__version__: a str subclass
    store.write_result(output, root, nodes, overwrite=overwrite)
    _report(output, tables, plot_path)


def _report(output, extra_tables, plot_path) -> None:
    """Print each model's table from the written file (and its note), then ``extra_tables``; draw ``--plot``."""
    from pathlib import Path

    from landscape_tools import store

    res = store.read_result(output)
    for label, node in res.models.items():
        click.echo(_table(label, node))
        if node.attrs.get("note"):
            common.info_line(f"note: {label}: {node.attrs['note']}")
    for table in extra_tables:
        click.echo(table)
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
