"""MC dropout: active in eval mode, switched on/off for any model, seeded masks, restored on exit."""
import pytest
import torch
import torch.nn as nn

from landscape_tools.models import MCDropout, build_model, dropout_modules, has_stochastic_dropout, mc_dropout
from landscape_tools.seeds import DROPOUT_MODULE, derive_seed

P = 0.5


def _mc_model():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 16), nn.Linear(16, 3)
    model = nn.Sequential(lin1, MCDropout(P), lin2).eval()
    plain = nn.Sequential(lin1, lin2).eval()
    return model.double(), plain.double()


def _x():
    return torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _sub_seed(seed, index):
    """The per-module seed mc_dropout documents: derived from the seed and the module's position."""
    return derive_seed(seed, DROPOUT_MODULE, index)


def _mask(shape, seed, p=P, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) >= p).to(dtype) / (1 - p)


def test_mcdropout_active_in_eval_by_default():
    model, plain = _mc_model()
    x = _x()
    assert not model.training
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b)
    assert not torch.equal(a, plain(x))
    assert has_stochastic_dropout(model)
    # the expected sample: the hidden activations scaled by 0 or 1/(1-p)
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    h = model[0](x)
    mask = torch.nn.functional.dropout(torch.ones_like(h), P, training=True)
    torch.testing.assert_close(out, model[2](h * mask), rtol=0, atol=1e-12)


def test_disabled_is_deterministic_and_equals_model_without_dropout():
    model, plain = _mc_model()
    x = _x()
    with mc_dropout(model, False) as same:
        assert same is model
        assert not has_stochastic_dropout(model)
        a, b = model(x), model(x)
    assert torch.equal(a, b) and torch.equal(a, plain(x))
    model.train()  # also in train mode
    with mc_dropout(model, False):
        assert torch.equal(model(x), plain(x))


def test_seeded_masks_fixed_and_exact():
    model, _ = _mc_model()
    x = _x()
    with mc_dropout(model, True, seed=4):
        assert not has_stochastic_dropout(model)
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    h = model[0](x)
    expected = model[2](h * _mask(h.shape, _sub_seed(4, 0)))
    assert torch.equal(a, expected)
    with mc_dropout(model, True, seed=5):
        c = model(x)
    assert not torch.equal(a, c)
    with mc_dropout(model, True, seed=4):
        assert torch.equal(model(x), a)  # the same seed again: the same masks


def test_restored_on_exit_and_after_exception():
    model, _ = _mc_model()
    drop = model[1]
    with mc_dropout(model, False):
        assert drop.mc_enabled is False
    assert drop.mc_enabled is True and drop.mc_seed is None
    with pytest.raises(RuntimeError, match="boom"):
        with mc_dropout(model, True, seed=1):
            assert drop.mc_seed == _sub_seed(1, 0)
            raise RuntimeError("boom")
    assert drop.mc_enabled is True and drop.mc_seed is None
    # nested blocks restore the outer state
    with mc_dropout(model, False):
        with mc_dropout(model, True, seed=2):
            assert drop.mc_enabled and drop.mc_seed == _sub_seed(2, 0)
        assert drop.mc_enabled is False and drop.mc_seed is None
    assert drop.mc_enabled is True


