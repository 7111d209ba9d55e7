"""The two kernels of TRAK scoring, built within a memory bound: G = Phi^T Phi and K = Phi Phi^T.

G [k, k] serves the primal path (N >= k), K [N, N] the dual one (N < k; scoring.py). Both are
float64. Each is accumulated from feature chunks that are bounded in bytes (CHUNK_BYTES), so the
peak memory is the float64 result plus a few hundred MB, whatever N and k:

- only G's lower block triangle is computed, column block by column block ((k - j0) x B tiles,
  half the flops of the full product); the upper triangle is mirrored in place at the end;
- precision="float64" casts each chunk to float64 and accumulates straight into G (addmm_ on a
  view: no tile buffer). precision="mixed" multiplies the float32 chunk in float32 (twice the
  BLAS speed, half the chunk memory) and adds each tile into the float64 G, so rounding stays
  within one chunk (~1e-7 relative to ||G||; benchmarks/bench_scoring.py measures it);
- device="cuda" sends each chunk to the GPU and builds G there (float32 matmul without TF32);
  the CPU runs the same code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from ctrak_fast.engine.scoring_options import PRECISIONS
from ctrak_fast.engine.store import FeatureStore, iter_features

# What gram / kernel read: a store, a [N, k] tensor, or blocks [n_i, k] / (features, ids).
FeatureSource = (
    FeatureStore
    | torch.Tensor
    | tuple[torch.Tensor, torch.Tensor]
    | Iterable[torch.Tensor]
    | Iterable[tuple[torch.Tensor, torch.Tensor]]
)

CHUNK_BYTES = 256 << 20  # one chunk of rows in the compute dtype
BLOCK_COLS = 2048  # column block of G's lower triangle


def _compute_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.float64 if precision == "float64" else torch.float32


def _chunks(feats: torch.Tensor, dtype: torch.dtype, device, chunk_rows: int | None):
    k = feats.shape[1]
    step = chunk_rows or max(1, CHUNK_BYTES // (k * torch.finfo(dtype).bits // 8))
    for start in range(0, feats.shape[0], step):
        yield feats[start : start + step].to(device=device, dtype=dtype)


def _store_blocks(source: FeatureSource, progress: bool):
    blocks = iter_features(source)
    if progress:
        from tqdm.auto import tqdm

        total = len(source.shards) if isinstance(source, FeatureStore) else None
        blocks = tqdm(blocks, total=total, desc="gram", unit="shard")
    return blocks


def mirror_lower(g: torch.Tensor, block: int = BLOCK_COLS) -> torch.Tensor:
    """Copy the lower triangle of a square matrix onto its upper one, in place, block by block
    (no k x k temporary). Returns g.

    Examples:
        >>> mirror_lower(torch.tensor([[1.0, 9.0], [2.0, 3.0]]))
        tensor([[1., 2.],
                [2., 3.]])
    """
    k = g.shape[0]
    for j0 in range(0, k, block):
        j1 = min(j0 + block, k)
        diag = g[j0:j1, j0:j1]
        diag.copy_(diag.tril() + diag.tril(-1).T)
        if j1 < k:
            g[j0:j1, j1:].copy_(g[j1:, j0:j1].T)
    return g


def gram(
    source: FeatureSource,
    progress: bool = False,
    chunk_rows: int | None = None,
    precision: str = "float64",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """G = Phi^T Phi, streamed, in memory O(k^2) + one chunk (module docstring).

    Args:
        source: a FeatureStore, a [N, k] tensor, or an iterable of [n_i, k] tensors or
            (features, ids) pairs.
        progress: show a tqdm bar over the shards.
        chunk_rows: rows multiplied at a time (default: CHUNK_BYTES worth).
        precision: "float64" (exact float64 sums) or "mixed" (float32 products per chunk,
            float64 across chunks).
        device: where G is built (default CPU).

    Returns:
        [k, k] float64 on `device`, exactly symmetric.

    Examples:
        >>> phi = torch.randn(100, 8)
        >>> torch.allclose(gram(phi), phi.double().T @ phi.double())
        True
        >>> torch.allclose(gram(phi, precision="mixed"), gram(phi), rtol=1e-5)
        True
    """
    dtype = _compute_dtype(precision)
    device = torch.device(device or "cpu")
    with _exact_float32(device):
        g = _accumulate(source, progress, chunk_rows, dtype, device)
    if g is None:
        if isinstance(source, FeatureStore):
            return torch.zeros(source.k, source.k, dtype=torch.float64, device=device)
        raise ValueError("gram: no features")
    return mirror_lower(g)


@contextlib.contextmanager
def _exact_float32(device: torch.device):
    """IEEE float32 products on CUDA: no TF32 (a 10-bit mantissa) whatever the caller set."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _accumulate(source, progress, chunk_rows, dtype, device) -> torch.Tensor | None:
    """G's lower block triangle, summed chunk by chunk (None without any block)."""
    g = None
    for feats in _store_blocks(source, progress):
        if g is None:
            g = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64, device=device)
        k = g.shape[0]
        if feats.dim() != 2 or feats.shape[1] != k:
            raise ValueError(f"feature blocks must be [n, {k}], got {list(feats.shape)}")
        for c in _chunks(feats, dtype, device, chunk_rows):
            for j0 in range(0, k, BLOCK_COLS):
                j1 = min(j0 + BLOCK_COLS, k)
                if dtype == torch.float64:
                    g[j0:, j0:j1].addmm_(c[:, j0:].T, c[:, j0:j1])
                else:
                    g[j0:, j0:j1] += c[:, j0:].T @ c[:, j0:j1]
    return g


