"""The --precision / --compile helpers: parsing, autocast scope, full-precision outputs, compiled equality."""
import pytest
import torch
from torch import nn

from landscape_tools import precision as P
from landscape_tools.errors import ConfigError


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval().to(dtype)


@pytest.mark.parametrize("text,expected", [(None, "fp32"), ("fp32", "fp32"), ("BF16", "bf16"), ("half", "fp16"),
                                           ("bfloat16", "bf16")])
def test_parse_precision(text, expected):
    assert P.parse_precision(text) == expected


def test_parse_precision_refuses_unknown():
    with pytest.raises(ConfigError, match=r"--precision 'fp8' is not one of fp32, tf32, bf16, fp16"):
        P.parse_precision("fp8")


def test_fp32_is_a_no_op_and_exact():
    net, x = _net(), torch.randn(5, 3, 8, 8)
    ref = net(x)
    with P.autocast("cpu", "fp32"):
        out = net(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.parametrize("name,dtype,tol", [("bf16", torch.bfloat16, 5e-2), ("fp16", torch.float16, 5e-3)])
def test_reduced_precision_runs_in_that_dtype_and_stays_close(name, dtype, tol):
    net, x = _net(), torch.randn(5, 3, 8, 8)
    ref = net(x)
    with P.autocast(torch.device("cpu"), name):
        out = net(x)
    assert out.dtype == dtype
    back = P.full_precision(out, P.model_dtype(net))
    assert back.dtype == torch.float32
    assert not torch.equal(back, ref)  # really computed in fewer bits
    torch.testing.assert_close(back, ref, atol=tol * ref.abs().max().item(), rtol=0)
    # outside the block the model is back in full precision
    assert net(x).dtype == torch.float32


def test_model_dtype():
    assert P.model_dtype(_net(torch.float64)) == torch.float64
    assert P.model_dtype(nn.ReLU()) == torch.float32


def test_compile_disabled_returns_the_model():
    net = _net()
    assert P.compile_model(net, enabled=False) is net


def test_compiled_model_equals_eager_and_shares_weights():
    net, x = _net(), torch.randn(4, 3, 8, 8)
    compiled = P.compile_model(net)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # in-place updates of the original parameters reach the compiled module
        net[4].bias.add_(1.0)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-5, rtol=1e-5)
