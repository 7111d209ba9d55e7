#!/usr/bin/env python3
"""Generate docs/API.md from the docstrings of ``ctrak_fast.__all__``.

    python tools/gen_api_docs.py            # rewrite docs/API.md
    python tools/gen_api_docs.py --check    # exit 1 if docs/API.md is not up to date (tests do)

The page lists every public name with its signature and docstring (classes: their public methods
and properties too), after the stability promise below. Nothing else goes into it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "API.md"
# tests/test_docs.py runs every python block of the docs or reads why not: a signature is not code.
SIGNATURE = "<!-- not run in tests: a signature, generated from the code -->"

HEADER = """\
# ctrak_fast API reference

Generated from the docstrings by `tools/gen_api_docs.py`; do not edit by hand
(`tests/test_docs.py` fails when this page and the code disagree). The public API is exactly
`ctrak_fast.__all__`; every example below is executed by the test suite on the shipped model.

## Stability promise

ctrak_fast follows semantic versioning for the names in `ctrak_fast.__all__` (this page).
Before 1.0 the minor number plays the role of the major one:

- **Patch releases (0.y.z -> 0.y.z+1)** change no public name, parameter, default value, return
  type, documented shape or dtype, exception type, or on-disk format. Numeric results change only
  to fix a bug, and the changelog says so.
- **Minor releases (0.y -> 0.y+1)** may add names, keyword-only parameters with defaults, result
  fields, methods, methods and new values of string options (`method=`, `tails=`, backends). A
  name or parameter is removed or renamed only after a minor release in which using it emits a
  `DeprecationWarning` that names its replacement.
- **Defaults that change numbers** (timesteps, DDIM inversion and its guidance, normalisation,
  projection `k` / seed, `lambda_r`, slider weight, number and kind of draws) change only in a
  minor release, with the old value still reachable by passing it. Every store records the specs
  its features were made with, so features made under old and new defaults are never mixed: the
  API refuses the pair with `SpecMismatch` naming the field.
- **Store format.** A feature store's manifest carries a format version (`STORE_FORMAT_VERSION`
  is the newest this build writes). Every release reads all older versions without migration and
  refuses newer ones with `StoreError`. A new format version comes only with a minor release.
- **Projection.** `ProjectionSpec(k, seed)` gives the same matrix on every machine, backend and
  release while its `hash_version` is unchanged; a new hash is a new `hash_version`, and stores
  made with the old one stay readable and comparable among themselves.
- **Not covered:** everything outside `__all__` (the engine modules such as
  `ctrak_fast.engine`, `ctrak_fast.method`, `ctrak_fast.models`, `ctrak_fast.bench`, the
  CLI's internals, `ctrak_fast._C`, and attributes documented as engine objects, such as
  `Attributor.featurizer`), bit-exact floating-point results across machines or BLAS builds, and
  speed. `ctrak_fast.integrations.dattri` follows the promise for `CTRAKAttributor` but tracks
  dattri's attributor protocol, which ctrak_fast does not control.
"""


def _attribute_docs(module: object) -> dict[str, str]:
    """Docstrings written as a string literal right after a module-level assignment."""
    source = inspect.getsource(module)  # type: ignore[arg-type]
    body = ast.parse(source).body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        target = None
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target = node.target.id
        if (
            target
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[target] = inspect.cleandoc(nxt.value.value)
    return docs


def _doc_block(doc: str | None) -> list[str]:
    return ["```text", doc.rstrip(), "```", ""] if doc else ["*(no docstring)*", ""]


class _Raw:
    """An annotation string shown without quotes."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(obj: object, drop_first: bool = False) -> str:
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())[1 if drop_first else 0 :]

    def raw(a: object) -> object:
        return _Raw(a) if isinstance(a, str) else a

    params = [p.replace(annotation=raw(p.annotation)) for p in params]
    return str(sig.replace(parameters=params, return_annotation=raw(sig.return_annotation)))


def _members(cls: type) -> list[tuple[str, object]]:
    """Public methods / properties defined by the class itself, in source order."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((name, value))
    return out


def _summary(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


def render() -> str:
    """The full text of docs/API.md."""
    sys.path.insert(0, str(ROOT))
    pkg = importlib.import_module("ctrak_fast")
    names = [n for n in pkg.__all__ if n != "__version__"]
    api = importlib.import_module("ctrak_fast.api")
    attr_docs = _attribute_docs(api)
    entries: list[tuple[str, str, list[str]]] = []  # name, kind, lines
    for name in names:
        obj = getattr(pkg, name)
        lines: list[str] = [f"## `{name}`", ""]
        if inspect.isclass(obj):
            kind = "exception" if issubclass(obj, Exception) else "class"
            sig = _signature(obj).removesuffix(" -> None")
            lines += [SIGNATURE, "```python", f"class {name}{sig}", "```", ""]
            doc = inspect.getdoc(obj)
            lines += _doc_block(doc)
            for mname, member in _members(obj):
                if isinstance(member, property):
                    lines += [f"### `{name}.{mname}` (property)", ""]
                    lines += _doc_block(inspect.getdoc(member))
                else:
                    sig = _signature(member, drop_first=True)
                    lines += [f"### `{name}.{mname}{sig}`", ""]
                    lines += _doc_block(inspect.getdoc(member))
        elif inspect.isfunction(obj):
            kind = "function"
            doc = inspect.getdoc(obj)
            lines += [SIGNATURE, "```python", f"def {name}{_signature(obj)}", "```", ""]
            lines += _doc_block(doc)
        else:
            kind = "constant" if isinstance(obj, (int, str, tuple)) else "type alias"
            shown = repr(obj) if kind == "constant" else str(obj).replace("typing.", "")
            doc = attr_docs.get(name)
            lines += [SIGNATURE, "```python", f"{name} = {shown}", "```", ""]
            lines += _doc_block(doc)
        entries.append((name, kind, lines))
    out = HEADER.splitlines() + [
        "",
        "## Contents",
        "",
        "| name | kind | summary |",
        "|---|---|---|",
    ]
    out.append("| `__version__` | constant | the package version (PEP 440 string) |")
    seen: dict[str, int] = {}
    for name, kind, _lines in entries:
        obj = getattr(pkg, name)
        doc = inspect.getdoc(obj) if kind not in ("constant", "type alias") else attr_docs.get(name)
        summary = _summary(doc).replace("|", "\\|")
        anchor = name.lower()
        seen[anchor] = seen.get(anchor, -1) + 1  # GitHub numbers repeated heading anchors
        anchor += f"-{seen[anchor]}" if seen[anchor] else ""
        out.append(f"| [`{name}`](#{anchor}) | {kind} | {summary} |")
    out.append("")
    for _, _, lines in entries:
        out += lines
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python tools/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
