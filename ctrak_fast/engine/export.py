"""Full-score export: every training row's score for a subset of queries, as one safetensors file.

Top-k (:mod:`.search`) never forms the N x queries score matrix; some analyses need it
anyway (score histograms, correlations with other methods, LDS). :func:`export_scores` writes it
without ever holding it: the file is preallocated, the header written first, and each block of
rows is scored (the CPU engine's kernels, so the values are bit-identical to what ``topk``
returns for the same rows) into a buffer of at most ``buffer_bytes`` and written to its place with
``pwrite``. The file appears under its name only when complete (written as ``<name>.tmp``,
fsync'ed, renamed); a failure removes the temporary file and leaves any previous file in place.

File layout (safetensors, readable lazily with ``safe_open(...).get_slice``)::

    "ids"     int64   [N]     training ids, in the source's row order
    "scores"  float32 [m, N]  scores[j, i] = features[i] . u[queries[j]]
    metadata "ctrak": JSON {"format": "ctrak-scores", "version": 1, "queries": [...],
                            "n_rows": N, "dim": k, "engine": "cpu" | "reference", ...}

Examples:
    >>> import tempfile, torch
    >>> from safetensors import safe_open
    >>> feats, u = torch.randn(100, 8), torch.randn(3, 8)
    >>> path = export_scores((feats, torch.arange(100)), u, tempfile.mkdtemp() + "/s.safetensors",
    ...                      queries=[2, 0])
    >>> with safe_open(path, framework="pt") as f:
    ...     f.get_slice("scores")[0, :5].shape, f.get_tensor("ids").shape
    (torch.Size([5]), torch.Size([100]))
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ctrak_fast.engine import native
from ctrak_fast.engine.search_inputs import check_queries, open_source, validated_shards

FORMAT = "ctrak-scores"
VERSION = 1
_BUFFER_BYTES = 32 << 20


def export_scores(
    source,
    u: Tensor,
    path: str | os.PathLike,
    queries: Sequence[int] | None = None,
    backend: Literal["auto", "cpu", "reference"] = "auto",
    num_threads: int = 0,
    verify: str = "crc",
    readahead: bool = True,
    buffer_bytes: int = _BUFFER_BYTES,
    meta: dict | None = None,
) -> Path:
    """Score every row of ``source`` against ``u[queries]`` and write a safetensors file.

    Args:
        source: a FeatureStore, a (features [n, dim], ids [n] int64) tuple, a features tensor
            (ids = row index), or an object with ``iter_shards()`` and ``n_rows`` (the file is
            preallocated, so the row count must be known up front).
        u: [m_all, dim] queries (e.g. the preconditioned queries of ``ctrak attribute``).
        path: output file; replaced atomically when complete.
        queries: indices into u of the queries to export, in output order (default: all).
        backend: "cpu" (the C++ engine: bit-identical to topk's values), "reference" (float64
            torch, rounded to float32) or "auto" (cpu when the extension is built).
        num_threads: CPU engine threads (0: $OMP_NUM_THREADS, else every CPU this process may use).
        verify, readahead: FeatureStore reading, as in :func:`ctrak_fast.engine.search.topk`.
        buffer_bytes: bound on the score buffer (rows are scored in blocks that fit).
        meta: extra JSON-serialisable entries for the file's ``ctrak`` metadata.
    Returns:
        The path written.
    Raises:
        ValueError: bad query indices, dimension mismatch, unknown backend.
        TypeError: a source without a known row count.
        OSError: the file cannot be written (ENOSPC is raised before any scoring).
    """
    if backend not in ("auto", "cpu", "reference"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'reference', got {backend!r}")
    shards, n_rows, dim, _, _ = open_source(source, verify, readahead)
    check_queries(u, dim)
    dim = int(u.shape[1])
    if n_rows is None:
        raise TypeError("export_scores needs a source that knows its row count (n_rows)")
    sel = list(range(u.shape[0])) if queries is None else [int(q) for q in queries]
    if not sel:
        raise ValueError("queries selects no query")
    bad = [q for q in sel if not 0 <= q < u.shape[0]]
    if bad:
        raise ValueError(f"query indices {bad[:5]} out of range for {u.shape[0]} queries")
    if backend == "auto":
        backend = "cpu" if native.available() else "reference"
        if backend == "reference":
            warnings.warn(
                f"ctrak_fast._C is not available; scores come from the slow torch reference. "
                f"{native.BUILD_HINT}",
                RuntimeWarning,
                stacklevel=2,
            )
    uq = u.detach()[sel].to("cpu", torch.float32).contiguous()
    m = len(sel)
    block = max(1, buffer_bytes // (4 * m))

    info = {"format": FORMAT, "version": VERSION, "queries": sel, "n_rows": n_rows, "dim": dim}
    info.update({"engine": backend, **(meta or {})})
    header = {
        "__metadata__": {"ctrak": json.dumps(info, sort_keys=True)},
        "ids": {"dtype": "I64", "shape": [n_rows], "data_offsets": [0, 8 * n_rows]},
        "scores": {
            "dtype": "F32",
            "shape": [m, n_rows],
            "data_offsets": [8 * n_rows, 8 * n_rows + 4 * m * n_rows],
        },
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # tensor data 8-byte aligned, as safetensors writes it
    data0 = 8 + len(head)
    ids_at, scores_at = data0, data0 + 8 * n_rows

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _preallocate(fd, scores_at + 4 * m * n_rows)
        _pwrite_all(fd, len(head).to_bytes(8, "little") + head, 0)
        buf = np.empty((m, block), dtype=np.float32)
        row = 0
        for feats, ids in validated_shards(shards, dim):
            n = feats.shape[0]
            if row + n > n_rows:
                raise ValueError(f"source yields more than its {n_rows} rows")
            _pwrite_all(fd, ids.to("cpu", torch.int64).contiguous().numpy(), ids_at + 8 * row)
            for lo in range(0, n, block):
                hi = min(n, lo + block)
                out = buf[:, : hi - lo]
                _score(feats[lo:hi], uq, out, backend, num_threads)
                for j in range(m):
                    _pwrite_all(fd, out[j], scores_at + 4 * (j * n_rows + row + lo))
            row += n
        if row != n_rows:
            raise ValueError(f"source yielded {row} rows, expected {n_rows}")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename durable
    finally:
        os.close(dfd)
    return path


def _score(feats: Tensor, uq: Tensor, out: np.ndarray, backend: str, num_threads: int) -> None:
    """out [m, n] float32 <- scores of feats [n, dim] against uq [m, dim]."""
    feats = feats.detach().cpu()
    if backend == "reference":
        s = (feats.double() @ uq.double().T).T.float()
        out[...] = s.numpy()
        return
    if feats.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        feats = feats.float()
    feats = feats.contiguous()
    arr = feats.view(torch.int16).numpy() if feats.dtype == torch.bfloat16 else feats.numpy()
    native.load().score_cpu(arr, uq.numpy(), out=out, num_threads=num_threads)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now, so a full disk fails before any work; filesystems without
    fallocate get a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


__all__ = ["FORMAT", "VERSION", "export_scores"]
