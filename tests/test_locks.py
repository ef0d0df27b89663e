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


@pytest.mark.parametrize("legacy", [False, True])
def test_a_late_contender_never_removes_the_winners_fresh_lock(tmp_path, legacy):
    """The interleaving a plain remove-and-recreate gets wrong: B judges the stale lock, A takes it over
    and makes a fresh one, then B acts on its old judgement.  B must leave A's lock alone."""
    out = tmp_path / "out.h5"
    lock = other_hosts_lock(out, age=500, legacy=legacy)
    b = store.OutputLock(out)
    b.token = "latecomer"
    judged = store.read_lock(lock)                      # B: "stale"
    a = store.OutputLock(out).acquire()                 # A: takes it over, its own fresh lock
    assert b._take_over(judged) in ("busy", "lost")     # B acts on what it saw
    info = store.read_lock(lock)
    assert info.token == a.token and info.pid == os.getpid()
    assert b._take_over(judged, abandoned=True) == "lost"   # even when B thinks the takeover was abandoned
    assert store.read_lock(lock).token == a.token
    with pytest.raises(StoreError, match="last heartbeat 0 s ago"):
        b.acquire()
    a.release()
    assert not lock.exists() and litter(tmp_path) == []


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


def _can_unshare_uts() -> bool:
    try:
        return subprocess.run(["unshare", "--uts", "sh", "-c", "hostname lt-test-other-node"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_unshare_uts(), reason="unshare --uts is not permitted here")
def test_run_killed_on_another_host_is_refused_while_fresh_and_resumed_once_stale(tmp_path, monkeypatch):
    """A real `lt surface` in another UTS namespace (host name `node-elsewhere`: another host on the same
    files) is SIGKILLed mid-run, as a preempted node would be; its lock is refused while its heartbeat
    is fresh, then the same command here takes it over and resumes, and equals an uninterrupted run."""
    import h5py
    import numpy as np
    from click.testing import CliRunner

    from landscape_tools.cli.main import cli
    from tiny_files import tiny_checkpoint_and_data

    _, model, data = tiny_checkpoint_and_data(tmp_path)
    args = ["surface", str(model), "--data", data, "--batch-size", "5", "--x", "-1:1:11", "--y", "-1:1:11",
            "--device", "cpu"]
    out = tmp_path / "out.h5"
    stale = 4.0
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", LT_LOCK_STALE_AFTER=str(stale))
    script = 'hostname node-elsewhere && exec "$@"'
    proc = subprocess.Popen(["unshare", "--uts", "sh", "-c", script, "sh", sys.executable, "-m",
                             "landscape_tools.cli.main", *args, "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done():
        try:
            with h5py.File(store.partial_path(out), "r", locking=False) as f:
                return int(f["m/done"][()].sum())
        except Exception:
            return 0

    end = time.monotonic() + 90
    while done() == 0:
        assert proc.poll() is None, "ended before any progress: " + proc.stderr.read()
        assert time.monotonic() < end, "no progress within 90 s"
        time.sleep(0.02)
    proc.kill()                                         # SIGKILL: no clean-up, the lock stays
    proc.communicate(timeout=30)
    info = store.read_lock(store.OutputLock(out).path)
    assert info.host == "node-elsewhere" and info.pid == proc.pid
    monkeypatch.setenv("LT_LOCK_STALE_AFTER", str(stale))
    assert info.age < stale                             # it beat every second until it was killed
    with pytest.raises(StoreError, match=rf"\({proc.pid}@node-elsewhere, started .*; wait for it to finish"):
        store.OutputLock(out).acquire()                 # fresh: refused (the dead pid is on another host)
    time.sleep(max(0.0, stale - store.read_lock(store.OutputLock(out).path).age + 0.3))
    r = CliRunner().invoke(cli, [*args, "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and "resumed" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name or p.name.startswith(".lt")) == ["out.h5"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "ref.h5")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, ref = store.read_result(out).models["m"], store.read_result(tmp_path / "ref.h5").models["m"]
    assert got.data["done"].all()
    np.testing.assert_array_equal(got.data["accuracy"], ref.data["accuracy"])
    np.testing.assert_allclose(got.data["loss"], ref.data["loss"], rtol=1e-7, atol=0)
