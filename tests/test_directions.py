"""Directions whose checkpoints share a file stem keep one point each (labels made unique)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from landscape_tools._directions import pca_directions, plane_through, unique_labels


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_unique_labels_suffixes_repeats_in_order():
    assert unique_labels(["a", "b", "a", "a", "b"]) == ["a", "b", "a (2)", "a (3)", "b (2)"]
    assert unique_labels(["centre", "x"], taken=("centre",)) == ["centre (2)", "x"]
    assert unique_labels(["a (2)", "a", "a"]) == ["a (2)", "a", "a (3)"]


def test_pca_points_of_checkpoints_with_the_same_stem_are_all_kept():
    centre = _net(0)
    trajectory = [("epoch_10", {n: p.detach().clone() for n, p in _net(s).named_parameters()}) for s in (1, 2, 3)]
    d = pca_directions(centre, trajectory)
    assert list(d.points) == ["epoch_10", "epoch_10 (2)", "epoch_10 (3)"]
    np.testing.assert_allclose(np.array(list(d.points.values())), d.extras["trajectory_coords"], rtol=0, atol=0)
    assert list(d.extras["trajectory_labels"]) == list(d.points)


def test_plane_through_two_models_with_the_same_stem_keeps_three_points():
    d = plane_through(_net(0), _net(1), _net(2), ("final", "final"))
    assert list(d.points) == ["centre", "final", "final (2)"]
    assert d.points["final"][1] == 0.0 and d.points["final (2)"][1] != 0.0
