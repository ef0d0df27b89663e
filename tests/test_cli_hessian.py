"""`lt hessian` end to end on tiny zoo checkpoints: file schema, summary, figure, resume, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from landscape_tools import _lanczos, store
from landscape_tools.checkpoints import load_checkpoint, save_checkpoint
from landscape_tools.cli.main import cli
from landscape_tools.data import save_tensors
from landscape_tools.hessian import top_eigenvalues
from landscape_tools.models import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hessian_cli")
    paths = {}
    for i, name in enumerate(("resnet_mcdo_smoothing_18", "resnet_dnn_18")):
        torch.manual_seed(i)
        model = build_model(name, width=4, num_classes=10)
        path = root / f"{name.split('_')[1]}.pt"
        save_checkpoint(path, model, name, model.arch_kwargs, meta={"dataset": "digits"})
        paths[name] = path
    rng = np.random.default_rng(0)
    data = root / "d.npz"
    save_tensors(data, x=rng.standard_normal((20, 3, 16, 16)).astype(np.float32),
                 y=rng.integers(0, 10, 20).astype(np.int64))
    return root, paths, data


def args(files, out, *extra, models=("resnet_mcdo_smoothing_18",)):
    root, paths, data = files
    return (["hessian", *[str(paths[m]) for m in models], "--data", f"tensors:{data}", "--batch-size", "8",
             "--top-k", "2", "--tol", "1e-3", "--device", "cpu", "-o", str(out)] + list(extra))


def test_two_models_one_file_with_trace_density_and_figure(files, tmp_path):
    out, fig = tmp_path / "h.h5", tmp_path / "h.png"
    result = CliRunner().invoke(cli, args(files, out, "--batches", "2", "--trace", "--trace-probes", "3",
                                          "--density", "--density-runs", "1", "--density-steps", "4",
                                          "--plot", str(fig), models=("resnet_mcdo_smoothing_18", "resnet_dnn_18")))
    assert result.exit_code == 0, result.output
    res = store.read_result(out)
    assert res.kind == "hessian" and set(res.models) == {"mcdo", "dnn"}
    assert res.config["top_k"] == 2 and res.attrs["format_version"] == 1
    for label, node in res.models.items():
        assert node["eigenvalues"].dtype == np.float64 and node["eigenvalues"].shape == (2, 2)
        assert node["residuals"].shape == (2, 2) and node["converged"].dtype == bool
        assert node["certificates"].shape == (2, 2) and (node["residuals"] > 0).all()
        assert node["converged"].all() and (node["certificates"] <= 1e-3).all()
        assert (node["hvp_count"] > 0).all() and list(node["batch_sizes"]) == [8, 8]
        for key in ("checkpoint", "checkpoint_sha256", "arch", "num_params"):
            assert key in node.attrs
        assert (node.attrs["method"], node.attrs["which"], node.attrs["k"], node.attrs["scope"]) == \
            ("lanczos", "LM", 2, "batch")
        assert node["trace/estimate"].shape == (2,) and np.isfinite(node["trace/stderr"]).all()
        assert node["density/nodes"].shape == (2, 1, 4) and np.allclose(node["density/weights"].sum(-1), 1)
        assert f"{label}: top eigenvalue (LM) median" in result.output
    assert fig.stat().st_size > 0
    # the CLI computes exactly what the library computes
    model, _ = load_checkpoint(files[1]["resnet_dnn_18"])
    x = torch.from_numpy(np.load(files[2])["x"][:8])
    y = torch.from_numpy(np.load(files[2])["y"][:8])
    lib = top_eigenvalues(model, [(x, y)], k=2, tol=1e-3, mc_seed=0)
    np.testing.assert_allclose(res.models["dnn"]["eigenvalues"][0], lib.eigenvalues[0], rtol=1e-5)
    from landscape_tools.plotting import render
    render([str(out)], str(tmp_path / "d.png"), kind="density")


def test_resume_after_interruption_equals_uninterrupted_run(files, tmp_path, monkeypatch):
    runner = CliRunner()
    whole = tmp_path / "whole.h5"
    assert runner.invoke(cli, args(files, whole, "--scope", "batch")).exit_code == 0
    out = tmp_path / "resumed.h5"
    original = _lanczos.thick_restart_lanczos
    calls = {"n": 0}

    def dies_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(_lanczos, "thick_restart_lanczos", dies_on_second)
    killed = runner.invoke(cli, args(files, out))
    assert killed.exit_code == 130 and "resume when run again" in killed.output
    assert not out.exists() and store.partial_path(out).exists()
    monkeypatch.setattr(_lanczos, "thick_restart_lanczos", original)
    solved = {"n": 0}

    def counting(*a, **kw):
        solved["n"] += 1
        return original(*a, **kw)

    monkeypatch.setattr(_lanczos, "thick_restart_lanczos", counting)
    again = runner.invoke(cli, args(files, out))
    assert again.exit_code == 0, again.output
    # 3 batches, the first kept from the interrupted run (and solved again, unstored, as the warm start
    # of the other two: every batch's values depend only on it, the first batch and the seeds)
    assert solved["n"] == 3
    a, b = store.read_result(whole).models["mcdo"], store.read_result(out).models["mcdo"]
    for name in ("eigenvalues", "residuals", "certificates", "converged", "hvp_count", "batch_sizes", "done"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not store.partial_path(out).exists()


def test_dataset_scope_one_row(files, tmp_path):
    out = tmp_path / "ds.h5"
    result = CliRunner().invoke(cli, args(files, out, "--scope", "dataset", "--which", "la", "--params", "classifier.*"))
    assert result.exit_code == 0, result.output
    node = store.read_result(out).models["mcdo"]
    assert node["eigenvalues"].shape == (1, 2) and node.attrs["which"] == "LA"
    assert list(node["batch_sizes"]) == [8, 8, 4] and node.attrs["hessian_params"] == 4 * 8 * 10 + 10
    assert "over 1 Hessian;" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "100000"], "Error: --top-k 100000 is larger than the number of parameters in the Hessian (44622); "
                            "ask for at most 44622 eigenvalues, or widen --params"),
    (["--which", "XX"], "Error: --which 'XX' is not one of LM, LA, SA (LM: largest magnitude, LA: largest algebraic, "
                        "SA: smallest algebraic)"),
    (["--method", "arnoldi"], "Error: --method 'arnoldi' is not one of lanczos, power"),
    (["--scope", "all"], "Error: --scope 'all' is not one of batch, dataset"),
    (["--params", "nope.*"], "Error: --params 'nope.*' matches no trainable parameter; names look like: "
                             "layer0.0.weight, layer0.1.weight, layer0.1.bias, layer1.0.conv1.weight, "
                             "layer1.0.bn1.weight, layer1.0.bn1.bias, ... (use globs such as 'layer1.*' or "
                             "'*.conv1.weight')"),
    (["--tol", "0"], "Error: Invalid value for '--tol': 0.0 is not in the range x>0 (a relative eigenvalue accuracy "
                     "such as --tol 1e-4)."),
    (["--sub-batch", "0"], "Error: --sub-batch '0' is not a positive number of samples, 'auto' or 'whole' "
                           "(e.g. --sub-batch 32)"),
])
def test_bad_input(files, tmp_path, extra, message):
    out = tmp_path / "bad.h5"
    result = CliRunner().invoke(cli, args(files, out, *extra))
    assert result.exit_code == (2 if "Invalid value for" in message else 1), result.output   # 2: click's usage errors
    assert message in result.output
    assert not out.exists() and not store.partial_path(out).exists()


def test_sub_batch_changes_memory_not_the_spectrum(files, tmp_path):
    """--sub-batch 3 (pieces of 3, 3 and 2 of the 8-sample batch, MC-dropout masks matched) solves the
    same Hessians as whole batches; the choice is recorded."""
    runner = CliRunner()
    got = {}
    for sub in ("3", "whole", "auto"):
        out = tmp_path / f"sub{sub}.h5"
        result = runner.invoke(cli, args(files, out, "--batches", "1", "--tol", "1e-5", "--sub-batch", sub))
        assert result.exit_code == 0, result.output
        got[sub] = store.read_result(out).models["mcdo"]
    assert (got["3"].attrs["sub_batch"], got["whole"].attrs["sub_batch"], got["auto"].attrs["sub_batch"]) == (3, "whole", 32)
    np.testing.assert_allclose(got["3"]["eigenvalues"], got["whole"]["eigenvalues"], rtol=1e-4)
    np.testing.assert_array_equal(got["auto"]["eigenvalues"], got["whole"]["eigenvalues"])  # 32 >= 8: whole batches


def test_existing_output_refused(files, tmp_path):
    out = tmp_path / "exists.h5"
    out.write_bytes(b"")
    result = CliRunner().invoke(cli, args(files, out))
    assert result.exit_code == 1 and f"Error: {out} already exists; pass --overwrite" in result.output


def test_bf16_precision_is_close_to_fp32_and_recorded(files, tmp_path):
    """--precision bf16 (CPU autocast) runs the loss's forward pass in bfloat16: eigenvalues close to fp32's."""
    runner = CliRunner()
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.h5"
        result = runner.invoke(cli, args(files, out, "--batches", "1", "--precision", precision,
                                         models=("resnet_dnn_18",)))
        assert result.exit_code == 0, result.output
        warned = "warning: --precision bf16 runs the loss's forward pass in bf16; the Hessian is approximate"
        assert (warned in result.output) == (precision == "bf16"), result.output
        res = store.read_result(out)
        assert res.config["precision"] == precision and res.models["dnn"].attrs["precision"] == precision
        results[precision] = res
    fp32, bf16 = (results[p].models["dnn"]["eigenvalues"] for p in ("fp32", "bf16"))
    assert not np.array_equal(fp32, bf16)                           # it did run in reduced precision
    np.testing.assert_allclose(bf16, fp32, rtol=2e-2)
    assert results["fp32"].attrs["fingerprint"] != results["bf16"].attrs["fingerprint"]


def test_fp32_precision_is_the_plain_operator(files):
    """The default precision computes exactly what the library's plain operator computes."""
    from landscape_tools.hessian import hessian_operator
    from landscape_tools._hvp import HessianOperator
    model, _ = load_checkpoint(files[1]["resnet_dnn_18"])
    x = torch.from_numpy(np.load(files[2])["x"][:2])
    y = torch.from_numpy(np.load(files[2])["y"][:2])
    op = hessian_operator(model, [(x, y)], precision="fp32")
    assert type(op) is HessianOperator
    op.close()
    low = hessian_operator(model, [(x, y)], precision="bf16")
    v = torch.randn(low.dim, dtype=torch.float64)
    assert "forward" in model.__dict__ and low(v).dtype == torch.float64
    low.close()
    assert "forward" not in model.__dict__
