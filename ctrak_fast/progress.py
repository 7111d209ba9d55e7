"""Progress of long work: a tqdm bar on a terminal, log lines when stderr is not one (a job
written to a log file shows how far it got and how long is left).

The lines are INFO records of the logger ``ctrak_fast.progress``: an application that configured
logging gets them through its own handlers and levels. One that configured nothing (a script or
notebook calling ``Attributor.featurize(..., progress=True)``) would drop INFO records, so there
they go to stderr directly, the way logging's last-resort handler shows warnings.

    for batch in progress(range(n), desc="featurize", unit="batch"):
        ...
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("ctrak_fast.progress")

LOG_EVERY_S = 30.0  # at most one log line per this many seconds (and the last one)


class _CurrentStderr(logging.Handler):
    """Writes to sys.stderr as it is at emit time (a handler made once would keep a stream that
    was replaced since, e.g. by contextlib.redirect_stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_UNCONFIGURED = _CurrentStderr()
_UNCONFIGURED.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))


def report(text: str) -> None:
    """One progress line: log.info where logging is configured (its levels decide), else stderr
    (no handler anywhere: the record would be dropped and `progress=True` would show nothing)."""
    if log.hasHandlers():
        log.info(text)
    else:
        _UNCONFIGURED.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, text, (), None))


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    every_s: float = LOG_EVERY_S,
) -> Iterator[T]:
    """Yield `items`, showing progress: tqdm when stderr is a terminal, else an INFO log line
    (:func:`report`) at most every `every_s` seconds ("featurize: 12/40 batch (30%), 45 s,
    ~105 s left") and one when done. Nothing at all when not `enabled`."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit)
        return
    t0 = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            report(line(desc, done, total, unit, now - t0))


def line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """The log line of `progress`.

    Examples:
        >>> line("featurize", 12, 40, "batch", 45.0)
        'featurize: 12/40 batch (30%), 45 s, ~105 s left'
    """
    if not total:
        return f"{desc}: {done} {unit}, {elapsed:.0f} s"
    left = elapsed / done * (total - done) if done else float("nan")
    return (
        f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f}%), {elapsed:.0f} s, "
        f"~{left:.0f} s left"
    )


__all__ = ["progress", "report"]