class UserNet(nn.Module):
    """A user model with ordinary torch dropout (inactive in eval mode unless switched on)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.drop = nn.Dropout(P)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x)))


def test_ordinary_dropout_switched():
    torch.manual_seed(0)
    net = UserNet().double().eval()
    x = _x()
    ref = net.fc2(net.fc1(x))
    assert torch.equal(net(x), ref) and not has_stochastic_dropout(net)
    with mc_dropout(net, True):
        assert has_stochastic_dropout(net)  # switched on without a seed: fresh masks each pass
        a, b = net(x), net(x)
    assert not torch.equal(a, b) and not torch.equal(a, ref)
    with mc_dropout(net, True, seed=9):
        assert not has_stochastic_dropout(net)
        s1, s2 = net(x), net(x)
    assert torch.equal(s1, s2)
    h = net.fc1(x)
    assert torch.equal(s1, net.fc2(h * _mask(h.shape, _sub_seed(9, 0))))
    assert "forward" not in net.drop.__dict__ and torch.equal(net(x), ref)  # restored: eval mode is the identity
    net.train()
    assert has_stochastic_dropout(net)
    with mc_dropout(net, False):
        assert not has_stochastic_dropout(net)
        assert torch.equal(net(x), ref)
    assert "forward" not in net.drop.__dict__
    assert not torch.equal(net(x), net(x))  # train mode: torch's own dropout again
    with pytest.raises(ValueError):
        with mc_dropout(net, False):
            raise ValueError
    assert "forward" not in net.drop.__dict__


def test_each_module_gets_its_own_stream():
    torch.manual_seed(0)
    model = nn.Sequential(MCDropout(P), MCDropout(P)).double()
    x = torch.ones(3, 40, dtype=torch.float64)
    assert [type(m).__name__ for _, m in dropout_modules(model)] == ["MCDropout", "MCDropout"]
    with mc_dropout(model, True, seed=2):
        first = model[0](x)
        out = model(x)
    torch.testing.assert_close(first, _mask(x.shape, _sub_seed(2, 0)), rtol=0, atol=0)
    expected = _mask(x.shape, _sub_seed(2, 0)) * _mask(x.shape, _sub_seed(2, 1))
    assert torch.equal(out, expected)
    torch_model = nn.Sequential(nn.Dropout(P), nn.Dropout(P)).double().eval()
    with mc_dropout(torch_model, True, seed=2):
        assert torch.equal(torch_model(x), expected)


def test_dropout2d_channelwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout2d(P)).double().eval()
    x = torch.ones(4, 8, 5, 5, dtype=torch.float64)
    for seed in (None, 3):
        with mc_dropout(model, True, seed=seed):
            y = model(x)
        planes = y.reshape(4, 8, -1)
        # one value per (sample, channel): the whole plane is kept (scaled by 2) or dropped
        assert torch.equal(planes, planes[:, :, :1].expand_as(planes))
        assert set(planes[:, :, 0].flatten().tolist()) <= {0.0, 2.0}
        assert 0 < int((planes[:, :, 0] == 0).sum()) < 32
    with mc_dropout(model, True, seed=3):
        y = model(x)
    assert torch.equal(y, _mask((4, 8, 1, 1), _sub_seed(3, 0)).expand(4, 8, 5, 5))
    with mc_dropout(model, False):
        assert torch.equal(model(x), x)


def test_zoo_mcdo_model():
    torch.manual_seed(0)
    model = build_model("resnet_mcdo_18", num_classes=3, width=4).double().eval()
    dnn = build_model("resnet_dnn_18", num_classes=3, width=4).double().eval()
    dnn.load_state_dict(model.state_dict())  # MC dropout has no state: the same keys
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        with mc_dropout(model, False):
            assert torch.equal(model(x), dnn(x))
        with mc_dropout(model, True, seed=0):
            assert torch.equal(model(x), model(x))
    assert not has_stochastic_dropout(dnn)


def test_mcdropout_validates_p():
    with pytest.raises(ValueError, match=r"dropout probability p=1.0 must be in \[0, 1\)"):
        MCDropout(1.0)
    m = MCDropout(0.0)
    x = torch.randn(3, 4)
    assert torch.equal(m(x), x) and not has_stochastic_dropout(nn.Sequential(m))
    assert repr(MCDropout(0.25)) == "MCDropout(p=0.25)"


def test_mask_rows_give_the_whole_batch_mask_piece_by_piece():
    """Inside mask_rows(start, count, total) a seeded mask is rows start..start+count of the mask a
    whole batch of ``total`` gets: pieces of a batch see exactly the whole batch's masks."""
    from landscape_tools.errors import ConfigError
    from landscape_tools.models import mask_rows

    model, _ = _mc_model()
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with mc_dropout(model, True, seed=4), torch.no_grad():
        whole = model(x)
        pieces = []
        for start, stop in ((0, 3), (3, 6), (6, 7)):
            with mask_rows(start, stop - start, 7):
                pieces.append(model(x[start:stop]))
        torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-12, atol=1e-14)   # matmul rounding only
        ones = torch.ones(7, 16, dtype=torch.float64)
        drop = model[1]
        masks = []
        for start, stop in ((0, 3), (3, 6), (6, 7)):
            with mask_rows(start, stop - start, 7):
                masks.append(drop(ones[start:stop]))
        assert torch.equal(torch.cat(masks), drop(ones))                                # the masks exactly
        with mask_rows(0, 3, 7):            # a (samples x 2, ...) input: two rows per sample, still matched
            twice = drop(torch.ones(6, 16, dtype=torch.float64))
        assert torch.equal(twice, drop(torch.ones(14, 16, dtype=torch.float64))[:6])
        with mask_rows(0, 3, 7), pytest.raises(ConfigError, match=r"does not have the batch \(3 samples"):
            drop(torch.ones(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="not inside a batch of 7"):
        with mask_rows(5, 3, 7):
            pass


# ----------------------------------------------------------------------------- which modules are sampled
def _mc_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, MCDropout)]


