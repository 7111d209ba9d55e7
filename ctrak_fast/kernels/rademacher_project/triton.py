"""Fused Rademacher projection ``x @ P[row_offset : row_offset + p]``, P generated in registers.

P[i, j] = +-1/sqrt(k) is the matrix of :mod:`..hashing`; it is never stored. Each program
owns a (BLOCK_B x BLOCK_K) output tile and walks a range of rows in BLOCK_P steps: load the x tile,
hash the (BLOCK_P x BLOCK_K) sign tile, and feed both to ``tl.dot`` with float32 accumulation.

Cost model. Generating a sign costs ~7 integer ops (hash.py); the matmul costs 2*B FLOPs on tensor
cores per sign. An integer op is worth ~60 tensor-core FLOPs on Hopper, so for B <= ~64 the kernel
is bound by sign generation, not by the matmul or by reading x. Hence: signs are generated once per
(row, column) per batch tile, and BLOCK_B covers the whole batch up to 64.

Precision. The signs are exactly +-1 in the operand dtype. fp16/bf16 inputs go straight to the
tensor cores. float32 inputs are split into three bfloat16 pieces (hi + mid + lo == x exactly for
normal numbers), so every product is exact and the only rounding is the float32 accumulation, as in
the float32 reference. The 1/sqrt(k) scale is applied once, to the accumulator.

Parallelism and determinism. With B = 16 and k = 2048 there are only 16 output tiles, far fewer than
the GPU's multiprocessors, so the rows are split into ``n_splits`` ranges (grid axis 2). Partial
results go to a float32 workspace [n_splits, B, k] that torch sums afterwards, instead of atomics:
the result is then bitwise reproducible run to run. n_splits depends on the shapes only (not on the
device), and there is no autotuning, whose choice could differ between processes.
"""

# No `from __future__ import annotations` here: Triton reads the kernels' tl.constexpr annotations.

import math

import torch

from ..hashing import reference as hashing
from ..hashing.triton import col_premixed, pm_one, row_key_premixed, sign_word
from ..runtime import DOT_UPCAST, cdiv, check_runnable, jit, next_pow2, tl
from .reference import check_args, output_buffer

# Aim for this many programs: several waves on any current GPU, independent of the actual device.
_TARGET_PROGRAMS = 512
# Fewer rows per split than this and the workspace traffic outweighs the parallelism gained.
_MIN_ROWS_PER_SPLIT = 4096
# Keeps the in-kernel row loop in int32 (global row indices themselves are int64).
_MAX_ROWS_PER_SPLIT = 1 << 30


@jit
def dot_upcast(a, b, acc):
    """``tl.dot(a, b, acc)``; under the interpreter in float32 (see runtime.DOT_UPCAST)."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@jit
def dot_pm1(x, w, acc):
    """acc += x @ S, with S the +-1 matrix whose signs are bit 31 of uint32 ``w`` [P, K].

    x: [M, P] float32 / float16 / bfloat16; acc: [M, K] float32. Exact products for every x dtype:
    float32 x is split into three bfloat16 pieces whose sum is x.
    """
    if x.dtype == tl.float16:
        acc = dot_upcast(x, pm_one(w, tl.float16), acc)
    elif x.dtype == tl.bfloat16:
        acc = dot_upcast(x, pm_one(w, tl.bfloat16), acc)
    else:
        s = pm_one(w, tl.bfloat16)
        hi = x.to(tl.bfloat16)
        r = x - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
        acc = dot_upcast(hi, s, acc)
        acc = dot_upcast(mid, s, acc)
        acc = dot_upcast(lo, s, acc)
    return acc


@jit(do_not_specialize=["skey", "row_offset"])
def rademacher_project_kernel(
    x_ptr,  # [B, P]
    out_ptr,  # [n_splits, B, K] float32 (or [B, K] when n_splits == 1)
    skey,  # hashing.seed_key(seed), uint32 value
    row_offset,  # global index of x's first column (int64 range)
    scale,  # 1/sqrt(K)
    B,
    P,
    K,
    rows_per_split,  # multiple of BLOCK_P, < 2**31
    stride_xb,
    stride_xp,
    stride_os,
    stride_ob,
    stride_ok,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_k = offs_k < K
    ch = col_premixed(offs_k)[None, :]
    key = skey.to(tl.uint32)

    # int64 from here: B * P and row indices may exceed 2**31 (the hash takes i mod 2**32, i >> 32).
    p_start = pid_s.to(tl.int64) * rows_per_split
    n_local = tl.minimum(P - p_start, rows_per_split).to(tl.int32)
    row0 = row_offset + p_start
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb + p_start * stride_xp

    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for p0 in range(0, n_local, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < n_local
        x = tl.load(
            x_rows + offs_p.to(tl.int64)[None, :] * stride_xp,
            mask=mask_b[:, None] & mask_p[None, :],
            other=0.0,
        )
        # Rows past the end get signs too; their x is 0, so they add nothing.
        rk = row_key_premixed(key, row0 + offs_p)
        acc = dot_pm1(x, sign_word(rk[:, None], ch), acc)
    acc = acc * scale

    out = (
        out_ptr
        + pid_s.to(tl.int64) * stride_os
        + offs_b.to(tl.int64)[:, None] * stride_ob
        + offs_k[None, :] * stride_ok
    )
    mask = mask_b[:, None] & mask_k[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc, mask=mask)


def block_sizes(B: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_P, BLOCK_K, num_warps) of the kernel for a batch B and k columns."""
    # tl.dot needs every dimension >= 16. Compiled for sm_90 (ptxas -v), 16 x 32 x 128 with 8 warps
    # takes ~50-75 registers per thread and 64 x 32 x 128 ~100-180, without spills; BLOCK_P = 64
    # doubles that for the same work per program.
    block_b = min(64, max(16, next_pow2(B)))
    block_k = min(128, max(16, next_pow2(k)))
    block_p = 32
    num_warps = 8 if block_k >= 64 else 4
    return block_b, block_p, block_k, num_warps


