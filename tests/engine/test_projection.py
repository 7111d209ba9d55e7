"""Projection: the sign pattern is the hash, and results do not depend on how they were computed."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ctrak_fast.engine import projector
from ctrak_fast.engine.native import native_available
from ctrak_fast.engine.projection import ProjectionSpec, default_tile_rows, dense_matrix
from ctrak_fast.engine.projector import Projector
from ctrak_fast.kernels import hashing

BACKENDS = ["reference"] + (["cpu"] if native_available() else [])
M32 = 0xFFFFFFFF


def _mix(x: int) -> int:
    # lowbias32, written out independently of hashing.py from its docstring.
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _entry(seed: int, i: int, j: int, k: int) -> float:
    seed_key = _mix((seed & M32) ^ 0x9E3779B9)
    row_key = _mix(_mix((i & M32) ^ seed_key) ^ (i >> 32))
    neg = _mix(row_key ^ ((j * 0x85EBCA6B) & M32)) >> 31
    return (-1.0 if neg else 1.0) / math.sqrt(k)


def _oracle(seed: int, row_start: int, n_rows: int, k: int) -> torch.Tensor:
    vals = [[_entry(seed, row_start + i, j, k) for j in range(k)] for i in range(n_rows)]
    return torch.tensor(vals, dtype=torch.float32)


def _random_blocks(x: torch.Tensor, rng: random.Random, keep: float = 1.0):
    """Split x's columns at random points, drop some pieces (keep < 1) and shuffle them."""
    p = x.shape[1]
    cuts = sorted(rng.sample(range(1, p), rng.randint(1, 12)))
    bounds = list(zip([0, *cuts], [*cuts, p], strict=True))
    blocks = [(a, x[:, a:b]) for a, b in bounds if rng.random() < keep]
    rng.shuffle(blocks)
    return blocks or [(0, x[:, :1])]


# ---- spec -----------------------------------------------------------------------------------


def test_spec_round_trip():
    spec = ProjectionSpec(k=512, seed=7)
    assert spec.to_dict() == {"kind": "rademacher", "k": 512, "seed": 7, "hash_version": 1}
    assert ProjectionSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"kind": "gaussian", "k": 8, "seed": 0, "hash_version": 1}, "unknown projection kind"),
        ({"kind": "rademacher", "k": 8, "seed": 0, "hash_version": 2}, "newer"),
        ({"kind": "rademacher", "k": 8, "seed": 0, "hash_version": 0}, "unknown"),
        ({"kind": "rademacher", "k": 8, "seed": 0, "hash_version": 1, "x": 1}, "unknown.*field"),
        ({"k": 0}, "positive"),
        ({"k": 8, "seed": -1}, "seed"),
        ({"k": 8, "seed": 2**32}, "seed"),
    ],
    ids=["kind", "newer-hash", "old-hash", "extra-field", "k0", "seed-neg", "seed-big"],
)
def test_spec_refuses(d, match):
    with pytest.raises(ValueError, match=match):
        ProjectionSpec.from_dict(d)


