"""Options and helpers every command shares, so `--device`, `--seed`, `-o` look the same everywhere."""
from __future__ import annotations

import json
import sys
import time
from typing import Sequence

import click

from landscape_tools.errors import ConfigError, DataError


def _compose(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


class CountOrAll(click.ParamType):
    """A whole number >= 1, or ``all`` (None: everything there is)."""

    name = "count"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip().lower()
        if text == "all":
            return None
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is not a whole number >= 1 or 'all' (e.g. {param.opts[0] if param else ''} 100).",
                      param, ctx)
        return number


COUNT_OR_ALL = CountOrAll()


class _Hinted:
    """A click range that refuses NaN and infinity too, and adds what the option means to its message."""

    def __init__(self, *args, hint: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.hint = hint

    def convert(self, value, param, ctx):
        import math
        try:
            rv = super().convert(value, param, ctx)
            if isinstance(rv, float) and not math.isfinite(rv):
                self.fail(f"{value!r} is not a finite number.", param, ctx)
        except click.BadParameter as exc:
            if not self.hint:
                raise
            self.fail(f"{exc.message.rstrip('.')} ({self.hint}).", param, ctx)
        return rv


class IntRange(_Hinted, click.IntRange):
    """``click.IntRange`` with a ``hint`` for its error message."""


class FloatRange(_Hinted, click.FloatRange):
    """``click.FloatRange`` with a ``hint`` for its error message; NaN and infinity are refused."""


def model_arguments(f):
    """``MODELS...`` plus how to build a model from a bare state_dict, and the pickle opt-in."""
    return _compose(
        click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False)),
        click.option("--arch", default=None, metavar="NAME",
                     help="Zoo architecture for bare state_dicts (see `lt info --zoo`)."),
        click.option("--model", "model_factory", default=None, metavar="PKG.MOD:FACTORY",
                     help="Factory of a user model for bare state_dicts, or torchvision:NAME."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow checkpoints that are whole pickled modules (runs code from the file!)."),
        click.option("--labels", default=None, metavar="A,B,...",
                     help="Labels of the models in results and figures (default: file stems)."),
    )(f)


def data_options(split: str = "train", batch_size: int = 128):
    """``--data --split --samples --batch-size`` with a command's own defaults."""
    return _compose(
        click.option("--data", "data_spec", default=None, metavar="SPEC",
                     help="digits | cifar10:DIR | cifar100:DIR | imagefolder:DIR | tensors:FILE "
                          "(default: the data set recorded in the checkpoint)."),
        click.option("--split", type=click.Choice(["train", "test"]), default=split, show_default=True,
                     help="Which split to use."),
        click.option("--samples", type=COUNT_OR_ALL, default=None, metavar="N|all",
                     help="Use a seeded random subset of N samples (indices are stored); more than the split "
                          "has is an error [default: all]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=batch_size, show_default=True,
                     help="Mini-batch size."),
        click.option("--image-size", type=click.IntRange(min=1), default=None, metavar="N", expose_value=False,
                     callback=_remember("image_size"),
                     help="imagefolder data: resize every image's shorter side to N pixels and centre-crop "
                          "N x N (e.g. --image-size 224 for ImageNet) [default: images as stored, all of the "
                          "first image's size]."),
        click.option("--data-memory", default=None, metavar="SIZE", expose_value=False,
                     callback=_remember("data_memory"),
                     help="Data whose decoded inputs fit in SIZE (e.g. 2GiB, 500MB; 0 streams everything) is "
                          "loaded onto the device once (fastest); larger data is streamed batch by batch "
                          "through DataLoader workers, each process reading only its batches. The numbers do "
                          "not depend on it [default: $LT_DATA_MEMORY, else 2GiB]."),
    )


#: where the data options without a parameter of their own are kept (``click.Context.meta``)
DATA_META = "landscape_tools.data_options"


def _remember(name: str):
    """A click callback keeping an option's value in the context for :func:`load_data_for`, so every
    command gets the option without a parameter of its own."""
    def callback(ctx, param, value):
        if name == "data_memory" and value is not None:
            from landscape_tools.streaming import parse_memory
            try:
                value = parse_memory(value)
            except ConfigError as exc:
                raise click.BadParameter(str(exc).replace("--data-memory ", "", 1), ctx, param) from None
        ctx.meta.setdefault(DATA_META, {})[name] = value
        return value
    return callback


