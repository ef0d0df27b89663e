"""landscape-tools: Hessian spectra, loss surfaces and feature-map variance of neural networks.

The library computes and never prints or exits; the ``lt`` command (``landscape_tools.cli``)
is a thin layer over it.
"""
__version__ = "0.1.0"

from .errors import LTError  # noqa: E402
from .models import build_model, list_models, mc_dropout  # noqa: E402


def load_checkpoint(path, **kwargs):
    """Load any supported checkpoint -> ``(model, info)``; see :func:`landscape_tools.checkpoints.load_checkpoint`."""
    from .checkpoints import load_checkpoint as _load
    return _load(path, **kwargs)


__all__ = ["__version__", "LTError", "build_model", "list_models", "mc_dropout", "load_checkpoint"]
