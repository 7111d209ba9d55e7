"""Factorised projection on the GPU: both sides projected by the Rademacher Triton kernel (signs in
registers), the small per-sample outer product in torch; otherwise the reference."""

from __future__ import annotations

import torch

from ..rademacher_project.triton import rademacher_project_triton
from ..runtime import use_triton
from .reference import check_args, factorized_project_reference, factorized_seeds, outer


def factorized_project(
    A: torch.Tensor,
    G: torch.Tensor,
    k_in: int,
    k_out: int,
    seed: int,
    layer: int,
    *,
    bias: bool = False,
    force: str | None = None,
) -> torch.Tensor:
    """Per-sample factorised projection ``vec((G_b P_out)^T (A_b P_in))`` of one linear layer.

    Args:
        A: [B, T, in] layer inputs; G: [B, T, out] output gradients (float32/float16/bfloat16).
        k_in, k_out, seed: the projection (P_in has k_in columns, P_out k_out).
        layer: index of the layer in the model's parameter order; selects the seeds.
        bias: treat the layer as having a bias: A gets a constant-1 input (row ``in`` of P_in), so
            the bias gradient sum_t g_t is projected as the last column of W_b.
        force: None = CUDA -> Triton projections, else reference; or "reference" / "triton".

    Returns:
        [B, k_out * k_in] float32, equal to :func:`factorized_project_reference` to float32
        rounding.

    Examples:
        >>> A, G = torch.randn(2, 6, 10), torch.randn(2, 6, 4)
        >>> factorized_project(A, G, k_in=8, k_out=4, seed=0, layer=0).shape
        torch.Size([2, 32])
    """
    check_args(A, G, k_in, k_out)
    if not use_triton(force, A, G):
        return factorized_project_reference(A, G, k_in, k_out, seed, layer, bias=bias)
    seed_in, seed_out = factorized_seeds(seed, layer)
    B, T, d_in = A.shape
    d_out = G.shape[2]
    Ap = rademacher_project_triton(A.reshape(B * T, d_in), seed_in, k_in)
    Gp = rademacher_project_triton(G.reshape(B * T, d_out), seed_out, k_out)
    if bias:
        # The constant-1 input contributes row d_in of P_in to every position.
        one = A.new_ones(1, 1, dtype=torch.float32)
        Ap += rademacher_project_triton(one, seed_in, k_in, row_offset=d_in)
    return outer(Gp.view(B, T, k_out), Ap.view(B, T, k_in))
