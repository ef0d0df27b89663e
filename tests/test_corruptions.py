"""Corruptions (issue #17 item 3): each formula against a hand computation on a tiny image, severity 0
is the identity, seeding, the [0, 1] pixel-space round trip, `lt evaluate --corrupt` against evaluating
pre-corrupted data directly, the published-files spec, and the severity figure against the file."""
import colorsys
import json
import math
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import corruptions as C
from landscape_tools import store
from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import CIFAR_STATS, load_data, read_cifar_c, save_tensors
from landscape_tools.errors import ConfigError, DataError
from landscape_tools.evaluate import ensemble_curve
from landscape_tools.models import build_model
from landscape_tools.seeds import CORRUPTION, derive_seed


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def tiny_image(c=2, h=3, w=3, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(0.05, 0.95, size=(1, c, h, w)))


def reflect(i, n):
    """Half-sample symmetric index, written out: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ..."""
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


def correlate(img, kernel):
    """Each channel of img (C, H, W) correlated with the square kernel, symmetric borders, by loops."""
    k = kernel.shape[0] // 2
    c, h, w = img.shape
    out = np.zeros_like(img)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                out[ch, i, j] = sum(kernel[a + k, b + k] * img[ch, reflect(i + a, h), reflect(j + b, w)]
                                    for a in range(-k, k + 1) for b in range(-k, k + 1))
    return out


# ----------------------------------------------------------------------------- each formula by hand
@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise", "shot_noise", "impulse_noise"])
@pytest.mark.parametrize("severity", [1, 5])
def test_noise_corruptions_by_hand(name, severity):
    p = tiny_image()
    out = C.corrupt_pixels(p, name, severity, seed=3, indices=[7]).numpy()[0]
    c = C.PARAMETERS[name][severity - 1]
    g = C.sample_generator(3, name, severity, 7)
    # the documented generator: seeded derive_seed(seed, CORRUPTION, crc32(name), severity, position)
    by_hand = torch.Generator().manual_seed(derive_seed(3, CORRUPTION, zlib.crc32(name.encode()), severity, 7))
    assert torch.equal(torch.rand(5, generator=C.sample_generator(3, name, severity, 7), dtype=torch.float64),
                       torch.rand(5, generator=by_hand, dtype=torch.float64))
    x = p.numpy()[0]
    if name in ("gaussian_noise", "speckle_noise"):
        z = torch.randn((2, 3, 3), generator=g, dtype=torch.float64).numpy()
        expected = x + c * z if name == "gaussian_noise" else x + x * c * z
    elif name == "shot_noise":
        expected = torch.poisson(torch.from_numpy(x * c), generator=g).numpy() / c
        assert np.all(np.abs(np.round(out * c) - out * c) < 1e-9 + (out >= 1))   # whole photon counts / c
    else:
        u = torch.rand((2, 3, 3), generator=g, dtype=torch.float64).numpy()
        expected = np.where(u < c / 2, 0.0, np.where(u < c, 1.0, x))
    np.testing.assert_allclose(out, np.clip(expected, 0, 1), rtol=0, atol=1e-15)


def test_noise_statistics_match_the_formulas():
    """On a large flat grey image: the residuals have the documented moments."""
    p = torch.full((1, 3, 128, 128), 0.5, dtype=torch.float64)
    g = C.corrupt_pixels(p, "gaussian_noise", 5, seed=1) - 0.5
    assert abs(g.std().item() - 0.10) < 0.003 and abs(g.mean().item()) < 0.002
    s = C.corrupt_pixels(p, "shot_noise", 5, seed=1)         # Poisson(25)/50: mean 0.5, variance 0.5/50
    assert abs(s.mean().item() - 0.5) < 0.003 and abs(s.var().item() - 0.01) < 0.0006
    imp = C.corrupt_pixels(p, "impulse_noise", 5, seed=1)
    assert abs((imp == 0).double().mean().item() - 0.035) < 0.003
    assert abs((imp == 1).double().mean().item() - 0.035) < 0.003
    sp = C.corrupt_pixels(p, "speckle_noise", 5, seed=1) - 0.5
    assert abs(sp.std().item() - 0.5 * 0.20) < 0.003


