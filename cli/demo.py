"""`lt demo`: train two small models on the built-in digits data and run every analysis on them."""
from __future__ import annotations

import click

from . import common


@click.command("demo")
@click.option("-o", "--output", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              metavar="DIR", help="Folder for the checkpoints, result files, figures and report.md.")
@click.option("--quick", is_flag=True, help="A tiny configuration (seconds; meaningless numbers) to check the "
                                            "installation and the pipeline.")
@click.option("--seeds", type=click.IntRange(min=1), default=None, metavar="S",
              help="Training seeds per model (--seed, --seed + 1, ...), each into DIR/seed<S>/; the report's "
                   "verdicts come from `lt compare` across them (one seed: no verdict across training runs). "
                   "[default: 3 for the full demo (3 x ~2.5 minutes on 2 idle CPU cores), 1 with --quick]")
@click.option("--overwrite", is_flag=True, help="Recompute everything and replace a finished demo in DIR.")
@common.device_option
@common.seed_option
def command(out_dir, quick, seeds, overwrite, device, seed):
    """Train ResNet-18s with MC dropout, with and without spatial smoothing, on the built-in digits
    data, then run evaluate, hessian, surface and featvar on both and write a report.

    For each seed, its folder (DIR itself with one seed, DIR/seed<S>/ with several) receives
    mcdo.pt and smooth.pt (native checkpoints), evaluate.h5, hessian.h5, surface.h5 and
    featvar.h5 (one group per model, the same files the commands write), compare.h5 (`lt compare`
    of the two models within that run), seven png figures, and report.md: the key numbers side by
    side and the paper's claims with the differences and their 95% intervals. With several seeds,
    DIR/compare.h5 compares them across seeds (Welch t on per-seed values) and DIR/report.md gives
    each claim a verdict from it; one seed gets "one seed: no verdict across training runs". The
    same --seed gives the same numbers on the same machine and software. About 2.5 minutes per
    seed on 2 idle CPU cores (6 when they are shared with other jobs). A folder holding a finished
    demo (report.md) is refused without --overwrite; the outputs of an interrupted demo with the
    same options are reused, so running the same command again continues where it stopped.

    \b
    Example:
      lt demo -o demo-out                         # 3 seeds per model
      lt demo --seeds 1 -o demo-one               # one seed: numbers and intervals, no verdicts
      lt demo --quick -o /tmp/demo-check --seed 1
    """
    import time

    from landscape_tools.demo import DEFAULT_SEEDS, DemoConfig, check_output_dir, run_demo
    from landscape_tools.device import resolve_device

    check_output_dir(out_dir, overwrite)
    dev = resolve_device(device)
    cfg = DemoConfig.quick(seed) if quick else DemoConfig.full(seed)
    if seeds is None:
        seeds = 1 if quick else DEFAULT_SEEDS
    which = f"seed {seed}" if seeds == 1 else f"seeds {seed}..{seed + seeds - 1}"
    common.info_line(f"lt demo ({cfg.name} configuration, {which}) into {out_dir}/ on {dev}")
    start = time.monotonic()
    result = run_demo(out_dir, cfg, device=dev, overwrite=overwrite, log=common.info_line,
                      progress_for=common.ProgressBar, seeds=seeds)
    for claim in result.claims:
        click.echo(f"{claim['claim']}: {claim['verdict']}\n    {claim['evidence']}")
    if result.reused:
        click.echo(f"reused from an earlier run: {', '.join(result.reused)}")
    click.echo(f"{result.report} written ({len(result.figures)} figures, "
               f"{len(result.results)} result files) in {time.monotonic() - start:.0f} s")
