"""FeatureStore: round trips, atomic writes and resume after kill -9, integrity checks, refusals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ctrak_fast.engine.store import (
    FORMAT_VERSION,
    FeatureStore,
    SpecMismatch,
    StoreError,
    model_fingerprint,
)

META = {"model": "abc123", "projection": {"kind": "rademacher", "k": 8, "seed": 0}, "t": [99, 199]}
N, K, SHARD_ROWS, BATCH = 60, 8, 7, 5
REPO = Path(__file__).resolve().parents[2]


def _features(n: int = N, k: int = K) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 3


def featurize(path) -> FeatureStore:
    """The workload of the crash test: resume-aware, as a featurizer would be."""
    feats = _features()
    store = FeatureStore.open_or_create(
        path, k=K, dtype="float16", meta=META, shard_rows=SHARD_ROWS
    )
    done = set(store.done_ids().tolist())
    with store.writer() as w:
        for start in range(0, N, BATCH):
            ids = [i for i in range(start, min(N, start + BATCH)) if i not in done]
            if ids:
                w.append(feats[ids], torch.tensor(ids))
    return store


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".lock"}


def _store(tmp_path, n=23, dtype="float32", shard_rows=5, batches=(1, 7, 2, 13)):
    feats = _features(n)
    store = FeatureStore.create(tmp_path / "s", k=K, dtype=dtype, meta=META, shard_rows=shard_rows)
    with store.writer() as w:
        pos = 0
        for b in batches:
            w.append(feats[pos : pos + b], torch.arange(pos, pos + b) + 1000)
            pos += b
        assert pos == n
    return store, feats


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip(tmp_path, dtype):
    store, feats = _store(tmp_path, dtype=dtype)
    reopened = FeatureStore.open(store.path)
    got, ids = reopened.read_all()
    assert got.dtype == getattr(torch, dtype)
    assert torch.equal(got, feats.to(got.dtype))
    assert torch.equal(ids, torch.arange(23) + 1000)
    assert torch.equal(reopened.done_ids(), ids)
    assert (reopened.n_rows, reopened.k, reopened.dtype, reopened.meta) == (23, K, dtype, META)
    assert reopened.complete and reopened.verify() == []


def test_shards_are_read_one_at_a_time(tmp_path):
    store, feats = _store(tmp_path)  # 23 rows, 5 per shard
    assert [r["rows"] for r in store.shards] == [5, 5, 5, 5, 3]
    assert [r["first_row"] for r in store.shards] == [0, 5, 10, 15, 20]
    for check in (True, False):
        parts = list(store.iter_shards(check=check))
        assert [f.shape for f, _ in parts] == [(5, K)] * 4 + [(3, K)]
        assert torch.equal(torch.cat([f for f, _ in parts]), feats)


def test_empty_store(tmp_path):
    store = FeatureStore.create(tmp_path / "e", k=K, meta=META)
    with store.writer():
        pass
    store = FeatureStore.open(store.path)
    assert store.n_rows == 0 and store.complete and list(store.iter_shards()) == []
    assert store.read_all()[0].shape == (0, K) and store.done_ids().numel() == 0


def test_identical_appends_give_identical_bytes(tmp_path):
    a, _ = _store(tmp_path / "a")
    b, _ = _store(tmp_path / "b", batches=(23,))
    assert _files(a.path) == _files(b.path)


def test_reopening_a_partial_tail_keeps_the_layout(tmp_path):
    feats = _features(20)
    store = FeatureStore.create(tmp_path / "s", k=K, dtype="bfloat16", meta=META, shard_rows=5)
    with store.writer() as w:
        w.append(feats[:12], torch.arange(12))
    assert [r["rows"] for r in store.shards] == [5, 5, 2] and store.complete
    store = FeatureStore.open_or_create(store.path, k=K, dtype="bfloat16", meta=META, shard_rows=5)
    with store.writer() as w:
        assert not FeatureStore.open(store.path).complete  # the tail is back in the buffer
        w.append(feats[12:], torch.arange(12, 20))
    one = FeatureStore.create(tmp_path / "o", k=K, dtype="bfloat16", meta=META, shard_rows=5)
    with one.writer() as w:
        w.append(feats, torch.arange(20))
    assert _files(store.path) == _files(one.path)


def test_writer_exception_keeps_complete_shards_only(tmp_path):
    store = FeatureStore.create(tmp_path / "s", k=K, meta=META, shard_rows=4)
    with pytest.raises(RuntimeError, match="boom"), store.writer() as w:
        w.append(_features(6), torch.arange(6))
        raise RuntimeError("boom")
    reopened = FeatureStore.open(store.path)
    assert reopened.n_rows == 4 and not reopened.complete
    with reopened.writer():  # the lock was released
        pass


# ---- crash safety ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import test_store

    path, mode, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "syscall":
        # SIGKILL ourselves at the arg-th write/fsync/replace/unlink; a write is torn first.
        real = {{name: getattr(os, name) for name in ("write", "fsync", "replace", "unlink")}}
        count = [0]

        def wrap(name):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == arg:
                    if name == "write":
                        real["write"](args[0], bytes(args[1])[: len(args[1]) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
                return real[name](*args, **kwargs)
            return call

        for name in real:
            setattr(os, name, wrap(name))
    else:
        print("ready", flush=True)  # the parent kills us after a random delay
    test_store.featurize(path)
    """
)


