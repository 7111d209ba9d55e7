"""`ctrak featurize|query|attribute --pipeline DIR` on tiny DiT, PixArt and SD3 folders saved with
save_pretrained: each kind end to end from the CLI; DiT's captions name classes (id2label names
or numbers) and an unknown one is refused by name; the folder's model_index.json chooses no
class outside the allow-lists."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import captioned_images, run, snapshot
from tiny_pipelines import DIT_LABELS, save_dit_folder, tiny_pixart_pipeline, tiny_sd3_pipeline

from ctrak_fast.engine.store import FeatureStore

pytest.importorskip("diffusers")

FAST = ["--k", "32", "--timesteps", "99,499", "--inversion-steps", "10"]
QUERY = ["--n-draws", "1", "--steps", "10", *FAST]
WORDS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]
SHAPES = ["circle", "triangle", "square", " round ", "2", "triangle"]  # names, a synonym, a number


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: its pipeline folder}, and the captioned image folders (class names, prompts)."""
    tmp = tmp_path_factory.mktemp("kinds")
    (tmp / "vocab").mkdir()
    pipes = {"dit": save_dit_folder(tmp / "dit")}
    tiny_pixart_pipeline(tmp / "vocab").save_pretrained(tmp / "pixart")
    tiny_sd3_pipeline(tmp / "vocab").save_pretrained(tmp / "sd3")
    pipes.update(pixart=tmp / "pixart", sd3=tmp / "sd3")
    shapes = captioned_images(tmp / "shapes", SHAPES)
    return pipes, shapes, captioned_images(tmp / "words", WORDS)


def _one_error_line(rc, err, *words):
    lines = [line for line in err.splitlines() if line.startswith("ctrak: error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
def test_text_transformer_folders_end_to_end(folders, kind, tmp_path):
    pipes, _, words = folders
    store, q = tmp_path / "s", tmp_path / "q.safetensors"
    rc, out, err = run(["featurize", "--pipeline", pipes[kind], "--images", words, "--out", store,
                        *FAST])  # fmt: skip
    assert rc == 0 and "4 rows x k=32 (concept-trak-cond)" in out, err
    meta = FeatureStore.open(store).meta
    assert meta["method"] == "concept-trak-cond" and meta["text2image"]["text_encoder"]
    rc, out, err = run(["query", "--pipeline", pipes[kind], "--prompt", "a red triangle",
                        "--concept", "red", "--out", q, *QUERY])  # fmt: skip
    assert rc == 0 and "c-: ['a triangle']" in out, err
    rc, out, err = run(["attribute", "--store", store, "--query", q, "--k", "2"])
    res = json.loads(out)
    assert rc == 0 and res["removed"] == ["-red"], err
    assert set(res["top"][0]["files"]) <= {f"{i}.png" for i in range(4)}
    assert all(torch.isfinite(torch.tensor(res["top"][0]["scores"])))


def test_dit_folder_end_to_end_with_class_names(folders, tmp_path):
    pipes, shapes, _ = folders
    store, q = tmp_path / "s", tmp_path / "q.safetensors"
    rc, out, err = run(["featurize", "--pipeline", pipes["dit"], "--images", shapes, "--out",
                        store, *FAST])  # fmt: skip
    assert rc == 0 and "6 rows x k=32 (concept-trak-cond)" in out, err
    record = json.loads((store / "sources.json").read_text())
    assert record["captions"] == SHAPES  # what the user wrote; the rows' classes are below
    rc, out, err = run(["query", "--pipeline", pipes["dit"], "--prompt", "triangle", "--out", q,
                        *QUERY])  # fmt: skip
    assert rc == 0 and "class 'triangle'" in out, err
    rc, out, err = run(["attribute", "--store", store, "--query", q, "--k", "2"])
    res = json.loads(out)
    assert rc == 0 and res["concept"] == "triangle" and res["removed"] == ["-triangle"], err
    # Another class as c-: a second row, by its name; the class number names the same class.
    rc, out, err = run(["query", "--pipeline", pipes["dit"], "--prompt", "1", "--concept",
                        "triangle", "--negative-prompt", "round", "--out", q, *QUERY])  # fmt: skip
    assert rc == 0, err
    rc, out, err = run(["attribute", "--store", store, "--query", q, "--k", "2"])
    assert rc == 0 and json.loads(out)["removed"] == ["-1", "vs 'round'"], err


def test_dit_captions_map_to_the_pipeline_classes(folders):
    from ctrak_fast.models.pipeline_adapter import load_pipeline_adapter

    adapter = load_pipeline_adapter(folders[0]["dit"])
    assert adapter.labels == {"circle": 0, "round": 0, "triangle": 1, "square": 2}
    assert adapter.class_ids(SHAPES).flatten().tolist() == [0, 1, 2, 0, 2, 1]
    assert set(DIT_LABELS) == {"0", "1", "2"}
    for bad in ("dog", "3", "-1", "Triangle", "1.0"):
        with pytest.raises(ValueError, match=rf"{bad!r} is not a class of this DiT"):
            adapter.class_index(bad)


def test_dit_refuses_unknown_classes_by_name(folders, tmp_path):
    pipes, _, words = folders
    before = snapshot(tmp_path)
    rc, _, err = run(["featurize", "--pipeline", pipes["dit"], "--images", words, "--out",
                      tmp_path / "s", *FAST])  # fmt: skip
    _one_error_line(rc, err, "0.png: its caption 'a red triangle' is not a class", "'circle'")
    rc, _, err = run(["query", "--pipeline", pipes["dit"], "--prompt", "dog", "--out",
                      tmp_path / "q.safetensors", *QUERY])  # fmt: skip
    _one_error_line(rc, err, "--prompt 'dog' is not a class", "0..2")
    rc, _, err = run(["query", "--pipeline", pipes["dit"], "--prompt", "circle", "--concept",
                      "square", "--out", tmp_path / "q.safetensors", *QUERY])  # fmt: skip
    _one_error_line(rc, err, "--concept 'square'", "--negative-prompt")
    assert snapshot(tmp_path) == before  # nothing written, no latent cache


def test_model_index_chooses_only_known_classes(folders, tmp_path):
    """A transformer folder's _class_name must be a known transformer pipeline, and each
    component a class of its allowed library and base; a LoRA needs a UNet."""
    import shutil

    pipes, _, words = folders
    for name, edit, message in [
        ("cls", {"_class_name": "os.system"}, "is not a transformer pipeline ctrak loads"),
        ("mod", {"transformer": ["pickle", "loads"]}, "not a diffusers.ModelMixin class"),
        ("both", {"unet": ["diffusers", "UNet2DConditionModel"]}, "a unet/ and a transformer/"),
    ]:
        folder = tmp_path / name
        shutil.copytree(pipes["pixart"], folder)
        if name == "both":
            shutil.copytree(folder / "transformer", folder / "unet")
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, **edit}))
        rc, _, err = run(["featurize", "--pipeline", folder, "--images", words, "--out",
                          tmp_path / "s", *FAST])  # fmt: skip
        _one_error_line(rc, err, message)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"x")
    rc, _, err = run(["featurize", "--pipeline", pipes["sd3"], "--images", words, "--lora", lora,
                      "--out", tmp_path / "s", *FAST])  # fmt: skip
    _one_error_line(rc, err, "--lora is loaded onto a UNet", "SD3Transformer2DModel")
    assert not (tmp_path / "s").exists()
