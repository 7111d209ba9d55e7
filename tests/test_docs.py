"""Documentation that runs: the README's and docs/INTEGRATION.md's code blocks, the Examples of
every public docstring (doctest, on the shipped model), and docs/API.md against its generator."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import ctrak_fast

ROOT = Path(__file__).resolve().parents[1]
HAS_DATTRI = importlib.util.find_spec("dattri") is not None
# Docstrings whose Examples featurize or sample with the shipped model: seconds, not milliseconds.
SLOW_DOCTESTS = {"Attributor", "Attributor.query"}
# Docstrings whose Examples need an optional dependency: skipped without it.
OPTIONAL_DOCTESTS = {"Attribution.to_pandas": "pandas"}


@pytest.fixture(autouse=True)
def _one_thread_in_tmp(tmp_path, monkeypatch):
    """Examples write to relative paths (out/...): run them in a scratch directory."""
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


# ---- markdown code blocks ------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_python_runs():
    blocks = _blocks(ROOT / "README.md", "python")
    assert blocks, "README.md has no python block"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (Path("out") / "store" / "manifest.json").is_file()


def test_integration_python_runs():
    blocks = _blocks(ROOT / "docs" / "INTEGRATION.md", "python")
    assert len(blocks) == 2
    exec(compile(blocks[0], "INTEGRATION.md", "exec"), {"__name__": "__doc__"})
    q = ctrak_fast.Query.load("out/integration/q.safetensors")
    assert q.labels == ("-shape",) and q.k == 64
    if HAS_DATTRI:  # the dattri block
        ns: dict = {"__name__": "__doc__"}
        exec(compile(blocks[1], "INTEGRATION.md", "exec"), ns)
        assert ns["scores"].shape == (64, 8) and ns["best"].shape == (8, 5)


def test_integration_cli_lines_parse():
    """Every `ctrak ...` command of the CLI block parses with the real parser."""
    from ctrak_fast.cli.app import build_parser

    lines = [
        line.split("#")[0].strip()
        for block in _blocks(ROOT / "docs" / "INTEGRATION.md", "bash")
        for line in block.splitlines()
    ]
    lines = [line for line in lines if line.startswith("ctrak ")]
    assert len(lines) >= 4
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])


# ---- docstring Examples --------------------------------------------------------------------------


def _public_doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests: dict[str, doctest.DocTest] = {}
    for name in ctrak_fast.__all__:
        obj = getattr(ctrak_fast, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        module = inspect.getmodule(obj)
        for t in finder.find(obj, name, module=module, globs=vars(module).copy()):
            tests.setdefault(t.name, t)
    if HAS_DATTRI:
        mod = importlib.import_module("ctrak_fast.integrations.dattri")
        for t in finder.find(mod, "integrations.dattri", globs=vars(mod).copy()):
            tests.setdefault(t.name, t)
    return sorted((t for t in tests.values() if t.examples), key=lambda t: t.name)


_DOCTESTS = _public_doctests()


def test_every_public_name_has_a_running_example():
    covered = {t.name.split(".")[0] for t in _DOCTESTS}
    callables = {
        n
        for n in ctrak_fast.__all__
        if inspect.isclass(getattr(ctrak_fast, n)) or inspect.isfunction(getattr(ctrak_fast, n))
    }
    exceptions = {n for n in callables if issubclass_safe(getattr(ctrak_fast, n), Exception)}
    assert callables - exceptions <= covered, (
        f"no doctest: {sorted(callables - exceptions - covered)}"
    )


def issubclass_safe(obj: object, cls: type) -> bool:
    return inspect.isclass(obj) and issubclass(obj, cls)


def _doctest_marks(name: str) -> list:
    marks = [pytest.mark.slow] if name in SLOW_DOCTESTS else []
    needs = OPTIONAL_DOCTESTS.get(name)
    if needs and importlib.util.find_spec(needs) is None:
        marks.append(pytest.mark.skip(reason=f"{needs} is not installed (optional)"))
    return marks


@pytest.mark.parametrize(
    "test",
    [pytest.param(t, id=t.name, marks=_doctest_marks(t.name)) for t in _DOCTESTS],
)
def test_docstring_examples(test: doctest.DocTest):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


# ---- the API reference ---------------------------------------------------------------------------


def test_api_md_is_generated_from_the_docstrings():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        gen = importlib.import_module("gen_api_docs")
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert (ROOT / "docs" / "API.md").read_text() == gen.render(), (
        "docs/API.md is out of date: run python tools/gen_api_docs.py"
    )
