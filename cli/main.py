"""The ``lt`` command group.  Commands are imported lazily so ``lt --help`` stays fast."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from landscape_tools import __version__

#: command name -> module in landscape_tools.cli defining ``command``
COMMANDS = {
    "train": "train",
    "info": "info",
    "evaluate": "evaluate",
    "hessian": "hessian",
    "surface": "surface",
    "merge": "merge",
    "featvar": "featvar",
    "plot": "plot",
    "import-gl": "import_gl",
    "export": "export",
    "demo": "demo",
    "compare": "compare",
}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; library errors become ``Error:`` lines."""

    def list_commands(self, ctx):
        return [name for name, mod in COMMANDS.items() if self._available(mod)]

    @staticmethod
    def _available(mod: str) -> bool:
        return importlib.util.find_spec(f"landscape_tools.cli.{mod}") is not None

    def get_command(self, ctx, name):
        mod = COMMANDS.get(name)
        if mod is None or not self._available(mod):
            return None
        return importlib.import_module(f"landscape_tools.cli.{mod}").command

    def resolve_command(self, ctx, args):
        """The command, with ``--shard slurm`` resolved to this Slurm array task's ``--shard I/N``."""
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and any("--shard" in getattr(p, "opts", ()) for p in cmd.params):
            from landscape_tools.cli.common import resolve_shard_args
            rest = resolve_shard_args(rest)
        return name, cmd, rest

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            rows.append((name, cmd.get_short_help_str(limit=formatter.width - 20)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        from landscape_tools.errors import LTError
        from landscape_tools.cli.common import install_interrupt_handler, interrupt_exit_status
        install_interrupt_handler()
        try:
            _adopt_slurm_step()
            return super().invoke(ctx)
        except LTError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            status = interrupt_exit_status()
            what = "terminated (SIGTERM)" if status == 143 else "interrupted"
            click.echo(f"\nError: {what}. No half-written result file is left; surface, hessian and featvar "
                       "keep their progress in OUT.h5.partial and resume when run again.", err=True)
            sys.exit(status)
        except Exception as exc:
            from landscape_tools.device import is_out_of_memory, out_of_memory_error
            if is_out_of_memory(exc):
                raise click.ClickException(str(out_of_memory_error(exc, ctx.invoked_subcommand))) from None
            raise


def _adopt_slurm_step() -> None:
    """``srun -n N lt ...`` (no torchrun): the tasks become ranks 0..N-1 of one job (see
    :func:`landscape_tools.distributed.adopt_slurm_environment`); torch is imported only then."""
    import os
    if os.environ.get("SLURM_PROCID", "").strip() and not os.environ.get("RANK", "").strip():
        from landscape_tools.distributed import adopt_slurm_environment
        adopt_slurm_environment()


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="lt")
def cli():
    """landscape-tools: loss-landscape geometry and feature-map stability of neural networks.

    Hessian eigen-spectra, loss-surface slices, feature-map variance across MC-dropout samples and
    predictive metrics for the spatial-smoothing model zoo and any PyTorch model. Every result is an
    HDF5 file with full provenance; `lt plot` draws any of them.

    \b
    Example:
      lt train resnet_mcdo_smoothing_18 --width 16 --data digits -o smooth.pt
      lt hessian smooth.pt --batches 4 -o hessian.h5 --plot hessian.png
      lt info hessian.h5

    \b
    On a cluster: `srun -n N lt ...` (or torchrun) shares one run between N processes; in a Slurm
    job array, `lt hessian|surface|featvar|evaluate ... --shard slurm` computes this task's shard (SLURM_ARRAY_TASK_ID -
    SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT) and `lt merge` joins the shards. SIGTERM (a time
    limit, a preemption) stops like Ctrl-C with exit status 143 and the run resumes when started
    again, on any node: a lock whose heartbeat is older than LT_LOCK_STALE_AFTER seconds (120) is
    taken over.
    """


def main(argv=None):
    cli.main(args=argv, prog_name="lt")


if __name__ == "__main__":
    main()
