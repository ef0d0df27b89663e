"""MC dropout on and off, and the feature-map variance at layers you name.

    python examples/python/mc_dropout_featvar.py

``mc_dropout(model, enabled)`` switches every dropout of any model on (MC sampling, whatever the
train/eval mode) or off (a deterministic prediction) for the duration of a ``with`` block.
``feature_variance`` runs each batch ``mc`` times with independent dropout masks and reports, per
layer you name (module names or globs), the variance of every feature-map entry across the samples,
averaged over entries and inputs (``lt featvar --over mc --layers NAME,...``).
"""
import torch
import torch.nn as nn

from landscape_tools.featvar import feature_variance
from landscape_tools.models import mc_dropout


class SmallCNN(nn.Module):
    """A model of yours with ordinary nn.Dropout layers."""

    def __init__(self, p: float = 0.25):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop1 = nn.Dropout(p)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop2 = nn.Dropout(p)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.drop1(torch.relu(self.conv(x)))
        return self.head(self.drop2(self.pool(h).flatten(1)))


def main(mc: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN().double().eval()
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64)

    with mc_dropout(model, False):           # dropout off: one deterministic prediction
        deterministic = model(x)
    with mc_dropout(model, True):            # dropout on (eval mode): every pass draws new masks
        samples = torch.stack([model(x).softmax(1) for _ in range(mc)])
    ensemble = samples.mean(0)               # the MC-dropout prediction: mean softmax of mc passes
    print(f"max |MC ensemble - deterministic| probability: "
          f"{(ensemble - deterministic.softmax(1)).abs().max():.4f}")

    # feature-map variance across mc dropout samples at the layers you name
    result = feature_variance(model, [x[:16], x[16:]], over="mc", mc=mc, source="dropout",
                              layers=["drop1", "drop2"], seed=seed)
    for name, value in zip(result.layers.names, result.variance):
        print(f"variance at {name}: {value:.5f}")
    return model, x, deterministic, samples, result


if __name__ == "__main__":
    main()
