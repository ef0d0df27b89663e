"""HDF5 result files: round trip, atomic writes, refusals, resumable partial files and their lock."""
import errno
import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from landscape_tools import store
from landscape_tools.errors import StoreError


def _attrs(**extra):
    return store.provenance("hessian", ["lt", "hessian", "m.pt"], {"top_n": 3, "models": ["a", "b"], "tol": 1e-3},
                            seed=7, device="cpu") | extra


def _models():
    rng = np.random.default_rng(0)
    return {
        "zeta": {"attrs": {"checkpoint": "z.pt", "num_params": 123, "ratio": 0.25, "flag": True,
                           "names": ["conv1", "layer1.0"], "sizes": [1, 2, 3], "nested": {"a": [1, None]},
                           "missing": None},
                 "data": {"eigenvalues": rng.normal(size=5),
                          "counts": (np.arange(4, dtype=np.int32), {"unit": "samples", "tol": 1e-6}),
                          "labels": np.array(["x", "yy", "zzz"])},
                 "groups": {"density": {"attrs": {"bins": 10},
                                        "data": {"grid": np.linspace(0, 1, 10)},
                                        "groups": {"deep": {"data": {"v": np.eye(2)}}}}}},
        "alpha": {"attrs": {"checkpoint": "a.pt"}, "data": {"eigenvalues": np.zeros(5)}},
        "mid": {"data": {"loss": np.full((2, 3), np.nan)}},
    }


def test_round_trip(tmp_path):
    path = tmp_path / "out.h5"
    models = _models()
    assert store.write_result(path, _attrs(), models) == path
    res = store.read_result(path)
    assert res.kind == "hessian"
    assert res.attrs["format"] == "landscape-tools" and res.attrs["format_version"] == 1
    assert res.attrs["command"] == "lt hessian m.pt" and res.attrs["seed"] == 7 and res.attrs["device"] == "cpu"
    assert res.config == {"top_n": 3, "models": ["a", "b"], "tol": 1e-3}
    assert list(res.models) == ["zeta", "alpha", "mid"]  # insertion order, not alphabetical
    z = res.models["zeta"]
    assert z.attrs["checkpoint"] == "z.pt" and z.attrs["num_params"] == 123 and z.attrs["ratio"] == 0.25
    assert z.attrs["flag"] is True
    assert z.attrs["names"] == ["conv1", "layer1.0"]
    np.testing.assert_array_equal(z.attrs["sizes"], [1, 2, 3])
    assert json.loads(z.attrs["nested"]) == {"a": [1, None]}
    assert z.attrs["missing"] == "null"
    np.testing.assert_array_equal(z["eigenvalues"], models["zeta"]["data"]["eigenvalues"])
    assert z["eigenvalues"].dtype == np.float64
    np.testing.assert_array_equal(z["counts"], np.arange(4))
    assert z["counts"].dtype == np.int32
    assert z.data_attrs["counts"] == {"unit": "samples", "tol": 1e-6}
    assert z["labels"].tolist() == ["x", "yy", "zzz"]
    assert z.groups["density"].attrs == {"bins": 10}
    np.testing.assert_array_equal(z["density/grid"], np.linspace(0, 1, 10))
    np.testing.assert_array_equal(z["density/deep/v"], np.eye(2))
    assert "density/deep/v" in z and "density/nope" not in z
    assert np.isnan(res.models["mid"]["loss"]).all() and res.models["mid"]["loss"].shape == (2, 3)
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]
    summary = store.describe(path)
    assert summary["models"]["zeta"]["data"]["counts"] == "int32 (4,)"
    assert summary["models"]["zeta"]["groups"] == ["density"]


def test_provenance_str_subclasses_written():
    import torch
    attrs = store.provenance("surface", ["lt"], None, None, "cpu")
    assert type(attrs["torch_version"]) is str and attrs["torch_version"] == str(torch.__version__)
    assert attrs["seed"] == -1 and attrs["config"] == "{}"


def test_refuses_overwrite(tmp_path):
    path = tmp_path / "out.h5"
    store.write_result(path, _attrs(), {"a": {"data": {"v": np.ones(2)}}})
    with pytest.raises(StoreError) as err:
        store.write_result(path, _attrs(), {"a": {"data": {"v": np.zeros(2)}}})
    assert str(err.value) == f"{path} already exists; pass --overwrite to replace it or choose another -o"
    np.testing.assert_array_equal(store.read_result(path).models["a"]["v"], np.ones(2))
    store.write_result(path, _attrs(), {"a": {"data": {"v": np.zeros(2)}}}, overwrite=True)
    np.testing.assert_array_equal(store.read_result(path).models["a"]["v"], np.zeros(2))


