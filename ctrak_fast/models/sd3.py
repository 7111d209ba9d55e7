"""The SD3 kind (SD3Transformer2DModel, an MMDiT, with FlowMatchEulerDiscreteScheduler) behind
the model interface: a flow-matching model. The kind declares a `FlowSchedule`, so the method
trains, inverts and slides in flow form: the model returns the velocity v = noise - x0 at
x_t = (1 - sigma) x0 + sigma noise, the training loss is mean((noise - x0 - v)^2), the
deterministic inversion and sampling are Euler steps of the flow ODE, and the slider's d is
v(c+) - v(c-) (method/schedules.py, method/losses.py).

Condition path: the prompt enters an MMDiT through the joint attention's context stream and
the pooled text. The context tokens (`context_embedder`) run through every block's context
branch: its adaLN (`norm1_context`), its projections into the joint attention (`attn.add_q_proj`,
`add_k_proj`, `add_v_proj`, and their norms where qk-normed), its output (`attn.to_add_out`) and
MLP (`ff_context`); the last block is `context_pre_only` and keeps only the first of these. The
pooled text (`time_text_embed.text_embedder`) is added to the timestep embedding that every
adaLN modulation reads: the image stream's `norm1.linear` and the final `norm_out.linear`.
These layers are exactly those that read the text but not x_t, or act on the context tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctrak_fast.engine.store import model_fingerprint
from ctrak_fast.method.schedules import FlowSchedule
from ctrak_fast.models.pipeline_text import PipelineTextAdapter, PipelineTextKind

__all__ = ["SD3_CONDITION_PATH", "SD3Adapter", "SD3Kind", "flow_schedule_from_scheduler"]

SD3_CONDITION_PATH = (
    r"\.context_embedder\.|\.time_text_embed\.text_embedder\.|\.norm1_context\."
    r"|\.attn\.(add_[qkv]_proj|norm_added_[qk]|to_add_out)\.|\.ff_context\."
    r"|\.norm1\.linear\.|\.norm_out\.linear\."
)


def flow_schedule_from_scheduler(scheduler: Any) -> FlowSchedule:
    """The training schedule of a FlowMatchEulerDiscreteScheduler (static shift only)."""
    cfg = dict(scheduler.config)
    if not type(scheduler).__name__.startswith("FlowMatch"):
        raise ValueError(f"an SD3 pipeline needs a flow-matching scheduler, not {type(scheduler)}")
    if cfg.get("use_dynamic_shifting"):
        raise ValueError("flow schedulers with use_dynamic_shifting are not supported")
    return FlowSchedule(cfg.get("num_train_timesteps", 1000), float(cfg.get("shift", 1.0)))


class SD3Adapter(PipelineTextAdapter):
    """A StableDiffusion3Pipeline as velocity(x_t, t, cond) on its FlowSchedule.

    Packed condition [B, 1 + L, D]: row 0 the pooled projection [P] (zero-padded to D, P <= D as
    in SD3: 2048 <= 4096), rows 1.. the joint text tokens (both CLIPs, padded, then T5) that the
    pipeline's `encode_prompt` makes. The transformer reads the timestep sigma_t * 1000.
    max_length: the T5 token length (default: the pipeline's, 256).
    """

    condition_param_filter = SD3_CONDITION_PATH
    default_param_filter = SD3_CONDITION_PATH  # there is no separate cross-attention

    def __init__(self, pipe: Any, **kw: Any) -> None:
        kw.setdefault("schedule", flow_schedule_from_scheduler(pipe.scheduler))
        if kw.get("max_length") is None:
            kw["max_length"] = 256  # encode_prompt's max_sequence_length default
        super().__init__(pipe, **kw)
        cfg: Any = self.unet.config
        self.pooled_dim = int(cfg.pooled_projection_dim)
        if self.pooled_dim > int(cfg.joint_attention_dim):
            raise ValueError("pooled_projection_dim > joint_attention_dim: cannot pack the prompt")
        # the second CLIP and the T5 (optional in SD3), outside the module tree like the first
        self.extra_encoders = {
            "text_encoder_2": pipe.text_encoder_2,
            "text_encoder_3": getattr(pipe, "text_encoder_3", None),
        }
        for m in self.extra_encoders.values():
            if m is not None:
                m.eval().requires_grad_(False)
        self.extra_fingerprints: dict[str, str | None] | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> SD3Adapter:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # moves every text encoder
        for m in self.extra_encoders.values():
            if m is not None:
                m._apply(fn)
        return self

    def pack(self, prompts: list[str]) -> Tensor:
        states, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_length,
        )
        row = torch.nn.functional.pad(pooled.float(), (0, states.shape[-1] - pooled.shape[-1]))
        return torch.cat([row[:, None], states.float()], dim=1)

    def unet_output(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        schedule: FlowSchedule = self.schedule  # type: ignore[assignment]
        time = schedule.model_time(t).to(device=x.device, dtype=x.dtype)
        out = self.unet(
            hidden_states=x,
            encoder_hidden_states=cond[:, 1:],
            pooled_projections=cond[:, 0, : self.pooled_dim],
            timestep=time,
        ).sample
        return out  # type: ignore[no-any-return]

    def model_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return out  # the velocity: what the flow schedule predicts

    def fingerprints(self) -> dict[str, str | None]:
        """sha256 of the VAE and of every text encoder (None where absent); cached."""
        if self.extra_fingerprints is None:
            self.extra_fingerprints = {
                name: None if m is None else model_fingerprint(m)
                for name, m in self.extra_encoders.items()
            }
        return {**super().fingerprints(), **self.extra_fingerprints}


class SD3Kind(PipelineTextKind):
    """SD3Adapter models (StableDiffusion3Pipeline)."""

    name = "sd3"
    adapter = SD3Adapter
    guidance = 7.0  # the SD3 pipeline's default

    @staticmethod
    def accepts_unet(unet: Any) -> bool:
        return type(unet).__name__ == "SD3Transformer2DModel"
