"""Eigen-solvers and spectral estimators for matrix-free symmetric operators (private to ``hessian``).

Everything takes ``op(v) -> H v`` on flat float64 torch vectors of length ``n`` (on any device)
and keeps the Krylov basis and every scalar in float64:

* :func:`thick_restart_lanczos` -- k extreme eigenpairs (LM / LA / SA) by Lanczos with full
  reorthogonalisation and thick restarts (Wu & Simon 2000), stopping when every wanted Ritz pair has
  ``||H y - theta y|| <= tol * |theta|``;
* :func:`deflated_power` -- power iteration with deflation, stopping on the same residual test;
* :func:`hutchinson`, :func:`hutchpp` -- trace estimates with standard errors (Hutchinson 1989;
  Meyer, Musco, Musco & Woodruff 2021);
* :func:`slq` -- stochastic Lanczos quadrature nodes and weights (Golub & Meurant; Ubaru et al. 2017).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

Operator = Callable[[torch.Tensor], torch.Tensor]
WHICH = ("LM", "LA", "SA")
_CHUNK = 1 << 14   # columns of the basis widened / rotated at a time
_ROWS = 2          # rows of a float32 basis widened to float64 at a time
_BLOCK = 8         # basis rows allocated at a time


def order(values: np.ndarray, which: str) -> np.ndarray:
    """Indices putting ``values`` in ``which`` order: |value| descending (LM), descending (LA), ascending (SA)."""
    values = np.asarray(values, dtype=np.float64)
    if which == "LM":
        return np.lexsort((-values, -np.abs(values)))
    if which == "LA":
        return np.argsort(-values, kind="stable")
    if which == "SA":
        return np.argsort(values, kind="stable")
    raise ValueError(f"which={which!r} is not one of {', '.join(WHICH)}")


@dataclass
class EigenPairs:
    """Eigenvalues in ``which`` order with per-pair relative residual ``||Hv - lambda v|| / |lambda|``."""

    values: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    hvps: int
    vectors: torch.Tensor | None = None   # (k, n) float64 rows, when asked for


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2**63 - 1))


def _random_unit(n: int, seed: int, device, kind: str = "gaussian") -> torch.Tensor:
    gen = _generator(seed)
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    else:
        v = torch.randn(n, generator=gen, dtype=torch.float64)
    v = v.to(device)
    return v / torch.linalg.vector_norm(v)


class _Basis:
    """Up to ``capacity`` basis rows of length ``n``, allocated ``_BLOCK`` rows at a time as they are
    first written: a solve that converges before filling the basis never holds its unused rows, and
    growing never copies what is already stored."""

    def __init__(self, capacity: int, n: int, dtype: torch.dtype, device):
        self.capacity, self.n, self.dtype, self.device = int(capacity), int(n), dtype, device
        self.blocks: list[torch.Tensor] = []

    def __setitem__(self, i: int, row: torch.Tensor) -> None:
        if not 0 <= i < self.capacity:
            raise IndexError(f"basis row {i} outside 0..{self.capacity - 1}")
        while len(self.blocks) * _BLOCK <= i:
            rows = min(_BLOCK, self.capacity - len(self.blocks) * _BLOCK)
            self.blocks.append(torch.empty((rows, self.n), dtype=self.dtype, device=self.device))
        self.blocks[i // _BLOCK][i % _BLOCK] = row

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i // _BLOCK][i % _BLOCK]

    def head(self, size: int) -> list[torch.Tensor]:
        """Rows ``0 .. size-1`` as a list of row blocks (views)."""
        out, left = [], int(size)
        for block in self.blocks:
            if left <= 0:
                break
            out.append(block[:left])
            left -= block.shape[0]
        return out

    def columns(self, size: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``0 .. size-1``, columns ``start .. stop-1``, in float64."""
        return torch.cat([b[:, start:stop].to(torch.float64) for b in self.head(size)])

    def set_columns(self, rows: int, start: int, stop: int, values: torch.Tensor) -> None:
        """Rows ``0 .. rows-1``, columns ``start .. stop-1`` := ``values``."""
        done = 0
        for block in self.head(rows):
            r = block.shape[0]
            block[:, start:stop] = values[done:done + r]
            done += r


