"""Fused per-sample gradient projection for linear layers: W_b = sum_t g_t a_t^T, never stored.

For a linear layer y = W a (+ c), the per-sample weight gradient is W_b = G_b^T A_b with A_b [T, in]
the layer inputs and G_b [T, out] the output gradients over the T positions (tokens, pixels) of
sample b. Flattened row-major it occupies parameter rows ``row_offset + o * in + i`` of P, so

    out[b, :] = vec(W_b) @ P[row_offset : row_offset + out * in, :]

Each program owns a (BLOCK_B samples x BLOCK_K columns) output tile and a range of
(BLOCK_O x BLOCK_I) tiles of W. For each W tile it reduces over T with a batched ``tl.dot``
(G^T [BLOCK_B, BLOCK_O, T] @ A [BLOCK_B, T, BLOCK_I], float32 accumulation), flattens the result to
[BLOCK_B, BLOCK_O * BLOCK_I] and multiplies it with the hashed sign tile of those parameter rows
(:func:`dot_pm1`, exact products). Nothing of size B x out x in is ever written: A and G are read
(mostly from L2) and [B, k] is written.

Trade-off: a W tile is recomputed for every k tile (k / BLOCK_K times) rather than held while all k
columns are visited, which would need a read-modify-write of the output in global memory per W tile
(a read-after-write between threads that Triton does not order). The recompute costs 2 * B * T
tensor-core FLOPs per parameter and k tile, against ~7 * BLOCK_K integer ops of sign generation; it
stays the smaller part up to T of several hundred (16-bit inputs). For much longer T, materialising
W_b and projecting it with ``engine.rademacher.rademacher_project`` is cheaper.

Splits over the W tiles, the workspace and determinism are as in :mod:`..rademacher_project.triton`.
"""

# No `from __future__ import annotations` here: Triton reads the kernels' tl.constexpr annotations.

import math

import torch

from ..hashing import reference as hashing
from ..hashing.triton import col_premixed, row_key_premixed, sign_word
from ..rademacher_project.triton import dot_pm1, rademacher_project_triton
from ..runtime import DOT_UPCAST, cdiv, jit, tl, use_triton
from .reference import apply_scale, check_args, finish, linear_grad_project_reference

_TARGET_PROGRAMS = 512
_MIN_TILES_PER_SPLIT = 8


@jit
def _wgrad_dot(g, a, w):
    """w += g @ a, batched: g [BB, BO, BT], a [BB, BT, BI], w [BB, BO, BI] float32."""
    if DOT_UPCAST:
        return tl.dot(g.to(tl.float32), a.to(tl.float32), w)
    if g.dtype == tl.float32:
        # Plain tf32 would lose ~3 decimal digits of W; three tf32 passes keep ~float32 accuracy.
        return tl.dot(g, a, w, input_precision="tf32x3")
    return tl.dot(g, a, w)