@pytest.mark.parametrize("severity", [1, 5])
def test_gaussian_blur_by_hand(severity):
    p = tiny_image(h=4, w=5)
    sigma = C.PARAMETERS["gaussian_blur"][severity - 1]
    r = int(4 * sigma + 0.5)
    w = np.array([math.exp(-k * k / (2 * sigma * sigma)) for k in range(-r, r + 1)])
    w /= w.sum()
    expected = correlate(p.numpy()[0], np.outer(w, w))
    out = C.corrupt_pixels(p, "gaussian_blur", severity).numpy()[0]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)
    from scipy.ndimage import gaussian_filter            # an independent implementation of the same filter
    ref = np.stack([gaussian_filter(ch, sigma, mode="reflect", truncate=4.0) for ch in p.numpy()[0]])
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("severity", [1, 4, 5])
def test_defocus_blur_by_hand(severity):
    radius, alias = C.PARAMETERS["defocus_blur"][severity - 1]
    R = math.ceil(radius)
    disk = np.array([[1.0 if i * i + j * j <= radius * radius else 0.0 for j in range(-R, R + 1)]
                     for i in range(-R, R + 1)])
    disk /= disk.sum()
    e = math.exp(-1 / (2 * alias * alias))
    g = np.array([e, 1.0, e]) / (1 + 2 * e)
    g2 = np.outer(g, g)
    size = 2 * R + 3
    kernel = np.zeros((size, size))
    for i in range(2 * R + 1):                           # full convolution of the disk with the 3x3 Gaussian
        for j in range(2 * R + 1):
            kernel[i:i + 3, j:j + 3] += disk[i, j] * g2
    np.testing.assert_allclose(C.defocus_kernel(radius, alias).numpy(), kernel, rtol=0, atol=1e-15)
    if severity == 4:                                    # radius 1: the plus-shaped disk of 5 pixels
        assert disk[R, R] == disk[0, R] == 0.2 and disk[0, 0] == 0
    p = tiny_image(h=5, w=4)
    out = C.corrupt_pixels(p, "defocus_blur", severity).numpy()[0]
    np.testing.assert_allclose(out, correlate(p.numpy()[0], kernel), rtol=0, atol=1e-14)


def test_contrast_by_hand():
    p = torch.tensor([[[[0.0, 0.2], [0.4, 1.0]], [[0.5, 0.5], [0.5, 0.9]]]], dtype=torch.float64)
    out = C.corrupt_pixels(p, "contrast", 2).numpy()[0]   # c = 0.5; channel means 0.4 and 0.6
    np.testing.assert_allclose(out, [[[0.2, 0.3], [0.4, 0.7]], [[0.55, 0.55], [0.55, 0.75]]], atol=1e-15)


def test_brightness_equals_the_hsv_round_trip():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, size=(1, 3, 3, 3))
    p[0, :, 0, 0] = 0.0                                  # black: HSV value 0
    p[0, :, 1, 1] = [0.95, 0.5, 0.1]                     # value saturates at 1
    for severity in (1, 5):
        c = C.PARAMETERS["brightness"][severity - 1]
        expected = np.zeros_like(p)
        for i in range(3):
            for j in range(3):
                h, s, v = colorsys.rgb_to_hsv(*p[0, :, i, j])
                expected[0, :, i, j] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
        out = C.corrupt_pixels(torch.from_numpy(p), "brightness", severity).numpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-14)
    grey = torch.tensor([[[[0.0, 0.5], [0.8, 0.99]]]], dtype=torch.float64)
    np.testing.assert_allclose(C.corrupt_pixels(grey, "brightness", 5).numpy(), [[[[0.3, 0.8], [1.0, 1.0]]]],
                               atol=1e-15)