def test_check_writable(tmp_path):
    with pytest.raises(StoreError, match=r"output .*out\.txt should end in \.h5"):
        store.check_writable(tmp_path / "out.txt")
    with pytest.raises(StoreError, match="folder .*nope for the output x.h5 does not exist; create it first"):
        store.check_writable(tmp_path / "nope" / "x.h5")
    store.check_writable(tmp_path / "fine.h5")


def test_atomic_on_failure(tmp_path):
    path = tmp_path / "out.h5"
    with pytest.raises(TypeError):  # h5py cannot store an arbitrary object as an attribute
        store.write_result(path, _attrs(), {"a": {"data": {"v": np.ones(3)}, "attrs": {"bad": object()}}})
    assert os.listdir(tmp_path) == []
    # an earlier good file survives a failed overwrite untouched
    store.write_result(path, _attrs(), {"a": {"data": {"v": np.ones(3)}}})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        store.write_result(path, _attrs(), {"a": {"attrs": {"bad": object()}}}, overwrite=True)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.h5"]


def test_no_space_left(tmp_path, monkeypatch):
    def full(group, node):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store, "_write_node", full)
    path = tmp_path / "out.h5"
    with pytest.raises(StoreError) as err:
        store.write_result(path, _attrs(), {"a": {}})
    assert str(err.value) == (f"no space left on the device holding {path}: free some space or write elsewhere "
                              f"with -o; earlier results are untouched")
    assert os.listdir(tmp_path) == []
    with pytest.raises(StoreError, match="no space left on the device holding"):
        store.open_partial(path, _attrs(), "fp", {"a": {}})
    assert os.listdir(tmp_path) == []  # neither partial, temporary nor lock file


def test_other_os_error(tmp_path, monkeypatch):
    def denied(group, node):
        raise OSError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(store, "_write_node", denied)
    with pytest.raises(StoreError, match=r"cannot write .*out\.h5: Permission denied"):
        store.write_result(tmp_path / "out.h5", _attrs(), {"a": {}})


def test_foreign_newer_corrupt_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.ones(2))
    with pytest.raises(StoreError) as err:
        store.read_result(foreign)
    assert str(err.value) == f"{foreign} is not a landscape-tools result file (format '')"
    newer = tmp_path / "newer.h5"
    store.write_result(newer, _attrs(format_version=2), {"a": {}})
    with pytest.raises(StoreError) as err:
        store.read_result(newer)
    assert str(err.value) == (f"{newer} has format_version 2, newer than this landscape-tools reads (1); "
                              f"upgrade landscape-tools")
    good = tmp_path / "good.h5"
    store.write_result(good, _attrs(), _models())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated or corrupt"):
        store.read_result(truncated)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(StoreError) as err:
        store.read_result(garbage)
    assert str(err.value).startswith(f"{garbage} is not a readable HDF5 file (truncated or corrupt?): ")
    assert str(err.value).endswith("Recompute it; it cannot be repaired")
    with pytest.raises(StoreError, match=r"result file .*none\.h5 does not exist"):
        store.read_result(tmp_path / "none.h5")


def test_read_plain_arrays(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(6).reshape(2, 3))
        f.create_group("g").create_dataset("hidden", data=np.ones(1))
    arrays = store.read_plain_arrays(path)
    assert list(arrays) == ["x"]
    np.testing.assert_array_equal(arrays["x"], np.arange(6).reshape(2, 3))


# ----------------------------------------------------------------------------- resumable results
LAYOUT = {"m": {"attrs": {"arch": "resnet"}, "data": {"loss": np.full(4, np.nan), "done": np.zeros(4, bool)}}}


def test_partial_create_resume_finalize(tmp_path):
    path = tmp_path / "out.h5"
    part, lock = store.partial_path(path), tmp_path / "out.h5.lock"
    pr = store.open_partial(path, _attrs(), "fp-1", LAYOUT)
    assert not pr.resumed and part.exists() and lock.exists()
    assert store.read_lock(lock).owner() == f"{os.getpid()}@{socket.gethostname()}"
    pr.write("m/loss", slice(0, 2), [1.5, 2.5])
    pr.write("m/done", slice(0, 2), True)
    pr.flush()
    pr.close()
    assert not lock.exists() and part.exists() and not path.exists()

    with store.open_partial(path, _attrs(), "fp-1", LAYOUT) as again:
        assert again.resumed
        np.testing.assert_array_equal(again.read("m/loss")[:2], [1.5, 2.5])
        assert np.isnan(again.read("m/loss")[2:]).all()
        assert again.read("m/done").tolist() == [True, True, False, False]
        assert again.attrs("/")["fingerprint"] == "fp-1" and again.attrs("m") == {"arch": "resnet"}
    assert not lock.exists()

    with pytest.raises(StoreError) as err:
        store.open_partial(path, _attrs(), "fp-2", LAYOUT)
    assert str(err.value) == (f"{part} holds progress of a different run (other models, data, grid or options); "
                              f"rerun with the same options to resume it, or pass --overwrite to start again")
    assert not lock.exists()  # a refused open leaves no lock behind

    fresh = store.open_partial(path, _attrs(), "fp-2", LAYOUT, overwrite=True)
    assert not fresh.resumed and np.isnan(fresh.read("m/loss")).all()
    fresh.write("m/loss", slice(None), [1.0, 2.0, 3.0, 4.0])
    fresh.set_attrs("m", {"converged": True})
    assert fresh.finalize({"seconds": 1.5}) == path
    assert path.exists() and not part.exists() and not lock.exists()
    res = store.read_result(path)
    assert res.attrs["fingerprint"] == "fp-2" and res.attrs["seconds"] == 1.5 and res.kind == "hessian"
    np.testing.assert_array_equal(res.models["m"]["loss"], [1.0, 2.0, 3.0, 4.0])
    assert res.models["m"].attrs == {"arch": "resnet", "converged": True}
    with pytest.raises(StoreError, match="already exists"):
        store.open_partial(path, _attrs(), "fp-2", LAYOUT)


