"""The DiT kind: a class-conditional diffusion transformer (diffusers DiTTransformer2DModel,
DiTPipeline) behind eps(x_t, t, cond), latent with the pipeline's VAE.

Conditions are class indices; the null condition is the extra "unconditional" class that DiT's
label embedding keeps for classifier-free guidance (index num_classes). Removing the concept of a
class query leaves that null class (the slider of "this class" against "no class").

Condition path: the class embedding enters DiT only through adaLN modulation. Every block's
AdaLayerNormZero adds the class embedding to the timestep embedding and turns it into the
shift / scale / gate of its LayerNorms (`norm1.linear`), and the final layer's modulation
(`proj_out_1`) reads block 0's embedding of (t, class). The rule is those modulation linears and
the class embedding tables (`norm1.emb.class_embedder`); the timestep embedders read no class.

Class names: a caption or prompt names a class by a name of the pipeline's id2label (DiTPipeline's
`labels`: each comma-separated synonym, e.g. "golden retriever") or by its number ("207");
anything else is refused by name (`DiTAdapter.class_index`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ctrak_fast.engine.store import model_fingerprint
from ctrak_fast.method.featurize import Featurizer
from ctrak_fast.method.query import Negative
from ctrak_fast.models.base import Condition, ModelKind
from ctrak_fast.models.diffusers_unet import (
    check_prediction_type,
    sample_size,
    schedule_from_scheduler,
    to_eps,
)
from ctrak_fast.models.latent_cache import encode_images_cached
from ctrak_fast.models.unet2d import ClassConditions
from ctrak_fast.models.vae import decode_latents, encode_latents

__all__ = [
    "DIT_CONDITION_PATH",
    "DiTAdapter",
    "DiTConditions",
    "DiTFeaturizer",
    "DiTKind",
    "learned_sigma_eps",
]

# adaLN modulation that reads the class embedding, and the class embedding tables (module doc)
DIT_CONDITION_PATH = r"norm1\.emb\.class_embedder\.|norm1\.linear\.|^transformer\.proj_out_1\."


def learned_sigma_eps(out: Tensor, channels: int) -> Tensor:
    """The eps half of a network that also predicts its variance (out_channels = 2 x in, as DiT
    and PixArt): the first `channels` channels; other outputs unchanged."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


