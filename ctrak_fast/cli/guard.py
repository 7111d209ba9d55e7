"""How every `ctrak` command runs: a user error is one line and exit 1; Ctrl-C / SIGTERM one
line and exit 130 / 143; warnings are log lines. Nothing else prints around the error line."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this input cannot be used": one line, no traceback. The package's own
    error classes are looked up only if their module was imported (no import cost otherwise)."""
    errors = [ValueError, OSError, ImportError, KeyError]
    for module, name in (("engine.store", "StoreError"), ("engine.dist", "RankFailed")):
        loaded = sys.modules.get(f"ctrak_fast.{module}")
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


INTERRUPTED = "ctrak: error: interrupted; rerun the same command to resume"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # PIL's and diffusers' warnings become log lines, not source excerpts around an error line
    logging.getLogger("ctrak").warning("%s: %s", category.__name__, str(message).splitlines()[0])


def run_guarded(fn) -> int:
    """fn() under the CLI's contract: one line for a user error (exit 1) or an interrupt (130
    for SIGINT, 143 for SIGTERM; every store resumes), warnings as log lines."""
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    old_show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return _run_once(fn)
    finally:
        warnings.showwarning = old_show
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _run_once(fn) -> int:
    try:
        fn()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Terminated:
        print(INTERRUPTED, file=sys.stderr)
        return 143
    except Exception as e:
        if os.environ.get("CTRAK_DEBUG") or not isinstance(e, _user_errors()):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ctrak: error: {msg}", file=sys.stderr)
        return 1
    return 0
