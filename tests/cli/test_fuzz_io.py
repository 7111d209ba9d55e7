"""The fuzz families of the second hostile pass (#29), under test_fuzz's contract and settings:
outputs pointed at inputs, deeply nested JSON in every JSON reader, image files (mode, size,
EXIF, truncation, bombs), model files and model folders, and attribute flags that are run.

Each case runs the real CLI in-process: it works, or prints one `ctrak: error:` line with exit 1;
either way every file that existed before keeps its bytes (test_fuzz.check_contract).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from forkserver import tiny_assets
from helpers import FUZZ, TEXT, check_contract, run, snapshot, write_store
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ctrak_fast.data.sources import file_sources
from ctrak_fast.models.shipped import ASSETS
from ctrak_fast.results import Query

K, N = 8, 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root/: a store, a query, a result, the tiny model and data config, an image folder."""
    root = tmp_path_factory.mktemp("fuzz_io")
    (root / "images").mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "images" / "0.png")
    # Every row's image is 0.png: the store's record, which `report` draws.
    files = [root / "images" / "0.png"] * N
    sources = file_sources(root / "images", files, ["red"] * N, list(range(N)))
    write_store(root / "store", torch.randn(N, K), torch.arange(N), 4, sources=sources)
    Query(torch.randn(2, K), ("a", "b"), image=torch.zeros(3, 8, 8)).save(root / "q.safetensors")
    rc, _, err = run(attribute(root, "--out", root / "r.json"))
    assert rc == 0, err
    model, data = tiny_assets(root / "assets")
    return root, model, data


def attribute(root: Path, *extra) -> list:
    return ["attribute", "--store", root / "store", "--query", root / "q.safetensors", *extra]


def contract(argv: list, root: Path) -> bool:
    before = snapshot(root)
    rc, _, err = run(argv)
    return check_contract(rc, err, before, snapshot(root))


# ---- outputs pointed at inputs --------------------------------------------------------------

TARGETS = [
    "q.safetensors",
    "store/manifest.json",
    "store/shard-00000.safetensors",
    "store/new.json",
    "store",
    "link_q",
    "hard_q",
    "r.json",
    "nodir/x.json",
    "assets",
    "new.json",
]
ALWAYS_REFUSED = {"store/manifest.json", "store/shard-00000.safetensors", "store/new.json"}
ALWAYS_REFUSED |= {"store", "nodir/x.json", "assets"}  # inside a store, folders, no folder
INPUTS = {  # the targets that are (another name of) an input of the command
    "attribute": {"q.safetensors", "link_q", "hard_q"},
    "query": set(),
    "report": {"r.json", "q.safetensors", "link_q", "hard_q"},  # the result names q
}


def reset_outputs(root: Path, saved: dict[str, bytes]) -> None:
    """The files a working case may have replaced, as the fixture made them."""
    for name, data in saved.items():
        (root / name).write_bytes(data)
    for name in ("link_q", "hard_q", "new.json"):
        (root / name).unlink(missing_ok=True)
    os.symlink(root / "q.safetensors", root / "link_q")
    os.link(root / "q.safetensors", root / "hard_q")


@settings(FUZZ, max_examples=60)
@given(
    command=st.sampled_from(["attribute --out", "attribute --export-scores", "query", "report"]),
    target=st.sampled_from(TARGETS),
)
def test_outputs_pointed_at_inputs(world, command, target):
    root, model, data = world
    saved = {n: (root / n).read_bytes() for n in ("q.safetensors", "r.json")}
    reset_outputs(root, saved)
    out = root / target
    if command.startswith("attribute"):
        argv = attribute(root, command.split()[1], out)
    elif command == "query":
        argv = ["query", "--model", model, "--concept", "shape=circle", "--out", out]
        argv += ["--n-draws", "1", "--timesteps", "99", "--k", "8"]
    else:
        argv = ["report", "--result", root / "r.json", "--out", out]
    before = snapshot(root)
    rc, _, err = run(argv)
    worked = check_contract(rc, err, before, snapshot(root), outputs=[target])
    refused = target in ALWAYS_REFUSED | INPUTS[command.split()[0]]
    assert worked != refused, (command, target, err)
    reset_outputs(root, saved)


# ---- deeply nested JSON ---------------------------------------------------------------------

READERS = ["manifest", "labels", "result", "query meta", "data config", "model config", "index"]