def test_corrupt_partial(tmp_path):
    path = tmp_path / "out.h5"
    part = store.partial_path(path)
    part.write_bytes(b"garbage")
    with pytest.raises(StoreError) as err:
        store.open_partial(path, _attrs(), "fp", LAYOUT)
    assert str(err.value).startswith(f"cannot resume from {part}: ")
    assert str(err.value).endswith("; pass --overwrite to start again")
    pr = store.open_partial(path, _attrs(), "fp", LAYOUT, overwrite=True)
    assert not pr.resumed and np.isnan(pr.read("m/loss")).all()
    pr.close()


def test_lock_refuses_second_writer(tmp_path):
    path = tmp_path / "out.h5"
    first = store.open_partial(path, _attrs(), "fp", LAYOUT)
    with pytest.raises(StoreError) as err:
        store.open_partial(path, _attrs(), "fp", LAYOUT)
    owner = f"{os.getpid()}@{socket.gethostname()}"
    assert str(err.value).startswith(f"{path} is being written by another lt process ({owner}, started ")
    assert (f"; wait for it to finish, or remove {path}.lock if that process is gone. A lock whose heartbeat is "
            f"older than LT_LOCK_STALE_AFTER=120 s is taken over") in str(err.value)
    first.write("m/loss", 0, 9.0)
    first.close()
    with store.open_partial(path, _attrs(), "fp", LAYOUT) as second:
        assert second.resumed and second.read("m/loss")[0] == 9.0


def test_stale_lock_taken_over(tmp_path):
    path = tmp_path / "out.h5"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock = tmp_path / "out.h5.lock"
    lock.write_text(f"{proc.pid}@{socket.gethostname()}")
    with store.open_partial(path, _attrs(), "fp", LAYOUT) as pr:
        assert not pr.resumed
        assert store.read_lock(lock).owner() == f"{os.getpid()}@{socket.gethostname()}"
    assert not lock.exists()
    # a lock held by a live process on another host is respected
    lock.write_text(f"{os.getpid()}@some-other-host")
    with pytest.raises(StoreError, match="is being written by another lt process"):
        store.open_partial(path, _attrs(), "fp", LAYOUT)
    assert lock.read_text() == f"{os.getpid()}@some-other-host"


def test_partial_write_no_space(tmp_path):
    path = tmp_path / "out.h5"
    pr = store.open_partial(path, _attrs(), "fp", LAYOUT)

    class FullDataset:
        def __setitem__(self, index, values):
            raise OSError(errno.ENOSPC, "No space left on device")

    class FullFile:
        def __getitem__(self, key):
            return FullDataset()

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    real, pr.file = pr.file, FullFile()
    try:
        with pytest.raises(StoreError, match=r"no space left on the device holding .*out\.h5\.partial"):
            pr.write("m/loss", 0, 1.0)
        with pytest.raises(StoreError, match="no space left on the device holding"):
            pr.flush()
    finally:
        pr.file = real
        pr.close()


def test_finalize_io_error_keeps_the_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.h5"
    pr = store.open_partial(path, _attrs(), "fp", LAYOUT)
    pr.write("m/loss", 0, 1.0)

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store.os, "replace", failing_replace)
    with pytest.raises(StoreError, match=r"^cannot write .*out\.h5: Input/output error$"):
        pr.finalize()
    monkeypatch.undo()
    assert not path.exists() and store.partial_path(path).exists()
    assert not (tmp_path / "out.h5.lock").exists()  # the lock is released: a re-run resumes
    again = store.open_partial(path, _attrs(), "fp", LAYOUT)
    assert again.resumed and again.read("m/loss")[0] == 1.0
    assert again.finalize() == path and path.exists()
