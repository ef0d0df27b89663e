"""`lt train`: train a zoo model and write a native checkpoint."""
from __future__ import annotations

import click

from . import common


def _parse_filter(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 1,2,1") from None
    return values


def _parse_milestones(ctx, param, text):
    if text is None:
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of whole epochs, e.g. 60,120,160") from None


@click.command("train")
@click.argument("arch")
@click.option("--data", "data_spec", default="digits", show_default=True, metavar="SPEC",
              help="digits | cifar10:DIR | cifar100:DIR | imagefolder:DIR | tensors:FILE.")
@click.option("--samples", type=common.COUNT_OR_ALL, default=None, metavar="N|all",
              help="Train on a seeded subset of N samples; more than the split has is an error [default: all].")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True, help="Peak learning rate (SGD, Nesterov momentum).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True)
@click.option("--step-size", type=click.IntRange(min=1), default=30, show_default=True,
              help="Epochs per step (step schedule without --milestones).")
@click.option("--milestones", default=None, callback=_parse_milestones, metavar="E1,E2,...",
              help="Step schedule: multiply the learning rate by --gamma at these epochs (the paper: 60,120,160); "
                   "replaces --step-size.")
@click.option("--gamma", type=float, default=0.1, show_default=True,
              help="Factor of each step of the step schedule (the paper: 0.2).")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=1, show_default=True,
              help="Epochs of linear learning-rate warm-up from 0 to --lr before the schedule (0: none).")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random translations (and flips with --flip) of image data.")
@click.option("--translate", type=click.IntRange(min=0), default=2, show_default=True, metavar="PIXELS",
              help="Random translations of up to PIXELS in each direction (zero-pad, random crop; CIFAR "
                   "practice: 4).")
@click.option("--flip", is_flag=True, help="Also random horizontal flips (not for digits).")
@click.option("--width", type=click.IntRange(min=1), default=64, show_default=True, help="Base channel count (paper: 64).")
@click.option("--stem", type=click.Choice(["cifar", "imagenet"]), default="cifar", show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="MC-dropout probability of _mcdo models (default 0.3; AlexNet 0.1).")
@click.option("--smoothing", type=click.Choice(["tanh", "relu6", "sigmoid", "softmax", "scaling", "none"]),
              default="tanh", show_default=True, help="Prob kind of _smoothing models.")
@click.option("--tau", type=common.FloatRange(min=0, min_open=True, hint="a temperature such as --tau 10"),
              default=None, help="Smoothing temperature (default per kind).")
@click.option("--blur-filter", default="1,1", show_default=True, help="1-D blur filter, e.g. 1,2,1.")
@click.option("--pad-mode", type=click.Choice(["constant", "replicate", "reflect"]), default="constant", show_default=True)
@common.device_option
@common.seed_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="MODEL.pt")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint.")
def command(arch, data_spec, samples, epochs, batch_size, lr, weight_decay, momentum, schedule, step_size, milestones,
            gamma, warmup_epochs, augment, translate, flip, width, stem, dropout, smoothing, tau, blur_filter, pad_mode, device, seed, output, overwrite):
    """Train a zoo model (ARCH, see `lt info --zoo`) and save a checkpoint.

    MC dropout stays active during training; the test split's NLL and accuracy (one deterministic
    pass) and the options are stored in the checkpoint's meta, with the data spec, so later
    analyses use the same data by default.

    \b
    Example:
      lt train resnet_mcdo_smoothing_18 --width 16 --data digits --epochs 15 -o smooth.pt
      lt train vgg_dnn_11 --data cifar10:~/data --width 32 --epochs 100 --flip -o vgg.pt
      # the paper's ResNet-18 / CIFAR-100 recipe (examples/paper/reproduce.sh runs all four models)
      lt train resnet_mcdo_smoothing_18 --data cifar100:~/data --epochs 200 --batch-size 128 --lr 0.1 \\
          --weight-decay 5e-4 --warmup-epochs 1 --schedule step --milestones 60,120,160 --gamma 0.2 \\
          --flip --translate 4 -o smooth.pt
    """
    import time
    from pathlib import Path

    import torch

    from landscape_tools.checkpoints import save_checkpoint
    from landscape_tools.data import absolute_spec, load_data
    from landscape_tools.device import is_out_of_memory, out_of_memory_error, resolve_device
    from landscape_tools.errors import CheckpointError, ConfigError
    from landscape_tools.models import UnknownArchitecture, build_model, parse_name
    from landscape_tools.training import TrainConfig, train

    try:
        parse_name(arch)
    except UnknownArchitecture as exc:
        raise ConfigError(str(exc)) from None
    # every option is checked before any data is read
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, momentum=momentum,
                      schedule=schedule, step_size=step_size, milestones=milestones, gamma=gamma,
                      warmup_epochs=warmup_epochs, augment=augment, flip=flip, pad=translate, seed=seed)
    cfg.validate()
    sfilter = _parse_filter(blur_filter)
    if Path(output).exists() and not overwrite:
        raise CheckpointError(f"{output} already exists; pass --overwrite to replace it or choose another -o")
    dev = resolve_device(device)
    train_ds = load_data(data_spec, "train", samples=samples, seed=seed, batch_size=batch_size, device=dev)
    in_channels = int(train_ds.x.shape[1]) if train_ds.x.dim() == 4 else 3
    torch.manual_seed(seed)  # the initial weights depend on --seed only
    try:
        model = build_model(arch, num_classes=train_ds.num_classes, in_channels=in_channels, width=width, stem=stem,
                            dropout=dropout, smoothing=smoothing, tau=tau, sfilter=sfilter,
                            pad_mode=pad_mode).to(dev)
    except ValueError as exc:  # bad smoothing options (tau <= 0, a filter summing to zero...)
        raise ConfigError(str(exc)) from None
    try:
        test_ds = load_data(data_spec, "test", batch_size=256, in_channels=in_channels, device=dev)
    except Exception as exc:  # a tensors file without a test split: train anyway, say so
        common.info_line(f"no test split ({exc}); test metrics are skipped")
        test_ds = None
    n_params = sum(p.numel() for p in model.parameters())
    common.info_line(f"training {arch} ({n_params:,} parameters) on {data_spec} ({len(train_ds)} samples) on {dev}")
    start = time.monotonic()
    try:
        result = train(model, train_ds, test_ds, cfg, progress=common.ProgressBar("train"))
    except Exception as exc:
        if is_out_of_memory(exc):    # one Error: line naming the knob, not a traceback
            raise out_of_memory_error(exc, "train", dev) from None
        raise
    meta = {"dataset": absolute_spec(data_spec), "input_shape": list(train_ds.x.shape[1:]), "num_classes": train_ds.num_classes,
            "normalisation": train_ds.normalisation, "epochs": epochs, "train": cfg.__dict__,
            "history": result.history, "metrics": {"test": result.test}, "seconds": round(time.monotonic() - start, 1),
            "train_samples": len(train_ds), "sample_indices": train_ds.describe()["indices"]}
    save_checkpoint(output, model.cpu(), arch, model.arch_kwargs, meta, overwrite=overwrite)
    test = result.test
    summary = f"test accuracy {test['accuracy']:.4f}, NLL {test['nll']:.4f}; " if test else ""
    click.echo(f"{output}: {arch}, {summary}{result.seconds:.0f} s")
