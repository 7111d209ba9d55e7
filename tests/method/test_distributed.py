"""Distributed featurization: any number of ranks writes the bytes of a single-process run; a rerun
after a crash redoes only the missing units; merges and plans refuse what does not belong.

In-process tests run the ranks' steps one after the other (plan, each rank's units, merge); the
subprocess tests run real gloo process groups: torchrun itself, and ranks forked with torchrun's
environment (tests/forkserver.py), which start in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forkserver import (
    free_port,
    not_progress,
    rank_env,
    shared_server,
    store_files,
    tiny_assets,
)
from helpers import LiveRows, write_store

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.store import FeatureStore, SpecMismatch, StoreError, merge_stores
from ctrak_fast.method.dataset_features import featurize_dataset
from ctrak_fast.method.diffusion import NoiseSchedule
from ctrak_fast.method.distributed import (
    PARTS,
    DistContext,
    featurize_distributed,
    featurize_units,
    merge_units,
    part_path,
    plan_units,
)
from ctrak_fast.method.featurize import FeatureSpec, Featurizer

REPO = Path(__file__).resolve().parents[2]
NULL = torch.tensor([3, 2])
B, S = 2, 4  # batch size, shard rows


def _featurizer(model, seed: int = 3) -> Featurizer:
    spec = FeatureSpec(loss="eps-norm", inversion=False, timesteps=(499,))
    proj = ProjectionSpec(k=16, seed=seed)
    return Featurizer(model, NoiseSchedule(), spec, proj, NULL, projector_backend="reference")


def _data(n: int):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.stack([torch.arange(n) % 3, torch.arange(n) % 2], 1)
    return x, cond, torch.arange(100, 100 + n)


class Counting:
    """A featurizer that counts its batches (and can fail at the n-th)."""

    def __init__(self, inner: Featurizer, fail_at: int = 0) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.spec, self.projection, self.k = inner.spec, inner.projection, inner.k

    def meta(self):
        return self.inner.meta()

    def __call__(self, x, c):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("preempted")
        return self.inner(x, c)


def _plan(fz, targets, ids):
    return plan_units(targets, fz.meta(), ids, k=16, dtype="float32", shard_rows=S)


def _units(fz, data, plan, units) -> None:
    featurize_units(fz, *data, plan, units, batch_size=B, dtype="float32")


@pytest.fixture(autouse=True)
def _one_thread():
    """Like torchrun's workers; also, spinning OpenMP threads crawl on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _simulate(fz, data, targets, world: int):
    """Every rank's share of a run, one rank after the other, then the merge."""
    ids = data[2]
    plan = _plan(fz, targets, ids)
    shares = [plan.assignment(r, world) for r in range(world)]
    assert sorted(sum(shares, [])) == list(plan.missing)  # disjoint, and covering the work
    for r in reversed(range(world)):  # the order ranks finish in does not matter
        _units(fz, data, plan, shares[r])
    merge_units(plan, ids)
    return plan


def test_any_world_size_writes_the_single_process_bytes(tiny_unet, tmp_path):
    fz, data = _featurizer(tiny_unet), _data(10)  # 3 units: 4 + 4 + 2 rows
    x, cond, ids = data
    ref = tmp_path / "ref"
    featurize_dataset(
        fz, x, cond, ids, ref / "s", das_path=ref / "das", batch_size=B, shard_rows=S,
        progress=False,
    )  # fmt: skip
    want = {name: store_files(ref / name) for name in ("s", "das")}
    for world in (1, 2, 3, 5):  # 5 ranks for 3 units: two ranks have nothing to do
        out = tmp_path / f"w{world}"
        plan = _simulate(fz, data, [out / "s", out / "das"], world)
        assert plan.missing == (0, 1, 2)
        for name in ("s", "das"):
            assert store_files(out / name) == want[name], (world, name)
            assert not (out / name / PARTS).exists()
        assert FeatureStore.open(out / "s").verify() == []


