"""Text-to-image diffusers models behind the engine's eps(x_t, t, cond) interface.

`TextToImageAdapter` wraps a UNet2DConditionModel (and, optionally, an AutoencoderKL, a text encoder
with its tokenizer and a diffusers scheduler) as one module

    adapter(x_t [B,C,h,w] float32, t [B] int64, cond) -> eps [B,C,h,w] float32

so Featurizer, the DDIM inversion/sampling of diffusion.py and the per-sample gradients work on it
unchanged. x_t lives in latent space when there is a VAE (latents = scaling_factor * posterior mean
of the VAE encoder), in pixel space otherwise. cond is either the text encoder's last hidden state
[B,L,D] float, or prompt ids int64 [B,1] (`adapter.prompt_ids(prompts)`): the engine's integer
condition contract, 8 bytes per training image instead of L*D floats; ids are embedded on use by
the text encoder, with a small cache (a featurizer calls the UNet ~140 times per batch).

Only the UNet is a sub-module: gradients and the model fingerprint are taken over its parameters;
the VAE and text encoder enter the store manifest through their own fingerprints (`describe`).

Precision: the UNet executes in `dtype`; inputs are cast down and outputs returned as float32, so
samplers, inversion and the DPS guidance run in float32, and per-sample gradients are cast to
float32 before they are normalised, summed and projected. In float16 the gradients through the UNet
are scaled by `grad_scale` (static loss scaling, as AMP does) and unscaled at the boundaries, so a
mean-over-pixels loss does not underflow; on overflow the featurizer retries with a smaller scale.
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ctrak_fast.engine.store import model_fingerprint
from ctrak_fast.method import diffusion
from ctrak_fast.models.diffusers_unet import (
    GradScale,
    check_prediction_type,
    sample_size,
    schedule_from_scheduler,
    to_eps,
)
from ctrak_fast.models.vae import decode_latents, encode_latents

__all__ = ["T2I_PARAM_FILTER", "TextToImageAdapter", "sample_size", "schedule_from_scheduler"]

# Cross-attention of every transformer block (to_q, to_k, to_v, to_out): the text -> image pathway
# and the paper's parameter subset for Stable Diffusion. Matches diffusers' module names
# "...transformer_blocks.N.attn2.to_k.weight"; self-attention is attn1.
T2I_PARAM_FILTER = r"\.attn2\."


class TextToImageAdapter(nn.Module):
    """A diffusers text-to-image model as eps(x_t, t, cond) (see the module docstring).

    Args:
        unet: UNet2DConditionModel (any module called as unet(x, t, encoder_hidden_states=c)
            returning `.sample`).
        scheduler: a diffusers scheduler; its config gives the training schedule and the
            prediction type ("epsilon", "v_prediction" and "sample" are converted to eps).
        vae: AutoencoderKL or None (pixel-space model).
        text_encoder, tokenizer: a transformers text model (CLIPTextModel, BertModel, ...) or any
            module returning hidden states, and a callable tokenizer in the transformers style.
            Optional: without them, conditions are passed as embeddings.
        dtype: execution dtype of the UNet (default: its parameters' dtype).
        max_length: token length of a prompt (default: tokenizer.model_max_length, e.g. 77).
        text_attention_mask: pass the tokenizer's attention mask to the text encoder (default:
            text_encoder.config.use_attention_mask, False for CLIP as in diffusers' pipelines).
        grad_scale: float16 loss scale (default 2**10 for float16, 1 otherwise).
        vae_dtype: the VAE runs once per image; float32 by default (SD VAEs overflow in float16).
        prompt_cache: embeddings of prompt ids kept (most recently used first).
        schedule: the training schedule (default: the scheduler's DDPM schedule, eps output).

    Examples (need a model; not doctests):
            ad = TextToImageAdapter.from_pretrained("path/to/sd-1.5", dtype=torch.float16)
            cond = ad.encode_prompts(["a pikachu in the style of picasso"])     # [1, 77, 768]
            x0 = ad.encode_images(images)                    # [B, 4, 64, 64] latents
            eps = ad(x_t, t, cond.expand(len(x_t), -1, -1))    # float32
    """

    # The modules the prompt enters through (grads/layout.py CONDITION_PATH): cross-attention.
    condition_param_filter = T2I_PARAM_FILTER

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer=None,
        *,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
        text_attention_mask: bool | None = None,
        grad_scale: float | None = None,
        vae_dtype: torch.dtype = torch.float32,
        prompt_cache: int = 256,
        schedule: diffusion.Schedule | None = None,
    ):
        super().__init__()
        self.unet = unet.eval()
        self.compute_dtype = dtype or next(unet.parameters()).dtype
        if self.compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported execution dtype {self.compute_dtype}")
        if next(unet.parameters()).dtype != self.compute_dtype:  # (diffusers warns on any .to)
            self.unet.to(self.compute_dtype)
        # Beside the module tree on purpose: gradients and the fingerprint cover the UNet only.
        self._aux: dict[str, nn.Module | None] = {"vae": vae, "text_encoder": text_encoder}
        if vae is not None:
            vae.to(vae_dtype).eval().requires_grad_(False)
        if text_encoder is not None:
            text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        # the objective the model was trained with: the scheduler's DDPM schedule unless given
        self.schedule = schedule or schedule_from_scheduler(scheduler)
        self.prediction_type = (
            check_prediction_type(scheduler) if schedule is None else schedule.prediction
        )
        if max_length is None and tokenizer is not None:
            max_length = int(tokenizer.model_max_length)
        self.max_length = max_length
        if text_attention_mask is None:
            cfg = getattr(text_encoder, "config", None)
            text_attention_mask = bool(getattr(cfg, "use_attention_mask", False))
        self.text_attention_mask = text_attention_mask
        default_scale = 2.0**10 if self.compute_dtype == torch.float16 else 1.0
        self.grad_scale = float(default_scale if grad_scale is None else grad_scale)
        # What diffusion.ddim_sample / NoiseSchedule.for_model read from a model.
        self.config = {
            "image_size": sample_size(unet),
            "in_channels": int(unet.config.in_channels),
            "schedule": self.schedule.config,
        }
        self._null: torch.Tensor | None = None
        self._prompts: list[str] = []
        self._prompt_index: dict[str, int] = {}
        self._emb_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.prompt_cache = prompt_cache
        self._fingerprints: dict[str, str | None] = {}

    # -- components --

    @property
    def vae(self) -> nn.Module | None:
        return self._aux["vae"]

    @property
    def text_encoder(self) -> nn.Module | None:
        return self._aux["text_encoder"]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def clip_sample(self) -> bool:
        """Whether samplers may clamp x0 estimates to [-1, 1]: pixels yes, latents no."""
        return not self.latent

    def _apply(self, fn, recurse=True):
        # .to(device) moves the VAE and text encoder too; they are not sub-modules.
        super()._apply(fn, recurse)
        for m in self._aux.values():
            if m is not None:
                m._apply(fn)
        return self

    # -- eps --

    def forward(self, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        """x_t [B,C,h,w] float32, t [B] int64 (or int), cond [B,L,D] embeddings or [B,1] int64
        prompt ids -> eps [B,C,h,w] float32."""
        if not cond.is_floating_point():
            cond = self.embed_ids(cond)
        if not torch.is_tensor(t):
            t = torch.tensor(t, dtype=torch.int64, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        t, cond = t.to(x_t.device), cond.to(x_t.device)  # callers build t on the CPU
        s = self.grad_scale
        x = GradScale.apply(x_t, 1.0 / s) if s != 1.0 else x_t
        out = self.unet_output(x.to(self.compute_dtype), t, cond.to(self.compute_dtype)).float()
        if s != 1.0:
            out = GradScale.apply(out, s)
        return self.model_output(out, x_t, t)

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output at (x, t) under the text states `cond` [B, L, D], all in the
        execution dtype (kinds with more conditioning inputs, e.g. SDXL, or another network,
        e.g. a transformer, override this)."""
        return self.unet(x, t, encoder_hidden_states=cond).sample  # type: ignore[no-any-return]

    def model_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output [B,C,h,w] float32 as what the schedule predicts: eps."""
        return to_eps(out, x_t, t, self.schedule, self.prediction_type)

    # -- text --

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> text encoder hidden states [B, max_length, D] float32."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this adapter has no text encoder/tokenizer: pass embeddings as cond")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        dev = next(self.text_encoder.parameters()).device
        kw = {"attention_mask": batch["attention_mask"].to(dev)} if self.text_attention_mask else {}
        out = self.text_encoder(batch["input_ids"].to(dev), **kw)
        if not torch.is_tensor(out):  # a transformers output, or a tuple of states
            hidden = getattr(out, "last_hidden_state", None)
            out = hidden if hidden is not None else out[0]
        return out.float()

    def prompt_ids(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> condition ids int64 [B, 1]; each distinct prompt gets one id (per adapter).

        Examples (a fresh adapter; not a doctest):
                ad.prompt_ids(["a red triangle", "", "a red triangle"]).flatten().tolist()
                # -> [0, 1, 0]
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if p not in self._prompt_index:
                self._prompt_index[p] = len(self._prompts)
                self._prompts.append(p)
        return torch.tensor([self._prompt_index[p] for p in prompts], dtype=torch.int64)[:, None]

    def prompt_of(self, ids: torch.Tensor) -> list[str]:
        """The prompts of condition ids [B, 1] (or [B])."""
        return [self._prompts[i] for i in ids.reshape(len(ids), -1)[:, 0].tolist()]

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Condition ids [B, 1] -> text states [B, L, D] float32 on the UNet's device (cached)."""
        flat = ids.reshape(len(ids), -1)[:, 0].tolist()
        if any(not 0 <= i < len(self._prompts) for i in flat):
            raise ValueError(f"unknown prompt id in {sorted(set(flat))}: use adapter.prompt_ids()")
        missing = sorted({i for i in flat if i not in self._emb_cache})
        if missing:
            emb = self.encode_prompts([self._prompts[i] for i in missing])
            self._emb_cache.update(zip(missing, emb, strict=True))
        for i in dict.fromkeys(flat):
            self._emb_cache.move_to_end(i)
        while len(self._emb_cache) > max(self.prompt_cache, len(set(flat))):
            self._emb_cache.popitem(last=False)
        return torch.stack([self._emb_cache[i] for i in flat]).to(self.device)

    def _embedding(self, prompt: str | torch.Tensor) -> torch.Tensor:
        """One prompt as text, id or embedding -> embedding [L, D] on the UNet's device."""
        if isinstance(prompt, str):
            return self.encode_prompts([prompt])[0].to(self.device)
        if not prompt.is_floating_point():
            return self.embed_ids(prompt.reshape(1, 1))[0]
        return prompt.float().to(self.device)

    def null_cond(self, batch: int = 1, device=None) -> torch.Tensor:
        """The unconditional condition of CFG, the empty prompt, for a batch: prompt ids
        int64 [batch, 1], or the embedding [batch, L, D] given to set_null_cond (adapters
        without a text encoder, whose conditions are embeddings)."""
        device = device or self.device
        if self._null is not None:
            return self._null.to(device).expand(batch, *self._null.shape).clone()
        return self.prompt_ids([""]).to(device).expand(batch, 1).clone()

    def set_null_cond(self, emb: torch.Tensor) -> None:
        """Use embeddings as conditions: `emb` [L, D] is the unconditional one."""
        self._null = emb.detach().float()

    # -- latents --

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> the diffusion model's x0 [B,C,h,w] float32.

        With a VAE: (posterior mean - shift) * scaling_factor (models/vae.py). Without: the
        images themselves.
        """
        if self.vae is None:
            return images.float()
        return encode_latents(self.vae, images, self.device, batch_size)

    @torch.no_grad()
    def decode_latents(self, x0: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """x0 [B,C,h,w] -> images [B,3,H,W] float32 (clamped to [-1, 1])."""
        if self.vae is None:
            return x0.float().clamp(-1, 1)
        return decode_latents(self.vae, x0, self.device, batch_size)

    # -- sampling through the scheduler API --

    @torch.no_grad()
    def generate(
        self,
        prompt: str | torch.Tensor,
        negative_prompt: str | torch.Tensor = "",
        guidance: float = 7.5,
        steps: int = 50,
        seed: int = 0,
        n: int = 1,
        scheduler=None,
    ) -> torch.Tensor:
        """Sample x0 [n,C,h,w] with CFG through a diffusers scheduler (DDPM, DDIM, Euler, ...).

        The scheduler is cloned with prediction_type="epsilon" (the adapter returns eps); default:
        DDIMScheduler on this model's config. The same (prompt, seed, scheduler) gives the same
        image, which is how a local query is reproduced from its seed. Prompts are text, prompt
        ids (int64 [1]) or embeddings [L, D].
        """
        from diffusers import DDIMScheduler

        sch = scheduler or DDIMScheduler.from_config(self.scheduler.config)
        sch = type(sch).from_config(sch.config, prediction_type="epsilon")
        sch.set_timesteps(steps)
        pos, neg = self._embedding(prompt), self._embedding(negative_prompt)
        pos, neg = pos.expand(n, *pos.shape), neg[None]
        gen = torch.Generator().manual_seed(seed)
        size = self.config["image_size"]
        x = torch.randn((n, self.config["in_channels"], size, size), generator=gen)
        x = (x * sch.init_noise_sigma).to(self.device)
        # A DDIM step that clips x0 must go on with the eps of the clipped x0 (diffusers' default
        # keeps the raw eps, which breaks guided samples; see diffusion.ddim_sample).
        step_kw = {}
        if "use_clipped_model_output" in inspect.signature(sch.step).parameters:
            step_kw["use_clipped_model_output"] = True
        for t in sch.timesteps:
            eps = diffusion.guided_eps(
                self, sch.scale_model_input(x, t), int(round(float(t))), pos, neg, guidance
            )
            x = sch.step(eps, t, x, generator=gen, **step_kw).prev_sample
        return x.float()

    # -- identity --

    def fingerprints(self) -> dict[str, str | None]:
        """sha256 of the VAE and text encoder parameters (None when absent); cached."""
        if not self._fingerprints:
            self._fingerprints = {
                name: None if m is None else model_fingerprint(m) for name, m in self._aux.items()
            }
        return dict(self._fingerprints)

    def describe(self) -> dict:
        """What, beside the UNet's fingerprint, determines features (goes into store manifests)."""
        return {
            **self.fingerprints(),
            "prediction_type": self.prediction_type,
            "max_length": self.max_length,
            "text_attention_mask": self.text_attention_mask,
            "execution_dtype": str(self.compute_dtype).removeprefix("torch."),
            "latent": self.latent,
        }

    # -- construction --

    @classmethod
    def from_pipeline(cls, pipe, **kw) -> TextToImageAdapter:
        """From a diffusers pipeline object (StableDiffusionPipeline or any with unet/scheduler and
        optional vae/text_encoder/tokenizer attributes)."""
        return cls(
            pipe.unet,
            pipe.scheduler,
            vae=getattr(pipe, "vae", None),
            text_encoder=getattr(pipe, "text_encoder", None),
            tokenizer=getattr(pipe, "tokenizer", None),
            **kw,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kw) -> TextToImageAdapter:
        """From a local diffusers pipeline folder (model_index.json, unet/, scheduler/, and
        optionally vae/, text_encoder/, tokenizer/). Only these five components are loaded (no
        safety checker), each of a class the registry of models/pipeline_folder.py knows, weights
        from safetensors only; nothing is downloaded."""
        from ctrak_fast.models.pipeline_folder import load_pipeline_parts

        parts = load_pipeline_parts(path)
        return cls(
            parts["unet"],
            parts["scheduler"],
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            **kw,
        )
