"""featvar's --max-batch: MC copies stacked along the batch and batches split into row pieces give the
variance of a brute-force loop over the samples, one sample and one MC copy at a time (float64)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_tools import featvar
from landscape_tools.errors import ConfigError, NumericalError
from landscape_tools.featvar import dropout_mask, input_noise
from landscape_tools.seeds import FEATVAR_DROPOUT, FEATVAR_NOISE, derive_seed

from test_featvar import SEED, TinyNet, data, reference_outputs


def sample_by_sample(net: TinyNet, x: torch.Tensor, mc: int, layers, batch: int = 0, sigma: float | None = None):
    """Per-entry variance over ``mc`` copies, one data sample at a time: sample ``i`` of copy ``k`` is
    masked by row ``i`` of copy ``k``'s whole-batch masks (input noise: row ``i`` of its noise), the
    variance (torch.var, Bessel) taken per sample and the mean over every entry of every sample."""
    n = x.shape[0]
    per_layer = {name: [] for name in layers}
    with torch.no_grad():
        for i in range(n):
            outs = {name: [] for name in layers}
            for k in range(mc):
                xi = x[i:i + 1]
                if sigma is not None:
                    xi = xi + input_noise(x.shape, sigma, derive_seed(SEED, FEATVAR_NOISE, batch, k), x.device,
                                          x.dtype)[i:i + 1]
                h1 = net.relu(net.conv1(xi))
                h2 = net.conv2(h1 if sigma is not None else h1 * dropout_mask(
                    (n,) + tuple(h1.shape[1:]), 0.3, derive_seed(SEED, FEATVAR_DROPOUT, batch, k, 0, 0), x.device,
                    x.dtype)[i:i + 1])
                d2 = h2 if sigma is not None else h2 * dropout_mask(
                    (n, h2.shape[1], 1, 1), 0.4, derive_seed(SEED, FEATVAR_DROPOUT, batch, k, 1, 0), x.device,
                    x.dtype)[i:i + 1]
                got = {"conv2": h2, "drop2": d2, "fc": net.fc(torch.flatten(d2, 1))}
                for name in layers:
                    outs[name].append(got[name])
            for name in layers:
                per_layer[name].append(torch.stack(outs[name]).var(dim=0, unbiased=True))
    return np.array([torch.cat(per_layer[name]).mean().item() for name in layers])


def rows_seen(model):
    seen = []
    return seen, model.register_forward_pre_hook(lambda module, inp: seen.append(int(inp[0].shape[0])))


@pytest.mark.parametrize("max_batch, passes", [
    (None, [20]),                   # default: the 4 copies of the 5 samples in one pass
    (10, [10, 10]),                 # 2 copies per pass
    (5, [5] * 4),                   # one copy per pass
    (3, [3] * 4 + [2] * 4),         # pieces of 3 + 2 rows (each piece's copies in turn), one copy per pass
    (2, [2] * 8 + [1] * 4),
    (1, [1] * 20),                  # every sample alone
])
def test_variance_equals_a_loop_over_samples_for_every_max_batch(max_batch, passes):
    net, x, mc, layers = TinyNet(), data(5), 4, ["conv2", "drop2", "fc"]
    seen, handle = rows_seen(net)
    try:
        res = featvar.feature_variance(net, [x], mc=mc, layers=",".join(layers), seed=SEED, max_batch=max_batch)
    finally:
        handle.remove()
    seen = seen[1:]                                  # the first pass is select_layers' probe of one sample
    assert seen == passes
    expected = sample_by_sample(net, x, mc, layers)
    assert np.all(expected > 0)
    np.testing.assert_allclose(res.variance, expected, rtol=1e-12, atol=0)
    assert res.num_samples == 5 and res.samples == mc


@pytest.mark.parametrize("max_batch", [2, 3])
def test_split_batches_with_input_noise_and_fourier_give_the_whole_batch_numbers(max_batch):
    net, x, mc = TinyNet(), data(5), 3
    noisy = featvar.feature_variance(net, [x], mc=mc, source="noise:0.25", layers="conv2,fc", seed=SEED,
                                     max_batch=max_batch)
    np.testing.assert_allclose(noisy.variance, sample_by_sample(net, x, mc, ["conv2", "fc"], sigma=0.25),
                               rtol=1e-12, atol=0)
    whole = featvar.feature_variance(net, [x], mc=mc, layers="conv2", fourier=True, seed=SEED, max_batch=None)
    split = featvar.feature_variance(net, [x], mc=mc, layers="conv2", fourier=True, seed=SEED, max_batch=max_batch)
    np.testing.assert_allclose(split.variance, whole.variance, rtol=1e-12, atol=0)
    np.testing.assert_allclose(split.fourier, whole.fourier, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        maps = torch.cat([reference_outputs(net, x, 0, k)["conv2"] for k in range(mc)])
    mean = featvar.fourier_diagonal(maps).mean(dim=(0, 1)).numpy()
    np.testing.assert_allclose(split.fourier[0], mean - mean[0], rtol=1e-12, atol=1e-12)
    spatial = featvar.feature_variance(net, [x], over="spatial", layers="conv2", max_batch=max_batch)
    np.testing.assert_allclose(spatial.variance, featvar.feature_variance(net, [x], over="spatial",
                                                                          layers="conv2").variance, rtol=1e-12)


def test_a_model_that_is_not_batch_first_cannot_be_split():
    class FeaturesFirst(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.drop, self.fc2 = nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)
            self.double()

        def forward(self, x):
            return self.fc2(self.drop(torch.relu(self.fc1(x)).t()).t())
    x = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(NumericalError, match=r"a dropout input of shape \(6, 2\) does not have the batch \(2 samples "
                                             r"x 1 MC copies\) as its leading dimension, so a batch of 4 cannot be "
                                             r"split into pieces of --max-batch 2 rows: give --max-batch at least 4"):
        featvar.feature_variance(FeaturesFirst(), [x], mc=2, layers="fc2", max_batch=2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_batch_is_refused(bad):
    with pytest.raises(ConfigError, match=r"--max-batch .*: expected a whole number of rows per forward pass"):
        featvar.feature_variance(TinyNet(), [data(2)], mc=2, max_batch=bad)
