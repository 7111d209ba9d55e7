"""The CPU top-k kernels' score contract (csrc/kernel_impl.h): every score is one float32 fma
chain over d = 0..dim-1, whatever the path (one query block decoding each micro-panel just before
use, or several blocks over a decoded tile), the k blocks, the tile, the prefetch and the threads.

The oracle is that chain computed in numpy, each fma rounded once: the exact product of two
float32 values fits a float64, the float64 sum is rounded to odd (TwoSum gives its error), and
rounding that to float32 is the correctly rounded fma (Boldo and Melquiond: 53 >= 24 + 2 bits).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import make_data

from ctrak_fast.engine import native as _native

C = _native.load()
ISAS = C.cpu_isas()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fma_chain(feats: np.ndarray, u: np.ndarray) -> np.ndarray:
    """[m, n] float32: acc = fma(feats[i, d], u[q, d], acc) for d = 0..dim-1, from acc = +0.
    feats [n, dim] and u [m, dim] float32."""
    f, q = feats.astype(np.float64), u.astype(np.float64)
    acc = np.zeros((u.shape[0], feats.shape[0]), np.float32)
    for d in range(feats.shape[1]):
        p = q[:, d, None] * f[None, :, d]  # exact
        a = acc.astype(np.float64)
        s = p + a
        bb = s - p
        err = (p - (s - bb)) + (a - bb)  # s + err == p + a exactly
        even = (s.view(np.int64) & 1) == 0
        odd = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
        acc = np.where((err != 0) & even, odd, s).astype(np.float32)
    return acc


def mul_add_chain(feats: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The same chain with the product rounded first (a target without fma instructions)."""
    acc = np.zeros((u.shape[0], feats.shape[0]), np.float32)
    for d in range(feats.shape[1]):
        acc = u[:, d, None] * feats[None, :, d] + acc
    return acc


@functools.cache
def case(dtype: torch.dtype, m: int, dim: int):
    """(engine input, its fma chain, its mul-add chain) of 500 rows: the oracle once per case."""
    feats, _, u = make_data(500, dim, m, dtype)
    f32, q = feats.float().numpy(), u.numpy()
    return engine_input(feats), q, fma_chain(f32, q), mul_add_chain(f32, q)


def engine_input(feats: torch.Tensor) -> np.ndarray:
    return feats.view(torch.int16).numpy() if feats.dtype == torch.bfloat16 else feats.numpy()


def test_oracle_rounds_each_fma_once():
    # The chain's first step gives -(1 + 2^-22) exactly; then (1 + 2^-23)^2 = 1 + 2^-22 + 2^-46:
    # a float32 product rounds the 2^-46 away (sum 0), one fma keeps it.
    x = np.array([[1.0, 1 + 2.0**-23]], np.float32)
    u = np.array([[-(1 + 2.0**-22), 1 + 2.0**-23]], np.float32)
    assert fma_chain(x, u)[0, 0] == np.float32(2.0**-46)
    assert mul_add_chain(x, u)[0, 0] == 0.0


# m: 16, 40, 64 take the one-block path (register tiles of 1, 3, 4 vectors); 65 and 150 the
# decoded-tile path with a partial last block. dim: 1, one partial k block (37), exactly one
# (128), two and a partial one (300). 500 rows: several tiles, the last partial.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "dim"), [(16, 300), (40, 37), (64, 128), (65, 1), (150, 300)])
def test_dense_scores_are_one_fma_chain(isa, dtype, m, dim):
    f, q, want, want_mul_add = case(dtype, m, dim)
    got = C.score_cpu(f, q, num_threads=2, isa=isa)
    if isa == "generic" and not np.array_equal(got, want):
        # plain C++: fma only where the compiler contracts a * b + c (not on baseline x86-64)
        want = want_mul_add
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [16, 100])
def test_selected_values_are_the_dense_bits_across_threads(isa, m):
    # Enough work for the thread pool (rows * dim * padded queries >= 2**24 fma) and for runs of
    # several tiles per task, so the next-tile prefetch and the task split are exercised.
    feats, _, u = make_data(40_000, 64, m, torch.float16)
    f, q = engine_input(feats), u.numpy()
    dense = C.score_cpu(f, q, num_threads=1, isa=isa)
    runs = [C.topk_cpu(f, q, 30, "both", num_threads=t, isa=isa) for t in (1, 2)]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    tv, ti, bv, bi = runs[0]
    np.testing.assert_array_equal(tv, np.take_along_axis(dense, ti, 1))
    np.testing.assert_array_equal(bv, np.take_along_axis(dense, bi, 1))
    order = np.argsort(-dense, axis=1, kind="stable")[:, :30]  # ties: smaller row first
    np.testing.assert_array_equal(ti, order)
