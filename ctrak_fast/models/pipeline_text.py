"""Text-to-image transformers (PixArt, SD3) behind the TextToImageAdapter: prompts are encoded by
the pipeline's own `encode_prompt` (T5 for PixArt; two CLIPs and T5 for SD3), so a condition is
exactly what the pipeline would feed its transformer; the adapter's prompt ids, embedding cache,
VAE, float16 loss scaling and the text-to-image featurizer are the TextToImageAdapter's.

A condition embedding packs what the transformer reads beside the tokens (PixArt: the token
mask; SD3: the pooled projection) into one float tensor [L', D'], so conditions stay one tensor
per prompt as the method expects (`pack` / `unpack` of each adapter).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ctrak_fast.engine.projection import FactorizedSpec, ProjectionSpec
from ctrak_fast.method import diffusion
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.models.t2i_features import TextToImageKind
from ctrak_fast.models.text2image import TextToImageAdapter

__all__ = ["PipelineTextAdapter", "PipelineTextKind"]


class PipelineTextAdapter(TextToImageAdapter):
    """A diffusers text-to-image transformer pipeline as eps(x_t, t, cond) (or velocity, for a
    flow schedule). The transformer is the adapter's `unet` attribute (the denoiser); cond is
    prompt ids [B, 1] or packed embeddings [B, L', D'] (`encode_prompts`).

    Args:
        pipe: the pipeline (its transformer, scheduler, vae, text_encoder, tokenizer and
            `encode_prompt` are used; nothing is copied).
        schedule: the training schedule (default: the scheduler's DDPM schedule).
        dtype: the transformer's execution dtype (default: its own).
        max_length: the prompt's token length (default: the pipeline's).
    """

    # the parameters' regex used when a spec names none (PixArt: cross-attention, as for SD)
    default_param_filter: str

    def __init__(
        self,
        pipe: Any,
        *,
        schedule: diffusion.Schedule | None = None,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__(
            pipe.transformer,
            pipe.scheduler,
            vae=getattr(pipe, "vae", None),
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            dtype=dtype,
            max_length=max_length,
            schedule=schedule,
        )
        self.pipe = pipe  # a DiffusionPipeline is no nn.Module: nothing registered twice

    @property
    def transformer(self) -> nn.Module:
        return self.unet

    @abstractmethod
    def pack(self, prompts: list[str]) -> Tensor:
        """The pipeline's encoding of prompts, packed: float [B, L', D'] on any device."""

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> packed condition embeddings [B, L', D'] float32."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.pack(prompts).float()

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Tensor,
        negative_prompt: str | Tensor = "",
        guidance: float = 4.5,
        steps: int = 50,
        seed: int = 0,
        n: int = 1,
        scheduler: Any = None,
    ) -> Tensor:
        """Sample x0 [n,C,h,w] with CFG by the method's own sampler on the adapter's schedule
        (DDIM; the Euler flow ODE for a flow), not a diffusers scheduler: the same (prompt,
        seed) gives the same image. Prompts: text, prompt ids int64 [1] or packed embeddings."""
        if scheduler is not None:
            raise ValueError("transformer adapters sample on their own schedule: no scheduler=")
        pos, neg = (
            self.prompt_ids([p])[0] if isinstance(p, str) else p for p in (prompt, negative_prompt)
        )
        x0, _ = diffusion.ddim_sample(
            self,
            pos[None].expand(n, *pos.shape),
            neg_cond=neg[None],
            guidance=guidance,
            steps=steps,
            generator=torch.Generator().manual_seed(seed),
            schedule=self.schedule,
            clip_x0=False,
        )
        return x0


class PipelineTextKind(TextToImageKind):
    """The kinds of PipelineTextAdapter models: prompts as conditions (a phrase removed makes
    c-), samples by the adapter's own DDIM / Euler loop, latents decoded by the VAE."""

    adapter: type[PipelineTextAdapter]
    model: PipelineTextAdapter

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.adapter)

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
        if null_class is not None:
            raise ValueError("null_class is for class-conditional models; prompts have ''")
        return cls.adapter(pipe, dtype=dtype), kwargs

    def featurizer(
        self,
        spec: FeatureSpec,
        projection: ProjectionSpec | FactorizedSpec,
        *,
        grad_backend: str = "hooks",
        projector_backend: str = "auto",
    ) -> Featurizer:
        if spec.param_filter is None:
            spec = FeatureSpec.from_dict(
                {**spec.to_dict(), "param_filter": self.model.default_param_filter}
            )
        return super().featurizer(
            spec, projection, grad_backend=grad_backend, projector_backend=projector_backend
        )