@jit(do_not_specialize=["skey", "row_offset"])
def linear_grad_project_kernel(
    a_ptr,  # [B, T, D_IN]
    g_ptr,  # [B, T, D_OUT]
    out_ptr,  # [n_splits, B, K] float32
    skey,
    row_offset,
    scale,
    B,
    T,
    D_IN,
    D_OUT,
    K,
    tiles_per_split,
    stride_ab,
    stride_at,
    stride_ai,
    stride_gb,
    stride_gt,
    stride_go,
    stride_os,
    stride_ob,
    stride_ok,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    mask_b = offs_b < B
    ch = col_premixed(offs_k)[None, :]
    key = skey.to(tl.uint32)

    n_i_tiles = tl.cdiv(D_IN, BLOCK_I)
    n_tiles = tl.cdiv(D_OUT, BLOCK_O) * n_i_tiles
    tile_start = pid_s * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, n_tiles)

    # Position inside a flattened (BLOCK_O x BLOCK_I) tile, row-major like W_b and like tl.reshape.
    r = tl.arange(0, BLOCK_O * BLOCK_I)
    r_o = r // BLOCK_I
    r_i = r % BLOCK_I

    # Per-sample base pointers [BLOCK_B, 1, 1]; offsets inside a sample are int32 (checked on the
    # host) and formed inside the T loop, so no loop-invariant 3-D pointer tensor holds registers.
    a_b = a_ptr + offs_b.to(tl.int64)[:, None, None] * stride_ab
    g_b = g_ptr + offs_b.to(tl.int64)[:, None, None] * stride_gb
    mask_b3 = mask_b[:, None, None]
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for tile in range(tile_start, tile_end):
        o0 = (tile // n_i_tiles) * BLOCK_O
        i0 = (tile % n_i_tiles) * BLOCK_I
        offs_o = o0 + tl.arange(0, BLOCK_O)
        offs_i = i0 + tl.arange(0, BLOCK_I)

        w = tl.zeros((BLOCK_B, BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            g_off = offs_o[:, None] * stride_go + t[None, :] * stride_gt  # [BLOCK_O, BLOCK_T]
            g_in = (offs_o[:, None] < D_OUT) & (t[None, :] < T)
            a_off = t[:, None] * stride_at + offs_i[None, :] * stride_ai  # [BLOCK_T, BLOCK_I]
            a_in = (t[:, None] < T) & (offs_i[None, :] < D_IN)
            g = tl.load(g_b + g_off[None, :, :], mask=mask_b3 & g_in[None, :, :], other=0.0)
            a = tl.load(a_b + a_off[None, :, :], mask=mask_b3 & a_in[None, :, :], other=0.0)
            w = _wgrad_dot(g, a, w)

        # Entries outside the layer are 0 (masked loads), so their rows' signs do not matter.
        rows = row_offset + (o0 + r_o).to(tl.int64) * D_IN + (i0 + r_i)
        rk = row_key_premixed(key, rows)
        w_flat = tl.reshape(w, (BLOCK_B, BLOCK_O * BLOCK_I))
        acc = dot_pm1(w_flat, sign_word(rk[:, None], ch), acc)
    acc = acc * scale

    out = (
        out_ptr
        + pid_s.to(tl.int64) * stride_os
        + offs_b.to(tl.int64)[:, None] * stride_ob
        + offs_k[None, :] * stride_ok
    )
    tl.store(out, acc, mask=mask_b[:, None] & (offs_k < K)[None, :])


def linear_grad_project_triton(
    A: torch.Tensor,
    G: torch.Tensor,
    seed: int,
    k: int,
    row_offset: int,
    n_splits: int | None = None,
) -> torch.Tensor:
    """[B, k] float32 projection of the weight gradients with the Triton kernel (no bias, no
    scale; arguments checked by the caller). n_splits: the W-tile ranges (grid axis 0); None =
    chosen from the shapes. For tests."""
    B, T, d_in = A.shape
    d_out = G.shape[2]
    for X in (A, G):  # offsets inside one sample are int32 in the kernel
        if (
            sum((n - 1) * abs(st) for n, st in zip(X.shape[1:], X.stride()[1:], strict=True))
            >= 2**31
        ):
            raise ValueError("one sample of A or G spans >= 2**31 elements; not supported")
    # tl.dot needs every dimension >= 16. Compiled for sm_90 (ptxas -v) this configuration uses
    # ~200-255 registers per thread without spills; BLOCK_B = 32 or 4 warps spill, and BLOCK_K = 32
    # saves registers without raising occupancy (still one 8-warp program per SM) while doubling
    # the recompute of W, so larger batches take several batch tiles instead.
    block_b, block_t, block_o, block_i, block_k = 16, 16, 16, 16, 64
    tiles = cdiv(d_out, block_o) * cdiv(d_in, block_i)
    if B == 0 or T == 0 or tiles == 0:
        return torch.zeros(B, k, dtype=torch.float32, device=A.device)
    programs = cdiv(B, block_b) * cdiv(k, block_k)
    if n_splits is None:
        n_splits = max(1, min(cdiv(_TARGET_PROGRAMS, programs), tiles // _MIN_TILES_PER_SPLIT))
    tiles_per_split = cdiv(tiles, n_splits)
    n_splits = cdiv(tiles, tiles_per_split)

    dest = torch.empty(n_splits, B, k, dtype=torch.float32, device=A.device)
    grid = (n_splits, cdiv(B, block_b), cdiv(k, block_k))
    linear_grad_project_kernel[grid](
        A,
        G,
        dest,
        hashing.seed_key(seed),
        row_offset,
        1.0 / math.sqrt(k),
        B,
        T,
        d_in,
        d_out,
        k,
        tiles_per_split,
        *A.stride(),
        *G.stride(),
        *dest.stride(),
        BLOCK_B=block_b,
        BLOCK_T=block_t,
        BLOCK_O=block_o,
        BLOCK_I=block_i,
        BLOCK_K=block_k,
        num_warps=8,
    )
    return dest[0] if n_splits == 1 else dest.sum(0)


def linear_grad_project(
    A: torch.Tensor,
    G: torch.Tensor,
    seed: int,
    k: int,
    row_offset: int = 0,
    *,
    bias_offset: int | None = None,
    scale: float | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    force: str | None = None,
) -> torch.Tensor:
    """Project per-sample linear-layer gradients without materialising them.

    ``out[b] = scale[b] * (vec(W_b) @ P[row_offset : row_offset + out*in]
    + (sum_t G[b, t]) @ P[bias_offset : bias_offset + out])`` with W_b = sum_t G[b, t]^T A[b, t]
    (shape [out, in], row-major) and P the hashed Rademacher matrix (+-1/sqrt(k)).

    Args:
        A: [B, T, in] layer inputs (float32 / float16 / bfloat16). A plain [B, in] layer input is
            [B, 1, in]; a convolution's unfolded input is [B, positions, in_ch * kh * kw].
        G: [B, T, out] gradients of the loss w.r.t. the layer outputs, same B and T. If A and G
            differ in dtype both are computed in float32.
        seed, k: projection seed and dimension.
        row_offset: global row of the weight's first entry; may exceed 2**32.
        bias_offset: global row of the bias's first entry; None = no bias term.
        scale: None, a float or a [B] tensor multiplying each sample's result (e.g. a per-sample
            normalisation computed with :func:`linear_grad_sq_norm`).
        out, accumulate: optional [B, k] float32 to write or (accumulate=True) add the result to.
        force: None = CUDA -> kernel, else reference; or "reference" / "triton".

    Returns:
        [B, k] float32, equal to :func:`linear_grad_project_reference` to float32 rounding.

    Examples:
        >>> A, G = torch.randn(2, 5, 12), torch.randn(2, 5, 7)
        >>> y = linear_grad_project(A, G, seed=0, k=32, row_offset=100, bias_offset=100 + 7 * 12)
        >>> y.shape
        torch.Size([2, 32])
    """
    check_args(A, G, k, row_offset, bias_offset)
    if not use_triton(force, A, G):
        res = linear_grad_project_reference(
            A, G, seed, k, row_offset, bias_offset=bias_offset, scale=scale
        )
        return finish(res, out, accumulate)
    if A.dtype != G.dtype:
        A, G = A.float(), G.float()
    res = linear_grad_project_triton(A, G, seed, k, row_offset)
    if bias_offset is not None:
        bias_grad = G.sum(1, dtype=torch.float32)
        rademacher_project_triton(bias_grad, seed, k, bias_offset, res, accumulate=True)
    return finish(apply_scale(res, scale), out, accumulate)
