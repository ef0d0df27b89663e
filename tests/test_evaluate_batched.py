"""MC samples stacked along the batch (and batches split into row pieces) give exactly the curve of one
MC sample per forward pass with the same masks: float64 models, every --max-batch, every dropout kind."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape_tools.errors import ConfigError
from landscape_tools.evaluate import ensemble_curve, predictive_metrics
from landscape_tools.models import MCDropout, mc_dropout
from landscape_tools.models.mc import seeded_mask
from landscape_tools.seeds import DROPOUT_MODULE, EVALUATE_MC_SAMPLE, derive_seed

SIZES = (1, 2, 3, 5)
KEYS = ("nll", "accuracy", "ece", "brier")


class ConvNet(nn.Module):
    """conv -> relu -> drop1(0.3) -> conv -> drop2 = Dropout2d(0.4) -> flatten -> drop3(0.2) -> linear, float64.

    ``torch``: drop1, drop3 are ``nn.Dropout``, a user model: all three sampled (element-wise on maps,
    channel-wise, element-wise on features).  ``mc``: drop1, drop3 are ``MCDropout``: only they are
    sampled, the ``Dropout2d`` stays off as in a zoo model."""

    def __init__(self, kind: str = "torch"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        drop = MCDropout if kind == "mc" else nn.Dropout
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.drop1 = drop(0.3)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.drop2 = nn.Dropout2d(0.4)
        self.drop3 = drop(0.2)
        self.fc = nn.Linear(2 * 5 * 5, 4)
        self.double()
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        h = self.drop1(torch.relu(self.conv1(x)))
        h = self.drop2(self.conv2(h))
        return self.fc(self.drop3(torch.flatten(h, 1)))


class FeaturesFirst(nn.Module):
    """A model whose dropout sees (features, batch): not batch-first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)
        self.double()

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x)).t()).t())


def conv_batches(sizes=(4, 4, 3)):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        out.append((torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)))
    return out


def one_sample_per_pass(model, batches, sizes, seed):
    """The reference: every MC sample its own forward pass of the whole batch under
    ``mc_dropout(model, True, seed=derive_seed(seed, EVALUATE_MC_SAMPLE, b, s))``, the first N averaged,
    scored on all data."""
    model.eval()
    means = {n: [] for n in sizes}
    with torch.no_grad():
        for b, (x, _) in enumerate(batches):
            samples = []
            for s in range(max(sizes)):
                with mc_dropout(model, True, seed=derive_seed(seed, EVALUATE_MC_SAMPLE, b, s)):
                    samples.append(torch.softmax(model(x), dim=1))
            for n in sizes:
                means[n].append(torch.stack(samples[:n]).mean(0))
    labels = torch.cat([y for _, y in batches])
    return {n: predictive_metrics(torch.cat(means[n]), labels) for n in sizes}


def assert_curve_equals(curve, ref, sizes, tol=1e-12):
    for i, n in enumerate(sizes):
        for key in KEYS:
            assert getattr(curve, key)[i] == pytest.approx(ref[n][key], abs=tol, rel=tol), (key, n)
        np.testing.assert_array_equal(curve.bin_counts[i], ref[n]["bin_counts"])


def rows_per_pass(model):
    seen = []
    return seen, model.register_forward_pre_hook(lambda module, inp: seen.append(int(inp[0].shape[0])))


@pytest.mark.parametrize("kind", ["torch", "mc"])
@pytest.mark.parametrize("max_batch, passes", [
    (None, [20, 20, 15]),                 # default: 5 copies stacked (<= 128 rows on CPU), one pass per batch
    (1000, [20, 20, 15]),                 # every MC sample of a batch in one pass
    (8, [8, 8, 4] * 2 + [6, 6, 3]),       # 2 copies per pass (the batch of 3: 2 copies of 3 rows)
    (4, [4] * 10 + [3] * 5),              # one copy per pass: the engine before stacking
    (3, [3, 1] * 10 + [3] * 5),           # batches of 4 split into pieces of 3 + 1 rows
    (1, [1] * 55),                        # every sample alone
])
def test_stacked_and_split_passes_equal_one_sample_per_pass(kind, max_batch, passes):
    model, batches = ConvNet(kind), conv_batches()
    ref = one_sample_per_pass(model, batches, SIZES, seed=9)
    seen, handle = rows_per_pass(model)
    try:
        curve = ensemble_curve(model, batches, SIZES, seed=9, max_batch=max_batch)
    finally:
        handle.remove()
    assert seen == passes
    assert_curve_equals(curve, ref, SIZES)
    assert curve.forward_passes == 5 and curve.note == "" and curve.num_samples == 11
    assert curve.nll[0] != pytest.approx(curve.nll[-1], abs=1e-6)        # the MC samples really differ
    assert all("forward" not in m.__dict__ for m in model.modules())     # every dropout restored


