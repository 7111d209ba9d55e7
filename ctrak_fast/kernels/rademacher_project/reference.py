"""The specification of ``x @ P[row_offset : row_offset + p]`` in torch, and the argument checks
every backend of the projection shares (this reference, the Triton kernel of :mod:`.triton`, the
C++ kernel behind ``ctrak_fast.engine.projector``)."""

from __future__ import annotations

import torch

from ..hashing import reference as hashing

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows of P generated per chunk (bounds the reference's memory at ~chunk * k * 50 bytes).
_REF_ELEMS_PER_CHUNK = 1 << 21


def rademacher_project_reference(
    x: torch.Tensor, seed: int, k: int, row_offset: int = 0
) -> torch.Tensor:
    """Specification: ``x.float() @ hashing.rademacher_block(seed, row_offset, p, k)``.

    Args:
        x: [B, p] float tensor (any device).
        seed, k, row_offset: as in :func:`rademacher_project`.

    Returns:
        [B, k] float32 on x's device. P is generated on the CPU in row chunks (bounded memory).
    """
    B, p = x.shape
    out = torch.zeros(B, k, dtype=torch.float32, device=x.device)
    chunk = max(1, _REF_ELEMS_PER_CHUNK // max(k, 1))
    for start in range(0, p, chunk):
        n = min(chunk, p - start)
        block = hashing.rademacher_block(seed, row_offset + start, n, k).to(x.device)
        out.addmm_(x[:, start : start + n].float(), block)
    return out


def check_args(x: torch.Tensor, seed: int, k: int, row_offset: int) -> None:
    """The argument checks of every backend of the projection."""
    if x.ndim != 2:
        raise ValueError(f"x must be [B, p], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(row_offset, int) or row_offset < 0 or row_offset + x.shape[1] > 2**63:
        raise ValueError(f"row_offset must be an int in [0, 2**63 - p), got {row_offset!r}")


def output_buffer(
    x: torch.Tensor, k: int, out: torch.Tensor | None, accumulate: bool
) -> torch.Tensor:
    """The [B, k] float32 output of a projection of x [B, p]: `out` checked, or a new one."""
    B = x.shape[0]
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out")
        return torch.empty(B, k, dtype=torch.float32, device=x.device)
    if out.shape != (B, k) or out.dtype != torch.float32 or out.device != x.device:
        raise ValueError(
            f"out must be float32 [{B}, {k}] on {x.device}, got {out.dtype} {tuple(out.shape)} "
            f"on {out.device}"
        )
    return out