def test_ranks_read_images_on_disk_a_batch_at_a_time(tiny_unet, tmp_path, monkeypatch):
    from PIL import Image

    from ctrak_fast.data.image_sequence import ImageSequence

    x, cond, ids = _data(10)
    pixels = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    seq = ImageSequence([Image.fromarray(p) for p in pixels], 8)  # PIL images, decoded per batch
    fz, ref = _featurizer(tiny_unet), tmp_path / "ref"
    featurize_dataset(fz, seq.tensor(), cond, ids, ref, batch_size=B, shard_rows=S, progress=False)
    live = LiveRows.counting(monkeypatch)
    _simulate(fz, (seq, cond, ids), [tmp_path / "w2"], world=2)
    assert live.read == 10 and live.peak == B  # each unit reads its rows, one batch at a time
    assert store_files(tmp_path / "w2") == store_files(ref)


def test_rerun_after_a_crash_redoes_only_the_missing_units(tiny_unet, tmp_path):
    data = _data(16)  # 4 units of 2 batches
    x, cond, ids = data
    ref = tmp_path / "ref"
    featurize_dataset(_featurizer(tiny_unet), x, cond, ids, ref, batch_size=B, shard_rows=S)
    out = tmp_path / "run"
    plan = _plan(_featurizer(tiny_unet), [out], ids)
    _units(_featurizer(tiny_unet), data, plan, [0, 1])
    crashing = Counting(_featurizer(tiny_unet), fail_at=4)  # rank 1 dies in its second unit
    with pytest.raises(RuntimeError, match="preempted"):
        _units(crashing, data, plan, [2, 3])

    # The rerun, with 3 ranks instead of 2, plans only unit 3 and recomputes its 2 batches.
    fz = Counting(_featurizer(tiny_unet))
    plan = _plan(fz, [out], ids)
    assert plan.missing == (3,) and plan.merged == (0,)
    kept = {u: (part_path(out, u) / "shard-00000.safetensors").stat().st_ino for u in (0, 1, 2)}
    for rank in range(3):
        _units(fz, data, plan, plan.assignment(rank, 3))
    assert fz.calls == 2
    merge_units(plan, ids)
    assert store_files(out) == store_files(ref)
    for unit, inode in kept.items():  # the finished units' files are the merged shards
        assert (out / f"shard-{unit:05d}.safetensors").stat().st_ino == inode


def test_a_single_process_store_is_continued_by_ranks_and_the_other_way_round(tiny_unet, tmp_path):
    data = _data(16)
    x, cond, ids = data
    ref = tmp_path / "ref"
    featurize_dataset(_featurizer(tiny_unet), x, cond, ids, ref, batch_size=B, shard_rows=S)
    # A single process preempted after 2 shards; 2 ranks finish it.
    out = tmp_path / "a"
    with pytest.raises(RuntimeError, match="preempted"):
        featurize_dataset(
            Counting(_featurizer(tiny_unet), fail_at=6), x, cond, ids, out, batch_size=B,
            shard_rows=S,
        )  # fmt: skip
    plan = _plan(_featurizer(tiny_unet), [out], ids)
    assert plan.merged == (2,) and plan.missing == (2, 3)
    _simulate(_featurizer(tiny_unet), data, [out], world=2)
    assert store_files(out) == store_files(ref)
    # Ranks preempted after one unit; a single process (no process group) finishes from the parts.
    out = tmp_path / "b"
    plan = _plan(_featurizer(tiny_unet), [out], ids)
    _units(_featurizer(tiny_unet), data, plan, [1])
    featurize_distributed(
        _featurizer(tiny_unet), x, cond, ids, out, batch_size=B, shard_rows=S, progress=False
    )
    assert store_files(out) == store_files(ref) and not (out / PARTS).exists()


# ---- refusals -------------------------------------------------------------------------------


def _one_store(path: Path, rows: int, meta: dict, first_id: int = 0) -> FeatureStore:
    return write_store(path, torch.randn(rows, 4), torch.arange(first_id, first_id + rows), 4, meta)


def _tree(path: Path) -> dict:
    return (
        {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}
    )


