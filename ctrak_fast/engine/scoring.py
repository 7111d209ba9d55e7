"""TRAK-form scoring (METHOD.md section 3): score_i = q (Phi^T Phi + lam I)^-1 phi_i^T.

The query side is preconditioned once, u = (G + lam I)^-1 q^T with G = Phi^T Phi, so scoring the
training set is one inner product per stored row, score_i = phi_i . u, done by search.topk over
the shards. Training features stay raw on disk. Two ways to get u, with the same scores:

- primal (Preconditioner; N >= k): factor G + lam I [k, k]. G is built by gram.gram in O(k^2)
  memory; ``inplace=True`` factors G's own storage (LAPACK potrf through a column-major view: no
  second or third k x k matrix), and queries are solved in blocks. k = 32768 costs one 8.6 GB
  matrix where the clone-and-factor path needed three (25.8 GB).
- dual (DualPreconditioner; N < k): push-through / Woodbury. With K = Phi Phi^T [N, N],
  (G + lam I)^-1 = (I - Phi^T (K + lam I)^-1 Phi) / lam, so
  u = (q - Phi^T (K + lam I)^-1 Phi q^T) / lam: an N x N factorisation in place of k x k.

precondition() picks the path (dual when N < k). A sweep over lambda is sweep.LambdaSweep.

    lam = lambda_r * 0.1 * trace(G) / k        (lambda_r = 1 by default; trace(K) = trace(G))
"""

from __future__ import annotations

import math

import torch

from ctrak_fast.engine.gram import FeatureSource, gram, kernel, load_features, phi_matmul
from ctrak_fast.engine.scoring_options import PATHS
from ctrak_fast.engine.store import FeatureStore, iter_features

SOLVE_BLOCK = 1024  # queries per triangular solve (bounds the float64 [k, block] buffers)


def damping(gram: torch.Tensor, lambda_r: float = 1.0) -> float:
    """lam = lambda_r * 0.1 * trace(G) / k (the damping of Concept-TRAK's reference code).

    Examples:
        >>> damping(torch.eye(4, dtype=torch.float64) * 2.0, lambda_r=1.0)
        0.2
    """
    return float(lambda_r) * 0.1 * float(torch.trace(gram)) / gram.shape[0]


