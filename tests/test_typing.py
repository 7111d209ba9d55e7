"""Strict static typing of the public API: mypy --strict over the modules named in pyproject.toml's
[tool.mypy] (the API facade, the integrations and the _C stub). Skipped without mypy (a dev tool:
pip install mypy)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_ships_type_information():
    assert (ROOT / "ctrak_fast" / "py.typed").is_file()
    assert (ROOT / "ctrak_fast" / "_C.pyi").is_file()
    setup = (ROOT / "setup.py").read_text()
    assert '"py.typed"' in setup and '"_C.pyi"' in setup  # installed with the package


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_public_api_is_mypy_strict_clean():
    cache = ROOT / ".pytest_cache" / "mypy"  # git-ignored; a cold run takes a minute or two
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout
