"""The model interface: what attribution asks of a diffusion model, one `ModelKind` per kind.

A model is an `nn.Module` that predicts eps, with these attributes (the engine and the method read
them; nothing else about the model is assumed):

- ``model(x_t [B,C,h,w] float32, t [B] int64 (or an int), cond [B,...]) -> out [B,C,h,w]
  float32``: what the model's schedule says it predicts (method/schedules.py): eps for the DDPM
  `NoiseSchedule` (v- or x0-predicting UNets convert to eps inside, models/diffusers_unet.py
  `to_eps`), the velocity noise - x0 for a `FlowSchedule` (flow matching, SD3), so the losses,
  DDIM inversion and sampling see one parametrisation per schedule.
- ``null_cond(batch, device=None) -> [batch, ...]``: the unconditional condition c = ∅ of
  classifier-free guidance, a tensor of the model's condition kind.
- ``config``: a dict with ``image_size`` (h = w of x_t), ``in_channels`` and ``schedule`` (a
  schedule's config; models with a ``schedule`` attribute use that instead).
- ``condition_param_filter`` (optional): a regex of the parameters the condition enters through,
  what the parameter filter "@condition" (method/methods.py CONDITION_PATH) stands for.

A `ModelKind` wraps one such model and answers what the front (api/, the CLI, the benchmarks)
asks of a model kind: its conditions and concept removal (`Conditions`), its featurizer, the x0 of
pixels (encode / decode for latent models), how a query image is generated, how a concept query
is featurized, and `describe`. models/registry.py keys the kinds by name and picks one for a
model or a diffusers pipeline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import torch
from torch import Tensor, nn

from ctrak_fast.engine.projection import FactorizedSpec, ProjectionSpec
from ctrak_fast.method import diffusion
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.losses import region_on_grid
from ctrak_fast.method.query import ConceptQuerySpec, Negative, concept_query_features

__all__ = ["Condition", "Conditions", "ModelKind", "describe"]

Condition: TypeAlias = Tensor | str | Mapping[str, str | int] | int
"""One condition c of the model, in any of the spellings its kind accepts.

Factor models: "shape=triangle,colour=red", {"shape": "triangle"} or an int64 [F] tensor of value
indices (factors not named get their null token). Text-to-image models: a prompt or an embedding
[L, D]. Class-conditional pipelines: a class index."""


def describe(cond: Condition) -> str:
    """A short printable form of a condition."""
    return str(cond.tolist()) if isinstance(cond, Tensor) else repr(cond)


class Conditions(ABC):
    """How one model kind spells conditions and removes a concept from one (c-)."""

    @abstractmethod
    def one(self, concept: Condition) -> Tensor:
        """One condition as the model's cond tensor."""

    @abstractmethod
    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        """(label, c-) of each concept removed from `pos` (`how`: factor models only)."""

    def batch(self, conds: Any, n: int) -> Tensor:
        """Training conditions of n samples as the model's cond tensor [n, ...]."""
        if isinstance(conds, Tensor):
            return conds
        return torch.stack([self.one(c) for c in conds])


