"""MC dropout: dropout that stays active in eval mode, and a switch for every dropout in a model.

The paper's MC-dropout models apply dropout at prediction time too: a forward pass in eval mode
(BatchNorm on running statistics) is one Monte-Carlo sample.  :func:`mc_dropout` turns a model's
MC dropout on (see :func:`sampling_dropout_modules`: a zoo model's :class:`MCDropout` layers, none
for a zoo ``_dnn`` model, the ordinary ``nn.Dropout`` / ``nn.Dropout1d/2d/3d`` modules of a user
model) or every dropout off for the duration of a ``with`` block, and with a seed
makes every forward pass inside the block draw the same masks (needed for a deterministic
Hessian operator).  On exit the model is exactly as it was.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import seeds
from ..errors import ConfigError

_CHANNEL_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ELEMENT_DROPOUTS = (nn.Dropout,)
#: (start, count, total) while a forward pass sees rows start..start+count of a batch of total rows
_MASK_ROWS: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("lt_mask_rows", default=None)


@contextlib.contextmanager
def mask_rows(start: int, count: int, total: int) -> Iterator[None]:
    """Inside the block, forward passes see samples ``start .. start+count`` of a batch of ``total``:
    every seeded dropout mask is that slice of the mask the whole batch would get, so a batch
    processed in pieces has exactly the masks it has when processed whole.  A dropout input whose
    leading dimension is not a multiple of ``count`` (not batch-first) is refused inside the block.
    """
    if not (0 <= start and 0 < count and start + count <= total):
        raise ValueError(f"rows {start}..{start + count} are not inside a batch of {total}")
    token = _MASK_ROWS.set((int(start), int(count), int(total)))
    try:
        yield
    finally:
        _MASK_ROWS.reset(token)


def _seeded_mask(x: torch.Tensor, p: float, seed: int, channelwise: bool) -> torch.Tensor:
    shape = x.shape[:2] + (1,) * (x.dim() - 2) if channelwise else x.shape
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed) % (2**63 - 1))
    rows = _MASK_ROWS.get()
    if rows is None or rows[1] == rows[2]:
        keep = torch.rand(shape, generator=gen, device=x.device) >= p
    else:
        start, count, total = rows
        lead = int(x.shape[0]) if x.dim() else 0
        if lead == 0 or lead % count:
            raise ConfigError(f"a dropout input of shape {tuple(x.shape)} does not have the batch ({count} samples of "
                             f"this piece) as its leading dimension, so its mask cannot be matched to the whole "
                             f"batch's; process the batch whole (in `lt hessian`: --sub-batch at least the batch size)")
        per = lead // count
        whole = torch.rand((total * per,) + tuple(shape[1:]), generator=gen, device=x.device)
        keep = whole[start * per:(start + count) * per] >= p
    return keep.to(x.dtype) / (1.0 - p) if p < 1.0 else torch.zeros(shape, dtype=x.dtype, device=x.device)


def seeded_mask(x: torch.Tensor, p: float, seed: int, channelwise: bool = False) -> torch.Tensor:
    """The scaled keep-mask a dropout module seeded with ``seed`` (inside ``mc_dropout(model, True, seed=s)``
    the ``index``-th module's is ``seeds.derive_seed(s, seeds.DROPOUT_MODULE, index)``) multiplies
    ``x`` by, honouring :func:`mask_rows`; ``x * seeded_mask(x, ...)`` is exactly its output."""
    return _seeded_mask(x, p, seed, channelwise)


def apply_dropout(x: torch.Tensor, p: float, active: bool, seed: int | None, channelwise: bool = False) -> torch.Tensor:
    """Dropout with probability ``p``; identity when not ``active``; fixed mask when ``seed`` is set."""
    if not active or p == 0.0:
        return x
    if seed is None:
        if channelwise:
            return F.dropout2d(x, p, training=True) if x.dim() == 4 else F.dropout1d(x, p, training=True)
        return F.dropout(x, p, training=True)
    return x * _seeded_mask(x, p, seed, channelwise)


class MCDropout(nn.Module):
    """Dropout that is active in train *and* eval mode (the paper's MC dropout).

    It has no state, so models with and without it share state-dict keys.  ``mc_enabled`` and
    ``mc_seed`` are set by :func:`mc_dropout`.
    """

    def __init__(self, p: float = 0.3):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p={p} must be in [0, 1)")
        self.p = float(p)
        self.mc_enabled = True
        self.mc_seed: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.mc_enabled, self.mc_seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every dropout-like module of ``model`` (ours and torch's), in registration order."""
    kinds = (MCDropout,) + _ELEMENT_DROPOUTS + _CHANNEL_DROPOUTS
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def is_mc_layers_only(module: nn.Module) -> bool:
    """True for a module whose MC sampling is exactly its :class:`MCDropout` layers: every zoo model
    (``ZooNet`` sets the class attribute ``lt_mc_layers_only``, so it survives checkpoint loading,
    pickling and copies)."""
    return getattr(type(module), "lt_mc_layers_only", False) is True


def sampling_dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dropout modules MC sampling switches on, in registration order.

    * A model with :class:`MCDropout` layers: exactly those.  A zoo ``_mcdo`` model's ordinary
      ``nn.Dropout`` in the classifier stays as the reference code has it: off in eval mode.
    * A zoo model without them (``_dnn``): none; its classifier ``nn.Dropout`` stays off, so every
      forward pass in eval mode is deterministic, as the paper's DNN baseline is.
    * Any other model (outside the zoo): every dropout module (``nn.Dropout``, ``Dropout1d/2d/3d``)
      that is not inside a zoo model it wraps.
    """
    modules = dropout_modules(model)
    ours = [(name, m) for name, m in modules if isinstance(m, MCDropout)]
    if ours:
        return ours
    zoo = [name for name, m in model.named_modules() if is_mc_layers_only(m)]
    if "" in zoo:
        return []
    return [(name, m) for name, m in modules if not any(name.startswith(prefix + ".") for prefix in zoo)]


def describe_sampling(model: nn.Module, max_names: int = 6) -> str:
    """One line on which dropout modules MC sampling switches on (names, kind and p), or that none
    is, naming the dropout modules that stay as they are (off in eval mode)."""
    def names(pairs):
        shown = [name or "(the model itself)" for name, _ in pairs[:max_names]]
        more = len(pairs) - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")

    def kinds(pairs):
        seen = []
        for _, m in pairs:
            kind = f"{type(m).__name__} p={float(getattr(m, 'p', 0.0)):g}"
            if kind not in seen:
                seen.append(kind)
        return "; ".join(seen)

    sampled = sampling_dropout_modules(model)
    active = [(n, m) for n, m in sampled if float(getattr(m, "p", 0.0)) > 0.0]
    left = [(n, m) for n, m in dropout_modules(model) if all(m is not s for _, s in sampled)]
    if active:
        line = (f"MC sampling switches on {len(active)} dropout module{'s' if len(active) != 1 else ''}: "
                f"{names(active)} ({kinds(active)})")
    else:
        line = "no MC dropout: no dropout module is sampled, every forward pass in eval mode is deterministic"
    if left:
        line += f"; not sampled, off in eval mode: {names(left)} ({kinds(left)})"
    return line


def has_stochastic_dropout(model: nn.Module) -> bool:
    """True when a forward pass of ``model`` in its current mode would draw dropout masks."""
    for _, m in dropout_modules(model):
        p = getattr(m, "p", 0.0)
        if p == 0.0:
            continue
        if isinstance(m, MCDropout):
            if m.mc_enabled and m.mc_seed is None:
                return True
        elif "forward" in m.__dict__:  # switched by mc_dropout: stochastic when on without a seed
            patched = m.__dict__["forward"]
            if getattr(patched, "lt_active", False) and getattr(patched, "lt_seed", 0) is None:
                return True
        elif m.training:
            return True
    return False


def _make_forward(module: nn.Module, active: bool, seed: int | None, channelwise: bool):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, module.p, active, seed, channelwise)
    forward.lt_active, forward.lt_seed = active, seed
    return forward


@contextlib.contextmanager
def replaced_forwards(replacements: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Shadow ``forward`` on each module instance of ``(module, new_forward)`` pairs (taken lazily,
    so a failure part-way restores what was replaced); every module gets back exactly what it had
    on exit (its own instance attribute, or none)."""
    saved = []
    try:
        for m, forward in replacements:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = forward
        yield
    finally:
        for m, state in reversed(saved):
            if state is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = state


@contextlib.contextmanager
def mc_dropout(model: nn.Module, enabled: bool = True, seed: int | None = None) -> Iterator[nn.Module]:
    """Turn every dropout of ``model`` on (``enabled=True``) or off, restoring it on exit.

    Args:
        model: any ``nn.Module``. On: the modules of :func:`sampling_dropout_modules`, whatever the
            train/eval mode: the model's :class:`MCDropout` layers when it has any; none for a zoo
            ``_dnn`` model (as in the reference code, a zoo model's classifier ``nn.Dropout`` keeps its
            train/eval behaviour); else, for a model outside the zoo, its ordinary ``nn.Dropout`` /
            ``Dropout1d/2d/3d`` modules. Off: every dropout module of the model.
        enabled: True: dropout is applied (MC sampling); False: every dropout is the identity.
        seed: with ``enabled``, every forward pass inside the block draws the *same* masks
            (the ``index``-th module, in :func:`sampling_dropout_modules` order, draws from a generator
            seeded ``seeds.derive_seed(seed, seeds.DROPOUT_MODULE, index)``);
            None draws fresh masks from torch's global generator each pass.

    Yields:
        the same model.

    Example::

        with mc_dropout(model, True, seed=0):
            a = model(x); b = model(x)    # identical: one fixed mask
        with mc_dropout(model, False):
            y = model(x)                  # deterministic prediction
    """
    saved = []
    targets = sampling_dropout_modules(model) if enabled else dropout_modules(model)
    try:
        for index, (_, m) in enumerate(targets):
            sub_seed = None if seed is None else seeds.derive_seed(seed, seeds.DROPOUT_MODULE, index)
            if isinstance(m, MCDropout):
                saved.append((m, "mc", (m.mc_enabled, m.mc_seed)))
                m.mc_enabled, m.mc_seed = bool(enabled), sub_seed
            else:
                saved.append((m, "torch", m.__dict__.get("forward")))
                channelwise = isinstance(m, _CHANNEL_DROPOUTS)
                m.forward = _make_forward(m, bool(enabled), sub_seed, channelwise)
        yield model
    finally:
        for m, kind, state in reversed(saved):
            if kind == "mc":
                m.mc_enabled, m.mc_seed = state
            elif state is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = state
