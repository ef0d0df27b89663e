"""Ctrl-C is never lost: an interrupt CPython swallowed is raised again at the next progress report."""
import signal

import pytest

from landscape_tools.cli import common


def test_swallowed_interrupt_resurfaces_at_the_next_progress_report(monkeypatch):
    monkeypatch.setattr(common, "_interrupted", False)
    bar = common.ProgressBar("surface", quiet=True)
    bar(1, 10)  # nothing pending: no exception
    try:  # what happens inside a weakref callback: the handler raises, CPython prints and drops it
        common._on_sigint(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass
    with pytest.raises(KeyboardInterrupt):
        bar(2, 10)
    with pytest.raises(KeyboardInterrupt):
        common.check_interrupted()


def test_handler_is_installed_only_over_the_default(monkeypatch):
    installed = {}
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.default_int_handler)
    monkeypatch.setattr(signal, "signal", lambda s, h: installed.setdefault(s, h))
    common.install_interrupt_handler()
    assert installed == {signal.SIGINT: common._on_sigint}
    installed.clear()
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN)  # e.g. a background job: left alone
    common.install_interrupt_handler()
    assert installed == {}
