"""Data that does not fit (issue #18 item 7): an image folder larger than the memory budget streams
batch by batch with bounded memory and gives the numbers of the in-memory path."""
import re
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from landscape_tools import store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import DataSet, load_data
from landscape_tools.errors import ConfigError, DataError
from landscape_tools.evaluate import ensemble_curve
from landscape_tools.hessian import top_eigenvalues
from landscape_tools.models import build_model
from landscape_tools.streaming import StreamedBatches, StreamedDataSet, memory_budget, parse_memory

PER_CLASS = 24          # 2 classes x 24 images of 3 x 32 x 32 in train/ and in val/
SIDE = 32
BUDGET = 256 * 1024     # bytes: the folder decodes to 48 x 3 x 32 x 32 x 8 = 1.1 MiB in float64


def _folder(root, side=SIDE, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(PER_CLASS):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("streaming"))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(3, 2)).double()


class LargestTensor(TorchDispatchMode):
    """The bytes of the largest tensor any operation creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _measured(fn):
    """``fn()``, the largest tensor it created (torch's allocations, seen by a dispatch mode), and, from a
    second call, the peak of its Python and numpy allocations above what was allocated when it started
    (tracemalloc; it includes a constant 64 KiB read buffer per PNG decoded, not data)."""
    with LargestTensor() as mode:
        result = fn()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, mode.largest, peak - start


def _load(folder, memory, **kw):
    return load_data(f"imagefolder:{folder}", "test", batch_size=4, dtype=torch.float64, memory=memory, **kw)


def test_folder_over_budget_streams_with_bounded_memory_and_same_numbers(folder, monkeypatch):
    monkeypatch.setenv("LT_DATA_WORKERS", "0")          # decode in this process, where it is measured
    full_bytes = 2 * PER_CLASS * 3 * SIDE * SIDE * 8
    whole, whole_largest, _ = _measured(lambda: _load(folder, None))
    assert isinstance(whole, DataSet) and whole_largest >= full_bytes > BUDGET   # the measure sees a whole load
    streamed, load_largest, load_peak = _measured(lambda: _load(folder, BUDGET))
    assert isinstance(streamed, StreamedDataSet) and len(streamed) == 2 * PER_CLASS
    assert streamed.decoded_bytes == full_bytes
    # nothing decoded yet: the largest tensor is the labels (the file list of ImageFolder, about 400 bytes of
    # Python objects per file, is what tracemalloc sees)
    assert load_largest == 2 * PER_CLASS * 8 and load_peak < 1000 * 2 * PER_CLASS
    assert torch.equal(streamed.y, whole.y) and streamed.describe() == whole.describe()

    model = _net()
    curve_whole = ensemble_curve(model, whole.batches(), [1, 3], seed=4, max_batch=4)
    curve, largest, peak = _measured(lambda: ensemble_curve(model, streamed.batches(), [1, 3], seed=4,
                                                            max_batch=4))
    batch_bytes = 4 * 3 * SIDE * SIDE * 8
    assert largest < BUDGET and largest < 2 * batch_bytes, largest
    assert peak < BUDGET, peak
    for key in ("nll", "accuracy", "ece", "brier", "sample_log_prob"):
        np.testing.assert_array_equal(getattr(curve, key), getattr(curve_whole, key), err_msg=key)

    # the Hessian of the mean loss over every batch: its products read the batches again each time
    ref = top_eigenvalues(model, whole.batches(), k=1, scope="dataset", form="double", tol=1e-10)
    res, largest, peak = _measured(lambda: top_eigenvalues(model, streamed.batches(), k=1, scope="dataset",
                                                           form="double", tol=1e-10))
    assert res.hvp_count[0] > 3                  # every product read the 12 batches again
    assert largest < BUDGET and peak < BUDGET, (largest, peak)
    np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    # a surface point and the feature-map variance
    from landscape_tools.featvar import feature_variance
    from landscape_tools.surface import evaluate_model
    assert evaluate_model(model, streamed, mc=2, seed=1) == evaluate_model(model, whole, mc=2, seed=1)
    fv = feature_variance(model, streamed.batches(), over="mc", mc=3, layers="0,1", seed=2)
    fv_whole = feature_variance(model, whole.batches(), over="mc", mc=3, layers="0,1", seed=2)
    np.testing.assert_array_equal(fv.variance, fv_whole.variance)
    # the in-memory batches are exactly the streamed ones
    for (sx, sy), (wx, wy) in zip(streamed.batches(), whole.batches()):
        assert torch.equal(sx, wx) and torch.equal(sy, wy)


def test_streamed_batches_read_only_what_is_asked(folder, monkeypatch):
    monkeypatch.setenv("LT_DATA_WORKERS", "0")
    ds = _load(folder, 0)
    reads = []
    original = ds.source.read
    monkeypatch.setattr(ds.source, "read", lambda positions: reads.append(list(positions)) or original(positions))
    batches = ds.batches()
    assert isinstance(batches, StreamedBatches) and batches.sizes == [4] * 12
    view = batches.select([1, 5, 9])                 # what rank 1 of 4 computes
    assert len(view) == 3 and reads == []            # sizes and views read nothing
    [x for x, _ in view]
    assert reads == [[4, 5, 6, 7], [20, 21, 22, 23], [36, 37, 38, 39]]
    reads.clear()
    batches[3], batches[3]                            # asked twice, read once
    assert reads == [[12, 13, 14, 15]]


def test_workers_give_the_same_batches(folder, monkeypatch):
    monkeypatch.setenv("LT_DATA_WORKERS", "0")
    whole = _load(folder, None)
    monkeypatch.setenv("LT_DATA_WORKERS", "2")
    ds = _load(folder, 0)
    assert ds.workers == 2
    got = list(ds.batches())
    again = [ds.batches()[i] for i in (11, 2, 5, 8)]   # restarts of the read-ahead, every 3rd batch
    ds.close()
    for (x, y), (wx, wy) in zip(got, whole.batches()):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    for (x, _), i in zip(again, (11, 2, 5, 8)):
        assert torch.equal(x, whole.batches()[i][0])


def test_imagefolder_is_torchvision_layout_with_image_size(tmp_path):
    # images of different sizes: refused without --image-size, resized and centre-cropped with it
    (tmp_path / "train/a").mkdir(parents=True)
    (tmp_path / "train/b").mkdir(parents=True)
    rng = np.random.default_rng(1)
    pics = {"train/a/0.png": rng.integers(0, 256, (6, 10, 3), dtype=np.uint8),
            "train/b/0.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)}
    for name, arr in pics.items():
        Image.fromarray(arr).save(tmp_path / name)
    with pytest.raises(DataError, match=re.escape("is 8x8 pixels but the first image") + ".*is 10x6: pass "
                                        + re.escape("--image-size N")):
        load_data(f"imagefolder:{tmp_path}", "train")
    ds = load_data(f"imagefolder:{tmp_path}", "train", image_size=4)
    assert tuple(ds.x.shape) == (2, 3, 4, 4) and ds.normalisation["size"] == 4
    # reference: torchvision's own Resize (shorter side) + CenterCrop on the PIL image, then (x/255-0.5)/0.5
    from torchvision.transforms import CenterCrop, PILToTensor, Resize
    ref = PILToTensor()(CenterCrop(4)(Resize(4, antialias=True)(Image.fromarray(pics["train/a/0.png"]))))
    assert torch.equal(ds.x[0], (ref.float() / 255 - 0.5) / 0.5)
    # a train/ + val/ folder (ImageNet's layout): --split test reads val/; train/ only: a clear error
    with pytest.raises(DataError, match=re.escape(f"imagefolder {tmp_path} has train/ but no test/ or val/ folder "
                                                  f"for the test split: use --split train, or add {tmp_path}/val/")):
        load_data(f"imagefolder:{tmp_path}", "test", image_size=4)
    (tmp_path / "val/a").mkdir(parents=True)
    Image.fromarray(pics["train/b/0.png"]).save(tmp_path / "val/a/1.png")
    val = load_data(f"imagefolder:{tmp_path}", "test", image_size=4)
    assert val.y.tolist() == [0] and tuple(val.x.shape) == (1, 3, 4, 4)
    with pytest.raises(DataError, match="--image-size applies to imagefolder: data only"):
        load_data("digits", "test", image_size=4)


def test_memory_sizes_and_environment(monkeypatch):
    assert parse_memory("2GiB") == 2 * 2 ** 30 and parse_memory("500MB") == 500 * 10 ** 6
    assert parse_memory("64k") == 65536 and parse_memory("0") == 0 and parse_memory("1.5KiB") == 1536
    with pytest.raises(ConfigError, match=re.escape("--data-memory 'lots' is not a memory size: expected a number "
                                                    "with an optional unit, e.g. 2GiB")):
        parse_memory("lots")
    monkeypatch.delenv("LT_DATA_MEMORY", raising=False)
    assert memory_budget() == 2 * 2 ** 30
    monkeypatch.setenv("LT_DATA_MEMORY", "3MiB")
    assert memory_budget() == 3 * 2 ** 20 and memory_budget("1KB") == 1000
    monkeypatch.setenv("LT_DATA_MEMORY", "x")
    with pytest.raises(ConfigError, match=re.escape("$LT_DATA_MEMORY 'x' is not a memory size")):
        memory_budget()


def test_streamed_data_has_no_whole_tensor(folder):
    ds = _load(folder, "1KiB")
    with pytest.raises(DataError, match=re.escape("is streamed from disk, not held on the device: its 48 decoded "
                                                  "inputs take 1.12 MiB, more than the memory budget of 1 KiB; "
                                                  "raise --data-memory")):
        ds.x


def test_cli_streams_over_the_budget_and_writes_the_same_file(tmp_path, folder):
    torch.manual_seed(1)
    model = build_model("resnet_mcdo_18", num_classes=2, width=2)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, "resnet_mcdo_18", model.arch_kwargs, {"dataset": f"imagefolder:{folder}"})
    outs = {}
    for name, extra in (("whole", []), ("streamed", ["--data-memory", "16KiB"])):
        for command, args in (("evaluate", ["--mc", "1,2", "--batch-size", "16"]),
                              ("hessian", ["--scope", "dataset", "--top-k", "1", "--batch-size", "16",
                                           "--split", "test", "--samples", "32"])):
            out = tmp_path / f"{name}.{command}.h5"
            res = CliRunner().invoke(cli, [command, str(ckpt), "--device", "cpu", "--image-size", "8", "-o", str(out),
                                           *args, *extra], catch_exceptions=False)
            assert res.exit_code == 0, res.output
            outs[name, command] = store.read_result(out).models["m"]
    for command in ("evaluate", "hessian"):
        a, b = outs["whole", command], outs["streamed", command]
        for key in ("nll", "accuracy", "brier") if command == "evaluate" else ("eigenvalues",):
            np.testing.assert_allclose(b.data[key], a.data[key], rtol=1e-12, atol=0, err_msg=key)
    res = CliRunner().invoke(cli, ["evaluate", str(ckpt), "--data-memory", "lots", "-o", str(tmp_path / "x.h5")])
    assert res.exit_code == 2 and "Invalid value for '--data-memory': 'lots' is not a memory size" in res.output


def test_a_rank_of_a_shared_hessian_reads_only_its_batches(folder, monkeypatch):
    """Rank 1 of 4 under --scope dataset: its products (and gradient) read batches 1, 5, 9 only, and its
    part equals the same batches' part from in-memory data."""
    from landscape_tools.hessian import SharedDataOperator

    monkeypatch.setenv("LT_DATA_WORKERS", "0")
    whole, ds = _load(folder, None), _load(folder, 0)
    reads = []
    original = ds.source.read
    monkeypatch.setattr(ds.source, "read", lambda positions: reads.append(int(positions[0]) // 4) or original(positions))
    model = _net()
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    parts = []
    for data in (ds, whole):
        with SharedDataOperator(model, data.batches(), [1, 5, 9], lambda t: t, rank=1, world_size=4,
                                form="double") as op:
            parts.append((op.matvec(v), op.free_gradient()))
    assert reads and set(reads) == {1, 5, 9}
    torch.testing.assert_close(parts[0][0], parts[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(parts[0][1], parts[1][1], rtol=1e-12, atol=0)
