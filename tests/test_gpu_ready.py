"""First-GPU-use settings, checked on a CPU by reading the flags or injecting the condition (issue #18,
items 1-4): TF32 off in fp32 forward passes and Hessian products, determinism advice and tolerance,
fp16 refused for Hessians, bf16 support of the run's GPU."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape_tools import precision as P
from landscape_tools._hvp import HessianOperator
from landscape_tools.errors import ConfigError, NumericalError


@pytest.fixture
def tf32_on():
    """PyTorch with TF32 on for matrix products and cuDNN (what a user or an Ampere default may set);
    the legacy API, as user code commonly does, to check the two APIs stay readable together."""
    before = P.tf32_state()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = before["matmul"]
    torch.backends.cudnn.allow_tf32 = before["cudnn"]


class Recorder(nn.Module):
    """conv -> tanh -> linear that records the TF32 state and cuDNN flags in its forward pass and in
    the backward pass through its activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)
        self.forward_states, self.backward_states = [], []

    def forward(self, x):
        self.forward_states.append(_state())
        h = torch.tanh(self.conv(x))
        if h.requires_grad:
            h.register_hook(lambda g: self.backward_states.append(_state()))
        return self.fc(h.flatten(1))


def _state():
    cudnn = torch.backends.cudnn
    return dict(P.tf32_state(), deterministic=cudnn.deterministic, benchmark=cudnn.benchmark)


def _data(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------- 1. TF32
def test_fp32_block_turns_tf32_off_and_restores(tf32_on):
    assert P.tf32_state() == {"matmul": True, "cudnn": True}
    with P.autocast("cpu", "fp32"):
        assert P.tf32_state() == {"matmul": False, "cudnn": False}
        with P.autocast("cpu", "tf32"):
            assert P.tf32_state() == {"matmul": True, "cudnn": True}
        assert P.tf32_state() == {"matmul": False, "cudnn": False}
    assert P.tf32_state() == {"matmul": True, "cudnn": True}
    # the legacy flags still read (torch.compile reads them) and agree
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"


def test_tf32_block_turns_it_on_and_restores_the_default():
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
              torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision)
    with P.autocast("cpu", "tf32"):
        assert P.tf32_state() == {"matmul": True, "cudnn": True}
        with P.fp32_math("bf16"):       # what autocast leaves in float32 runs without TF32
            assert P.tf32_state() == {"matmul": False, "cudnn": False}
    after = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision)
    assert after == before


def test_fp32_block_restores_after_an_error(tf32_on):
    with pytest.raises(ValueError):
        with P.autocast("cpu", "fp32"):
            raise ValueError("boom")
    assert P.tf32_state() == {"matmul": True, "cudnn": True}


def test_precision_parsing_recording_and_rounding():
    assert P.parse_precision("TF32") == "tf32" and P.parse_precision("tensorfloat32") == "tf32"
    assert P.autocast_dtype("tf32") is None
    assert P.precision_attrs("fp32") == {"precision": "fp32", "tf32": False}
    assert P.precision_attrs("tf32") == {"precision": "tf32", "tf32": True}
    assert P.rounding("fp32") == torch.finfo(torch.float32).eps
    assert P.rounding("tf32") == 2.0 ** -10 and P.rounding("bf16") == 2.0 ** -7
    assert P.rounding("tf32", torch.float64) == torch.finfo(torch.float64).eps   # TF32 never touches float64


@pytest.mark.parametrize("form", ["graph", "double", "func"])
def test_hessian_products_run_with_tf32_off_and_deterministic_cudnn(tf32_on, form):
    model, (x, y) = Recorder(), _data()
    torch.backends.cudnn.benchmark = True
    try:
        with HessianOperator(model, [(x, y)], form=form) as op:
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
            op.free_gradient()          # every form computes the gradient start (in the graph form: free)
        assert model.forward_states and model.backward_states
        expected = {"matmul": False, "cudnn": False, "deterministic": True, "benchmark": False}
        assert all(s == expected for s in model.forward_states + model.backward_states), \
            model.forward_states + model.backward_states
        assert _state() == {"matmul": True, "cudnn": True, "deterministic": False, "benchmark": True}  # restored
    finally:
        torch.backends.cudnn.benchmark = False