def choose_path(n: int, k: int, path: str = "auto") -> str:
    """ "primal" or "dual" for N rows of dimension k ("auto": dual when N < k).

    Examples:
        >>> choose_path(420, 4096), choose_path(10**5, 4096), choose_path(10, 4, "dual")
        ('dual', 'primal', 'dual')
    """
    if path not in PATHS:
        raise ValueError(f"scoring path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return "dual" if n < k else "primal"
    return path


def _cholesky_inplace(a: torch.Tensor, what: str, detail: str) -> torch.Tensor:
    """Factor the symmetric `a` in its own storage; returns U (column-major view, U^T U = a).

    a.mT is column-major, so LAPACK potrf runs on a's bytes with no copy. Only a's lower
    triangle (U's upper one) is read."""
    u = a.mT
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(u, upper=True, out=(u, info))
    if int(info) != 0:
        raise ValueError(
            f"{what} is not positive definite (leading minor {int(info)} of {a.shape[0]} fails; "
            f"{detail}): raise lambda_r, or check the store (too few rows for k, or all-zero "
            "features)"
        )
    return u


def _chol_solve(u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x = (U^T U)^-1 b for the factor of _cholesky_inplace; b: [n, m]. Two triangular solves
    (torch.cholesky_solve would copy U into a fresh n x n buffer)."""
    y = torch.linalg.solve_triangular(u.mT, b, upper=False)
    x: torch.Tensor = torch.linalg.solve_triangular(u, y, upper=True)
    return x


def all_finite(t: torch.Tensor, block_rows: int = 1024) -> bool:
    """No NaN / Inf in t, checked block_rows rows at a time: torch.isfinite(t) of a whole
    k x k Gram would allocate several more k^2 buffers (0.7 GB at k = 8192, measured).

    Examples:
        >>> all_finite(torch.ones(5, 3)), all_finite(torch.tensor([[1.0, float("nan")]]))
        (True, False)
    """
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    return all(
        bool(torch.isfinite(rows[i : i + block_rows]).all())
        for i in range(0, len(rows), block_rows)
    )


def _check_lambda_r(lambda_r: float) -> float:
    lambda_r = float(lambda_r)
    if not lambda_r >= 0 or lambda_r == float("inf"):
        raise ValueError(f"lambda_r must be finite and >= 0, got {lambda_r}")
    return lambda_r


class Preconditioner:
    """Solves (G + lam I) u^T = q^T with one float64 Cholesky factor (the primal path).

    Args:
        gram: [k, k] Gram matrix (gram.gram; any float dtype, used in float64).
        lambda_r: relative damping (> 0 unless G itself is positive definite).
        inplace: factor `gram`'s own storage (it must be a contiguous float64 tensor; it is
            overwritten). Saves two k x k matrices; :meth:`with_lambda` is then unavailable.
        device: where to factor and solve (default: gram's device).

    Attributes:
        lam: the absolute damping added to the diagonal. lambda_r: as given. gram: G, or None
            after an in-place factorisation. k: the dimension. factor: U with U^T U = G + lam I
            (a column-major view; on G's own storage when inplace).

    Examples:
        >>> phi = torch.randn(50, 8)
        >>> pre = Preconditioner(gram(phi), lambda_r=1.0)
        >>> u = pre.solve(torch.randn(3, 8))  # [3, 8] float32; scores = phi @ u.T
        >>> pre.with_lambda(0.1).lam < pre.lam
        True
    """

    path = "primal"

    def __init__(
        self,
        gram: torch.Tensor,
        lambda_r: float = 1.0,
        *,
        inplace: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram must be [k, k], got {list(gram.shape)}")
        self.lambda_r = _check_lambda_r(lambda_r)
        device = torch.device(device) if device is not None else gram.device
        if inplace:
            if gram.dtype != torch.float64 or not gram.is_contiguous() or gram.device != device:
                raise ValueError("inplace=True needs a contiguous float64 gram on the device")
            a, self.gram = gram.detach(), None
        else:
            self.gram = gram.detach().to(device=device, dtype=torch.float64)
            a = self.gram.clone()
        if not all_finite(a):
            raise ValueError("gram has non-finite entries (NaN/Inf features in the store?)")
        self.k = a.shape[0]
        self.lam = damping(a, self.lambda_r)
        check_damping(self.lam, self.lambda_r)
        trace = float(torch.trace(a))
        a.diagonal().add_(self.lam)
        detail = f"lambda_r={self.lambda_r}, lam={self.lam:.3g}, trace(G)={trace:.3g}"
        self.factor = _cholesky_inplace(a, "G + lam*I", detail)

    def with_lambda(self, lambda_r: float) -> Preconditioner:
        """Another damping on the same Gram matrix (one Cholesky, no pass over the store)."""
        if self.gram is None:
            raise ValueError(
                "this Preconditioner factored its Gram in place: build it again, or use "
                "sweep.LambdaSweep for many lambdas"
            )
        return Preconditioner(self.gram, lambda_r)

    def solve(self, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """u = ((G + lam I)^-1 q^T)^T, SOLVE_BLOCK queries at a time.

        Args:
            q: [m, k] or [k] query features (any float dtype; solved in float64).
            dtype: output dtype (float32 for search; float64 to keep the solve's precision).

        Returns:
            u with q's shape, on q's device, in ``dtype``.
        """
        q64 = _check_q(q, self.k).to(self.factor.device)
        out = torch.empty(q64.shape, dtype=dtype, device=q.device)
        for s in range(0, q64.shape[0], SOLVE_BLOCK):
            b = q64[s : s + SOLVE_BLOCK].T.contiguous()
            out[s : s + SOLVE_BLOCK] = _chol_solve(self.factor, b).T.to(out)
        check_preconditioned(out, q64, self.lambda_r)
        return out.reshape(q.shape)


class DualPreconditioner:
    """The same u as :class:`Preconditioner`, through the N x N kernel (module docstring).

    Args:
        phi: [N, k] training features (held as float32; N x k x 4 bytes).
        lambda_r: relative damping, > 0 (the dual form divides by lam).
        kernel_matrix: optional precomputed K = Phi Phi^T [N, N] (float64), shared by
            :meth:`with_lambda`.
        precision: how K is accumulated ("float64" or "mixed", as gram.gram).

    Examples:
        >>> phi, q = torch.randn(30, 64), torch.randn(2, 64)
        >>> u = DualPreconditioner(phi, 1.0).solve(q, dtype=torch.float64)
        >>> ref = Preconditioner(gram(phi), 1.0).solve(q, dtype=torch.float64)
        >>> torch.allclose(u, ref, rtol=1e-8, atol=1e-10)
        True
    """

    path = "dual"

    def __init__(
        self,
        phi: torch.Tensor,
        lambda_r: float = 1.0,
        *,
        kernel_matrix: torch.Tensor | None = None,
        precision: str = "float64",
    ) -> None:
        if phi.dim() != 2 or phi.shape[0] == 0:
            raise ValueError(f"phi must be a non-empty [N, k] tensor, got {list(phi.shape)}")
        self.lambda_r = _check_lambda_r(lambda_r)
        if self.lambda_r == 0:
            raise ValueError("the dual path needs lambda_r > 0 (G is singular when N < k)")
        self.phi = phi.detach().to(torch.float32)
        if not all_finite(self.phi):
            raise ValueError("features have non-finite entries (NaN/Inf in the store?)")
        self.n, self.k = self.phi.shape
        self.kernel = kernel(self.phi, precision) if kernel_matrix is None else kernel_matrix
        trace = float(torch.trace(self.kernel))
        self.lam = self.lambda_r * 0.1 * trace / self.k
        check_damping(self.lam, self.lambda_r)
        a = self.kernel.clone()
        a.diagonal().add_(self.lam)
        detail = f"lambda_r={self.lambda_r}, lam={self.lam:.3g}, trace(K)={trace:.3g}"
        self.factor = _cholesky_inplace(a, "K + lam*I", detail)
        if self.lam == 0:  # lambda_r = 1e-320 underflows: the push-through form divides by lam
            raise ValueError(f"lambda_r={self.lambda_r:g} gives a zero damping: raise it")

    def with_lambda(self, lambda_r: float) -> DualPreconditioner:
        """Another damping on the same kernel (one N x N Cholesky)."""
        return DualPreconditioner(self.phi, lambda_r, kernel_matrix=self.kernel)

    def solve(self, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """u = (q - Phi^T (K + lam I)^-1 Phi q^T) / lam, in float64; as Preconditioner.solve."""
        q64 = _check_q(q, self.k).to(self.phi.device)
        out = torch.empty(q64.shape, dtype=dtype, device=q.device)
        for s in range(0, q64.shape[0], SOLVE_BLOCK):
            qt = q64[s : s + SOLVE_BLOCK].T.contiguous()  # [k, b]
            a = _chol_solve(self.factor, phi_matmul(self.phi, qt))  # [N, b]
            u = (qt - phi_matmul(self.phi, a, transpose=True)) / self.lam
            out[s : s + SOLVE_BLOCK] = u.T.to(out)
        check_preconditioned(out, q64, self.lambda_r)
        return out.reshape(q.shape)


# Projected features are O(1) to O(1e3) (normalised gradients times a weight): a query beyond
# this is damaged, and near float32's 3.4e38 its scores overflow to NaN.
MAX_QUERY_ABS = 1e12


def _check_q(q: torch.Tensor, k: int) -> torch.Tensor:
    if q.dim() not in (1, 2) or q.shape[-1] != k:
        raise ValueError(f"q must be [m, {k}] or [{k}], got {list(q.shape)}")
    q64 = q.detach().to(dtype=torch.float64).reshape(-1, k)
    if not torch.isfinite(q64).all():
        raise ValueError("q has non-finite entries")
    top = float(q64.abs().max()) if q64.numel() else 0.0
    if top > MAX_QUERY_ABS:
        raise ValueError(f"q has an entry of magnitude {top:.3g}, beyond {MAX_QUERY_ABS:g}")
    return q64


def check_damping(lam: float, lambda_r: float) -> None:
    """The absolute damping of lambda_r must be finite (lambda_r = 1e308 overflows it, and every
    score would round to 0)."""
    if not math.isfinite(lam):
        raise ValueError(f"lambda_r={lambda_r:g} gives an infinite damping: lower it")


def check_preconditioned(u: torch.Tensor, q: torch.Tensor, lambda_r: float) -> None:
    """u = (G + lam I)^-1 q must be finite in its dtype, and not 0 where q is not (underflow):
    else the scores would be NaN, or all 0, whatever the training data."""
    rows = u.reshape(-1, u.shape[-1])
    if not all_finite(rows):
        raise ValueError(
            f"lambda_r={lambda_r} gives non-finite scores (the damping is too small for these "
            "features, or the query too large): raise lambda_r"
        )
    q_rows = q.reshape(-1, q.shape[-1]).to(rows.device)
    if q_rows.shape[0] == rows.shape[0]:
        lost = (rows == 0).all(1) & (q_rows != 0).any(1)
        if bool(lost.any()):
            raise ValueError(
                f"lambda_r={lambda_r} damps every score to 0 (underflow): lower lambda_r"
            )


def source_shape(source: FeatureSource) -> tuple[int, int] | None:
    """(N, k) of a store or a tensor without reading features; None for an iterable."""
    if isinstance(source, FeatureStore):
        return source.n_rows, source.k
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], torch.Tensor):
        source = source[0]
    if isinstance(source, torch.Tensor) and source.dim() == 2:
        return int(source.shape[0]), int(source.shape[1])
    return None


def precondition(
    source: FeatureSource,
    lambda_r: float = 1.0,
    *,
    path: str = "auto",
    precision: str = "float64",
    keep_gram: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Preconditioner | DualPreconditioner:
    """The preconditioner of a training set, by the cheaper path (module docstring).

    Args:
        source: a FeatureStore, a [N, k] tensor, or feature blocks (read once; blocks of
            unknown N take the primal path unless path="dual").
        lambda_r: relative damping. path: "auto" (dual when N < k), "primal" or "dual".
        precision: Gram / kernel accumulation ("float64", or "mixed": float32 products).
        keep_gram: primal only: keep G beside its factor (2 k^2 doubles) so that
            with_lambda needs no pass over the store; by default G is factored in place.
        device: where the primal Gram is built and factored (e.g. "cuda").
        progress: a bar over the shards.

    Examples:
        >>> phi = torch.randn(20, 64)
        >>> precondition(phi).path, precondition(torch.randn(100, 8)).path
        ('dual', 'primal')
    """
    shape = source_shape(source)
    chosen = choose_path(*shape, path) if shape else ("dual" if path == "dual" else "primal")
    if chosen == "dual":
        return DualPreconditioner(load_features(source, device), lambda_r, precision=precision)
    g = gram(source, progress=progress, precision=precision, device=device)
    return Preconditioner(g, lambda_r, inplace=not keep_gram)


def score_dense(source: FeatureSource, u: torch.Tensor) -> torch.Tensor:
    """Reference scores phi_i . u_j for every stored row (tests and small stores only).

    Args:
        source: as for :func:`gram.gram`. u: [m, k] preconditioned queries.

    Returns:
        [N, m] float64 in row order. Production scoring is search.topk, which never forms this.
    """
    u64 = u.detach().to(device="cpu", dtype=torch.float64).reshape(-1, u.shape[-1])
    parts = [f.to(device="cpu", dtype=torch.float64) @ u64.T for f in iter_features(source)]
    return torch.cat(parts) if parts else torch.empty(0, u64.shape[0], dtype=torch.float64)


__all__ = [
    "PATHS",
    "DualPreconditioner",
    "Preconditioner",
    "all_finite",
    "choose_path",
    "damping",
    "precondition",
    "score_dense",
    "source_shape",
]
