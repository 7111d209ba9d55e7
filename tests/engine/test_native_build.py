"""The compiled extension: build layout, lazy loading, ISA dispatch, projection tile bits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrak_fast.engine import native as _native
from ctrak_fast.kernels import hashing

C = _native.load()


def run_python(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("isa", C.cpu_isas())
@pytest.mark.parametrize(
    ("seed", "row_start", "n_rows", "k"),
    [(0, 0, 1, 1), (7, 123, 33, 512), (2**40 + 5, 2**33 + 11, 17, 1000), (-1, 5, 64, 2048)],
)
def test_rademacher_tile_bit_identical_to_hashing(isa, seed, row_start, n_rows, k):
    out = np.full((n_rows, k), np.nan, dtype=np.float32)
    C.rademacher_tile(seed, row_start, n_rows, k, out, isa=isa)
    ref = hashing.rademacher_block(seed, row_start, n_rows, k).numpy()
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_rademacher_tile_threads_and_argument_checks():
    a = np.empty((300, 257), dtype=np.float32)
    b = np.empty_like(a)
    C.rademacher_tile(3, 10, 300, 257, a, num_threads=1)
    C.rademacher_tile(np.int64(3), 10, 300, 257, b, num_threads=2)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"out must be \[4, 8\]"):
        C.rademacher_tile(0, 0, 4, 8, np.empty((4, 9), np.float32))
    with pytest.raises(TypeError, match="float32"):
        C.rademacher_tile(0, 0, 4, 8, np.empty((4, 8), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        C.rademacher_tile(0, 0, 4, 8, np.empty((8, 4), np.float32).T)
    with pytest.raises(ValueError, match="row_start"):
        C.rademacher_tile(0, -1, 4, 8, np.empty((4, 8), np.float32))
    readonly = np.empty((4, 8), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        C.rademacher_tile(0, 0, 4, 8, readonly)


def test_isa_dispatch():
    isas = C.cpu_isas()
    assert isas[-1] == "generic" and C.cpu_isa() == isas[0]
    code = "from ctrak_fast.engine import native as _native; print(_native.load().cpu_isa())"
    assert run_python(code, CTRAK_CPU_ISA="generic") == "generic"


def test_load_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_failure", None)
    monkeypatch.setitem(sys.modules, "ctrak_fast._C", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \.") as err:
        _native.load()
    assert "ctrak_fast._C is not built" in str(err.value)
    assert not _native.available() and not _native.has_cuda()


def test_package_imports_without_extension():
    code = (
        "import sys, warnings, torch; sys.modules['ctrak_fast._C'] = None\n"
        "import ctrak_fast, ctrak_fast.engine.search as s\n"
        "from ctrak_fast.engine import native as _native\n"
        "assert not _native.available()\n"
        "f, u = torch.randn(20, 4), torch.randn(2, 4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    res = s.topk((f, torch.arange(20)), u, 3)\n"
        "assert any('falls back' in str(x.message) for x in w)\n"
        "print(res.top_ids.shape[1])\n"
    )
    assert run_python(code) == "3"


def test_kernels_installed_as_subpackage():
    import ctrak_fast.kernels as kernels

    assert kernels.__name__ == "ctrak_fast.kernels"
    assert Path(kernels.__file__).parent.name == "kernels"


def test_has_cuda_is_consistent():
    assert isinstance(_native.has_cuda(), bool)
    if torch.version.cuda is None:
        assert not _native.has_cuda()
