"""engine.run_units, the unit loop of every analysis: batched writes, progress, and on an
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


def test_hessian_rows_are_units_an_interrupted_row_is_dropped_and_the_resumed_file_equals_one_run(tmp_path, monkeypatch):
    """Hessian rows through the unit loop: a hook that raises after row 1 leaves rows 0 and 1 written;
    an interrupt inside row 3's solver keeps row 2 and drops row 3; the last call solves row 0 again
    (the warm start, unstored) and rows 3 and 4; the file equals an uninterrupted run's bit for bit."""
    import numpy as np
    import torch

    import lt_user_models
    from landscape_tools import _lanczos, hessian as H, store
    from landscape_tools.cli.common import Terminated

    torch.manual_seed(0)
    model = lt_user_models.tiny_mlp()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 4, generator=g), torch.randint(0, 2, (3,), generator=g)) for _ in range(5)]
    jobs, options = [H.HessianJob("mlp", model, None, batches)], H.HessianOptions(k=2, scope="batch")
    H.run_hessian(jobs, str(tmp_path / "ref.h5"), options)
    out = str(tmp_path / "out.h5")

    def stop_after_row_1(ji, row):
        if row == 1:
            raise Terminated
    with pytest.raises(Terminated):
        H.run_hessian(jobs, out, options, on_row=stop_after_row_1)
    with store._open_checked(store.partial_path(out)) as f:
        assert f["mlp/done"][()].tolist() == [True, True, False, False, False]

    original, calls = _lanczos.thick_restart_lanczos, []

    def interrupted_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:                         # row 0 again, row 2, then row 3
            raise KeyboardInterrupt
        return original(*a, **kw)
    monkeypatch.setattr(_lanczos, "thick_restart_lanczos", interrupted_third)
    with pytest.raises(KeyboardInterrupt):
        H.run_hessian(jobs, out, options)
    with store._open_checked(store.partial_path(out)) as f:
        assert f["mlp/done"][()].tolist() == [True, True, True, False, False]
    monkeypatch.setattr(_lanczos, "thick_restart_lanczos", lambda *a, **kw: (calls.append(2), original(*a, **kw))[1])
    rows = []
    H.run_hessian(jobs, out, options, on_row=lambda ji, row: rows.append(row))
    assert rows == [3, 4] and calls.count(2) == 3     # row 0 solved again for the warm start, not stored
    got, ref = store.read_result(out).models["mlp"], store.read_result(tmp_path / "ref.h5").models["mlp"]
    assert set(got.data) == set(ref.data)
    for name, value in ref.data.items():
        np.testing.assert_array_equal(got.data[name], value, err_msg=name)
