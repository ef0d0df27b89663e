"""The one seed derivation of landscape-tools: every seed lt derives from another seed comes from
:func:`derive_seed` (re-exported by :mod:`landscape_tools.engine`).

``derive_seed(seed, PURPOSE, *indices)``: the first part after the seed is one of the purposes below,
one integer per kind of random draw, so two draws of different purposes never share a seed whatever
their other parts (a Hessian row's start vector, its Hutchinson probes and its solver's restart
vectors are three purposes).  The seed a user gives is used as is only where no second stream is
derived from it: the surface's random directions (repeat 0), ``lt train``'s initial weights and its
training run's generators (order, augmentation, training dropout), the data subset (``--samples``).

``SEED_SCHEME`` is recorded in every result file's run key (``seed_scheme``): a partial file written
under another scheme is refused, not resumed with other masks.  Changing a purpose's number, the
parts a call passes, or :func:`derive_seed` itself changes results: bump ``SEED_SCHEME`` then.
Scheme 1 (lt before this module) mixed seeds with per-module formulas (``seed * 1_000_003 + ...``,
offsets such as ``seed + 7919 * k``, a splitmix64 in featvar, ``SeedSequence`` in evaluate and the
corruptions); scheme 2 is this module.

This module imports nothing of lt and no third-party package, so the low-level solvers
(``_lanczos``) and the dropout switch (``models.mc``) can use it.
"""
from __future__ import annotations

import hashlib

__all__ = ["SEED_SCHEME", "derive_seed", "PURPOSES"]

#: the seed derivation in force; part of every run's key (older partial files are refused, not resumed)
SEED_SCHEME = 2

# ----------------------------------------------------------------------------- purposes
# (the parts after the purpose are listed beside each; never renumber or reuse one)
#: (seed of an ``mc_dropout`` block, module index): the mask seed of that dropout module
DROPOUT_MODULE = 1
#: (``mc_seed``, global batch index): the ``mc_dropout`` seed of a Hessian batch's fixed masks
HESSIAN_BATCH_MASKS = 2
#: (seed, row): the seed of a Hessian row's solver (its start vector; the solver derives the rest)
HESSIAN_START = 3
#: (seed, row): the Hutchinson probes of a row
HESSIAN_HUTCHINSON = 4
#: (seed, row): the Hutch++ probes of a row
HESSIAN_HUTCHPP = 5
#: (seed, row): the SLQ seed of a row (run r: :data:`SLQ_RUN`)
HESSIAN_SLQ = 6
#: (solver seed, products so far): Lanczos' fresh direction after an invariant subspace
LANCZOS_RESTART = 7
#: (solver seed, i): the i-th random vector of block power iteration's first block
POWER_BLOCK = 8
#: (solver seed, products so far): the seed of one block power iteration's orthonormalisation
POWER_STEP = 9
#: (seed of an orthonormalisation, row, attempt): the random vector replacing a row that lost its norm
ORTHONORMAL_REPLACEMENT = 10
#: (SLQ seed, run): the start vector of SLQ run ``run``
SLQ_RUN = 11
#: (seed, global batch index, MC sample): the ``mc_dropout`` seed of ``lt evaluate``'s MC sample
EVALUATE_MC_SAMPLE = 12
#: (seed, batch index, MC sample): the ``mc_dropout`` seed of a surface evaluation's MC sample (every grid
#: point draws the same masks)
SURFACE_MC_SAMPLE = 13
#: (seed, global batch index): torch's global generator during featvar's passes over a batch
FEATVAR_BATCH = 14
#: (seed, global batch index, MC copy): featvar's input noise of one copy
FEATVAR_NOISE = 15
#: (seed, global batch index, MC copy, dropout module index, call): featvar's mask of one copy
FEATVAR_DROPOUT = 16
#: (seed, crc32 of the corruption's name, severity, image position): a noise corruption's draws
CORRUPTION = 17
#: (seed, crc32 of ``kind/quantity``): ``lt compare``'s bootstrap (and permutation test) seed of a quantity
COMPARE_QUANTITY = 18
#: (demo seed, model index): the initial weights of the demo's model ``index``
DEMO_MODEL_INIT = 19
#: (seed, repeat r >= 1): the direction seed of surface repeat r (scheme 1's tag, kept: same numbers)
SURFACE_REPEAT = 0x5EED_16

#: every purpose by name (they must be distinct: tests/test_engine.py checks)
PURPOSES = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, int)
            and name != "SEED_SCHEME"}


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from ``seed`` and integer ``parts`` (a purpose, then batch, sample, module ...),
    stable across platforms, processes and Python versions: the first 8 bytes (little-endian, halved
    to 63 bits) of the SHA-256 of the decimal parts joined by commas, so nearby inputs give unrelated
    seeds and every seed (any size, negative too) is used whole."""
    text = ",".join(str(int(p)) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
