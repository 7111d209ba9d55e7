"""Benchmarks, the demo, training of the tiny models, metrics and reports.

Only the front (the CLI) imports this room; the library rooms below never do.
"""