def data_loading_options() -> dict:
    """``--image-size`` and ``--data-memory`` of the running command (None when not given)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.meta.get(DATA_META, {}) if ctx is not None else {}
    return {"image_size": found.get("image_size"), "memory": found.get("data_memory")}


device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA when present), cpu, cuda or cuda:N.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
output_option = _compose(
    click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), metavar="OUT.h5",
                 help="Result file (HDF5) [default: MODEL.COMMAND.h5 in the working folder, from the first "
                      "MODEL's name, e.g. smooth.hessian.h5]."),
    click.option("--overwrite", is_flag=True, help="Replace an existing result file."),
)
required_output_option = _compose(
    click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="OUT.h5",
                 help="Result file (HDF5)."),
    click.option("--overwrite", is_flag=True, help="Replace an existing result file."),
)


class CompileMode(click.Choice):
    """``auto``, ``on`` or ``off``; a bare ``--compile`` is ``on``, and a value that is none of them (a
    model path after a bare ``--compile``) is refused with that hint."""

    def __init__(self):
        super().__init__(["auto", "on", "off"], case_sensitive=False)

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not one of auto, on, off (a bare --compile means on: write --compile on, "
                      f"or put --compile after the models).", param, ctx)


def precision_options(compile_option: bool = True, hessian: bool = False, compile_modes: bool = False):
    """``--precision fp32|bf16|fp16`` (autocast of the forward pass) and, unless ``compile_option`` is
    False, ``--compile`` (torch.compile).  Passes ``precision`` (str) and ``compile_model``: a bool, or
    with ``compile_modes`` ``auto`` (the default) / ``on`` / ``off`` (a bare ``--compile`` is ``on``)."""
    note = (" Hessians are computed in full precision unless you ask for less." if hessian else
            " Losses and statistics are always accumulated in full precision.")
    # fp16 stays a choice of lt hessian so that its refusal comes with the reason and the alternatives
    choices = ["fp32", "tf32", "bf16", "fp16"]
    decorators = [click.option("--precision", type=click.Choice(choices), default="fp32",
                               show_default=True,
                               help="Arithmetic of the model's forward pass: fp32 (TF32 off on GPUs), tf32 (TF32 "
                                    "matmuls and convolutions), or torch.autocast to bf16/fp16"
                                    + (" (fp16 is refused for Hessians: it underflows)" if hessian else "")
                                    + " (for GPUs; see GPU notes)." + note)]
    if compile_option and compile_modes:
        decorators.append(click.option("--compile", "compile_model", type=CompileMode(), is_flag=False,
                                       flag_value="on", default="auto", show_default=True,
                                       help="torch.compile the forward pass: auto compiles when the run is long "
                                            "enough to pay for the one-off compilation (else, or when compiling "
                                            "fails, it runs eagerly and says why); a bare --compile is on."))
    elif compile_option:
        decorators.append(click.option("--compile", "compile_model", is_flag=True,
                                       help="torch.compile the model (pays a one-off compilation; helps on "
                                            "long GPU runs)."))
    return _compose(*decorators)



def _check_plot(ctx, param, value):
    """A bad ``--plot`` path is refused while the options are read, not after the analysis."""
    if value is not None:
        from landscape_tools.plotting import check_figure_path
        check_figure_path(value)     # its ConfigError is the same `Error:` line as `lt plot -o` gives
    return value


plot_option = click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), metavar="FIG.png",
                           callback=_check_plot,
                           help="Also draw the result (png, pdf or svg); `lt plot` redraws it later.")


def split_labels(labels: str | None, paths: Sequence[str]) -> list[str | None]:
    if labels is None:
        return [None] * len(paths)
    parts = [s.strip() for s in labels.split(",")]
    if len(parts) != len(paths) or not all(parts):
        raise ConfigError(f"--labels {labels!r} has {len(parts)} labels for {len(paths)} models; give one each")
    return parts


def load_models(paths: Sequence[str], arch: str | None, model_factory: str | None, trust_pickle: bool,
                labels: str | None = None, device=None):
    """Load every checkpoint -> list of ``(model, info)`` on ``device``; labels made unique."""
    from landscape_tools.checkpoints import load_checkpoint

    out, seen = [], set()
    for path, label in zip(paths, split_labels(labels, paths)):
        model, info = load_checkpoint(path, arch=arch, model=model_factory, trust_pickle=trust_pickle, label=label)
        base, k = info.label, 2
        while info.label in seen:
            info.label = f"{base}_{k}"
            k += 1
        seen.add(info.label)
        if device is not None:
            model = model.to(device)
        report_mc_sampling(model, info.label)
        out.append((model, info))
    return out


def report_mc_sampling(model, label: str) -> None:
    """Say on stderr (first process only under torchrun) which dropout modules MC sampling switches on
    in ``model``, or that it has none: ``lt evaluate: LABEL: MC sampling switches on ...``."""
    import os

    from landscape_tools.models import describe_sampling

    if os.environ.get("RANK", "0") != "0":
        return
    ctx = click.get_current_context(silent=True)
    prefix = f"lt {ctx.info_name}: " if ctx is not None and ctx.parent is not None else ""
    info_line(f"{prefix}{label}: {describe_sampling(model)}")


def model_in_channels(model) -> int | None:
    """The input channels a model expects (first conv), or None when it has none."""
    import torch.nn as nn
    kwargs = getattr(model, "arch_kwargs", None)
    if kwargs and "in_channels" in kwargs:
        return int(kwargs["in_channels"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def load_data_for(info, model, data_spec: str | None, split: str, samples: int | None, batch_size: int, seed: int,
                  device, dtype=None):
    """Resolve the data of an analysis: ``--data`` or the data set recorded in the checkpoint."""
    import torch

    from landscape_tools.data import load_data

    spec = data_spec or info.dataset
    if spec is None:
        raise DataError(f"{info.path} does not record the data set it was trained on; pass --data SPEC "
                        f"(digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR, tensors:FILE)")
    ds = load_data(spec, split=split, samples=samples, seed=seed, batch_size=batch_size,
                   in_channels=model_in_channels(model), device=device, dtype=dtype or torch.float32,
                   **data_loading_options())
    check_data_fits(model, info, ds)
    return ds


def check_data_fits(model, info, ds) -> None:
    """A forward pass of one sample: wrong shapes, non-image data and out-of-range labels are errors."""
    import torch

    param = next(model.parameters(), None)
    x = ds.sample_input(1)
    x = x if param is None or not x.is_floating_point() else x.to(param.dtype)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        raise DataError(f"data {ds.spec!r} (inputs of shape {tuple(ds.input_shape)}) does not fit {info.label} "
                        f"({info.arch}): {str(exc).splitlines()[0]}. Use data shaped as the model was trained on") from None
    if out.dim() != 2:
        raise DataError(f"{info.label} returns outputs of shape {tuple(out.shape)}; expected (batch, classes) logits")
    n_out = int(out.shape[1])
    top = int(ds.y.max())
    if top >= n_out:
        raise DataError(f"labels of {ds.spec!r} go up to {top} but {info.label} has {n_out} outputs; "
                        f"use data with labels 0..{n_out - 1} or a model with num_classes >= {top + 1}")


def dump_config(**options) -> dict:
    """JSON-safe copy of resolved options for the ``config`` attribute."""
    return json.loads(json.dumps(options, default=str))


#: set by the Ctrl-C / SIGTERM handler to the signal's number: a KeyboardInterrupt that CPython swallowed
#: (one raised inside a weakref or garbage-collector callback is printed and dropped) is raised again at the
#: next progress report
_interrupted = 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm at a time limit or a preemption, ``kill``, ``scancel``): unwinds like Ctrl-C, so the
    current unit is finished or dropped, the ``.partial`` file stays resumable and the lock is released;
    ``lt`` then exits with status 143 (128 + 15)."""


