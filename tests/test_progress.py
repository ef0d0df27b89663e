"""The progress line: pace-based time left, plain lines in a log, the final line always drawn."""
import io

from landscape_tools.cli import common


def _bar(monkeypatch, clock):
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()                       # not a terminal: plain lines, at most every `interval`
    return common.ProgressBar("surface", stream=stream, interval=0.0), stream


def test_time_left_follows_the_pace_after_a_slow_first_unit(monkeypatch):
    clock = [100.0]
    bar, stream = _bar(monkeypatch, clock)
    clock[0] += 60.0
    bar(1, 101, "point 1")                       # the first point took 60 s (e.g. compilation)
    assert stream.getvalue() == "surface: 1/101   1.0% 1m00s eta 1h40m point 1\n"   # only the average is known yet
    clock[0] += 10.0
    bar(11, 101, "point 11")                     # then 1 s per point: 90 left -> 1m30s, not 8m (the average)
    assert stream.getvalue().splitlines()[-1] == "surface: 11/101  10.9% 1m10s eta 1m30s point 11"
    clock[0] += 90.0
    bar(101, 101, "done")
    assert stream.getvalue().splitlines()[-1] == "surface: 101/101 100.0% 2m40s done"


def test_units_found_done_by_a_resumed_run_do_not_count_as_pace(monkeypatch):
    clock = [0.0]
    bar, stream = _bar(monkeypatch, clock)
    bar(50, 100, "resumed")                      # 50 points already in the partial file
    clock[0] += 5.0
    bar(55, 100, "")                             # 1 s per point since: 45 left -> 45 s
    assert stream.getvalue().splitlines()[-1] == "surface: 55/100  55.0% 0m05s eta 0m45s"