def test_pixelate_by_hand():
    p = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4) / 16
    a = p.numpy()[0, 0]
    # severity 5: c = 0.65, a 2x2 grid of 2x2 block means, each block repeated
    out5 = C.corrupt_pixels(p, "pixelate", 5).numpy()[0, 0]
    blocks = np.array([[a[:2, :2].mean(), a[:2, 2:].mean()], [a[2:, :2].mean(), a[2:, 2:].mean()]])
    np.testing.assert_allclose(out5, np.kron(blocks, np.ones((2, 2))), atol=1e-15)
    # severity 1: c = 0.95, a 3x3 grid; cell i averages rows floor(4i/3)..ceil(4(i+1)/3)-1 = 0-1, 1-2, 2-3;
    # output row j takes cell floor(3j/4) = 0, 0, 1, 2
    spans = [(0, 2), (1, 3), (2, 4)]
    cells = np.array([[a[r0:r1, c0:c1].mean() for c0, c1 in spans] for r0, r1 in spans])
    pick = [0, 0, 1, 2]
    np.testing.assert_allclose(C.corrupt_pixels(p, "pixelate", 1).numpy()[0, 0], cells[np.ix_(pick, pick)],
                               atol=1e-15)


def test_results_are_clipped_to_pixel_range():
    p = torch.tensor([[[[0.0, 1.0], [0.01, 0.99]]]], dtype=torch.float64)
    for name in C.CORRUPTIONS:
        out = C.corrupt_pixels(p, name, 5, seed=2)
        assert out.min() >= 0 and out.max() <= 1, name


# ----------------------------------------------------------------------------- identity, seeding, data sets
def test_severity_zero_is_the_identity():
    p = tiny_image()
    ds = load_data("digits", "test", samples=10)
    for name in C.CORRUPTIONS:
        assert torch.equal(C.corrupt_pixels(p, name, 0, seed=4), p)
        assert C.corrupt_dataset(ds, name, 0, seed=4) is ds
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        C.corrupt_pixels(p, "fog", 0)


def test_seeded_and_independent_of_subset():
    full = load_data("digits", "test")
    sub = load_data("digits", "test", samples=25, seed=9)
    for name in ("gaussian_noise", "impulse_noise"):
        a = C.corrupt_dataset(full, name, 3, seed=11)
        b = C.corrupt_dataset(full, name, 3, seed=11, chunk=7)          # chunking does not matter
        assert torch.equal(a.x, b.x)
        assert not torch.equal(a.x, C.corrupt_dataset(full, name, 3, seed=12).x)
        assert not torch.equal(a.x, full.x)
        # an image gets the same noise whatever subset it is drawn in
        assert torch.equal(C.corrupt_dataset(sub, name, 3, seed=11).x, a.x[torch.from_numpy(sub.indices)])


def test_pixel_space_round_trip_on_digits():
    """Un-normalise with the data set's mean and std, corrupt, clip, re-normalise."""
    ds = load_data("digits", "test", samples=12)
    mean, std = ds.normalisation["mean"][0], ds.normalisation["std"][0]
    pixels = ds.x.double().numpy() * std + mean
    assert pixels.min() > -1e-6 and pixels.max() < 1 + 1e-6
    m = pixels.mean(axis=(2, 3), keepdims=True)
    expected = (np.clip((np.clip(pixels, 0, 1) - m) * 0.3 + m, 0, 1) - mean) / std
    out = C.corrupt_dataset(ds, "contrast", 4)
    np.testing.assert_allclose(out.x.numpy(), expected, rtol=0, atol=1e-6)
    assert torch.equal(out.y, ds.y) and "contrast severity 4" in out.normalisation["corruption"]


def test_parse_corruptions():
    assert C.parse_corruptions(["contrast:2", "gaussian_noise"]) == \
        [("gaussian_noise", s) for s in range(1, 6)] + [("contrast", 2)]
    assert len(C.parse_corruptions(["all"])) == 5 * len(C.CORRUPTIONS) >= 35
    assert C.parse_corruptions("all:3,contrast:3") == [(n, 3) for n in C.CORRUPTIONS]
    with pytest.raises(ConfigError, match=r"unknown corruption 'fog'.*gaussian_noise"):
        C.parse_corruptions(["fog"])
    for bad in ("contrast:0", "contrast:6", "contrast:x", "contrast:"):
        with pytest.raises(ConfigError, match="not a whole number from 1 to 5"):
            C.parse_corruptions([bad])


