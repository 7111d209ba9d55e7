"""Stable Diffusion XL: a UNet2DConditionModel with ``addition_embed_type="text_time"``, two text
encoders, a pooled text embedding and the added time ids, behind the eps(x_t, t, cond) interface.

A condition of SDXL is three tensors: the encoder hidden states [L, D] (the penultimate hidden
states of both text encoders, concatenated: D = D1 + D2), the pooled embedding ``text_embeds``
[P] of the second encoder (CLIPTextModelWithProjection), and ``time_ids`` [6] (original size,
crop corner, target size: the image's own size, no crop). The engine passes one tensor per
condition, so `SDXLCondition` packs the three into [L + R, D]: the hidden states, then
R = ceil((P + 6) / D) rows holding pooled and time ids (zero padded). Conditions are still
prompt ids [B, 1] (the TextToImageAdapter contract); `encode_prompts` returns packed states.

The condition path (the parameter filter "@condition" of concept-trak-cond) is where the prompt
enters the UNet: every cross-attention layer (attn2, reading the hidden states) and the added
embedding (``add_embedding``, the MLP that reads the pooled text with the time ids and is added
to the timestep embedding). The empty prompt is all zeros when the pipeline says
``force_zeros_for_empty_prompt`` (SDXL's default: its unconditional input, as in diffusers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ctrak_fast.models.diffusers_unet import sample_size
from ctrak_fast.models.t2i_features import TextToImageKind
from ctrak_fast.models.text2image import TextToImageAdapter

__all__ = ["SDXL_PARAM_FILTER", "SDXLAdapter", "SDXLCondition", "SDXLKind"]

SDXL_PARAM_FILTER = r"\.attn2\.|unet\.add_embedding\."
"""Cross-attention (attn2) and the added pooled-text / time-id embedding (add_embedding)."""

N_TIME_IDS = 6


@dataclass(frozen=True)
class SDXLCondition:
    """The layout of a packed SDXL condition [B, L + R, D] (see the module docstring)."""

    tokens: int  # L
    width: int  # D
    pooled: int  # P

    @property
    def extra_rows(self) -> int:
        return math.ceil((self.pooled + N_TIME_IDS) / self.width)

    def pack(self, hidden: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
        """hidden [B, L, D], pooled [B, P], time_ids [B, 6] -> [B, L + R, D].

        Examples:
            >>> lay = SDXLCondition(tokens=2, width=4, pooled=3)
            >>> c = lay.pack(torch.ones(1, 2, 4), torch.full((1, 3), 2.0), torch.arange(6.0)[None])
            >>> c.shape, [t.shape for t in lay.unpack(c)]
            (torch.Size([1, 5, 4]), [torch.Size([1, 2, 4]), torch.Size([1, 3]), torch.Size([1, 6])])
        """
        b = hidden.shape[0]
        tail = torch.zeros(
            b, self.extra_rows * self.width, dtype=hidden.dtype, device=hidden.device
        )
        tail[:, : self.pooled] = pooled
        tail[:, self.pooled : self.pooled + N_TIME_IDS] = time_ids
        return torch.cat([hidden, tail.view(b, self.extra_rows, self.width)], dim=1)

    def unpack(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L + R, D] -> (hidden [B, L, D], pooled [B, P], time_ids [B, 6])."""
        if cond.shape[1:] != (self.tokens + self.extra_rows, self.width):
            raise ValueError(
                f"an SDXL condition is [B, {self.tokens + self.extra_rows}, {self.width}], "
                f"got {list(cond.shape)}"
            )
        tail = cond[:, self.tokens :].reshape(cond.shape[0], -1)
        p = self.pooled
        return cond[:, : self.tokens], tail[:, :p], tail[:, p : p + N_TIME_IDS]