def test_tf32_hessian_products_run_with_tf32_on():
    model, (x, y) = Recorder(), _data()
    with HessianOperator(model, [(x, y)], form="double", precision="tf32") as op:
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        assert op.tolerance() == pytest.approx(8 * 2.0 ** -10)
    assert all(s["matmul"] and s["cudnn"] for s in model.forward_states + model.backward_states)


def test_evaluate_forward_passes_run_with_tf32_off(tf32_on):
    from landscape_tools.evaluate import ensemble_curve
    model, (x, y) = Recorder().eval(), _data()
    ensemble_curve(model, [(x, y)], [1], seed=0)
    assert model.forward_states and all(not s["matmul"] and not s["cudnn"] for s in model.forward_states)


def test_featvar_forward_passes_run_with_tf32_off(tf32_on):
    from landscape_tools.featvar import feature_variance
    model, (x, y) = Recorder().eval(), _data()
    feature_variance(model, [(x, y)], over="mc", mc=2, source="noise:0.1", layers="conv")
    measured = model.forward_states[1:]     # the first pass is the one-sample probe of the layers' shapes
    assert measured and all(not s["matmul"] and not s["cudnn"] for s in measured)


def test_surface_forward_passes_run_with_tf32_off(tf32_on):
    from landscape_tools.data import DataSet
    from landscape_tools import surface as S
    model, (x, y) = Recorder().eval(), _data()
    S.evaluate_model(model, DataSet(x, y, "tensors:test", "train", 3))
    assert model.forward_states and all(not s["matmul"] and not s["cudnn"] for s in model.forward_states)


# ----------------------------------------------------------------------------- 2. determinism check
def _operator(precision="fp32", form="double"):
    from landscape_tools.hessian import hessian_operator
    model, (x, y) = Recorder(), _data()
    return hessian_operator(model, [(x, y)], form=form, precision=precision)


def test_determinism_advice_works_on_cuda():
    with HessianOperator(Recorder(), [_data()], form="double") as op:
        with pytest.raises(NumericalError) as info:
            op._raise_if_different(1e-2, "m")
    message = str(info.value)
    assert "at most 1e-04 is rounding)" in message
    assert "torch.backends.cudnn.deterministic=True and benchmark=False" in message
    assert "torch.use_deterministic_algorithms(True, warn_only=True)" in message
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in message
    assert "call torch.use_deterministic_algorithms(True)" not in message     # raises on the zoo's pooling
    assert "AdaptiveAvgPool2d's backward and reflect padding" in message


def test_determinism_tolerance_follows_the_forward_precision():
    """A bf16 forward pass is compared at bf16's rounding: 1e-2 apart is rounding there, not at fp32."""
    op = _operator("bf16")
    try:
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        assert op.seen_precisions == {"bf16"}
        assert op.tolerance() == pytest.approx(8 * 2.0 ** -7)
        op._raise_if_different(1e-2, "")                     # within bf16 rounding
        with pytest.raises(NumericalError, match=r"at most 6e-02 is rounding at bf16\)"):
            op._raise_if_different(0.5, "")
    finally:
        op.close()
    with HessianOperator(Recorder(), [_data()], form="double") as fp32:
        fp32.matvec(torch.ones(fp32.dim, dtype=torch.float64))
        assert fp32.tolerance() == 1e-4
        with pytest.raises(NumericalError):
            fp32._raise_if_different(1e-2, "")
    with HessianOperator(Recorder().double(), [tuple(t.double() if t.is_floating_point() else t for t in _data())],
                         form="double") as fp64:
        assert fp64.tolerance() == 1e-10


def test_determinism_check_at_bf16_passes():
    op = _operator("bf16")
    try:
        diff, _ = op.checked_matvec(torch.ones(op.dim, dtype=torch.float64))
        assert diff <= op.tolerance()
    finally:
        op.close()


