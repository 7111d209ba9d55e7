"""A fuzz corpus of hostile inputs (hypothesis, >= 1,000 cases, deterministic).

Every case runs the real CLI in-process (`ctrak_fast.cli.app.main`) and must either work with
correct results, or print exactly one `ctrak: error:` line, exit 1 (2 for a flag value the parser
refuses) and leave nothing new on disk; either way every file that existed before keeps its bytes
(check_contract compares snapshots), and the labels family checks that no file outside the image
folder was opened (an audit hook). The families of #29 (outputs at inputs, nested JSON, image
files, model files and folders, flags that are run) are in tests/cli/test_fuzz_io.py; the helpers
both use are tests/helpers.py's.
The corpus covers manifests, shard files, query files, labels files (JSON and CSV) and every
numeric / list / regex flag of the parser. It is derandomised: a failure prints its example and
reproduces on every run (hypothesis's `print_blob` gives the seed blob to replay it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import FUZZ, TEXT, check_contract, run, snapshot, write_store
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ctrak_fast.cli import argtypes
from ctrak_fast.cli.app import build_parser
from ctrak_fast.results import Query

K, N = 16, 40


OPENED: list[str] | None = None  # paths opened while recording (the audit hook below)


def _audit(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # cannot be removed; costs nothing while OPENED is None


@contextlib.contextmanager
def recording_opens():
    """Yield the list of real paths opened (any file, by any library) inside the block."""
    global OPENED
    OPENED = []
    try:
        yield OPENED
    finally:
        OPENED = None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A valid store (3 shards), a query file and the baseline attribution."""
    root = tmp_path_factory.mktemp("fuzz")
    gen = torch.Generator().manual_seed(0)
    feats, ids = torch.randn(N, K, generator=gen), torch.arange(1000, 1000 + N)
    write_store(root / "store", feats, ids, 16, {"a": 1})
    Query(torch.randn(2, K, generator=gen), ("q0", "q1")).save(root / "q.safetensors")
    rc, _, err = run(attribute_argv(root / "store", root / "q.safetensors", root / "base.json"))
    assert rc == 0, err
    base = json.loads((root / "base.json").read_text())
    (root / "base.json").unlink()
    return root, base


def attribute_argv(store, query, out) -> list:
    return ["attribute", "--store", store, "--query", query, "--k", "5", "--out", out]


def results(path: Path) -> list:
    d = json.loads(path.read_text())
    return [(t["ids"], t["scores"]) for t in d["top"] + d["bottom"]]


def fresh_copy(world, name: str) -> Path:
    root, _ = world
    case = root / "cases" / name
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(root / "store", case / "store")
    shutil.copy(root / "q.safetensors", case / "q.safetensors")
    return case


def verify_and_attribute(case: Path, base: dict) -> tuple[bool, bool]:
    """`store verify`, `store info`, then `attribute`; each under the contract. Returns whether
    verify and attribute worked, and checks that a working attribute gives the baseline."""
    worked = []
    for argv in (["store", "verify", case / "store"], ["store", "info", case / "store"]):
        before = snapshot(case)
        rc, _, err = run(argv)
        worked.append(check_contract(rc, err, before, snapshot(case)))
    before = snapshot(case)
    out = case / "r.json"
    rc, _, err = run(attribute_argv(case / "store", case / "q.safetensors", out))
    ok = check_contract(rc, err, before, snapshot(case))
    if ok:
        assert results(out) == [(t["ids"], t["scores"]) for t in base["top"] + base["bottom"]]
        out.unlink()
    return worked[0], ok


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
KEYS = [
    "format_version",
    "k",
    "dtype",
    "shard_rows",
    "meta",
    "n_rows",
    "shards",
    "complete",
    "expected_rows",
    "spec_sha256",
    "created_by",
    "extra",
]
RECORD_KEYS = [
    "file",
    "first_row",
    "rows",
    "bytes",
    "sha256",
    "ids_sha256",
    "crc32c",
    "zeroed_ids",
    "extra",
]
ODD_NAMES = [
    "../shard-00000.safetensors",
    "shard-00000.safetensors",
    "shard-0.safetensors",
    "",
    "shard-00009.safetensors",
    "/etc/passwd",
    "shard-00001.safetensors\x00",
]


