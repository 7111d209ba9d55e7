"""Benchmarks, the demo, metrics and reports (training lives in train/).

Only the front (the CLI) imports this room; the library rooms below never do.
"""
