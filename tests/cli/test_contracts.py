"""The bad inputs of docs/CONTRACTS.md, one by one: each gives its one `ctrak: error:` line (the
message the table shows), exit 2 for a bad flag (a usage error) or 1, and nothing new on disk.
The table must list every case here.

The generic corpus is tests/cli/test_fuzz.py; these are the named cases of a hostile pass (#16).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from forkserver import tiny_assets
from helpers import copy_store, run, snapshot, write_store

from ctrak_fast.results import Query

ROOT = Path(__file__).resolve().parents[2]
K = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("contracts")
    meta = {"m": 1, "projection": {"k": K, "seed": 0}}
    write_store(root / "store", torch.randn(10, K), torch.arange(10), 4, meta)
    Query(torch.randn(1, K), ("q",)).save(root / "q.safetensors")
    Query(torch.randn(1, K), ("q",), {"projection": {"kind": "factorized", "k_in": 2}}).save(
        root / "fq.safetensors"
    )
    (root / "notes.txt").write_text("not a query")
    model, data = tiny_assets(root / "assets")
    return root, model, data


def edit_manifest(store: Path, fn) -> None:
    m = json.loads((store / "manifest.json").read_text())
    fn(m)
    (store / "manifest.json").write_text(json.dumps(m))


def _shards_int(m):
    m["shards"] = 5


def _record_str(m):
    m["shards"][1] = "shard-00001.safetensors"


def _meta_list(m):
    m["meta"] = [1, 2]


def _dup_record(m):
    m["shards"][1] = dict(m["shards"][0], first_row=4)


def _ids_sha(m):
    m["shards"][0]["ids_sha256"] = "0" * 64


def _meta_k(m):
    m["meta"]["m"] = 2


STORE_CASES = [  # (name, manifest edit, command, expected message)
    ("manifest shards is a number", _shards_int, "verify", r"shards must be a list of records"),
    ("shard record is a string", _record_str, "info", r"shard record 1 is not an object"),
    ("meta is a list", _meta_list, "attribute", r"meta must be a JSON object"),
    ("duplicate shard record", _dup_record, "verify", r"repeats the file of an earlier one"),
    ("edited ids_sha256", _ids_sha, "verify", r"ids_sha256 does not match the shard's ids"),
    ("edited meta", _meta_k, "verify", r"meta was edited \(spec_sha256 does not match\)"),
]


@pytest.mark.parametrize("name,edit,command,message", STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_damaged_manifests(world, name, edit, command, message):
    root = world[0]
    store = copy_store(root, re.sub(r"\W", "_", name))
    edit_manifest(store, edit)
    if command == "attribute":
        argv = ["attribute", "--store", store, "--query", root / "q.safetensors", "--k", "2"]
    else:
        argv = ["store", command, store]
    before = snapshot(root)
    rc, _, err = run(argv)
    print(f"CASE {name}: {err.strip()}")
    assert rc == 1 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert snapshot(root) == before


def test_a_flipped_feature_byte_is_refused_by_the_default_search(world):
    root = world[0]
    store = copy_store(root, "flipped")
    shard = store / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1  # inside the features (the last tensor of the file)
    shard.write_bytes(bytes(data))
    rc, _, err = run(["attribute", "--store", store, "--query", root / "q.safetensors", "--k", "2"])
    print(f"CASE a flipped feature byte: {err.strip()}")
    assert rc == 1 and "crc32c mismatch, the shard is corrupt" in err, err


def featurize(world, out, *extra):
    root, model, data = world
    return [
        "featurize",
        "--model",
        model,
        "--data",
        data,
        "--method",
        "d-trak",
        "--k",
        "8",
        "--out",
        out,
        *extra,
    ]


def region_query(world, box: str) -> list:
    """`ctrak query` of the tiny model with --region `box`."""
    out = world[0] / "rq.safetensors"
    return [
        "query",
        "--model",
        world[1],
        "--concept",
        "shape=circle",
        "--region",
        box,
        "--out",
        out,
    ]


def attribute(world, query):
    return ["attribute", "--store", world[0] / "store", "--query", query, "--k", "2"]


CLI_CASES = [  # (name, argv maker, expected message)
    (
        "param-filter regex",
        lambda w: featurize(w, w[0] / "o1", "--param-filter", "("),
        r"argument --param-filter: '\(' is not a valid regular expression",
    ),
    (
        "timestep outside the schedule",
        lambda w: featurize(w, w[0] / "o2", "--timesteps", "5000"),
        r"timesteps \[5000\] are outside the model's schedule \(0\.\.999\)",
    ),
    (
        "negative timestep",
        lambda w: featurize(w, w[0] / "o3", "--timesteps", "-1"),
        r"argument --timesteps: must be >= 0, got -1",
    ),
    (
        "timesteps not integers",
        lambda w: featurize(w, w[0] / "o4", "--timesteps", "a,b"),
        r"argument --timesteps: 'a' is not an integer",
    ),
    (
        "negative per-combo",
        lambda w: featurize(w, w[0] / "o5", "--per-combo", "-1"),
        r"argument --per-combo: must be >= 0, got -1",
    ),
    (
        "query is a text file",
        lambda w: attribute(w, w[0] / "notes.txt"),
        r"notes\.txt: not a query file of `ctrak query`",
    ),
    (
        "query is a shard file",
        lambda w: attribute(w, w[0] / "store" / "shard-00000.safetensors"),
        r"no 'queries' tensor \(a store shard\?\)",
    ),
    (
        "factorised query, dense store",
        lambda w: attribute(w, w[0] / "fq.safetensors"),
        r"spec mismatch in 'projection\.kind'",
    ),
    (
        "query output in a missing folder",
        lambda w: [
            "query",
            "--model",
            w[1],
            "--concept",
            "shape=circle",
            "--out",
            w[0] / "nodir" / "q.safetensors",
        ],
        r"nodir",
    ),
    (
        "empty region box",
        lambda w: region_query(w, "4,4,2,8"),
        r"argument --region: '4,4,2,8' is empty",
    ),
    (
        "region box outside the image",
        lambda w: region_query(w, "0,0,40,8"),
        r"the region box \(0, 0, 40, 8\) is not inside the 8 x 8 image",
    ),
    (
        "lambda list with a repeat",
        lambda w: [*attribute(w, w[0] / "q.safetensors"), "--lambda-r", "1,1"],
        r"repeats a value",
    ),
]


# Refused by the parser (a flag's argparse type): usage errors, exit 2 like argparse's own.
USAGE_CASES = {
    "param-filter regex",
    "negative timestep",
    "timesteps not integers",
    "negative per-combo",
    "empty region box",
    "lambda list with a repeat",
}


@pytest.mark.parametrize("name,argv,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_flags_and_files(world, name, argv, message):
    root = world[0]
    before = snapshot(root)
    rc, _, err = run(argv(world))
    print(f"CASE {name}: {err.strip()}")
    assert rc == (2 if name in USAGE_CASES else 1), (rc, err)
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert snapshot(root) == before  # e.g. no 0-row store left by a bad --timesteps


LABEL_CASES = [  # (name, file name, bytes, expected message)
    (
        "CSV lists an image twice",
        "l.csv",
        b"filename,d\na.png,x\na.png,y\n",
        r"lists 'a.png' twice",
    ),
    (
        "JSON lists an image twice",
        "l.json",
        b'{"a.png": {"d": "x"}, "a.png": {"d": "y"}}',
        r"lists \['a.png'\] more than once",
    ),
    ("labels not UTF-8", "l.csv", b"filename,d\n\xff.png,x\n", r"l\.csv: not UTF-8 text"),
    (
        "labels' factors are not the model's",
        "l.json",
        b'{"a.png": {"digit": "3"}}',
        r"its factors \['digit'\] are not the model's \['shape', 'colour'\]: pass --model",
    ),
]


@pytest.mark.parametrize("name,fname,data,message", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_bad_labels(world, name, fname, data, message, tmp_path):
    from PIL import Image

    root, model, _ = world
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / fname).write_bytes(data)
    argv = ["labels", "--folder", tmp_path, "--labels", tmp_path / fname]
    if "model" in name:  # featurize with the shipped-style model: the factors must match
        argv = [
            "featurize",
            "--model",
            model,
            "--folder",
            tmp_path,
            "--labels",
            tmp_path / fname,
            "--image-size",
            "8",
            "--out",
            tmp_path / "out",
        ]
    before = snapshot(tmp_path)
    rc, _, err = run(argv)
    print(f"CASE {name}: {err.strip()}")
    assert rc == 1 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_contracts_table_lists_every_case():
    text = (ROOT / "docs" / "CONTRACTS.md").read_text()
    names = [c[0] for c in STORE_CASES + CLI_CASES + LABEL_CASES] + ["a flipped feature byte"]
    missing = [n for n in names if f"| {n} |" not in text]
    assert missing == [], f"docs/CONTRACTS.md lacks rows for {missing}"