def _row_blocks(basis) -> list[torch.Tensor]:
    return [basis] if isinstance(basis, torch.Tensor) else basis


def _row_slices(basis):
    """``(offset, rows)`` over a (rows, n) tensor or a list of row blocks, as float64: a float64
    block whole, a float32 one widened a few rows at a time (never all at once)."""
    done = 0
    for block in _row_blocks(basis):
        step = block.shape[0] if block.dtype == torch.float64 else _ROWS
        for i in range(0, block.shape[0], step):
            yield done + i, block[i:i + step].to(torch.float64)
        done += block.shape[0]


def _project(basis, w: torch.Tensor) -> torch.Tensor:
    """``basis @ w`` in float64."""
    parts = [rows @ w for _, rows in _row_slices(basis)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=w.device)


def _subtract(w: torch.Tensor, basis, h: torch.Tensor) -> None:
    """``w -= basis.T @ h`` in float64."""
    for at, rows in _row_slices(basis):
        w.sub_(rows.T @ h[at:at + rows.shape[0]])


def _orthogonalise(w: torch.Tensor, basis) -> torch.Tensor:
    """Two passes of classical Gram-Schmidt against the rows of ``basis`` (a tensor or a list of row
    blocks); returns the coefficients."""
    if sum(b.shape[0] for b in _row_blocks(basis)) == 0:
        return torch.zeros(0, dtype=torch.float64, device=w.device)
    h = _project(basis, w)
    _subtract(w, basis, h)
    h2 = _project(basis, w)
    _subtract(w, basis, h2)
    return h + h2


def _combine(Y: torch.Tensor, V: _Basis, size: int) -> torch.Tensor:
    """``Y.T @ V[:size]`` in float64 (Y float64 (size, r)), column chunk by column chunk."""
    out = torch.empty((Y.shape[1], V.n), dtype=torch.float64, device=Y.device)
    for c in range(0, V.n, _CHUNK):
        out[:, c:c + _CHUNK] = Y.T @ V.columns(size, c, c + _CHUNK)
    return out


def _rel(res: np.ndarray, theta: np.ndarray, floor: float) -> np.ndarray:
    return np.abs(res) / np.maximum(np.abs(theta), floor)


