"""Trace / density probes drawn on the run's device (issue #18 item 10) and the gradient start vector in
every Hessian-vector product form (item 11)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from landscape_tools import _lanczos, seeds
from landscape_tools._hvp import HessianOperator
from landscape_tools.hessian import _checked_start, top_eigenvalues


def _net_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
               for n in (6, 4, 5)]
    return model, batches


def _dense_gradient(model, batches):
    named = list(model.named_parameters())
    w = torch.cat([p.detach().reshape(-1) for _, p in named]).requires_grad_(True)
    parts = torch.split(w, [p.numel() for _, p in named])
    state = {n: t.view(p.shape) for (n, p), t in zip(named, parts)}
    total = sum(len(y) for _, y in batches)
    loss = sum(F.cross_entropy(functional_call(model, state, (x,)), y) * (len(y) / total) for x, y in batches)
    return torch.autograd.grad(loss, w)[0]


# ----------------------------------------------------------------------------- item 11
@pytest.mark.parametrize("sub_batch", [None, 2])
def test_every_form_starts_from_the_same_gradient_vector(sub_batch):
    model, batches = _net_and_batches()
    dense = _dense_gradient(model, batches)
    starts = {}
    for form in ("graph", "double", "func"):
        with HessianOperator(model, batches, form=form, sub_batch=sub_batch) as op:
            g = op.free_gradient()
            torch.testing.assert_close(g, dense, rtol=1e-12, atol=1e-14)
            starts[form], _ = _checked_start(op, op.dim, "LM", 7)
    # the start by hand: the seeded random unit vector plus the unit gradient, normalised
    v = _lanczos._random_unit(dense.numel(), 7, "cpu") + dense / torch.linalg.vector_norm(dense)
    v /= torch.linalg.vector_norm(v)
    for form, start in starts.items():
        torch.testing.assert_close(start, v, rtol=1e-12, atol=1e-14, msg=form)


def test_top_eigenvalue_is_the_same_in_every_form():
    model, batches = _net_and_batches()
    ref = top_eigenvalues(model, batches, k=1, scope="dataset", form="graph", tol=1e-10)
    for form in ("double", "func"):
        res = top_eigenvalues(model, batches, k=1, scope="dataset", form=form, tol=1e-10)
        np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- item 10
class _DrawSpy:
    """Records the device of every random draw (and of the generator) made by ``_lanczos``."""

    def __init__(self, monkeypatch):
        self.draws = []
        real_randint, real_randn = torch.randint, torch.randn

        def randint(*args, generator=None, device=None, **kw):
            self.draws.append((torch.device(device) if device is not None else None,
                               generator.device if generator is not None else None))
            return real_randint(*args, generator=generator, device=device, **kw)

        def randn(*args, generator=None, device=None, **kw):
            self.draws.append((torch.device(device) if device is not None else None,
                               generator.device if generator is not None else None))
            return real_randn(*args, generator=generator, device=device, **kw)

        monkeypatch.setattr(_lanczos.torch, "randint", randint)
        monkeypatch.setattr(_lanczos.torch, "randn", randn)


def _old_rademacher_stream(n, seed, count):
    """How the probes were drawn before: one CPU generator, one vector at a time."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
            for _ in range(count)]


def test_probes_are_drawn_on_the_operators_device_with_the_cpu_numbers_on_a_cpu(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 9))
    h = torch.from_numpy(a + a.T)
    op = lambda v: h @ v          # noqa: E731
    cpu = torch.device("cpu")
    spy = _DrawSpy(monkeypatch)
    hut = _lanczos.hutchinson(op, 9, 6, seed=3, device=cpu)
    hpp = _lanczos.hutchpp(op, 9, 9, seed=3, device=cpu)
    nodes, weights = _lanczos.slq(op, 9, 2, 5, seed=3, device=cpu)
    # every probe drawn by a generator on the run's device, straight there (no CPU draw copied over)
    assert spy.draws and all(d == (cpu, cpu) for d in spy.draws), spy.draws
    # on a CPU the numbers are those of the old stream: the estimates by hand
    zs = _old_rademacher_stream(9, 3, 6)
    np.testing.assert_allclose(hut["samples"], [float(z @ h @ z) for z in zs], rtol=1e-14, atol=1e-12)
    # reproducible, and a new seed is a new sample
    again = _lanczos.hutchinson(op, 9, 6, seed=3, device=cpu)
    np.testing.assert_array_equal(again["samples"], hut["samples"])
    assert not np.array_equal(_lanczos.hutchinson(op, 9, 6, seed=4, device=cpu)["samples"], hut["samples"])
    np.testing.assert_array_equal(_lanczos.hutchpp(op, 9, 9, seed=3, device=cpu)["estimate"], hpp["estimate"])
    n2, w2 = _lanczos.slq(op, 9, 2, 5, seed=3, device=cpu)
    np.testing.assert_array_equal(n2, nodes)
    np.testing.assert_array_equal(w2, weights)
    # SLQ's run 0 starts from the normalised sign vector of a CPU stream seeded derive_seed(3, SLQ_RUN, 0):
    # its first node weight is the squared first component of that start in the eigenbasis of the
    # tridiagonal matrix, so compare the Gauss quadrature of f(x) = x: sum_i w_i theta_i = v^T H v
    (v,) = _old_rademacher_stream(9, seeds.derive_seed(3, seeds.SLQ_RUN, 0), 1)
    v = v / torch.linalg.vector_norm(v)
    ok = weights[0] > 0
    np.testing.assert_allclose((weights[0][ok] * nodes[0][ok]).sum(), float(v @ h @ v), rtol=1e-10)