@settings(FUZZ, max_examples=40)
@given(
    reader=st.sampled_from(READERS),
    depth=st.sampled_from([1, 50, 5_000, 100_000]),
    bracket=st.sampled_from(["[]", "{}"]),
)
def test_nested_json(world, tmp_path_factory, reader, depth, bracket):
    root, model, data = world
    case = tmp_path_factory.mktemp("nested")
    open_, close = bracket
    text = (open_ + ('"a":' if open_ == "{" else "")) * depth + close * depth
    if open_ == "{":
        text = '{"a":' * depth + "1" + "}" * depth
    if reader == "manifest":
        shutil.copytree(root / "store", case / "store")
        (case / "store" / "manifest.json").write_text(text)
        argv = ["store", "verify", case / "store"]
    elif reader == "labels":
        shutil.copytree(root / "images", case / "images")
        (case / "l.json").write_text(text)
        argv = ["labels", "--folder", case / "images", "--labels", case / "l.json"]
    elif reader == "result":
        (case / "r.json").write_text(text)
        argv = ["report", "--result", case / "r.json", "--out", case / "g.png"]
    elif reader == "query meta":
        save_file({"queries": torch.ones(1, K)}, str(case / "q.st"), metadata={"ctrak": text})
        argv = ["attribute", "--store", root / "store", "--query", case / "q.st"]
    elif reader == "data config":
        (case / "d.json").write_text(text)
        argv = ["featurize", "--model", model, "--data", case / "d.json", "--out", case / "s"]
    elif reader == "model config":
        with safe_open(str(model), framework="pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(state, str(case / "m.st"), metadata={**meta, "config": text})
        argv = ["query", "--model", case / "m.st", "--concept", "shape=circle", "--out", case / "q"]
    else:
        (case / "pipe").mkdir()
        (case / "pipe" / "model_index.json").write_text(text)
        argv = ["t2i", "query", "--model", case / "pipe", "--prompt", "x", "--out", case / "q"]
    if reader == "query meta" and open_ == "{" and depth <= 50:
        contract(argv, case)  # a shallow JSON object is valid metadata: only the contract holds
        return
    assert not contract(argv, case)  # none of these is a usable input


# ---- image files ------------------------------------------------------------------------------

MODES = ["RGB", "RGBA", "L", "P", "1", "LA", "I;16", "CMYK", "F"]


@st.composite
def image_files(draw):
    return {
        "mode": draw(st.sampled_from(MODES)),
        "size": (draw(st.integers(1, 40)), draw(st.integers(1, 40))),
        "format": draw(st.sampled_from(["PNG", "JPEG"])),
        "orientation": draw(st.sampled_from([None, 1, 3, 6, 8, 0, 9, 65535])),
        "cut": draw(st.sampled_from([None, 0, 1, 8, 30, 0.5, 0.9])),
        "seed": draw(st.integers(0, 3)),
    }


def write_image(path: Path, spec: dict) -> bool:
    """Write the image of `spec`; False if PIL cannot write that combination."""
    gen = torch.Generator().manual_seed(spec["seed"])
    w, h = spec["size"]
    pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
    im = Image.fromarray(pixels, "RGB")
    try:
        im = im.convert(spec["mode"])
        exif = Image.Exif()
        if spec["orientation"] is not None:
            exif[0x0112] = spec["orientation"]
        im.save(path, spec["format"], exif=exif)
    except (OSError, ValueError, KeyError):
        return False
    cut = spec["cut"]
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    return True


@settings(FUZZ, max_examples=80)
@given(spec=image_files())
def test_image_files(world, tmp_path_factory, spec):
    case = tmp_path_factory.mktemp("image")
    name = "x.png" if spec["format"] == "PNG" else "x.jpg"
    if not write_image(case / name, spec):
        return
    Image.new("RGB", (8, 8)).save(case / "0.png")
    (case / "l.csv").write_text(f"filename,shape\n0.png,a\n{name},b\n")
    argv = ["labels", "--folder", case, "--labels", case / "l.csv", "--image-size", "8"]
    if contract(argv, case):
        assert spec["cut"] in (None, 0.9) and spec["mode"] in ("RGB", "RGBA", "L", "P", "1")


def test_a_bomb_in_the_corpus_is_refused(tmp_path):
    Image.new("1", (8000, 8000)).save(tmp_path / "b.png")
    (tmp_path / "l.csv").write_text("filename,shape\nb.png,a\n")
    argv = ["labels", "--folder", tmp_path, "--labels", tmp_path / "l.csv"]
    assert not contract(argv, tmp_path)


# ---- model files and model folders ------------------------------------------------------------


@st.composite
def model_files(draw):
    kind = draw(
        st.sampled_from(["judge", "int", "drop", "extra", "shape", "format", "cut", "config"])
    )
    if kind == "int":
        return kind, draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8]))
    if kind == "cut":
        return kind, draw(st.integers(0, 2000))
    if kind == "config":
        return kind, draw(st.sampled_from(['{"kind": "judge"}', '{"kind": "os"}', "[]", "x", "{}"]))
    return kind, draw(st.integers(0, 50))


