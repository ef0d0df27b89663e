"""The zoo against the reference code: state-dict keys, parameter counts and float64 logits."""
import json
import math
from pathlib import Path

import pytest
import torch

from landscape_tools.models import UnknownArchitecture, build_model, list_models, mc_dropout, parse_name

GOLDEN = json.loads((Path(__file__).parent / "data" / "spatial_smoothing_golden.json").read_text())


def fill_reference_weights(model: torch.nn.Module) -> None:
    """The golden file's recipe: deterministic weights from each key's position and numel."""
    state = model.state_dict()
    new = {}
    for i, (key, tensor) in enumerate(state.items()):
        n = tensor.numel()
        a = torch.sin(0.37 * torch.arange(n, dtype=torch.float64) + i)
        if key.endswith("num_batches_tracked"):
            value = torch.zeros_like(tensor)
        elif key.endswith("running_var"):
            value = (1 + 0.1 * a.abs()).reshape(tensor.shape)
        elif key.endswith("running_mean"):
            value = (0.01 * a).reshape(tensor.shape)
        elif tensor.dim() > 1:
            value = (a / math.sqrt(n / tensor.shape[0])).reshape(tensor.shape)
        else:
            value = (0.1 * a).reshape(tensor.shape)
        new[key] = value.to(tensor.dtype)
    model.load_state_dict(new)


def golden_input() -> torch.Tensor:
    return torch.sin(0.01 * torch.arange(2 * 3 * 32 * 32, dtype=torch.float64)).reshape(2, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(GOLDEN["models"]))
def test_state_dict_keys_and_shapes_match_reference(name):
    ref = GOLDEN["models"][name]
    model = build_model(name, num_classes=10)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]


@pytest.mark.parametrize("name", sorted(n for n, m in GOLDEN["models"].items() if "logits" in m))
def test_logits_match_reference_in_float64(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).double().eval()
    fill_reference_weights(model)
    with torch.no_grad():
        logits = model(golden_input())
    expected = torch.tensor(GOLDEN["models"][name]["logits"], dtype=torch.float64)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-8, rtol=0)


def test_mc_dropout_on_a_zoo_model_switches_only_its_mc_layers():
    model = build_model("vgg_mcdo_11", width=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with mc_dropout(model, True, seed=3):
        assert model.classifier[2].dropout1.__dict__.get("forward") is None     # reference: off in eval mode
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with mc_dropout(model, False):
        c = model(x)
    assert not torch.equal(a, c)


def test_unknown_names_are_refused_with_the_naming_scheme():
    with pytest.raises(UnknownArchitecture, match=r"unknown architecture 'resnet_mcdo_19'.*lt info --zoo"):
        build_model("resnet_mcdo_19")
    assert parse_name("alexnet_mcdo_smoothing") == ("alexnet", True, True, None)
    assert len(list_models()) == 60
