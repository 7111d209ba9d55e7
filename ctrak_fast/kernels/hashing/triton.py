"""Triton device functions for the counter-based hash of :mod:`.reference` (hash version 1).

All arithmetic is on ``tl.uint32`` values: multiplications wrap modulo 2**32 and ``>>`` is a logical
shift, exactly as the torch reference computes with int64 and masks.

The projection kernels evaluate ``bit(s, i, j) = mix32(row_key(s, i) ^ j * COL_MULT) >> 31`` for a
whole [rows, cols] tile, so the per-element cost is what matters. Two identities cut it:

- mix32 starts with ``h ^= h >> 16``, which is linear over XOR; for ``h = r ^ c`` it equals
  ``(r ^ r >> 16) ^ (c ^ c >> 16)``, so that step is done once per row and once per column;
- mix32 ends with ``h ^= h >> 16``, which leaves bit 31 unchanged, so it is skipped.

Per element that leaves one XOR, two multiplies and one shift-XOR (:func:`sign_word`), and one
AND/OR to turn bit 31 into an exact +-1.0 (:func:`pm_one`).
"""

# No `from __future__ import annotations` here: Triton reads the kernels' tl.constexpr annotations.

import torch

from ..runtime import cdiv, check_runnable, jit, tl
from . import reference as hashing

MIX_C1 = tl.constexpr(hashing.MIX_C1)
MIX_C2 = tl.constexpr(hashing.MIX_C2)
COL_MULT = tl.constexpr(hashing.COL_MULT)


@jit
def mix32(x):
    """lowbias32 on uint32 (any shape) -> uint32; equal to :func:`.hashing.mix32`."""
    x = x ^ (x >> 16)
    x = x * MIX_C1
    x = x ^ (x >> 15)
    x = x * MIX_C2
    return x ^ (x >> 16)


@jit
def row_key(skey, rows):
    """skey: uint32 scalar ``hashing.seed_key(seed)``; rows: int64 global row indices (>= 0).

    Returns uint32 keys, equal to :func:`.hashing.row_keys`.
    """
    lo = rows.to(tl.uint32)  # truncation: i mod 2**32
    hi = (rows >> 32).to(tl.uint32)
    return mix32(mix32(lo ^ skey) ^ hi)


@jit
def row_key_premixed(skey, rows):
    """Row half of the first mix32 step: ``r ^ r >> 16`` of :func:`row_key` (uint32)."""
    r = row_key(skey, rows)
    return r ^ (r >> 16)


@jit
def col_premixed(cols):
    """cols: int32/int64 output columns -> uint32 ``c ^ c >> 16`` with ``c = j * COL_MULT``."""
    c = cols.to(tl.uint32) * COL_MULT
    return c ^ (c >> 16)


@jit
def sign_word(rk, ch):
    """rk, ch: premixed row / column words (broadcastable) -> uint32; bit 31 is the sign bit."""
    x = (rk ^ ch) * MIX_C1
    x = x ^ (x >> 15)
    return x * MIX_C2


@jit
def pm_one(w, DTYPE: tl.constexpr):
    """Exact +1.0 / -1.0 in DTYPE (float32, float16, bfloat16) from bit 31 of uint32 ``w``.

    Built from the bit pattern (sign | exponent of 1.0) to avoid a select and a float conversion.
    """
    if DTYPE == tl.float32:
        return ((w & 0x80000000) | 0x3F800000).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return (((w >> 16) & 0x8000) | 0x3C00).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        return (((w >> 16) & 0x8000) | 0x3F80).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@jit(do_not_specialize=["skey"])
def sign_matrix_kernel(
    rows_ptr,
    cols_ptr,
    out_ptr,
    skey,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < n_rows
    mask_c = offs_c < n_cols
    rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0)
    cols = tl.load(cols_ptr + offs_c, mask=mask_c, other=0)
    rk = row_key_premixed(skey.to(tl.uint32), rows)
    w = sign_word(rk[:, None], col_premixed(cols)[None, :])
    out = offs_r.to(tl.int64)[:, None] * n_cols + offs_c[None, :]
    tl.store(out_ptr + out, (w >> 31).to(tl.int8), mask=mask_r[:, None] & mask_c[None, :])


def sign_matrix(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sign bits as the projection kernels generate them (same device functions).

    Args:
        seed: projection seed (any int; reduced mod 2**32 like the reference).
        rows: int64 [n] global row indices >= 0 (may exceed 2**32).
        cols: int64 [m] output columns in [0, 2**31).

    Returns:
        bool [n, m], True where the entry is negative; equals :func:`.hashing.sign_bits`.
    """
    if rows.ndim != 1 or cols.ndim != 1:
        raise ValueError("rows and cols must be 1-D")
    check_runnable(rows, cols)
    rows = rows.to(torch.int64).contiguous()
    cols = cols.to(torch.int64).contiguous()
    n, m = rows.numel(), cols.numel()
    out = torch.empty(n, m, dtype=torch.int8, device=rows.device)
    if n and m:
        grid = (cdiv(n, 32), cdiv(m, 32))
        sign_matrix_kernel[grid](
            rows, cols, out, hashing.seed_key(seed), n, m, BLOCK_R=32, BLOCK_C=32
        )
    return out.bool()
