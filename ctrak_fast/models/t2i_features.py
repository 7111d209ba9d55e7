"""The text-to-image kind: a TextToImageAdapter's conditions are prompts (removing a concept
deletes its phrase); its features are float32 per-sample gradients with float16 loss scaling,
only the filtered parameters unfrozen, the text encoder and VAE recorded in the manifest; prompt
concept queries go through the one concept-query path of method/query.py."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ctrak_fast.engine.projection import FactorizedSpec, ProjectionSpec
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.grads.layout import Blocks
from ctrak_fast.method.query import ConceptQuerySpec, Negative, concept_query_features
from ctrak_fast.models.base import Condition, Conditions, ModelKind
from ctrak_fast.models.latent_cache import encode_images_cached
from ctrak_fast.models.prompts import remove_phrase
from ctrak_fast.models.text2image import T2I_PARAM_FILTER, TextToImageAdapter

__all__ = [
    "T2IFeaturizer",
    "TextConditions",
    "TextToImageKind",
    "check_concept_changes",
    "make_featurizer",
    "prompt_query_features",
]


class _Fp32Grads:
    """PerSampleGrads wrapper: float32 blocks, float16 loss scale removed, overflow retried, and
    the parameters outside the filter frozen during the call, so the backward pass stops at the
    first selected layer (flags restored after: featurizers with other filters may share the
    adapter)."""

    def __init__(self, inner, adapter: TextToImageAdapter, min_scale: float = 1.0):
        self.inner = inner
        self.adapter = adapter
        self.min_scale = min_scale
        selected = {s.name for s in inner.slots}
        self._params = [(p, name in selected) for name, p in adapter.named_parameters()]

    @contextlib.contextmanager
    def _frozen(self):
        saved = [p.requires_grad for p, _ in self._params]
        for p, want in self._params:
            p.requires_grad_(want)
        try:
            yield
        finally:
            for (p, _), flag in zip(self._params, saved, strict=True):
                p.requires_grad_(flag)

    def __getattr__(self, name):  # slots, dim, n_selected, ... of the wrapped object
        return getattr(self.inner, name)

    def __call__(self, x_t, t, cond, r) -> Blocks:
        ad = self.adapter
        if not cond.is_floating_point():  # embed here, outside torch.func's vmap
            cond = ad.embed_ids(cond)
        while True:
            s = ad.grad_scale
            with self._frozen():
                blocks = [(off, b.float()) for off, b in self.inner(x_t, t, cond, r)]
            if s == 1.0:
                return blocks
            if all(torch.isfinite(b).all() for _, b in blocks):
                return [(off, b / s) for off, b in blocks]
            if s / 16 < self.min_scale:
                raise FloatingPointError("non-finite float16 gradients even without loss scaling")
            ad.grad_scale = s / 16  # sticky, like AMP's GradScaler backing off


@dataclass
class T2IFeaturizer(Featurizer):
    """Featurizer over a TextToImageAdapter: float32 gradient accumulation, parameters outside the
    filter frozen while gradients are taken (backward stops at the first selected layer), and the
    VAE / text encoder fingerprints and execution dtype recorded in the store manifest.
    cond: prompt ids [B, 1] (adapter.prompt_ids) or embeddings [B, L, D], the kind of null_cond.
    method: the method's name, recorded in the meta when given (a query of another method is
    then refused by name: results.check_query_store)."""

    method: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, TextToImageAdapter):
            raise TypeError("T2IFeaturizer needs a TextToImageAdapter model")
        super().__post_init__()
        self._grads = _Fp32Grads(self._grads, self.model)

    def meta(self) -> dict:
        meta = {**super().meta(), "text2image": self.model.describe()}
        if self.method is not None:
            meta["method"] = self.method
        return meta

    def noise(self, shape) -> dict[int, torch.Tensor]:
        # Featurizer draws the fixed noise on the CPU (seeded, device-independent); the UNet may
        # live elsewhere (GPU): move it there once.
        noise = super().noise(shape)
        dev = self.model.device
        if next(iter(noise.values())).device != dev:
            self._noise = noise = {t: n.to(dev) for t, n in noise.items()}
        return noise


def make_featurizer(
    adapter: TextToImageAdapter,
    spec: FeatureSpec | None = None,
    projection: ProjectionSpec | None = None,
    grad_backend: str = "hooks",
    projector_backend: str = "auto",
    null_cond: torch.Tensor | None = None,
    method: str | None = None,
) -> T2IFeaturizer:
    """A T2IFeaturizer with the model's schedule, the empty prompt as null condition (unless
    `null_cond` is given), and the adapter's condition path (cross-attention; SDXL adds the
    pooled-text embedding) unless `spec` names another filter (spec.param_filter=None there
    means the condition path; pass ".*" for every UNet parameter). `method`: recorded in meta.

    Examples (need a model; not doctests):
            fz = make_featurizer(adapter, FeatureSpec(), ProjectionSpec(k=4096))
            phi, _ = fz(adapter.encode_images(images), adapter.prompt_ids(captions))
    """
    spec = spec or FeatureSpec()
    if spec.param_filter is None:
        flt = getattr(adapter, "condition_param_filter", T2I_PARAM_FILTER)
        spec = FeatureSpec.from_dict({**spec.to_dict(), "param_filter": flt})
    return T2IFeaturizer(
        adapter,
        adapter.schedule,
        spec,
        projection or ProjectionSpec(),
        adapter.null_cond(1)[0] if null_cond is None else null_cond,
        grad_backend=grad_backend,
        projector_backend=projector_backend,
        method=method,
    )


def check_concept_changes(
    adapter: TextToImageAdapter, prompt: str, negatives: Sequence[str], labels: Sequence[str]
) -> None:
    """ValueError naming the prompt when a c- conditions the model exactly as c+ does (the same
    text embedding: the concept's words tokenize away, or are cut off at the token limit):
    its slider would be zero and every training image would score 0."""
    emb = adapter.encode_prompts([prompt, *negatives])
    same = [lab for lab, e in zip(labels, emb[1:], strict=True) if torch.equal(e, emb[0])]
    if same:
        raise ValueError(
            f"the prompt {prompt!r} and its c- for {same} give the model the same condition (they "
            "tokenize the same, e.g. words outside the tokenizer's vocabulary or past its "
            f"{adapter.max_length}-token limit): the query would be zero; name other words"
        )


def prompt_query_features(
    featurizer: Featurizer,
    spec: ConceptQuerySpec,
    prompt: str | torch.Tensor,
    negatives: Sequence[str | torch.Tensor],
    x0: torch.Tensor | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Concept query features of one prompt against several c- (one per concept removed).

    Args:
        featurizer: over a TextToImageAdapter (make_featurizer).
        spec: draws "local" (stochastic DDIM inversion of x0, shared by all c-) or "global"
            (samples with CFG c+ vs c-, drawn per c-); weight w = 3 in the paper's text setting.
        prompt: c+ as text, or a condition of the featurizer's kind (prompt id [1] or
            embedding [L, D]); negatives: the c-, likewise, e.g. concept_prompts(prompt, ["a
            pikachu"]).
        x0: the query's x0 [C,h,w] (latent, or pixels without a VAE): local draws only.

    Returns: [len(negatives), k] float32.

    Examples (need a model; not doctests):
            negs = concept_prompts("a pikachu in the style of picasso", ["a pikachu"])
            q = prompt_query_features(fz, ConceptQuerySpec(weight=3.0), prompt, negs, x0)
    """
    ad = featurizer.model

    def cond(p):
        return p if torch.is_tensor(p) else ad.prompt_ids([p])[0]

    negs = [cond(p) for p in negatives]
    return concept_query_features(featurizer, spec, cond(prompt), negs, x0, batch_size)


class TextConditions(Conditions):
    """Text-to-image adapters: prompts become the adapter's condition kind, prompt ids int64 [1]
    (its default) or embeddings [L, D] (adapters given embeddings with set_null_cond)."""

    def __init__(self, adapter: Any, null_cond: Tensor) -> None:
        self.adapter = adapter
        self.ids = not null_cond.is_floating_point()

    def one(self, concept: Condition) -> Tensor:
        if isinstance(concept, Tensor):
            return concept
        if not isinstance(concept, str):
            raise TypeError(f"a text-to-image condition is a prompt or a tensor: {concept!r}")
        return self.batch([concept], 1)[0]

    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        if not isinstance(concept, str):
            raise ValueError("removing a phrase needs the prompt as text; or pass negatives=")
        phrases = [remove] if isinstance(remove, str) else list(remove or ())
        if not phrases:
            raise ValueError("a prompt query needs remove= (the concept's phrase) or negatives=")
        return [(f"-{p}", self.one(remove_phrase(concept, p))) for p in phrases]

    def batch(self, conds: Any, n: int) -> Tensor:
        if isinstance(conds, Tensor):
            return conds
        captions = [str(c) for c in conds]
        if self.ids:
            return self.adapter.prompt_ids(captions)  # type: ignore[no-any-return]
        unique = sorted(set(captions))
        emb = self.adapter.encode_prompts(unique)
        row = {c: i for i, c in enumerate(unique)}
        return emb[torch.tensor([row[c] for c in captions])]  # type: ignore[no-any-return]


class TextToImageKind(ModelKind):
    """TextToImageAdapter models: latent (with a VAE) or pixel-space, prompts as conditions."""

    name = "text2image"
    query_weight = 3.0  # the paper's slider weight in the text setting
    guidance = 7.5
    model: TextToImageAdapter

    def __init__(self, model: nn.Module, null_cond: Tensor | None = None) -> None:
        default = model.null_cond(1)[0]  # type: ignore[operator]  # "" takes its prompt id first
        super().__init__(model, default if null_cond is None else null_cond)

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return isinstance(model, TextToImageAdapter)

    def make_conditions(self) -> TextConditions:
        return TextConditions(self.model, self.null_cond)

    @staticmethod
    def accepts_unet(unet: Any) -> bool:
        return type(unet).__name__ == "UNet2DConditionModel" or hasattr(
            unet.config, "cross_attention_dim"
        )

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
        return TextToImageAdapter.from_pipeline(pipe, dtype=dtype), kwargs

    def featurizer(
        self,
        spec: FeatureSpec,
        projection: ProjectionSpec | FactorizedSpec,
        *,
        grad_backend: str = "hooks",
        projector_backend: str = "auto",
    ) -> Featurizer:
        if not isinstance(projection, ProjectionSpec):
            raise ValueError("text-to-image adapters support the dense ProjectionSpec only")
        return make_featurizer(
            self.model,
            spec,
            projection,
            grad_backend=grad_backend,
            projector_backend=projector_backend,
            null_cond=self.null_cond,
        )

    def dataset_conds(self, dataset: Any) -> Any:
        """Captions in the words the tiny text-to-image model was trained on."""
        from ctrak_fast.data.captions import caption

        return [caption(dataset.factors, dataset.values, r) for r in dataset.captions.tolist()]

    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode_images(images)

    def training_x0(self, images: Any, ids: Tensor, store: Any) -> Any:
        return encode_images_cached(self.model, images, ids, store)

    def pixel_size(self) -> int:
        adapter: Any = self.model
        scale = 2 ** (len(adapter.vae.config.block_out_channels) - 1) if adapter.latent else 1
        return int(adapter.config["image_size"]) * scale

    def generate(self, cond: Tensor, n: int, *, seed: int, guidance: float, steps: int) -> Tensor:
        x0 = self.model.generate(cond, "", guidance, steps, seed=seed, n=n)
        return self.model.decode_latents(x0)

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
        if region is not None:
            raise ValueError("region queries of text-to-image models are not supported yet")
        return super().concept_features(featurizer, spec, pos, negatives, x0, region, how)

    def describe(self) -> dict[str, Any]:
        return self.model.describe()
