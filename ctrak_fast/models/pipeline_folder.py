"""The components of a local diffusers pipeline folder, loaded safely.

A folder's ``model_index.json`` names a (library, class) per component. Nothing it names is
imported: each component has one library and one base class here (the registry), and the class
is looked up in that already-imported library and must derive from the base. Model weights are
read from safetensors only (``use_safetensors=True``); a folder holding only pickle ``.bin``
weights is refused with a message instead of being unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _registry() -> dict[str, tuple[str, type, bool]]:
    """component -> (library, base class, holds weights)."""
    import diffusers
    import transformers

    return {
        "unet": ("diffusers", diffusers.UNet2DConditionModel, True),
        "scheduler": ("diffusers", diffusers.SchedulerMixin, False),
        "vae": ("diffusers", diffusers.ModelMixin, True),
        "text_encoder": ("transformers", transformers.PreTrainedModel, True),
        "tokenizer": ("transformers", transformers.PreTrainedTokenizerBase, False),
        # SDXL's second text encoder (CLIPTextModelWithProjection: the pooled embedding)
        "text_encoder_2": ("transformers", transformers.PreTrainedModel, True),
        "tokenizer_2": ("transformers", transformers.PreTrainedTokenizerBase, False),
    }


REQUIRED = ("unet", "scheduler")


def read_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's model_index.json as a dict (its pipeline-level settings, e.g. SDXL's
    force_zeros_for_empty_prompt); FileNotFoundError / ValueError naming the file."""
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{index_file}: not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_file}: not a JSON object")
    return index


def load_pipeline_parts(path: str | os.PathLike[str]) -> dict[str, object]:
    """{unet, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2} of the pipeline
    folder ``path`` (None for an optional component it lacks); nothing is downloaded. ValueError
    / FileNotFoundError naming the folder and component for anything else (an unknown class,
    pickle-only weights)."""
    import diffusers
    import transformers

    path = Path(path)
    index_file = path / "model_index.json"
    index = read_index(path)
    libraries = {"diffusers": diffusers, "transformers": transformers}
    parts: dict[str, object] = {}
    for name, (library, base, weights) in _registry().items():
        entry = index.get(name)
        if (
            not entry
            or not isinstance(entry, list)
            or entry[0] is None
            or not (path / name).is_dir()
        ):
            if name in REQUIRED:
                raise FileNotFoundError(f"{path}: the pipeline has no {name}/ component")
            parts[name] = None
            continue
        cls = None
        if len(entry) == 2 and entry[0] == library and isinstance(entry[1], str):
            cls = getattr(libraries[library], entry[1], None)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ValueError(
                f"{index_file}: {name} is {entry!r:.80}, not a {library}.{base.__name__} class "
                "(the only kind ctrak loads for it)"
            )
        folder = path / name
        for config in folder.glob("*config.json"):  # else diffusers looks for it online
            try:
                ok = isinstance(json.loads(config.read_text(encoding="utf-8")), dict)
            except (ValueError, UnicodeDecodeError, RecursionError):
                ok = False
            if not ok:
                raise ValueError(f"{config}: not a JSON object")
        kw: dict[str, object] = {"local_files_only": True}
        if weights:
            if not any(folder.glob("*.safetensors")):
                found = sorted(p.name for p in folder.glob("*.bin"))
                what = f"only pickle weights {found}" if found else "no .safetensors weights"
                raise ValueError(
                    f"{folder}: {what}; ctrak reads safetensors only (convert them, e.g. "
                    "save_pretrained(..., safe_serialization=True))"
                )
            kw["use_safetensors"] = True
        load = getattr(cls, "from_pretrained", None) or cls.from_config
        with quiet_libraries():
            parts[name] = load(str(folder), **kw)
    return parts


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' loggers at errors only, and no progress bars, meanwhile."""
    import diffusers
    import transformers

    with _quiet(diffusers, transformers):
        yield


@contextlib.contextmanager
def _quiet(*libraries) -> Iterator[None]:
    """Their loggers' multi-line warnings (accelerate hints, ...) and progress bars would print
    around the CLI's one error line: errors only, no bars, while loading."""
    levels = [lib.utils.logging.get_verbosity() for lib in libraries]
    bars = [lib.utils.logging.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()  # "Loading weights" bars of transformers 5
    try:
        yield
    finally:
        for lib, level, bar in zip(libraries, levels, bars, strict=True):
            lib.utils.logging.set_verbosity(level)
            if bar:
                lib.utils.logging.enable_progress_bar()
