"""`ctrak featurize|query|attribute --pipeline DIR` on a tiny Stable Diffusion folder: the t2i
commands are aliases of the same code, --method is recorded and a query of another method is
refused by name, a concept that does not change the condition is an error naming the prompt,
--dtype is the execution precision (--store-dtype the storage), and every failure is one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import captioned_images, run, tiny_clip, tiny_sd_pipeline

pytest.importorskip("diffusers")

FAST = ["--k", "32", "--timesteps", "99,499", "--inversion-steps", "10"]
WORDS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(the SD pipeline folder, a captioned image folder of 4 images)."""
    from diffusers import DDIMScheduler

    tmp = tmp_path_factory.mktemp("sd")
    text_encoder, tokenizer = tiny_clip(tmp)
    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(
        text_encoder, tokenizer, DDIMScheduler(clip_sample=False, steps_offset=1)
    )
    pipe.save_pretrained(tmp / "pipe")
    return tmp / "pipe", captioned_images(tmp / "images", WORDS)


def _one_error_line(rc, err, *words):
    lines = [line for line in err.splitlines() if line.startswith("ctrak: error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


def test_t2i_alias_writes_the_same_store(sd, tmp_path):
    pipe, images = sd
    a, b = tmp_path / "a", tmp_path / "b"
    rc, out, err = run(["featurize", "--pipeline", pipe, "--images", images, "--out", a, *FAST])
    assert rc == 0, err
    assert "4 rows x k=32 (concept-trak-cond)" in out
    rc, _, err = run(["t2i", "featurize", "--model", pipe, "--images", images, "--out", b, *FAST])
    assert rc == 0, err
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_method_mismatch_is_refused_by_name(sd, tmp_path):
    pipe, images = sd
    store, q = tmp_path / "store", tmp_path / "q.safetensors"
    rc, _, err = run(["featurize", "--pipeline", pipe, "--images", images, "--out", store, *FAST])
    assert rc == 0, err
    query = ["--prompt", "a red triangle", "--concept", "red", "--n-draws", "1", "--steps", "3"]
    rc, out, err = run(["t2i", "query", "--model", pipe, *query, "--method", "concept-trak",
                        "--out", q, *FAST])  # fmt: skip
    assert rc == 0 and "concept-trak" in out, err
    rc, _, err = run(["attribute", "--store", store, "--query", q, "--k", "2"])
    _one_error_line(rc, err, "method 'concept-trak'", "method 'concept-trak-cond'")
    # The same method scores: a whole-image method too (--method works for every method).
    for method in ("concept-trak", "d-trak"):
        s, qm = tmp_path / f"s-{method}", tmp_path / f"q-{method}.safetensors"
        rc, _, err = run(["featurize", "--pipeline", pipe, "--images", images, "--out", s,
                          "--method", method, *FAST])  # fmt: skip
        assert rc == 0, err
        concept = ["--concept", "red"] if method == "concept-trak" else []
        rc, _, err = run(["query", "--pipeline", pipe, "--prompt", "a red triangle", *concept,
                          "--method", method, "--n-draws", "1", "--steps", "3", "--out", qm,
                          *FAST])  # fmt: skip
        assert rc == 0, err
        rc, out, err = run(["attribute", "--store", s, "--query", qm, "--k", "2"])
        assert rc == 0 and len(json.loads(out)["top"][0]["ids"]) == 2, err


def test_a_concept_that_changes_nothing_is_an_error(sd, tmp_path):
    """'pencil' lies past the tokenizer's 8 tokens: c+ and c- condition the model the same, so
    the query would be zero and every image would score 0."""
    pipe, _ = sd
    prompt = "a red triangle in the style of picasso pencil"
    rc, _, err = run(["query", "--pipeline", pipe, "--prompt", prompt, "--concept", "pencil",
                      "--out", tmp_path / "q.safetensors", *FAST])  # fmt: skip
    _one_error_line(rc, err, repr(prompt), "same condition")
    assert not (tmp_path / "q.safetensors").exists()


def test_execution_dtype_is_separate_from_storage(sd, tmp_path):
    pipe, images = sd
    store = tmp_path / "store"
    rc, _, err = run(["featurize", "--pipeline", pipe, "--images", images, "--out", store,
                      "--dtype", "bf16", "--store-dtype", "float16", *FAST])  # fmt: skip
    assert rc == 0, err
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["dtype"] == "float16"
    assert manifest["meta"]["text2image"]["execution_dtype"] == "bfloat16"
    # The FactorUNet path has no execution precision flag to honour: refused, not ignored.
    rc, _, err = run(["featurize", "--dtype", "bf16", "--out", tmp_path / "f"])
    _one_error_line(rc, err, "--dtype bf16", "--store-dtype")


def test_failures_are_one_line(sd, tmp_path, monkeypatch):
    pipe, images = sd
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"not a lora")
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if peft were missing
    rc, _, err = run(["featurize", "--pipeline", pipe, "--images", images, "--lora", lora,
                      "--out", tmp_path / "s", *FAST])  # fmt: skip
    _one_error_line(rc, err, "pip install peft")
    monkeypatch.undo()
    rc, _, err = run(["featurize", "--pipeline", pipe, "--images", images, "--lora", lora,
                      "--out", tmp_path / "s", *FAST])  # fmt: skip
    _one_error_line(rc, err, str(lora), "not a safetensors LoRA")
    rc, _, err = run(["featurize", "--pipeline", tmp_path, "--images", images,
                      "--out", tmp_path / "s", *FAST])  # fmt: skip
    _one_error_line(rc, err, "model_index.json")


def test_two_gloo_ranks_write_the_single_process_bytes(sd, tmp_path_factory, tmp_path):
    """torchrun-style ranks (forked with its environment) share one store: no "locked by another
    writer", rank 0 encodes the latents once, and the files are those of one process."""
    from forkserver import free_port, rank_env, shared_server, store_files

    pipe, images = sd
    server = shared_server(tmp_path_factory)
    argv = ["featurize", "--pipeline", pipe, "--images", images, "--batch-size", "2"]
    argv += ["--shard-rows", "2", *FAST]  # 4 images: 2 units
    single = server.run([*argv, "--out", tmp_path / "one"])
    assert single.rc == 0, single.stderr
    port = free_port()
    children = [
        server.start([*argv, "--out", tmp_path / "two"], env=rank_env(rank, 2, port))
        for rank in range(2)
    ]
    results = [server.wait(child) for child in children]
    assert [r.rc for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert "locked" not in results[0].stderr + results[1].stderr
    assert results[0].stdout.strip() and not results[1].stdout.strip()  # rank 0 reports
    assert store_files(tmp_path / "two") == store_files(tmp_path / "one")
    assert len(list(tmp_path.glob("two.latents-*.safetensors"))) == 1


def test_a_relative_images_folder_reaches_report(sd, tmp_path, monkeypatch):
    """`--images images` from the folder's parent: the store names 0.png (not images/0.png
    under images/), and report, run from elsewhere, draws the store's own images."""
    import shutil

    pipe, images = sd
    shutil.copytree(images, tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["featurize", "--pipeline", pipe, "--images", "images", "--out", "s", *FAST])
    assert rc == 0, err
    record = json.loads((tmp_path / "s" / "sources.json").read_text())
    assert record["root"] == str(tmp_path / "images")
    assert record["files"] == ["0.png", "1.png", "2.png", "3.png"]
    rc, _, err = run(["query", "--pipeline", pipe, "--prompt", "a red triangle", "--concept",
                      "red", "--n-draws", "1", "--steps", "3", "--out", "q.safetensors",
                      *FAST])  # fmt: skip
    assert rc == 0, err
    rc, _, err = run(["attribute", "--store", "s", "--query", "q.safetensors", "--k", "2",
                      "--out", "hits.json"])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "hits.json").read_text())["top"][0]["files"], err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    rc, out, err = run(["report", "--result", tmp_path / "hits.json", "--store", tmp_path / "s",
                        "--query", tmp_path / "q.safetensors", "--out", "g.png"])  # fmt: skip
    assert rc == 0 and (tmp_path / "elsewhere" / "g.png").is_file(), err
