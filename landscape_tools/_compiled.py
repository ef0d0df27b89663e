"""One ``torch.compile`` wrapper for every analysis: dropout masks drawn outside the graph, applied inside.

A seeded dropout mask comes from a ``torch.Generator`` seeded per module and per MC sample
(:func:`landscape_tools.models.mc.seeded_mask`).  Compiled naively, that breaks the graph at every
dropout module (``torch.Generator`` cannot be traced) and, where the seed is a Python ``int`` attribute
(``MCDropout.mc_seed``), specialises the graph on it, so every new seed compiles the model again.

:class:`SeededCompiled` keeps the masks exactly as they are (same generator, same seeds, same numbers)
but draws them eagerly, before the compiled call, and hands them to the graph as tensors: each sampled
dropout module's forward is, inside the graph, ``x * mask`` with ``mask`` a tensor attribute of the
module, which ``torch.compile`` lifts to a graph input (guarded on shape and dtype, not on its value).
One graph per input shape, no graph break at the dropout modules, no recompilation per seed.

The masks' shapes are those of the dropout modules' inputs: the first call with a new input shape runs
the model once eagerly (masks applied as usual) to record them, then runs the compiled graph.  Meant for
forward passes in eval mode (a module in train mode would see that first input twice).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from .models.mc import _CHANNEL_DROPOUTS, MCDropout, replaced_forwards, seeded_mask

#: the module attribute holding the mask of the next compiled call (None: the identity)
MASK_ATTR = "_lt_compiled_mask"

#: ``mask_of(index, module, shape, dtype, device) -> mask or None``: what the module multiplies its input
#: of that shape by in the next forward pass (None: it passes it through)
MaskOf = Callable[[int, nn.Module, torch.Size, torch.dtype, torch.device], "torch.Tensor | None"]


def current_dropout_mask(index: int, module: nn.Module, shape: torch.Size, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor | None:
    """The mask ``module`` applies in its present state: an :class:`MCDropout` by its ``mc_enabled`` /
    ``mc_seed``; a torch dropout switched by :func:`~landscape_tools.models.mc_dropout` by the seed it was
    given; any other torch dropout by its train/eval mode.  Exactly the mask its own forward draws for
    a seeded module; unseeded ones draw from torch's global generator (random either way)."""
    p = float(getattr(module, "p", 0.0))
    if isinstance(module, MCDropout):
        active, seed = module.mc_enabled, module.mc_seed
    else:
        switched = module.__dict__.get("forward")
        if switched is not None and hasattr(switched, "lt_active"):
            active, seed = switched.lt_active, switched.lt_seed
        else:
            active, seed = module.training, None
    if not active or p == 0.0:
        return None
    channelwise = isinstance(module, _CHANNEL_DROPOUTS)
    if seed is None:
        like = torch.empty(shape[:2] + (1,) * (len(shape) - 2) if channelwise else shape, device=device)
        return (torch.rand_like(like) >= p).to(dtype) / (1.0 - p)
    return seeded_mask(torch.empty(shape, dtype=dtype, device=device), p, seed, channelwise)


class SeededCompiled:
    """``torch.compile(model)`` whose dropout ``modules`` get their masks from ``mask_of`` as graph inputs.

    Args:
        model: the module to compile (shares parameters and buffers with the compiled one).
        modules: the dropout modules whose masks come from ``mask_of`` (default: every dropout module).
        mask_of: see :data:`MaskOf` (default :func:`current_dropout_mask`).
        dynamic: ``torch.compile``'s ``dynamic``.

    Calling it runs ``model(x)``'s compiled graph with the masks ``mask_of`` gives for the current state
    (seeds, plans): the numbers of the eager forward pass with those masks, to float rounding.
    """

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module] | None = None, mask_of: MaskOf | None = None,
                 dynamic: bool | None = False):
        from .models.mc import dropout_modules
        from .precision import compile_model

        self.model = model
        self.modules = list(modules) if modules is not None else [m for _, m in dropout_modules(model)]
        self.mask_of = mask_of or current_dropout_mask
        if dynamic is None:
            self.compiled = compile_model(model, True)
        else:
            self.compiled = torch.compile(model, dynamic=dynamic)
        self._shapes: dict[tuple, list] = {}
        self._masked = [(m, self._masked_forward(m)) for m in self.modules]

    @staticmethod
    def _masked_forward(module: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            mask = module.__dict__.get(MASK_ATTR)
            return x if mask is None else x * mask
        return forward

    def _record(self, x: torch.Tensor) -> list:
        """One eager pass with the masks applied, recording each module's input shape and dtype."""
        shapes: list = [None] * len(self.modules)

        def recording(index: int, module: nn.Module):
            def forward(t: torch.Tensor) -> torch.Tensor:
                shapes[index] = (t.shape, t.dtype, t.device)
                mask = self.mask_of(index, module, t.shape, t.dtype, t.device)
                return t if mask is None else t * mask
            return forward

        with replaced_forwards((m, recording(i, m)) for i, m in enumerate(self.modules)):
            self.model(x)
        return shapes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        shapes = self._shapes.get(key)
        if shapes is None:
            shapes = self._shapes[key] = self._record(x)
        masks = [None if s is None else self.mask_of(i, m, *s) for i, (m, s) in enumerate(zip(self.modules, shapes))]
        try:
            for m, mask in zip(self.modules, masks):
                m.__dict__[MASK_ATTR] = mask
            with replaced_forwards(self._masked):
                return self.compiled(x)
        finally:
            for m in self.modules:
                m.__dict__.pop(MASK_ATTR, None)