# ----------------------------------------------------------------------------- 3. fp16 Hessians
def test_fp16_is_refused_for_hessians_with_the_alternatives():
    expected = r"--precision fp16 is refused for Hessians: .*underflow.*use --precision bf16 .* or fp32"
    with pytest.raises(ConfigError, match=expected):
        P.parse_hessian_precision("fp16")
    assert P.parse_hessian_precision(None) == "fp32" and P.parse_hessian_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match=expected):
        HessianOperator(Recorder(), [_data()], precision="fp16")
    # through the library entry the CLI uses: refused when the operator is made, before any forward pass
    model = Recorder()
    with pytest.raises(ConfigError, match=expected):
        _operator("fp16")
    # a caller's own float16 autocast around the products as well
    with HessianOperator(model, [_data()], form="double") as plain:
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ConfigError, match=expected):
            plain.matvec(torch.ones(plain.dim, dtype=torch.float64))
        assert not model.forward_states


def test_fp16_top_eigenvalues_refused():
    from landscape_tools.hessian import top_eigenvalues
    x, y = _data()
    with pytest.raises(ConfigError, match=r"--precision fp16 is refused for Hessians"):
        top_eigenvalues(Recorder(), [(x, y)], k=1, precision="fp16")


def test_bf16_hessian_agrees_with_fp32_to_bf16_precision():
    """CPU autocast: H v with the forward pass in bfloat16 is within a few bf16 roundings of fp32's."""
    v = torch.randn(Recorder().fc.weight.numel() + 3 + 2 * 9 + 2, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    results = {}
    for precision in ("fp32", "bf16"):
        op = _operator(precision, form="graph")
        try:
            results[precision] = op.matvec(v)
        finally:
            op.close()
    ref, low = results["fp32"], results["bf16"]
    err = float(torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref))
    assert 0 < err < 8 * 2.0 ** -7, err


# ----------------------------------------------------------------------------- 4. bf16 support
@pytest.fixture
def fake_gpus(monkeypatch):
    """cuda:0 an Ampere GPU (current device), cuda:1 a Turing one that only emulates bfloat16."""
    caps = {0: (8, 0), 1: (7, 5)}
    names = {0: "NVIDIA A100", 1: "Tesla T4"}

    def index(device=None):
        if device is None:
            return 0
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return 0 if device.index is None else device.index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # emulation counts as True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: caps[index(device)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[index(device)])


def test_bf16_refused_on_a_pre_ampere_run_device(fake_gpus):
    with pytest.raises(ConfigError, match=r"--precision bf16: the GPU cuda:1 \(Tesla T4\) has compute capability "
                                          r"7\.5; bfloat16 arithmetic needs 8\.0 \(Ampere\) or later.*use "
                                          r"--precision fp32, or fp16"):
        with P.autocast(torch.device("cuda", 1), "bf16"):
            pass
    P._check_supported(torch.device("cuda", 0), "bf16")      # the Ampere card passes
    P._check_supported(torch.device("cuda"), "bf16")         # no index: the current device
    P._check_supported(torch.device("cuda", 1), "fp16")      # fp16 is native on Turing


def test_cli_hessian_fp16_is_one_error_line(tmp_path):
    """`lt hessian --precision fp16` ends in one `Error:` line naming the alternatives, and no file."""
    import numpy as np
    from click.testing import CliRunner

    from landscape_tools.checkpoints import save_checkpoint
    from landscape_tools.cli.main import cli
    from landscape_tools.data import save_tensors
    from landscape_tools.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet_dnn_18", width=2, num_classes=3)
    save_checkpoint(tmp_path / "m.pt", model, "resnet_dnn_18", model.arch_kwargs, meta={})
    rng = np.random.default_rng(0)
    save_tensors(tmp_path / "d.npz", x=rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
                 y=(np.arange(4) % 3).astype(np.int64))
    out = tmp_path / "h.h5"
    result = CliRunner().invoke(cli, ["hessian", str(tmp_path / "m.pt"), "--data", f"tensors:{tmp_path / 'd.npz'}",
                                      "--batch-size", "4", "--top-k", "1", "--device", "cpu", "--precision", "fp16",
                                      "-o", str(out)])
    assert result.exit_code != 0
    assert "Error: --precision fp16 is refused for Hessians" in result.output, result.output
    assert "use --precision bf16" in result.output and "or fp32 (exact)" in result.output
    assert "Traceback" not in result.output and not out.exists()
