"""Result files: HDF5, schema version 1.  The only module that touches h5py.

A result file has root attributes ``format = "landscape-tools"``, ``format_version = 1``, ``kind``,
``generated_by``, ``created``, ``command``, ``config`` (JSON), ``seed``, ``torch_version``, ``device``,
and one group per analysed model.  Files are written atomically (temporary file in the same folder,
then rename), never silently overwritten, and refused when foreign or newer than this reader.

Long runs write through :class:`PartialResult`: a ``OUT.h5.partial`` file whose arrays (NaN where not
yet computed) are updated in place; its layout is allocated once, so later writes only touch
fixed-size data, and the file is renamed to ``OUT.h5`` when complete.  A second process that tries to
write the same output is refused by a lock file (``OUT.h5.lock``, with a heartbeat: a lock whose
holder stopped refreshing it for ``LT_LOCK_STALE_AFTER`` seconds is taken over from any host).

Nodes: writers take nested dicts ``{"attrs": {...}, "data": {name: array | (array, attrs)},
"groups": {name: node}}``; readers return :class:`Node` objects of the same shape.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from .errors import StoreError

FORMAT = "landscape-tools"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
KINDS = ("hessian", "surface", "featvar", "evaluate", "compare")


# ----------------------------------------------------------------------------- provenance
def provenance(kind: str, command: Iterable[str] | None = None, config: dict | None = None, seed: int | None = None,
               device: str = "cpu") -> dict[str, Any]:
    """Root attributes of a result file of ``kind``."""
    import torch

    from . import __version__
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "generated_by": f"landscape-tools {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": " ".join(command if command is not None else sys.argv),
        "config": json.dumps(config or {}, sort_keys=True, default=str),
        "seed": -1 if seed is None else int(seed),
        "torch_version": str(torch.__version__),
        "device": str(device),
    }


def _attr(value: Any) -> Any:
    if value is None:
        return "null"
    if isinstance(value, (dict, tuple, list)) and (isinstance(value, dict) or any(
            isinstance(v, (dict, list, tuple, type(None))) for v in value)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        return np.asarray(value)
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, str):
        return str(value)  # plain str: h5py refuses str subclasses such as TorchVersion
    return value


def _read_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in ("O", "S"):
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dataset_value(array: Any) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.kind in ("U", "O"):
        return np.array([str(v) for v in arr.ravel()], dtype=h5py.string_dtype()).reshape(arr.shape)
    return arr


def _write_node(group: h5py.Group, node: dict) -> None:
    for key, value in (node.get("attrs") or {}).items():
        group.attrs[key] = _attr(value)
    for name, item in (node.get("data") or {}).items():
        attrs = {}
        if isinstance(item, tuple):
            item, attrs = item
        ds = group.create_dataset(name, data=_dataset_value(item))
        for key, value in attrs.items():
            ds.attrs[key] = _attr(value)
    for name, child in (node.get("groups") or {}).items():
        _write_node(group.create_group(name), child)


@dataclass
class Node:
    """A group read back: attributes, datasets (as numpy arrays) and sub-groups."""

    attrs: dict[str, Any] = field(default_factory=dict)
    data: dict[str, np.ndarray] = field(default_factory=dict)
    data_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, "Node"] = field(default_factory=dict)

    def __getitem__(self, path: str):
        head, _, rest = path.partition("/")
        if rest:
            return self.groups[head][rest]
        if head in self.data:
            return self.data[head]
        return self.groups[head]

    def __contains__(self, path: str) -> bool:
        try:
            self[path]
        except KeyError:
            return False
        return True


def _read_node(group: h5py.Group) -> Node:
    node = Node(attrs={k: _read_attr(v) for k, v in group.attrs.items()})
    for name, item in group.items():
        if isinstance(item, h5py.Dataset):
            value = item[()]
            if item.dtype.kind == "O" or h5py.check_string_dtype(item.dtype) is not None:
                value = np.asarray(item.asstr()[()], dtype=object)
            node.data[name] = value
            node.data_attrs[name] = {k: _read_attr(v) for k, v in item.attrs.items()}
        else:
            node.groups[name] = _read_node(item)
    return node


@dataclass
class Result:
    """A whole result file: root attributes (``config`` decoded) and one :class:`Node` per model."""

    path: str
    attrs: dict[str, Any]
    models: dict[str, Node]

    @property
    def kind(self) -> str:
        return self.attrs["kind"]

    @property
    def config(self) -> dict:
        return self.attrs.get("config") or {}


# ----------------------------------------------------------------------------- locking
#: environment variable: seconds without a heartbeat after which a lock is stale and taken over
STALE_ENV = "LT_LOCK_STALE_AFTER"
STALE_DEFAULT = 120.0
_LOCK_PREFIX = ".lt-lock."


def lock_stale_after() -> float:
    """Seconds after which a lock without a heartbeat is stale: ``LT_LOCK_STALE_AFTER`` (default 120).

    Raises:
        StoreError: the variable is not a number > 0.
    """
    text = os.environ.get(STALE_ENV, "").strip()
    if not text:
        return STALE_DEFAULT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise StoreError(f"{STALE_ENV}={text!r} is not a number of seconds > 0; set it to e.g. "
                         f"{STALE_ENV}=300, or unset it for the default of {STALE_DEFAULT:g} s")
    return value


def heartbeat_interval(stale_after: float) -> float:
    """How often a lock holder refreshes its lock: ``min(30, stale_after / 4)`` seconds."""
    return min(30.0, stale_after / 4.0)


@dataclass
class LockInfo:
    """What a lock file says about its holder, and how old its heartbeat is."""

    host: str
    pid: int | None
    started: str
    token: str          # "" for a lock written by an lt older than the heartbeat (``pid@host``)
    age: float          # seconds since the last heartbeat (the file's modification time)
    ino: int
    mtime_ns: int

    def owner(self) -> str:
        return f"{self.pid if self.pid is not None else '?'}@{self.host or '?'}"


def read_lock(path: str | os.PathLike) -> LockInfo | None:
    """The holder of the lock file ``path`` (``OUT.h5.lock``), or None when there is none."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(4096).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    host, pid, started, token = "", None, "", ""
    try:
        doc = json.loads(raw)
        host, pid = str(doc.get("host", "")), doc.get("pid")
        started, token = str(doc.get("started", "")), str(doc.get("token", ""))
        pid = int(pid) if pid is not None else None
    except (ValueError, TypeError, AttributeError):
        p, _, host = raw.partition("@")          # the format of earlier versions: pid@host
        pid = int(p) if p.isdigit() else None
    return LockInfo(host, pid, started, token, time.time() - st.st_mtime, st.st_ino, st.st_mtime_ns)


