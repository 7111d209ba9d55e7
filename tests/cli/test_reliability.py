"""`ctrak featurize` killed at random points resumes to the same bytes; NaN gradients are named;
every bad input and spec mismatch gives one error line, a non-zero exit and no half-written output.

Commands run as real child processes of a fork server (tests/forkserver.py): each starts in
milliseconds, so the suite affords many kill trials on the 2-core build machine.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from forkserver import not_progress, shared_server, store_files, tiny_assets
from safetensors.torch import save_file

from ctrak_fast.data import ConceptDataset
from ctrak_fast.engine.store import FeatureStore

FEATURIZE = ["featurize", "--method", "d-trak", "--timesteps", "499", "--k", "16"]
LAYOUT = ["--batch-size", "2", "--shard-rows", "4"]  # 24 images: 6 shards of 2 batches
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("assets"))


def featurize_argv(assets, out: Path, *extra) -> list:
    model, data = assets
    return [*FEATURIZE, "--model", model, "--data", data, *LAYOUT, "--out", out, *extra]


@pytest.fixture(scope="module")
def reference(server, assets, tmp_path_factory):
    """An uninterrupted run (main and DAS store): its files, guarded syscalls and duration."""
    out = tmp_path_factory.mktemp("reference")
    res = server.run(featurize_argv(assets, out / "s", "--das-out", out / "das"))
    assert res.rc == 0 and not_progress(res.stderr) == [], res.stderr
    assert res.stdout.strip() == f"24 rows x k=16 in {out / 's'}"
    return out, res


# ---- kill -9 ----------------------------------------------------------------------------------


def test_kill_9_at_random_points_then_resume_is_byte_identical(server, assets, reference, tmp_path):
    ref, ref_run = reference
    want = {name: store_files(ref / name) for name in ("s", "das")}
    rng = random.Random(6)
    outs = [tmp_path / f"t{t}" for t in range(12)]
    argv = [featurize_argv(assets, out / "s", "--das-out", out / "das") for out in outs]
    # Two trials in three die at a random guarded syscall (inside a shard or manifest write, a
    # rename, a link or an unlink: every point where a store changes), side by side; the third
    # is SIGKILLed by the parent after a random delay, alone so that the delay means something.
    at = {t: rng.randint(1, ref_run.calls) for t in range(12) if t % 3 < 2}
    # Two more at fixed points: the renames of the two stores' closing manifest updates.
    outs += [tmp_path / "main-close", tmp_path / "das-close"]
    argv += [featurize_argv(assets, out / "s", "--das-out", out / "das") for out in outs[12:]]
    at.update({12: ref_run.calls - 5, 13: ref_run.calls - 1})
    results = _all(server, {t: server.start(argv[t], kill_at=at[t]) for t in at})
    for t in sorted(set(range(12)) - set(at)):
        child = server.start(argv[t])
        time.sleep(rng.uniform(0, ref_run.seconds))
        child.kill()
        results[t] = server.wait(child)
    assert sum(r.rc == -9 for r in results.values()) >= 10  # a timer may fire after a fast run
    # A second crash, during the resume, for a third of the trials.
    again = {t: rng.randint(1, ref_run.calls) for t in range(0, 12, 3)}
    _all(server, {t: server.start(argv[t], kill_at=again[t]) for t in again})
    for out in outs:  # whatever a crash leaves is a consistent store, or nothing
        for store in (out / "s", out / "das"):
            if (store / "manifest.json").exists():
                assert FeatureStore.open(store).verify() == [], store
    for t, res in _all(server, {t: server.start(argv[t]) for t in range(len(argv))}).items():
        assert res.rc == 0 and not_progress(res.stderr) == [], (t, res.stderr)
        for name in ("s", "das"):
            assert store_files(outs[t] / name) == want[name], (t, name)


def _all(server, children: dict) -> dict:
    return {key: server.wait(child) for key, child in children.items()}


# ---- non-finite gradients -------------------------------------------------------------------


def test_nan_gradients_fail_naming_the_ids_or_become_recorded_zero_rows(server, tmp_path):
    # Colour 1's embedding row is NaN: exactly the samples of that colour (ids 6-11 and 18-23,
    # rows are grouped by (shape, colour)) get NaN per-sample gradients.
    assets = tiny_assets(tmp_path / "assets", nan_label=(1, 1))
    res = server.run(featurize_argv(assets, tmp_path / "failed"))
    assert res.rc == 1
    assert res.stderr.splitlines() == [
        "ctrak: error: NaN/Inf per-sample gradients for sample id(s) [6, 7]; fix the data or "
        "model, or pass --nan-policy zero to store zero rows"
    ]
    failed = FeatureStore.open(tmp_path / "failed")  # the shard before the bad batch, nothing else
    assert failed.verify() == [] and failed.done_ids().tolist() == [0, 1, 2, 3]

    res = server.run(featurize_argv(assets, tmp_path / "zero", "--nan-policy", "zero"))
    assert res.rc == 0
    assert len(not_progress(res.stderr)) == 1 and "12 sample(s)" in res.stderr
    bad = [*range(6, 12), *range(18, 24)]
    store = FeatureStore.open(tmp_path / "zero")
    assert store.zeroed_ids() == bad and store.verify() == []
    assert store.manifest["format_version"] == 2  # older readers refuse it instead of misreading
    feats, ids = store.read_all()
    is_bad = torch.isin(ids, torch.tensor(bad))
    assert (feats[is_bad] == 0).all() and (feats[~is_bad] != 0).any(1).all()

    # The failed run resumes under the zero policy to the very same bytes.
    res = server.run(featurize_argv(assets, tmp_path / "failed", "--nan-policy", "zero"))
    assert res.rc == 0
    assert store_files(tmp_path / "failed") == store_files(tmp_path / "zero")


class _Scaled:
    """A featurizer whose rows ``rows`` come out multiplied by ``factor``."""

    def __init__(self, inner, rows, factor) -> None:
        self.inner, self.rows, self.factor = inner, rows, factor
        self.spec, self.projection, self.k = inner.spec, inner.projection, inner.k

    def meta(self):
        return self.inner.meta()

    def __call__(self, x, c):
        phi, dsm = self.inner(x, c)
        phi[self.rows] *= self.factor
        return phi, dsm


def test_features_overflowing_float16_are_named_too(tiny_unet, tmp_path, one_thread):
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.engine.validation import NonFiniteFeatures
    from ctrak_fast.method.dataset_features import featurize_dataset
    from ctrak_fast.method.diffusion import NoiseSchedule
    from ctrak_fast.method.featurize import FeatureSpec, Featurizer

    spec = FeatureSpec(loss="eps-norm", inversion=False, timesteps=(499,))
    fz = Featurizer(tiny_unet, NoiseSchedule(), spec, ProjectionSpec(k=8), torch.tensor([3, 2]))
    fz = _Scaled(fz, [1], 1e9)
    x, cond = torch.rand(4, 3, 8, 8) * 2 - 1, torch.zeros(4, 2, dtype=torch.int64)
    kw = dict(batch_size=2, shard_rows=2, dtype="float16", progress=False)
    with pytest.raises(NonFiniteFeatures, match=r"features that overflow float16 .* \[51\]") as e:
        featurize_dataset(fz, x, cond, torch.arange(50, 54), tmp_path / "s", **kw)
    assert e.value.ids == [51]
    store = featurize_dataset(
        fz, x, cond, torch.arange(50, 54), tmp_path / "s", nan_policy="zero", **kw
    )
    assert store.zeroed_ids() == [51, 53] and store.verify() == []


# ---- refusals and bad input: one line, exit 1, nothing written --------------------------------


def _query_file(path: Path, meta: dict) -> Path:
    tensors = {"queries": torch.randn(1, 16), "image": torch.zeros(1, 3, 8, 8)}
    save_file(tensors, str(path), metadata={"ctrak": json.dumps(meta)})
    return path


def _edit_manifest(store: Path, edit) -> None:
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    (store / "manifest.json").write_text(json.dumps(m))


def _corrupt(store: Path, how: str) -> None:
    shard = store / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if how == "flip":
        data[-3] ^= 0x10
    else:
        data = data[:-7]
    shard.write_bytes(bytes(data))


def _dataset_file(path: Path, n: int = 4, nan_at: int | None = None) -> Path:
    images = torch.zeros(n, 3, 8, 8)
    if nan_at is not None:
        images[nan_at, 1, 2, 3] = float("nan")
    labels = torch.zeros(n, 2, dtype=torch.int64)
    values = {"shape": ["circle", "square"], "colour": ["red", "green"]}
    ids = torch.arange(10, 10 + n)
    ConceptDataset(images, labels, ids, ["shape", "colour"], values).save(path)
    return path


def _folder(root: Path, labels: dict, corrupt: str | None = None) -> tuple[Path, Path]:
    from PIL import Image

    root.mkdir()
    for name in labels:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / name)
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "labels.json").write_text(json.dumps(labels))
    return root, root / "labels.json"


OK_LABELS = {"a.png": {"shape": "circle", "colour": "red"}}
# (id, argv builder (ctx -> argv), expected message regex). ctx: tmp, assets, store (a finished
# store, copied per case), fresh (an --out that must stay absent).
CASES = [
    # -- bad input --
    (
        "image-size",
        lambda c: featurize_argv(
            (c.assets[0], tiny_assets(c.tmp / "a", image_size=16)[1]), c.fresh
        ),
        r"images are 16x16 pixels, the model expects 8x8",
    ),
    (
        "channels",
        lambda c: featurize_argv(
            (tiny_assets(c.tmp / "a", in_channels=1)[0], c.assets[1]), c.fresh
        ),
        r"images have 3 channel\(s\), the model expects 1",
    ),
    (
        "nan-pixels",
        lambda c: featurize_argv(
            (c.assets[0], _dataset_file(c.tmp / "d.safetensors", 4, 2)), c.fresh
        ),
        r"images of sample id\(s\) \[12\] contain NaN/Inf",
    ),
    (
        "unreadable-image",
        lambda c: [
            *featurize_argv(c.assets, c.fresh),
            *("--folder", *c.folder("x", {**OK_LABELS, "b.png": OK_LABELS["a.png"]}, "b.png")),
        ],
        r"b\.png: unreadable image",
    ),
    (
        "unreadable-dataset-file",
        lambda c: featurize_argv((c.assets[0], c.junk("d.safetensors")), c.fresh),
        r"d\.safetensors: not a usable dataset",
    ),
    (
        "unreadable-model",
        lambda c: featurize_argv((c.junk("m.safetensors"), c.assets[1]), c.fresh),
        r"m\.safetensors: not a usable model checkpoint",
    ),
    (
        "empty-dataset",
        lambda c: featurize_argv((c.assets[0], _dataset_file(c.tmp / "e.safetensors", 0)), c.fresh),
        r"empty dataset: nothing to featurize",
    ),
    (
        "empty-labels-file",
        lambda c: [*featurize_argv(c.assets, c.fresh), "--folder", *c.folder("x", {})],
        r"labels\.json: no entries",
    ),
    (
        "unknown-label-value",
        lambda c: [
            *featurize_argv(c.assets, c.fresh),
            *("--folder", *c.folder("x", {"a.png": {"shape": "circle", "colour": "purple"}})),
        ],
        r"unknown colour value 'purple'; known \['red', 'green'\]",
    ),
    (
        "label-index-mismatch",
        lambda c: featurize_argv((c.assets[0], c.synthetic(colours=["green", "red"])), c.fresh),
        r"dataset value 'green' of factor 'colour' has index 0, which is 'red' for the model",
    ),
    (
        "batch-not-dividing-shard",
        lambda c: [*featurize_argv(c.assets, c.fresh), "--batch-size", "3"],
        r"shard_rows \(4\) must be a multiple of batch_size \(3\)",
    ),
    (
        "k-zero",
        lambda c: [*featurize_argv(c.assets, c.fresh), "--k", "0"],
        r"argument --k: must be >= 1, got 0",
    ),
    (
        "missing-model",
        lambda c: featurize_argv((c.tmp / "nope.safetensors", c.assets[1]), c.fresh),
        r"model file not found: .*nope\.safetensors",
    ),
    (
        "missing-data",
        lambda c: featurize_argv((c.assets[0], c.tmp / "nope.json"), c.fresh),
        r"dataset file not found: .*nope\.json",
    ),
    (
        "missing-folder",
        lambda c: [*featurize_argv(c.assets, c.fresh), "--folder", c.tmp / "no", "--labels", "x"],
        r"image folder not found",
    ),
    (
        "out-under-a-file",
        lambda c: featurize_argv(c.assets, c.junk("f") / "store"),
        r"cannot create --out .*/f/store: .*/f is not a directory",
    ),
    (
        "out-is-a-file",
        lambda c: featurize_argv(c.assets, c.junk("f")),
        r"--out .*/f exists and is not a directory",
    ),
    (
        "bad-factorized",
        lambda c: [*featurize_argv(c.assets, c.fresh), "--factorized", "4"],
        r"--factorized wants K_IN,K_OUT, got '4'",
    ),
    (
        "demo-unknown-method",
        lambda c: ["demo", "--out", c.fresh, "--methods", "concept-trak,foo"],
        r"unknown method\(s\) \['foo'\] in --methods",
    ),
    (
        "torchrun-env-incomplete",
        lambda c: c.with_env(featurize_argv(c.assets, c.fresh), RANK="1"),
        r"RANK and WORLD_SIZE must both be integers",
    ),
    # -- concept tokens --
    ("unknown-factor", lambda c: c.query("size=big"), r"unknown factor 'size'"),
    ("unknown-value", lambda c: c.query("colour=purple"), r"unknown value 'purple' of factor"),
    ("bad-token", lambda c: c.query("colour"), r"bad condition 'colour': expected factor=value"),
    # -- a second featurize run with another spec: field and both values --
    ("rerun-k", lambda c: c.rerun("--k", "8"), r"'k': store .* has 16, got 8"),
    (
        "rerun-projection",
        lambda c: c.rerun("--proj-seed", "1"),
        r"'meta\.projection\.seed': store .* has 0, got 1",
    ),
    (
        "rerun-loss",
        lambda c: c.rerun("--method", "trak"),
        r"'meta\.feature\.loss': store .* has \"eps-norm\", got \"dsm\"",
    ),
    (
        "rerun-timesteps",
        lambda c: c.rerun("--timesteps", "99,299"),
        r"'meta\.feature\.timesteps': store .* has \[499\], got \[99, 299\]",
    ),
    (
        "rerun-param-filter",
        lambda c: c.rerun("--param-filter", "conv_in"),
        r"'meta\.feature\.param_filter': store .* has null, got \"conv_in\"",
    ),
    (
        "rerun-dtype",
        lambda c: c.rerun("--store-dtype", "float16"),
        r"'dtype': .* \"float32\", got \"fl",
    ),
    (
        "rerun-model",
        lambda c: c.rerun("--model", tiny_assets(c.tmp / "a", seed=1)[0]),
        r"'meta\.model': store .* has \"[0-9a-f]{64}\", got \"[0-9a-f]{64}\"",
    ),
    # -- a query feature against the store --
    (
        "query-projection",
        lambda c: c.attribute(projection={"seed": 5}),
        r"'meta\.projection\.seed': store .* has 0, got 5",
    ),
    (
        "query-model",
        lambda c: c.attribute(model="f" * 64),
        r"'meta\.model': store .* has \"[0-9a-f]{64}\", got \"f{64}\"",
    ),
    ("k-larger-than-n", lambda c: c.attribute(k=25), r"k=25 is larger than the store's 24 rows"),
    # -- damaged or foreign stores --
    ("store-missing", lambda c: ["store", "verify", c.tmp / "nowhere"], r"not a feature store"),
    (
        "store-corrupt",
        lambda c: c.store_cmd(lambda s: _corrupt(s, "flip")),
        r"shard-00001\.safetensors: sha256 mismatch",
    ),
    (
        "store-truncated",
        lambda c: c.store_cmd(lambda s: _corrupt(s, "truncate")),
        r"shard-00001\.safetensors: \d+ bytes, manifest says \d+ \(truncated\?\)",
    ),
    (
        "store-newer-format",
        lambda c: c.store_cmd(lambda s: _edit_manifest(s, lambda m: m.update(format_version=3))),
        r"written by a newer format version 3; this build reads <= 2",
    ),
    (
        "store-path-escape",
        lambda c: c.store_cmd(
            lambda s: _edit_manifest(s, lambda m: m["shards"][0].update(file="../x.safetensors"))
        ),
        r"names a shard file '\.\./x\.safetensors' outside the store directory",
    ),
    (
        "featurize-into-foreign-store",
        lambda c: c.rerun(
            edit=lambda s: _edit_manifest(
                s, lambda m: m["shards"][0].update(file="../x.safetensors")
            )
        ),
        r"outside the store directory",
    ),
]


class Ctx:
    def __init__(self, tmp: Path, assets, store: Path) -> None:
        self.tmp, self.assets, self.store, self.fresh = tmp, assets, store, tmp / "fresh"
        self.env: dict = {}

    def junk(self, name: str) -> Path:
        (self.tmp / name).write_bytes(b"\x00 certainly not what was asked for")
        return self.tmp / name

    def folder(self, name: str, labels: dict, corrupt: str | None = None) -> list:
        root, labels_file = _folder(self.tmp / name, labels, corrupt)
        return [root, "--labels", labels_file]

    def synthetic(self, **changes) -> Path:
        config = {**json.loads(self.assets[1].read_text()), **changes}
        (self.tmp / "data.json").write_text(json.dumps(config))
        return self.tmp / "data.json"

    def with_env(self, argv, **env) -> list:
        self.env = env
        return argv

    def query(self, concept: str) -> list:
        model = self.assets[0]
        return ["query", "--model", model, "--concept", concept, "--out", self.tmp / "q.st"]

    def rerun(self, *extra, edit=None) -> list:
        if edit:
            edit(self.store)
        argv = featurize_argv(self.assets, self.store, "--das-out", self.store.parent / "das")
        return [*argv, *extra]

    def attribute(self, k: int = 5, **changes) -> list:
        meta = FeatureStore.open(self.store).meta
        for key, value in changes.items():
            meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
        query = _query_file(self.tmp / "q.safetensors", meta)
        return ["attribute", "--store", self.store, "--query", query, "--k", k]

    def store_cmd(self, damage) -> list:
        damage(self.store)
        return ["store", "verify", self.store]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refusals_and_bad_input_give_one_error_line(server, assets, reference, tmp_path, case):
    _, build, pattern = case
    store = tmp_path / "store" / "s"
    shutil.copytree(reference[0], tmp_path / "store")
    ctx = Ctx(tmp_path, assets, store)
    argv = build(ctx)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "store").rglob("*")) if p.is_file()}
    res = server.run(argv, env=ctx.env)
    usage = pattern.startswith("argument --")  # refused by the parser: exit 2, as argparse
    assert res.rc == (2 if usage else 1), (res.rc, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctrak: error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert res.stdout == ""
    # Nothing half-written: no new output, and the existing store is as it was.
    assert not ctx.fresh.exists() and not (tmp_path / "q.st").exists()
    after = {p: p.read_bytes() for p in sorted((tmp_path / "store").rglob("*")) if p.is_file()}
    assert after == before


def test_no_artifact_is_loaded_with_pickle():
    """Safetensors everywhere; torch.load only with weights_only=True."""
    offenders = []
    for path in sorted((REPO / "ctrak_fast").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\b(import pickle|pickle\.loads?|cPickle|dill)\b", code) or (
                re.search(r"(?<![\w.])torch\.load\(", code) and "weights_only=True" not in code
            ):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []
