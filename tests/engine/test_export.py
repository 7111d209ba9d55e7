"""Full-score export (ctrak_fast.engine.export): exact against the engine and the float64 reference,
streamed in blocks across uneven shards, atomic on failure."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FakeStore
from safetensors import safe_open
from safetensors.torch import load_file

from ctrak_fast.engine import native as _native
from ctrak_fast.engine.export import export_scores
from ctrak_fast.engine.search import fp32_error_bound, topk
from ctrak_fast.engine.store import FeatureStore

C = _native.load()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_data(n, dim, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=g).to(dtype)
    ids = torch.randperm(5 * n, generator=g)[:n] + 10**9
    return feats, ids, torch.randn(m, dim, generator=g)


def engine_scores(feats, u):
    f = feats.contiguous()
    arr = f.view(torch.int16).numpy() if f.dtype == torch.bfloat16 else f.numpy()
    return torch.from_numpy(C.score_cpu(arr, u.float().contiguous().numpy()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_export_is_the_engine_scores(tmp_path, dtype):
    feats, ids, u = make_data(2345, 40, 6, dtype)
    store = FeatureStore.create(tmp_path / "store", k=40, dtype=str(dtype)[6:], shard_rows=700)
    with store.writer() as w:
        w.append(feats, ids)  # shards of 700, 700, 700, 245 rows
    store = FeatureStore.open(tmp_path / "store")
    sel = [4, 0, 4]
    # Blocks of 256 rows: every shard ends with a partial block.
    path = export_scores(
        store, u, tmp_path / "s.safetensors", queries=sel, buffer_bytes=3 * 4 * 256
    )
    got = load_file(path)
    assert torch.equal(got["ids"], ids)
    assert got["scores"].shape == (3, 2345) and got["scores"].dtype == torch.float32
    assert torch.equal(got["scores"], engine_scores(feats, u[sel]))
    exact = (feats.double() @ u[sel].double().T).T
    bound = fp32_error_bound(feats, u[sel])[:, None]
    assert ((got["scores"].double() - exact).abs() <= bound).all()
    # The values topk returns are these very bits.
    res = topk(store, u, 50)
    pos = {int(i): r for r, i in enumerate(ids)}
    cols = torch.tensor([[pos[int(i)] for i in row] for row in res.top_ids[sel]])
    assert torch.equal(got["scores"].gather(1, cols), res.top_values[sel])
    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["ctrak"])
    assert info["queries"] == sel and info["n_rows"] == 2345 and info["engine"] == "cpu"
    assert not (tmp_path / "s.safetensors.tmp").exists()


@pytest.mark.parametrize("sizes", [[1, 1000, 7, 2992, 1], [4001]], ids=str)
def test_blocking_does_not_change_the_bytes(tmp_path, sizes):
    feats, ids, u = make_data(4001, 24, 3, torch.float16)
    store = FakeStore(feats, ids, sizes)
    a = export_scores(store, u, tmp_path / "a.safetensors", buffer_bytes=3 * 4 * 97)
    b = export_scores((feats, ids), u, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(load_file(a)["scores"], engine_scores(feats, u))


def test_reference_backend_within_bound(tmp_path):
    feats, ids, u = make_data(500, 16, 2, torch.bfloat16)
    path = export_scores((feats, ids), u, tmp_path / "r.safetensors", backend="reference")
    got = load_file(path)["scores"].double()
    exact = (feats.double() @ u.double().T).T
    assert (got - exact).abs().max() <= 2.0**-24 * exact.abs().max()


def test_failure_leaves_previous_file_and_no_temporary(tmp_path):
    feats, ids, u = make_data(300, 8, 2, torch.float32)
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"previous")

    class Failing(FakeStore):
        def iter_shards(self):
            yield self._parts[0]
            raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        export_scores(Failing(feats, ids, [100, 200]), u, path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_source_shorter_than_announced(tmp_path):
    feats, ids, u = make_data(300, 8, 2, torch.float32)
    store = FakeStore(feats, ids, [100, 200])
    store.n_rows = 301
    with pytest.raises(ValueError, match="yielded 300 rows, expected 301"):
        export_scores(store, u, tmp_path / "s.safetensors")
    assert not any(tmp_path.iterdir())


def test_argument_errors(tmp_path):
    feats, ids, u = make_data(50, 8, 3, torch.float32)
    out = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="out of range"):
        export_scores((feats, ids), u, out, queries=[0, 3])
    with pytest.raises(ValueError, match="selects no query"):
        export_scores((feats, ids), u, out, queries=[])
    with pytest.raises(ValueError, match="does not match"):
        export_scores((feats, ids), torch.randn(2, 9), out)
    with pytest.raises(ValueError, match="backend"):
        export_scores((feats, ids), u, out, backend="cuda")
    with pytest.raises(TypeError, match="row count"):
        export_scores(type("S", (), {"iter_shards": lambda self: iter(())})(), u, out)
    assert not out.exists()


def test_score_cpu_binding_checks():
    f = torch.randn(10, 8).numpy()
    q = torch.randn(2, 8).numpy()
    with pytest.raises(ValueError, match=r"features must be \[n, 8\]"):
        C.score_cpu(torch.randn(10, 9).numpy(), q)
    with pytest.raises(ValueError, match=r"out must be \[2, 10\]"):
        C.score_cpu(f, q, out=torch.empty(2, 11).numpy())
    with pytest.raises(TypeError, match="out must be float32"):
        C.score_cpu(f, q, out=torch.empty(2, 10, dtype=torch.float64).numpy())
    with pytest.raises(ValueError, match="rows must be contiguous"):
        C.score_cpu(f, q, out=torch.empty(10, 2).numpy().T)
    wide = torch.full((2, 30), float("nan")).numpy()
    C.score_cpu(f, q, out=wide[:, 5:15])
    assert torch.isnan(torch.from_numpy(wide[:, :5])).all()
    assert torch.isnan(torch.from_numpy(wide[:, 15:])).all()
    assert torch.equal(torch.from_numpy(wide[:, 5:15].copy()), torch.from_numpy(C.score_cpu(f, q)))
