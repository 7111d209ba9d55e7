"""Documentation that runs: every python block of README.md and docs/*.md runs here or is marked
in the doc with why not (`<!-- not run in tests: REASON -->` right before it); every `ctrak` shell
line, in a block or inline, parses with the real parser; the Examples of every public docstring
(doctest, on the shipped model); and docs/API.md against its generator."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import json
import re
import shlex
import sys
from argparse import ArgumentParser
from pathlib import Path

import pytest
import torch
from PIL import Image

import ctrak_fast

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run in tests: (\S.*?) -->")
# The tests that run a doc's unmarked python blocks, all of them, with the doc's own checks.
RUN_BY = {
    "README.md": "test_readme_python_runs",
    "docs/INTEGRATION.md": "test_integration_python_runs",
    "docs/TEXT_TO_IMAGE.md": "test_text_to_image_python_runs",
    "docs/TRANSFORMER_KINDS.md": "test_transformer_kinds_python_runs",
}
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


def _marked(path: Path, lang: str) -> list[str | None]:
    """Per `lang` block of `path`: the reason it is not run (the marking comment on the line
    right before it), or None."""
    text = path.read_text()
    reasons = []
    for m in re.finditer(rf"^```{lang}\n", text, flags=re.M):
        before = text[: m.start()].split("\n")
        mark = NOT_RUN.fullmatch(before[-2]) if len(before) > 1 else None
        reasons.append(mark.group(1) if mark else None)
    return reasons


def _runnable(path: Path) -> list[str]:
    """The python blocks of `path` that are not marked as not run."""
    blocks, reasons = _blocks(path, "python"), _marked(path, "python")
    assert len(blocks) == len(reasons), path
    return [b for b, why in zip(blocks, reasons, strict=True) if why is None]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- every block accounted for -------------------------------------------------------------------


def test_every_python_block_runs_or_says_why_not():
    orphans = [
        f"{_name(p)}: python block {i + 1} of {len(_runnable(p))} unmarked"
        for p in DOCS
        if _name(p) not in RUN_BY
        for i, _ in enumerate(_runnable(p))
    ]
    assert orphans == [], (
        f"{orphans}: run it in a test of RUN_BY, or mark it with "
        "<!-- not run in tests: REASON --> right before the block"
    )
    assert all(_runnable(ROOT / name) for name in RUN_BY)
    assert all(callable(globals().get(test)) for test in RUN_BY.values())
    # The mark is read: API.md's signatures are marked, and nothing else of it is python.
    api = ROOT / "docs" / "API.md"
    assert _blocks(api, "python") and _runnable(api) == []


def test_the_not_run_mark_is_read_only_right_before_a_block(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text(
        "<!-- not run in tests: needs a GPU -->\n```python\na = 1\n```\n\n"
        "<!-- not run in tests: too far -->\n\ntext\n\n```python\nb = 2\n```\n"
        "```python\nc = 3\n```\n"
    )
    assert _marked(doc, "python") == ["needs a GPU", None, None]
    assert _runnable(doc) == ["b = 2\n", "c = 3\n"]


# ---- markdown code blocks ------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_python_runs():
    blocks = _runnable(ROOT / "README.md")
    assert blocks, "README.md has no python block"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (Path("out") / "store" / "manifest.json").is_file()


def test_integration_python_runs():
    blocks = _runnable(ROOT / "docs" / "INTEGRATION.md")
    assert len(blocks) == 2
    exec(compile(blocks[0], "INTEGRATION.md", "exec"), {"__name__": "__doc__"})
    q = ctrak_fast.Query.load("out/integration/q.safetensors")
    assert q.labels == ("-shape",) and q.k == 64
    if HAS_DATTRI:  # the dattri block
        ns: dict = {"__name__": "__doc__"}
        exec(compile(blocks[1], "INTEGRATION.md", "exec"), ns)
        assert ns["scores"].shape == (64, 8) and ns["best"].shape == (8, 5)


@pytest.mark.slow
def test_text_to_image_python_runs(tmp_path):
    """docs/TEXT_TO_IMAGE.md's block on a tiny random pipeline saved as ./sd-1.5 and 24 captioned
    PNGs in ./train (metadata.jsonl); k = 64 for the paper's 32768, nothing else changed."""
    from diffusers import DDIMScheduler
    from helpers import tiny_clip, tiny_sd_pipeline

    text_encoder, tokenizer = tiny_clip(tmp_path)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    tiny_sd_pipeline(text_encoder, tokenizer, scheduler).save_pretrained("sd-1.5")
    Path("train").mkdir()
    words = ["a red triangle", "a blue circle drawn in pencil", "a pikachu in the style of picasso"]
    with open("train/metadata.jsonl", "w") as meta:
        for i in range(24):
            pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(f"train/{i:02d}.png")
            meta.write(json.dumps({"file_name": f"{i:02d}.png", "text": words[i % 3]}) + "\n")
    (code,) = _runnable(ROOT / "docs" / "TEXT_TO_IMAGE.md")
    assert code.count("k=32768") == 1
    ns: dict = {"__name__": "__doc__"}
    exec(compile(code.replace("k=32768", "k=64"), "TEXT_TO_IMAGE.md", "exec"), ns)
    assert ns["store"].n_rows == 24 and ns["store"].k == 64
    assert ns["q"].labels == ("-a pikachu",) and ns["hits"].top_ids.shape == (1, 20)
    # The store made from a list of paths names each row's file and caption, as a folder's does.
    top = ns["hits"].to_dict()["top"][0]
    assert top["files"] == [f"{i:02d}.png" for i in top["ids"]]
    assert top["captions"] == [words[i % 3] for i in top["ids"]]