@st.composite
def manifest_edits(draw):
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "delete", "record", "dup", "swap", "name"]))
        if kind == "set":
            ops.append((kind, draw(st.sampled_from(KEYS)), draw(JSON)))
        elif kind == "delete":
            ops.append((kind, draw(st.sampled_from(KEYS)), None))
        elif kind == "record":
            key = draw(st.sampled_from(RECORD_KEYS))
            ops.append((kind, (draw(st.integers(0, 2)), key), draw(JSON)))
        elif kind == "name":
            ops.append((kind, draw(st.integers(0, 2)), draw(st.sampled_from(ODD_NAMES))))
        else:
            ops.append((kind, draw(st.integers(0, 2)), draw(st.integers(0, 2))))
    return ops


def apply_edits(m: dict, ops) -> dict:
    for kind, a, b in ops:
        shards = m.get("shards") if isinstance(m.get("shards"), list) else None
        if kind == "set":
            m[a] = b
        elif kind == "delete":
            m.pop(a, None)
        elif shards and kind == "record" and a[0] < len(shards) and isinstance(shards[a[0]], dict):
            shards[a[0]][a[1]] = b
        elif shards and kind == "name" and a < len(shards) and isinstance(shards[a], dict):
            shards[a]["file"] = b
        elif shards and kind == "dup" and a < len(shards):
            shards.insert(b, json.loads(json.dumps(shards[a])))
        elif shards and kind == "swap" and max(a, b) < len(shards):
            shards[a], shards[b] = shards[b], shards[a]
    return m


@settings(FUZZ, max_examples=300)
@given(ops=manifest_edits())
def test_manifest_mutations(world, ops):
    root, base = world
    case = fresh_copy(world, "manifest")
    path = case / "store" / "manifest.json"
    m = apply_edits(json.loads(path.read_text()), ops)
    path.write_text(json.dumps(m))
    verified, attributed = verify_and_attribute(case, base)
    if verified:  # verify checks at least what attribute checks
        assert attributed, ops


@st.composite
def shard_damage(draw):
    kind = draw(st.sampled_from(["flip", "truncate", "append", "header_len", "header"]))
    shard = draw(st.integers(0, 2))
    if kind == "flip":
        return kind, shard, (draw(st.integers(0, 10**6)), draw(st.integers(1, 255)))
    if kind == "truncate":
        return kind, shard, draw(st.integers(0, 10**6))
    if kind == "append":
        return kind, shard, draw(st.binary(min_size=1, max_size=16))
    if kind == "header_len":
        return kind, shard, draw(st.integers(0, 1 << 62))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw(st.sampled_from(["F16", "I64", "BF16", [K], [1, K], [0, 0], [-1, 3], "x"]))
    return kind, shard, (draw(st.sampled_from(["features", "ids"])), field, value)


def damage(data: bytes, kind: str, arg) -> bytes:
    if kind == "flip":
        pos, xor = arg
        pos %= len(data)
        return data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1 :]
    if kind == "truncate":
        return data[: arg % len(data)]
    if kind == "append":
        return data + arg
    n = int.from_bytes(data[:8], "little")
    if kind == "header_len":
        return arg.to_bytes(8, "little") + data[8:]
    header = json.loads(data[8 : 8 + n])
    tensor, field, value = arg
    header[tensor][field] = value
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


@settings(FUZZ, max_examples=250)
@given(d=shard_damage())
def test_shard_damage(world, d):
    _, base = world
    kind, shard, arg = d
    case = fresh_copy(world, "shard")
    file = case / "store" / f"shard-{shard:05d}.safetensors"
    original = file.read_bytes()
    damaged = damage(original, kind, arg)
    file.write_bytes(damaged)
    verified, attributed = verify_and_attribute(case, base)
    if damaged != original:  # any changed byte is found by verify and by the default reader
        assert not verified and not attributed, d


@st.composite
def query_files(draw):
    kind = draw(st.sampled_from(["bytes", "truncate", "shard", "tensors", "meta"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=64))
    if kind == "truncate":
        return kind, draw(st.integers(0, 400))
    if kind == "shard":
        return kind, None
    if kind == "tensors":
        name = draw(st.sampled_from(["queries", "features", "image"]))
        shape = draw(st.sampled_from([[2, K], [K], [2, K + 1], [0, K], [1, 1, K]]))
        fill = draw(st.sampled_from([0.0, 1.0, math.nan, math.inf]))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64]))
        return kind, (name, shape, fill, dtype)
    return kind, draw(
        st.sampled_from(
            [
                '{"removed": 5}',
                "[1]",
                "not json",
                '{"removed": ["a"]}',
                '{"model": "x"}',
                '{"removed": ["a", "b"]}',
            ]
        )
    )


