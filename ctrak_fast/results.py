"""What a query and an attribution are on disk and in JSON, for every front (the Attributor,
`ctrak query|attribute`, `ctrak t2i query|attribute`): one query file format, one attribute JSON,
and one rule for which queries a store can score.

The rule (:func:`check_query_store`): the query's model, projection, parameter filter and (for
text-to-image models) text encoder / VAE / prediction type must be the store's. A whole-image query
(``meta["kind"] == "image"``: the training recipe applied to the query image) must also have the
store's whole feature spec; a concept query may be scored against any training loss.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ctrak_fast.engine.atomic import atomic_path, atomic_write_text
from ctrak_fast.engine.search_inputs import TopK
from ctrak_fast.engine.store import FeatureStore, SpecMismatch, StoreError
from ctrak_fast.exports import csv_text, require_format, write_parquet
from ctrak_fast.method.methods import METHODS

T2I_KEYS = ("vae", "text_encoder", "text_encoder_2", "prediction_type", "max_length")
TABLE_COLUMNS = ("query", "label", "lambda_r", "tail", "rank", "id", "score")


@dataclass(frozen=True)
class Query:
    """Query features: one row per question asked (e.g. one per concept removed).

    Attributes:
        features: [m, k] float32, projected like the training features.
        labels: m labels, e.g. ("-shape", "-colour") or ("image 0",).
        meta: how the features were made (model fingerprint, feature / projection / query specs);
            `Attributor.attribute` refuses a store whose meta differs.
        image: the query image [C, H, W] float32 in [-1, 1] (pixels), or None.

    Examples:
        >>> import torch
        >>> q = Query(torch.zeros(2, 8), ("-shape", "-colour"))
        >>> q.m, q.k
        (2, 8)
    """

    features: Tensor
    labels: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    image: Tensor | None = None

    def __post_init__(self) -> None:
        f = self.features
        if f.dim() != 2 or not f.is_floating_point():
            raise ValueError(f"query features must be floating [m, k], got {list(f.shape)}")
        object.__setattr__(self, "labels", tuple(str(s) for s in self.labels))
        if len(self.labels) != f.shape[0]:
            raise ValueError(f"{len(self.labels)} labels for {f.shape[0]} query rows")

    def __repr__(self) -> str:
        """Shapes and labels, never the tensors (a query of k = 32768 would fill the screen)."""
        image = "None" if self.image is None else list(self.image.shape)
        return (
            f"Query(m={self.m}, k={self.k}, labels={_short(self.labels)}, "
            f"dtype={str(self.features.dtype).removeprefix('torch.')}, image={image}, "
            f"meta keys={sorted(self.meta)})"
        )

    @property
    def m(self) -> int:
        """Number of query rows."""
        return int(self.features.shape[0])

    @property
    def k(self) -> int:
        """Feature dimension (the projection's k)."""
        return int(self.features.shape[1])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file ("queries" [m,k], optional "image" [1,C,H,W], JSON meta).

        The format of `ctrak query`: `ctrak attribute --query PATH` reads it. Atomic (tmp +
        rename).

        Examples:
            >>> import tempfile, torch
            >>> p = Query(torch.ones(1, 4), ("a",)).save(tempfile.mkdtemp() + "/q.safetensors")
            >>> Query.load(p).labels
            ('a',)
        """
        from safetensors.torch import save_file

        out = Path(path)
        tensors = {"queries": self.features.detach().float().cpu().contiguous()}
        if self.image is not None:
            tensors["image"] = self.image.detach().float().cpu().reshape(1, *self.image.shape)
        meta = {**self.meta, "removed": list(self.labels)}
        from safetensors import SafetensorError

        with atomic_path(out) as tmp:
            try:
                save_file(tensors, str(tmp), metadata={"ctrak": json.dumps(meta)})
            except SafetensorError as e:  # e.g. a full disk: an OSError, one line in the CLI
                raise OSError(f"cannot write {out}: {str(e).splitlines()[0]}") from e
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Query:
        """Read a file written by :meth:`save` or by `ctrak query`."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise ValueError(f"query file {path} does not exist (or is not a file)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("ctrak", "{}"))
                if "queries" not in f.keys():
                    raise ValueError("it holds no 'queries' tensor (a store shard?)")
                features = f.get_tensor("queries")
                image = f.get_tensor("image")[0] if "image" in f.keys() else None
        except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a query file of `ctrak query` ({first})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: not a query file of `ctrak query` (metadata is not a dict)")
        if features.is_floating_point() and features.numel():
            from ctrak_fast.engine.scoring import MAX_QUERY_ABS

            top = float(features.double().abs().max())  # NaN propagates: refused below too
            if not top <= MAX_QUERY_ABS:
                raise ValueError(
                    f"{path}: query features must be finite and within +-{MAX_QUERY_ABS:g} "
                    f"(largest magnitude {top:.3g})"
                )
        labels = meta.pop("removed", None) or [f"query {i}" for i in range(len(features))]
        if not isinstance(labels, list) or len(labels) != len(features):
            raise ValueError(f"{path}: its labels do not match its {len(features)} query rows")
        return cls(features, tuple(labels), meta, image)


