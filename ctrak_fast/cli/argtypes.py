"""Argument types of the CLI: every numeric, list and regex flag is checked here, at the edge,
so a bad value is one `ctrak: error: argument --flag: ...` line before any work or any write.

Each type raises argparse.ArgumentTypeError with a message that names the rule; argparse adds
the flag's name, and CliParser prints it as the CLI's one error line (exit 2, argparse's status
for a usage error; no usage block).
"""

from __future__ import annotations

import argparse
import math
import re
import sys

USAGE_ERROR = 2  # argparse's exit status for a bad command line; every other failure exits 1


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default: "(default: X)" appended unless the default is
    None / False (nothing to show) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == argparse.SUPPRESS
        if nothing or "default" in text or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        # help strings are %-formatted by argparse: a literal % must be doubled
        return f"{text} (default: {str(shown).replace('%', '%%')})".lstrip()


class CliParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one `ctrak: error: ...` line, exit status 2 (a
    usage error; argparse's own status). Sub-commands inherit it (add_subparsers uses the
    parser's own class), and with it the help formatter that shows defaults."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        print(f"ctrak: error: {message.splitlines()[0]}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1.

    Examples:
        >>> positive_int("3")
        3
    """
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """Any finite float."""
    return _number(text, float, "a number")


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonneg_float(text: str) -> float:
    """A finite float >= 0."""
    value = _number(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A float in [0, 1]."""
    value = _number(text, float, "a number")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


def _list(text: str, item, what: str) -> list:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
    return [item(p) for p in parts]


def lambda_list(text: str) -> list[float]:
    """One or more relative dampings, comma-separated, each finite and >= 0: "1" or "0.1,1,10".

    Examples:
        >>> lambda_list("0.1, 1,10")
        [0.1, 1.0, 10.0]
    """
    values = _list(text, nonneg_float, "numbers")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
    return values


def timestep_list(text: str) -> list[int]:
    """Distinct integer timesteps >= 0, comma-separated (the model's schedule bounds them from
    above; checked against it before any work).

    Examples:
        >>> timestep_list("99,499,899")
        [99, 499, 899]
    """
    values = _list(text, nonneg_int, "integers")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a timestep")
    return values


def region_box(text: str) -> tuple[int, int, int, int]:
    """A box "x0,y0,x1,y1" in pixels of the query image: x0 < x1, y0 < y1 (the image's size
    bounds it; checked once the image is read).

    Examples:
        >>> region_box("0,4, 8,12")
        (0, 4, 8, 12)
    """
    values = _list(text, nonneg_int, "integers")
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not four integers x0,y0,x1,y1")
    x0, y0, x1, y1 = values
    if not (x0 < x1 and y0 < y1):
        raise argparse.ArgumentTypeError(f"{text!r} is empty: it needs x0 < x1 and y0 < y1")
    return (x0, y0, x1, y1)


def width_list(text: str) -> tuple[int, ...]:
    """UNet widths per resolution level, "32,64,64": each a positive multiple of 8 (its GroupNorm
    has 8 groups).

    Examples:
        >>> width_list("8,16")
        (8, 16)
    """
    values = tuple(_list(text, positive_int, "integers"))
    bad = [w for w in values if w % 8]
    if bad:
        raise argparse.ArgumentTypeError(f"widths must be multiples of 8, got {bad}")
    return values


def regex(text: str) -> str:
    """A Python regular expression that compiles (or an @name the model resolves).

    Examples:
        >>> regex("conv_out|time_")
        'conv_out|time_'
    """
    if text.startswith("@"):
        return text
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid regular expression ({e})"
        ) from None
    return text


__all__ = [
    "USAGE_ERROR",
    "CliParser",
    "DefaultsHelpFormatter",
    "finite_float",
    "fraction",
    "lambda_list",
    "nonneg_float",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "regex",
    "timestep_list",
    "width_list",
]
