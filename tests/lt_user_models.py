"""A user model factory for the ``model="lt_user_models:factory"`` checkpoint tests."""
import torch.nn as nn


def tiny_mlp(hidden: int = 3, num_classes: int = 2) -> nn.Module:
    """4 -> hidden -> num_classes with a ReLU: keys 0.weight, 0.bias, 2.weight, 2.bias."""
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_module():
    return 42