def load_features(source: FeatureSource, device: torch.device | str | None = None) -> torch.Tensor:
    """All rows as one [N, k] float32 tensor (the dual path holds Phi: N x k x 4 bytes).

    Examples:
        >>> load_features([torch.ones(2, 3), torch.zeros(1, 3)]).shape
        torch.Size([3, 3])
    """
    blocks = [f.to(device=device or "cpu", dtype=torch.float32) for f in iter_features(source)]
    if not blocks:
        if isinstance(source, FeatureStore):
            return torch.zeros(0, source.k, device=device or "cpu")
        raise ValueError("no features")
    widths = {b.shape[1] for b in blocks}
    if len(widths) != 1 or any(b.dim() != 2 for b in blocks):
        raise ValueError(f"feature blocks must all be [n, k], got widths {sorted(widths)}")
    return torch.cat(blocks)  # a copy: blocks may be read-only views of mapped shards


def phi_matmul(phi: torch.Tensor, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Phi @ x ([N, k] x [k, m]) or, with transpose, Phi^T @ x ([N, m] -> [k, m]), in float64,
    casting Phi to float64 one column chunk at a time (never the whole N x k).

    Examples:
        >>> phi, x = torch.randn(5, 7), torch.randn(7, 2, dtype=torch.float64)
        >>> torch.allclose(phi_matmul(phi, x), phi.double() @ x)
        True
    """
    x = x.to(device=phi.device, dtype=torch.float64)
    n, k = phi.shape
    step = max(1, CHUNK_BYTES // (8 * max(n, 1)))
    if transpose:
        out = torch.empty(k, x.shape[1], dtype=torch.float64, device=phi.device)
        for c in range(0, k, step):
            out[c : c + step] = phi[:, c : c + step].double().T @ x
        return out
    out = torch.zeros(n, x.shape[1], dtype=torch.float64, device=phi.device)
    for c in range(0, k, step):
        out.addmm_(phi[:, c : c + step].double(), x[c : c + step])
    return out


def kernel(phi: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """K = Phi Phi^T [N, N] float64, accumulated over column chunks of Phi.

    Examples:
        >>> phi = torch.randn(6, 40)
        >>> torch.allclose(kernel(phi), phi.double() @ phi.double().T)
        True
    """
    dtype = _compute_dtype(precision)
    n, k = phi.shape
    out = torch.zeros(n, n, dtype=torch.float64, device=phi.device)
    step = max(1, CHUNK_BYTES // (torch.finfo(dtype).bits // 8 * max(n, 1)))
    for c in range(0, k, step):
        block = phi[:, c : c + step].to(dtype)
        if dtype == torch.float64:
            out.addmm_(block, block.T)
        else:
            out += block @ block.T
    return mirror_lower(out)


__all__ = [
    "CHUNK_BYTES",
    "PRECISIONS",
    "FeatureSource",
    "gram",
    "kernel",
    "load_features",
    "mirror_lower",
    "phi_matmul",
]
