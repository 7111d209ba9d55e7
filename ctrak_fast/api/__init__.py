"""The embeddable API: one `Attributor` per (model, method) featurizes, queries and attributes.

    att = Attributor(model, "concept-trak", projection=ProjectionSpec(k=512))
    store = att.featurize(dataset, "out/store")                     # FeatureStore (resumable)
    q = att.query("shape=triangle,colour=red", remove="shape")      # Query: features [m, k]
    res = att.attribute(q, store, k=10)                             # Attribution: ids / scores

Methods (METHOD.md §3-6; method/methods.py has the table) are all scored as
u = (ΦᵀΦ + λI)⁻¹q, score_i = φ_i·u; DAS scores D-TRAK's u against its DAS rows.

Models: any kind of models/registry.py (models/base.py ModelKind): a factor-conditioned
`FactorUNet` (conditions are factor value indices, "removing" a concept sets its factor to the
null token), a text-to-image `TextToImageAdapter` (conditions are prompts, removing a concept
deletes its phrase), or a diffusers pipeline through `Attributor.from_pipeline` (DDPM/DDIM
UNet2DModel, Stable Diffusion, DiT, PixArt-α/Σ, SD3 with flow matching: docs/TRANSFORMER_KINDS.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ctrak_fast.api import core
from ctrak_fast.data import ConceptDataset
from ctrak_fast.data.inputs import sources_of, training_inputs
from ctrak_fast.engine.projection import FactorizedSpec, ProjectionSpec
from ctrak_fast.engine.store import FORMAT_VERSION, FeatureStore
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.methods import GRADIENT_METHODS, get_method
from ctrak_fast.method.pipeline import PreconditionerCache, das_store_path, featurize
from ctrak_fast.method.query import ConceptQuerySpec
from ctrak_fast.models.base import Condition
from ctrak_fast.models.registry import kind_of, kind_of_pipeline
from ctrak_fast.models.shipped import shipped_dataset, shipped_model
from ctrak_fast.results import Attribution, Query

__all__ = [
    "METHODS",
    "STORE_FORMAT_VERSION",
    "Attribution",
    "Attributor",
    "Condition",
    "Query",
    "das_store_path",
    "shipped_dataset",
    "shipped_model",
]

METHODS: tuple[str, ...] = GRADIENT_METHODS
"""The attribution methods an Attributor implements (the rows of method/methods.py with
gradient features; METHOD.md §3-6)."""
STORE_FORMAT_VERSION: int = FORMAT_VERSION
"""Newest FeatureStore format this build reads and writes; newer stores are refused."""


# ---- the attributor (its steps: api/core.py) -----------------------------------------------------


class Attributor:
    """A diffusion model plus one attribution method: featurize -> query -> attribute.

    Args:
        model: the eps model, model(x_t [B,C,H,W] float32, t [B] int64, cond [B,...]) ->
            [B,C,H,W]: a FactorUNet (conditions: factor value indices), a TextToImageAdapter
            (conditions: prompts), or see :meth:`from_pipeline` for diffusers pipelines.
        method: "concept-trak" (default), "trak", "d-trak" or "das" (METHOD.md §3-6).
        feature: how training features are made (default: the method's paper settings:
            timesteps 99..899, DDIM inversion with CFG 7.5 and per-timestep normalisation for
            concept-trak; fixed noise for the baselines). Its loss must be the method's.
        projection: the random projection (default ProjectionSpec(): Rademacher, k=2048, seed 0),
            or a FactorizedSpec(k_in, k_out): per-layer Kronecker projection of the Linear/Conv2d
            weights (k = layers * k_in * k_out), much cheaper, noisier at equal k; not for
            text-to-image adapters.
        query: concept-slider settings (default ConceptQuerySpec(): w=7.5, 4 local draws, at the
            feature timesteps; w=3 for text-to-image models, as in the paper).
        null_cond: the unconditional condition (default: model.null_cond(1)[0]).
        grad_backend: "hooks" (batched, default) or "func" (torch.func reference).
        projector_backend: "auto", "cpu", "reference" or "triton".

    Examples:
        >>> import tempfile; tmp = tempfile.mkdtemp()
        >>> att = Attributor(shipped_model(), "concept-trak", projection=ProjectionSpec(k=64),
        ...                  feature=FeatureSpec(timesteps=(499,), inversion_steps=10))
        >>> att.method, att.k, att.feature_spec.loss
        ('concept-trak', 64, 'dps')
        >>> store = att.featurize(shipped_dataset(per_combo=1), tmp + "/store", batch_size=7)
        >>> store.n_rows, store.k
        (14, 64)
        >>> q = att.query("shape=triangle,colour=red", draws="global", n_draws=1)
        >>> q.features.shape, q.labels       # one row per factor removed (c- = factor nulled)
        (torch.Size([2, 64]), ('-shape', '-colour'))
        >>> res = att.attribute(q, store, k=3)
        >>> res.top_ids.shape, res.top_ids.dtype, res.top_scores.dtype
        (torch.Size([2, 3]), torch.int64, torch.float32)
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "concept-trak",
        *,
        feature: FeatureSpec | None = None,
        projection: ProjectionSpec | FactorizedSpec | None = None,
        query: ConceptQuerySpec | None = None,
        null_cond: Tensor | None = None,
        grad_backend: str = "hooks",
        projector_backend: str = "auto",
    ) -> None:
        self._method = method
        spec = core.method_spec(method, feature)
        self._kind = kind_of(model, null_cond)
        fz = self._kind.featurizer(
            spec,
            projection or ProjectionSpec(),
            grad_backend=grad_backend,
            projector_backend=projector_backend,
        )
        self._fz = fz
        self._query = (
            query if query is not None else core.default_query_spec(self._kind, fz, method)
        )
        self._pre = PreconditionerCache(core.KEEP_GRAM_MAX_K)

    # -- construction from a pipeline --

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        method: str = "concept-trak",
        *,
        dtype: torch.dtype | None = None,
        null_class: int | None = None,
        **kwargs: Any,
    ) -> Attributor:
        """An Attributor over a diffusers pipeline object already in memory (nothing is loaded).

        Args:
            pipe: a pipeline with `.unet` (or `.transformer`) and `.scheduler`: text-to-image
                (UNet2DConditionModel, e.g. StableDiffusionPipeline; its vae / text_encoder /
                tokenizer are used when present; gradients of the cross-attention parameters by
                default), DDPMPipeline / DDIMPipeline (UNet2DModel, unconditional or
                class-conditional), DiTPipeline, PixArt-α/Σ or StableDiffusion3Pipeline.
            method: as for :class:`Attributor`.
            dtype: UNet execution dtype of text-to-image models (default: its own).
            null_class: class-conditional UNet2DModel only: the class trained as "no class", if
                any. Without one, classifier-free guidance is undefined, so the default specs use
                guidance 1 (for unconditional models guidance changes nothing).
            **kwargs: the keyword arguments of :class:`Attributor`.

        Returns:
            Attributor whose `model` is the adapter (TextToImageAdapter or a UNet2DModel adapter).

        Examples:
            >>> import tempfile; tmp = tempfile.mkdtemp()
            >>> from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
            >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
            ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
            ...                    up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)
            >>> pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
            >>> att = Attributor.from_pipeline(pipe, "d-trak", projection=ProjectionSpec(k=32))
            >>> images = torch.rand(4, 3, 8, 8) * 2 - 1
            >>> att.featurize((images, None), tmp + "/ddpm", batch_size=4).n_rows
            4
            >>> att.image_query(images[:1]).features.shape
            torch.Size([1, 32])
        """
        kind = kind_of_pipeline(pipe)
        model, kwargs = kind.from_pipeline(
            pipe, method, dtype=dtype, null_class=null_class, kwargs=kwargs
        )
        return cls(model, method, **kwargs)

    # -- description --

    @property
    def model(self) -> nn.Module:
        """The eps model (for pipelines: the adapter around the pipeline's UNet)."""
        return self._fz.model

    @property
    def method(self) -> str:
        """ "concept-trak", "trak", "d-trak" or "das"."""
        return self._method

    @property
    def feature_spec(self) -> FeatureSpec:
        """How training (and whole-image query) features are made."""
        return self._fz.spec

    @property
    def projection_spec(self) -> ProjectionSpec | FactorizedSpec:
        """The projection shared by training and query features."""
        return self._fz.projection

    @property
    def query_spec(self) -> ConceptQuerySpec:
        """Settings of concept-slider queries."""
        return self._query

    @property
    def k(self) -> int:
        """Feature dimension."""
        return self._fz.k

    @property
    def featurizer(self) -> Featurizer:
        """The underlying engine object (not covered by the stability promise)."""
        return self._fz

    def meta(self) -> dict[str, Any]:
        """What a store made by this attributor records: model fingerprint, feature and
        projection specs (and the text encoder / VAE of text-to-image models)."""
        return self._fz.meta()

    def __repr__(self) -> str:
        return (
            f"Attributor({type(self.model).__name__}, method={self._method!r}, k={self.k}, "
            f"timesteps={list(self.feature_spec.timesteps)})"
        )

    # -- training side --

    def featurize(
        self,
        dataset: ConceptDataset | tuple[Any, ...],
        store: str | os.PathLike[str],
        *,
        batch_size: int = 32,
        shard_rows: int | None = None,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        progress: bool = False,
        image_column: str = "image",
        caption_column: str = "text",
    ) -> FeatureStore:
        """Training features of every sample into a FeatureStore at `store` (resumes).

        Args:
            dataset: a ConceptDataset; a Hugging Face `datasets.Dataset` (its `image_column`
                and `caption_column`); or a tuple (images, conds[, ids]): images float32
                [N,C,H,W] in [-1,1], or N image paths or PIL images (resized on the short side
                and centre-cropped as diffusers' training scripts do, and read a batch at a
                time: a pixel model holds one batch of them at once, a latent model keeps
                only the VAE latents, cached next to the store), conds: the model's
                conditions [N,...] (factor models: int64 [N,F]; text-to-image: N captions or
                embeddings [N,L,D]; unconditional pipelines: None), ids: int64 [N] (default
                0..N-1).
            store: directory; an existing store of the same spec and samples is resumed.
            batch_size: samples per gradient batch. shard_rows: rows per shard (a multiple of
                batch_size; default 16 batches). dtype: storage dtype of the features.
            progress: show progress: a tqdm bar when stderr is a terminal, else INFO lines of
                the logger ``ctrak_fast.progress`` (on stderr when logging is not configured).

        Returns:
            The FeatureStore: features [N, k] in `dtype`, ids int64 [N], meta = :meth:`meta`.
            Method "das" also writes the DAS rows to :func:`das_store_path` (store).
        """
        dataset = training_inputs(
            dataset,
            self._kind.pixel_size(),
            image_column=image_column,
            caption_column=caption_column,
        )
        images, conds, ids = self._kind.training_set(dataset)
        row = get_method(self._method)
        if row.complete_captions:  # images on disk: a second pass reads the uncaptioned ones
            conds = self._kind.complete(images, conds)
        return featurize(
            self._fz,
            self._kind.training_x0(images, ids, store),
            conds,
            ids,
            store,
            batch_size=batch_size,
            shard_rows=shard_rows,
            dtype=dtype,
            das_path=das_store_path(store) if row.das else None,
            progress=progress,
            sources=sources_of(dataset, ids),
        )

    # -- query side --

    def generate(
        self,
        concept: Condition,
        n: int = 1,
        *,
        seed: int = 0,
        guidance: float | None = None,
        steps: int = 50,
    ) -> Tensor:
        """Generate images of a condition with DDIM and CFG (e.g. the query image of a concept).

        Args:
            concept: the condition (see :data:`Condition`). n: number of images. seed: the
                same seed gives the same images. guidance: CFG scale (default 3 for factor models,
                as the benchmark's queries; 7.5 for text-to-image; 1 for class pipelines).

        Returns:
            [n, C, H, W] float32 pixels in [-1, 1].
        """
        return core.generate(self._kind, concept, n, seed=seed, guidance=guidance, steps=steps)

    def query(
        self,
        concept: Condition,
        remove: str | Sequence[str] | None = None,
        *,
        negatives: Sequence[Condition] = (),
        image: Tensor | None = None,
        region: Any = None,
        **spec: Any,
    ) -> Query:
        """Query features of a concept: the concept slider (concept-trak), or the whole-image
        query of the baselines (their loss on the query image under `concept`).

        Args:
            concept: c+, a condition that holds the concept (see :data:`Condition`).
            remove: concept-trak: what c- removes, one query row each: factor name(s) (factor
                models; default: every factor set in c+, in turn) or phrase(s) of the prompt
                (text-to-image).
            negatives: explicit c- conditions (e.g. the concept flipped to another value), one
                row each, after those of `remove`.
            image: the query image [C,H,W] pixels in [-1,1]: local draws start from it, the
                baselines featurize it. Default: generated from c+ with `seed` (see
                :meth:`generate`).
            region: where in the image the concept is: a box (x0, y0, x1, y1) in pixels or a
                mask [H, W]; the query's loss is restricted to it (mapped onto the latent grid
                of latent models). Needs local draws (an image to point into).
            **spec: overrides of the query spec (e.g. draws="global", n_draws=16, weight=3.0).

        Returns:
            Query: features [m, k] float32, one row per c- (concept-trak) or one row
            (baselines); labels like "-shape"; the image used.

        Examples:
            >>> att = Attributor(shipped_model(), projection=ProjectionSpec(k=32),
            ...                  feature=FeatureSpec(timesteps=(299, 699), inversion_steps=10))
            >>> q = att.query({"shape": "circle", "colour": "blue"}, remove="colour", n_draws=1,
            ...               steps=10)        # local draws around a generated blue circle
            >>> q.features.shape, q.labels, q.image.shape
            (torch.Size([1, 32]), ('-colour',), torch.Size([3, 16, 16]))
        """
        qspec = self._query
        if spec:
            qspec = ConceptQuerySpec(**{**qspec.to_dict(), **spec})
        args = (concept, remove, negatives, image, region)
        return core.query(self._kind, self._fz, self._method, qspec, *args)

    def image_query(self, images: Tensor, conds: Any = None, region: Any = None) -> Query:
        """Whole-image query features: the training-side recipe applied to query images
        (TRAK / D-TRAK / DAS queries; for concept-trak, the DPS features of the images).

        Args:
            images: [Q, C, H, W] float32 pixels in [-1, 1].
            conds: their conditions (as in :meth:`featurize`; None for unconditional models).
            region: "where did *this part* come from?": a box (x0, y0, x1, y1) in pixels or a
                mask [H, W], the same for every image; the loss is restricted to it (mapped onto
                the latent grid of latent models).

        Returns:
            Query with features [Q, k] float32, labels "image 0", "image 1", ...

        Examples:
            >>> att = Attributor(shipped_model(), "d-trak", projection=ProjectionSpec(k=32))
            >>> img = shipped_dataset(per_combo=1).images[:1]
            >>> q = att.image_query(img, torch.tensor([[0, 0]]), region=(0, 0, 8, 8))
            >>> q.features.shape, q.meta["region"]
            (torch.Size([1, 32]), [0, 0, 8, 8])
        """
        if images.dim() != 4:
            raise ValueError(f"images must be [Q, C, H, W], got {list(images.shape)}")
        cond_t = self._kind.conditions.batch(conds, len(images))
        labels = tuple(f"image {i}" for i in range(len(images)))
        return core.image_query(self._kind, self._fz, images, cond_t, labels, region)

    # -- scores --

    def attribute(
        self,
        query: Query | Tensor,
        store: FeatureStore | str | os.PathLike[str],
        k: int = 10,
        *,
        lambda_r: float = 1.0,
        tails: Literal["top", "bottom", "both"] = "both",
        backend: Literal["auto", "cpu", "cuda", "reference"] = "auto",
    ) -> Attribution:
        """Exact top-k training samples of each query row: score_i = φ_i·(ΦᵀΦ + λI)⁻¹q.

        Args:
            query: a Query (its meta must match the store's), or features [m, k] / [k].
            store: a FeatureStore made by this attributor (or its path).
            k: results per query row and tail (<= the store's rows).
            lambda_r: relative damping, λ = lambda_r * 0.1 * tr(ΦᵀΦ) / k (paper default 1).
            tails: "top" (supporting), "bottom" (opposing) or "both".
            backend: top-k engine ("auto": C++ or CUDA when built, else the torch reference).

        Returns:
            Attribution: ids int64 [m, k] and scores float32 [m, k] per tail.

        Raises:
            SpecMismatch: the store was made with another model / feature spec / projection.
            StoreError: the store is missing, corrupt, or of a newer format version.
        """
        args = (self._fz, self._method, self._pre, query, store, k)
        return core.attribute(*args, lambda_r=lambda_r, tails=tails, backend=backend)
