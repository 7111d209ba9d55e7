"""TRAK-form scoring (METHOD.md section 3): score_i = q (Phi^T Phi + lam I)^-1 phi_i^T.

The query side is preconditioned once, u = (G + lam I)^-1 q^T with G = Phi^T Phi, so scoring the
training set is one inner product per stored row, score_i = phi_i . u, done by search.topk over
the shards. Training features stay raw on disk. G is accumulated in float64 shard by shard, so
memory is one shard plus O(k^2) whatever N is; one G serves a whole lambda sweep.

    lam = lambda_r * 0.1 * trace(G) / k        (lambda_r = 1 by default)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ctrak_fast.engine.store import FeatureStore, iter_features

# What gram / score_dense read: a store, a [N, k] tensor, or blocks [n_i, k] / (features, ids).
FeatureSource = (
    FeatureStore
    | torch.Tensor
    | tuple[torch.Tensor, torch.Tensor]
    | Iterable[torch.Tensor]
    | Iterable[tuple[torch.Tensor, torch.Tensor]]
)

CHUNK_ROWS = 8192


def gram(
    source: FeatureSource, progress: bool = False, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """G = Phi^T Phi, streamed.

    Args:
        source: a FeatureStore, a [N, k] tensor, or an iterable of [n_i, k] tensors or
            (features, ids) pairs.
        progress: show a tqdm bar over the shards.
        chunk_rows: rows cast to float64 at a time (bounds the float64 copy).

    Returns:
        [k, k] float64, exactly symmetric.

    Examples:
        >>> phi = torch.randn(100, 8)
        >>> torch.allclose(gram(phi), phi.double().T @ phi.double())
        True
    """
    blocks = iter_features(source)
    if progress:
        from tqdm.auto import tqdm

        total = len(source.shards) if isinstance(source, FeatureStore) else None
        blocks = tqdm(blocks, total=total, desc="gram", unit="shard")
    g = None
    for feats in blocks:
        if g is None:
            g = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
        if feats.dim() != 2 or feats.shape[1] != g.shape[0]:
            raise ValueError(f"feature blocks must be [n, {g.shape[0]}], got {list(feats.shape)}")
        for start in range(0, feats.shape[0], chunk_rows):
            chunk = feats[start : start + chunk_rows].to(device="cpu", dtype=torch.float64)
            g.addmm_(chunk.T, chunk)
    if g is None:
        if isinstance(source, FeatureStore):
            return torch.zeros(source.k, source.k, dtype=torch.float64)
        raise ValueError("gram: no features")
    # BLAS does not promise an exactly symmetric A^T A; Cholesky reads one triangle only.
    return (g + g.T) / 2


def damping(gram: torch.Tensor, lambda_r: float = 1.0) -> float:
    """lam = lambda_r * 0.1 * trace(G) / k (the damping of Concept-TRAK's reference code).

    Examples:
        >>> damping(torch.eye(4, dtype=torch.float64) * 2.0, lambda_r=1.0)
        0.2
    """
    return float(lambda_r) * 0.1 * float(torch.trace(gram)) / gram.shape[0]


class Preconditioner:
    """Solves (G + lam I) u^T = q^T with one float64 Cholesky factor.

    Args:
        gram: [k, k] Gram matrix (any float dtype; used in float64).
        lambda_r: relative damping (> 0 unless G itself is positive definite).

    Attributes:
        lam: the absolute damping added to the diagonal. lambda_r, gram: as given.

    Examples:
        >>> phi = torch.randn(50, 8)
        >>> pre = Preconditioner(gram(phi), lambda_r=1.0)
        >>> u = pre.solve(torch.randn(3, 8))  # [3, 8] float32; scores = phi @ u.T
        >>> pre.with_lambda(0.1).lam < pre.lam
        True
    """

    def __init__(self, gram: torch.Tensor, lambda_r: float = 1.0) -> None:
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram must be [k, k], got {list(gram.shape)}")
        g = gram.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(g).all():
            raise ValueError("gram has non-finite entries (NaN/Inf features in the store?)")
        if lambda_r < 0:
            raise ValueError(f"lambda_r must be >= 0, got {lambda_r}")
        self.gram = g
        self.lambda_r = float(lambda_r)
        self.lam = damping(g, lambda_r)
        k = g.shape[0]
        a = g.clone()
        a.diagonal().add_(self.lam)
        chol, info = torch.linalg.cholesky_ex(a)
        if info.item() != 0:
            raise ValueError(
                f"G + lam*I is not positive definite (leading minor {info.item()} of {k} fails; "
                f"lambda_r={lambda_r}, lam={self.lam:.3g}, trace(G)={float(torch.trace(g)):.3g}): "
                "raise lambda_r, or check the store (too few rows for k, or all-zero features)"
            )
        self.chol = chol

    @property
    def k(self) -> int:
        return self.gram.shape[0]

    def with_lambda(self, lambda_r: float) -> Preconditioner:
        """Another damping on the same Gram matrix (one Cholesky, no pass over the store)."""
        return Preconditioner(self.gram, lambda_r)

    def solve(self, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """u = ((G + lam I)^-1 q^T)^T.

        Args:
            q: [m, k] or [k] query features (any float dtype; solved in float64).
            dtype: output dtype (float32 for search; float64 to keep the solve's precision).

        Returns:
            u with q's shape, on q's device, in ``dtype``.
        """
        if q.shape[-1] != self.k or q.dim() not in (1, 2):
            raise ValueError(f"q must be [m, {self.k}] or [{self.k}], got {list(q.shape)}")
        q64 = q.detach().to(device="cpu", dtype=torch.float64).reshape(-1, self.k)
        u = torch.cholesky_solve(q64.T, self.chol).T
        return u.reshape(q.shape).to(device=q.device, dtype=dtype)


def score_dense(source: FeatureSource, u: torch.Tensor) -> torch.Tensor:
    """Reference scores phi_i . u_j for every stored row (tests and small stores only).

    Args:
        source: as for :func:`gram`. u: [m, k] preconditioned queries.

    Returns:
        [N, m] float64 in row order. Production scoring is search.topk, which never forms this.
    """
    u64 = u.detach().to(device="cpu", dtype=torch.float64).reshape(-1, u.shape[-1])
    parts = [f.to(device="cpu", dtype=torch.float64) @ u64.T for f in iter_features(source)]
    return torch.cat(parts) if parts else torch.empty(0, u64.shape[0], dtype=torch.float64)