@settings(FUZZ, max_examples=150)
@given(q=query_files())
def test_query_file_mutations(world, q):
    from safetensors.torch import save_file

    root, _ = world
    kind, arg = q
    case = fresh_copy(world, "query")
    qfile = case / "q.safetensors"
    good = Query.load(root / "q.safetensors")
    if kind == "bytes":
        qfile.write_bytes(arg)
    elif kind == "truncate":
        qfile.write_bytes(qfile.read_bytes()[:arg])
    elif kind == "shard":
        shutil.copy(case / "store" / "shard-00000.safetensors", qfile)
    elif kind == "tensors":
        name, shape, fill, dtype = arg
        save_file({name: torch.full(shape, fill).to(dtype)}, str(qfile))
    else:
        save_file({"queries": good.features}, str(qfile), metadata={"ctrak": arg})
    before = snapshot(case)
    out = case / "r.json"
    rc, _, err = run(attribute_argv(case / "store", qfile, out))
    if check_contract(rc, err, before, snapshot(case)):  # a usable query: scored as the library
        loaded = Query.load(qfile)
        assert torch.isfinite(loaded.features).all() and loaded.features.shape[1] == K
        assert len(json.loads(out.read_text())["top"]) == loaded.m


VALUES = st.sampled_from(["a", "b", "c", "", "ä", 3, None, True, [1], {"x": 1}, "a,b"])
FACTORS = st.sampled_from(["digit", "colour", "bg", "", "file", "filename"])


@st.composite
def labels_files(draw):
    names = draw(
        st.lists(
            st.sampled_from(
                [
                    "0.png",
                    "1.png",
                    "2.png",
                    "3.png",
                    "missing.png",
                    "../0.png",
                    "x.txt",
                    "./0.png",
                    "sub/../1.png",
                    "link.png",
                    "linkdir/secret.png",
                    "../outside/secret.png",
                    "/OUTSIDE/secret.png",
                ]
            ),
            min_size=0,
            max_size=5,
        )
    )
    rows = [(n, draw(st.dictionaries(FACTORS, VALUES, max_size=3))) for n in names]
    fmt = draw(st.sampled_from(["mapping", "records", "csv", "junk"]))
    held = draw(st.lists(st.dictionaries(FACTORS, VALUES, max_size=2), max_size=2))
    if fmt == "mapping":
        text = "{" + ",".join(f"{json.dumps(n)}: {json.dumps(d)}" for n, d in rows) + "}"
        return "l.json", text.encode()
    if fmt == "records":
        doc = {"samples": [{"file": n, **d} for n, d in rows], "held_out": held}
        return "l.json", json.dumps(doc).encode()
    if fmt == "csv":
        cols = sorted({f for _, d in rows for f in d if f not in ("filename",)})
        lines = [",".join(["filename", *cols])]
        lines += [",".join([n, *(str(d.get(c, "")) for c in cols)]) for n, d in rows]
        return "l.csv", "\n".join(lines).encode()
    return draw(st.sampled_from(["l.json", "l.csv"])), draw(st.binary(max_size=40))


@settings(FUZZ, max_examples=250)
@given(lab=labels_files())
def test_labels_file_mutations(world, lab):
    root, _ = world
    folder = root / "images"
    outside = root / "outside"  # beside the folder: no command may open a file in it
    if not folder.exists():
        (folder / "sub").mkdir(parents=True)
        outside.mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 20, 200 - 40 * i)).save(folder / f"{i}.png")
        Image.new("RGB", (8, 8)).save(outside / "secret.png")
        (folder / "x.txt").write_text("not an image")
        os.symlink(outside / "secret.png", folder / "link.png")
        os.symlink(outside, folder / "linkdir")
    name, data = lab
    labels = root / name
    labels.write_bytes(data.replace(b"/OUTSIDE", str(outside).encode()))
    before = snapshot(root)
    with recording_opens() as opened:
        rc, out, err = run(["labels", "--folder", folder, "--labels", labels, "--image-size", "8"])
    real_outside = str(outside.resolve())
    assert not [p for p in opened if p.startswith(real_outside + os.sep)], opened
    if check_contract(rc, err, before, snapshot(root)):
        from ctrak_fast.data import load_image_folder
        from ctrak_fast.data.folder import read_labels

        table, _ = read_labels(labels)
        ds = load_image_folder(folder, labels, image_size=8)
        assert out.startswith(f"{len(table)} images")
        for row, (fname, factors) in zip(ds.captions.tolist(), table.items(), strict=True):
            # a factor absent, null or "" is a caption that leaves it out: the null index
            named = {f: v for f, v in factors.items() if v != ""}
            told = {
                f: ds.values[f][v]
                for f, v in zip(ds.factors, row, strict=True)
                if v < len(ds.values[f])
            }
            assert told == named
            assert (folder / fname).resolve().is_relative_to(folder.resolve())


