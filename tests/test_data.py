"""Data specs -> fixed, ordered DataSets: digits, CIFAR python batches, image folders, tensors files."""
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from landscape_tools.data import CIFAR_STATS, load_data, save_tensors
from landscape_tools.errors import DataError


class PlantedPickle:
    """Unpickling this object opens (creates) ``marker`` -- the load must never get that far."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- digits
def test_digits_fixed_stratified_split():
    train = load_data("digits", "train")
    test = load_data("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert tuple(train.x.shape) == (1347, 1, 32, 32) and tuple(test.x.shape) == (450, 1, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.num_classes == test.num_classes == 10
    # stratified: each class's share differs by less than one sample from the full set's share
    counts_tr = np.bincount(train.y.numpy(), minlength=10)
    counts_te = np.bincount(test.y.numpy(), minlength=10)
    total = counts_tr + counts_te
    assert np.all(np.abs(counts_te - total * 0.25) <= 1.0), counts_te
    assert counts_tr.sum() + counts_te.sum() == 1797
    # normalised with the training split's 8x8 pixel statistics, then bilinear 8x8 -> 32x32
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(bunch.images / 16.0, bunch.target, test_size=0.25,
                                              stratify=bunch.target, random_state=0)
    mean, std = x_tr.mean(), x_tr.std()
    assert train.normalisation["mean"][0] == pytest.approx(mean, rel=1e-6)
    assert train.normalisation["std"][0] == pytest.approx(std, rel=1e-6)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x_te)[:, None], size=(32, 32), mode="bilinear",
                                          align_corners=False)
    np.testing.assert_allclose(test.x.numpy(), ((ref - mean) / std).numpy(), rtol=0, atol=1e-5)
    assert test.y.tolist() == y_te.tolist() and train.y.tolist() == y_tr.tolist()
    assert train.normalisation["resize"] == "bilinear 8x8->32x32"
    # the same result twice
    again = load_data("digits", "train")
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)


def test_digits_three_channels_repeat_grey():
    grey = load_data("digits", "test")
    rgb = load_data("digits", "test", in_channels=3)
    assert tuple(rgb.x.shape) == (450, 3, 32, 32)
    for c in range(3):
        assert torch.equal(rgb.x[:, c], grey.x[:, 0])
    assert rgb.normalisation["channels"] == "grey repeated to 3"
    assert torch.equal(rgb.y, grey.y)


def test_digits_takes_no_argument():
    with pytest.raises(DataError, match=re.escape("data spec 'digits:x': 'digits' takes no argument")):
        load_data("digits:x")


# ----------------------------------------------------------------------------- CIFAR
def _write_batch(path: Path, data: np.ndarray, labels, label_key: bytes, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"synthetic", label_key: labels, b"data": data}, f, protocol=protocol)


def _cifar10_folder(root: Path, per_batch: int = 3):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _write_batch(folder / name, data, labels, b"labels", protocol=2 if i % 2 == 0 else 4)
        raw[name] = (data, labels)
    return raw


def _expected_cifar(data: np.ndarray, kind: str) -> np.ndarray:
    """Pixel (n, c, h, w) is byte c*1024 + h*32 + w of row n; then (v/255 - mean_c) / std_c."""
    mean, std = CIFAR_STATS[kind]
    out = np.empty((data.shape[0], 3, 32, 32), np.float32)
    for n in range(data.shape[0]):
        for c in range(3):
            for h in (0, 5, 31):
                for w in (0, 17, 31):
                    v = data[n, c * 1024 + h * 32 + w] / 255.0
                    out[n, c, h, w] = (v - mean[c]) / std[c]
    return out


def test_cifar10_pixel_order_and_normalisation(tmp_path):
    raw = _cifar10_folder(tmp_path)
    train = load_data(f"cifar10:{tmp_path}", "train")
    test = load_data(f"cifar10:{tmp_path}", "test")
    assert tuple(train.x.shape) == (15, 3, 32, 32) and tuple(test.x.shape) == (3, 3, 32, 32)
    assert train.num_classes == test.num_classes == 10
    data = np.concatenate([raw[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = sum((raw[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert train.y.tolist() == labels
    assert test.y.tolist() == raw["test_batch"][1]
    expected = _expected_cifar(data, "cifar10")
    x = train.x.numpy()
    for h in (0, 5, 31):
        for w in (0, 17, 31):
            np.testing.assert_allclose(x[:, :, h, w], expected[:, :, h, w], rtol=0, atol=1e-5)
    # the whole array: an independent vectorised reference
    mean = np.array(CIFAR_STATS["cifar10"][0], np.float32)[None, :, None, None]
    std = np.array(CIFAR_STATS["cifar10"][1], np.float32)[None, :, None, None]
    ref = (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-6)
    assert train.normalisation == {"scale": "1/255", "mean": list(CIFAR_STATS["cifar10"][0]),
                                   "std": list(CIFAR_STATS["cifar10"][1])}
    # the folder holding cifar-10-batches-py and that folder itself both work
    direct = load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", "test")
    assert torch.equal(direct.x, test.x)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {s: rng.integers(0, 256, size=(4, 3072), dtype=np.uint8) for s in ("train", "test")}
    fine = {"train": [99, 0, 42, 7], "test": [3, 98, 1, 50]}
    for s in ("train", "test"):
        with open(folder / s, "wb") as f:
            pickle.dump({b"data": data[s], b"fine_labels": fine[s], b"coarse_labels": [0, 1, 2, 3]}, f, protocol=2)
    for s in ("train", "test"):
        ds = load_data(f"cifar100:{tmp_path}", s)
        assert ds.num_classes == 100
        assert ds.y.tolist() == fine[s]
        mean = np.array(CIFAR_STATS["cifar100"][0], np.float32)[None, :, None, None]
        std = np.array(CIFAR_STATS["cifar100"][1], np.float32)[None, :, None, None]
        ref = (data[s].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0 - mean) / std
        np.testing.assert_allclose(ds.x.numpy(), ref, rtol=0, atol=1e-6)
        # pixel (n, c=2, h=3, w=4) is byte 2*1024 + 3*32 + 4 of row n
        v = data[s][:, 2 * 1024 + 3 * 32 + 4] / 255.0
        ref_px = (v - CIFAR_STATS["cifar100"][0][2]) / CIFAR_STATS["cifar100"][1][2]
        np.testing.assert_allclose(ds.x.numpy()[:, 2, 3, 4], ref_px, rtol=0, atol=1e-5)


def test_cifar_missing_files_named(tmp_path):
    with pytest.raises(DataError) as err:
        load_data(f"cifar10:{tmp_path}", "train")
    msg = str(err.value)
    assert f"cifar10 folder {tmp_path} lacks data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5" in msg
    assert "cifar-10-batches-py/data_batch_1" in msg and "nothing is downloaded" in msg
    with pytest.raises(DataError, match="lacks test: expected the python version"):
        load_data(f"cifar100:{tmp_path}", "test")
    with pytest.raises(DataError, match=re.escape(f"cifar10 folder {tmp_path / 'nope'} does not exist")):
        load_data(f"cifar10:{tmp_path / 'nope'}", "train")


def test_cifar_planted_pickle_refused(tmp_path):
    _cifar10_folder(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as f:
        pickle.dump({b"data": PlantedPickle(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError) as err:
        load_data(f"cifar10:{tmp_path}", "test")
    assert not marker.exists()
    assert f"{batch} is not a readable CIFAR python batch file" in str(err.value)
    assert "refusing to load" in str(err.value)
    # the planted file is live: an ordinary unpickler would have created the marker
    with open(batch, "rb") as f:
        pickle.load(f)[b"data"].close()
    assert marker.exists()


def test_cifar_garbage_batch(tmp_path):
    _cifar10_folder(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match="is not a readable CIFAR python batch file"):
        load_data(f"cifar10:{tmp_path}", "test")


# ----------------------------------------------------------------------------- image folders
def _png(path: Path, rgb) -> np.ndarray:
    from PIL import Image
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[...] = rgb
    arr[0, 1] = (255, 0, 128)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def test_imagefolder_split_folders(tmp_path):
    pix = {}
    pix["train/cat/a.png"] = _png(tmp_path / "train/cat/a.png", (10, 20, 30))
    pix["train/cat/b.png"] = _png(tmp_path / "train/cat/b.png", (40, 50, 60))
    pix["train/ant/z.png"] = _png(tmp_path / "train/ant/z.png", (200, 100, 0))
    pix["test/ant/q.png"] = _png(tmp_path / "test/ant/q.png", (1, 2, 3))
    pix["test/cat/r.png"] = _png(tmp_path / "test/cat/r.png", (4, 5, 6))
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    ds = load_data(f"imagefolder:{tmp_path}", "train")
    # classes sorted by name: ant=0, cat=1; files sorted within a class
    assert ds.y.tolist() == [0, 1, 1]
    assert ds.num_classes == 2 and ds.normalisation["classes"] == ["ant", "cat"]
    order = ["train/ant/z.png", "train/cat/a.png", "train/cat/b.png"]
    expected = np.stack([(pix[k].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5 for k in order]).astype(np.float32)
    np.testing.assert_allclose(ds.x.numpy(), expected, rtol=0, atol=1e-6)
    test = load_data(f"imagefolder:{tmp_path}", "test")
    assert test.y.tolist() == [0, 1]
    np.testing.assert_allclose(test.x.numpy()[1, :, 2, 2], (np.array([4, 5, 6]) / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_imagefolder_flat_and_errors(tmp_path):
    _png(tmp_path / "flat/b/x.png", (0, 0, 0))
    _png(tmp_path / "flat/a/y.png", (255, 255, 255))
    ds = load_data(f"imagefolder:{tmp_path / 'flat'}", "test")
    assert ds.y.tolist() == [0, 1]
    np.testing.assert_array_equal(ds.x.numpy()[0, :, 3, 3], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(ds.x.numpy()[1, :, 3, 3], [-1.0, -1.0, -1.0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected class sub-folders"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "noimg/cls").mkdir(parents=True)
    with pytest.raises(DataError, match="the class folders hold no images"):
        load_data(f"imagefolder:{tmp_path / 'noimg'}")
    with pytest.raises(DataError, match=re.escape(f"imagefolder {tmp_path / 'missing'} does not exist")):
        load_data(f"imagefolder:{tmp_path / 'missing'}")


# ----------------------------------------------------------------------------- tensors files
def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(7, 2, 3, 3)).astype(np.float32), "y": np.array([3, 0, 2, 2, 1, 0, 3]),
            "x_test": rng.normal(size=(5, 2, 3, 3)).astype(np.float32), "y_test": np.array([1, 1, 0, 3, 2])}


def _write_tensors(path: Path, arrays: dict) -> None:
    if path.suffix == ".npz":
        save_tensors(path, **arrays)
    elif path.suffix == ".pt":
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    else:
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f.create_dataset(k, data=v)


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".h5"])
def test_tensors_used_exactly_as_stored(tmp_path, suffix):
    arrays = _arrays()
    path = tmp_path / f"data{suffix}"
    _write_tensors(path, arrays)
    for split, (xk, yk) in (("train", ("x", "y")), ("test", ("x_test", "y_test"))):
        ds = load_data(f"tensors:{path}", split)
        assert ds.x.dtype == torch.float32
        assert ds.x.numpy().tobytes() == arrays[xk].tobytes()  # bitwise, order kept
        assert ds.y.tolist() == arrays[yk].tolist()
        assert ds.num_classes == 4
        assert ds.normalisation == {"none": "used exactly as stored"}


def test_tensors_float64_kept_bitwise(tmp_path):
    x = np.random.default_rng(3).normal(size=(4, 5))
    path = tmp_path / "d.npz"
    save_tensors(path, x=x, y=np.array([0, 1, 0, 1]))
    ds = load_data(f"tensors:{path}", dtype=torch.float64)
    assert ds.x.dtype == torch.float64 and ds.x.numpy().tobytes() == x.tobytes()


def test_tensors_missing_test_split(tmp_path):
    path = tmp_path / "train_only.npz"
    save_tensors(path, x=np.zeros((3, 2), np.float32), y=np.array([0, 1, 0]))
    assert len(load_data(f"tensors:{path}", "train")) == 3
    with pytest.raises(DataError) as err:
        load_data(f"tensors:{path}", "test")
    assert str(err.value) == (f"tensors file {path} has no 'x_test' and 'y_test' for the test split; it holds x, y "
                              f"(use --split train, or add x_test and y_test)")


def test_tensors_bad_files(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"tensors file {tmp_path / 'no.npz'} does not exist")):
        load_data(f"tensors:{tmp_path / 'no.npz'}")
    odd = tmp_path / "d.csv"
    odd.write_text("1,2")
    with pytest.raises(DataError, match="unknown extension '.csv'; expected .npz, .pt or .h5"):
        load_data(f"tensors:{odd}")
    bad = tmp_path / "rows.npz"
    save_tensors(bad, x=np.zeros((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match="x has 3 rows but y has 2"):
        load_data(f"tensors:{bad}")
    floats = tmp_path / "floaty.npz"
    save_tensors(floats, x=np.zeros((2, 2)), y=np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="y must be a 1-D integer class vector"):
        load_data(f"tensors:{floats}")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match="cannot read tensors file"):
        load_data(f"tensors:{corrupt}")


# ----------------------------------------------------------------------------- subsets and batches
def test_samples_seeded_subset(tmp_path):
    path = tmp_path / "d.npz"
    x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    y = np.arange(20) % 4
    save_tensors(path, x=x, y=y)
    ds = load_data(f"tensors:{path}", samples=6, seed=11)
    expected = np.sort(np.random.default_rng(11).choice(20, size=6, replace=False))
    np.testing.assert_array_equal(ds.indices, expected)
    assert list(ds.indices) == sorted(ds.indices) and len(set(ds.indices.tolist())) == 6
    np.testing.assert_array_equal(ds.x.numpy(), x[expected])
    np.testing.assert_array_equal(ds.y.numpy(), y[expected])
    desc = ds.describe()
    assert desc["indices"] == [int(i) for i in expected] and desc["sample_seed"] == 11
    assert desc["num_samples"] == 6 and desc["input_shape"] == [3]
    same = load_data(f"tensors:{path}", samples=6, seed=11)
    np.testing.assert_array_equal(same.indices, ds.indices)
    other = load_data(f"tensors:{path}", samples=6, seed=12)
    assert other.indices.tolist() != ds.indices.tolist()
    everything = load_data(f"tensors:{path}", samples=20, seed=11)
    assert everything.indices is None and everything.describe()["sample_seed"] is None
    np.testing.assert_array_equal(everything.x.numpy(), x)
    with pytest.raises(DataError, match="--samples 0 must be at least 1"):
        load_data(f"tensors:{path}", samples=0)


def test_batches_fixed_order_and_sizes(tmp_path):
    path = tmp_path / "d.npz"
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    save_tensors(path, x=x, y=np.arange(10) % 3)
    ds = load_data(f"tensors:{path}", batch_size=4)
    assert ds.batch_sizes() == [4, 4, 2]
    assert ds.batch_sizes(3) == [3, 3, 3, 1]
    assert ds.batch_sizes(10) == [10] and ds.batch_sizes(50) == [10]
    batches = ds.batches()
    assert torch.equal(torch.cat([bx for bx, _ in batches]), ds.x)
    assert torch.equal(torch.cat([by for _, by in batches]), ds.y)
    assert batches[1][0].data_ptr() == ds.x[4].data_ptr()  # a view, not a copy
    again = ds.batches()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    with pytest.raises(DataError, match="batch size 0 must be at least 1"):
        load_data(f"tensors:{path}", batch_size=0)


def test_to_casts_floating_inputs(tmp_path):
    path = tmp_path / "d.npz"
    save_tensors(path, x=np.ones((2, 2), np.float32), y=np.array([0, 1]))
    ds = load_data(f"tensors:{path}").to("cpu", torch.float64)
    assert ds.x.dtype == torch.float64 and ds.y.dtype == torch.int64


# ----------------------------------------------------------------------------- bad specs and data
def test_unknown_spec_and_bad_split():
    with pytest.raises(DataError) as err:
        load_data("mnist:/tmp")
    assert str(err.value) == ("unknown data spec 'mnist:/tmp': expected digits, cifar10:DIR, cifar100:DIR, "
                              "imagefolder:DIR or tensors:FILE")
    with pytest.raises(DataError, match=re.escape("data spec 'tensors' needs a path: tensors:FILE")):
        load_data("tensors")
    with pytest.raises(DataError, match=re.escape("data spec 'cifar10:' needs a path: cifar10:DIR")):
        load_data("cifar10:")
    with pytest.raises(DataError, match=re.escape("split 'val' is not 'train' or 'test'")):
        load_data("digits", "val")


def test_empty_data(tmp_path):
    path = tmp_path / "empty.npz"
    save_tensors(path, x=np.zeros((0, 3, 4, 4), np.float32), y=np.zeros((0,), np.int64))
    with pytest.raises(DataError) as err:
        load_data(f"tensors:{path}")
    assert str(err.value) == f"data 'tensors:{path}' (train) is empty: nothing to analyse"


def test_negative_labels(tmp_path):
    path = tmp_path / "neg.npz"
    save_tensors(path, x=np.zeros((3, 2), np.float32), y=np.array([0, -2, 1]))
    with pytest.raises(DataError) as err:
        load_data(f"tensors:{path}")
    assert str(err.value) == f"data 'tensors:{path}' has negative labels (min -2); labels must be 0..C-1"


def test_channel_mismatch(tmp_path):
    path = tmp_path / "rgb.npz"
    save_tensors(path, x=np.zeros((2, 3, 4, 4), np.float32), y=np.array([0, 1]))
    with pytest.raises(DataError, match="has 3 channels but the model expects 1"):
        load_data(f"tensors:{path}", in_channels=1)
