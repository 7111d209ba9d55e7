"""Top-k search: the native engines against the float64 reference (ctrak_fast.engine.search).

Policy (see the search module docstring): returned values equal the exact scores of the
returned ids within fp32_error_bound; the j-th returned exact score is within twice the bound of
the reference's j-th; ids equal the reference's except among scores tied within twice the bound,
and exactly where scores are exactly representable (integer data) or rows are duplicated.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from helpers import FakeStore, check, make_data, write_store

from ctrak_fast.engine import native as _native
from ctrak_fast.engine.search import topk, topk_reference
from ctrak_fast.engine.search_inputs import TopK
from ctrak_fast.engine.store import FeatureStore, StoreError, iter_store_shards

C = _native.load()
ISAS = C.cpu_isas()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def native_topk(feats, ids, u, k, tails="both", isa="auto", num_threads=0) -> TopK:
    """CPU engine through the binding directly, to pin the ISA variant."""
    q = u.float().contiguous().numpy()
    f = feats.contiguous()
    arr = f.view(torch.int16).numpy() if f.dtype == torch.bfloat16 else f.numpy()
    tv, ti, bv, bi = C.topk_cpu(arr, q, k, tails, ids=ids.numpy(), num_threads=num_threads, isa=isa)
    out = [None if a is None else torch.from_numpy(a) for a in (tv, ti, bv, bi)]
    return TopK(*out, tails)


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 2048, 3001])
def test_cpu_matches_reference(isa, dtype, k):
    # n, dim and m are multiples of no block size (rows 48, lanes 4/8/16, query blocks 8..64);
    # fewer queries at large k keep the float64 oracle quick.
    feats, ids, u = make_data(3001, 37, 70 if k <= 7 else 21, dtype)
    check(native_topk(feats, ids, u, k, isa=isa), feats, ids, u, k, exact_ids=k <= 7)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["duplicates", "integers"])
def test_ties_prefer_smaller_id(isa, kind):
    feats, ids, u = make_data(2000, 24, 9, torch.float16, kind)
    for k in (1, 50, 777):
        check(native_topk(feats, ids, u, k, isa=isa), feats, ids, u, k, exact_ids=True)


@pytest.mark.parametrize("m", [1, 16, 17, 64, 130])
def test_query_counts(m):
    feats, ids, u = make_data(1500, 64, m, torch.float16)
    check(topk((feats, ids), u, 10), feats, ids, u, 10, exact_ids=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "integers"])
def test_k_ten_thousand(dtype, kind):
    feats, ids, u = make_data(12007, 40, 3, dtype, kind)
    res = topk(FakeStore(feats, ids, [5000, 7, 7000]), u, 10_000)
    check(res, feats, ids, u, 10_000, exact_ids=kind == "integers")


@pytest.mark.parametrize("tails", ["top", "bottom"])
def test_single_tail(tails):
    feats, ids, u = make_data(999, 33, 5, torch.bfloat16)
    res = topk((feats, ids), u, 12, tails=tails)
    assert res.tails == tails
    check(res, feats, ids, u, 12, tails=tails, exact_ids=True)


def test_large_dim_uses_k_blocks():
    # dim above every ISA's k block (128..512 floats): partial sums round-trip through memory.
    feats, ids, u = make_data(700, 1100, 67, torch.float16)
    check(topk((feats, ids), u, 9), feats, ids, u, 9, exact_ids=True)


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1, 1000, 7, 2992, 1], [4001], [1] * 5 + [3996]], ids=str)
def test_store_streaming_matches_one_shot(sizes):
    feats, ids, u = make_data(4001, 48, 11, torch.float16)
    store = FakeStore(feats, ids, sizes)
    res = topk(store, u, 100, progress=True)
    check(res, feats, ids, u, 100, exact_ids=True)
    one = topk((feats, ids), u, 100)
    for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
        assert torch.equal(getattr(res, name), getattr(one, name)), name


def test_running_state_base_ids_and_threads():
    feats, ids, u = make_data(2500, 32, 6, torch.float32)
    q = u.numpy()
    results = []
    for threads in (1, 2):
        state = C.TopKState(q, 40, "both", num_threads=threads)
        for lo, hi in ((0, 1), (1, 1200), (1200, 2500)):
            state.add(feats[lo:hi].numpy(), base_id=lo)  # ids = row index
        assert state.rows_seen == 2500
        results.append(state.result())
    for a, b in zip(*results, strict=True):
        assert (a == b).all()
    res = TopK(*(torch.from_numpy(a) for a in results[0]), "both")
    check(res, feats, torch.arange(2500), u, 40, exact_ids=True)


def test_single_row():
    feats, ids, u = make_data(1, 8, 3, torch.float16)
    res = topk(FakeStore(feats, ids, [1]), u, 1)
    check(res, feats, ids, u, 1, exact_ids=True)


def test_nan_scores_never_selected():
    feats, ids, u = make_data(300, 16, 2, torch.float32)
    feats[5] = float("nan")
    res = topk((feats, ids), u, 10)
    assert ids[5] not in res.top_ids and ids[5] not in res.bottom_ids


def test_reference_backend_streams_like_reference():
    feats, ids, u = make_data(900, 20, 4, torch.bfloat16)
    res = topk(FakeStore(feats, ids, [100, 1, 799]), u, 30, backend="reference")
    ref = topk_reference(feats, ids, u, 30)
    for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
        assert torch.equal(getattr(res, name), getattr(ref, name)), name


def test_features_tensor_source_uses_row_ids():
    feats, _, u = make_data(200, 16, 2, torch.float32)
    res = topk(feats, u, 5, tails="top")
    ref = topk_reference(feats, torch.arange(200), u, 5, "top")
    assert torch.equal(res.top_ids, ref.top_ids)


# --- the engine's thread pool -------------------------------------------------------------------


def test_thread_pool_concurrent_callers_and_fork():
    # Large enough for the pool (rows * dim * padded queries >= 2**24 fma).
    feats, ids, u = make_data(20000, 64, 16, torch.float16)
    want = native_topk(feats, ids, u, 30, num_threads=1)
    got = {}

    def call(i):
        got[i] = native_topk(feats, ids, u, 30, num_threads=2)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in got.values():
        assert torch.equal(res.top_ids, want.top_ids) and torch.equal(
            res.bottom_ids, want.bottom_ids
        )
    # A forked child must not wait for the parent's workers (they do not exist in it).
    pid = os.fork()
    if pid == 0:
        try:
            res = native_topk(feats, ids, u, 30, num_threads=2)
            os._exit(0 if torch.equal(res.top_ids, want.top_ids) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the thread pool")
    assert os.waitstatus_to_exitcode(done[1]) == 0


# --- FeatureStore: memory-mapped shards, read-ahead, verification ------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_search_readahead_and_verify_modes(tmp_path, dtype):
    feats, ids, u = make_data(2345, 40, 6, dtype)
    store = FeatureStore.open(
        write_store(tmp_path / "s", feats, ids, 700).path
    )  # 700, 700, 700, 245 rows
    first = None
    for verify in ("ids", "full", "none"):
        for readahead in (True, False):
            res = topk(store, u, 50, verify=verify, readahead=readahead)
            check(res, feats, ids, u, 50)
            if first is None:
                first = res
            for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
                assert torch.equal(getattr(res, name), getattr(first, name)), name
    one = topk((feats, ids), u, 50)
    assert torch.equal(one.top_ids, first.top_ids) and torch.equal(one.top_values, first.top_values)


def test_iter_store_shards_maps_the_files(tmp_path):
    feats, ids, _ = make_data(1000, 16, 1, torch.bfloat16)
    store = FeatureStore.open(write_store(tmp_path / "s", feats, ids, 300).path)
    got = list(iter_store_shards(store, shards=[3, 0, 2]))
    assert [f.shape[0] for f, _ in got] == [100, 300, 300]
    assert torch.equal(got[1][0], feats[:300]) and torch.equal(got[0][1], ids[900:])
    assert got[0][0].dtype == torch.bfloat16 and got[0][1].dtype == torch.int64
    with pytest.raises(ValueError, match="verify"):
        next(iter_store_shards(store, verify="sha1"))


def _flip(path, offset_from_end):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_corrupt_shards_are_named(tmp_path):
    feats, ids, u = make_data(900, 16, 2, torch.float16)
    store = FeatureStore.open(write_store(tmp_path / "s", feats, ids, 300).path)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    # The last bytes of a shard are feature bytes (ids come first in the data section).
    _flip(shard, 3)
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: sha256 mismatch"):
        topk(store, u, 5, verify="full")
    for readahead in (True, False):  # the default check: block CRC-32C of every byte
        with pytest.raises(StoreError, match=r"shard-00001\.safetensors: crc32c mismatch"):
            topk(store, u, 5, readahead=readahead)
    topk(store, u, 5, verify="ids")  # by design: "ids" leaves feature bytes to store verify
    header = int.from_bytes(shard.read_bytes()[:8], "little")
    data = bytearray(shard.read_bytes())
    data[8 + header + 5] ^= 0x01  # an id byte
    shard.write_bytes(bytes(data))
    for readahead in (True, False):
        with pytest.raises(StoreError, match=r"shard-00001\.safetensors: sha256 of the ids"):
            topk(store, u, 5, readahead=readahead, verify="ids")
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(StoreError, match=r"bytes, manifest says"):
        topk(store, u, 5, verify="none")


def test_mapped_file(tmp_path):
    path = tmp_path / "f.bin"
    payload = bytes(range(256)) * 1000
    path.write_bytes(payload)
    for populate in (False, True):
        mf = C.MappedFile(str(path), populate=populate)
        view = np.frombuffer(mf, dtype=np.uint8)
        assert mf.size == len(payload) and view.tobytes() == payload
        assert not view.flags.writeable
        mf.will_need(1000, 5000)
        del mf  # the view keeps the mapping alive
        assert hashlib.sha256(view).hexdigest() == hashlib.sha256(payload).hexdigest()
    with pytest.raises(FileNotFoundError, match="cannot open"):
        C.MappedFile(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="offset and length"):
        C.MappedFile(str(path)).will_need(-1, 5)


# --- errors ------------------------------------------------------------------------------------


def test_argument_errors():
    feats, ids, u = make_data(50, 8, 2, torch.float16)
    src = (feats, ids)
    with pytest.raises(ValueError, match="empty query batch"):
        topk(src, u[:0], 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk(src, u, 0)
    with pytest.raises(ValueError, match="larger than the number of feature rows"):
        topk(src, u, 51)
    with pytest.raises(ValueError, match="larger than the number of feature rows"):
        topk(FakeStore(feats, ids, [20, 30]), u, 51)
    with pytest.raises(ValueError, match="does not match"):
        topk(src, torch.randn(2, 9), 3)
    with pytest.raises(ValueError, match="tails"):
        topk(src, u, 3, tails="middle")
    with pytest.raises(ValueError, match="backend"):
        topk(src, u, 3, backend="gpu")
    with pytest.raises(ValueError, match=r"u must be \[m, dim\]"):
        topk(src, u[0], 3)
    with pytest.raises(ValueError, match="ids must be"):
        topk((feats, ids[:-1]), u, 3)
    with pytest.raises(TypeError, match="int64"):
        topk((feats, ids.int()), u, 3)
    with pytest.raises(TypeError, match="source"):
        topk("features.safetensors", u, 3)
    with pytest.raises(ValueError, match="empty query batch"):
        topk_reference(feats, ids, u[:0], 3)


def test_binding_argument_checks():
    q = torch.randn(2, 8).numpy()
    state = C.TopKState(q, 3)
    with pytest.raises(TypeError, match="float32, float16 or uint16"):
        state.add(torch.zeros(4, 8, dtype=torch.int32).numpy())
    with pytest.raises(ValueError, match=r"features must be \[n, 8\]"):
        state.add(torch.zeros(4, 9).numpy())
    with pytest.raises(ValueError, match="C-contiguous"):
        state.add(torch.zeros(8, 4).numpy().T)
    with pytest.raises(ValueError, match=r"ids must be \[4\]"):
        state.add(torch.zeros(4, 8).numpy(), ids=torch.arange(3).numpy())
    with pytest.raises(TypeError, match="ids must be int64"):
        state.add(torch.zeros(4, 8).numpy(), ids=torch.arange(4).int().numpy())
    with pytest.raises(ValueError, match="tails"):
        C.TopKState(q, 3, "sideways")
    with pytest.raises(ValueError, match="k_top"):
        C.TopKState(q, 0)
    with pytest.raises(ValueError, match=r"queries must be \[m >= 1"):
        C.TopKState(q[:0], 3)
    with pytest.raises(ValueError, match="not available"):
        C.TopKState(q, 3, isa="avx1024")
    state.add(torch.zeros(2, 8).numpy())
    with pytest.raises(ValueError, match="exceeds the 2 rows"):
        state.result()


# --- CUDA engine (runs where a GPU is present) -------------------------------------------------


def cuda_engine_or_fail():
    if not _native.has_cuda():
        pytest.fail("a CUDA device is present but ctrak_fast._C was built without CUDA")


@pytest.fixture(params=["mma", "simt"])
def cuda_engine(request, monkeypatch):
    """Runs the test once per CUDA score kernel ($CTRAK_CUDA_ENGINE, read at construction)."""
    cuda_engine_or_fail()
    monkeypatch.setenv("CTRAK_CUDA_ENGINE", request.param)
    return request.param


def cuda_kernel(u, dtype) -> str:
    """The score kernel a CUDA state for these queries runs on aligned features of dtype."""
    q = u.float().cuda().contiguous()
    state = C.CudaTopKState(q.data_ptr(), q.shape[0], q.shape[1], 1, "both", q.device.index, 0)
    return state.engine_for(str(dtype)[6:])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 2048, 3001])
def test_cuda_matches_reference(cuda_engine, dtype, k):
    feats, ids, u = make_data(3001, 40, 70, dtype)
    kernel = cuda_kernel(u, dtype)
    assert kernel == ("simt" if dtype == torch.float32 else cuda_engine)
    res = topk((feats.cuda(), ids.cuda()), u.cuda(), k)
    check(res, feats, ids, u, k, exact_ids=k <= 7, engine="mma" if kernel == "mma" else "fma")


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 32, 33, 130])
def test_cuda_mma_query_blocks_and_unaligned_dim(cuda_engine, m):
    # m <= 32 and m > 32 take the two query-block widths; dim 37 is not a multiple of 8, so the
    # mma engine falls back to simt for it.
    for dim in (37, 64):
        feats, ids, u = make_data(4099, dim, m, torch.bfloat16)
        res = topk((feats.cuda(), ids.cuda()), u.cuda(), 9)
        mma = cuda_engine == "mma" and dim % 8 == 0
        check(res, feats, ids, u, 9, exact_ids=True, engine="mma" if mma else "fma")


@pytest.mark.cuda
def test_cuda_mma_float16_query_scaling(cuda_engine):
    # Queries far from 1 in magnitude: the float16 parts are scaled per query by 2^s.
    feats, ids, u = make_data(3000, 48, 4, torch.float16)
    u = u * torch.tensor([[1e-30], [1e-3], [1e4], [3e30]])
    res = topk((feats.cuda(), ids.cuda()), u.cuda(), 20)
    check(res, feats, ids, u, 20, exact_ids=True, engine="mma" if cuda_engine == "mma" else "fma")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["duplicates", "integers"])
def test_cuda_ties_prefer_smaller_id(cuda_engine, kind):
    feats, ids, u = make_data(20000, 24, 9, torch.float16, kind)
    for k in (1, 50, 3000):
        res = topk((feats.cuda(), ids.cuda()), u.cuda(), k)
        check(res, feats, ids, u, k, exact_ids=True, engine="mma")


@pytest.mark.cuda
def test_cuda_k_ten_thousand_streamed(cuda_engine):
    feats, ids, u = make_data(300_007, 40, 3, torch.float16, "integers")
    store = FakeStore(feats, ids, [1, 150_000, 7, 149_999])
    res = topk(store, u.cuda(), 10_000)  # CPU shards, CUDA queries: add_host streams them
    check(res, feats, ids, u, 10_000, exact_ids=True, engine="mma")
    cpu = topk(store, u, 10_000)
    for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
        assert torch.equal(getattr(res, name), getattr(cpu, name)), name


@pytest.mark.cuda
def test_cuda_store_through_pinned_double_buffers(tmp_path):
    cuda_engine_or_fail()
    # 600k x 64 float16 rows = 77 MB in one shard: more than one 64 MiB staging chunk per
    # add_host call; integer data, so every score is exact and CPU == CUDA bit for bit.
    feats, ids, u = make_data(600_000, 64, 4, torch.float16, "integers")
    big = FeatureStore.open(write_store(tmp_path / "big", feats, ids, 600_000).path)
    for store in (big, FakeStore(feats, ids, [100_000] * 6)):
        res = topk(store, u.cuda(), 1000)
        cpu = topk(store, u, 1000)
        for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
            assert torch.equal(getattr(res, name), getattr(cpu, name)), name


@pytest.mark.cuda
@pytest.mark.parametrize("tails", ["top", "bottom"])
def test_cuda_single_tail_and_nan(cuda_engine, tails):
    feats, ids, u = make_data(5000, 64, 130, torch.bfloat16)
    feats[17] = float("nan")
    res = topk((feats.cuda(), ids.cuda()), u.cuda(), 25, tails=tails)
    assert ids[17] not in getattr(res, f"{tails}_ids")
    keep = torch.ones(5000, dtype=torch.bool)
    keep[17] = False
    bound = "mma" if cuda_engine == "mma" else "fma"
    check(res, feats[keep], ids[keep], u, 25, tails=tails, exact_ids=True, engine=bound)


def test_cuda_engine_argument_checked():
    if not _native.has_cuda():
        pytest.skip("ctrak_fast._C was built without the CUDA engine")
    with pytest.raises(ValueError, match="engine must be"):
        C.CudaTopKState(1, 1, 8, 1, "both", 0, 0, "tensor")