def test_pool_curves_equals_one_pass_over_all_sets():
    torch.manual_seed(0)
    model = build_model("resnet_dnn_18", width=2, num_classes=3, in_channels=1).double().eval()
    rng = np.random.default_rng(0)
    sets = [(torch.from_numpy(rng.normal(size=(n, 1, 8, 8))), torch.from_numpy(rng.integers(0, 3, n)))
            for n in (5, 9)]
    curves = [ensemble_curve(model, [s], (1, 2)) for s in sets]
    pooled = C.pool_curves(curves)
    direct = ensemble_curve(model, sets, (1, 2))
    for key in ("nll", "accuracy", "ece", "brier", "bin_accuracy", "bin_confidence"):
        np.testing.assert_allclose(getattr(pooled, key), getattr(direct, key), rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(pooled.bin_counts, direct.bin_counts)
    np.testing.assert_array_equal(pooled.sample_log_prob, direct.sample_log_prob)


# ----------------------------------------------------------------------------- lt evaluate --corrupt
@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    torch.manual_seed(0)
    model = build_model("resnet_mcdo_18", width=2, num_classes=10, in_channels=1)
    save_checkpoint(root / "m.pt", model, "resnet_mcdo_18", model.arch_kwargs, {"dataset": "digits"})
    return root


def test_evaluate_corrupt_equals_evaluating_precorrupted_data(digits_model):
    root = digits_model
    out = root / "robust.h5"
    res = run("evaluate", root / "m.pt", "--samples", "40", "--mc", "1,3", "--batch-size", "16", "--seed", "2",
              "--corrupt", "contrast:3", "--corrupt", "gaussian_noise:2", "-o", out)
    assert res.exit_code == 0, res.output
    assert "gaussian_noise     2" in res.output and "contrast           3" in res.output
    node = store.read_result(out).models["m"]
    group = node.groups["corruptions"]
    assert group.attrs["clean"] is True and group.attrs["source"] == "generated"
    assert json.loads(group.attrs["corruptions"]) == ["gaussian_noise", "contrast"]
    assert json.loads(group.groups["contrast"].attrs["parameters"]) == [0.4]
    assert store.read_result(out).config["corrupt"] == ["gaussian_noise:2", "contrast:3"]

    # the clean arrays are those of a run without --corrupt
    plain = root / "plain.h5"
    assert run("evaluate", root / "m.pt", "--samples", "40", "--mc", "1,3", "--batch-size", "16", "--seed", "2",
               "-o", plain).exit_code == 0
    for key in ("nll", "accuracy", "ece", "brier"):
        np.testing.assert_array_equal(node[key], store.read_result(plain).models["m"][key])

    # pre-corrupt the same 40 images independently (numpy formulas, the documented generator), save as tensors
    ds = load_data("digits", "test", samples=40, seed=2)
    mean, std = ds.normalisation["mean"][0], ds.normalisation["std"][0]
    pixels = np.clip(ds.x.double().numpy() * std + mean, 0, 1)
    m = pixels.mean(axis=(2, 3), keepdims=True)
    contrast = np.clip((pixels - m) * 0.4 + m, 0, 1)
    noise = np.stack([torch.randn(pixels.shape[1:], dtype=torch.float64,
                                  generator=C.sample_generator(2, "gaussian_noise", 2, int(i))).numpy()
                      for i in ds.indices])
    noisy = np.clip(pixels + 0.06 * noise, 0, 1)
    for name, images in (("contrast", contrast), ("gaussian_noise", noisy)):
        data = root / f"{name}.npz"
        x = ((images - mean) / std).astype(np.float32)
        save_tensors(data, x=x, y=ds.y.numpy(), x_test=x, y_test=ds.y.numpy())
        direct = root / f"{name}.h5"
        res = run("evaluate", root / "m.pt", "--data", f"tensors:{data}", "--mc", "1,3", "--batch-size", "16",
                  "--seed", "2", "-o", direct)
        assert res.exit_code == 0, res.output
        d = store.read_result(direct).models["m"]
        sub = group.groups[name]
        assert sub.data["severity"].tolist() == [3 if name == "contrast" else 2]
        np.testing.assert_array_equal(sub.data["n_samples"], [1, 3])
        assert sub.data["num_samples"].tolist() == [40]
        for key in ("nll", "accuracy", "ece", "brier"):
            np.testing.assert_allclose(sub.data[key][0], d[key], rtol=1e-6, atol=1e-9, err_msg=f"{name} {key}")


def test_corruption_figure_draws_the_file(digits_model):
    from landscape_tools.plotting import figure, pyplot

    root = digits_model
    out = root / "two.h5"
    assert run("evaluate", root / "m.pt", "--samples", "20", "--mc", "1,2", "--corrupt", "brightness",
               "--corrupt", "pixelate:2", "--corrupt", "pixelate:4", "-o", out).exit_code == 0
    node = store.read_result(out).models["m"]
    fig = figure([out], kind="corruption")
    try:
        for ax, (key, scale) in zip(fig.axes, (("nll", 1), ("accuracy", 100), ("ece", 100))):
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert sorted(lines) == ["m, N = 1", "m, N = 2"]
            b, px = node.groups["corruptions"].groups["brightness"], node.groups["corruptions"].groups["pixelate"]
            for j, n in enumerate((1, 2)):
                expected = [node[key][j]] + [
                    np.mean([b.data[key][s - 1, j]] + [px.data[key][k, j] for k, t in enumerate(px.data["severity"])
                                                       if t == s]) for s in range(1, 6)]
                line = lines[f"m, N = {n}"]
                np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2, 3, 4, 5])
                np.testing.assert_allclose(line.get_ydata(), np.array(expected) * scale, rtol=1e-12)
    finally:
        pyplot().close(fig)
    res = run("plot", out, "--kind", "corruption", "-o", root / "c.png")
    assert res.exit_code == 0, res.output and (root / "c.png").stat().st_size > 0
    plain = root / "plain2.h5"
    assert run("evaluate", root / "m.pt", "--samples", "20", "--mc", "1", "-o", plain).exit_code == 0
    res = run("plot", plain, "--kind", "corruption", "-o", root / "d.png")
    assert res.exit_code != 0 and "holds no corruption results: run lt evaluate --corrupt all" in res.output
    assert not (root / "d.png").exists()


