"""engine.run_units, the unit loop of surface and featvar: batched writes, progress, and on an
interrupt the finished units written, the unit in progress dropped, the exception passed on."""
import pytest

from landscape_tools import engine


def _loop(units, **kw):
    writes, reports = [], []
    done = engine.run_units(units, lambda u: u * u, lambda batch: writes.append(list(batch)),
                            progress=lambda d, t, m: reports.append((d, t, m)),
                            message=lambda u, v: f"unit {u}", **kw)
    return done, writes, reports


def test_units_are_written_in_batches_and_counted_from_the_units_found_done():
    done, writes, reports = _loop([3, 4, 5, 6, 7], done=2, total=7, every=2)
    assert done == 7
    assert writes == [[(3, 9), (4, 16)], [(5, 25), (6, 36)], [(7, 49)]]       # the last, short batch too
    assert reports == [(3, 7, "unit 3"), (4, 7, "unit 4"), (5, 7, "unit 5"), (6, 7, "unit 6"), (7, 7, "unit 7")]


def test_an_interrupt_inside_a_unit_keeps_the_finished_units_and_drops_that_one():
    writes = []
    with pytest.raises(KeyboardInterrupt):
        engine.run_units([0, 1, 2, 3], lambda u: (_ for _ in ()).throw(KeyboardInterrupt) if u == 2 else u,
                         lambda batch: writes.append(list(batch)), every=10)
    assert writes == [[(0, 0), (1, 1)]]


def test_an_interrupt_at_the_progress_call_comes_after_the_unit_is_written():
    writes = []

    def progress(done, total, message):
        if done == 2:
            raise KeyboardInterrupt          # as cli.common.check_interrupted after SIGINT / SIGTERM
    with pytest.raises(KeyboardInterrupt):
        engine.run_units([0, 1, 2], lambda u: u, lambda batch: writes.append(list(batch)), progress=progress)
    assert writes == [[(0, 0)], [(1, 1)]]


def test_a_failed_write_is_not_written_again():
    calls = []

    def write(batch):
        calls.append(list(batch))
        raise OSError("disk full")
    with pytest.raises(OSError):
        engine.run_units([0, 1], lambda u: u, write)
    assert calls == [[(0, 0)]]