def _on_sigint(signum, frame):
    """Ctrl-C raises KeyboardInterrupt (every time it is pressed); SIGTERM raises :class:`Terminated`
    once (a second SIGTERM while the run is already stopping only keeps the flag, so the clean-up that
    releases the lock is not cut short)."""
    import signal
    global _interrupted
    if signum == signal.SIGTERM:
        first = _interrupted != signal.SIGTERM
        _interrupted = signal.SIGTERM
        if first:
            raise Terminated
        return
    if not _interrupted:
        _interrupted = signum or signal.SIGINT
    raise KeyboardInterrupt


def install_interrupt_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and SIGTERM raises :class:`Terminated`; both also set a
    flag :class:`ProgressBar` checks.  A signal that is ignored or handled by someone else (e.g. a
    background job's SIGINT, an embedding program) is left alone."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigint)


def interrupt_exit_status() -> int:
    """The exit status of an interrupted run: 143 after SIGTERM, 130 after Ctrl-C."""
    import signal
    return 128 + signal.SIGTERM if _interrupted == signal.SIGTERM else 130


def check_interrupted() -> None:
    """Raise KeyboardInterrupt (:class:`Terminated` after SIGTERM) when a signal arrived, even if its first
    exception was lost."""
    import signal
    if _interrupted == signal.SIGTERM:
        raise Terminated
    if _interrupted:
        raise KeyboardInterrupt


SHARD_HELP = ("--shard slurm, in a Slurm array job, means --shard $((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))"
              "/$SLURM_ARRAY_TASK_COUNT: array task k of a contiguous --array=LO-HI computes shard k - LO.")


def shard_option(units: str):
    """``--shard I/N`` of every analysis (parsed by :func:`parse_shard`); ``units`` names what is split."""
    return click.option("--shard", "shard_spec", default=None, metavar="I/N",
                        help=f"Compute only shard I of N (from 0: {units} I, I+N, I+2N, ...) into its own file "
                             f"(default MODEL.<command>.shardIofN.h5); `lt merge` assembles the N files into the "
                             f"file one process writes. In a Slurm job array, --shard slurm is this array task's "
                             f"shard. Not with torchrun / srun ranks (they already share the {units}).")


def parse_shard(spec: str | None, command: str):
    """``(i, n)`` of ``--shard I/N`` (None when not given); refused under torchrun / srun ranks."""
    if spec is None:
        return None
    from landscape_tools import distributed
    from landscape_tools.engine import parse_shard as parse
    shard = parse(spec)
    if distributed.launched():
        raise ConfigError(f"--shard {spec} cannot be combined with torchrun or srun ranks: the ranks already share "
                          f"the work of lt {command} (drop --shard, or start one process per shard)")
    return shard


def slurm_array_shard() -> tuple[int, int]:
    """``(i, n)`` of ``--shard slurm``: this array task's position in its Slurm job array.

    ``i = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` and
    ``n = SLURM_ARRAY_TASK_COUNT``, so ``--array=1-8`` gives shards 0/8 .. 7/8 like ``--array=0-7``.

    Raises:
        ConfigError: not in an array job, or an array that is not evenly spaced (e.g. ``--array=1,4,5``).
    """
    import os

    def value(name, default=None):
        text = os.environ.get(name, "").strip()
        if not text:
            if default is not None:
                return default
            raise ConfigError(f"--shard slurm needs {name}, which Slurm sets in the tasks of a job array; submit "
                              f"with `sbatch --array=0-N` or give the shard yourself: --shard I/N")
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--shard slurm: {name}={text!r} is not a whole number") from None

    task, count = value("SLURM_ARRAY_TASK_ID"), value("SLURM_ARRAY_TASK_COUNT")
    low, step = value("SLURM_ARRAY_TASK_MIN", 0), value("SLURM_ARRAY_TASK_STEP", 1)
    offset = task - low
    if step < 1 or offset % step or not 0 <= offset // step < count:
        raise ConfigError(f"--shard slurm: array task {task} (SLURM_ARRAY_TASK_MIN={low}, STEP={step}, "
                          f"COUNT={count}) is not one of {count} evenly spaced tasks; submit a contiguous array "
                          f"(--array=0-{max(count - 1, 0)}) or give the shard yourself: --shard I/N")
    return offset // step, count


def resolve_shard_args(args: Sequence[str], option: str = "--shard") -> list[str]:
    """A command line with ``--shard slurm`` (or ``--shard=slurm``) replaced by this array task's
    ``--shard I/N`` (:func:`slurm_array_shard`), said once on stderr; other lines are returned as they are."""
    out, i, args = [], 0, list(args)
    while i < len(args):
        a = args[i]
        if a == "--":
            out.extend(args[i:])
            break
        if a == option and i + 1 < len(args) and args[i + 1].strip().lower() == "slurm":
            out.extend([option, _announce_slurm_shard()])
            i += 2
            continue
        if a.startswith(option + "=") and a.split("=", 1)[1].strip().lower() == "slurm":
            out.append(f"{option}={_announce_slurm_shard()}")
        else:
            out.append(a)
        i += 1
    return out


def _announce_slurm_shard() -> str:
    i, n = slurm_array_shard()
    info_line(f"lt: --shard slurm is --shard {i}/{n} (array task {i + 1} of {n})")
    return f"{i}/{n}"


class ProgressBar:
    """``progress(done, total, message)`` drawn on stderr: one redrawn line on a terminal, and
    occasional plain lines (at most every ``interval`` seconds) in a batch log.

    The time left is estimated from the pace since the first report of finished work, so a slow
    first unit (a ``--compile`` compilation, a retained graph being built) or units found done by
    a resumed run do not inflate it; until a second unit finishes it is the plain average."""

    def __init__(self, title: str, stream=None, interval: float = 10.0, quiet: bool = False):
        self.title, self.stream, self.interval, self.quiet = title, stream or sys.stderr, interval, quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.last = -1e9
        self.last_done = None
        self.first: tuple[float, int] | None = None   # (time, done) of the first report with done > 0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        check_interrupted()
        if self.quiet:
            return
        now = time.monotonic()
        if self.first is None and done > 0:
            self.first = (now, done)
        final = total > 0 and done >= total
        if not final and now - self.last < (0.2 if self.tty else self.interval):
            return
        self.last = now
        elapsed = now - self.start
        pct = f"{100.0 * done / total:5.1f}%" if total else ""
        eta = ""
        if total and 0 < done < total:
            since, at = self.first
            pace = (now - since) / (done - at) if done > at else elapsed / done
            eta = f" eta {_fmt_seconds(pace * (total - done))}"
        line = f"{self.title}: {done}/{total} {pct} {_fmt_seconds(elapsed)}{eta} {message}".rstrip()
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def info_line(message: str) -> None:
    """Status text goes to stderr so stdout stays parseable."""
    click.echo(message, err=True)


def ensure_output_ok(output: str, overwrite: bool) -> None:
    """Refuse an existing output before any work is done."""
    from landscape_tools.store import check_writable
    check_writable(output, overwrite)


def default_output(models: Sequence[str], command: str, suffix: str = "") -> str:
    """``<first model's stem>.<command>[suffix].h5`` in the working folder (``smooth.pt`` -> ``smooth.hessian.h5``)."""
    from pathlib import Path
    return f"{Path(models[0]).stem}.{command}{suffix}.h5"


def resolve_output(output: str | None, overwrite: bool, models: Sequence[str], command: str,
                   suffix: str = "") -> str:
    """The result file: ``-o``, or :func:`default_output` (its name said on stderr, by the first process
    only under torchrun). Either is refused when it exists and ``overwrite`` is not set, before any work."""
    import os

    chosen = output if output is not None else default_output(models, command, suffix)
    ensure_output_ok(chosen, overwrite)
    if output is None and os.environ.get("RANK", "0") == "0":
        info_line(f"lt {command}: writing {chosen} (-o chooses another file)")
    return chosen


def render_plot(result_paths: Sequence[str], plot_path: str, kind: str | None = None, **options) -> None:
    """Every `--plot` goes through the same code as `lt plot`."""
    from landscape_tools.plotting import render
    render(list(result_paths), plot_path, kind=kind, **options)
    info_line(f"figure written to {plot_path}")


def data_for_models(loaded, data_spec: str | None, split: str, samples: int | None, batch_size: int, seed: int,
                    device):
    """The data of each loaded model, loaded once per (spec, input channels) and checked against every model.

    Returns a list of ``(model, info, DataSet)`` in the order of ``loaded``.
    """
    cache, out = {}, []
    for model, info in loaded:
        key = (data_spec or info.dataset, model_in_channels(model))
        if key not in cache:
            cache[key] = load_data_for(info, model, data_spec, split, samples, batch_size, seed, device)
        else:
            check_data_fits(model, info, cache[key])
        out.append((model, info, cache[key]))
    return out