def test_corrupt_bad_input(digits_model, tmp_path):
    root = digits_model
    res = run("evaluate", root / "m.pt", "--corrupt", "fog", "-o", tmp_path / "x.h5")
    assert res.exit_code != 0 and "unknown corruption 'fog'" in res.output and "gaussian_noise" in res.output
    res = run("evaluate", root / "m.pt", "--corrupt", "contrast:9", "-o", tmp_path / "x.h5")
    assert res.exit_code != 0 and "severity '9' is not a whole number from 1 to 5" in res.output
    data = tmp_path / "t.npz"
    save_tensors(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64),
                 x_test=np.zeros((4, 1, 8, 8), np.float32), y_test=np.zeros(4, np.int64))
    res = run("evaluate", root / "m.pt", "--data", f"tensors:{data}", "--corrupt", "contrast", "-o", tmp_path / "x.h5")
    assert res.exit_code != 0 and "pixel scale is unknown" in res.output
    assert not (tmp_path / "x.h5").exists()


# ----------------------------------------------------------------------------- the published files
def fake_cifar_c(root, names=("gaussian_noise", "contrast"), n=6, classes=100, repeat_labels=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        np.save(root / f"{name}.npy", rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8))
    labels = rng.integers(0, classes, n)
    np.save(root / "labels.npy", np.tile(labels, 5) if repeat_labels else labels)
    return root


