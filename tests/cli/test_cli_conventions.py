"""The command line's conventions (#30): `--version`, exit 2 for usage errors and 1 for the rest,
help on every flag with its default shown."""

from __future__ import annotations

import argparse

import pytest
from helpers import run

from ctrak_fast._version import __version__
from ctrak_fast.cli.app import build_parser


def parsers(parser: argparse.ArgumentParser, name: str = "ctrak"):
    """(command name, parser) of the parser and of every sub-command under it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_version_prints_the_package_version():
    rc, out, err = run(["--version"])
    assert (rc, out.strip(), err) == (0, f"ctrak {__version__}", "")


USAGE_ERRORS = [  # (name, argv, start of the message)
    ("unknown flag", ["store", "info", "s", "--bogus"], "unrecognized arguments: --bogus"),
    ("unknown command", ["frobnicate"], "argument cmd: invalid choice: 'frobnicate'"),
    ("no command", [], "the following arguments are required: cmd"),
    ("bad value", ["attribute", "--store", "s", "--query", "q", "--k", "0"], "argument --k:"),
    ("bad choice", ["store", "fix", "s"], "argument action: invalid choice: 'fix'"),
    ("missing required", ["attribute", "--store", "s"], "the following arguments are required"),
]


@pytest.mark.parametrize("name,argv,message", USAGE_ERRORS, ids=[c[0] for c in USAGE_ERRORS])
def test_usage_errors_exit_2_with_one_line(name, argv, message):
    rc, out, err = run(argv)
    assert rc == 2, (rc, err)
    assert out == "" and err.splitlines() == [err.strip()], err
    assert err.startswith(f"ctrak: error: {message}"), err


def test_other_errors_exit_1(tmp_path):
    rc, _, err = run(["store", "info", tmp_path / "nope"])
    assert rc == 1 and err.startswith("ctrak: error: ") and len(err.splitlines()) == 1, err


def test_every_flag_of_every_command_has_help():
    missing = [
        f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
        for name, parser in parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and not (action.help and action.help.strip())
    ]
    assert missing == [], f"flags without help: {missing}"


def _help(argv: list[str]) -> str:
    rc, out, _ = run([*argv, "--help"])
    assert rc == 0
    return " ".join(out.split())  # argparse wraps lines: compare with single spaces


def test_help_shows_defaults():
    attribute = _help(["attribute"])
    assert "(default: 10)" in attribute  # --k
    assert "(default: 1.0)" in attribute  # --lambda-r, a list of one value
    featurize = _help(["featurize"])
    assert "(default: 32)" in featurize  # --batch-size
    assert "(default: 0)" in featurize  # --proj-seed: a falsy default is still shown
    # no "(default: None)" or "(default: False)" noise for flags without a value by default
    for text in (attribute, featurize, _help(["t2i", "featurize"]), _help(["train"])):
        assert "(default: None)" not in text and "(default: False)" not in text


def test_every_default_is_shown_or_stated():
    """Every option with a real default shows it: the formatter's suffix, or its own words."""
    hidden = []
    for name, parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            d = action.default
            if d is None or d is False or d == argparse.SUPPRESS or not action.option_strings:
                continue
            if "default" not in formatter._get_help_string(action):
                hidden.append(f"{name} {action.option_strings[0]}")
    assert hidden == [], hidden


def test_every_help_page_renders():
    """A literal % in a help text or a default would make argparse's %-formatting raise."""
    for name, parser in parsers(build_parser()):
        assert parser.format_help().startswith(f"usage: {name}"), name
