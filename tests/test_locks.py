"""Output locks that survive preemption: a heartbeat, a stale lock taken over from any host, exactly
one winner when many processes race for a stale lock, and never a live lock taken."""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from landscape_tools import store
from landscape_tools.errors import StoreError


def other_hosts_lock(out, host="node-b", pid=4242, age=0.0, legacy=False):
    """``out.lock`` as an lt process on ``host`` leaves it (its token file and the lock linked to it),
    with a heartbeat ``age`` seconds old; ``legacy``: the ``pid@host`` file of earlier versions."""
    lock = store.OutputLock(out).path
    if legacy:
        lock.write_text(f"{pid}@{host}")
    else:
        token = f"tok{pid}{host}".replace("-", "")
        own = lock.with_name(f".lt-lock.{lock.name[:-5]}.{token}")
        own.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00",
                                   "token": token}))
        os.link(own, lock)
    then = time.time() - age
    os.utime(lock, (then, then))
    return lock


def litter(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".lt-lock"))


def test_stale_after_from_the_environment(monkeypatch):
    monkeypatch.delenv("LT_LOCK_STALE_AFTER", raising=False)
    assert store.lock_stale_after() == 120
    monkeypatch.setenv("LT_LOCK_STALE_AFTER", " 300 ")
    assert store.lock_stale_after() == 300
    assert store.heartbeat_interval(300) == 30 and store.heartbeat_interval(2) == 0.5
    for bad in ("soon", "0", "-5", "nan", "inf"):
        monkeypatch.setenv("LT_LOCK_STALE_AFTER", bad)
        with pytest.raises(StoreError) as err:
            store.lock_stale_after()
        assert str(err.value) == (f"LT_LOCK_STALE_AFTER={bad!r} is not a number of seconds > 0; set it to e.g. "
                                  f"LT_LOCK_STALE_AFTER=300, or unset it for the default of 120 s")


@pytest.mark.parametrize("legacy", [False, True])
def test_another_hosts_lock_refused_while_fresh_taken_over_when_stale(tmp_path, legacy):
    out = tmp_path / "out.h5"
    lock = other_hosts_lock(out, age=30, legacy=legacy)
    with pytest.raises(StoreError) as err:
        store.OutputLock(out).acquire()
    msg = str(err.value)
    assert msg.startswith(f"{out} is being written by another lt process (4242@node-b")
    assert "last heartbeat 30 s ago); wait for it to finish, or remove" in msg
    assert "LT_LOCK_STALE_AFTER=120 s is taken over by the next run on any host" in msg
    assert store.read_lock(lock).host == "node-b"           # untouched

    then = time.time() - 121
    os.utime(lock, (then, then))
    taken = store.OutputLock(out).acquire()
    info = store.read_lock(lock)
    assert (info.host, info.pid, info.token) == (socket.gethostname(), os.getpid(), taken.token)
    taken.release()
    assert not lock.exists() and litter(tmp_path) == []


def test_dead_pid_on_this_host_taken_over_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "out.h5"
    other_hosts_lock(out, host=socket.gethostname(), pid=proc.pid, age=0)
    with store.OutputLock(out) as lock:
        assert store.read_lock(lock.path).pid == os.getpid()
    assert litter(tmp_path) == [] and not lock.path.exists()


def test_heartbeat_keeps_a_lock_alive_and_a_stalled_holder_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("LT_LOCK_STALE_AFTER", "0.4")   # beats every 0.1 s
    out = tmp_path / "out.h5"
    first = store.OutputLock(out).acquire()
    time.sleep(0.8)                                     # twice the stale time: the heartbeat kept it fresh
    assert store.read_lock(first.path).age < 0.4
    with pytest.raises(StoreError, match=r"last heartbeat 0 s ago"):
        store.OutputLock(out).acquire()
    first._stop.set()                                   # the holder stalls (e.g. a suspended process)
    first._beat.join()
    time.sleep(0.5)
    second = store.OutputLock(out).acquire()            # stale: taken over
    assert store.read_lock(second.path).token == second.token
    assert not first.beat()                             # the stalled holder wakes up and notices
    assert first.lost
    with pytest.raises(StoreError, match="was taken over by another process after this run's heartbeat stalled"):
        first.check()
    first.release()                                     # never removes its successor's lock
    assert store.read_lock(second.path).token == second.token
    second.release()
    assert not second.path.exists() and litter(tmp_path) == []


def _contender(out, start, attempted, results):
    start.wait()
    try:
        lock = store.OutputLock(out).acquire()
    except StoreError as exc:
        results.put(("refused", str(exc)))
        attempted.wait()
        return
    results.put(("won", lock.token))
    attempted.wait()                                    # hold it until everyone has tried
    lock.release()


def test_twenty_processes_race_for_a_stale_lock_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 20
    kinds = ["other host, stale", "earlier version, stale", "dead pid on this host"]
    for round_ in range(20):
        out = tmp_path / f"race{round_}.h5"
        kind = kinds[round_ % 3]
        if kind == "dead pid on this host":
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            other_hosts_lock(out, host=socket.gethostname(), pid=dead.pid, age=0)
        else:
            other_hosts_lock(out, age=500, legacy=kind.startswith("earlier"))
        start, attempted, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(out, start, attempted, results)) for _ in range(n)]
        for p in procs:
            p.start()
        outcome = [results.get(timeout=60) for _ in range(n)]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        winners = [r for r in outcome if r[0] == "won"]
        assert len(winners) == 1, (kind, outcome)
        refused = [r[1] for r in outcome if r[0] == "refused"]
        assert all(" is being written by another lt process " in m for m in refused), (kind, refused)
        assert not (tmp_path / f"race{round_}.h5.lock").exists()
    assert litter(tmp_path) == []