@dataclass(frozen=True)
class Attribution:
    """Exact top-k training samples per query row, both tails (a tail not asked for is None).

    Attributes:
        top_ids: [m, k] int64 ids of the most supporting samples, best first.
        top_scores: [m, k] float32 their scores (positive: the sample supports the query).
        bottom_ids: [m, k] int64 ids of the most opposing samples, most negative first.
        bottom_scores: [m, k] float32.
        labels: the query's m row labels.
        lambda_r: the relative damping used.
        names: what the store records of the ids in it (:meth:`named`): {"ids": [...],
            "files": [...], "captions": [...]} (files only for an image folder's store), or None.

    Examples:
        >>> import torch
        >>> r = Attribution(torch.tensor([[3, 1]]), torch.tensor([[2.0, 1.0]]), None, None, ("q",))
        >>> r.to_dict()["top"]
        [{'label': 'q', 'ids': [3, 1], 'scores': [2.0, 1.0]}]
        >>> r
        Attribution(m=1, k=2, tails=('top',), lambda_r=1.0, labels=('q',))
    """

    top_ids: Tensor | None
    top_scores: Tensor | None
    bottom_ids: Tensor | None
    bottom_scores: Tensor | None
    labels: tuple[str, ...]
    lambda_r: float = 1.0
    names: Mapping[str, list[Any]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_topk(cls, res: TopK, labels: Sequence[str], lambda_r: float = 1.0) -> Attribution:
        """Wrap a :class:`ctrak_fast.TopK` from :func:`ctrak_fast.topk`; refuses NaN / Inf
        scores and padding ids (-1): a result holding them would be silently wrong."""
        import torch

        for what, ids, scores in (
            ("top", res.top_ids, res.top_values),
            ("bottom", res.bottom_ids, res.bottom_values),
        ):
            if ids is None or scores is None:
                continue
            if not bool(torch.isfinite(scores).all()) or bool((ids < 0).any()):
                raise ValueError(
                    f"the search gave non-finite scores or missing ids in its {what} tail "
                    "(damaged features read without checks, or an extreme lambda_r): rerun with "
                    "--verify full, or another lambda_r"
                )
        return cls(
            res.top_ids, res.top_values, res.bottom_ids, res.bottom_values, tuple(labels), lambda_r
        )

    def __repr__(self) -> str:
        """Sizes, tails, damping and labels, never the tensors."""
        ids = self.top_ids if self.top_ids is not None else self.bottom_ids
        k = 0 if ids is None else int(ids.shape[1])
        tails = tuple(tail for tail, *_ in self._tails())
        return (
            f"Attribution(m={len(self.labels)}, k={k}, tails={tails}, "
            f"lambda_r={self.lambda_r!r}, labels={_short(self.labels)})"
        )

    def _tails(self) -> list[tuple[str, Tensor, Tensor]]:
        pairs = (
            ("top", self.top_ids, self.top_scores),
            ("bottom", self.bottom_ids, self.bottom_scores),
        )
        return [(t, i, s) for t, i, s in pairs if i is not None and s is not None]

    def named(self, store: FeatureStore) -> Attribution:
        """This result with the file names and captions `store` records for its ids (itself,
        unchanged, when the store records none: made from tensors, or by an older version).
        StoreError when the store records them but its sources.json is missing or altered."""
        from dataclasses import replace

        from ctrak_fast.data.sources import source_names
        from ctrak_fast.engine.store.sources import read_sources

        if "sources" not in store.meta:
            return self
        record = read_sources(store.path, store.meta)
        ids = sorted({int(i) for _, t, _ in self._tails() for i in t.reshape(-1).tolist()})
        return replace(self, names={"ids": ids, **source_names(record, ids)})

    def _names_of(self, ids: list[int]) -> dict[str, list[Any]]:
        if not self.names:
            return {}
        row = {i: r for r, i in enumerate(self.names["ids"])}
        return {
            key: [self.names[key][row[i]] for i in ids]
            for key in ("files", "captions")
            if key in self.names
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"lambda_r", "top": [{"label", "ids", "scores"}, ...], "bottom": ...};
        with :attr:`names`, each row also lists the ids' "files" and "captions"."""
        out: dict[str, Any] = {"lambda_r": self.lambda_r}
        for tail, ids, scores in self._tails():
            out[tail] = [
                {
                    "label": lab,
                    "ids": i.tolist(),
                    "scores": s.tolist(),
                    **self._names_of(i.tolist()),
                }
                for lab, i, s in zip(self.labels, ids, scores, strict=True)
            ]
        return out

    def to_columns(self) -> dict[str, list[Any]]:
        """The result as one long table, a row per (query row, tail, rank): columns "query" (row
        index), "label", "lambda_r" (of that row: a sweep's rows are lambda-major), "tail"
        ("top" | "bottom"), "rank" (1 = best), "id" and "score"; with :attr:`names`, "file"
        (an image folder's store) and "caption". What CSV, parquet and :meth:`to_pandas` hold.

        Examples:
            >>> import torch
            >>> ids, scores = torch.tensor([[3, 1]]), torch.tensor([[2.0, 1.0]])
            >>> r = Attribution(ids, scores, None, None, ("q",))
            >>> r.to_columns()["id"], r.to_columns()["rank"]
            ([3, 1], [1, 2])
        """
        cols: dict[str, list[Any]] = {name: [] for name in TABLE_COLUMNS}
        lambdas = self.lambda_r if isinstance(self.lambda_r, list | tuple) else [self.lambda_r]
        per_lambda = max(1, len(self.labels) // len(lambdas))
        for tail, ids, scores in self._tails():
            for row, (label, i, s) in enumerate(zip(self.labels, ids, scores, strict=True)):
                n = len(i)
                cols["query"] += [row] * n
                cols["label"] += [label] * n
                cols["lambda_r"] += [float(lambdas[min(row // per_lambda, len(lambdas) - 1)])] * n
                cols["tail"] += [tail] * n
                cols["rank"] += list(range(1, n + 1))
                cols["id"] += [int(x) for x in i.tolist()]
                cols["score"] += [float(x) for x in s.tolist()]
                for key, names in self._names_of(i.tolist()).items():
                    cols.setdefault(key.removesuffix("s"), []).extend(names)
        return cols

    def to_pandas(self) -> Any:
        """The :meth:`to_columns` table as a pandas DataFrame (pandas is optional: an ImportError
        says how to install it).

        Examples:
            >>> import torch
            >>> ids, scores = torch.tensor([[3, 1]]), torch.tensor([[2.0, 1.0]])
            >>> r = Attribution(ids, scores, None, None, ("q",))
            >>> r.to_pandas()[["tail", "rank", "id", "score"]].values.tolist()
            [['top', 1, 3, 2.0], ['top', 2, 1, 1.0]]
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "Attribution.to_pandas() needs pandas (an optional dependency): pip install pandas"
            ) from None
        return pd.DataFrame(self.to_columns())


class MethodMismatch(SpecMismatch):
    """A query of another method than the store's (field "method"), said by name."""

    def __init__(self, path: str | os.PathLike[str], stored: Any, given: str) -> None:
        super().__init__(Path(path), "method", stored, given)
        self.args = (
            f"the query is of method {given!r}, the store {path} of method {stored!r}: "
            "featurize and query with the same --method",
        )


def check_query_store(store: FeatureStore, meta: Mapping[str, Any]) -> None:
    """Refuse (SpecMismatch / StoreError naming the field) a query whose features mean nothing
    against `store` (the rule of the module docstring). meta: the query's meta."""
    # The method first, by name: other methods' features differ in every other field too.
    given, stored = meta.get("method"), store.meta.get("method")
    if isinstance(given, str) and stored is not None:
        wanted = METHODS[given].store_method if given in METHODS else given
        if wanted != stored:
            raise MethodMismatch(store.path, stored, given)
    keys = [k for k in ("model", "projection") if k in meta]
    if "projection" in meta and isinstance(store.meta.get("projection"), dict):
        # The kind first: "dense store, factorised query" says more than the k that differs.
        kinds = [
            p.get("kind", "dense") if isinstance(p, dict) else p
            for p in (store.meta["projection"], meta["projection"])
        ]
        if kinds[0] != kinds[1]:
            raise SpecMismatch(store.path, "projection.kind", *kinds)
    store.check_compatible({k: meta[k] for k in keys})
    if "text2image" in meta or "text2image" in store.meta:
        stored, given = store.meta.get("text2image", {}), meta.get("text2image", {})
        for key in T2I_KEYS:
            if stored.get(key) != given.get(key):
                raise SpecMismatch(store.path, f"text2image.{key}", stored.get(key), given.get(key))
    if "feature" not in meta:
        return
    if meta.get("kind") == "image":
        store.check_compatible({"feature": meta["feature"]})
        return
    # Gradients of other parameters live in other projection rows.
    q_filter = meta["feature"].get("param_filter")
    s_filter = store.meta.get("feature", {}).get("param_filter")
    if q_filter != s_filter:
        raise SpecMismatch(store.path, "feature.param_filter", s_filter, q_filter)


def check_store_readable(store: FeatureStore, format_version: int) -> None:
    """Refuse a store of a newer format or an unfinished one."""
    version = store.manifest.get("format_version", 0)
    if not isinstance(version, int) or version > format_version:
        raise StoreError(
            f"store {store.path} has format version {version!r}; this build reads "
            f"<= {format_version}"
        )
    store.check_complete()


def write_attribution(
    path: str | os.PathLike[str] | None,
    attribution: Attribution,
    fmt: str = "json",
    **header: Any,
) -> str:
    """The attribute result, written atomically to `path` when given. Returns the text ("" for
    parquet, which needs a `path`).

    fmt "json": `header` fields (store, query, removed, ...) then :meth:`Attribution.to_dict`.
    "csv": the :meth:`Attribution.to_columns` table (the header is left out). "parquet": that
    table, with the header as JSON in the schema metadata under "ctrak" (needs pyarrow).
    """
    require_format(fmt)
    if fmt == "parquet":
        if not path:
            raise ValueError("parquet is written to a file: give its path")
        write_parquet(path, attribution.to_columns(), {**header, "lambda_r": attribution.lambda_r})
        return ""
    if fmt == "csv":
        text = csv_text(attribution.to_columns())
    else:
        text = json.dumps({**header, **attribution.to_dict()}, indent=1)
    if path:
        atomic_write_text(path, text)
    return text


def _short(labels: Sequence[str], keep: int = 4) -> str:
    """A label tuple in a repr: the first `keep` and how many more."""
    if len(labels) <= keep:
        return repr(tuple(labels))
    return repr(tuple(labels[:keep]))[:-1] + f", ... {len(labels) - keep} more)"


__all__ = ["Attribution", "Query", "check_query_store", "check_store_readable", "write_attribution"]
