"""A tiny zoo checkpoint and matching tensors data, and torchrun test helpers, shared by the CLI-level
test modules."""
import socket

import numpy as np
import torch

from landscape_tools.checkpoints import save_checkpoint
from landscape_tools.data import save_tensors
from landscape_tools.models import build_model


def tiny_checkpoint_and_data(root, arch="resnet_dnn_18", n=12):
    """``root/m.pt`` (width 4, 3 classes, 1 channel, seed 0) and ``root/d.npz`` (n grey 8x8 samples).

    Returns ``(model, checkpoint_path, data_spec)``.
    """
    torch.manual_seed(0)
    model = build_model(arch, width=4, num_classes=3, in_channels=1)
    save_checkpoint(root / "m.pt", model, arch, model.arch_kwargs, {})
    rng = np.random.default_rng(0)
    save_tensors(root / "d.npz", x=rng.normal(size=(n, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, n))
    return model, root / "m.pt", "tensors:" + str(root / "d.npz")


def random_tensors(path, train: int, test: int, shape, classes: int = 3, seed: int = 0):
    """A ``tensors:`` file at ``path``: ``train`` / ``test`` standard-normal float32 samples of ``shape``
    with uniform random labels of ``classes`` classes (drawn in that order from one seeded generator).

    Returns ``path``.
    """
    rng = np.random.default_rng(seed)
    save_tensors(path, x=rng.normal(size=(train, *shape)).astype(np.float32), y=rng.integers(0, classes, train),
                 x_test=rng.normal(size=(test, *shape)).astype(np.float32), y_test=rng.integers(0, classes, test))
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_nodes(a, b, rtol=1e-10):
    """Every dataset of ``b`` in ``a`` (recursively), equal to float tolerance, NaN where NaN."""
    assert sorted(a.data) == sorted(b.data) and sorted(a.groups) == sorted(b.groups)
    for name, value in b.data.items():
        if value.dtype.kind in "fc":
            np.testing.assert_allclose(a.data[name], value, rtol=rtol, atol=0, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(a.data[name], value, err_msg=name)
    for name, group in b.groups.items():
        assert_same_nodes(a.groups[name], group, rtol)
