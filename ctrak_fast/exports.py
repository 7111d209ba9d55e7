"""Tables on disk: CSV (standard library) and parquet (pyarrow, an optional dependency), written
atomically like every other file of the package. The attribute result is one such table
(:meth:`ctrak_fast.Attribution.to_columns`); its JSON stays in results.py.

A table is a dict of equally long columns (lists of str / int / float).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctrak_fast.engine.atomic import atomic_path, atomic_write_text

FORMATS = ("json", "csv", "parquet")
PARQUET_HINT = "parquet export needs pyarrow (an optional dependency): pip install pyarrow"


def require_format(fmt: str) -> None:
    """Refuse a format this installation cannot write, before any work (ValueError / ImportError
    with one line saying what to do)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {list(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError(PARQUET_HINT) from None


def csv_text(columns: Mapping[str, Sequence[Any]]) -> str:
    """The table as CSV text: a header row, then one row per entry.

    Examples:
        >>> print(csv_text({"id": [3, 1], "score": [2.5, 1.0]}), end="")
        id,score
        3,2.5
        1,1.0
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(columns))
    writer.writerows(zip(*columns.values(), strict=True))
    return out.getvalue()


def write_csv(path: str | os.PathLike[str], columns: Mapping[str, Sequence[Any]]) -> Path:
    """Write :func:`csv_text` to `path` (tmp + rename)."""
    atomic_write_text(path, csv_text(columns))
    return Path(path)


def write_parquet(
    path: str | os.PathLike[str],
    columns: Mapping[str, Sequence[Any]],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the table as parquet (tmp + rename); `meta` (JSON-ready) goes into the schema's
    key-value metadata under "ctrak", so the file says where its rows came from."""
    require_format("parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(dict(columns))
    if meta:
        table = table.replace_schema_metadata({"ctrak": json.dumps(dict(meta))})
    out = Path(path)
    with atomic_path(out) as tmp:
        pq.write_table(table, str(tmp))
    return out


__all__ = ["FORMATS", "csv_text", "require_format", "write_csv", "write_parquet"]
