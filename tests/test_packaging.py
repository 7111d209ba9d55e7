"""What a build ships and says (#30): the MIT license in the metadata, the assets as package data,
and no setuptools warning screens while building."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`setup.py egg_info build_py` into a scratch folder: the metadata and the pure-Python part of
    a build (the CMake extension is tests/engine/test_native_build.py's), with its output."""
    tmp = tmp_path_factory.mktemp("build")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp)]
        + ["build_py", "--build-lib", str(tmp / "lib")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return tmp, proc.stdout + proc.stderr


def test_license_file_and_metadata(built):
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the ctrak_fast authors" in text
    info = next(built[0].glob("*.egg-info/PKG-INFO")).read_text()
    assert "License-Expression: MIT" in info and "License-File: LICENSE" in info


def test_build_is_quiet_and_ships_the_assets(built):
    tmp, output = built
    assert "Warning" not in output and "!!" not in output, output[:3000]

    def files(root: Path) -> set[str]:  # every asset file, the ground-truth folders' included
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    shipped = files(tmp / "lib" / "ctrak_fast" / "assets")
    assert shipped == files(ROOT / "ctrak_fast" / "assets")
    assert "counterfactual/shapes9/setting.json" in shipped
    assert (tmp / "lib" / "ctrak_fast" / "py.typed").is_file()


def test_build_ships_the_kernels_inside_the_package(built):
    tmp, _ = built
    for op in ("hashing", "rademacher_project", "linear_grad_project", "factorized_project"):
        for part in ("reference.py", "triton.py"):
            assert (tmp / "lib" / "ctrak_fast" / "kernels" / op / part).is_file(), (op, part)