def thick_restart_lanczos(op: Operator, n: int, k: int, which: str = "LM", tol: float = 1e-4,
                          max_hvps: int = 500, ncv: int | None = None, seed: int = 0, device=None,
                          return_vectors: bool = False, start: tuple[torch.Tensor, torch.Tensor] | None = None,
                          basis_dtype: torch.dtype = torch.float64) -> EigenPairs:
    """The ``k`` eigenpairs of a symmetric operator at one end of its spectrum.

    Args:
        op: ``v -> H v`` on flat float64 vectors.
        n: dimension; ``k <= n``.
        which: ``LM`` (largest magnitude, signed), ``LA`` (largest algebraic), ``SA`` (smallest).
        tol: relative residual each wanted pair must reach.
        max_hvps: budget of operator applications (pairs not converged by then are flagged).
        ncv: Krylov basis size before a restart (default ``max(2k + 10, 30)``; memory up to ``ncv * n``
            values of ``basis_dtype``, allocated 8 rows at a time as the basis grows).
        seed: seed of the start vector.
        device: where the basis lives (default: the operator's output device).
        return_vectors: also return the Ritz vectors ((k, n) float64).
        start: ``(v, H v)`` with ``v`` a unit vector whose product is already known (it then counts
            as the first of the products), or a function returning that pair or ``None``; default (or
            ``None``) a seeded random start.
        basis_dtype: storage of the Krylov basis. float64 (default) or float32, which halves its
            memory; every product, coefficient and scalar stays float64 either way. A float32 basis
            is orthogonal to ~1e-7, ample when the operator itself is float32 and ``tol >= 1e-6``;
            the operator then receives the basis rows as they are stored (float32 vectors).

    Returns:
        :class:`EigenPairs` in ``which`` order; residuals are the Lanczos estimates
        ``|beta_m s_mi| / |theta_i|``, equal to the true residuals as full reorthogonalisation keeps
        the Lanczos relation exact to rounding.
    """
    m = min(n, int(ncv) if ncv else max(2 * k + 10, 30))
    m = max(m, min(n, k + 1))
    if callable(start):
        start = start()  # made here, so no caller's frame keeps the two vectors alive during the solve
    if start is not None:
        v, pending = start
        start = None
    else:
        v = _random_unit(n, seed, "cpu")
        pending = op(v.to(device) if device is not None else v)
    device = pending.device if device is None else device
    V = _Basis(m, n, basis_dtype, device)
    V[0] = v.to(device)
    v = None
    T = np.zeros((m, m))
    size, hvps = 1, 0
    theta = sel = S = res = None
    beta = 0.0
    norm_est = 0.0
    while True:
        restart = False
        while True:
            j = size - 1
            w = pending if pending is not None else op(V[j])
            pending = None
            hvps += 1
            w = w.to(torch.float64).clone()
            h = _orthogonalise(w, V.head(size)).cpu().numpy()
            T[:size, j] = h
            T[j, :size] = h
            beta = float(torch.linalg.vector_norm(w))
            theta, S = np.linalg.eigh(T[:size, :size])
            norm_est = max(norm_est, float(np.max(np.abs(theta))))
            floor = max(norm_est * 1e-12, 1e-300)
            sel = order(theta, which)[:k]
            res = beta * np.abs(S[j, sel])
            done_pairs = _rel(res, theta[sel], floor) <= tol
            if size >= k and bool(np.all(done_pairs)):
                break
            if size == n or hvps >= max_hvps:
                break
            if beta <= 1e-10 * max(norm_est, 1e-300):
                # invariant subspace found: continue from a fresh direction orthogonal to it
                w = _random_unit(n, seed + 7919 * (hvps + 1), "cpu").to(device)
                _orthogonalise(w, V.head(size))
                w /= torch.linalg.vector_norm(w)
                beta_couple = 0.0
            else:
                w /= beta
                beta_couple = beta
            if size == m:
                restart = True
                break
            V[size] = w
            w = None  # not alive during the next product: one vector less at the memory peak
            T[size, j] = T[j, size] = beta_couple
            size += 1
        if not restart:
            break
        # thick restart: keep the best Ritz vectors, continue from the residual direction
        keep = min(size - 1, max(k, k + (m - k) // 2))
        kept = order(theta, which)[:keep]
        Y = torch.from_numpy(np.ascontiguousarray(S[:, kept])).to(device)
        for c in range(0, n, _CHUNK):
            V.set_columns(keep, c, c + _CHUNK, Y.T @ V.columns(size, c, c + _CHUNK))
        last = S[size - 1, kept]
        T[:] = 0.0
        T[:keep, :keep] = np.diag(theta[kept])
        T[keep, :keep] = T[:keep, keep] = beta_couple * last
        V[keep] = w
        size = keep + 1
    floor = max(norm_est * 1e-12, 1e-300)
    rel = _rel(res, theta[sel], floor)
    vectors = None
    if return_vectors:
        Y = torch.from_numpy(np.ascontiguousarray(S[:, sel])).to(device)
        vectors = _combine(Y, V, size)
    if size == n:
        rel = np.minimum(rel, tol)  # the basis spans the whole space: Ritz pairs are exact
    return EigenPairs(values=theta[sel].copy(), residuals=rel, converged=rel <= tol, hvps=hvps, vectors=vectors)


def deflated_power(op: Operator, n: int, k: int, which: str = "LM", tol: float = 1e-4, max_iter: int = 1000,
                   seed: int = 0, device=None, return_vectors: bool = False) -> EigenPairs:
    """Power iteration with deflation (each new iterate kept orthogonal to the pairs found).

    Pair ``i`` iterates on ``P H P`` (``P`` projects out the pairs found before) until its residual
    ``||P H v - lambda v|| <= tol * |lambda|`` (lambda the Rayleigh quotient) -- the residual, not the
    change of lambda.  The deflated residual is used in the loop because the true one cannot drop
    below the error left in the earlier vectors; a final Rayleigh-Ritz step over the found vectors
    (no extra products: their ``H v`` are kept) removes that cross-talk, and the reported residuals
    are the true ``||H v - lambda v|| / |lambda|``.  ``LA`` / ``SA`` iterate on ``H + rho I`` /
    ``rho I - H`` with ``rho`` a bound on ``|lambda|`` from a short power run (its products counted).

    Args:
        op, n, k, which, tol, seed, device, return_vectors: as :func:`thick_restart_lanczos`.
        max_iter: iterations allowed per eigenpair.

    Returns:
        :class:`EigenPairs` in ``which`` order with true residuals.
    """
    hvps = 0
    sign, shift = 1.0, 0.0
    if which != "LM":
        probe = deflated_power(op, n, 1, "LM", tol=1e-2, max_iter=min(max_iter, 50), seed=seed + 1, device=device)
        hvps += probe.hvps
        shift = 1.1 * abs(float(probe.values[0])) + 1e-30
        sign = 1.0 if which == "LA" else -1.0
    found: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    for i in range(k):
        v = _random_unit(n, seed + 1009 * (i + 1), "cpu")
        if device is not None:
            v = v.to(device)
        basis = torch.stack(found) if found else None
        w = None
        for _ in range(max(1, max_iter)):
            if basis is not None:
                _orthogonalise(v, basis)
            v /= torch.linalg.vector_norm(v)
            w = op(v).to(torch.float64)
            hvps += 1
            wd = w.clone()
            if basis is not None:
                _orthogonalise(wd, basis)
            lam = float(v @ wd)
            rel = float(torch.linalg.vector_norm(wd - lam * v)) / max(abs(lam), 1e-300)
            if rel <= tol:
                break
            z = sign * wd + shift * v if which != "LM" else wd
            if float(torch.linalg.vector_norm(z)) == 0.0:
                break
            v = z
        found.append(v)
        images.append(w)
    V, W = torch.stack(found), torch.stack(images)
    G = (V @ W.T).cpu().numpy()
    theta, S = np.linalg.eigh(0.5 * (G + G.T))
    St = torch.from_numpy(S).to(V.device)
    Y, HY = St.T @ V, St.T @ W
    res = torch.linalg.vector_norm(HY - torch.from_numpy(theta).to(V.device)[:, None] * Y, dim=1).cpu().numpy()
    rel = res / np.maximum(np.abs(theta), 1e-300)
    idx = order(theta, which)
    return EigenPairs(values=theta[idx], residuals=rel[idx], converged=rel[idx] <= tol, hvps=hvps,
                      vectors=Y[idx] if return_vectors else None)


def hutchinson(op: Operator, n: int, probes: int, seed: int = 0, device=None) -> dict:
    """Hutchinson's trace estimate with Rademacher probes.

    Returns:
        dict with ``samples`` (probes,) of ``z^T H z``, ``estimate`` (their mean) and ``stderr``
        (sample standard deviation / sqrt(probes)).
    """
    gen = _generator(seed)
    samples = np.empty(probes)
    for i in range(probes):
        z = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1)
        z = z.to(device) if device is not None else z
        samples[i] = float(z @ op(z).to(z))
    stderr = float(samples.std(ddof=1) / np.sqrt(probes)) if probes > 1 else float("nan")
    return {"samples": samples, "estimate": float(samples.mean()), "stderr": stderr}


def hutchpp(op: Operator, n: int, hvps: int, seed: int = 0, device=None) -> dict:
    """Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest.

    With ``s = hvps // 3`` sketch vectors: ``Q = orth(H S)`` (s products), ``tr(Q^T H Q)`` (s products)
    and ``hvps - 2s`` Hutchinson probes of ``(I - QQ^T) H (I - QQ^T)``.

    Returns:
        dict with ``estimate``, ``stderr`` (from the Hutchinson part; the sketch part is exact given Q)
        and ``hvps``.
    """
    s = max(1, min(hvps // 3, n))
    g = max(2, hvps - 2 * s)
    gen = _generator(seed + 99_991)

    def rademacher():
        z = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
        return z.to(device) if device is not None else z

    HS = torch.stack([op(rademacher()).to(torch.float64) for _ in range(s)])
    Q, _ = torch.linalg.qr(HS.T)
    Q = Q.T.contiguous()  # rows orthonormal
    low = sum(float(q @ op(q).to(q)) for q in Q)
    rest = np.empty(g)
    for i in range(g):
        z = rademacher()
        z = z - Q.T @ (Q @ z)
        hz = op(z).to(z)
        rest[i] = float(z @ hz)
    return {"estimate": low + float(rest.mean()), "stderr": float(rest.std(ddof=1) / np.sqrt(g)),
            "hvps": 2 * s + g}


def slq(op: Operator, n: int, runs: int, steps: int, seed: int = 0, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature: per run, the Gauss quadrature of the spectral measure seen
    from a random unit Rademacher vector.

    Lanczos with full reorthogonalisation (float64) for ``min(steps, n)`` steps (fewer when the Krylov
    space becomes invariant); nodes are the eigenvalues of the tridiagonal matrix, weights the squared
    first components of its eigenvectors (each run's weights sum to one).

    Returns:
        ``nodes``, ``weights``: (runs, steps) float64; unused slots hold NaN nodes and zero weights.
    """
    from scipy.linalg import eigh_tridiagonal

    steps_eff = min(steps, n)
    nodes = np.full((runs, steps), np.nan)
    weights = np.zeros((runs, steps))
    for r in range(runs):
        v = _random_unit(n, seed + 7_777 * (r + 1), "cpu", kind="rademacher")
        V = None
        alphas, betas = [], []
        for j in range(steps_eff):
            vj = v.to(device) if (device is not None and V is None) else v
            if V is None:
                V = torch.empty((steps_eff, n), dtype=torch.float64, device=vj.device)
            V[j] = vj
            w = op(vj).to(torch.float64).clone()
            alpha = float(vj @ w)
            _orthogonalise(w, V[:j + 1])
            beta = float(torch.linalg.vector_norm(w))
            alphas.append(alpha)
            if j == steps_eff - 1 or beta <= 1e-10 * max(abs(a) for a in alphas) + 1e-300:
                break
            betas.append(beta)
            v = w / beta
        theta, U = eigh_tridiagonal(np.asarray(alphas), np.asarray(betas))
        nodes[r, :len(theta)] = theta
        weights[r, :len(theta)] = U[0] ** 2
    return nodes, weights


def smooth_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-broadened spectral density ``mean_runs sum_i w_i N(x; node_i, sigma^2)`` on ``grid``."""
    nodes = np.atleast_2d(nodes)
    weights = np.atleast_2d(weights)
    ok = np.isfinite(nodes) & (weights > 0)
    x = np.asarray(grid)[:, None]
    out = np.zeros(len(grid))
    for r in range(nodes.shape[0]):
        nd, wt = nodes[r, ok[r]], weights[r, ok[r]]
        out += (np.exp(-0.5 * ((x - nd[None, :]) / sigma) ** 2) * wt[None, :]).sum(axis=1)
    return out / (nodes.shape[0] * sigma * np.sqrt(2 * np.pi))
