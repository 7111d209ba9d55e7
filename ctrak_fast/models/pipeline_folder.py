"""The components of a local diffusers pipeline folder, loaded safely.

A folder's ``model_index.json`` names a (library, class) per component. Nothing it names is
imported: each component has one library and one base class here (the registry), and the class
is looked up in that already-imported library and must derive from the base. Model weights are
read from safetensors only (``use_safetensors=True``); a folder holding only pickle ``.bin``
weights is refused with a message instead of being unpickled.

The denoiser is a ``unet/`` (SD, SDXL: the kinds read the components) or a ``transformer/``
(DiT, PixArt, SD3: the kinds call the pipeline's own prompt encoding, so the pipeline object is
built from the loaded components; its class must be one of ``TRANSFORMER_PIPELINES``).
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
        # DiT, PixArt, SD3: a diffusers transformer as denoiser; SD3's T5 as third text encoder
        "transformer": ("diffusers", diffusers.ModelMixin, True),
        "text_encoder_3": ("transformers", transformers.PreTrainedModel, True),
        "tokenizer_3": ("transformers", transformers.PreTrainedTokenizerBase, False),
    }


REQUIRED = ("scheduler",)
DENOISERS = ("unet", "transformer")  # exactly one of them
# The pipeline classes built around a transformer (their own encode_prompt / id2label): a
# folder's _class_name is looked up in diffusers only when it is one of these.
TRANSFORMER_PIPELINES = (
    "DiTPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "StableDiffusion3Pipeline",
)


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
    """{unet or transformer, scheduler, vae, text_encoder(_2, _3), tokenizer(_2, _3)} of the
    pipeline folder ``path`` (None for an optional component it lacks); nothing is downloaded.
    ValueError / FileNotFoundError naming the folder and component for anything else (an unknown
    class, pickle-only weights, no denoiser or two)."""
    import diffusers
    import transformers

    path = Path(path)
    index_file = path / "model_index.json"
    index = read_index(path)
    libraries = {"diffusers": diffusers, "transformers": transformers}
    denoisers = [name for name in DENOISERS if _listed(path, index, name)]
    if len(denoisers) != 1:  # said before any weight is read
        what = (
            "no unet/ or transformer/ component" if not denoisers else "a unet/ and a transformer/"
        )
        raise FileNotFoundError(f"{path}: the pipeline has {what} (one denoiser)")
    parts: dict[str, object] = {}
    for name, (library, base, weights) in _registry().items():
        if not _listed(path, index, name):
            if name in REQUIRED:
                raise FileNotFoundError(f"{path}: the pipeline has no {name}/ component")
            parts[name] = None
            continue
        entry: list[Any] = index[name]
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


def _listed(path: Path, index: dict[str, Any], name: str) -> bool:
    """Whether the index names a class for component `name` and the folder holds it."""
    entry = index.get(name)
    return (
        isinstance(entry, list) and bool(entry) and entry[0] is not None and (path / name).is_dir()
    )


def pipeline_object(path: str | os.PathLike[str], parts: dict[str, object]) -> Any:
    """What the model kinds read of the folder ``path`` whose components are ``parts``: for a
    UNet, the components and model_index.json as ``config``; for a transformer, the diffusers
    pipeline of the folder's _class_name (one of TRANSFORMER_PIPELINES, else ValueError) built
    from them, with the index's plain settings its constructor takes (DiT's id2label)."""
    import inspect
    from types import SimpleNamespace

    import diffusers

    index = read_index(path)
    if parts.get("transformer") is None:
        return SimpleNamespace(**parts, config=index)
    name = index.get("_class_name")
    if name not in TRANSFORMER_PIPELINES:
        raise ValueError(
            f"{Path(path) / 'model_index.json'}: _class_name {str(name)[:80]!r} is not a "
            f"transformer pipeline ctrak loads ({', '.join(TRANSFORMER_PIPELINES)})"
        )
    with quiet_libraries():  # the class's first import: transformers' hints about torchvision
        cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in parts.items() if k in params}
    for key, value in index.items():  # settings, not components: [library, class] pairs
        if key in params and key not in parts and not key.startswith("_"):
            if key == "id2label" and not (
                isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            ):
                raise ValueError(f"{path}: model_index.json's id2label is not {{id: 'name'}}")
            if isinstance(value, dict | str | int | float | bool):
                kw[key] = value
    missing = [
        k
        for k, p in params.items()
        if k != "self" and p.default is inspect.Parameter.empty and kw.get(k) is None
    ]
    if missing:
        raise FileNotFoundError(f"{path}: a {name} needs the component(s) {missing}")
    with quiet_libraries():
        return cls(**kw)


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