class ModelKind(ABC):
    """One kind of eps model (see the module docstring for the attributes a model must have).

    Args:
        model: the eps model of this kind (`accepts(model)` is true).
        null_cond: the unconditional condition (default: ``model.null_cond(1)[0]``).

    Attributes:
        name: the kind's key in models/registry.py KINDS.
        query_weight: the concept slider's default weight w.
        guidance: the default CFG scale of a generated query image.
        featurizer_class: the Featurizer `featurizer()` builds (a kind's own subclass records
            what its store needs in the manifest).
        conditions: the kind's `Conditions` (made with `null_cond`).
    """

    name: ClassVar[str]
    query_weight: ClassVar[float] = 7.5
    guidance: ClassVar[float] = 3.0
    featurizer_class: ClassVar[type[Featurizer]] = Featurizer

    def __init__(self, model: nn.Module, null_cond: Tensor | None = None) -> None:
        self.model = model
        if null_cond is None:
            null_cond = model.null_cond(1)[0]  # type: ignore[operator]
        self.null_cond: Tensor = null_cond
        self.conditions = self.make_conditions()

    # -- what a kind must say --

    @staticmethod
    @abstractmethod
    def accepts(model: nn.Module) -> bool:
        """Whether `model` is of this kind."""

    @abstractmethod
    def make_conditions(self) -> Conditions:
        """The kind's conditions (self.model and self.null_cond are set)."""

    # -- construction from a diffusers pipeline (kinds that wrap one) --

    @staticmethod
    def accepts_unet(unet: Any) -> bool:
        """Whether a diffusers pipeline with this `unet` is of this kind."""
        return False

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
        """(the adapter of `pipe`'s UNet, the Attributor keywords `kwargs` with the defaults
        the kind imposes for `method`)."""
        raise TypeError(f"{cls.__name__} models are not made from pipelines")

    # -- what the front asks; defaults serve pixel-space models --

    @property
    def schedule(self) -> diffusion.Schedule:
        """The training schedule (``model.schedule``, else the one of its config): the
        objective the model was trained with."""
        schedule = getattr(self.model, "schedule", None)
        if isinstance(schedule, diffusion.Schedule):
            return schedule
        return diffusion.NoiseSchedule.for_model(self.model)

    def featurizer(
        self,
        spec: FeatureSpec,
        projection: ProjectionSpec | FactorizedSpec,
        *,
        grad_backend: str = "hooks",
        projector_backend: str = "auto",
    ) -> Featurizer:
        """The featurizer of this model: training features and whole-image queries."""
        return self.featurizer_class(
            self.model,
            self.schedule,
            spec,
            projection,
            self.null_cond,
            grad_backend=grad_backend,
            projector_backend=projector_backend,
        )

    def training_set(self, dataset: Any) -> tuple[Any, Tensor, Tensor]:
        """(images float32 [N,C,H,W] or an ImageSequence of them, conds [N,...] as the model's
        cond tensor, ids int64 [N]) of a ConceptDataset or a tuple (images, conds[, ids]),
        checked."""
        from ctrak_fast.data import ConceptDataset

        conds: Any
        if isinstance(dataset, ConceptDataset):
            images, ids = dataset.images, dataset.ids
            conds = self.dataset_conds(dataset)
        elif isinstance(dataset, tuple) and len(dataset) in (2, 3):
            images, conds = dataset[0], dataset[1]
            ids = dataset[2] if len(dataset) == 3 else torch.arange(len(images))
        else:
            raise TypeError("dataset must be a ConceptDataset or a tuple (images, conds[, ids])")
        from ctrak_fast.data.image_sequence import ImageSequence

        if isinstance(images, ImageSequence):  # read a batch at a time (training_x0)
            pass
        elif not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                "images must be a float tensor [N, C, H, W] in [-1, 1], image paths or PIL images"
            )
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.shape != (len(images),):
            raise ValueError(f"ids must be int64 [{len(images)}], got {list(ids.shape)}")
        cond_t = self.conditions.batch(conds, len(images))
        if len(cond_t) != len(images):
            raise ValueError(f"{len(cond_t)} conditions for {len(images)} images")
        return images if isinstance(images, ImageSequence) else images.float(), cond_t, ids

    def dataset_conds(self, dataset: Any) -> Any:
        """A ConceptDataset's training conditions as this kind spells them (its captions)."""
        return dataset.captions

    def complete(self, images: Any, conds: Tensor) -> Tensor:
        """The conditions as the model completes them (method/completion.py): kinds with
        factors; others keep `conds`."""
        return conds

    def encode(self, images: Tensor) -> Tensor:
        """Pixels [B,C,H,W] in [-1, 1] -> the model's x0 (latents for latent models)."""
        return images.float()

    def training_x0(self, images: Any, ids: Tensor, store: Any) -> Any:
        """The x0 of a training set featurized into `store`: latent models encode and cache
        them there; a pixel model's are its images, an ImageSequence left on disk (featurization
        reads it a batch at a time: method/rows.py)."""
        return images

    def pixel_size(self) -> int:
        """The side of the training images the model takes (pixels)."""
        config: Any = self.model.config
        return int(config["image_size"])

    def decode(self, x0: Tensor) -> Tensor:
        """The model's x0 [B,c,h,w] -> pixels [B,C,H,W] in [-1, 1] (latent models decode)."""
        return x0.clamp(-1, 1)

    def generate(self, cond: Tensor, n: int, *, seed: int, guidance: float, steps: int) -> Tensor:
        """n images [n,C,H,W] in [-1, 1] of one condition: DDIM (for a flow: Euler) with CFG
        against the null one, x0 clamped only where the model says it lives in [-1, 1]."""
        x0, _ = diffusion.ddim_sample(
            self.model,
            cond[None].expand(n, *cond.shape),
            neg_cond=self.null_cond[None],
            guidance=guidance,
            steps=steps,
            generator=torch.Generator().manual_seed(seed),
            schedule=self.schedule,
            clip_x0=getattr(self.model, "clip_sample", True),
        )
        return self.decode(x0)

    def removals(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        negatives: Sequence[Condition],
        how: str,
    ) -> list[tuple[str, Negative]]:
        """(label, c-) of each query row: the concepts `remove` names (by default every one c+
        sets, unless explicit `negatives` are given), then each explicit c-."""
        negs = (
            self.conditions.negatives(concept, pos, remove, how) if remove or not negatives else []
        )
        negs += [(f"vs {describe(c)}", self.conditions.one(c)) for c in negatives]
        if not negs:
            raise ValueError("nothing to remove: the condition sets no concept")
        return negs

    def concept_query(
        self,
        featurizer: Featurizer,
        spec: ConceptQuerySpec,
        pos: Tensor,
        negatives: list[tuple[str, Negative]],
        image: Tensor | None,
        region: Any,
    ) -> Tensor:
        """Concept-slider features [len(negatives), k] around the query image [C,H,W] pixels (None:
        global draws), the loss restricted to `region` (a box or mask in its pixels) if given."""
        x0 = None if image is None else self.encode(image[None])[0]
        weight = None if image is None or x0 is None else region_on_grid(region, image, x0)
        return self.concept_features(featurizer, spec, pos, negatives, x0, weight, spec.negative)

    def concept_features(
        self,
        featurizer: Featurizer,
        spec: ConceptQuerySpec,
        pos: Tensor,
        negatives: list[tuple[str, Negative]],
        x0: Tensor | None,
        region: Tensor | None,
        how: str,
    ) -> Tensor:
        """Concept-slider features [len(negatives), k] of c+ `pos` against each (label, c-)."""
        conds = [c for _, c in negatives]
        return concept_query_features(featurizer, spec, pos, conds, image=x0, region=region)

    def describe(self) -> dict[str, Any]:
        """What, beside the model's fingerprint, determines its features (kinds that hold more
        than the module, e.g. a VAE and a text encoder)."""
        return {}
