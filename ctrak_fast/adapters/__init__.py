"""Model adapters: diffusers text-to-image pipelines behind the eps(x_t, t, cond) interface.

Names are loaded lazily: `import ctrak_fast.adapters` (e.g. by the CLI parser) imports neither
diffusers nor transformers; transformers is needed only when a text encoder is loaded.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    name: "text2image"
    for name in (
        "T2I_PARAM_FILTER",
        "T2IFeaturizer",
        "TextToImageAdapter",
        "concept_prompts",
        "encode_images_cached",
        "latent_cache_path",
        "make_featurizer",
        "prompt_query_features",
        "query_points",
        "remove_phrase",
        "schedule_from_scheduler",
        "slider_features",
    )
}
_EXPORTS.update({"load_t2i": "tiny", "caption": "tiny", "load_text_encoder": "tiny"})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
