"""A small user model for the ``lt compare`` tests: an MLP with dropout on 32x32 grey digits."""
import torch.nn as nn


def digits_mlp(hidden: int = 32) -> nn.Module:
    """Flatten -> 1024 -> hidden -> ReLU -> Dropout(0.2) -> 10 logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(1024, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10))