class SDXLAdapter(TextToImageAdapter):
    """An SDXL pipeline's UNet as eps(x_t, t, cond); cond: prompt ids [B, 1] or packed
    conditions [B, L + R, D] (SDXLCondition). Args as TextToImageAdapter, plus the second text
    encoder and tokenizer and the pipeline's force_zeros_for_empty_prompt."""

    condition_param_filter = SDXL_PARAM_FILTER

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        vae: nn.Module | None,
        text_encoder: nn.Module,
        tokenizer: Any,
        text_encoder_2: nn.Module | None,
        tokenizer_2: Any,
        *,
        force_zeros_for_empty_prompt: bool = True,
        **kw: Any,
    ) -> None:
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("an SDXL UNet has addition_embed_type='text_time'")
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("an SDXL pipeline has text_encoder_2 and tokenizer_2")
        super().__init__(unet, scheduler, vae, text_encoder, tokenizer, **kw)
        self._aux["text_encoder_2"] = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        configs: list[Any] = [text_encoder.config, text_encoder_2.config]
        self.layout = SDXLCondition(
            tokens=int(self.max_length or tokenizer.model_max_length),
            width=sum(int(c.hidden_size) for c in configs),
            pooled=int(configs[1].projection_dim),
        )
        vae_config: Any = None if vae is None else vae.config
        scale = 2 ** (len(vae_config.block_out_channels) - 1) if vae_config is not None else 1
        side = float(sample_size(unet) * scale)
        # (original size, crop top-left, target size): the training image's own size, uncropped
        self.time_ids = torch.tensor([side, side, 0.0, 0.0, side, side])

    @property
    def text_encoder_2(self) -> nn.Module:
        return self._aux["text_encoder_2"]  # type: ignore[return-value]

    def unet_output(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        hidden, pooled, time_ids = self.layout.unpack(cond)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        out = self.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added)
        return out.sample  # type: ignore[no-any-return]

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Any) -> Tensor:
        """Prompts -> packed conditions [B, L + R, D] float32 (as diffusers' SDXL encode_prompt:
        penultimate hidden states of both encoders, the second's projected pooled output)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states, pooled = [], torch.empty(0)
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        for tok, enc in pairs:
            batch = tok(
                prompts,
                padding="max_length",
                max_length=self.layout.tokens,
                truncation=True,
                return_tensors="pt",
            )
            dev = next(enc.parameters()).device  # type: ignore[union-attr]
            out = enc(batch["input_ids"].to(dev), output_hidden_states=True)  # type: ignore[misc]
            states.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # the last encoder's: CLIPTextModelWithProjection.text_embeds
        hidden = torch.cat(states, dim=-1)
        if self.force_zeros_for_empty_prompt:  # SDXL's unconditional input
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = self.time_ids.to(hidden.device).expand(len(prompts), -1)
        return self.layout.pack(hidden, pooled, time_ids)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
        }

    @classmethod
    def from_pipeline(cls, pipe: Any, **kw: Any) -> SDXLAdapter:
        """From a StableDiffusionXLPipeline (or any object with its components and config)."""
        config = dict(getattr(pipe, "config", None) or {})
        return cls(
            pipe.unet,
            pipe.scheduler,
            getattr(pipe, "vae", None),
            pipe.text_encoder,
            pipe.tokenizer,
            getattr(pipe, "text_encoder_2", None),
            getattr(pipe, "tokenizer_2", None),
            force_zeros_for_empty_prompt=config.get("force_zeros_for_empty_prompt", True),
            **kw,
        )


class SDXLKind(TextToImageKind):
    """SDXL pipelines: prompts as conditions (a concept deletes its phrase), as text-to-image."""

    name = "sdxl"
    model: SDXLAdapter

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return isinstance(model, SDXLAdapter)

    @staticmethod
    def accepts_unet(unet: Any) -> bool:
        return getattr(unet.config, "addition_embed_type", None) == "text_time"

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        method: str,
        *,
        dtype: torch.dtype | None,
        null_class: int | None,
        kwargs: dict[str, Any],
    ) -> tuple[nn.Module, dict[str, Any]]:
        return SDXLAdapter.from_pipeline(pipe, dtype=dtype), kwargs