class DiTAdapter(nn.Module):
    """A DiTTransformer2DModel (+ its VAE) as eps(x_t, t, cond).

    cond: int64 [B, 1] class indices; `null_cond` is the unconditional class (num_classes) when
    the label table has one. A learned-sigma output (2 x in_channels) keeps its eps half.
    Only the transformer is a sub-module (gradients, fingerprint); the VAE is recorded in the
    store manifest by its fingerprint (`describe`). labels: {class name: index}, the pipeline's
    (DiTPipeline.labels, from its id2label), which `class_index` reads.
    """

    condition_param_filter = DIT_CONDITION_PATH

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: Any,
        vae: nn.Module | None = None,
        labels: Mapping[str, int] | None = None,
    ):
        super().__init__()
        cfg: Any = transformer.config
        self.transformer = transformer.eval()
        # execution dtype (float32, or bfloat16; float16 has no loss scaling here)
        self.compute_dtype = next(transformer.parameters()).dtype
        self.n_classes = int(cfg.num_embeds_ada_norm)
        blocks: Any = transformer.transformer_blocks
        table = blocks[0].norm1.emb.class_embedder.embedding_table
        # DiT's LabelEmbedding keeps one extra row, the "no class" of CFG, when trained with
        # class dropout
        self.null_class = self.n_classes if table.num_embeddings > self.n_classes else None
        self.schedule = schedule_from_scheduler(scheduler)
        self.prediction_type = check_prediction_type(scheduler)
        self.channels = int(cfg.in_channels)
        self.parts: dict[str, nn.Module | None] = {"vae": vae}  # outside the module tree
        if vae is not None:
            vae.eval().requires_grad_(False)
        self.config = {
            "image_size": sample_size(transformer),
            "in_channels": self.channels,
            "schedule": self.schedule.config,
        }
        self._fingerprint: str | None = None
        self.labels = {str(k): int(v) for k, v in (labels or {}).items()}

    def class_index(self, name: str) -> int:
        """The class `name` names: one of `labels` (surrounding spaces ignored), or its number
        in [0, n_classes). ValueError naming it (and some known names) otherwise.

        Examples (need a model; not doctests):
                adapter.class_index("golden retriever"), adapter.class_index("207")
        """
        key = name.strip()
        if key in self.labels:
            return self.labels[key]
        if re.fullmatch(r"[0-9]+", key) and int(key) < self.n_classes:
            return int(key)
        known = f"0..{self.n_classes - 1}"
        if self.labels:
            more = ", ..." if len(self.labels) > 5 else ""
            known = (
                f"{', '.join(repr(k) for k in list(self.labels)[:5])}{more} (id2label) or {known}"
            )
        raise ValueError(f"{name!r} is not a class of this DiT: its classes are {known}")

    def class_ids(self, names: Sequence[str]) -> Tensor:
        """Class names (captions) -> int64 [N, 1] conditions (class_index of each)."""
        return torch.tensor([[self.class_index(n)] for n in names], dtype=torch.int64)

    @property
    def vae(self) -> nn.Module | None:
        return self.parts["vae"]

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def clip_sample(self) -> bool:
        """Whether samplers may clamp x0 estimates to [-1, 1]: pixels yes, latents no."""
        return not self.latent

    def _apply(self, fn: Any, recurse: bool = True) -> DiTAdapter:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # .to(device) moves the VAE
        if self.vae is not None:
            self.vae._apply(fn)  # type: ignore[no-untyped-call]
        return self

    def forward(self, x_t: Tensor, t: Tensor | int, cond: Tensor) -> Tensor:
        """x_t [B,C,h,w] float32, t [B] int64 (or int), cond int64 [B,1] -> eps [B,C,h,w]."""
        tt = torch.as_tensor(t, dtype=torch.int64, device=x_t.device)
        tt = tt.expand(len(x_t)) if tt.ndim == 0 else tt.to(x_t.device)
        labels = cond.reshape(len(x_t), -1)[:, 0].to(x_t.device)
        if (labels < 0).any() or (labels > self.n_classes).any():
            raise ValueError(f"DiT class labels must lie in [0, {self.n_classes}]")
        x = x_t.to(self.compute_dtype)
        out = self.transformer(x, timestep=tt, class_labels=labels).sample.float()
        eps = learned_sigma_eps(out, self.channels)
        return to_eps(eps, x_t, tt, self.schedule, self.prediction_type)

    def null_cond(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """[batch, 1] of the unconditional class (-1 where the model has none)."""
        cls = -1 if self.null_class is None else self.null_class
        return torch.full((batch, 1), cls, dtype=torch.int64, device=device)

    def encode_images(self, images: Tensor, batch_size: int = 16) -> Tensor:
        """Pixels [B,3,H,W] in [-1, 1] -> x0 latents (the images without a VAE)."""
        if self.vae is None:
            return images.float()
        return encode_latents(self.vae, images, self.device, batch_size)

    def decode_latents(self, x0: Tensor, batch_size: int = 16) -> Tensor:
        if self.vae is None:
            return x0.float().clamp(-1, 1)
        return decode_latents(self.vae, x0, self.device, batch_size)

    def fingerprints(self) -> dict[str, str | None]:
        """sha256 of the VAE parameters (None without one); cached."""
        if self._fingerprint is None and self.vae is not None:
            self._fingerprint = model_fingerprint(self.vae)
        return {"vae": self._fingerprint}

    def describe(self) -> dict[str, Any]:
        """What, beside the transformer's fingerprint, determines features."""
        return {**self.fingerprints(), "null_class": self.null_class, "latent": self.latent}


@dataclass
class DiTFeaturizer(Featurizer):
    """The Featurizer of a DiTAdapter: its VAE and null class recorded in the store manifest;
    method: the method's name, recorded when given (a query of another method is then refused
    by name: results.check_query_store)."""

    method: str | None = None

    def meta(self) -> dict[str, Any]:
        meta = {**super().meta(), "dit": self.model.describe()}  # type: ignore[operator]
        if self.method is not None:
            meta["method"] = self.method
        return meta


class DiTConditions(ClassConditions):
    """Class indices; removing a class leaves the unconditional class."""

    def __init__(self, n_classes: int, null_cond: Tensor) -> None:
        super().__init__(n_classes)
        self.null = null_cond

    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        if int(self.null.reshape(-1)[0]) < 0:
            return super().negatives(concept, pos, remove, how)
        return [(f"-class {int(pos.reshape(-1)[0])}", self.null)]


class DiTKind(ModelKind):
    """DiTAdapter models (DiTPipeline)."""

    name = "dit"
    guidance = 4.0  # DiTPipeline's default guidance scale
    featurizer_class = DiTFeaturizer
    model: DiTAdapter

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return isinstance(model, DiTAdapter)

    def make_conditions(self) -> DiTConditions:
        return DiTConditions(self.model.n_classes, self.null_cond)

    @staticmethod
    def accepts_unet(unet: Any) -> bool:
        return type(unet).__name__ == "DiTTransformer2DModel"

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
            raise ValueError("DiT keeps its own unconditional class: null_class is not taken")
        transformer = pipe.transformer if dtype is None else pipe.transformer.to(dtype)
        vae, labels = getattr(pipe, "vae", None), getattr(pipe, "labels", None)
        return DiTAdapter(transformer, pipe.scheduler, vae, labels), kwargs

    def dataset_conds(self, dataset: Any) -> Any:
        raise ValueError("a DiT model takes class indices: pass (images, classes[, ids])")

    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode_images(images)

    def training_x0(self, images: Any, ids: Tensor, store: Any) -> Any:
        return encode_images_cached(self.model, images, ids, store)  # type: ignore[arg-type]

    def pixel_size(self) -> int:
        vae: Any = self.model.vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        return sample_size(self.model.transformer) * scale

    def decode(self, x0: Tensor) -> Tensor:
        return self.model.decode_latents(x0)

    def describe(self) -> dict[str, Any]:
        return self.model.describe()