def test_zoo_models_sample_exactly_their_mcdropout_layers():
    """All 60 zoo names: MC sampling switches on exactly the MCDropout modules, none for ``_dnn``
    (VGG / AlexNet keep their classifier nn.Dropout off in eval mode, as the reference code has it)."""
    from landscape_tools.models import list_models, sampling_dropout_modules

    names = list_models()
    assert len(names) == 60
    for name in names:
        model = build_model(name, width=1).eval()
        sampled = [n for n, _ in sampling_dropout_modules(model)]
        assert sampled == _mc_names(model), name
        assert bool(sampled) == ("_mcdo" in name), name
        with mc_dropout(model, True):
            assert has_stochastic_dropout(model) == ("_mcdo" in name), name
            assert all("forward" not in m.__dict__ for _, m in dropout_modules(model)), name


def test_dnn_zoo_model_is_deterministic_under_mc_dropout():
    torch.manual_seed(0)
    model = build_model("vgg_dnn_11", num_classes=3, width=1).double().eval()
    assert [type(m) for _, m in dropout_modules(model)] == [nn.Dropout, nn.Dropout]     # the classifier's
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
        for seed in (None, 1, 2):
            with mc_dropout(model, True, seed=seed):
                assert torch.equal(model(x), plain)


def test_zoo_marker_survives_checkpoint_loading(tmp_path):
    from landscape_tools.checkpoints import load_checkpoint, save_checkpoint
    from landscape_tools.models import sampling_dropout_modules

    for name in ("alexnet_dnn", "alexnet_mcdo"):
        model = build_model(name, num_classes=3, width=1)
        native, bare, reference, pickled = (tmp_path / f"{name}.{kind}.pt" for kind in ("native", "bare", "ref", "pkl"))
        save_checkpoint(native, model, name, model.arch_kwargs, {})
        torch.save(model.state_dict(), bare)
        torch.save({"name": name, "state_dict": model.state_dict()}, reference)
        torch.save(model, pickled)
        loaded = [load_checkpoint(native)[0], load_checkpoint(bare, arch=name)[0], load_checkpoint(reference)[0],
                  load_checkpoint(pickled, trust_pickle=True)[0]]
        for net in loaded:
            assert [n for n, _ in sampling_dropout_modules(net)] == _mc_names(model) == _mc_names(net), name
        assert len(_mc_names(model)) == (5 if name == "alexnet_mcdo" else 0)


def test_user_models_outside_the_zoo_sample_their_torch_dropout():
    from landscape_tools.models import sampling_dropout_modules

    net = UserNet()
    assert [n for n, _ in sampling_dropout_modules(net)] == ["drop"]
    channel = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout2d(0.2), nn.Flatten(), nn.Dropout(0.1))
    assert [n for n, _ in sampling_dropout_modules(channel)] == ["1", "3"]
    # a user model wrapping a zoo DNN: its own dropout is sampled, the zoo model's classifier dropout is not
    wrapped = nn.Sequential(build_model("vgg_dnn_11", width=1), nn.Dropout(0.2))
    assert [n for n, _ in sampling_dropout_modules(wrapped)] == ["1"]
    # a user model with our MCDropout: only those, as for zoo models
    mixed = nn.Sequential(nn.Linear(2, 2), MCDropout(0.2), nn.Dropout(0.5))
    assert [n for n, _ in sampling_dropout_modules(mixed)] == ["1"]


def test_describe_sampling_names_the_modules():
    from landscape_tools.models import describe_sampling

    text = describe_sampling(build_model("alexnet_mcdo", width=1))
    assert text == ("MC sampling switches on 5 dropout modules: layer0.0.dropout, layer1.1.dropout, layer2.1.dropout, "
                    "layer2.2.dropout, layer2.3.dropout (MCDropout p=0.1); not sampled, off in eval mode: "
                    "classifier.2.dropout1, classifier.2.dropout2 (Dropout p=0.5)")
    assert describe_sampling(build_model("vgg_dnn_11", width=1)).startswith(
        "no MC dropout: no dropout module is sampled, every forward pass in eval mode is deterministic; not sampled")
    assert describe_sampling(UserNet()) == "MC sampling switches on 1 dropout module: drop (Dropout p=0.5)"
    assert describe_sampling(build_model("resnet_mcdo_152", width=1)).startswith(
        "MC sampling switches on 50 dropout modules: layer1.0.dropout, layer1.1.dropout, layer1.2.dropout, "
        "layer2.0.dropout, layer2.1.dropout, layer2.2.dropout and 44 more (MCDropout p=0.3)")