# Each argument type of the CLI and the value it must give (BAD: refused), written out here.
BAD = object()


def _int(text: str, low: int):
    try:
        v = int(text)
    except ValueError:
        return BAD
    return v if v >= low else BAD


def _float(text: str, low: float | None = None, strict: bool = False):
    try:
        v = float(text)
    except ValueError:
        return BAD
    if not math.isfinite(v) or (low is not None and (v <= low if strict else v < low)):
        return BAD
    return v


def _distinct(parts: list):
    ok = parts and BAD not in parts and len(set(parts)) == len(parts)
    return parts if ok else BAD


def _regex(text: str):
    if text.startswith("@"):
        return text
    try:
        re.compile(text)
    except re.error:
        return BAD
    return text


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    return parts if all(parts) else []  # an empty item: the whole list is refused


EXPECT = {
    argtypes.positive_int: lambda t: _int(t, 1),
    argtypes.nonneg_int: lambda t: _int(t, 0),
    argtypes.finite_float: lambda t: _float(t),
    argtypes.positive_float: lambda t: _float(t, 0.0, strict=True),
    argtypes.nonneg_float: lambda t: _float(t, 0.0),
    argtypes.fraction: lambda t: BAD if _float(t, 0.0) is BAD or _float(t) > 1 else _float(t),
    argtypes.lambda_list: lambda t: _distinct([_float(p, 0.0) for p in _parts(t)]),
    argtypes.timestep_list: lambda t: _distinct([_int(p, 0) for p in _parts(t)]),
    argtypes.regex: _regex,
    argtypes.width_list: lambda t: (
        BAD
        if (v := [_int(p, 1) for p in _parts(t)]) == [] or BAD in v or any(w % 8 for w in v)
        else tuple(v)
    ),
}


def typed_flags() -> list[tuple[list[str], str, object]]:
    """(argv prefix with the required arguments, flag, type) for every flag of the parser tree
    whose type is one of argtypes'."""
    out = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]):
        required = []
        for action in parser._actions:  # argparse has no public walk of its actions
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
                return
            if not action.option_strings:  # a positional: its first choice, or a name
                required.append(str(next(iter(action.choices))) if action.choices else "x")
            elif action.required:
                required += [action.option_strings[0], "x"]
        for action in parser._actions:
            if action.option_strings and action.type in EXPECT:
                out.append(([*prefix, *required], action.option_strings[0], action.type))

    walk(build_parser(), [])
    return out


FLAGS = typed_flags()


def test_every_numeric_flag_has_a_checked_type():
    names = {flag for _, flag, _ in FLAGS}
    assert {
        "--k",
        "--batch-size",
        "--per-combo",
        "--timesteps",
        "--lambda-r",
        "--param-filter",
        "--seed",
        "--guidance",
        "--weight",
        "--shard-rows",
        "--steps",
    } <= names
    raw = []  # no flag may take a bare int / float: every number is range-checked at the edge

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            elif action.type in (int, float):
                raw.append(action.option_strings)

    walk(build_parser())
    assert raw == []


@settings(FUZZ, max_examples=400)
@given(which=st.integers(0, len(FLAGS) - 1), text=TEXT)
def test_flag_values(which, text):
    argv, flag, kind = FLAGS[which]
    expected = EXPECT[kind](text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            ns = build_parser().parse_args([*argv, f"{flag}={text}"])
        except SystemExit as e:
            lines = err.getvalue().strip().splitlines()
            assert e.code == 2 and len(lines) == 1 and lines[0].startswith("ctrak: error:"), lines
            assert expected is BAD, (flag, text, err.getvalue())
            return
    assert expected is not BAD, (flag, text)
    assert getattr(ns, flag.lstrip("-").replace("-", "_")) == expected, (flag, text)
