"""ctrak_fast: concept-level training-data attribution for diffusion models (Concept-TRAK).

The public API is exactly ``__all__``: an ``Attributor`` (a model plus a method) featurizes a
training set into a ``FeatureStore``, makes ``Query`` features of a concept, and returns the exact
top-k training samples as an ``Attribution``. Quick start: README.md ("Python in ten lines");
reference, generated from the docstrings: docs/API.md; Python / CLI / dattri: docs/INTEGRATION.md.

Stability promise (full text in docs/API.md): within a minor series (0.y.z) no name of
``__all__``, parameter, default or documented shape / dtype changes; a minor release may add names
and keyword arguments and deprecate (DeprecationWarning for at least one minor release) but not
remove without that. Feature stores carry a format version (``STORE_FORMAT_VERSION``): every build
reads all older versions and refuses newer ones. Everything not in ``__all__`` (engine modules
such as ``ctrak_fast.method.featurize``, ``ctrak_fast.engine.store``, the CLI internals,
``ctrak_fast._C``) may change in any release.

Names are loaded lazily so ``import ctrak_fast`` stays fast and works where the compiled
extension ``ctrak_fast._C`` is missing (the first call that needs it says how to build it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ctrak_fast._version import __version__

if TYPE_CHECKING:  # what static type checkers see; at run time __getattr__ imports on demand
    from ctrak_fast.api import (
        METHODS,
        STORE_FORMAT_VERSION,
        Attribution,
        Attributor,
        Condition,
        Query,
        das_store_path,
        shipped_dataset,
        shipped_model,
    )
    from ctrak_fast.data import ConceptDataset
    from ctrak_fast.engine.gram import gram
    from ctrak_fast.engine.projection import FactorizedSpec, ProjectionSpec
    from ctrak_fast.engine.projector import Projector
    from ctrak_fast.engine.scoring import Preconditioner
    from ctrak_fast.engine.search import topk
    from ctrak_fast.engine.search_inputs import TopK
    from ctrak_fast.engine.store import FeatureStore, SpecMismatch, StoreError
    from ctrak_fast.method.featurize import FeatureSpec
    from ctrak_fast.method.query import ConceptQuerySpec

_EXPORTS = {
    # the attribution API
    "Attributor": "api",
    "Query": "api",
    "Attribution": "api",
    "Condition": "api",
    "METHODS": "api",
    "STORE_FORMAT_VERSION": "api",
    "das_store_path": "api",
    "shipped_model": "api",
    "shipped_dataset": "api",
    "ConceptDataset": "data",
    # specs
    "FeatureSpec": "method.featurize",
    "ConceptQuerySpec": "method.query",
    "ProjectionSpec": "engine.projection",
    "FactorizedSpec": "engine.projection",
    # engine
    "Projector": "engine.projector",
    "FeatureStore": "engine.store",
    "StoreError": "engine.store",
    "SpecMismatch": "engine.store",
    "gram": "engine.gram",
    "Preconditioner": "engine.scoring",
    "topk": "engine.search",
    "TopK": "engine.search",
}

__all__ = [
    "__version__",
    "Attributor",
    "Query",
    "Attribution",
    "Condition",
    "METHODS",
    "STORE_FORMAT_VERSION",
    "das_store_path",
    "shipped_model",
    "shipped_dataset",
    "ConceptDataset",
    "FeatureSpec",
    "ConceptQuerySpec",
    "ProjectionSpec",
    "FactorizedSpec",
    "Projector",
    "FeatureStore",
    "StoreError",
    "SpecMismatch",
    "gram",
    "Preconditioner",
    "topk",
    "TopK",
]
# __all__ is spelled out for linters and type checkers; keep _EXPORTS in step with it.
if set(__all__) != {"__version__", *_EXPORTS}:
    raise ImportError("ctrak_fast.__all__ and its lazy export table disagree")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ctrak_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
