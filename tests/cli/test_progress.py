"""Progress (ctrak_fast/progress.py, #30): tqdm on a terminal; INFO log lines at a bounded rate
otherwise, which reach stderr even where the caller configured no logging."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrak_fast import progress as progress_module
from ctrak_fast.progress import progress

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """time.monotonic of the progress module: each call advances by `step` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_log_lines_at_a_bounded_rate(monkeypatch, caplog):
    # 20 items, 10 s apart: a line every 30 s (items 3, 6, ..., 18) and one when done (item 20)
    monkeypatch.setattr(progress_module.time, "monotonic", FakeClock(10.0))
    caplog.set_level(logging.INFO, logger="ctrak_fast.progress")
    assert list(progress(range(20), desc="featurize", unit="batch")) == list(range(20))
    records = [r for r in caplog.records if r.name == "ctrak_fast.progress"]
    assert [r.levelno for r in records] == [logging.INFO] * 7
    assert [r.getMessage().split(" ")[1] for r in records] == [
        "3/20",
        "6/20",
        "9/20",
        "12/20",
        "15/20",
        "18/20",
        "20/20",
    ]
    assert records[-1].getMessage() == "featurize: 20/20 batch (100%), 200 s, ~0 s left"


def test_configured_logging_decides(monkeypatch, caplog, capsys):
    """An application's levels are respected: at WARNING, no progress lines anywhere."""
    caplog.set_level(logging.WARNING, logger="ctrak_fast.progress")
    list(progress(range(3), desc="x", every_s=0.0))
    assert [r for r in caplog.records if r.name == "ctrak_fast.progress"] == []
    assert capsys.readouterr().err == ""


def test_disabled_shows_nothing(caplog, capsys):
    caplog.set_level(logging.INFO, logger="ctrak_fast.progress")
    list(progress(range(3), desc="x", enabled=False, every_s=0.0))
    assert caplog.records == [] and capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(monkeypatch, caplog):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    caplog.set_level(logging.INFO, logger="ctrak_fast.progress")
    list(progress(range(5), desc="featurize", unit="batch", every_s=0.0))
    assert "featurize: 100%" in term.getvalue() and "5/5" in term.getvalue()
    assert [r for r in caplog.records if r.name == "ctrak_fast.progress"] == []


API_SCRIPT = """
import ctrak_fast as cf
att = cf.Attributor(cf.shipped_model(), feature=cf.FeatureSpec(timesteps=(499,), inversion_steps=2),
                    projection=cf.ProjectionSpec(k=8))
data = cf.shipped_dataset(per_combo=1)
att.featurize(data, {store!r}, batch_size=7, progress=True)
"""


def test_api_progress_reaches_stderr_without_logging_configured(tmp_path):
    """`progress=True` from a plain script whose stderr is a pipe (a job's log file): the lines
    are there although the script configured no logging (INFO records would be dropped)."""
    code = API_SCRIPT.format(store=str(tmp_path / "store"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "featurize" in line]
    assert len(lines) == 1 and "2/2 batch (100%)" in lines[0], proc.stderr[-3000:]


@pytest.mark.parametrize("configured", [False, True], ids=["unconfigured", "basicConfig"])
def test_one_line_either_way(tmp_path, configured):
    """Never twice: with logging configured the line goes through its handler only."""
    setup = "import logging; logging.basicConfig(level=logging.INFO); " if configured else ""
    code = setup + "from ctrak_fast.progress import report; report('featurize: 1/1')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("featurize: 1/1") == 1, proc.stderr
