"""Atomic, durable file writes: every file the package writes goes through here.

A file is written to ``<name>.tmp``, fsync'ed and renamed over its final name, and the directory is
fsync'ed so that the rename itself survives a crash. A reader never sees a half-written file, and a
file that a reader has memory-mapped is never overwritten in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: no half-written .tmp, and a message naming the file
        tmp.unlink(missing_ok=True)
        if e.strerror is None:  # already a message of ours
            raise
        raise OSError(f"cannot write {path}: {e.strerror}") from e  # one line, no [Errno]
    except BaseException:  # a signal
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(Path(path), text.encode())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield ``<path>.tmp`` for a writer that must name its own file (safetensors' save_file,
    savefig); on success it is made `mode` (safetensors creates 0600), fsync'ed and renamed over
    `path`, and the directory fsync'ed. On an exception the temporary file is removed.

    Examples:
        >>> import tempfile; d = Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "x.txt") as tmp:
        ...     _ = tmp.write_text("hi")
        >>> (d / "x.txt").read_text(), sorted(p.name for p in d.iterdir())
        ('hi', ['x.txt'])
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.strerror is None:  # already a message of ours
            raise
        raise OSError(f"cannot write {path}: {e.strerror}") from e  # one line, no [Errno]
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