# ---- the matrix -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_signs_match_hash_definition(backend):
    spec = ProjectionSpec(k=19, seed=12345)
    want = _oracle(spec.seed, 0, 37, spec.k)
    assert torch.equal(dense_matrix(spec, 37), want)
    proj = Projector(spec, 37, backend=backend, tile_rows=8)
    assert torch.equal(proj.rows(0, 37), want)
    # Projecting the identity returns the rows of P exactly (one nonzero term per sum).
    assert torch.equal(proj.project(torch.eye(37)), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k1(backend):
    spec = ProjectionSpec(k=1, seed=3)
    x = torch.randn(4, 50)
    got = Projector(spec, 50, backend=backend, tile_rows=16).project(x)
    assert got.shape == (4, 1)
    torch.testing.assert_close(got, x @ _oracle(3, 0, 50, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_beyond_2_pow_32(backend):
    spec = ProjectionSpec(k=16, seed=9)
    start = 2**32 + 5
    proj = Projector(spec, dim=2**33, backend=backend, tile_rows=8)
    want = _oracle(spec.seed, start, 11, spec.k)
    assert torch.equal(proj.rows(start, 11), want)
    assert torch.equal(hashing.rademacher_block(spec.seed, start, 11, spec.k), want)
    # The high word matters: row 2**32 + 5 is not row 5.
    assert not torch.equal(want, _oracle(spec.seed, 5, 11, spec.k))
    x = torch.randn(3, 11)
    torch.testing.assert_close(proj.project_blocks([(start, x)]), x @ want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signs_independent_of_thread_count(backend):
    proj = Projector(ProjectionSpec(k=64, seed=1), 10_000, backend=backend, cache_bytes=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = proj.rows(1000, 5000)
        torch.set_num_threads(2)
        two = proj.rows(1000, 5000)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_cpu_backend_matches_reference_or_says_why_not():
    spec = ProjectionSpec(k=257, seed=2**32 - 1)
    if not native_available():
        with pytest.raises(RuntimeError, match="ctrak_fast._C"):
            Projector(spec, 100, backend="cpu")
        return
    ref = Projector(spec, 3 * 2**32, backend="reference")
    cpu = Projector(spec, 3 * 2**32, backend="cpu")
    for start, n in [(0, 1), (17, 300), (2**32 - 3, 9), (2**33 + 1, 64)]:
        assert torch.equal(cpu.rows(start, n), ref.rows(start, n)), (start, n)


# ---- invariances of the projection ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_bytes", [0, 2**20, 2**30], ids=["nocache", "partial", "full"])
def test_blocks_any_order_and_chunking(backend, cache_bytes):
    spec = ProjectionSpec(k=24, seed=4)
    p = 301
    proj = Projector(spec, p, backend=backend, cache_bytes=cache_bytes, tile_rows=64)
    x = torch.randn(5, p)
    full = proj.project(x)
    torch.testing.assert_close(full, x @ dense_matrix(spec, p), rtol=1e-5, atol=1e-5)
    rng = random.Random(0)
    for trial in range(6):
        blocks = _random_blocks(x, rng)
        # Same covered rows -> the same arithmetic -> bitwise equal (see the module docstring).
        assert torch.equal(proj.project_blocks(blocks), full), trial
    for trial in range(6):
        subset = _random_blocks(x, rng, keep=0.5)
        zero_filled = torch.zeros_like(x)
        for off, b in subset:
            zero_filled[:, off : off + b.shape[1]] = b
        assert torch.equal(proj.project_blocks(subset), proj.project(zero_filled)), trial
        # ...and a different chunking of the same subset gives the same bits.
        rechunked = [
            (off + a, b[:, a:c])
            for off, b in subset
            for a, c in [(0, b.shape[1] // 2), (b.shape[1] // 2, b.shape[1])]
        ]
        assert torch.equal(proj.project_blocks(rechunked[::-1]), proj.project(zero_filled))


def test_cache_holds_tiles_and_does_not_change_results():
    spec = ProjectionSpec(k=32, seed=2)
    x = torch.randn(3, 1000)
    tile_bytes = 128 * 32 * 4
    results = []
    for budget, want_cached in [(0, 0), (3 * tile_bytes, 3 * tile_bytes), (2**30, 1000 * 32 * 4)]:
        proj = Projector(spec, 1000, backend="reference", cache_bytes=budget, tile_rows=128)
        first = proj.project(x)
        assert proj.cached_bytes == want_cached
        assert torch.equal(proj.project(x), first)
        results.append(first)
    assert all(torch.equal(r, results[0]) for r in results)


# ---- the fused C++ kernel (csrc/project_impl.h) --------------------------------------------

needs_native = pytest.mark.skipif(not native_available(), reason="ctrak_fast._C not built")


def _isas():
    if not native_available():
        return []
    from ctrak_fast.engine import native as _native

    return _native.load().cpu_isas()


@needs_native
@pytest.mark.parametrize("isa", _isas() or ["none"])
@pytest.mark.parametrize(
    "batch,n,k,start",
    [(1, 1, 1, 0), (3, 37, 5, 11), (7, 300, 65, 2**33 - 5), (13, 1000, 130, 7), (2, 70, 2048, 3)],
)
def test_fused_kernel_matches_the_oracle(isa, batch, n, k, start):
    from ctrak_fast.engine import native as _native

    # Odd sizes: batch rows past the micro-tile, columns past the panel, rows past the panel.
    x = torch.randn(batch, n)
    want = x.double() @ hashing.rademacher_block(5, start, n, k).double()
    out = torch.zeros(batch, k)
    _native.load().rademacher_project(5, start, x.numpy(), k, out.numpy(), isa=isa)
    # float32 fma chain of n terms of size |x|/sqrt(k): error ~ n * 2**-24 * |x| / sqrt(k).
    atol = n * 6e-8 * 4 / math.sqrt(k)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)
    again = torch.ones(batch, k)  # it accumulates into out
    _native.load().rademacher_project(5, start, x.numpy(), k, again.numpy(), isa=isa)
    torch.testing.assert_close(again - 1, out, rtol=0, atol=2 * atol + 1e-6)


@needs_native
def test_fused_kernel_bits_do_not_depend_on_threads_batch_or_row_stride():
    from ctrak_fast.engine import native as _native

    C = _native.load()
    x = torch.randn(11, 5000)
    outs = []
    for threads in (1, 2, 3):
        out = torch.zeros(11, 300)
        C.rademacher_project(1, 40, x.numpy(), 300, out.numpy(), num_threads=threads)
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs)
    for lo, hi in [(0, 1), (3, 9)]:  # other rows of the batch do not matter, nor the row stride
        out = torch.zeros(hi - lo, 300)
        C.rademacher_project(1, 40, x[lo:hi].numpy(), 300, out.numpy())
        assert torch.equal(out, outs[0][lo:hi])
    wide = torch.zeros(11, 7000)
    wide[:, 1000:6000] = x
    out = torch.zeros(11, 300)
    C.rademacher_project(1, 40, wide[:, 1000:6000].numpy(), 300, out.numpy())
    assert torch.equal(out, outs[0])


@needs_native
def test_fused_kernel_refuses_bad_arguments():
    import numpy as np

    from ctrak_fast.engine import native as _native

    C = _native.load()
    x = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match="out must be \\[2, 4\\]"):
        C.rademacher_project(0, 0, x, 4, np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="x must be float32"):
        C.rademacher_project(0, 0, x.astype(np.float64), 4, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        C.rademacher_project(0, 0, np.zeros((10, 2), np.float32).T, 4, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="row_start"):
        C.rademacher_project(0, -1, x, 4, np.zeros((2, 4), np.float32))


@needs_native
def test_cpu_blocks_across_the_summation_grid_give_the_same_bits():
    from ctrak_fast.engine import native as _native

    grid = _native.load().PROJECT_GRID_ROWS
    p, start = 2 * grid + 777, 50  # blocks from row 50: grid chunks straddle block edges
    spec = ProjectionSpec(k=40, seed=3)
    proj = Projector(spec, start + p, backend="cpu")
    x = torch.randn(3, p)
    full = proj.project_blocks([(start, x)])
    want = x.double() @ dense_matrix(spec, start + p)[start:].double()
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-4)
    rng = random.Random(1)
    edge = grid - start  # a cut exactly on the grid, and cuts one row either side
    fixed = [
        [(0, x[:, :edge]), (edge, x[:, edge:])],
        [(0, x[:, : edge + 1]), (edge + 1, x[:, edge + 1 :])],
    ]
    for trial, blocks in enumerate(fixed + [_random_blocks(x, rng) for _ in range(8)]):
        shifted = [(start + off, b) for off, b in blocks]
        assert torch.equal(proj.project_blocks(shifted), full), trial


@needs_native
def test_cpu_backend_stores_no_signs():
    proj = Projector(ProjectionSpec(k=32, seed=2), 1000, backend="cpu")
    x = torch.randn(3, 1000)
    torch.testing.assert_close(proj.project(x), x @ dense_matrix(proj.spec, 1000))
    assert proj.cached_bytes == 0


def test_reference_rows_are_made_in_bounded_chunks(monkeypatch):
    monkeypatch.setattr(projector, "REF_CHUNK", 64)  # 4 rows per hash call at k = 16
    proj = Projector(ProjectionSpec(k=16, seed=6), 100, backend="reference")
    assert torch.equal(proj.rows(3, 37), _oracle(6, 3, 37, 16))


def test_default_tile_rows_bound_the_tile_bytes():
    assert default_tile_rows(2048) == 8192  # 64 MB
    assert default_tile_rows(32768) == 512
    assert default_tile_rows(3000) == 4096  # a power of two below 2**26 / (4 k)
    assert default_tile_rows(1) == 65536 and default_tile_rows(2**24) == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_does_not_change_rows(backend):
    spec = ProjectionSpec(k=40, seed=8)
    proj = Projector(spec, 500, backend=backend, tile_rows=128)
    x = torch.randn(16, 500)
    full = proj.project(x)
    for lo, hi in [(0, 1), (3, 8), (8, 16)]:
        if backend == "cpu":  # one fma chain per output: the other rows cannot matter
            assert torch.equal(proj.project(x[lo:hi]), full[lo:hi])
        # BLAS may pick another kernel for another batch size: float32 rounding, not bits.
        torch.testing.assert_close(proj.project(x[lo:hi]), full[lo:hi], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_is_cast_to_float32(dtype):
    proj = Projector(ProjectionSpec(k=16, seed=0), 200, backend="reference", tile_rows=64)
    x = torch.randn(4, 200).to(dtype)
    got = proj.project(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, proj.project(x.float()))


def test_non_contiguous_input():
    proj = Projector(ProjectionSpec(k=16, seed=0), 100, backend="reference", tile_rows=32)
    x = torch.randn(100, 4).T
    assert torch.equal(proj.project(x), proj.project(x.contiguous()))


def test_johnson_lindenstrauss_inner_products():
    # For a Rademacher P, <Px, Py> is unbiased for <x, y> with
    # Var = (|x|^2 |y|^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / k <= (|x|^2 |y|^2 + <x, y>^2) / k.
    k, p, pairs = 256, 3000, 40
    proj = Projector(ProjectionSpec(k=k, seed=11), p, backend="reference")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(pairs, p, generator=g, dtype=torch.float64)
    y = 0.6 * x + torch.randn(pairs, p, generator=g, dtype=torch.float64)
    px, py = proj.project(x).double(), proj.project(y).double()
    exact = (x * y).sum(1)
    sd = ((x.square().sum(1) * y.square().sum(1) + exact.square()) / k).sqrt()
    z = ((px * py).sum(1) - exact) / sd
    assert z.abs().max() < 4.5, z
    assert abs(z.mean()) < 4 / math.sqrt(pairs), z.mean()  # no bias
    assert 0.3 < z.std() < 1.5, z.std()  # the stated variance is the right scale


# ---- errors ---------------------------------------------------------------------------------


def test_bad_blocks_are_refused():
    proj = Projector(ProjectionSpec(k=4), 10, backend="reference")
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="overlap"):
        proj.project_blocks([(0, x), (3, x)])
    with pytest.raises(ValueError, match="exceed"):
        proj.project_blocks([(8, x)])
    with pytest.raises(ValueError, match="batch"):
        proj.project_blocks([(0, x), (4, torch.randn(3, 2))])
    with pytest.raises(ValueError, match="at least one"):
        proj.project_blocks([])
    with pytest.raises(TypeError, match="floating"):
        proj.project_blocks([(0, torch.ones(2, 4, dtype=torch.int64))])
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        proj.project(torch.randn(2, 9))
    with pytest.raises(ValueError, match="backend"):
        Projector(ProjectionSpec(k=4), 10, backend="gpu")


@pytest.mark.cuda
def test_cuda_inputs_match_the_reference():
    spec = ProjectionSpec(k=200, seed=5)
    x = torch.randn(6, 10_000)
    want = Projector(spec, 10_000, backend="reference").project(x)
    blocks = [(3000, x[:, 3000:].cuda()), (0, x[:, :3000].cuda().half().float())]
    want_blocks = Projector(spec, 10_000, backend="reference").project(
        torch.cat([x[:, :3000].half().float(), x[:, 3000:]], 1)
    )
    # "auto" runs the Triton kernel on CUDA tensors; "reference" moves generated tiles there.
    for backend in ("auto", "reference"):
        proj = Projector(spec, 10_000, backend=backend)
        got = proj.project(x.cuda())
        assert got.is_cuda and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            proj.project_blocks(blocks).cpu(), want_blocks, rtol=1e-4, atol=1e-4
        )
