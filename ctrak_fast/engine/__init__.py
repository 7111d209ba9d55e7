"""The model-agnostic engine: projection, feature stores, scoring, search, export."""
