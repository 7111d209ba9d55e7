"""The specification of the linear-layer gradient projection in torch (W_b materialised), its
argument checks, and the exact per-sample squared norms of W_b (:func:`linear_grad_sq_norm`, plain
torch on every device)."""

from __future__ import annotations

import torch

from ..rademacher_project.reference import SUPPORTED_DTYPES, rademacher_project_reference


def check_args(A: torch.Tensor, G: torch.Tensor, k: int, row_offset: int, bias_offset) -> None:
    """The argument checks of the kernel and the reference."""
    if A.ndim != 3 or G.ndim != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(
            f"A and G must be [B, T, in] and [B, T, out], got {tuple(A.shape)}, {tuple(G.shape)}"
        )
    if A.dtype not in SUPPORTED_DTYPES or G.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"A and G must be float32/float16/bfloat16, got {A.dtype}, {G.dtype}")
    if A.device != G.device:
        raise ValueError(f"A and G must be on one device, got {A.device}, {G.device}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    n = A.shape[2] * G.shape[2]
    for name, off, size in (
        ("row_offset", row_offset, n),
        ("bias_offset", bias_offset, G.shape[2]),
    ):
        if off is not None and (not isinstance(off, int) or off < 0 or off + size > 2**63):
            raise ValueError(f"{name} must be an int in [0, 2**63 - {size}], got {off!r}")


def apply_scale(res: torch.Tensor, scale) -> torch.Tensor:
    """res [B, k] times ``scale`` (None, a float or a [B] tensor), in place."""
    if scale is None:
        return res
    if isinstance(scale, torch.Tensor):
        if scale.shape != (res.shape[0],):
            raise ValueError(f"scale must be a float or a [B={res.shape[0]}] tensor")
        return res.mul_(scale.to(device=res.device, dtype=torch.float32)[:, None])
    return res.mul_(float(scale))


def finish(res: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> torch.Tensor:
    """res written to (or added to) ``out`` when given, else res."""
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out")
        return res
    if out.shape != res.shape or out.dtype != torch.float32 or out.device != res.device:
        raise ValueError(f"out must be float32 {tuple(res.shape)} on {res.device}")
    return out.add_(res) if accumulate else out.copy_(res)


def linear_grad_project_reference(
    A: torch.Tensor,
    G: torch.Tensor,
    seed: int,
    k: int,
    row_offset: int = 0,
    *,
    bias_offset: int | None = None,
    scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Specification: materialise W_b with einsum (float32) and project it with the reference.

    Args and returns as :func:`.triton.linear_grad_project` (without ``out``). Memory
    O(B * out * in).
    """
    check_args(A, G, k, row_offset, bias_offset)
    B = A.shape[0]
    W = torch.einsum("bto,bti->boi", G.float(), A.float()).reshape(B, -1)
    res = rademacher_project_reference(W, seed, k, row_offset)
    if bias_offset is not None:
        res += rademacher_project_reference(G.float().sum(1), seed, k, bias_offset)
    return apply_scale(res, scale)


def linear_grad_sq_norm(A: torch.Tensor, G: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
    """Exact per-sample squared Frobenius norm of W_b = sum_t G[b, t]^T A[b, t] (float32).

    Uses the cheaper of two exact formulas: the ghost-norm identity
    ``||sum_t g_t a_t^T||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)`` costs ~T^2 (in + out) per sample;
    materialising W_b costs ~T * in * out.

    Args:
        A: [B, T, in]; G: [B, T, out] (any float dtype, computed in float32).
        bias: add the bias gradient's squared norm ||sum_t g_t||^2.

    Returns:
        [B] float32.

    Examples:
        >>> A, G = torch.randn(3, 4, 6), torch.randn(3, 4, 5)
        >>> W = torch.einsum("bto,bti->boi", G, A)
        >>> torch.allclose(linear_grad_sq_norm(A, G), W.square().sum((1, 2)), rtol=1e-4)
        True
    """
    if A.ndim != 3 or G.ndim != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(
            f"A and G must be [B, T, in] and [B, T, out], got {tuple(A.shape)}, {tuple(G.shape)}"
        )
    A, G = A.float(), G.float()
    _, T, d_in = A.shape
    d_out = G.shape[2]
    if T * T * (d_in + d_out) < T * d_in * d_out:
        sq = (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))
    else:
        sq = torch.bmm(G.transpose(1, 2), A).square().sum((1, 2))
    if bias:
        sq = sq + G.sum(1).square().sum(1)
    return sq
