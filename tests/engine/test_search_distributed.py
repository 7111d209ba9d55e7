"""Distributed top-k (engine.search_distributed): two gloo ranks on CPU give the single-process
result bit for bit; the exact merge of top-k lists; the shard split; `ctrak attribute` under two
ranks. The two ranks run once per module (spawned processes) and save what they computed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import check, make_data, write_store
from safetensors.torch import save_file

from ctrak_fast.engine.dist import rank_shards
from ctrak_fast.engine.gram import gram
from ctrak_fast.engine.search import merge_topk, topk, topk_reference
from ctrak_fast.engine.search_inputs import TopK
from ctrak_fast.engine.store import FeatureStore

META = {"model": "m" * 64, "projection": {"kind": "rademacher", "k": 32, "seed": 0}}
# (store name, dtype, data kind, rows, shard_rows, queries, [(k, tails), ...])
STORES = {
    "uneven": ("float16", "random", 2345, 700, 5, [(1, "both"), (7, "both"), (2000, "both")]),
    "ties": ("bfloat16", "integers", 1700, 500, 4, [(300, "top"), (1700, "bottom")]),
    "one-shard": ("float32", "random", 400, 1000, 3, [(50, "both")]),
}


def _write_store(path, name):
    dtype, kind, n, shard_rows, m, _ = STORES[name]
    feats, ids, u = make_data(n, 32, m, getattr(torch, dtype), kind, seed=len(name))
    write_store(path, feats, ids, shard_rows, META, dtype=dtype)
    return u


def _worker(rank, world, root):
    from ctrak_fast import cli
    from ctrak_fast.engine.search_distributed import gram_distributed, topk_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rdzv", rank=rank, world_size=world)
    out = {}
    for name, (*_, cases) in STORES.items():
        store = FeatureStore.open(root / name)
        u = torch.load(root / f"{name}.u.pt")
        for k, tails in cases:
            res = topk_distributed(store, u, k, tails=tails, num_threads=1)
            out[(name, k, tails)] = res.__dict__
    out["gram"] = gram_distributed(FeatureStore.open(root / "uneven"))
    # Rank 1's shards include a corrupt one: both ranks raise, neither waits for the other.
    try:
        topk_distributed(FeatureStore.open(root / "corrupt"), torch.randn(2, 32), 5)
    except Exception as e:  # recorded for the test to check
        out["corrupt"] = (type(e).__name__, str(e))
    argv = ["attribute", "--store", str(root / "uneven"), "--query", str(root / "q.safetensors")]
    argv += ["--k", "20", "--out", str(root / f"cli-{rank}.json")]
    out["cli_rc"] = cli.main(argv)
    torch.save(out, root / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for name in STORES:
        torch.save(_write_store(root / name, name), root / f"{name}.u.pt")
    shutil.copytree(root / "uneven", root / "corrupt")
    shard = root / "corrupt" / "shard-00003.safetensors"  # rows 2100.. go to rank 1
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 3] ^= 0x01  # an id byte
    shard.write_bytes(bytes(data))
    q = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    save_file({"queries": q}, str(root / "q.safetensors"), metadata={"ctrak": json.dumps(META)})
    mp.spawn(_worker, args=(2, root), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize(
    "name,k,tails", [(n, k, t) for n, s in STORES.items() for k, t in s[-1]], ids=str
)
def test_two_ranks_equal_one_process(ranks, name, k, tails):
    root, outs = ranks
    store = FeatureStore.open(root / name)
    u = torch.load(root / f"{name}.u.pt")
    single = topk(store, u, k, tails=tails)
    feats, ids = store.read_all()
    kind = STORES[name][1]
    for out in outs:
        got = TopK(**out[(name, k, tails)])
        for field in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
            a, b = getattr(got, field), getattr(single, field)
            assert (a is None and b is None) or torch.equal(a, b), field
        check(got, feats, ids, u, k, tails, exact_ids=kind == "integers" or k <= 7)


def test_a_failing_rank_fails_every_rank(ranks):
    _, outs = ranks
    assert outs[1]["corrupt"][0] == "StoreError" and "shard-00003" in outs[1]["corrupt"][1]
    name, msg = outs[0]["corrupt"]  # the same error class, and the failing rank's message
    assert name == "StoreError" and msg.startswith("topk_distributed: rank 1: ")
    assert "shard-00003.safetensors: crc32c mismatch" in msg  # the default check, every byte


def test_gram_is_the_same_on_both_ranks(ranks):
    root, outs = ranks
    want = gram(FeatureStore.open(root / "uneven"))
    assert torch.equal(outs[0]["gram"], outs[1]["gram"])
    torch.testing.assert_close(outs[0]["gram"], want, rtol=1e-12, atol=1e-9)


def test_cli_attribute_under_two_ranks(ranks, capsys):
    from ctrak_fast import cli

    root, outs = ranks
    assert outs[0]["cli_rc"] == outs[1]["cli_rc"] == 0
    assert not (root / "cli-1.json").exists()  # only rank 0 writes
    two = json.loads((root / "cli-0.json").read_text())
    argv = ["attribute", "--store", str(root / "uneven"), "--query", str(root / "q.safetensors")]
    assert cli.main([*argv, "--k", "20", "--out", str(root / "single.json")]) == 0
    one = json.loads((root / "single.json").read_text())
    assert [q["ids"] for q in two["top"]] == [q["ids"] for q in one["top"]]
    assert [q["ids"] for q in two["bottom"]] == [q["ids"] for q in one["bottom"]]
    # Scores differ at most by the order of the float64 Gram sums across ranks.
    for a, b in zip(two["top"] + two["bottom"], one["top"] + one["bottom"], strict=True):
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]))


# --- the pieces, in one process -----------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_rank_shards_partition(world):
    rows = [700, 700, 1, 700, 245, 5000, 3]
    parts = [rank_shards(rows, world, r) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(len(rows)))
    for p in parts:  # contiguous blocks, in rank order
        if p:
            assert p == list(range(p[0], p[-1] + 1))
    flat = [i for p in parts for i in p]
    assert flat == sorted(flat)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        rank_shards(rows, 2, 2)


@pytest.mark.parametrize("kind", ["random", "integers", "duplicates"])
def test_merge_topk_is_exact(kind):
    feats, ids, u = make_data(900, 12, 6, torch.float32, kind)
    cuts = [0, 1, 50, 400, 401, 900]
    for k in (1, 13, 300, 900):
        parts = []
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            kk = min(k, hi - lo)
            parts.append(topk_reference(feats[lo:hi], ids[lo:hi], u, kk))
        got = merge_topk(parts, k)
        want = topk_reference(feats, ids, u, k)
        for field in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (k, field)


def test_merge_topk_pads_and_skips_padding():
    v = torch.tensor([[3.0, float("nan")], [1.0, 2.0]])
    i = torch.tensor([[5, -1], [7, 4]])
    a = TopK(v, i, None, None, "top")
    b = TopK(torch.tensor([[3.0], [2.0]]), torch.tensor([[2], [9]]), None, None, "top")
    got = merge_topk([a, b], 4)
    assert got.top_ids.tolist() == [[2, 5, -1, -1], [4, 9, 7, -1]]
    assert got.top_values[0, :2].tolist() == [3.0, 3.0] and torch.isnan(got.top_values[0, 2:]).all()
    assert got.bottom_values is None
