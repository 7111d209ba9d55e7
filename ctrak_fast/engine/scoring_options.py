"""The choices of scoring, without importing torch (the CLI builds its parser from them)."""

PATHS = ("auto", "primal", "dual")  # scoring.choose_path
PRECISIONS = ("float64", "mixed")  # gram.gram

__all__ = ["PATHS", "PRECISIONS"]
