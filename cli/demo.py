"""`lt demo`: train two small models on the built-in digits data and run every analysis on them."""
from __future__ import annotations

import click

from . import common


@click.command("demo")
@click.option("-o", "--output", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              metavar="DIR", help="Folder for the checkpoints, result files, figures and report.md.")
@click.option("--quick", is_flag=True, help="A tiny configuration (seconds; meaningless numbers) to check the "
                                            "installation and the pipeline.")
@click.option("--overwrite", is_flag=True, help="Recompute everything and replace a finished demo in DIR.")
@common.device_option
@common.seed_option
def command(out_dir, quick, overwrite, device, seed):
    """Train ResNet-18s with MC dropout, with and without spatial smoothing, on the built-in digits
    data, then run evaluate, hessian, surface and featvar on both and write a report.

    DIR receives mcdo.pt and smooth.pt (native checkpoints), evaluate.h5, hessian.h5, surface.h5
    and featvar.h5 (one group per model, the same files the commands write), six png figures, and
    report.md: the key numbers side by side and, for each claim of Park & Kim (2022), whether it
    showed up on this data. The same --seed gives the same numbers. About 2.5 minutes on 2 idle
    CPU cores (6 when they are shared with other jobs). A folder holding a finished demo
    (report.md) is refused without --overwrite; the outputs of an interrupted demo with the same
    options are reused, so running the same command again continues where it stopped.

    \b
    Example:
      lt demo -o demo-out
      lt demo --quick -o /tmp/demo-check --seed 1
    """
    import time

    from landscape_tools.demo import DemoConfig, check_output_dir, run_demo
    from landscape_tools.device import resolve_device

    check_output_dir(out_dir, overwrite)
    dev = resolve_device(device)
    cfg = DemoConfig.quick(seed) if quick else DemoConfig.full(seed)
    common.info_line(f"lt demo ({cfg.name} configuration, seed {seed}) into {out_dir}/ on {dev}")
    start = time.monotonic()
    result = run_demo(out_dir, cfg, device=dev, overwrite=overwrite, log=common.info_line,
                      progress_for=common.ProgressBar)
    for claim in result.claims:
        click.echo(f"{claim['verdict']:>5}  {claim['claim']}: {claim['evidence']}")
    if result.reused:
        click.echo(f"reused from an earlier run: {', '.join(result.reused)}")
    click.echo(f"{result.report} written ({len(result.figures)} figures, "
               f"{len(result.results)} result files) in {time.monotonic() - start:.0f} s")
