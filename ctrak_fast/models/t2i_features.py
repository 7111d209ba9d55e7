"""Features of a text-to-image adapter: float32 per-sample gradients with float16 loss scaling,
only the filtered parameters unfrozen, the text encoder and VAE recorded in the manifest; prompt
concept queries through the one concept-query path of method/query.py."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.grads.layout import Blocks
from ctrak_fast.method.query import ConceptQuerySpec, concept_query_features
from ctrak_fast.models.text2image import T2I_PARAM_FILTER, TextToImageAdapter


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
    cond: prompt ids [B, 1] (adapter.prompt_ids) or embeddings [B, L, D], the kind of null_cond."""

    def __post_init__(self):
        if not isinstance(self.model, TextToImageAdapter):
            raise TypeError("T2IFeaturizer needs a TextToImageAdapter model")
        super().__post_init__()
        self._grads = _Fp32Grads(self._grads, self.model)

    def meta(self) -> dict:
        return {**super().meta(), "text2image": self.model.describe()}

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
) -> T2IFeaturizer:
    """A T2IFeaturizer with the model's schedule, the empty prompt as null condition, and the
    cross-attention filter unless `spec` names another (spec.param_filter=None there means: use
    T2I_PARAM_FILTER; pass ".*" for every UNet parameter).

    Examples (need a model; not doctests):
            fz = make_featurizer(adapter, FeatureSpec(), ProjectionSpec(k=4096))
            phi, _ = fz(adapter.encode_images(images), adapter.prompt_ids(captions))
    """
    spec = spec or FeatureSpec()
    if spec.param_filter is None:
        spec = FeatureSpec.from_dict({**spec.to_dict(), "param_filter": T2I_PARAM_FILTER})
    return T2IFeaturizer(
        adapter,
        adapter.schedule,
        spec,
        projection or ProjectionSpec(),
        adapter.null_cond(1)[0],
        grad_backend=grad_backend,
        projector_backend=projector_backend,
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
