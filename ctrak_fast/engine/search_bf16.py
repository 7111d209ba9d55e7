"""The exact bfloat16 search in plain torch: the specification of ``_C.Bf16TopKState``.

The CPU engine scores bfloat16 rows against the bfloat16 part of each query (``vdpbf16ps``),
bounds the error of each approximate score against the float32 engine's score, keeps every row
that can still reach the k-th of its query and re-scores those with the float32 engine's own fma
chain; csrc/bf16_search.cpp derives the bound. This module is the same algorithm in torch, for
the tests: :func:`score_error_bound` is the bound (per row and query), :func:`fma_chain_scores`
the float32 engine's chain bit for bit, :func:`topk_bf16_reference` the whole search on one
tensor. Its approximate scores are float64, so its candidate sets are a little smaller than the
kernel's; the selected ids and values are the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ctrak_fast.engine.search_inputs import (
    TopK,
    check_features,
    check_k,
    check_queries,
    check_tails,
)

_UNIT = 2.0**-24  # float32 unit roundoff
_FLUSH = 2.0**-126  # smallest normal float32: what vdpbf16ps's flushes can lose per operation


def _gamma(n: int) -> float:
    return n * _UNIT / (1 - n * _UNIT)


def split_query(u: Tensor) -> tuple[Tensor, Tensor]:
    """u [m, dim] float32 -> (hi, lo): hi = bfloat16(u) (round to nearest), lo = u - hi
    (float64, exact)."""
    hi = u.float().bfloat16()
    return hi, u.double() - hi.double()


def score_error_bound(features: Tensor, u: Tensor) -> Tensor:
    """Bound on |approximate score - float32 engine's score|, per row and query.

    Args:
        features: [n, dim] bfloat16 rows.
        u: [m, dim] float32 queries.
    Returns:
        [n, m] float64: ``N_i c_q + e0_q`` with N_i = ||row_i||_2 and c_q, e0_q as in
        csrc/bf16_search.cpp (the float32 fma chain's error, the vdpbf16ps chain's with its
        flushes, and the query's low part by Cauchy-Schwarz).
    """
    dim = features.shape[1]
    hi, lo = split_query(u)
    h = hi.double()
    big_u, big_h, big_l = u.double().norm(dim=1), h.norm(dim=1), lo.norm(dim=1)
    g = _gamma(dim)
    g2 = 2 * dim * _UNIT / (1 - 2 * dim * _UNIT)  # vdpbf16ps: each add within one ulp
    c = g2 * big_h + g * big_u + 2.0**-22 * big_u + big_l + _FLUSH * math.sqrt(dim)
    e0 = _FLUSH * (h.abs().sum(dim=1) + 3 * dim)
    norms = features.double().norm(dim=1)
    bound: Tensor = norms[:, None] * c[None, :] + e0[None, :]
    return bound


def _fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 fma(a, b, c) with one rounding, elementwise; a bfloat16-valued, b and c float32
    (all given as float64). a * b is exact in float64 (8 + 24 significant bits); the sum is
    rounded to float64 and its error kept (TwoSum), and the one case where rounding twice differs
    from rounding once (the float64 sum on a float32 midpoint) is resolved by the error's sign."""
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    r = s.float()
    toward = torch.nextafter(r, torch.where(s > r.double(), r.new_tensor(math.inf), -math.inf))
    mid = (r.double() + toward.double()) / 2
    tie = (s == mid) & (err != 0)
    pick_up = err > 0
    larger, smaller = torch.maximum(r, toward), torch.minimum(r, toward)
    return torch.where(tie, torch.where(pick_up, larger, smaller), r)


def fma_chain_scores(rows: Tensor, u: Tensor) -> Tensor:
    """The float32 engine's score of each row: one fma chain over d = 0..dim-1 from 0.

    Args:
        rows: [c, dim] bfloat16, float16 or float32 (widened exactly).
        u: [c, dim] float32 (pairs row i with query i).
    Returns:
        [c] float32, bit-identical to ``_C.score_cpu`` for those pairs.
    """
    x, q = rows.double(), u.float().double()
    acc = torch.zeros(rows.shape[0], dtype=torch.float32)
    for d in range(rows.shape[1]):
        acc = _fma32(x[:, d], q[:, d], acc.double())
    return acc


def topk_bf16_reference(
    features: Tensor, ids: Tensor, u: Tensor, k: int, tails: str = "both"
) -> tuple[TopK, Tensor]:
    """The exact bfloat16 search on one tensor, in torch.

    Args:
        features: [n, dim] bfloat16.
        ids: [n] int64.
        u: [m, dim] float32, finite.
        k: 1 <= k <= n.
        tails: "top", "bottom" or "both".
    Returns:
        (TopK with [m, k] float32 values and int64 ids: the float32 engine's selection,
        candidates: [m] int64, how many rows each query re-scored, both tails together).

    Examples:
        >>> f, u = torch.randn(300, 16).bfloat16(), torch.randn(2, 16)
        >>> res, cand = topk_bf16_reference(f, torch.arange(300), u, 5)
        >>> res.top_ids.shape, bool((cand < 300).all())
        (torch.Size([2, 5]), True)
    """
    check_tails(tails)
    if features.dtype != torch.bfloat16:
        raise TypeError(f"features must be bfloat16, got {features.dtype}")
    n, dim = check_features(features, ids, "features")
    m = check_queries(u, dim)
    check_k(k, n)
    u = u.float()
    hi, _ = split_query(u)
    approx = features.double() @ hi.double().T  # [n, m]
    err = score_error_bound(features, u)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    candidates = torch.zeros(m, dtype=torch.int64)
    for tail in ("top", "bottom"):
        if tails not in (tail, "both"):
            continue
        sign = 1.0 if tail == "top" else -1.0
        lo, hi_b = sign * approx - err, sign * approx + err
        kth = lo.topk(k, dim=0).values[-1]  # [m]: k rows score at least this
        vals, idx = [], []
        for q in range(m):
            rows = torch.nonzero(hi_b[:, q] >= kth[q]).squeeze(1)
            candidates[q] += rows.numel()
            s = fma_chain_scores(features[rows], u[q].expand(rows.numel(), dim))
            keep = ~torch.isnan(s)
            rows, s = rows[keep], s[keep]
            cid = ids[rows].to(torch.int64)
            order = torch.argsort(cid, stable=True)  # ties: smaller id first
            cid, s = cid[order], s[order]
            best = torch.sort(sign * s, descending=True, stable=True).indices[:k]
            pad = k - best.numel()  # fewer than k finite scores: NaN / -1, as the engines
            vals.append(torch.cat([s[best], s.new_full((pad,), math.nan)]))
            idx.append(torch.cat([cid[best], cid.new_full((pad,), -1)]))
        out[tail] = (torch.stack(vals), torch.stack(idx))
    return TopK.from_tails(out, tails), candidates


__all__ = ["fma_chain_scores", "score_error_bound", "split_query", "topk_bf16_reference"]
