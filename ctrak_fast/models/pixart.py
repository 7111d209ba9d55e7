"""The PixArt kind (PixArt-alpha / -Sigma: PixArtTransformer2DModel, T5 text encoder) behind
eps(x_t, t, cond): a DDPM-trained latent transformer conditioned on T5 tokens.

Condition path: the prompt enters PixArt only through its cross-attention. The T5 states are
mapped by `caption_projection` and read by every block's `attn2` (keys and values from the
caption; queries from the image). The rule is `attn2` and `caption_projection`; the timestep
adaLN (`adaln_single`, the blocks' scale_shift_table) reads no text.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ctrak_fast.models.diffusers_unet import sample_size, to_eps
from ctrak_fast.models.dit import learned_sigma_eps
from ctrak_fast.models.pipeline_text import PipelineTextAdapter, PipelineTextKind

__all__ = ["PIXART_CONDITION_PATH", "PixArtAdapter", "PixArtKind"]

PIXART_CONDITION_PATH = r"\.attn2\.|\.caption_projection\."


class PixArtAdapter(PipelineTextAdapter):
    """A PixArtAlphaPipeline / PixArtSigmaPipeline as eps(x_t, t, cond).

    Packed condition [B, L, D + 1]: the T5 states [B, L, D] and, in the last column, the token
    mask the pipeline passes as `encoder_attention_mask` (padding is not attended). A
    learned-sigma output (2 x in_channels) keeps its eps half. Prompts are T5-encoded by the
    pipeline (max_length: its `max_sequence_length` default, 120 for alpha, 300 for Sigma).
    """

    condition_param_filter = PIXART_CONDITION_PATH
    default_param_filter = r"\.attn2\."

    def __init__(self, pipe: Any, **kw: Any) -> None:
        if kw.get("max_length") is None:
            signature = inspect.signature(pipe.encode_prompt).parameters
            kw["max_length"] = int(signature["max_sequence_length"].default)
        super().__init__(pipe, **kw)
        cfg: Any = self.unet.config
        self.channels = int(cfg.in_channels)
        vae: Any = self.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.pixels = sample_size(self.unet) * factor  # the 1024-px model reads its size

    def pack(self, prompts: list[str]) -> Tensor:
        states, mask, _, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=False,
            max_sequence_length=self.max_length,
        )
        return torch.cat([states.float(), mask[..., None].float()], dim=-1)

    def unet_output(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        states, mask = cond[..., :-1], cond[..., -1]
        added: dict[str, Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if getattr(self.unet, "use_additional_conditions", False):
            b = len(x)
            size = torch.tensor([[self.pixels, self.pixels]], dtype=x.dtype, device=x.device)
            added = {
                "resolution": size.expand(b, 2),
                "aspect_ratio": torch.ones(b, 1, dtype=x.dtype, device=x.device),
            }
        out = self.unet(
            x,
            encoder_hidden_states=states,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs=added,
        ).sample
        return out  # type: ignore[no-any-return]

    def model_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        eps = learned_sigma_eps(out, self.channels)
        return to_eps(eps, x_t, t, self.schedule, self.prediction_type)


class PixArtKind(PipelineTextKind):
    """PixArtAdapter models (PixArt-alpha / -Sigma pipelines)."""

    name = "pixart"
    adapter = PixArtAdapter
    guidance = 4.5  # the PixArt pipelines' default

    @staticmethod
    def accepts_unet(unet: Any) -> bool:
        return type(unet).__name__ == "PixArtTransformer2DModel"
