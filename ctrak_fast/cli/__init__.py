"""The `ctrak` command line: a thin shell over the Attributor and the benchmarks."""

from .app import main

__all__ = ["main"]
