"""Counter-based hash that defines the random projection (hash version 1).

Every implementation of the projection (this torch reference, the C++ CPU path in csrc/ and the
Triton kernels of ctrak_fast.kernels) must reproduce these bits exactly. All arithmetic is modulo
2**32.

    mix32(x)      = lowbias32: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
                               x *= 0x846CA68B; x ^= x >> 16
    seed_key(s)   = mix32((s mod 2**32) ^ 0x9E3779B9)
    row_key(s, i) = mix32(mix32((i mod 2**32) ^ seed_key(s)) ^ (i >> 32))   i: global row index
    bit(s, i, j)  = mix32(row_key(s, i) ^ (j * 0x85EBCA6B)) >> 31           j: output column
    entry(i, j)   = (+1 if bit == 0 else -1) / sqrt(k)

The sign is a pure function of (seed, i, j): never of batch size, chunking, threads or device.
"""

from __future__ import annotations

import torch

HASH_VERSION = 1
MASK32 = 0xFFFFFFFF
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
SEED_SALT = 0x9E3779B9
COL_MULT = 0x85EBCA6B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # Low 32 bits of x * c without overflowing int64: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = (x * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """Python-int version of :func:`mix32` (for scalars such as the seed key)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_C1) & MASK32
    x ^= x >> 15
    x = (x * MIX_C2) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    return mix32_int((seed & MASK32) ^ SEED_SALT)


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """rows: int64 [n] global row indices (>= 0) -> int64 [n] keys in [0, 2**32)."""
    rows = rows.to(torch.int64)
    return mix32(mix32((rows & MASK32) ^ seed_key(seed)) ^ (rows >> 32))


def sign_bits(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows: int64 [n], cols: int64 [m] -> bool [n, m], True where the entry is negative."""
    keys = row_keys(seed, rows)
    colh = _mul32(cols.to(torch.int64, copy=False), COL_MULT)
    return (mix32(keys[:, None] ^ colh[None, :]) >> 31).bool()


def rademacher_block(
    seed: int, row_start: int, n_rows: int, k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense block of the projection matrix: rows [row_start, row_start + n_rows) x all k columns.

    Returns: [n_rows, k] tensor with entries +-1/sqrt(k).
    """
    rows = torch.arange(row_start, row_start + n_rows, dtype=torch.int64)
    cols = torch.arange(k, dtype=torch.int64)
    neg = sign_bits(seed, rows, cols)
    scale = 1.0 / k**0.5
    out = torch.full((n_rows, k), scale, dtype=dtype)
    return out.masked_fill_(neg, -scale)
