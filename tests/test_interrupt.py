"""Ctrl-C and SIGTERM are never lost: an interrupt CPython swallowed is raised again at the next progress
report; SIGTERM unwinds like Ctrl-C and makes `lt` exit with 143 (tests/test_sigterm.py runs it for real)."""
import signal

import pytest

from landscape_tools.cli import common


def test_swallowed_interrupt_resurfaces_at_the_next_progress_report(monkeypatch):
    monkeypatch.setattr(common, "_interrupted", 0)
    bar = common.ProgressBar("surface", quiet=True)
    bar(1, 10)  # nothing pending: no exception
    try:  # what happens inside a weakref callback: the handler raises, CPython prints and drops it
        common._on_sigint(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass
    with pytest.raises(KeyboardInterrupt) as err:
        bar(2, 10)
    assert not isinstance(err.value, common.Terminated)
    with pytest.raises(KeyboardInterrupt):
        common.check_interrupted()
    assert common.interrupt_exit_status() == 130


def test_sigterm_unwinds_like_ctrl_c_once_and_exits_143(monkeypatch):
    monkeypatch.setattr(common, "_interrupted", 0)
    with pytest.raises(common.Terminated):
        common._on_sigint(signal.SIGTERM, None)
    common._on_sigint(signal.SIGTERM, None)       # a second SIGTERM does not cut the clean-up short
    with pytest.raises(common.Terminated):         # ... but a swallowed first one resurfaces
        common.ProgressBar("hessian", quiet=True)(3, 10)
    assert issubclass(common.Terminated, KeyboardInterrupt)
    assert common.interrupt_exit_status() == 143
    with pytest.raises(KeyboardInterrupt):         # Ctrl-C after SIGTERM still interrupts; the status stays 143
        common._on_sigint(signal.SIGINT, None)
    assert common.interrupt_exit_status() == 143


def test_handlers_are_installed_only_over_the_defaults(monkeypatch):
    installed = {}
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    monkeypatch.setattr(signal, "getsignal", lambda s: defaults[s])
    monkeypatch.setattr(signal, "signal", lambda s, h: installed.setdefault(s, h))
    common.install_interrupt_handler()
    assert installed == {signal.SIGINT: common._on_sigint, signal.SIGTERM: common._on_sigint}
    installed.clear()
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN)  # e.g. a background job: left alone
    common.install_interrupt_handler()
    assert installed == {}