def test_merge_refuses_what_does_not_belong(tmp_path):
    meta = {"model": "abc", "projection": {"seed": 0}}
    a = _one_store(tmp_path / "a", 4, meta)
    other = _one_store(tmp_path / "other", 4, {**meta, "projection": {"seed": 1}}, 4)
    short = _one_store(tmp_path / "short", 3, meta, 4)
    dest = tmp_path / "dest"
    with pytest.raises(SpecMismatch, match=r"'meta\.projection\.seed': store .* has 0, got 1") as e:
        merge_stores(dest, [a, other])
    assert e.value.field == "meta.projection.seed" and str(other.path) in str(e.value)
    with pytest.raises(StoreError, match=r"short shard \(3 of 4 rows\)"):
        merge_stores(dest, [short, a])
    with pytest.raises(StoreError, match="into itself"):
        merge_stores(a.path, [a])
    assert not dest.exists()  # a refused merge creates nothing

    merge_stores(dest, [a, short])  # a short last shard is fine
    assert FeatureStore.open(dest).verify() == []
    with pytest.raises(StoreError, match=r"dest has a short shard"):
        merge_stores(dest, [a])  # ... but nothing can follow it

    corrupt = _one_store(tmp_path / "corrupt", 4, meta, 8)
    shard = corrupt.path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    target = tmp_path / "target"
    merge_stores(target, [a])
    before = _tree(target)
    with pytest.raises(StoreError, match="sha256 mismatch"):
        merge_stores(target, [_one_store(tmp_path / "b", 4, meta, 4), corrupt])
    assert _tree(target) == before  # no manifest change and no file left behind


def test_plan_refuses_stores_and_parts_of_another_run(tiny_unet, tmp_path):
    data = _data(10)
    x, cond, ids = data
    fz = _featurizer(tiny_unet)
    plan_args = dict(k=16, dtype="float32", shard_rows=S)
    # Parts left by a run with another projection seed.
    out = tmp_path / "parts"
    plan = plan_units([out], _featurizer(tiny_unet, seed=4).meta(), ids, **plan_args)
    _units(_featurizer(tiny_unet, seed=4), data, plan, [1])
    with pytest.raises(
        SpecMismatch, match=r"'meta\.projection\.seed': store .*part-00001 has 4, got 3"
    ):
        plan_units([out], fz.meta(), ids, **plan_args)
    # A store of other samples, and one that ends with a short shard before the data's end.
    featurize_dataset(fz, x, cond, ids + 1, tmp_path / "other", batch_size=B, shard_rows=S)
    with pytest.raises(StoreError, match="holds other samples"):
        plan_units([tmp_path / "other"], fz.meta(), ids, **plan_args)
    featurize_dataset(fz, x[:6], cond[:6], ids[:6], tmp_path / "short", batch_size=B, shard_rows=S)
    with pytest.raises(StoreError, match=r"ends with a short shard \(2 rows\)"):
        plan_units([tmp_path / "short"], fz.meta(), ids, **plan_args)
    with pytest.raises(StoreError, match=r"'k': store .* has 16, got 8"):
        plan_units([tmp_path / "other"], fz.meta(), ids, **{**plan_args, "k": 8})


def test_torchrun_environment_is_read(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert DistContext.from_env() == DistContext()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert DistContext.from_env().world_size == 1  # one rank: no process group needed
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=1\)"):
        DistContext.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="must both be integers"):
        DistContext.from_env()


# ---- real process groups (gloo) ---------------------------------------------------------------

ARGS = ["featurize", "--method", "d-trak", "--timesteps", "499", "--k", "16"]
ARGS += ["--batch-size", str(B), "--shard-rows", str(S)]  # 24 images: 6 units


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("assets"))


def _argv(assets, out: Path) -> list:
    model, data = assets
    return [*ARGS, "--model", model, "--data", data, "--out", out / "s", "--das-out", out / "das"]