class OutputLock:
    """``OUT.h5.lock``: one writer per output, across processes and hosts sharing the file system.

    The lock file records the holder's host, pid, start time and a unique token, and its modification
    time is a heartbeat: a daemon thread touches it every ``min(30, stale/4)`` seconds while the lock
    is held.  Another process takes the lock over when its holder is a dead pid on this host, or when
    the heartbeat is older than ``LT_LOCK_STALE_AFTER`` seconds (default 120) on any host (a job killed
    by a preemption or a time limit, a node that went away).  A lock with a fresh heartbeat is never
    taken.

    Taking over is race-free: ``OUT.h5.lock`` is a hard link of a file named after the holder's token
    (``.lt-lock.OUT.h5.<token>``, created first, so a lock is never seen half-written).  Whoever removes
    the lock of token T must first rename that token file to a name of its own; of any number of
    contenders exactly one such rename succeeds, and since no one else may remove ``OUT.h5.lock`` while
    it is T, the winner removes T and not a fresh lock someone created meanwhile.  Then the lock is
    created as usual (``link`` fails when it exists), so of the processes racing for one stale lock
    exactly one proceeds.  The holder releases its lock the same way, so a holder that was taken over
    (it stopped beating for longer than the stale time, e.g. a suspended process) never removes its
    successor's lock; it sees :attr:`lost` and stops at its next write.
    """

    def __init__(self, path: str | os.PathLike):
        self.final = Path(path)
        self.path = Path(str(path) + ".lock")
        self.held = False
        self.lost = False
        self.token = ""
        self._own: Path | None = None
        self._stop: "threading.Event | None" = None
        self._beat: "threading.Thread | None" = None

    def _token_path(self, token: str) -> Path:
        return self.path.with_name(f"{_LOCK_PREFIX}{self.path.name[:-5]}.{token}")

    # -- taking
    def acquire(self) -> "OutputLock":
        import socket
        import threading
        import uuid

        stale_after = lock_stale_after()
        host = socket.gethostname()
        self.token = f"{uuid.uuid4().hex}"
        own = self._token_path(self.token)
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        body = json.dumps({"host": host, "pid": os.getpid(), "started": started, "token": self.token,
                           "output": str(self.final)})
        try:
            fd = os.open(own, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(body + "\n")
        except OSError as exc:
            raise _disk_error(self.path, exc) from None
        try:
            waited_since = None
            for _ in range(1000):
                try:
                    os.link(own, self.path)
                    break
                except FileExistsError:
                    if os.stat(own).st_nlink == 2:    # NFS: the link was made but its reply was lost
                        break
                except OSError as exc:
                    raise StoreError(f"cannot create the lock {self.path}: {exc.strerror or exc} (lt needs a "
                                     f"file system with hard links to lock its outputs)") from None
                info = read_lock(self.path)
                if info is None:
                    continue                          # released meanwhile: try again
                dead = info.host == host and info.pid is not None and not _pid_alive(info.pid)
                if not dead and info.age <= stale_after:
                    raise StoreError(self._refusal(info, stale_after))
                outcome = self._take_over(info)
                if outcome == "busy":                 # another process is taking it over right now
                    waited_since = waited_since or time.monotonic()
                    if time.monotonic() - waited_since > min(stale_after, 10.0):
                        self._take_over(info, abandoned=True)
                        waited_since = None
                    time.sleep(0.005)
                else:
                    waited_since = None
            else:
                raise StoreError(f"could not take the lock {self.path}: it keeps changing hands; "
                                 f"is another lt process writing {self.final}?")
        except BaseException:
            own.unlink(missing_ok=True)
            raise
        self._own, self.held, self.lost = own, True, False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_interval(stale_after),),
                                      name=f"lt-lock-heartbeat {self.path.name}", daemon=True)
        self._beat.start()
        return self

    def _take_over(self, info: LockInfo, abandoned: bool = False) -> str:
        """Remove the stale lock ``info`` if this process wins the right to; "done", "lost" or "busy"."""
        if info.token and not abandoned:
            theirs = self._token_path(info.token)
        else:
            # a lock of an earlier lt (no token file), or a takeover whose winner died half-way:
            # give the lock a token file named after its inode and last change, then claim that
            theirs = self._token_path(f"ino-{info.ino}-{info.mtime_ns}")
            try:
                os.link(self.path, theirs)
            except FileExistsError:
                pass
            except FileNotFoundError:
                return "lost"
        claim = theirs.with_name(f"{theirs.name}.taken-{self.token}")
        try:
            os.rename(theirs, claim)
        except FileNotFoundError:
            return "busy" if info.token and not abandoned else "lost"
        try:
            if os.stat(claim).st_ino != info.ino:   # not the lock we judged: leave it alone
                return "lost"
            try:
                if os.stat(self.path).st_ino == info.ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            return "done"
        finally:
            claim.unlink(missing_ok=True)

    def _refusal(self, info: LockInfo, stale_after: float) -> str:
        started = f", started {info.started}" if info.started else ""
        return (f"{self.final} is being written by another lt process ({info.owner()}{started}, last heartbeat "
                f"{info.age:.0f} s ago); wait for it to finish, or remove {self.path} if that process is gone. "
                f"A lock whose heartbeat is older than {STALE_ENV}={stale_after:g} s is taken over by the "
                f"next run on any host (a live run refreshes it every {heartbeat_interval(stale_after):g} s)")

    # -- holding
    def _heartbeat(self, interval: float) -> None:
        while not self._stop.wait(interval) and self.beat():
            pass

    def beat(self) -> bool:
        """Refresh the heartbeat now; False (and :attr:`lost`) when the lock was taken over."""
        try:
            os.utime(self._own)
        except FileNotFoundError:            # taken over by another process after our heartbeat stalled
            self.lost = True
            return False
        except (OSError, TypeError):
            pass                              # a file-system hiccup: try again at the next beat
        return True

    def check(self) -> None:
        """Raise when this lock was taken over by another process (our heartbeat had stalled)."""
        if self.held and self.lost:
            raise StoreError(f"the lock {self.path} was taken over by another process after this run's heartbeat "
                             f"stalled for longer than {STALE_ENV}={lock_stale_after():g} s; this run stops "
                             f"(the other run resumes from {self.final}.partial)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._stop is not None:
            self._stop.set()
            if self._beat is not None and self._beat is not _current_thread():
                self._beat.join(timeout=5)
        own, self._own = self._own, None
        claim = own.with_name(f"{own.name}.taken-{self.token}")
        try:
            os.rename(own, claim)            # the same protocol as a takeover: never remove a successor
        except FileNotFoundError:
            self.lost = True
            return
        try:
            if os.stat(self.path).st_ino == os.stat(claim).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            claim.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _current_thread():
    import threading
    return threading.current_thread()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


# ----------------------------------------------------------------------------- writing
def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _disk_error(path: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on the device holding {path}: free some space or write elsewhere with -o; "
                          f"earlier results are untouched")
    return StoreError(f"cannot write {path}: {exc.strerror or exc}")


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail early (before any computation) when ``path`` exists and may not be replaced."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise StoreError(f"{p} already exists; pass --overwrite to replace it or choose another -o")
    if p.suffix.lower() not in (".h5", ".hdf5"):
        raise StoreError(f"output {p} should end in .h5 (HDF5 result file)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise StoreError(f"folder {parent} for the output {p.name} does not exist; create it first")


def write_result(path: str | os.PathLike, root_attrs: dict, models: dict[str, dict], overwrite: bool = False) -> Path:
    """Write a complete result file atomically.

    Args:
        path: output ``.h5`` path.
        root_attrs: from :func:`provenance`.
        models: label -> node dict (see the module docstring).
        overwrite: replace an existing file (otherwise refused).

    Raises:
        StoreError: the file exists, or the disk is full / not writable (no partial file is left).
    """
    p = Path(path)
    check_writable(p, overwrite)
    tmp = _tmp_path(p)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            for key, value in root_attrs.items():
                f.attrs[key] = _attr(value)
            for label, node in models.items():
                _write_node(f.create_group(label), node)
        os.replace(tmp, p)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(p, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def _open_checked(path: Path, mode: str = "r") -> h5py.File:
    if not path.exists():
        raise StoreError(f"result file {path} does not exist")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        raise StoreError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {exc}. "
                         f"Recompute it; it cannot be repaired") from None
    fmt = _read_attr(f.attrs.get("format", ""))
    if fmt != FORMAT:
        gl = "xcoordinates" in f or "xdirection" in f
        f.close()
        hint = ("; it looks like a loss-landscape (tomgoldstein) file: import it with "
                "`lt import-gl FILE.h5 -o OUT.h5`") if gl else ""
        raise StoreError(f"{path} is not a landscape-tools result file (format {fmt!r}){hint}")
    version = int(_read_attr(f.attrs.get("format_version", 0)))
    if version > FORMAT_VERSION:
        f.close()
        raise StoreError(f"{path} has format_version {version}, newer than this landscape-tools reads "
                         f"({FORMAT_VERSION}); upgrade landscape-tools")
    return f


def read_result(path: str | os.PathLike) -> Result:
    """Read a whole result file into memory (arrays as numpy).

    Raises:
        StoreError: missing, corrupt, foreign or newer-version file.
    """
    p = Path(path)
    with _open_checked(p) as f:
        attrs = {k: _read_attr(v) for k, v in f.attrs.items()}
        try:
            attrs["config"] = json.loads(attrs.get("config", "{}"))
        except (TypeError, ValueError):
            pass
        try:
            models = {name: _read_node(g) for name, g in f.items() if isinstance(g, h5py.Group)}
        except (OSError, KeyError, RuntimeError) as exc:
            raise StoreError(f"{p} is damaged: {exc}; recompute it") from None
    return Result(str(p), attrs, models)


def read_plain_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Top-level datasets of any HDF5 file (for ``tensors:FILE.h5`` data)."""
    with h5py.File(path, "r") as f:
        return {name: item[()] for name, item in f.items() if isinstance(item, h5py.Dataset)}


def read_foreign(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every dataset of any HDF5 file (another program's results), by slash path, and its root attributes.

    Used to import files of other tools (:mod:`landscape_tools.interop`); strings come back as ``str``.

    Raises:
        StoreError: missing, or not a readable HDF5 file.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p} does not exist")
    data: dict[str, np.ndarray] = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            value = item[()]
            if h5py.check_string_dtype(item.dtype) is not None:
                value = item.asstr()[()]
            data[name] = value

    try:
        with h5py.File(p, "r") as f:
            f.visititems(visit)
            attrs = {k: _read_attr(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise StoreError(f"{p} is not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    return data, attrs


# ----------------------------------------------------------------------------- resumable results
class PartialResult:
    """A result being computed: ``OUT.h5.partial``, updated in place, renamed to ``OUT.h5`` when done.

    Use :func:`open_partial`.  ``resumed`` says whether earlier progress was found.  Arrays are
    addressed by slash paths (``"label/loss"``).
    """

    def __init__(self, final: Path, partial: Path, lock: OutputLock, resumed: bool):
        self.final, self.partial, self.lock, self.resumed = final, partial, lock, resumed
        self.file: h5py.File | None = h5py.File(partial, "r+")

    def read(self, path: str) -> np.ndarray:
        return self.file[path][()]

    def attrs(self, path: str = "/") -> dict[str, Any]:
        return {k: _read_attr(v) for k, v in self.file[path].attrs.items()}

    def write(self, path: str, index: Any, values: Any) -> None:
        """``file[path][index] = values`` (in place; call :meth:`flush` after a batch of writes)."""
        try:
            self.file[path][index] = values
        except OSError as exc:
            raise _disk_error(self.partial, exc) from None

    def set_attrs(self, path: str, attrs: dict) -> None:
        for key, value in attrs.items():
            self.file[path].attrs[key] = _attr(value)

    def flush(self) -> None:
        self.lock.check()
        try:
            self.file.flush()
        except OSError as exc:
            raise _disk_error(self.partial, exc) from None

    def finalize(self, extra_root_attrs: dict | None = None) -> Path:
        """Close and rename to the final name; returns the final path."""
        self.lock.check()
        if extra_root_attrs:
            self.set_attrs("/", extra_root_attrs)
        try:
            self.file.close()
            self.file = None
            os.replace(self.partial, self.final)
        except OSError as exc:  # the .partial file keeps every finished piece for a resume
            self.file = None
            self.lock.release()
            raise _disk_error(self.final, exc) from None
        self.lock.release()
        return self.final

    def close(self) -> None:
        """Close without finishing (progress stays in the ``.partial`` file for a resume)."""
        if self.file is not None:
            try:
                self.file.close()
            finally:
                self.file = None
        self.lock.release()

    def __enter__(self) -> "PartialResult":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def partial_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + PARTIAL_SUFFIX)


def open_partial(path: str | os.PathLike, root_attrs: dict, fingerprint: str, layout: dict[str, dict],
                 overwrite: bool = False) -> PartialResult:
    """Open (resume) or create the in-progress file for ``path``.

    Args:
        path: the final output path.
        root_attrs: provenance for a new file.
        fingerprint: a string identifying everything that determines the result (models, data, grid,
            directions...). A partial file with another fingerprint is refused unless ``overwrite``.
        layout: label -> node dict with every array at full size (NaN / False where not computed).
        overwrite: replace an existing final file or a mismatching / corrupt partial file.

    Raises:
        StoreError: output exists, another process writes it, the partial file is foreign or corrupt.
    """
    final = Path(path)
    check_writable(final, overwrite)
    lock = OutputLock(final).acquire()
    part = partial_path(final)
    try:
        if part.exists():
            problem = None
            try:
                with _open_checked(part) as f:
                    old = _read_attr(f.attrs.get("fingerprint", ""))
                    if old != fingerprint:
                        problem = (f"{part} holds progress of a different run (other models, data, grid or options); "
                                   f"rerun with the same options to resume it, or pass --overwrite to start again")
            except StoreError as exc:
                problem = f"cannot resume from {part}: {exc}; pass --overwrite to start again"
            if problem is None:
                return PartialResult(final, part, lock, resumed=True)
            if not overwrite:
                raise StoreError(problem)
            part.unlink()
        tmp = _tmp_path(part)
        try:
            with h5py.File(tmp, "w", track_order=True) as f:
                for key, value in dict(root_attrs, fingerprint=fingerprint).items():
                    f.attrs[key] = _attr(value)
                for label, node in layout.items():
                    _write_node(f.create_group(label), node)
            os.replace(tmp, part)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(part, exc) from None
        return PartialResult(final, part, lock, resumed=False)
    except BaseException:
        lock.release()
        raise


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A short summary of a result file for ``lt info``: root attributes and, per model, its arrays."""
    res = read_result(path)
    models = {}
    for label, node in res.models.items():
        models[label] = {"attrs": node.attrs,
                         "data": {k: f"{v.dtype} {tuple(v.shape)}" for k, v in node.data.items()},
                         "groups": sorted(node.groups)}
    return {"attrs": res.attrs, "models": models}
