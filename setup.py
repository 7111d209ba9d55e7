"""Build of ctrak-fast: the Python package plus the CMake-built extension ctrak_fast._C.

    pip install --no-build-isolation -e .      # what ./dev runs

Environment switches:
    CTRAK_NO_CUDA=1              never compile the CUDA engine (even with a CUDA torch)
    CTRAK_FORCE_CUDA_COMPILE=1   also compile the CUDA sources (module _C_cuda_check, build tree
                                 only) with a CPU torch: proves csrc/*.cu compiles on this machine
    CTRAK_CUDA_ARCHS="90;100"    CMAKE_CUDA_ARCHITECTURES (default 90: sm_90 SASS + PTX)
    CTRAK_BUILD_JOBS=N           parallel compile jobs (default: CPU count)
    CTRAK_CMAKE_ARGS="..."       extra arguments for the CMake configure step
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _torch_cuda() -> str | None:
    """CUDA version of the installed torch, or None for a CPU build (or no torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def _tool(name: str) -> str | None:
    """A build tool from this interpreter's environment (pip's cmake / ninja), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() == "1"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt; the module lands where setuptools expects it (also
    for editable installs, where that is the source tree)."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        with_cuda = _torch_cuda() is not None and not _env_flag("CTRAK_NO_CUDA")
        force_cuda = _env_flag("CTRAK_FORCE_CUDA_COMPILE")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCTRAK_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DCTRAK_FORCE_CUDA_COMPILE={'ON' if force_cuda else 'OFF'}",
        ]
        if os.environ.get("CTRAK_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CTRAK_CUDA_ARCHS']}")
        ninja = _tool("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += shlex.split(os.environ.get("CTRAK_CMAKE_ARGS", ""))

        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("building ctrak_fast._C needs cmake: pip install cmake")
        jobs = os.environ.get("CTRAK_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", "Release", "--parallel", jobs],
            check=True,
        )


# assets/ and its folders (the counterfactual ground truth) hold data only
ASSET_PACKAGES = [
    "ctrak_fast." + p.relative_to(ROOT / "ctrak_fast").as_posix().replace("/", ".")
    for p in sorted([ROOT / "ctrak_fast" / "assets", *(ROOT / "ctrak_fast" / "assets").rglob("*")])
    if p.is_dir() and p.name != "__pycache__"
]

# Metadata (name, version, dependencies, extras, the `ctrak` entry point) is PEP 621 in
# pyproject.toml; this file only adds what it cannot say: the CMake-built extension.
# assets/ holds data only (no __init__.py): its folders are declared as packages of their own, or
# setuptools prints a screen of warnings about importable folders missing from `packages`.
setup(
    packages=[*find_packages(include=["ctrak_fast", "ctrak_fast.*"]), *ASSET_PACKAGES],
    package_data={
        "ctrak_fast": ["py.typed", "_C.pyi"],
        **{pkg: ["*.safetensors", "*.json"] for pkg in ASSET_PACKAGES},
    },
    ext_modules=[CMakeExtension("ctrak_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
