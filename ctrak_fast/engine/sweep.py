"""A lambda sweep for the price of one eigendecomposition.

TRAK scores at damping lam are S(lam) = Phi (G + lam I)^-1 q^T with G = Phi^T Phi [k, k] and
lam = lambda_r * 0.1 * trace(G) / k (scoring.damping). The Preconditioner factors G + lam I once
per lambda (one Cholesky each); here one eigendecomposition serves every lambda:

- primal (N >= k): G = V diag(e) V^T, so (G + lam I)^-1 q^T = V diag(1 / (e + lam)) V^T q^T.
- dual (N < k): push-through, Phi (Phi^T Phi + lam I)^-1 = (Phi Phi^T + lam I)^-1 Phi, so with
  K = Phi Phi^T = U diag(d) U^T [N, N] the scores are U diag(1 / (d + lam)) U^T (Phi q^T).
  trace(K) = trace(G) = ||Phi||_F^2, so the damping is the same number.

Cost: a float64 eigh is not one Cholesky's price but ~10 (k = 1024) to ~23 (k = 4096) of them
on one CPU thread, and at k = 32768 it does not fit in memory (~4 k^2 doubles). So solve_queries
takes the eigh of G only up to EIGH_MAX_K; above, sweep_factor.sweep_solve: one Cholesky of
G + lam0 I in G's own storage and every lambda by shifted Krylov solves. The dual path's win is
the size: it factors N x N in place of k x k, so for N << k (a small benchmark set, large k) it
is far cheaper whatever the sweep length (k = 4096, N = 420, 9 lambdas: 0.05 s against 12.6 s).
benchmarks/bench_lambda_sweep.py measures all three.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ctrak_fast.engine.gram import FeatureSource, load_features
from ctrak_fast.engine.gram import gram as build_gram
from ctrak_fast.engine.gram_factor import MAX_K as KRYLOV_MAX_K
from ctrak_fast.engine.scoring import (
    Preconditioner,
    all_finite,
    check_preconditioned,
    choose_path,
    precondition,
    source_shape,
)
from ctrak_fast.engine.scoring_options import PATHS
from ctrak_fast.engine.sweep_factor import sweep_solve

# Primal sweeps up to this k take one eigh of G, above it one Cholesky + shifted Krylov solves
# (sweep_factor). Measured (benchmarks/bench_lambda_sweep.py, 9 lambdas): at k = 1024 the eigh
# (~10 Choleskys) and the Krylov sweep (4-23 Choleskys' time, by the spectrum) are level; at
# k = 4096 the eigh costs ~23 Choleskys, the Krylov sweep 2.4-5.4.
EIGH_MAX_K = 1024


def _as_lambda_rs(lambda_rs: Sequence[float]) -> list[float]:
    out = [float(r) for r in lambda_rs]
    if not out:
        raise ValueError("lambda_rs is empty: give at least one lambda_r")
    bad = [r for r in out if not (math.isfinite(r) and r >= 0)]
    if bad:
        raise ValueError(f"lambda_r must be finite and >= 0, got {bad}")
    return out


class LambdaSweep:
    """Scores for many damping values from one float64 eigendecomposition.

    Args:
        phi: [N, k] training features (any float dtype; held in float64, a copy unless it is
            already a CPU float64 tensor, so for benchmark-sized N). Needed by :meth:`scores`
            and by the dual path.
        gram: optional precomputed [k, k] G = Phi^T Phi (scoring.gram), read by the primal path
            only. Without phi, only the primal path and :meth:`solve` are available.
        kernel: optional precomputed [N, N] K = Phi Phi^T, read by the dual path only.
        path: "primal", "dual", or "auto" (dual when N < k).

    Attributes:
        path: the path taken. n, k: the feature shape (n is None without phi).
        trace: trace(G) = trace(K), in float64. evals, evecs: the eigendecomposition
            ([k] / [k, k] primal, [N] / [N, N] dual).

    Examples:
        >>> phi, q = torch.randn(30, 64), torch.randn(2, 64)
        >>> sweep = LambdaSweep(phi)  # N < k: the dual path, one 30 x 30 eigendecomposition
        >>> sweep.path, sweep.scores(q, [0.1, 1.0, 10.0]).shape
        ('dual', torch.Size([3, 30, 2]))
        >>> lam = 1.0 * 0.1 * float((phi.double() ** 2).sum()) / 64
        >>> ref = phi.double() @ torch.linalg.solve(phi.double().T @ phi.double()
        ...                                         + lam * torch.eye(64, dtype=torch.float64),
        ...                                         q.double().T)
        >>> torch.allclose(sweep.scores(q, [1.0])[0].double(), ref, rtol=1e-4, atol=1e-4)
        True
    """

    def __init__(
        self,
        phi: torch.Tensor | None = None,
        *,
        gram: torch.Tensor | None = None,
        kernel: torch.Tensor | None = None,
        path: str = "auto",
    ) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.phi = None if phi is None else self._check_phi(phi)
        if self.phi is None and gram is None:
            raise ValueError("give phi ([N, k] features) or gram ([k, k] = Phi^T Phi)")
        if self.phi is None:
            if path == "dual" or kernel is not None:
                raise ValueError("the dual path needs phi: K = Phi Phi^T is N x N")
            path = "primal"
        self.k = self.phi.shape[1] if self.phi is not None else int(gram.shape[-1])
        self.n = None if self.phi is None else self.phi.shape[0]
        if path == "auto":
            path = "dual" if self.n < self.k else "primal"
        self.path = path
        if path == "primal":
            mat = self._gram(gram)
        else:
            mat = self._kernel(kernel)
        self.trace = float(torch.trace(mat))
        if not self.trace > 0:
            raise ValueError("trace(G) is 0: all features are zero, nothing to score")
        self.evals, self.evecs = torch.linalg.eigh(mat)
        # Scale for the positive-definiteness test: eigh's absolute error is ~eps * ||G||.
        self._tol = mat.shape[0] * torch.finfo(torch.float64).eps * float(self.evals.abs().max())

    @staticmethod
    def _check_phi(phi: torch.Tensor) -> torch.Tensor:
        if phi.dim() != 2 or phi.shape[0] == 0 or phi.shape[1] == 0:
            raise ValueError(f"phi must be a non-empty [N, k] tensor, got {list(phi.shape)}")
        p = phi.detach().to(device="cpu", dtype=torch.float64)
        if not all_finite(p):
            raise ValueError("phi has non-finite entries")
        return p

    def _gram(self, gram: torch.Tensor | None) -> torch.Tensor:
        if gram is None:
            g = self.phi.T @ self.phi
        else:
            if gram.dim() != 2 or tuple(gram.shape) != (self.k, self.k):
                raise ValueError(f"gram must be [{self.k}, {self.k}], got {list(gram.shape)}")
            g = gram.detach().to(device="cpu", dtype=torch.float64)
            if not all_finite(g):
                raise ValueError("gram has non-finite entries")
        return (g + g.T) / 2  # eigh reads one triangle; make both agree

    def _kernel(self, kernel: torch.Tensor | None) -> torch.Tensor:
        if kernel is None:
            kmat = self.phi @ self.phi.T
        else:
            if kernel.dim() != 2 or tuple(kernel.shape) != (self.n, self.n):
                raise ValueError(f"kernel must be [{self.n}, {self.n}], got {list(kernel.shape)}")
            kmat = kernel.detach().to(device="cpu", dtype=torch.float64)
        return (kmat + kmat.T) / 2

    def damping(self, lambda_r: float) -> float:
        """lam = lambda_r * 0.1 * trace(G) / k, as scoring.damping.

        Examples:
            >>> LambdaSweep(torch.ones(4, 2)).damping(1.0)  # trace(G) = 8, k = 2
            0.4
        """
        return _as_lambda_rs([lambda_r])[0] * 0.1 * self.trace / self.k

    def _weights(self, lambda_rs: Sequence[float]) -> torch.Tensor:
        """[n_lambda, r] 1 / (e + lam) per lambda, after checking every G + lam I is PD."""
        lams = torch.tensor([self.damping(r) for r in lambda_rs], dtype=torch.float64)
        shifted = self.evals[None, :] + lams[:, None]
        # In the dual path G also has k - N zero eigenvalues that K does not show.
        lowest = shifted.min(dim=1).values
        if self.path == "dual" and self.n < self.k:
            lowest = torch.minimum(lowest, lams)
        bad = [r for r, low in zip(lambda_rs, lowest.tolist(), strict=True) if low <= self._tol]
        if bad:
            raise ValueError(
                f"G + lam*I is not positive definite for lambda_r={bad} (N={self.n}, k={self.k}, "
                f"trace(G)={self.trace:.3g}): use lambda_r > 0"
            )
        return 1.0 / shifted

    def _check_q(self, q: torch.Tensor) -> torch.Tensor:
        if q.dim() not in (1, 2) or q.shape[-1] != self.k:
            raise ValueError(f"q must be [m, {self.k}] or [{self.k}], got {list(q.shape)}")
        q64 = q.detach().to(device="cpu", dtype=torch.float64).reshape(-1, self.k)
        if not torch.isfinite(q64).all():
            raise ValueError("q has non-finite entries")
        return q64

    def solve(self, q: torch.Tensor, lambda_rs: Sequence[float]) -> torch.Tensor:
        """Preconditioned queries u = ((G + lam I)^-1 q^T)^T for each lambda.

        Score each u with search.topk, as Preconditioner.solve (a store too large to hold in
        scores). The dual path takes the push-through form of scoring.DualPreconditioner:
        u = (q - Phi^T U diag(1 / (d + lam)) U^T Phi q^T) / lam.

        Args:
            q: [m, k] or [k] query features. lambda_rs: the relative dampings.

        Returns:
            [n_lambda, m, k] float64.

        Examples:
            >>> phi, q = torch.randn(50, 8), torch.randn(3, 8)
            >>> LambdaSweep(phi, path="primal").solve(q, [0.1, 1.0]).shape
            torch.Size([2, 3, 8])
            >>> torch.allclose(LambdaSweep(phi, path="dual").solve(q, [0.1, 1.0]),
            ...                LambdaSweep(phi, path="primal").solve(q, [0.1, 1.0]))
            True
        """
        lambda_rs = _as_lambda_rs(lambda_rs)
        q64 = self._check_q(q)
        w = self._weights(lambda_rs)  # [n_lambda, r]
        if self.path == "primal":
            c = self.evecs.T @ q64.T  # [k, m], shared by every lambda
            return (self.evecs @ (w[:, :, None] * c)).transpose(1, 2)
        lams = torch.tensor([self.damping(r) for r in lambda_rs], dtype=torch.float64)
        if not (lams > 0).all():
            raise ValueError("the dual path needs lambda_r > 0 (G is singular when N < k)")
        c = self.evecs.T @ (self.phi @ q64.T)  # [N, m]
        a = self.evecs @ (w[:, :, None] * c)  # [n_lambda, N, m]: (K + lam I)^-1 Phi q^T
        u = (q64.T[None] - self.phi.T @ a) / lams[:, None, None]  # [n_lambda, k, m]
        return u.transpose(1, 2)

    def scores(self, q: torch.Tensor, lambda_rs: Sequence[float]) -> torch.Tensor:
        """score_i = phi_i . u for every training row, every query and every lambda.

        Args:
            q: [m, k] or [k] query features (any float dtype; computed in float64).
            lambda_rs: relative dampings (>= 0; > 0 when G is singular, e.g. N < k).

        Returns:
            [n_lambda, N, m] float32.

        Examples:
            >>> phi, q = torch.randn(50, 8), torch.randn(3, 8)
            >>> LambdaSweep(phi).scores(q, [1e-2, 1.0, 1e2]).shape  # primal: N >= k
            torch.Size([3, 50, 3])
        """
        if self.phi is None:
            raise ValueError("scores() needs phi; built from a Gram alone, use solve()")
        lambda_rs = _as_lambda_rs(lambda_rs)
        q64 = self._check_q(q)
        m = q64.shape[0]
        if self.path == "primal":
            u = self.solve(q64, lambda_rs)  # [n_lambda, m, k]
            # One [N, k] x [k, n_lambda * m] product reads phi once for the whole sweep.
            s = self.phi @ u.reshape(-1, self.k).T
            return s.reshape(self.n, len(lambda_rs), m).permute(1, 0, 2).float()
        w = self._weights(lambda_rs)  # [n_lambda, N]
        c = self.evecs.T @ (self.phi @ q64.T)  # [N, m]: U^T Phi q^T
        return (self.evecs @ (w[:, :, None] * c)).float()


def solve_queries(
    source: FeatureSource,
    q: torch.Tensor,
    lambda_rs: Sequence[float],
    *,
    path: str = "auto",
    precision: str = "float64",
    device: torch.device | str | None = None,
    gram_matrix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Preconditioned queries of a training set for one or many lambda_r: [n_lambda, m, k].

    One lambda: one factorisation (scoring.precondition; the primal Gram factored in place).
    Several: on the dual path one eigendecomposition of K (LambdaSweep); on the primal path one
    eigh of G for k <= EIGH_MAX_K, else one Cholesky of G + lam0 I in G's own storage and every
    lambda by shifted Krylov solves (sweep_factor.sweep_solve), each checked and, failing that,
    solved by its own Cholesky.

    Args:
        source: the training features (a FeatureStore, a tensor or blocks).
        q: [m, k] query features. lambda_rs: relative dampings.
        path, precision, device: as scoring.precondition.
        gram_matrix: a Gram already built (e.g. gram_distributed): the primal path then reads
            no features. A contiguous CPU float64 one is overwritten (factored in place) unless
            the sweep takes the eigh.

    Examples:
        >>> phi, q = torch.randn(40, 16), torch.randn(2, 16)
        >>> u = solve_queries(phi, q, [0.5, 2.0])
        >>> torch.allclose(u[1], solve_queries(phi, q, [2.0])[0], rtol=1e-4, atol=1e-6)
        True
    """
    lambda_rs = _as_lambda_rs(lambda_rs)
    shape = source_shape(source)
    if gram_matrix is not None:
        chosen = "primal"
    else:
        chosen = choose_path(*shape, path) if shape else ("dual" if path == "dual" else "primal")
    if len(lambda_rs) == 1:
        if gram_matrix is not None:
            pre = Preconditioner(gram_matrix, lambda_rs[0], inplace=True)
        else:
            pre = precondition(
                source, lambda_rs[0], path=chosen, precision=precision, device=device
            )
        return pre.solve(q)[None] if q.dim() == 2 else pre.solve(q)[None, None]
    if chosen == "dual":
        u = LambdaSweep(load_features(source), path="dual").solve(q, lambda_rs).float()
        return _checked(u, q, lambda_rs)
    g = gram_matrix
    if g is None:
        g = build_gram(source, precision=precision, device=device).cpu()
    k = g.shape[0]
    if k <= EIGH_MAX_K and eigh_fits(k):
        return _checked(LambdaSweep(gram=g).solve(q, lambda_rs).float(), q, lambda_rs)
    if k > KRYLOV_MAX_K:
        # scipy's dpotrf crashes this large (gram_factor.MAX_K): one torch Cholesky of a copy
        # per lambda (2 k^2 doubles), G read from memory each time, not from the store.
        us = [Preconditioner(g, r).solve(q) for r in lambda_rs]
        return torch.stack(us).reshape(len(lambda_rs), -1, k)
    # One Cholesky in G's own storage, every lambda by shifted Krylov solves (sweep_factor).
    g = g.detach().to(device="cpu", dtype=torch.float64).contiguous()
    u = sweep_solve(g, q.reshape(-1, k), lambda_rs, inplace=True).u.float()
    return _checked(u, q, lambda_rs)


def _checked(u: torch.Tensor, q: torch.Tensor, lambda_rs) -> torch.Tensor:
    """u [n_lambda, m, k], each lambda's rows checked as a Preconditioner checks its own."""
    for r, u_r in zip(lambda_rs, u.reshape(len(lambda_rs), -1, u.shape[-1]), strict=True):
        check_preconditioned(u_r, q, r)
    return u


def eigh_fits(k: int, memory_bytes: int | None = None) -> bool:
    """Whether a float64 eigh of a k x k matrix (~4 k^2 doubles: the matrix, its symmetrised
    copy, the eigenvectors and LAPACK's workspace) fits in 80% of this machine's memory.

    Examples:
        >>> eigh_fits(4096, memory_bytes=24 << 30), eigh_fits(32768, memory_bytes=24 << 30)
        (True, False)
    """
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 4 * k * k * 8 <= 0.8 * memory_bytes


__all__ = ["LambdaSweep", "eigh_fits", "solve_queries"]
