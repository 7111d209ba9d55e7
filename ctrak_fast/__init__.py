"""ctrak_fast: concept-level training-data attribution for diffusion models (Concept-TRAK).

Public names are loaded lazily so `import ctrak_fast` stays fast and works even where the compiled
extension `ctrak_fast._C` is missing (the first call that needs it says how to build it).
"""

from __future__ import annotations

import importlib

from ._version import __version__

_EXPORTS = {
    "ProjectionSpec": "projection",
    "Projector": "projection",
    "FeatureStore": "store",
    "StoreError": "store",
    "SpecMismatch": "store",
    "gram": "scoring",
    "Preconditioner": "scoring",
    "topk": "search",
    "TopK": "search",
    "FeatureSpec": "featurize",
    "Featurizer": "featurize",
    "featurize_dataset": "featurize",
    "ConceptQuerySpec": "query",
    "concept_query_features": "query",
    "image_query_features": "query",
    "NoiseSchedule": "diffusion",
    "FactorUNet": "models",
    "load_model": "models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ctrak_fast' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
