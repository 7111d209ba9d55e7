"""Factorised (Kronecker, LoGra-style) per-layer projection of linear-layer gradients.

Instead of one dense P over the layer's out * in parameters, project each side of W_b = G_b^T A_b:

    feature_b = vec((G_b P_out)^T (A_b P_in)) = vec(P_out^T W_b P_in)        [k_out * k_in]

i.e. the projection matrix is the Kronecker product P_out (x) P_in, with entries
+-1/sqrt(k_out * k_in). Cost per sample: T * (in * k_in + out * k_out) for the two projections
(:func:`rademacher_project` kernels, signs generated in registers) plus T * k_out * k_in for the
small batched outer product (torch), against out * in * k for the dense projection.

P_in and P_out are hashed Rademacher matrices (:mod:`ctrak_fast.hashing`) with their own seeds,
derived from (spec.seed, layer) by :func:`factorized_seeds`, so every layer and side is independent
and a feature is a pure function of (spec, layer index, gradient).
"""

from __future__ import annotations

import torch

from ctrak_fast.projection import FactorizedSpec, factorized_matrices, factorized_seeds

from .rademacher_project import SUPPORTED_DTYPES, rademacher_project


def _check(A: torch.Tensor, G: torch.Tensor, spec: FactorizedSpec) -> None:
    if A.ndim != 3 or G.ndim != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(
            f"A and G must be [B, T, in] and [B, T, out], got {tuple(A.shape)}, {tuple(G.shape)}"
        )
    if A.dtype not in SUPPORTED_DTYPES or G.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"A and G must be float32/float16/bfloat16, got {A.dtype}, {G.dtype}")
    if not isinstance(spec, FactorizedSpec):
        raise TypeError(f"spec must be a FactorizedSpec, got {type(spec).__name__}")


def _outer(Gp: torch.Tensor, Ap: torch.Tensor) -> torch.Tensor:
    # [B, T, k_out]^T @ [B, T, k_in] -> [B, k_out * k_in], row-major: index o * k_in + i.
    return torch.bmm(Gp.transpose(1, 2), Ap).flatten(1)


def factorized_project_reference(
    A: torch.Tensor, G: torch.Tensor, spec: FactorizedSpec, layer: int, *, bias: bool = False
) -> torch.Tensor:
    """Specification: dense P_in, P_out from :func:`ctrak_fast.hashing.rademacher_block`, float32.

    Args and returns as :func:`factorized_project`.
    """
    _check(A, G, spec)
    P_in, P_out = factorized_matrices(spec, layer, A.shape[2] + int(bias), G.shape[2])
    P_in, P_out = P_in.to(A.device), P_out.to(G.device)
    A = A.float()
    if bias:
        A = torch.cat([A, A.new_ones(*A.shape[:2], 1)], dim=2)
    return _outer(G.float() @ P_out, A @ P_in)


def factorized_project(
    A: torch.Tensor,
    G: torch.Tensor,
    spec: FactorizedSpec,
    layer: int,
    *,
    bias: bool = False,
    force: str | None = None,
) -> torch.Tensor:
    """Per-sample factorised projection ``vec((G_b P_out)^T (A_b P_in))`` of one linear layer.

    Args:
        A: [B, T, in] layer inputs; G: [B, T, out] output gradients (float32/float16/bfloat16).
        spec: the projection (k_in, k_out, seed).
        layer: index of the layer in the model's parameter order; selects the seeds.
        bias: treat the layer as having a bias: A gets a constant-1 input (row ``in`` of P_in), so
            the bias gradient sum_t g_t is projected as the last column of W_b.
        force: None = CUDA -> Triton projections, else reference; or "reference" / "triton".

    Returns:
        [B, k_out * k_in] float32, equal to :func:`factorized_project_reference` to float32
        rounding.

    Examples:
        >>> A, G = torch.randn(2, 6, 10), torch.randn(2, 6, 4)
        >>> factorized_project(A, G, FactorizedSpec(k_in=8, k_out=4), layer=0).shape
        torch.Size([2, 32])
    """
    _check(A, G, spec)
    if force == "reference" or (force is None and not (A.is_cuda and G.is_cuda)):
        return factorized_project_reference(A, G, spec, layer, bias=bias)
    seed_in, seed_out = factorized_seeds(spec.seed, layer)
    B, T, d_in = A.shape
    d_out = G.shape[2]
    Ap = rademacher_project(A.reshape(B * T, d_in), seed_in, spec.k_in, force=force)
    Gp = rademacher_project(G.reshape(B * T, d_out), seed_out, spec.k_out, force=force)
    if bias:
        # The constant-1 input contributes row d_in of P_in to every position.
        one = A.new_ones(1, 1, dtype=torch.float32)
        Ap += rademacher_project(one, seed_in, spec.k_in, row_offset=d_in, force=force)
    return _outer(Gp.view(B, T, spec.k_out), Ap.view(B, T, spec.k_in))
