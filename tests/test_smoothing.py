"""Spatial smoothing: box blur, filter blur (kernel, padding modes) and every Prob kind, in float64."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_tools.models import build_model, make_blur
from landscape_tools.models.smoothing import DEFAULT_TAU, BoxBlur2x2, FilterBlur, Smoothing


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- box blur
def test_box_blur_is_avgpool_and_grows():
    x = _rand(2, 3, 32, 32)
    blur = make_blur(3, (1, 1), "constant")
    assert isinstance(blur, BoxBlur2x2) and list(blur.state_dict()) == []
    y = blur(x)
    assert tuple(y.shape) == (2, 3, 33, 33)
    assert torch.equal(y, nn.AvgPool2d(2, stride=1, padding=1)(x))
    assert isinstance(make_blur(3, (1, 1), "zero"), BoxBlur2x2)


def test_box_blur_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    # zero padding counts in the 2x2 average
    expected = torch.tensor([[1, 3, 2], [4, 10, 6], [3, 7, 4]], dtype=torch.float64) / 4
    assert torch.equal(BoxBlur2x2()(x)[0, 0], expected)


# ----------------------------------------------------------------------------- filter blur
def test_filter_blur_kernel_values():
    blur = FilterBlur(4, (1, 2, 1))
    expected = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 16
    assert tuple(blur.filter.shape) == (4, 1, 3, 3)
    for c in range(4):
        assert torch.equal(blur.filter[c, 0], expected)
    assert not blur.filter.requires_grad
    assert list(blur.state_dict()) == ["filter"]
    assert blur.pad == (1, 1, 1, 1)
    x = _rand(2, 4, 7, 5)
    assert tuple(blur(x).shape) == (2, 4, 7, 5)  # "same" size
    # an even filter pads one more after than before, and keeps the size
    even = FilterBlur(1, (1, 3, 3, 1), "constant")
    assert even.pad == (1, 2, 1, 2)
    assert tuple(even(_rand(1, 1, 6, 6)).shape) == (1, 1, 6, 6)


def _reference_blur(x: np.ndarray, sfilter, pad_mode: str) -> np.ndarray:
    """Brute-force depthwise correlation with the normalised outer-product kernel."""
    s = np.asarray(sfilter, dtype=np.float64)
    k = np.outer(s, s) / np.outer(s, s).sum()
    size = len(s)
    before, after = (size - 1) // 2, math.ceil((size - 1) / 2)
    np_mode = {"constant": "constant", "replicate": "edge", "reflect": "reflect", "circular": "wrap"}[pad_mode]
    padded = np.pad(x, ((0, 0), (0, 0), (before, after), (before, after)), mode=np_mode)
    n, c, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = np.einsum("ncab,ab->nc", padded[:, :, i:i + size, j:j + size], k)
    return out


@pytest.mark.parametrize("pad_mode", ["constant", "replicate", "reflect", "circular"])
@pytest.mark.parametrize("sfilter", [(1, 2, 1), (1, 3, 3, 1), (1, 1)])
def test_filter_blur_against_brute_force(pad_mode, sfilter):
    x = _rand(2, 3, 6, 5, seed=1)
    blur = FilterBlur(3, sfilter, pad_mode).double()
    np.testing.assert_allclose(blur(x).numpy(), _reference_blur(x.numpy(), sfilter, pad_mode), rtol=0, atol=1e-13)


def test_pad_modes_at_borders():
    ones = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    # replicate, reflect and circular keep a constant image constant
    for mode in ("replicate", "reflect", "circular"):
        assert torch.allclose(FilterBlur(1, (1, 2, 1), mode).double()(ones), ones, rtol=0, atol=1e-15)
    # zero padding: a corner sees 9/16 of the kernel, an edge 12/16
    out = FilterBlur(1, (1, 2, 1), "zero").double()(ones)[0, 0]
    assert out[0, 0].item() == pytest.approx(9 / 16, abs=1e-15)
    assert out[0, 1].item() == pytest.approx(12 / 16, abs=1e-15)
    assert out[1, 1].item() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="pad_mode 'mirror' is not one of constant, zero, replicate, reflect, circular"):
        FilterBlur(1, (1, 2, 1), "mirror")
    with pytest.raises(ValueError, match=r"blur filter \(1, -1\) must be non-empty with a non-zero sum"):
        FilterBlur(1, (1, -1))


def test_zoo_filter_stored_under_blur_filter():
    model = build_model("resnet_dnn_smoothing_18", num_classes=3, width=4, sfilter=(1, 2, 1), pad_mode="replicate")
    keys = [k for k in model.state_dict() if k.endswith("blur.filter")]
    smoothing = [name for name, m in model.named_modules() if isinstance(m, Smoothing)]
    assert keys == [f"{name}.blur.filter" for name in smoothing]
    # the reference layout: smooth<k> is a Sequential holding the Smoothing module
    assert smoothing == [f"{name}.0" for name in model.zoo_spec.smoothing_layers] == [
        "smooth1.0", "smooth2.0", "smooth3.0", "smooth4.0"]
    for name in smoothing:
        module = model.get_submodule(name)
        assert isinstance(module.blur, FilterBlur) and module.blur.pad_mode == "replicate"
        assert torch.equal(model.state_dict()[f"{name}.blur.filter"][0, 0],
                           torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    box = build_model("resnet_dnn_smoothing_18", num_classes=3, width=4)
    assert not any(k.endswith("blur.filter") for k in box.state_dict())
    assert all(isinstance(box.get_submodule(f"{n}.0").blur, BoxBlur2x2) for n in box.zoo_spec.smoothing_layers)


# ----------------------------------------------------------------------------- Prob kinds
VALUES = [-20.0, -1.0, 0.0, 0.5, 3.0, 8.0, 30.0]


def _prob(kind, tau=None):
    return Smoothing(4, kind=kind, tau=tau, blur=False).double()


def _hand_tensor():
    return torch.tensor(VALUES, dtype=torch.float64).reshape(1, 1, 1, 7)


def test_prob_tanh():
    y = _prob("tanh")(_hand_tensor()).flatten().tolist()
    expected = [max(0.0, 10 * math.tanh(v / 10)) for v in VALUES]
    assert y == pytest.approx(expected, abs=1e-14)
    assert y[0] == 0.0 and y[-1] < 10.0  # bounded by tau
    assert _prob("tanh", tau=2.0)(_hand_tensor()).flatten().tolist() == pytest.approx(
        [max(0.0, 2 * math.tanh(v / 2)) for v in VALUES], abs=1e-14)


def test_prob_relu6():
    assert _prob("relu6")(_hand_tensor()).flatten().tolist() == [0.0, 0.0, 0.0, 0.5, 3.0, 6.0, 6.0]
    assert _prob("relu6", tau=1.0)(_hand_tensor()).flatten().tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]


def test_prob_sigmoid():
    y = _prob("sigmoid")(_hand_tensor()).flatten().tolist()
    expected = [max(0.0, 4 * 10 * (1 / (1 + math.exp(-v / 10)) - 0.5)) for v in VALUES]
    assert y == pytest.approx(expected, abs=1e-13)


def test_prob_softmax_over_channels():
    x = torch.tensor([[[[1.0, -3.0]], [[2.0, 5.0]], [[0.0, 0.0]]]], dtype=torch.float64)  # (1, 3, 1, 2)
    y = Smoothing(3, "softmax", tau=2.0, blur=False).double()(x)
    for j in range(2):
        column = [x[0, c, 0, j].item() for c in range(3)]
        denom = sum(math.exp(v / 2) for v in column)
        for c in range(3):
            assert y[0, c, 0, j].item() == pytest.approx(2 * math.exp(column[c] / 2) / denom, abs=1e-14)
    assert y.sum(dim=1).flatten().tolist() == pytest.approx([2.0, 2.0], abs=1e-14)


def test_prob_scaling_and_none():
    x = _hand_tensor()
    assert _prob("scaling")(x).flatten().tolist() == pytest.approx([v / 5 for v in VALUES], abs=1e-15)
    assert torch.equal(_prob("none")(x), x)


def test_default_taus_and_validation():
    assert {k: Smoothing(1, k).tau for k in DEFAULT_TAU} == {"tanh": 10.0, "relu6": 6.0, "sigmoid": 10.0,
                                                             "softmax": 10.0, "scaling": 5.0, "none": 1.0}
    with pytest.raises(ValueError, match="smoothing kind 'gelu' is not one of"):
        Smoothing(1, "gelu")
    with pytest.raises(ValueError, match="smoothing temperature tau=0 must be positive"):
        Smoothing(1, "tanh", tau=0)


def test_prob_then_blur():
    x = _rand(1, 2, 5, 5, seed=3) * 20
    layer = Smoothing(2, "tanh").double()
    expected = nn.AvgPool2d(2, stride=1, padding=1)(torch.relu(10 * torch.tanh(x / 10)))
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-14)
    assert tuple(layer(x).shape) == (1, 2, 6, 6)
