"""Shared benchmark utilities: environment rows, timing, memory, tables, JSON.

Method (BENCHMARKS.md): every case is verified before it is timed; each timed function runs
``warmup`` times untimed, then ``repeat`` times; we report the median with min and max. Peers are
measured in the same process and run, so ratios are meaningful on a shared, noisy machine.

Examples:
    >>> t = time_fn(lambda: sum(range(1000)), warmup=1, repeat=3)
    >>> t.min <= t.median <= t.max
    True
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# --- environment -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    """HEAD's sha with a '-dirty' suffix when the tree has changes; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Machine, versions and git sha for the header of a result."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_sha": git_sha(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    env.update(extra or {})
    return env


# --- timing and memory -------------------------------------------------------------------------


@dataclass
class Timing:
    median: float
    min: float
    max: float
    times: list[float] = field(default_factory=list)

    def spread(self) -> str:
        return f"{self.min:.3g}-{self.max:.3g}"


def time_fn(
    fn: Callable[[], Any], warmup: int = 1, repeat: int = 5, sync: Callable[[], Any] | None = None
) -> Timing:
    """Wall time of fn(): ``warmup`` untimed calls, then ``repeat`` timed ones.

    sync: called before reading the clock (e.g. torch.cuda.synchronize for GPU work).
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    s = sorted(times)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])
    return Timing(median, s[0], s[-1], times)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS while the block runs, sampled by a thread (ru_maxrss only ever grows, so it
    cannot separate methods run in one process).

        with PeakRss() as p:
            work()
        p.peak, p.delta   # bytes: peak during the block, and peak minus RSS at entry
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def copy_bandwidth(nbytes: int = 1 << 29, repeat: int = 3) -> float:
    """Measured memory bandwidth ceiling in bytes/s: best of `repeat` large numpy copies (counted
    as read + write)."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = min(time_fn(lambda: np.copyto(dst, src), warmup=1, repeat=repeat).times)
    return 2 * nbytes / best


# --- output ------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e3 else f"{v:.0f}"
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Markdown table of rows (dicts); columns default to the union of keys in order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, sep, *body])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Timing):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write payload atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


__all__ = [
    "PeakRss",
    "Timing",
    "copy_bandwidth",
    "cpu_model",
    "environment",
    "format_table",
    "git_sha",
    "rss_bytes",
    "time_fn",
    "write_json",
]
