"""Exports of an attribution (#30): `ctrak attribute --format json|csv|parquet`, each read back,
`Attribution.to_pandas()`, and reprs that summarise instead of printing tensors.

pyarrow and pandas are optional dependencies: the read-backs that need them skip without them,
and their absence is simulated to check the one-line messages."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch
from helpers import listing, run, write_store

from ctrak_fast.results import Attribution, Query

K, N = 8, 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of N rows and a query of two rows; the JSON result is the reference."""
    root = tmp_path_factory.mktemp("exports")
    gen = torch.Generator().manual_seed(0)
    write_store(root / "store", torch.randn(N, K, generator=gen), torch.arange(N) + 100, 5, {})
    Query(torch.randn(2, K, generator=gen), ("-shape", "-colour")).save(root / "q.safetensors")
    rc, _, err = run([*attribute(root), "--out", root / "ref.json"])
    assert rc == 0, err
    return root, json.loads((root / "ref.json").read_text())


def attribute(root, *extra) -> list:
    return ["attribute", "--store", root / "store", "--query", root / "q.safetensors", "--k", "3"]


def rows_of(ref: dict) -> list[tuple]:
    """(label, tail, rank, id, score) of every entry of the attribute JSON."""
    return [
        (entry["label"], tail, rank + 1, i, s)
        for tail in ("top", "bottom")
        for entry in ref[tail]
        for rank, (i, s) in enumerate(zip(entry["ids"], entry["scores"], strict=True))
    ]


def table_rows(cols: dict) -> list[tuple]:
    keys = ("label", "tail", "rank", "id", "score")
    return list(zip(*(cols[k] for k in keys), strict=True))


def test_csv_file_reads_back_as_the_json(world, tmp_path):
    root, ref = world
    rc, out, err = run([*attribute(root), "--format", "csv", "--out", tmp_path / "r.csv"])
    assert rc == 0, err
    with open(tmp_path / "r.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == ["query", "label", "lambda_r", "tail", "rank", "id", "score"]
    got = [
        (r["label"], r["tail"], int(r["rank"]), int(r["id"]), float(r["score"])) for r in records
    ]
    assert got == rows_of(ref)  # repr of a float32-as-float64 round-trips exactly
    assert {r["lambda_r"] for r in records} == {"1.0"}
    assert {int(r["query"]) for r in records if r["label"] == "-colour"} == {1}


def test_csv_to_stdout(world):
    root, ref = world
    rc, out, err = run([*attribute(root), "--format", "csv"])
    assert rc == 0, err
    records = list(csv.DictReader(io.StringIO(out)))
    assert len(records) == len(rows_of(ref)) == 2 * 2 * 3


def test_parquet_reads_back_with_its_header(world, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is optional")
    root, ref = world
    rc, out, err = run([*attribute(root), "--format", "parquet", "--out", tmp_path / "r.parquet"])
    assert rc == 0, err
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.column_names == ["query", "label", "lambda_r", "tail", "rank", "id", "score"]
    assert str(table.schema.field("id").type) == "int64"
    assert table_rows(table.to_pydict()) == rows_of(ref)
    header = json.loads(table.schema.metadata[b"ctrak"])
    assert header["store"] == str(root / "store") and header["removed"] == ["-shape", "-colour"]


def test_parquet_needs_out_a_usage_error(world):
    rc, out, err = run([*attribute(world[0]), "--format", "parquet"])
    assert rc == 2 and out == "" and err.startswith("ctrak: error: --format parquet needs --out")


def test_parquet_without_pyarrow_is_one_line_before_any_work(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    before = listing(tmp_path)
    rc, _, err = run([*attribute(world[0]), "--format", "parquet", "--out", tmp_path / "r.pq"])
    assert rc == 1 and err.splitlines() == [
        "ctrak: error: parquet export needs pyarrow (an optional dependency): pip install pyarrow"
    ]
    assert listing(tmp_path) == before


def test_a_lambda_sweep_labels_each_row_with_its_lambda(world):
    root, _ = world
    rc, out, err = run([*attribute(root), "--format", "csv", "--lambda-r", "0.1,10"])
    assert rc == 0, err
    records = list(csv.DictReader(io.StringIO(out)))
    by_query = {(r["query"], r["lambda_r"]) for r in records}
    assert by_query == {("0", "0.1"), ("1", "0.1"), ("2", "10.0"), ("3", "10.0")}
    assert {r["label"] for r in records if r["query"] == "2"} == {"-shape @ lambda_r=10"}


def test_help_shows_the_default_format():
    rc, out, _ = run(["attribute", "--help"])
    assert rc == 0 and "(default: json)" in " ".join(out.split())


def small_attribution() -> Attribution:
    ids, scores = torch.tensor([[3, 1], [2, 0]]), torch.tensor([[2.0, 1.0], [0.5, 0.25]])
    return Attribution(ids, scores, ids.flip(1), -scores, ("a", "b"), 1.0)


def test_to_pandas_is_the_table():
    pd = pytest.importorskip("pandas", reason="pandas is optional")
    r = small_attribution()
    df = r.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 8
    assert df.to_dict("list") == r.to_columns()
    assert df["id"].dtype == "int64" and df["score"].dtype == "float64"
    top_b = df[(df["tail"] == "top") & (df["label"] == "b")].sort_values("rank")
    assert top_b["id"].tolist() == [2, 0] and top_b["score"].tolist() == [0.5, 0.25]


def test_to_pandas_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"^Attribution.to_pandas\(\) needs pandas .*pip install"):
        small_attribution().to_pandas()


def test_reprs_summarise_never_print_tensors():
    q = Query(torch.randn(40, 32768), tuple(f"c{i}" for i in range(40)), {"model": "x"})
    text = repr(q)
    assert text.startswith("Query(m=40, k=32768, labels=('c0', 'c1', 'c2', 'c3', ... 36 more)")
    assert "tensor" not in text and len(text) < 200, text
    q_img = Query(torch.zeros(1, 4), ("q",), image=torch.zeros(3, 16, 16))
    assert "image=[3, 16, 16]" in repr(q_img)

    big = torch.arange(40 * 1000).reshape(40, 1000)
    r = Attribution(big, big.float(), None, None, q.labels, [0.1, 1.0])
    text = repr(r)
    assert text.startswith("Attribution(m=40, k=1000, tails=('top',), lambda_r=[0.1, 1.0]")
    assert "tensor" not in text and len(text) < 200, text
