"""Factorised (Kronecker, LoGra-style) per-layer projection of linear-layer gradients.

Instead of one dense P over the layer's out * in parameters, project each side of W_b = G_b^T A_b:

    feature_b = vec((G_b P_out)^T (A_b P_in)) = vec(P_out^T W_b P_in)        [k_out * k_in]

i.e. the projection matrix is the Kronecker product P_out (x) P_in, with entries
+-1/sqrt(k_out * k_in). Cost per sample: T * (in * k_in + out * k_out) for the two projections
(:func:`rademacher_project_triton`, signs generated in registers) plus T * k_out * k_in for the
small batched outer product (torch), against out * in * k for the dense projection.

P_in and P_out are hashed Rademacher matrices (:mod:`.hashing`) with their own seeds,
derived from (seed, layer) by :func:`factorized_seeds`, so every layer and side is independent
and a feature is a pure function of (k_in, k_out, seed, layer index, gradient).
"""

from __future__ import annotations

import torch

from ..hashing import reference as hashing
from ..rademacher_project.reference import SUPPORTED_DTYPES


def factorized_seeds(seed: int, layer: int) -> tuple[int, int]:
    """(seed_in, seed_out) for P_in and P_out of layer ``layer`` (0 <= layer < 2**31).

    seed_side = mix32(seed_key(seed) ^ mix32(2 * layer + side)), side 0 = in, 1 = out.
    """
    if not isinstance(layer, int) or not 0 <= layer < 2**31:
        raise ValueError(f"layer must be an int in [0, 2**31), got {layer!r}")
    base = hashing.seed_key(seed)
    return tuple(hashing.mix32_int(base ^ hashing.mix32_int(2 * layer + side)) for side in (0, 1))


def factorized_matrices(
    k_in: int, k_out: int, seed: int, layer: int, d_in: int, d_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_in [d_in, k_in], P_out [d_out, k_out]) float32 of layer ``layer``: entries
    +-1/sqrt(k_in) and +-1/sqrt(k_out), so P_out ⊗ P_in has +-1/sqrt(k_out * k_in)."""
    seed_in, seed_out = factorized_seeds(seed, layer)
    return (
        hashing.rademacher_block(seed_in, 0, d_in, k_in),
        hashing.rademacher_block(seed_out, 0, d_out, k_out),
    )


def check_args(A: torch.Tensor, G: torch.Tensor, k_in: int, k_out: int) -> None:
    """The argument checks of :func:`factorized_project_reference` and the Triton path."""
    if A.ndim != 3 or G.ndim != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(
            f"A and G must be [B, T, in] and [B, T, out], got {tuple(A.shape)}, {tuple(G.shape)}"
        )
    if A.dtype not in SUPPORTED_DTYPES or G.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"A and G must be float32/float16/bfloat16, got {A.dtype}, {G.dtype}")
    for name, v in (("k_in", k_in), ("k_out", k_out)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def outer(Gp: torch.Tensor, Ap: torch.Tensor) -> torch.Tensor:
    """Per-sample (G P_out)^T (A P_in), flattened: [B, k_out * k_in]."""
    # [B, T, k_out]^T @ [B, T, k_in] -> [B, k_out * k_in], row-major: index o * k_in + i.
    return torch.bmm(Gp.transpose(1, 2), Ap).flatten(1)


def factorized_project_reference(
    A: torch.Tensor,
    G: torch.Tensor,
    k_in: int,
    k_out: int,
    seed: int,
    layer: int,
    *,
    bias: bool = False,
) -> torch.Tensor:
    """Specification: dense P_in, P_out from :func:`.hashing.rademacher_block`, float32.

    Args and returns as :func:`.triton.factorized_project`.
    """
    check_args(A, G, k_in, k_out)
    P_in, P_out = factorized_matrices(k_in, k_out, seed, layer, A.shape[2] + int(bias), G.shape[2])
    P_in, P_out = P_in.to(A.device), P_out.to(G.device)
    A = A.float()
    if bias:
        A = torch.cat([A, A.new_ones(*A.shape[:2], 1)], dim=2)
    return outer(G.float() @ P_out, A @ P_in)
