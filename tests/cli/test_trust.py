"""The named cases of the second hostile pass (#29): each gives exactly one `ctrak: error:` line
naming the problem, exit 1, and leaves every file that existed before byte for byte (or works, where
the case says so). docs/CONTRACTS.md's table lists them by family.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from forkserver import tiny_assets
from helpers import copy_store, run, snapshot, write_store

from ctrak_fast.engine.store import FeatureStore, StoreError, merge_stores
from ctrak_fast.results import Query

K = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    write_store(root / "store", torch.randn(10, K), torch.arange(10), 4, {"m": 1})
    Query(torch.randn(2, K), ("a", "b")).save(root / "q.safetensors")
    model, data = tiny_assets(root / "assets")
    return root, model, data


def refused(argv, root: Path, message: str) -> str:
    """Run `argv`: one error line matching `message`, exit 1, every file under root unchanged."""
    before = snapshot(root)
    rc, _, err = run(argv)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("ctrak: error: "), err
    assert re.search(message, lines[0]), lines[0]
    print(f"CASE {lines[0]}")
    assert snapshot(root) == before
    return lines[0]


def attribute(store, query, *extra) -> list:
    return ["attribute", "--store", store, "--query", query, "--k", "2", *extra]


# ---- 1. a store is complete or says it is not ---------------------------------------------------


def killed_store(path: Path, rows: int, expected: int) -> FeatureStore:
    """A store whose writer stopped (an exception, as kill -9 stops it) after `rows` rows."""
    store = FeatureStore.create(path, k=K, dtype="float32", shard_rows=4, expected_rows=expected)
    with pytest.raises(RuntimeError), store.writer(expected_rows=expected) as w:
        w.append(torch.randn(rows, K), torch.arange(rows))
        raise RuntimeError("killed")
    return FeatureStore.open(path)


def test_attribute_refuses_an_incomplete_store_naming_its_rows(world, tmp_path):
    root = world[0]
    store = killed_store(tmp_path / "s", rows=9, expected=20)
    assert store.n_rows == 8 and not store.complete  # the 9th row was still buffered
    q = root / "q.safetensors"
    refused(attribute(store.path, q), tmp_path, r"store .* is incomplete: 8 of 20 rows")
    refused(["store", "verify", store.path], tmp_path, r"is incomplete: 8 of 20 rows")
    rc, out, err = run(["store", "info", store.path])
    info = json.loads(out)
    assert rc == 0 and info["complete"] is False and info["expected_rows"] == 20, err
    rc, out, err = run(attribute(store.path, q, "--allow-partial"))
    assert rc == 0 and len(json.loads(out)["top"]) == 2, err


def test_a_manifest_without_complete_is_incomplete(world):
    root = world[0]
    store = copy_store(root, "no_complete")
    m = json.loads((store / "manifest.json").read_text())
    del m["complete"]  # every writer writes it: absent means edited or foreign
    (store / "manifest.json").write_text(json.dumps(m))
    refused(
        attribute(store, root / "q.safetensors"),
        root,
        r"incomplete: 10 rows, of a number not recorded",
    )


def test_resumed_and_merged_stores_end_complete(tmp_path):
    feats, ids = torch.randn(12, K), torch.arange(12)
    store = killed_store(tmp_path / "s", rows=6, expected=12)
    with FeatureStore.open(store.path).writer(expected_rows=12) as w:
        w.append(feats[4:], ids[4:])  # resume after the first whole shard
    assert FeatureStore.open(store.path).complete
    parts = []
    for i, sl in enumerate((slice(0, 4), slice(4, 8), slice(8, 12))):
        part = FeatureStore.create(tmp_path / f"p{i}", k=K, dtype="float32", shard_rows=4)
        with part.writer(expected_rows=4) as w:
            w.append(feats[sl], ids[sl])
        parts.append(part.path)
    partial = merge_stores(tmp_path / "m1", parts[:2], expected_rows=12)
    assert partial.n_rows == 8 and not partial.complete
    assert merge_stores(tmp_path / "m2", parts, expected_rows=12).complete
    with pytest.raises(StoreError, match="it is incomplete"):
        merge_stores(tmp_path / "m3", [killed_store(tmp_path / "k", 5, 12).path])


def test_featurize_store_records_expected_rows_and_ends_complete(world, tmp_path):
    _, model, data = world
    argv = ["featurize", "--model", model, "--data", data, "--method", "d-trak", "--k", "8"]
    rc, _, err = run([*argv, "--timesteps", "99", "--out", tmp_path / "s"])
    store = FeatureStore.open(tmp_path / "s")
    assert rc == 0 and store.complete and store.expected_rows == store.n_rows == 24, err


def test_a_missing_spec_checksum_is_an_error(world):
    root = world[0]
    store = copy_store(root, "no_spec")
    m = json.loads((store / "manifest.json").read_text())
    del m["spec_sha256"]
    m["meta"]["m"] = 2  # an edit that the checksum would have caught
    (store / "manifest.json").write_text(json.dumps(m))
    for argv in (["store", "verify", store], attribute(store, root / "q.safetensors")):
        refused(argv, root, r"manifest lacks spec_sha256")


# ---- 2. outputs never name inputs; failed runs leave nothing that blocks ------------------------


def test_outputs_pointed_at_inputs_are_refused(world):
    root, model, _ = world
    q, store = root / "q.safetensors", root / "store"
    (root / "link.safetensors").unlink(missing_ok=True)
    os.symlink(q, root / "link.safetensors")
    cases = [
        (attribute(store, q, "--out", q), r"--out .* is the input --query"),
        (attribute(store, q, "--out", root / "link.safetensors"), r"is the input --query"),
        (attribute(store, q, "--out", store / "manifest.json"), r"is the input --store"),
        (attribute(store, q, "--out", store / "x.json"), r"inside the feature store"),
        (attribute(store, q, "--export-scores", store / "s.st"), r"inside the feature store"),
        (attribute(store, q, "--out", root / "r.json", "--export-scores", root / "r.json"), "same"),
        (
            ["query", "--model", model, "--concept", "shape=circle", "--out", model],
            r"--out .* is the input --model",
        ),
        (
            ["query", "--model", model, "--concept", "shape=circle", "--out", store / "m.json"],
            r"inside the feature store",
        ),
    ]
    for argv, message in cases:
        refused(argv, root, message)


def test_t2i_outputs_pointed_at_inputs_are_refused(world, tmp_path):
    from ctrak_fast.models.shipped import ASSETS

    root = world[0]
    model = tmp_path / "t2i.safetensors"
    shutil.copy(ASSETS / "t2i_shapes16.safetensors", model)
    argv = ["t2i", "query", "--model", model, "--prompt", "a red circle", "--out", model]
    refused(argv, tmp_path, r"--out .*t2i\.safetensors is the input --model")
    q = root / "q.safetensors"
    argv = ["t2i", "attribute", "--store", root / "store", "--query", q, "--out", q]
    refused(argv, root, r"--out .* is the input --query")


def test_an_output_in_a_missing_folder_is_refused_before_the_work(world, monkeypatch):
    root = world[0]
    import ctrak_fast.engine.store as store_module

    def no_work(*a, **k):  # the store must not even be opened
        raise AssertionError("the store was opened before the output was checked")

    monkeypatch.setattr(store_module.FeatureStore, "open", no_work)
    out = root / "nodir" / "x.json"
    line = refused(attribute(root / "store", root / "q.safetensors", "--out", out), root, "nodir")
    assert ".tmp" not in line


def test_a_featurize_that_failed_on_nan_weights_does_not_block_the_right_one(world, tmp_path):
    _, model, data = world
    bad, _ = tiny_assets(tmp_path / "bad", nan_label=(0, 0))
    argv = ["featurize", "--data", data, "--method", "d-trak", "--k", "8", "--timesteps", "99"]
    out = tmp_path / "out"
    rc, _, err = run([*argv, "--model", bad, "--out", out])
    assert rc == 1 and "NaN/Inf per-sample gradients" in err, err
    assert not out.exists()  # nothing left: no 0-row manifest, no lock
    out.mkdir()
    FeatureStore.create(out, k=8, dtype="float32", meta={"model": "an older failed run"})
    rc, _, err = run([*argv, "--model", model, "--out", out])  # its 0-row leftover is replaced
    assert rc == 0 and FeatureStore.open(out).complete, err


def test_a_full_disk_leaves_no_tmp_and_one_line(world, monkeypatch, tmp_path):
    import safetensors.torch

    import ctrak_fast.engine.atomic as atomic

    root = world[0]
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    out = tmp_path / "r.json"
    with monkeypatch.context() as m:
        m.setattr(atomic.os, "write", full)
        refused(
            attribute(root / "store", root / "q.safetensors", "--out", out),
            tmp_path,
            r"cannot write .*r\.json: No space left on device$",
        )
    assert list(tmp_path.iterdir()) == []

    def save_full(tensors, name, metadata=None):
        Path(name).write_bytes(b"12345")
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_full)
    with pytest.raises(OSError, match=r"cannot write .*q2\.safetensors"):
        Query(torch.randn(1, K), ("a",)).save(tmp_path / "q2.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- 3. extreme numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [3e38, 1e13, float("inf")], ids=["3e38", "1e13", "inf"])
def test_an_extreme_query_is_refused(world, tmp_path, value):
    root = world[0]
    q = tmp_path / "big.safetensors"
    Query(torch.full((1, K), value), ("a",)).save(q)
    refused(attribute(root / "store", q), tmp_path, r"big\.safetensors: query features must be")


@pytest.fixture(scope="module")
def low_rank(world):
    """A store of 6 rows at k = 8: G is singular, so the damping decides everything."""
    path = world[0] / "low_rank"
    store = FeatureStore.create(path, k=K, dtype="float32", shard_rows=4)
    with store.writer() as w:
        w.append(torch.randn(6, K), torch.arange(6))
    return path


@pytest.mark.parametrize(
    "lam,path,message",
    [
        ("1e-300", "auto", r"lambda_r=1e-300 gives non-finite scores"),
        ("1e-300", "dual", r"lambda_r=1e-300 gives non-finite scores"),
        ("1e-300", "primal", r"not positive definite .*lambda_r=1e-300"),
        ("1e-300,1", "auto", r"not positive definite for lambda_r=\[1e-300\]"),
        ("1e308", "auto", r"lambda_r=1e\+308 gives an infinite damping"),
        ("1e308", "primal", r"lambda_r=1e\+308 gives an infinite damping"),
        ("1e308,1", "dual", r"lambda_r=1e\+308 damps every score to 0"),
        ("1e308,1", "primal", r"lambda_r=1e\+308 damps every score to 0"),
    ],
)
def test_an_extreme_lambda_is_refused(world, low_rank, lam, path, message):
    argv = attribute(low_rank, world[0] / "q.safetensors", "--lambda-r", lam)
    refused([*argv, "--scoring-path", path], world[0], message)


def test_a_search_never_reports_nan_scores_or_missing_ids():
    from ctrak_fast.engine.search_inputs import TopK
    from ctrak_fast.results import Attribution

    ok = torch.tensor([[1.0, 0.5]])
    for ids, scores in ((torch.tensor([[3, -1]]), ok), (torch.tensor([[3, 1]]), ok * math.nan)):
        with pytest.raises(ValueError, match="non-finite scores or missing ids"):
            Attribution.from_topk(TopK(scores, ids, None, None, "top"), ["q"])


# ---- 4. paths stay inside their folder; names are counted once --------------------------------


@pytest.fixture
def folder(tmp_path):
    """tmp/images/{0,1}.png, tmp/images/sub/, and tmp/outside/secret.png beside the folder."""
    from PIL import Image

    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    for i, where in enumerate((images / "0.png", images / "1.png", outside / "secret.png")):
        Image.new("RGB", (8, 8), (80 * i, 20, 200)).save(where)
    os.symlink(outside / "secret.png", images / "link.png")
    os.symlink(outside, images / "linkdir")
    return images


def labels_json(names: list[str]) -> bytes:
    return json.dumps({n: {"shape": str(i % 2)} for i, n in enumerate(names)}).encode()


LABELS_CASES = [  # (name, file name, bytes, expected message)
    ("same file as ./0.png", "l.json", labels_json(["0.png", "./0.png"]), r"lists '0\.png' more"),
    ("same file as sub/../0.png", "l.json", labels_json(["0.png", "sub/../0.png"]), r"'0\.png'"),
    (
        "same file in a CSV",
        "l.csv",
        b"filename,shape\n0.png,a\n./0.png,b\n",
        r"lists '0\.png' twice \(line 3\)",
    ),
    ("climbs out", "l.json", labels_json(["../outside/secret.png"]), r"not a file inside"),
    ("absolute path", "l.json", labels_json(["/etc/passwd"]), r"not a file inside"),
    ("symlinked file", "l.json", labels_json(["0.png", "link.png"]), r"leads outside"),
    ("symlinked folder", "l.json", labels_json(["linkdir/secret.png"]), r"leads outside"),
    ("CSV header repeats a column", "l.csv", b"filename,shape,c,c\n0.png,a,b,d\n", r"repeats"),
    ("CSV without a factor column", "l.csv", b"filename\n0.png\n1.png\n", r"no factor column"),
    ("JSON entries without factors", "l.json", b'{"0.png": {}, "1.png": {}}', r"name no factor"),
]


@pytest.mark.parametrize("name,fname,data,message", LABELS_CASES, ids=[c[0] for c in LABELS_CASES])
def test_labels_paths_are_contained_and_counted_once(folder, name, fname, data, message):
    labels = folder.parent / fname
    labels.write_bytes(data)
    argv = ["labels", "--folder", folder, "--labels", labels, "--image-size", "8"]
    refused(argv, folder.parent, message)


CONCEPTS = ["shape=circle,shape=square", "shape=circle,,", ",shape=circle"]


@pytest.mark.parametrize("concept", CONCEPTS)
def test_a_malformed_concept_is_refused(world, tmp_path, concept):
    _, model, _ = world
    out = tmp_path / "q.safetensors"
    argv = ["query", "--model", model, "--concept", concept, "--out", out, "--n-draws", "1"]
    refused(argv, tmp_path, r"bad condition .*(given twice|expected factor=value, got '')")


def test_report_follows_no_path_outside_and_refuses_non_results(tmp_path):
    res = tmp_path / "r.json"
    good = {"query": "/etc/passwd", "top": [{"label": "a", "ids": [1], "scores": [1.0]}]}
    good["bottom"] = good["top"]
    argv = ["report", "--result", res, "--out", tmp_path / "g.png"]
    for doc, message in (
        (good, r"its query '/etc/passwd' is outside the result's folder"),
        ([1, 2], r"not a result of `ctrak attribute`"),
        ({"top": [], "bottom": []}, r"not a result of `ctrak attribute`"),
    ):
        res.write_text(json.dumps(doc))
        refused(argv, tmp_path, message)


# ---- 5. model loading: registry classes only, safetensors only --------------------------------


def pipeline_folder(root: Path, unet_entry, weights: str | None) -> Path:
    """A pipeline folder whose model_index.json names `unet_entry`; unet/ holds `weights`."""
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    index = {"unet": unet_entry, "scheduler": ["diffusers", "DDIMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "unet" / "config.json").write_text("{}")
    if weights:
        (root / "unet" / weights).write_bytes(b"\x80\x04not really a pickle")
    return root


@pytest.mark.parametrize(
    "entry",
    [["os", "system"], ["diffusers", "DiffusionPipeline"], ["builtins", "eval"], "x", [None, 3]],
    ids=["os.system", "another diffusers class", "builtins.eval", "a string", "nonsense"],
)
def test_a_model_folder_cannot_choose_what_is_imported(tmp_path, monkeypatch, entry):
    import importlib

    from ctrak_fast.models.text2image import TextToImageAdapter

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda n, *a: imported.append(n) or real(n, *a))
    folder = pipeline_folder(tmp_path / "pipe", entry, "diffusion_pytorch_model.safetensors")
    with pytest.raises((ValueError, FileNotFoundError), match="not a diffusers|no unet"):
        TextToImageAdapter.from_pretrained(folder)
    assert not {"os", "builtins"} & set(imported)


def test_a_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    from ctrak_fast.models.text2image import TextToImageAdapter

    folder = pipeline_folder(
        tmp_path / "pipe", ["diffusers", "UNet2DConditionModel"], "diffusion_pytorch_model.bin"
    )
    with pytest.raises(ValueError, match=r"only pickle weights \['diffusion_pytorch_model.bin'\]"):
        TextToImageAdapter.from_pretrained(folder)


def test_dependencies_are_asked_for_safetensors_only(tmp_path, monkeypatch):
    import diffusers

    from ctrak_fast.models.text2image import TextToImageAdapter

    asked = {}

    def spy(cls, path, **kw):
        asked.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", classmethod(spy))
    folder = pipeline_folder(
        tmp_path / "pipe",
        ["diffusers", "UNet2DConditionModel"],
        "diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(RuntimeError, match="stop here"):
        TextToImageAdapter.from_pretrained(folder)
    assert asked == {"use_safetensors": True, "local_files_only": True}


def test_a_judge_is_loaded_where_a_judge_is_asked_for(world):
    from ctrak_fast.cli.inputs import load_model
    from ctrak_fast.engine.validation import InputError
    from ctrak_fast.models.factor_unet import ConceptJudge
    from ctrak_fast.models.shipped import ASSETS

    judge = ASSETS / "judge_shapes16.safetensors"
    assert isinstance(load_model(judge, judge=True), ConceptJudge)
    with pytest.raises(InputError, match=r"a FactorUNet checkpoint, not a judge \(ConceptJudge\)"):
        load_model(world[1], judge=True)


def test_every_weight_load_of_a_dependency_asks_for_safetensors():
    """The package's own text: a dependency's from_pretrained of weights names use_safetensors
    (pipeline_folder's registry loads are checked by the spy above)."""
    offenders = []
    for path in sorted((Path(__file__).resolve().parents[2] / "ctrak_fast").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            ours = "TextToImageAdapter.from_pretrained" in code or "def from_pretrained" in code
            if ".from_pretrained(" in code and not ours and "Tokenizer" not in code:
                if "use_safetensors=True" not in code:
                    offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []


def test_integer_weights_and_judge_files_are_not_models(world, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ctrak_fast.models.shipped import ASSETS

    _, model, _ = world
    with safe_open(str(model), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name] = state[name].to(torch.int64)
    save_file(state, str(tmp_path / "int.safetensors"), metadata=meta)
    for path, message in (
        (tmp_path / "int.safetensors", rf"weight '{re.escape(name)}' is torch.int64"),
        (ASSETS / "judge_shapes16.safetensors", r"a ConceptJudge checkpoint, not a diffusion"),
    ):
        argv = ["query", "--model", path, "--concept", "shape=circle", "--out", tmp_path / "q"]
        refused(argv, tmp_path, message)


# ---- 6. one line, never a traceback -------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_is_one_line(world, tmp_path):
    root, model, _ = world
    store = copy_store(root, "deep")
    (store / "manifest.json").write_text(DEEP)
    refused(["store", "info", store], root, r"manifest.json: unreadable manifest")
    (tmp_path / "images").mkdir()
    (tmp_path / "l.json").write_text(DEEP)
    argv = ["labels", "--folder", tmp_path / "images", "--labels", tmp_path / "l.json"]
    refused(argv, tmp_path, r"l\.json: invalid JSON \(nested too deeply\)")
    (tmp_path / "r.json").write_text(DEEP)
    argv = ["report", "--result", tmp_path / "r.json", "--out", tmp_path / "g.png"]
    refused(argv, tmp_path, r"r\.json: not a JSON attribute result \(nested too deeply\)")
    from safetensors.torch import save_file

    save_file({"queries": torch.ones(1, K)}, str(tmp_path / "q.st"), metadata={"ctrak": DEEP})
    refused(attribute(root / "store", tmp_path / "q.st"), tmp_path, r"q\.st: not a query file")


@pytest.mark.parametrize(
    "device,message",
    [("bogus", r"--device 'bogus' is not a device"), ("cuda", r"--device 'cuda': this build")],
)
def test_a_device_that_is_not_there_is_one_line(world, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the case is a CPU-only build asked for cuda
    root = world[0]
    refused(attribute(root / "store", root / "q.safetensors", "--device", device), root, message)


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_is_one_line_and_resumable(world, monkeypatch, sig, code):
    import signal
    import time

    import ctrak_fast.engine.store as store_module

    root = world[0]
    real_open = store_module.FeatureStore.open

    def interrupted(path):
        store = real_open(path)
        os.kill(os.getpid(), getattr(signal, sig))  # SIGINT: Python raises KeyboardInterrupt
        time.sleep(5)  # the handler interrupts this
        return store

    monkeypatch.setattr(store_module.FeatureStore, "open", interrupted)
    # a foreground Ctrl-C: a shell starts background jobs (a CI runner's, say) with SIGINT ignored
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = snapshot(root)
    try:
        rc, _, err = run(
            attribute(root / "store", root / "q.safetensors", "--out", root / "r.json")
        )
    finally:
        signal.signal(signal.SIGINT, old_int)
    assert (
        rc == code and err.strip() == "ctrak: error: interrupted; rerun the same command to resume"
    )
    assert snapshot(root) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone again


# ---- 7. images ----------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from ctrak_fast.data.images import load_image

    im = Image.new("RGB", (16, 8), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the red half on top
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "r.jpg", 16)
    red, blue = x[0], x[2]
    assert red[:6].mean() > 0.8 and blue[:6].mean() < -0.8  # the top rows are red
    assert red[10:].mean() < -0.8 and blue[10:].mean() > 0.8


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("1", (8000, 8000)).save(tmp_path / "bomb.png")  # 64 M pixels in a few kB
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    (tmp_path / "l.csv").write_text("filename,shape\nbomb.png,a\n")
    argv = ["labels", "--folder", tmp_path, "--labels", tmp_path / "l.csv", "--image-size", "8"]
    refused(argv, tmp_path, r"bomb\.png: 8000 x 8000 pixels, more than the 50,000,000")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard: a warning below 2x
    Image.new("RGB", (40, 40)).save(tmp_path / "bomb.png")
    refused(argv, tmp_path, r"bomb\.png: unreadable image \(DecompressionBombWarning")


def test_a_truncated_image_is_one_line(tmp_path):
    from PIL import Image

    Image.effect_noise((32, 32), 64).convert("RGB").save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "l.csv").write_text("filename,shape\nt.png,a\n")
    argv = ["labels", "--folder", tmp_path, "--labels", tmp_path / "l.csv", "--image-size", "8"]
    refused(argv, tmp_path, r"t\.png: unreadable image \(OSError")


FAMILIES = [  # the sections above, each a row of docs/CONTRACTS.md's table
    "incomplete store",
    "unprotected spec",
    "outputs at inputs",
    "missing output folder",
    "failed-run leftovers",
    "full disk",
    "extreme numbers",
    "paths outside the folder",
    "duplicates after normalisation",
    "labels and concepts",
    "model loading",
    "nested JSON",
    "results that are not results",
    "devices",
    "signals",
    "images",
]


def test_contracts_table_lists_every_family():
    text = (Path(__file__).resolve().parents[2] / "docs" / "CONTRACTS.md").read_text()
    assert [f for f in FAMILIES if f"| {f} |" not in text] == []


def test_a_folder_with_another_manifest_json_is_not_a_store(world, tmp_path):
    root = world[0]
    (tmp_path / "manifest.json").write_text('{"name": "a web app"}')
    out = tmp_path / "r.json"
    rc, _, err = run(attribute(root / "store", root / "q.safetensors", "--out", out))
    assert rc == 0 and out.is_file(), err


@pytest.mark.parametrize(
    "fname,text,message",
    [
        ("c.json", '{"../outside/secret.png": "a cat"}', r"not a file inside the image folder"),
        ("c.json", '{"link.png": "a cat"}', r"leads outside the image folder"),
        ("c.json", '{"0.png": "a", "./0.png": "b"}', r"names one image twice"),
        ("c.jsonl", "[1, 2]\n", r"c\.jsonl: not a captions file \(ValueError: expected one object"),
        ("c.json", DEEP, r"c\.json: not a captions file \(RecursionError"),
    ],
)
def test_t2i_captions_stay_inside_the_folder(folder, fname, text, message):
    from ctrak_fast.data.captions import read_captions

    (folder.parent / fname).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_captions(folder, folder.parent / fname)
