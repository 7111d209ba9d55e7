"""G and a Cholesky factor of G + lam0 I in ONE k x k float64 buffer.

A symmetric G needs one triangle, and so does a triangular factor: the buffer's strict upper
triangle keeps G, its lower triangle (with the diagonal) holds L, L L^T = G + lam0 I, and G's own
diagonal is kept aside ([k]). LAPACK potrf writes only the triangle it factors; torch's Cholesky
zeroes the other one, so the factorisation calls scipy's dpotrf with clean=0, in place on the
buffer's bytes (a C-contiguous [k, k] is a column-major [k, k] transposed: its lower triangle is
the upper one potrf factors). So one matrix of k^2 doubles (8.6 GB at k = 32768) serves:

- L^-1 b and L^-T b (solve_lower / solve_upper) and L b, L^T b (mul_lower / mul_upper): BLAS
  trsm / trmm that read only the lower triangle (trmm is scipy's: torch has none);
- G @ x (gram_matmul), read from the upper triangle block by block (slower than two trmm: a
  check, not an iteration's operator);
- a Cholesky at another damping (refactor): the lower triangle is restored from the upper one
  and factored again, with no pass over the store and no second matrix.

sweep_factor.py runs its Krylov sweep on this; the reference is one Cholesky per lambda
(scoring.Preconditioner).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.blas as blas
import scipy.linalg.lapack as lapack
import torch

from ctrak_fast.engine.scoring import all_finite

BLOCK = 2048  # block of the upper triangle read per product (32 MB in float64)
# scipy's bundled OpenBLAS dpotrf dies with SIGSEGV on a k x k float64 matrix at k = 16000 and
# 16384, with clean=0 or 1 (scipy 1.17.1, 2 threads; fine at 12000 and 14000): larger k is
# refused here, and solve_queries takes one torch Cholesky per lambda there instead.
MAX_K = 14000


class SharedGramFactor:
    """One buffer: G (strict upper triangle + a diagonal aside) and L (lower triangle).

    Args:
        gram: [k, k] symmetric G = Phi^T Phi (any float dtype; used in float64; only its upper
            triangle and diagonal are read). With ``inplace=True`` it must be a contiguous CPU
            float64 tensor, and its storage becomes the buffer (no copy).
        lam: the absolute damping of the first factor (L L^T = G + lam I).

    Attributes:
        k: the dimension. diag: G's diagonal [k]. trace: trace(G). lam: the damping the lower
        triangle currently factors.

    Examples:
        >>> phi = torch.randn(40, 6, dtype=torch.float64)
        >>> g = phi.T @ phi
        >>> f = SharedGramFactor(g, lam=0.5)
        >>> x = torch.randn(6, 2, dtype=torch.float64)
        >>> torch.allclose(f.gram_matmul(x), g @ x)
        True
        >>> y = f.solve_upper(f.solve_lower(x))  # (G + 0.5 I)^-1 x
        >>> torch.allclose((g + 0.5 * torch.eye(6, dtype=torch.float64)) @ y, x)
        True
    """

    def __init__(self, gram: torch.Tensor, lam: float, *, inplace: bool = False) -> None:
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
            raise ValueError(f"gram must be a non-empty [k, k] tensor, got {list(gram.shape)}")
        if gram.shape[0] > MAX_K:
            raise ValueError(
                f"k = {gram.shape[0]} is above {MAX_K}, where scipy's dpotrf crashes; "
                "factor per lambda instead (scoring.Preconditioner)"
            )
        if inplace:
            if gram.dtype != torch.float64 or not gram.is_contiguous() or gram.is_cuda:
                raise ValueError("inplace=True needs a contiguous CPU float64 gram")
            self.buffer = gram.detach()
        else:
            self.buffer = gram.detach().to(device="cpu", dtype=torch.float64).clone()
        if not all_finite(self.buffer):
            raise ValueError("gram has non-finite entries (NaN/Inf features in the store?)")
        self.k = self.buffer.shape[0]
        self.diag = self.buffer.diagonal().clone()
        self.trace = float(self.diag.sum())
        self.lam = float("nan")
        self._lower_is_gram = True
        self.refactor(lam)

    def _restore_lower(self) -> None:
        """Lower triangle := G's (mirrored from the strict upper one), diagonal := G's."""
        a = self.buffer
        for j in range(0, self.k, BLOCK):
            # rows below block j in column block j take the transposed row block j
            a[j + BLOCK :, j : j + BLOCK] = a[j : j + BLOCK, j + BLOCK :].T
            d = a[j : j + BLOCK, j : j + BLOCK]
            d.copy_(d.triu(1) + d.triu(1).T)
        a.diagonal().copy_(self.diag)

    def refactor(self, lam: float) -> bool:
        """Factor G + lam I into the lower triangle (G's triangle untouched). False (and the
        lower triangle no factor) when G + lam I is not numerically positive definite."""
        if not np.isfinite(lam):
            raise ValueError(f"damping {lam!r} is not finite")
        if not self._lower_is_gram:  # a factor (or a failed one) is there: restore G first
            self._restore_lower()
        self.buffer.diagonal().add_(lam)
        self._lower_is_gram = False
        col_major = self._col_major()  # F-contiguous: its upper triangle is our lower one
        out, info = lapack.dpotrf(col_major, lower=0, clean=0, overwrite_a=1)
        if not np.shares_memory(out, col_major):  # f2py copied: write the factor back
            col_major[...] = out
        ok = int(info) == 0
        self.lam = float(lam) if ok else float("nan")
        return ok

    @property
    def factored(self) -> bool:
        """Whether the lower triangle holds a factor (the last refactor succeeded)."""
        return self.lam == self.lam

    def solve_lower(self, b: torch.Tensor) -> torch.Tensor:
        """L^-1 b for b [k, m] (float64); reads the lower triangle only."""
        out: torch.Tensor = torch.linalg.solve_triangular(self.buffer, b, upper=False)
        return out

    def solve_upper(self, b: torch.Tensor) -> torch.Tensor:
        """L^-T b for b [k, m] (float64)."""
        out: torch.Tensor = torch.linalg.solve_triangular(self.buffer.mT, b, upper=True)
        return out

    def _col_major(self) -> np.ndarray:
        col_major: np.ndarray = self.buffer.numpy().T  # its upper triangle is L^T
        return col_major

    def mul_lower(self, b: torch.Tensor) -> torch.Tensor:
        """L b for b [k, m] (float64)."""
        out = blas.dtrmm(1.0, self._col_major(), np.asfortranarray(b.numpy()), lower=0, trans_a=1)
        return torch.from_numpy(out)

    def mul_upper(self, b: torch.Tensor) -> torch.Tensor:
        """L^T b for b [k, m] (float64)."""
        out = blas.dtrmm(1.0, self._col_major(), np.asfortranarray(b.numpy()), lower=0)
        return torch.from_numpy(out)

    def gram_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """G @ x for x [k, m] (float64), from the strict upper triangle and the diagonal: each
        off-diagonal block is read once and used twice (for its rows and, transposed, its
        columns)."""
        a, out = self.buffer, self.diag[:, None] * x
        for i in range(0, self.k, BLOCK):
            rows = slice(i, i + BLOCK)
            d = a[rows, rows].triu(1)
            out[rows] += d @ x[rows] + d.T @ x[rows]
            if i + BLOCK < self.k:
                right = a[rows, i + BLOCK :]
                out[rows] += right @ x[i + BLOCK :]
                out[i + BLOCK :] += right.T @ x[rows]
        return out


__all__ = ["SharedGramFactor"]
