"""`lt info`: summarise a result file or a checkpoint, or list the model zoo."""
from __future__ import annotations

import json

import click



def _fmt(value, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _show_result(path: str) -> None:
    from landscape_tools.store import describe

    d = describe(path)
    attrs = d["attrs"]
    click.echo(f"{path}: landscape-tools {attrs.get('kind')} result (format_version {attrs.get('format_version')})")
    for key in ("created", "generated_by", "command", "device", "seed", "torch_version"):
        if key in attrs:
            click.echo(f"  {key}: {_fmt(attrs[key])}")
    if attrs.get("config"):
        click.echo(f"  config: {_fmt(attrs['config'], 300)}")
    for label, model in d["models"].items():
        a = model["attrs"]
        if attrs.get("kind") == "compare":
            # a comparison's groups are pairs of models, not models
            click.echo(f"  comparison {label}: " + ", ".join(f"{k} {_fmt(v, 60)}" for k, v in sorted(a.items())))
        else:
            click.echo(f"  model {label}: {a.get('arch', '?')}, {a.get('num_params', '?')} parameters, "
                       f"checkpoint {a.get('checkpoint', '?')}")
        for name, shape in model["data"].items():
            click.echo(f"    {name}: {shape}")
        for name in model["groups"]:
            click.echo(f"    {name}/")


def _show_checkpoint(path: str, arch, model_factory, trust_pickle) -> None:
    from landscape_tools.checkpoints import load_checkpoint

    model, info = load_checkpoint(path, arch=arch, model=model_factory, trust_pickle=trust_pickle)
    click.echo(f"{path}: {info.kind} checkpoint of {info.arch}, {info.num_params:,} parameters")
    click.echo(f"  sha256: {info.sha256}")
    if info.arch_kwargs:
        click.echo(f"  arch_kwargs: {_fmt(info.arch_kwargs, 300)}")
    spec = getattr(model, "zoo_spec", None)
    if spec is not None:
        click.echo(f"  MC dropout: {'yes' if spec.mc else 'no'}; spatial smoothing: "
                   f"{', '.join(spec.smoothing_layers) if spec.smoothing else 'none'}")
        click.echo(f"  stages: {', '.join(spec.stages)}")
    meta = info.meta
    if meta:
        click.echo(f"  dataset: {meta.get('dataset', 'not recorded')}; input shape {meta.get('input_shape', '?')}; "
                   f"{meta.get('num_classes', '?')} classes")
        test = (meta.get("metrics") or {}).get("test")
        if test:
            click.echo(f"  test accuracy {test['accuracy']:.4f}, NLL {test['nll']:.4f} ({test['samples']} samples)")
        if "epochs" in meta:
            click.echo(f"  trained {meta['epochs']} epochs in {meta.get('seconds', '?')} s")


@click.command("info")
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--zoo", is_flag=True, help="List the model zoo's architecture names.")
@click.option("--arch", default=None, metavar="NAME", help="Zoo architecture for a bare state_dict.")
@click.option("--model", "model_factory", default=None, metavar="PKG.MOD:FACTORY",
              help="Factory of a user model for a bare state_dict, or torchvision:NAME.")
@click.option("--trust-pickle", is_flag=True, help="Allow whole pickled modules (runs code from the file!).")
def command(paths, zoo, arch, model_factory, trust_pickle):
    """Summarise result files (.h5) and checkpoints, or list the zoo.

    For a result file: its kind, provenance (command, config, seed, device, versions) and
    each model's arrays. For a checkpoint: its kind, architecture, parameter count, sha256,
    the data it was trained on and its test metrics.

    \b
    Example:
      lt info --zoo
      lt info smooth.pt
      lt info hessian.h5 surface.h5
    """
    from landscape_tools.errors import ConfigError

    if zoo:
        from landscape_tools.models import list_models
        for name in list_models():
            click.echo(name)
        return
    if not paths:
        raise ConfigError("give a result file or checkpoint to describe, or --zoo to list the architectures")
    for path in paths:
        if path.lower().endswith((".h5", ".hdf5")):
            _show_result(path)
        else:
            _show_checkpoint(path, arch, model_factory, trust_pickle)