def _launch(
    x: torch.Tensor,
    seed: int,
    k: int,
    row_offset: int,
    out: torch.Tensor,
    accumulate: bool,
    n_splits: int | None = None,
) -> torch.Tensor:
    """out[B, k] (+)= x @ P[row_offset:row_offset + p] with the kernel. n_splits: for tests."""
    B, p = x.shape
    if B == 0:
        return out
    if p == 0:
        return out if accumulate else out.zero_()
    block_b, block_p, block_k, num_warps = block_sizes(B, k)
    tiles = cdiv(B, block_b) * cdiv(k, block_k)
    if n_splits is None:
        n_splits = max(1, min(cdiv(_TARGET_PROGRAMS, tiles), p // _MIN_ROWS_PER_SPLIT))
    n_splits = max(n_splits, cdiv(p, _MAX_ROWS_PER_SPLIT))
    rows_per_split = cdiv(cdiv(p, n_splits), block_p) * block_p
    n_splits = cdiv(p, rows_per_split)

    if n_splits == 1:
        dest, acc_in_kernel, stride_os = out, accumulate, 0
    else:
        dest = torch.empty(n_splits, B, k, dtype=torch.float32, device=x.device)
        acc_in_kernel, stride_os = False, dest.stride(0)
    grid = (cdiv(B, block_b), cdiv(k, block_k), n_splits)
    rademacher_project_kernel[grid](
        x,
        dest,
        hashing.seed_key(seed),
        row_offset,
        1.0 / math.sqrt(k),
        B,
        p,
        k,
        rows_per_split,
        x.stride(0),
        x.stride(1),
        stride_os,
        dest.stride(-2),
        dest.stride(-1),
        BLOCK_B=block_b,
        BLOCK_P=block_p,
        BLOCK_K=block_k,
        ACCUMULATE=acc_in_kernel,
        num_warps=num_warps,
    )
    if n_splits > 1:
        if accumulate:
            out += dest.sum(0)
        else:
            torch.sum(dest, 0, out=out)
    return out


def rademacher_project_triton(
    x: torch.Tensor,
    seed: int,
    k: int,
    row_offset: int = 0,
    out: torch.Tensor | None = None,
    *,
    accumulate: bool = False,
    n_splits: int | None = None,
) -> torch.Tensor:
    """The Triton kernel: ``x @ P[row_offset : row_offset + p]``, P generated in registers.

    P[i, j] = +-1/sqrt(k), a pure function of (seed, i, j) (:mod:`..hashing`): memory is
    O(B * k) whatever p. The dispatch (CUDA -> this kernel, CPU -> the C++ kernel or the
    reference) is ``ctrak_fast.engine.rademacher.rademacher_project``.

    Args:
        x: [B, p] float32 / float16 / bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1); any
            strides (unit stride along p is fastest).
        seed: projection seed.
        k: number of output columns (any k >= 1).
        row_offset: global row of P for x's first column; may exceed 2**32.
        out: optional [B, k] float32 on x's device, written (or added to, see ``accumulate``)
            and returned.
        accumulate: add the projection to ``out`` instead of overwriting it.
        n_splits: number of row ranges (grid axis 2); None = chosen from the shapes. For tests.

    Returns:
        [B, k] float32: equal to :func:`rademacher_project_reference` to float32 rounding.
    """
    check_args(x, seed, k, row_offset)
    out = output_buffer(x, k, out, accumulate)
    check_runnable(x, out)
    return _launch(x, seed, k, row_offset, out, accumulate, n_splits)