@pytest.fixture(scope="module")
def single(server, assets, tmp_path_factory):
    """Files of a single-process run (no process group)."""
    out = tmp_path_factory.mktemp("single")
    res = server.run(_argv(assets, out))
    assert res.rc == 0, res.stderr
    return {name: store_files(out / name) for name in ("s", "das")}


def _ranks(server, argv, world: int, kill: dict | None = None, extra: dict | None = None):
    port = free_port()
    children = [
        server.start(
            argv + (extra or {}).get(rank, []),
            env=rank_env(rank, world, port),
            kill_at=(kill or {}).get(rank, 0),
        )
        for rank in range(world)
    ]
    return [server.wait(child) for child in children]


@pytest.mark.slow  # torchrun's launcher and workers each import torch: ~10 s of CPU
def test_torchrun_two_ranks_write_the_single_process_bytes(assets, single, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "ctrak_fast.cli", *map(str, _argv(assets, tmp_path))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == f"24 rows x k=16 in {tmp_path / 's'}"  # printed by rank 0 only
    for name in ("s", "das"):
        assert store_files(tmp_path / name) == single[name]


def test_three_ranks_then_a_killed_rank_resumed_by_two(server, assets, single, tmp_path):
    argv = _argv(assets, tmp_path / "three")
    assert [r.rc for r in _ranks(server, argv, 3)] == [0, 0, 0]
    for name in ("s", "das"):
        assert store_files(tmp_path / "three" / name) == single[name]

    # Rank 1 (units 2 and 3) is SIGKILLed while writing unit 3: at its 42nd store syscall (each
    # unit takes 32: a part store created, a shard and a manifest written, then marked complete,
    # 4 syscalls each, for the main and the DAS store). The others see the broken group and stop.
    argv = _argv(assets, tmp_path / "crash")
    results = _ranks(server, argv, 3, kill={1: 42})
    assert results[1].rc == -9
    assert all(r.rc != 0 for r in results[::2])
    parts = tmp_path / "crash" / "s" / PARTS
    rows = {u: FeatureStore.open(part_path(parts.parent, u)).n_rows for u in range(6)}
    assert rows == {0: 4, 1: 4, 2: 4, 3: 0, 4: 4, 5: 4}
    shard = "shard-00000.safetensors"
    kept = {u: (part_path(parts.parent, u) / shard).stat().st_ino for u in rows if rows[u]}

    # Two ranks finish it: only unit 3 is computed, the other units' files become the store's.
    assert [r.rc for r in _ranks(server, argv, 2)] == [0, 0]
    for name in ("s", "das"):
        assert store_files(tmp_path / "crash" / name) == single[name]
    for unit, inode in kept.items():
        assert (parts.parent / f"shard-{unit:05d}.safetensors").stat().st_ino == inode
    assert not parts.exists()


def test_a_failing_rank_stops_every_rank_with_its_message(server, tmp_path):
    # Square's embedding row is NaN: ids 12-23, i.e. units 3-5, all of rank 1's work.
    assets = tiny_assets(tmp_path / "assets", nan_label=(0, 1))
    results = _ranks(server, _argv(assets, tmp_path), 2)
    nan = "NaN/Inf per-sample gradients for sample id(s) [12, 13]"
    assert [r.rc for r in results] == [1, 1]
    errors = [not_progress(r.stderr) for r in results]
    assert all(len(e) == 1 for e in errors), [r.stderr for r in results]
    assert errors[1][0].startswith(f"ctrak: error: {nan}")
    assert errors[0][0].startswith(f"ctrak: error: rank 1 failed: {nan}")
    assert FeatureStore.open(part_path(tmp_path / "s", 2)).n_rows == 4  # rank 0's work is kept


def test_ranks_started_with_different_arguments_are_refused(server, assets, tmp_path):
    results = _ranks(server, _argv(assets, tmp_path), 2, extra={1: ["--proj-seed", "1"]})
    want = "ctrak: error: rank 1 was started with another meta.projection: "
    for r in results:
        assert r.rc == 1 and r.stderr.startswith(want) and len(r.stderr.splitlines()) == 1
        assert '"seed": 1' in r.stderr and '"seed": 0' in r.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written