@settings(FUZZ, max_examples=40)
@given(m=model_files())
def test_model_files(world, tmp_path_factory, m):
    root, model, _ = world
    kind, arg = m
    case = tmp_path_factory.mktemp("model")
    path = case / "m.safetensors"
    with safe_open(str(model), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    names = sorted(state)
    pick = names[arg % len(names)] if isinstance(arg, int) else None
    if kind == "judge":
        shutil.copy(ASSETS / "judge_shapes16.safetensors", path)
    elif kind == "cut":
        path.write_bytes(model.read_bytes()[:arg])
    else:
        if kind == "int":
            float_names = [n for n in names if state[n].is_floating_point()]
            state[float_names[0]] = state[float_names[0]].to(arg)
        elif kind == "drop":
            del state[pick]
        elif kind == "extra":
            state["extra.weight"] = torch.ones(2)
        elif kind == "shape":
            state[pick] = torch.ones(*state[pick].shape, 2)
        elif kind == "format":
            meta["format"] = "not ctrak"
        else:
            meta["config"] = arg
        save_file(state, str(path), metadata=meta)
    argv = ["query", "--model", path, "--concept", "shape=circle", "--out", case / "q"]
    assert not contract(argv, case), m  # every mutation makes the file unusable


ENTRIES = [
    ["diffusers", "UNet2DConditionModel"],
    ["diffusers", "UNet2DModel"],
    ["diffusers", "DiffusionPipeline"],
    ["os", "system"],
    ["subprocess", "Popen"],
    ["transformers", "CLIPTextModel"],
    ["diffusers", "__class__"],
    None,
    "diffusers",
]


@settings(FUZZ, max_examples=40)
@given(
    entry=st.sampled_from(ENTRIES),
    weights=st.sampled_from([None, "bin", "junk", "both"]),
    config=st.sampled_from(["{}", "[1]", "x", None]),
)
def test_model_folders(tmp_path_factory, entry, weights, config):
    case = tmp_path_factory.mktemp("pipe")
    pipe = case / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "scheduler").mkdir()
    index = {"unet": entry, "scheduler": ["diffusers", "DDIMScheduler"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    if config is not None:
        (pipe / "unet" / "config.json").write_text(config)
    if weights in ("bin", "both"):
        (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04junk")
    if weights in ("junk", "both"):
        (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk" * 4)
    argv = ["t2i", "query", "--model", pipe, "--prompt", "a cat", "--out", case / "q"]
    assert not contract(argv, case)


# ---- attribute flags that are run -------------------------------------------------------------


@settings(FUZZ, max_examples=60)
@given(
    k=st.one_of(st.integers(-1, N + 2).map(str), TEXT),
    lam=st.one_of(st.sampled_from(["1", "0", "1e-300", "1e308", "0.1,10", "0,1"]), TEXT),
    verify=st.sampled_from(["crc", "ids", "full", "none"]),
    path=st.sampled_from(["auto", "primal", "dual"]),
    precision=st.sampled_from(["float64", "mixed"]),
)
def test_attribute_flags_run(world, k, lam, verify, path, precision):
    root = world[0]
    out = root / "flags.json"
    argv = attribute(root, f"--k={k}", f"--lambda-r={lam}", "--verify", verify, "--out", out)
    if contract([*argv, "--scoring-path", path, "--gram-precision", precision], root):
        res = json.loads(out.read_text())
        out.unlink()
        for row in res["top"] + res["bottom"]:
            assert len(row["ids"]) == int(k) and all(0 <= i < N for i in row["ids"])
            assert all(math.isfinite(s) for s in row["scores"])
