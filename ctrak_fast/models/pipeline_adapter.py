"""A local diffusers pipeline folder as the eps adapter of its model kind, optionally with a LoRA.

The folder's components are loaded by pipeline_folder.py (registry classes, safetensors only,
nothing downloaded; a transformer pipeline is built as its allowed diffusers class); the
registry's `kind_of_pipeline` picks the kind from the denoiser (DiT, PixArt, SD3 transformers;
SDXL's ``addition_embed_type="text_time"`` before plain text-to-image), and the kind builds its
adapter.
A LoRA (diffusers / peft format, `save_lora_weights`) is added to the UNet as the adapter
"default"; its parameters are named ``...lora_A.default.weight`` / ``...lora_B...``, so the
parameter filter ``\\.lora_`` selects the fine-tune (`lora_param_filter`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrak_fast.models.registry import kind_of_pipeline

__all__ = ["LORA_SCOPES", "load_lora", "load_pipeline_adapter", "lora_param_filter"]

LORA_SCOPES = ("lora", "base", "both")
LORA_FILTER = r"\.lora_"


def lora_param_filter(scope: str, condition_filter: str) -> str:
    """The parameter regex of a LoRA scope: the LoRA's own parameters ("lora", the fine-tuning
    question), the condition path's base weights without them ("base"), or both.

    Examples:
        >>> import re
        >>> names = ["b.attn2.to_k.lora_A.default.weight", "b.attn2.to_k.base_layer.weight"]
        >>> [[n for n in names if re.search(lora_param_filter(s, r"\\.attn2\\."), n)]
        ...  for s in ("lora", "base")]
        [['b.attn2.to_k.lora_A.default.weight'], ['b.attn2.to_k.base_layer.weight']]
    """
    if scope == "lora":
        return LORA_FILTER
    if scope == "base":
        return rf"^(?!.*{LORA_FILTER}).*(?:{condition_filter})"
    if scope == "both":
        return rf"(?:{condition_filter})|{LORA_FILTER}"
    raise ValueError(f"unknown LoRA scope {scope!r}; expected one of {list(LORA_SCOPES)}")


def load_lora(unet: nn.Module, path: str | os.PathLike[str]) -> None:
    """Add the LoRA at `path` (a .safetensors file, or a folder holding
    pytorch_lora_weights.safetensors) to `unet`; ValueError / ImportError naming what is wrong
    (no peft, no such file, text-encoder LoRA layers, keys that match no UNet module)."""
    from safetensors import safe_open

    try:
        import peft  # noqa: F401  (diffusers needs it for LoRA; say so before loading)
    except ImportError:
        raise ImportError("--lora needs peft: pip install peft") from None
    p = Path(path)
    file = p / "pytorch_lora_weights.safetensors" if p.is_dir() else p
    if not file.is_file() or file.suffix != ".safetensors":
        raise FileNotFoundError(f"{path}: no LoRA safetensors file (pytorch_lora_weights)")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # a corrupt or foreign file: one line naming it
        raise ValueError(f"{file}: not a safetensors LoRA ({str(e).splitlines()[0]})") from None
    text = sorted({k.split(".")[0] for k in keys if not k.startswith("unet.")})
    if text or not keys:
        raise ValueError(
            f"{file}: only UNet LoRA layers (keys 'unet.*') are supported; found {text or 'none'}"
        )
    before = sum(1 for n, _ in unet.named_parameters() if ".lora_" in n)
    try:
        unet.load_lora_adapter(  # type: ignore[operator]
            str(file.parent),
            weight_name=file.name,
            prefix="unet",
            adapter_name="default",
            local_files_only=True,
            use_safetensors=True,
        )
    except (TypeError, RuntimeError, KeyError, AttributeError) as e:
        raise ValueError(f"{file}: the LoRA does not fit this UNet ({str(e)[:200]})") from None
    if sum(1 for n, _ in unet.named_parameters() if ".lora_" in n) == before:
        raise ValueError(f"{file}: no LoRA layer matched a module of this UNet")


def load_pipeline_adapter(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    lora: str | os.PathLike[str] | None = None,
    method: str = "concept-trak-cond",
) -> nn.Module:
    """The adapter (eps model) of the pipeline folder `path` (SD, SDXL, DiT, PixArt, SD3), with
    the LoRA `lora` on its UNet.

    Examples (need a folder; not doctests):
            adapter = load_pipeline_adapter("sdxl-folder", dtype=torch.bfloat16)
    """
    from ctrak_fast.models.pipeline_folder import (
        load_pipeline_parts,
        pipeline_object,
        quiet_libraries,
    )

    parts = load_pipeline_parts(path)
    if lora is not None and parts["unet"] is None:
        raise ValueError(
            f"{path}: --lora is loaded onto a UNet (SD, SDXL); this pipeline's denoiser is a "
            f"{type(parts['transformer']).__name__}"
        )
    pipe = pipeline_object(path, parts)
    kind = kind_of_pipeline(pipe)
    with quiet_libraries():  # their hints about dtypes and PEFT, printed around the CLI's lines
        if lora is not None:
            load_lora(parts["unet"], lora)  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        model, _ = kind.from_pipeline(pipe, method, dtype=dtype, null_class=None, kwargs=kwargs)
    return model