def _spawn(path: Path, mode: str, arg: int) -> subprocess.Popen:
    script = CHILD.format(repo=str(REPO), tests=str(Path(__file__).resolve().parent))
    return subprocess.Popen(
        [sys.executable, "-c", script, str(path), mode, str(arg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_then_resume_is_byte_identical(tmp_path):
    reference = featurize(tmp_path / "reference")
    want = _files(reference.path)
    # 4 guarded syscalls per atomic write (write, fsync, replace, dir fsync); 2 writes per shard.
    n_calls = 8 * (N // SHARD_ROWS + 1) + 8
    rng = random.Random(1234)
    trials = [("syscall", rng.randint(1, n_calls)) for _ in range(5)]
    trials.append(("timer", rng.randint(0, 150)))  # delay in ms; the run takes ~200 ms
    # All children run at once (their start-up dominates); each kills itself or is killed.
    procs = [_spawn(tmp_path / f"t{i}", mode, arg) for i, (mode, arg) in enumerate(trials)]
    for (mode, arg), proc in zip(trials, procs, strict=True):
        if mode == "timer":
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(arg / 1000)
            proc.send_signal(signal.SIGKILL)
    for (mode, arg), proc in zip(trials, procs, strict=True):
        proc.wait(timeout=60)
        if mode == "syscall":
            assert proc.returncode == -signal.SIGKILL, (arg, proc.stderr.read())
    # A second crash during the resume of one trial, then a clean finish everywhere.
    _spawn(tmp_path / "t0", "syscall", rng.randint(1, n_calls // 2)).wait(timeout=60)
    for i, trial in enumerate(trials):
        path = tmp_path / f"t{i}"
        if path.exists() and not (path / "manifest.json").exists():  # killed while creating it
            assert not [p for p in path.iterdir() if not p.name.endswith((".tmp", ".lock"))]
        store = featurize(path)
        assert store.verify() == [], trial
        assert _files(path) == want, trial


# ---- integrity ------------------------------------------------------------------------------


def test_flipped_byte_is_named_by_verify_and_read(tmp_path):
    store, _ = _store(tmp_path)
    shard = store.path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # in the tensor data, so the header still parses
    shard.write_bytes(bytes(data))
    reopened = FeatureStore.open(store.path)  # size and header are fine: open succeeds
    problems = reopened.verify()
    assert len(problems) == 1 and "shard-00001.safetensors" in problems[0]
    assert "sha256" in problems[0]
    with pytest.raises(StoreError, match="shard-00001.safetensors.*sha256"):
        list(reopened.iter_shards())
    assert len(list(reopened.iter_shards(check=False))) == 5  # the unchecked path still reads


def test_truncated_shard_is_found_at_open(tmp_path):
    store, _ = _store(tmp_path)
    shard = store.path / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    problems = store.verify()
    assert len(problems) == 1 and "shard-00002.safetensors" in problems[0]
    assert "truncated" in problems[0]
    with pytest.raises(StoreError, match="shard-00002.safetensors.*truncated"):
        FeatureStore.open(store.path)
    with pytest.raises(StoreError, match="shard-00002.safetensors.*truncated"):
        list(store.iter_shards())


def test_missing_shard_is_named(tmp_path):
    store, _ = _store(tmp_path)
    (store.path / "shard-00003.safetensors").unlink()
    assert store.verify() == ["shard-00003.safetensors: missing"]
    with pytest.raises(StoreError, match="shard-00003.safetensors.*missing"):
        FeatureStore.open(store.path)


def test_bad_header_is_found_at_open(tmp_path):
    store, _ = _store(tmp_path)
    shard = store.path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:10] = b"[["  # the JSON header no longer parses
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00000.safetensors.*header"):
        FeatureStore.open(store.path)


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_newer_format_is_refused(tmp_path):
    store, _ = _store(tmp_path)
    _edit_manifest(store.path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    newer = rf"newer format version {FORMAT_VERSION + 1}; this build reads <= {FORMAT_VERSION}"
    with pytest.raises(StoreError, match=newer):
        FeatureStore.open(store.path)


@pytest.mark.parametrize(
    "name", ["../evil.safetensors", "/etc/passwd", "sub/shard-00000.safetensors", "manifest.json"]
)
def test_shard_paths_must_stay_inside(tmp_path, name):
    store, _ = _store(tmp_path)
    _edit_manifest(store.path, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(StoreError, match="outside the store directory"):
        FeatureStore.open(store.path)


# ---- refusals -------------------------------------------------------------------------------


def test_second_writer_is_refused(tmp_path):
    store = FeatureStore.create(tmp_path / "s", k=K, meta=META)
    with store.writer():
        with pytest.raises(StoreError, match=rf"locked by another writer \(pid {os.getpid()}\)"):
            FeatureStore.open(store.path).writer()
    with store.writer() as w:  # released on exit
        w.append(_features(2), torch.arange(2))


@pytest.mark.parametrize(
    ("kwargs", "field", "stored", "given"),
    [
        ({"k": 16}, "k", "8", "16"),
        ({"dtype": "bfloat16"}, "dtype", '"float16"', '"bfloat16"'),
        ({"shard_rows": 8}, "shard_rows", "7", "8"),
        (
            {"meta": {**META, "projection": {**META["projection"], "seed": 1}}},
            "meta.projection.seed",
            "0",
            "1",
        ),
        ({"meta": {**META, "extra": True}}, "meta.extra", "<missing>", "true"),
    ],
    ids=["k", "dtype", "shard_rows", "nested-meta", "extra-meta"],
)
def test_resume_with_another_spec_names_the_field(tmp_path, kwargs, field, stored, given):
    featurize(tmp_path / "s")
    spec = {"k": K, "dtype": "float16", "meta": META, "shard_rows": SHARD_ROWS, **kwargs}
    with pytest.raises(SpecMismatch) as info:
        FeatureStore.open_or_create(tmp_path / "s", **spec)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)
    assert f"has {stored}, got {given}" in str(info.value)


def test_check_compatible(tmp_path):
    store = featurize(tmp_path / "s")
    store.check_compatible({"model": "abc123", "projection": META["projection"]})
    with pytest.raises(SpecMismatch, match="meta.model"):
        store.check_compatible({"model": "other"})
    with pytest.raises(SpecMismatch, match="meta.projection.k"):
        store.check_compatible({"projection": {**META["projection"], "k": 9}})


def test_create_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        FeatureStore.create(tmp_path / "s", k=K)


def test_bad_appends_are_refused(tmp_path):
    store = FeatureStore.create(tmp_path / "s", k=K, dtype="float16", meta=META)
    with store.writer() as w:
        with pytest.raises(StoreError, match="non-finite"):
            w.append(torch.full((2, K), float("nan")), torch.arange(2))
        with pytest.raises(StoreError, match="non-finite.*float16"):
            w.append(torch.full((2, K), 1e6), torch.arange(2))  # overflows float16
        with pytest.raises(StoreError, match="features must be"):
            w.append(torch.zeros(2, K + 1), torch.arange(2))
        with pytest.raises(StoreError, match="ids must be"):
            w.append(torch.zeros(2, K), torch.arange(3))
    assert FeatureStore.open(store.path).n_rows == 0


def test_meta_must_be_json(tmp_path):
    with pytest.raises(StoreError, match="JSON"):
        FeatureStore.create(tmp_path / "s", k=K, meta={"x": object()})


# ---- fingerprints ---------------------------------------------------------------------------


def test_model_fingerprint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fp = model_fingerprint(model)
    assert len(fp) == 64
    assert fp == model_fingerprint(dict(reversed(list(model.named_parameters()))))
    renamed = {f"m.{n}": p for n, p in model.named_parameters()}
    assert model_fingerprint(renamed) != fp
    with torch.no_grad():
        model[1].bias[0] += 1e-6
    assert model_fingerprint(model) != fp
    as_half = {n: p.half() for n, p in model.named_parameters()}
    assert model_fingerprint(as_half) != model_fingerprint(model)
