"""Timing helpers shared by the benchmark scripts: wall and CPU clocks, and `lt` run in this process."""
from __future__ import annotations

import contextlib
import io
import sys
import time


def clock() -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def best_of(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return min(a[0], b[0]), min(a[1], b[1])


def run_lt(args: list[str]) -> tuple[float, float]:
    """`lt ...` in this process; returns (wall, CPU) seconds it took (stdout / stderr swallowed)."""
    from landscape_tools.cli.main import cli

    out, err = io.StringIO(), io.StringIO()
    start = clock()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(args, standalone_mode=False)
        except Exception:
            sys.__stderr__.write(err.getvalue())
            raise
    return since(start)