def test_each_copy_of_a_stacked_pass_gets_its_own_samples_masks():
    """Inside one stacked pass, rows j*n..(j+1)*n of every dropout's output are its input times the mask
    of MC sample j, exactly: copies never share a mask."""
    model, batches = ConvNet(), conv_batches((3,))
    x = batches[0][0]
    got = {}

    def keep(name):
        def hook(module, inp, out):
            got[name] = (inp[0].clone(), out.clone())
        return hook
    handles = [getattr(model, n).register_forward_hook(keep(n)) for n in ("drop1", "drop2", "drop3")]
    try:
        ensemble_curve(model, [(x, batches[0][1])], (4,), seed=2, max_batch=12)  # 4 copies of 3 rows: one pass
    finally:
        for h in handles:
            h.remove()
    for index, (name, channelwise) in enumerate((("drop1", False), ("drop2", True), ("drop3", False))):
        inp, out = got[name]
        assert inp.shape[0] == 12
        p = getattr(model, name).p
        masks = []
        for j in range(4):
            part = inp[3 * j:3 * j + 3]
            module_seed = derive_seed(derive_seed(2, EVALUATE_MC_SAMPLE, 0, j), DROPOUT_MODULE, index)
            mask = seeded_mask(part, p, module_seed, channelwise)
            assert torch.equal(out[3 * j:3 * j + 3], part * mask), (name, j)
            masks.append(mask)
        assert not any(torch.equal(masks[0], m) for m in masks[1:]), name


def test_float32_zoo_model_stacked_equals_unstacked_to_rounding():
    from landscape_tools.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet_mcdo_18", width=4, num_classes=3, in_channels=1)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    one = ensemble_curve(model, batches, (1, 3, 6), seed=4, max_batch=6)      # one MC sample per pass
    for cap in (None, 36, 4):                                                 # stacked; split 4 + 2 rows
        got = ensemble_curve(model, batches, (1, 3, 6), seed=4, max_batch=cap)
        for key in KEYS:
            np.testing.assert_allclose(getattr(got, key), getattr(one, key), rtol=1e-6, atol=1e-7, err_msg=key)


def test_a_model_that_is_not_batch_first_runs_one_sample_per_pass():
    model = FeaturesFirst()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
               for _ in range(2)]
    ref = one_sample_per_pass(model, batches, (1, 3), seed=5)
    curve = ensemble_curve(model, batches, (1, 3), seed=5)
    assert_curve_equals(curve, ref, (1, 3))
    assert "not batch-first" in curve.note
    with pytest.raises(ConfigError, match=r"a dropout input of shape \(6, 2\) does not have the batch as its leading "
                                          r"dimension, so a batch of 4 cannot be split into pieces of --max-batch 2 "
                                          r"rows: give --max-batch at least 4"):
        ensemble_curve(model, batches, (1, 3), seed=5, max_batch=2)


def test_out_of_memory_halves_the_copies_with_the_same_answer():
    class OOMAbove(nn.Module):
        def forward(self, x):
            if x.shape[0] > 8:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return x
    net = ConvNet()
    guarded = nn.Sequential(OOMAbove(), net)
    batches = conv_batches()
    seen, handle = rows_per_pass(guarded[1])
    try:
        got = ensemble_curve(guarded, batches, SIZES, seed=9, max_batch=1000)
    finally:
        handle.remove()
    assert max(seen) <= 8
    assert_curve_equals(got, one_sample_per_pass(net, batches, SIZES, seed=9), SIZES)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_max_batch_is_refused(bad):
    with pytest.raises(ConfigError, match=r"--max-batch .*: expected a whole number of rows per forward pass, "
                                          r"at least 1"):
        ensemble_curve(ConvNet(), conv_batches(), (1, 2), max_batch=bad)