def test_read_cifar_c_by_hand(tmp_path):
    root = fake_cifar_c(tmp_path / "c100")
    raw = np.load(root / "contrast.npy")
    mean, std = CIFAR_STATS["cifar100"]
    ds = read_cifar_c(f"cifar100c:{root}", "contrast", 4)
    expected = (raw[18:24].transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(ds.x.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ds.y.numpy(), np.load(root / "labels.npy")[18:24])
    assert ds.num_classes == 100 and ds.split == "test"
    sub = read_cifar_c(f"cifar100c:{root}", "contrast", 4, samples=3, seed=5)
    np.testing.assert_array_equal(sub.x.numpy(), ds.x.numpy()[sub.indices])
    np.testing.assert_array_equal(sub.indices, np.sort(np.random.default_rng(5).choice(6, 3, replace=False)))
    with pytest.raises(DataError, match="lt evaluate"):
        load_data(f"cifar100c:{root}")
    with pytest.raises(DataError, match="has no fog.npy"):
        read_cifar_c(f"cifar100c:{root}", "fog", 1)
    with pytest.raises(DataError, match="does not exist"):
        read_cifar_c(f"cifar10c:{tmp_path / 'nowhere'}", "contrast", 1)
    (root / "labels.npy").unlink()
    with pytest.raises(DataError, match="no labels.npy"):
        C.cifar_c_sets(f"cifar100c:{root}", None, None, 0, 8, 3, "cpu")


def test_evaluate_published_files_equal_evaluating_them_directly(tmp_path):
    root = fake_cifar_c(tmp_path / "c10", classes=10, repeat_labels=False)
    torch.manual_seed(0)
    model = build_model("resnet_dnn_18", width=2, num_classes=10)
    save_checkpoint(tmp_path / "m.pt", model, "resnet_dnn_18", model.arch_kwargs, {})
    out = tmp_path / "c.h5"
    res = run("evaluate", tmp_path / "m.pt", "--data", f"cifar10c:{root}", "--mc", "1,2", "--corrupt",
              "gaussian_noise:2", "--corrupt", "contrast:5", "-o", out)
    assert res.exit_code == 0, res.output
    node = store.read_result(out).models["m"]
    group = node.groups["corruptions"]
    assert group.attrs["clean"] is False and group.attrs["source"] == f"cifar10c:{root}"
    mean, std = CIFAR_STATS["cifar10"]
    labels = np.load(root / "labels.npy")
    xs = []
    for name, severity in (("gaussian_noise", 2), ("contrast", 5)):
        raw = np.load(root / f"{name}.npy")[(severity - 1) * 6:severity * 6]
        x = ((raw.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) /
             np.array(std)[:, None, None]).astype(np.float32)
        xs.append(x)
        data = tmp_path / f"{name}.npz"
        save_tensors(data, x=x, y=labels, x_test=x, y_test=labels)
        direct = tmp_path / f"{name}.h5"
        assert run("evaluate", tmp_path / "m.pt", "--data", f"tensors:{data}", "--mc", "1,2", "-o",
                   direct).exit_code == 0
        d = store.read_result(direct).models["m"]
        assert group.groups[name].data["severity"].tolist() == [severity]
        for key in ("nll", "accuracy", "ece", "brier"):
            np.testing.assert_allclose(group.groups[name].data[key][0], d[key], rtol=1e-6, atol=1e-9)
    # the top-level arrays pool the chosen sets: equal to evaluating their concatenation
    data = tmp_path / "both.npz"
    x = np.concatenate(xs)
    save_tensors(data, x=x, y=np.tile(labels, 2), x_test=x, y_test=np.tile(labels, 2))
    assert run("evaluate", tmp_path / "m.pt", "--data", f"tensors:{data}", "--mc", "1,2", "-o",
               tmp_path / "both.h5").exit_code == 0
    both = store.read_result(tmp_path / "both.h5").models["m"]
    for key in ("nll", "accuracy", "ece", "brier"):
        np.testing.assert_allclose(node[key], both[key], rtol=1e-6, atol=1e-9)
    assert node.attrs["num_samples"] == 12 and "pooled" in node.attrs["note"]
    # without --corrupt: every file at every severity
    res = run("evaluate", tmp_path / "m.pt", "--data", f"cifar10c:{root}", "--mc", "1", "-o", tmp_path / "all.h5")
    assert res.exit_code == 0, res.output
    group = store.read_result(tmp_path / "all.h5").models["m"].groups["corruptions"]
    assert sorted(group.groups) == ["contrast", "gaussian_noise"]
    assert group.groups["contrast"].data["severity"].tolist() == [1, 2, 3, 4, 5]