@pytest.mark.slow
def test_transformer_kinds_python_runs(tmp_path):
    """docs/TRANSFORMER_KINDS.md's blocks in order (build the tiny DiT, PixArt and SD3 folders,
    then featurize, query and attribute with each), its folders under tmp_path, not /tmp/tk."""
    blocks = _runnable(ROOT / "docs" / "TRANSFORMER_KINDS.md")
    assert len(blocks) == 4
    ns: dict = {"__name__": "__doc__"}
    for i, code in enumerate(blocks):
        code = code.replace("/tmp/tk", str(tmp_path / "tk"))
        code = code.replace('"benchmarks"', repr(str(ROOT / "benchmarks")))
        exec(compile(code, f"TRANSFORMER_KINDS.md block {i + 1}", "exec"), ns)
    for name in ("dit", "pixart", "sd3"):
        assert (tmp_path / "tk" / name / "model_index.json").is_file()


# ---- shell lines: every `ctrak ...` parses -------------------------------------------------------

# Where a shell line runs the CLI: `ctrak ARGS`, `python -m ctrak_fast[.cli] ARGS`, `torchrun ...
# -m ctrak_fast.cli ARGS`.
CLI_START = re.compile(
    r"^(?:ctrak|python -m ctrak_fast(?:\.cli)?|torchrun .*?-m ctrak_fast\.cli)\s"
)


def _shell_lines(path: Path) -> list[str]:
    """The logical lines (continuations joined, comments dropped) of every shell block."""
    lines = []
    for lang in ("bash", "sh", "shell", "console"):
        for block in _blocks(path, lang):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.removeprefix("$ ").split(" #")[0].strip()
                if line and not line.startswith("#"):
                    lines.append(line)
    return lines


def _cli_argv(line: str) -> list[str] | None:
    m = CLI_START.match(line + " ")
    return shlex.split(line[m.end() :]) if m else None


def test_every_cli_line_of_the_docs_parses():
    """Every `ctrak ...` line of a shell block of README.md and docs/*.md, marked or not."""
    from ctrak_fast.cli.app import build_parser

    checked = 0
    for path in DOCS:
        for line in _shell_lines(path):
            argv = _cli_argv(line)
            if argv is None or argv and argv[0].startswith("ctrak_fast."):
                continue  # not the CLI (python -m ctrak_fast.data.digit_folder, ./dev, pip)
            try:
                build_parser().parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{_name(path)}: `{line}` does not parse (exit {e.code})")
            checked += 1
    assert checked >= 20


def _subcommands(parser: ArgumentParser) -> dict[str, ArgumentParser]:
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            return dict(action.choices)
    return {}


def _flags(parser: ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _any_command(parser: ArgumentParser) -> ArgumentParser:
    """A parser that knows the flags of `parser` and of every command below it."""
    union = ArgumentParser(add_help=False)
    stack, flags = [parser], set()
    while stack:
        p = stack.pop()
        flags |= _flags(p)
        stack += _subcommands(p).values()
    for flag in sorted(flags):
        union.add_argument(flag)
    return union


def _inline_commands(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return [c.replace("\\|", "|") for c in re.findall(r"`(ctrak [^`]+)`", text)]


def test_every_inline_cli_command_names_real_commands_and_flags():
    """`ctrak bench quality --out DIR` in the prose: its command exists and every --flag it names
    is one of that command's (placeholders, `a|b` alternatives and [optional] parts allowed)."""
    from ctrak_fast.cli.app import build_parser

    root = build_parser()
    problems, checked = [], 0
    for path in DOCS:
        for command in _inline_commands(path):
            words = command.replace("[", " ").replace("]", " ").split()[1:]
            parsers = [root]
            while words and not words[0].startswith("-") and _subcommands(parsers[0]):
                names = words.pop(0).split("|")
                if names == ["..."] or names[0].isupper():  # `ctrak ...`, `ctrak COMMAND -h`
                    parsers = [_any_command(parsers[0])]
                    break
                known = _subcommands(parsers[0])
                problems += [
                    f"{_name(path)}: `{command}`: no command {n}" for n in names if n not in known
                ]
                parsers = [known[n] for n in names if n in known] or parsers
            flags = {w.split("=")[0] for w in words if w.startswith("--")}
            for parser in parsers:
                problems += [
                    f"{_name(path)}: `{command}`: no flag {f}" for f in flags - _flags(parser)
                ]
            checked += 1
    assert problems == []
    assert checked >= 60


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
