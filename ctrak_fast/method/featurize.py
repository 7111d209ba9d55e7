"""Training-side features (METHOD.md §4, §6): per timestep x_t -> residual -> per-sample gradient ->
unit normalisation -> sum over timesteps -> one projection per sample.

Projection is linear, so sum_t P g_t / |g_t| = P (sum_t g_t / |g_t|): the normalised gradients are
accumulated in parameter space (exact norms from the full per-sample gradient) and projected once.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.projector import Projector
from ctrak_fast.engine.store import model_fingerprint
from ctrak_fast.method import diffusion
from ctrak_fast.method.grads.layout import add_blocks, blocks_sq_norm, scale_blocks_
from ctrak_fast.method.grads.per_sample import PerSampleGrads
from ctrak_fast.method.losses import LOSSES, RegionResidual, Residual
from ctrak_fast.method.negatives import InversionNegatives
from ctrak_fast.method.recipes import INVERSION_NEGATIVES

if TYPE_CHECKING:
    from ctrak_fast.engine.projection import FactorizedSpec
    from ctrak_fast.method.grads.factorized import FactorizedGrads
    from ctrak_fast.method.grads.layerwise import LayerwiseDense
    from ctrak_fast.method.grads.layout import Blocks

PAPER_TIMESTEPS = (99, 199, 299, 399, 499, 599, 699, 799, 899)


@dataclass(frozen=True)
class FeatureSpec:
    """How a training (or whole-image query) feature is made; serialised into the store manifest.

    loss: "dps" (Concept-TRAK), "dsm" (TRAK) or "eps-norm" (D-TRAK / DAS).
    inversion: x_t from deterministic DDIM inversion with CFG (Concept-TRAK) instead of fixed noise.

    Examples:
        >>> FeatureSpec().timesteps, FeatureSpec.baseline("dsm").inversion
        ((99, 199, 299, 399, 499, 599, 699, 799, 899), False)
    """

    loss: str = "dps"
    timesteps: tuple[int, ...] = PAPER_TIMESTEPS
    inversion: bool = True
    inversion_guidance: float = 7.5
    inversion_steps: int = 50
    # eps of the inversion step t_i -> t_{i+1} at t_{i+1} ("next", ours) or at t_i ("current",
    # the authors' synthetic-benchmark code, METHOD.md §10)
    inversion_eps: str = "next"
    # CFG negative of the inversion (factor models): the null token ("null", ours), each factor a
    # random other value redrawn every step ("random", the authors' code), or every factor
    # flipped ("flip", two-valued factors). negatives.py.
    inversion_negative: str = "null"
    # True: the whole per-timestep gradient to unit norm (the paper). "layer": each module (its
    # weight and bias together) to unit norm per timestep, so that no single layer (conv_out)
    # decides the inner product (dense projection only). False: no normalisation.
    normalize: bool | str = True
    # A regex on parameter names, or CONDITION_PATH: the modules that read the condition, as the
    # model declares them (grads/layout.py).
    param_filter: str | None = None
    noise_seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if not self.timesteps:
            raise ValueError("timesteps must not be empty")
        if self.inversion_eps not in ("next", "current"):
            raise ValueError(
                f"inversion_eps must be 'next' or 'current', got {self.inversion_eps!r}"
            )
        if self.inversion_negative not in INVERSION_NEGATIVES:
            raise ValueError(
                f"inversion_negative must be one of {INVERSION_NEGATIVES}, "
                f"got {self.inversion_negative!r}"
            )
        if self.normalize not in (True, False, "layer"):
            raise ValueError(f"normalize must be True, False or 'layer', got {self.normalize!r}")
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(**{**d, "timesteps": tuple(d["timesteps"])})

    @classmethod
    def baseline(cls, loss: str, **kw) -> FeatureSpec:
        """The whole-image baselines use fixed noise (no inversion)."""
        return cls(loss=loss, inversion=False, **kw)


class InversionCache(dict):
    """DDIM trajectories {t: x_t} keyed by the inversion settings and the bytes of (x0, cond,
    null condition): featurizers of one model whose recipes invert alike (e.g. concept-trak and
    concept-trak-cond) invert each image once. Entries are exact results, never approximations;
    memory is len(timesteps) images per cached image. `query_eps`: the eps the concept queries
    evaluated at the latest draw points (method/eps_memo.py), shared by the methods of a query."""

    query_eps: object = None

    @staticmethod
    def key(settings: tuple, x0: torch.Tensor, cond: torch.Tensor, null: torch.Tensor) -> tuple:
        h = hashlib.sha256()
        for t in (x0, cond, null):
            t = t.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return (settings, h.hexdigest())


def fixed_noise(
    seed: int, timesteps: tuple[int, ...], shape: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """One noise image per timestep shared by all samples (METHOD.md §4 step 1, alternative)."""
    gen = torch.Generator().manual_seed(seed)
    return {t: torch.randn(shape, generator=gen) for t in timesteps}


@dataclass
class Featurizer:
    """Turns (image, condition) batches into k-dimensional features.

    Args:
        model: eps model, model(x_t [B,C,H,W], t [B], cond [B,F]) -> [B,C,H,W].
        schedule: the model's training schedule (diffusion.NoiseSchedule, or a FlowSchedule).
        spec: FeatureSpec.
        projection: ProjectionSpec (dense Rademacher over all selected parameters), or
            FactorizedSpec (LoGra-style per-layer Kronecker projection of the Linear and
            Conv2d weights, k = n_layers * k_in * k_out; see grads_factorized.py).
        null_cond: [F] int64 condition used as the negative of CFG inversion.
        grad_backend: "hooks" (batched capture) or "func" (torch.func reference).
        layerwise: dense projection only: project each (batch, timestep) layer by layer
            (grads_layerwise.py; never forms the B × p gradient, Triton-fused on CUDA) instead
            of summing gradients over timesteps and projecting once. None (default) = on CUDA.

    Examples:
        >>> spec, proj = FeatureSpec(), ProjectionSpec(k=512)  # doctest: +SKIP
        >>> feat = Featurizer(model, schedule, spec, proj, null_cond)  # doctest: +SKIP
        >>> phi, dsm = feat(x0, cond)  # [B, 512] float32, [B] float32  # doctest: +SKIP
    """

    model: torch.nn.Module
    schedule: diffusion.Schedule
    spec: FeatureSpec
    projection: ProjectionSpec | FactorizedSpec
    null_cond: torch.Tensor
    grad_backend: str = "hooks"
    projector_backend: str = "auto"
    shared_projector: Projector | None = None  # one projector for several featurizers
    # DDIM inversions shared by featurizers of one model that invert alike (InversionCache)
    inversion_cache: InversionCache | None = None
    layerwise: bool | None = None
    _grads: PerSampleGrads = field(init=False, repr=False)
    _projector: Projector = field(init=False, repr=False)
    _factorized: FactorizedGrads | None = field(init=False, repr=False, default=None)
    _layerwise: LayerwiseDense | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        self._noise: dict[int, torch.Tensor] | None = None
        n_t = self.schedule.num_train_timesteps
        outside = [t for t in self.spec.timesteps if not 0 <= t < n_t]
        if outside:
            raise ValueError(f"timesteps {outside} are outside the model's schedule (0..{n_t - 1})")
        if not isinstance(self.projection, ProjectionSpec):
            from ctrak_fast.method.grads.factorized import FactorizedGrads

            if self.shared_projector is not None:
                raise ValueError("a factorized projection has no shared projector")
            self._factorized = FactorizedGrads(self.model, self.spec.param_filter, self.projection)
            return
        self._grads = PerSampleGrads(self.model, self.spec.param_filter, backend=self.grad_backend)
        shared = self.shared_projector
        if shared is not None and (shared.spec != self.projection or shared.dim != self._grads.dim):
            raise ValueError(
                "shared_projector does not match this featurizer's projection and model"
            )
        self._projector = shared or Projector(
            self.projection, self._grads.dim, backend=self.projector_backend
        )
        layerwise = self.layerwise
        if layerwise is None:
            on_cuda = next(self.model.parameters()).is_cuda
            layerwise = on_cuda and self.grad_backend == "hooks" and self.spec.normalize != "layer"
        if layerwise:
            if self.grad_backend != "hooks":
                raise ValueError("layerwise projection needs grad_backend='hooks'")
            from ctrak_fast.method.grads.layerwise import LayerwiseDense

            self._layerwise = LayerwiseDense(self.model, self.spec.param_filter, self.projection)

    @property
    def grads(self) -> PerSampleGrads:
        """Per-sample gradients (dense projection only)."""
        if self._factorized is not None:
            raise AttributeError("a factorized featurizer never forms per-sample gradients")
        return self._grads

    @property
    def projector(self) -> Projector:
        """The dense projector (dense projection only)."""
        if self._factorized is not None:
            raise AttributeError("a factorized featurizer has no dense projector")
        return self._projector

    @property
    def layerwise_projector(self) -> LayerwiseDense | None:
        """The layer-by-layer projector when features are projected layer by layer (the CUDA
        default, or ``layerwise=True``), else None (sum in parameter space, project once)."""
        return self._layerwise

    @property
    def k(self) -> int:
        """Feature dimension."""
        return self._factorized.k if self._factorized is not None else self.projection.k

    def meta(self) -> dict:
        """What a store must record so that features made elsewhere are comparable."""
        proj = self.projection.to_dict()
        if self._factorized is not None:
            proj["layers"] = self._factorized.layer_names
        return {
            "model": model_fingerprint(self.model.named_parameters()),
            "feature": self.spec.to_dict(),
            "projection": proj,
        }

    def terms(self, x_t, t, cond, r, normalize: bool | str) -> Blocks:
        """Per-sample gradients (2/D) J^T r, unit-normalised if asked, in the space where they are
        summed: parameter blocks (dense: projected once, after the sum) or, factorised or
        layerwise, the projected features as one block. Sum them with grads.add_blocks; finish
        with features().
        r: a tensor shaped like x_t, or a losses.Residual evaluated on the gradient's forward."""
        projected = self._factorized or self._layerwise
        if normalize == "layer":
            if projected is not None:
                raise ValueError("normalize='layer' needs the dense projection (layerwise=False)")
            return layer_normalize_(self._grads(x_t, t, cond, r), self._grads.slots)
        if projected is not None:
            phi, sq = projected(x_t, t, cond, r, 2.0 / x_t[0].numel(), norms=normalize)
            blocks = [(0, phi)]
        else:
            blocks = self._grads(x_t, t, cond, r)
            sq = blocks_sq_norm(blocks) if normalize else None
        if sq is None:
            return blocks
        norm = sq.sqrt()  # zero gradients stay zero
        # The blocks are fresh tensors of this call: scaled in place, no copy of the gradient.
        return scale_blocks_(blocks, torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)))

    def features(self, acc: Blocks) -> torch.Tensor:
        """Summed terms -> features [B, k] float32."""
        if self._factorized is not None or self._layerwise is not None:
            return acc[0][1].float()
        return self._projector.project_blocks(acc)

    def trajectory(self, x0: torch.Tensor, cond: torch.Tensor) -> dict[int, torch.Tensor]:
        """x_t at every timestep of the spec: DDIM inversion (CFG vs the spec's inversion
        negative) or fixed noise."""
        spec = self.spec
        if spec.inversion:
            key = None
            if self.inversion_cache is not None:
                settings = (id(self.model), spec.inversion_guidance, spec.inversion_steps)
                settings += (spec.timesteps, spec.inversion_eps, spec.inversion_negative)
                settings += (spec.noise_seed,)
                key = self.inversion_cache.key(settings, x0, cond, self.null_cond)
                if key in self.inversion_cache:
                    return self.inversion_cache[key]
            neg: torch.Tensor | InversionNegatives = self.null_cond.expand_as(cond)
            if spec.inversion_negative != "null":
                n_values = getattr(self.model, "n_values", None)
                if n_values is None:
                    raise ValueError(
                        f"inversion_negative={spec.inversion_negative!r} needs a factor model"
                    )
                neg = InversionNegatives(
                    spec.inversion_negative, x0, cond, n_values, spec.noise_seed
                )
            traj = diffusion.ddim_invert(
                self.model,
                x0,
                cond,
                neg_cond=neg,
                guidance=spec.inversion_guidance,
                steps=spec.inversion_steps,
                record_timesteps=spec.timesteps,
                schedule=self.schedule,
                eps_at=spec.inversion_eps,
            )
            if key is not None:
                self.inversion_cache[key] = traj
            return traj
        noise = self.noise(x0.shape[1:])
        return {
            t: diffusion.add_noise(x0, noise[t].expand_as(x0), t, self.schedule)
            for t in spec.timesteps
        }

    def noise(self, shape) -> dict[int, torch.Tensor]:
        if self._noise is None:
            # Drawn on the CPU so the bits do not depend on the device, then moved to the model's.
            device = next(self.model.parameters()).device
            noise = fixed_noise(self.spec.noise_seed, self.spec.timesteps, tuple(shape))
            self._noise = {t: n.to(device) for t, n in noise.items()}
        return self._noise

    def gradient_sum(self, x0: torch.Tensor, cond: torch.Tensor, region=None):
        """Sum over timesteps of the (normalised) per-sample gradient terms (see terms()).
        region: a weight [1, 1, h, w] (losses.region_weight) restricting the loss to a region of
        the image (queries; None: the whole image).

        Returns (blocks, dsm_sum [B]): dsm_sum is the DSM loss at the fixed noise
        summed over timesteps (DAS weights); NaN when x_t comes from inversion.
        """
        spec = self.spec
        traj = self.trajectory(x0, cond)
        noise = None if spec.inversion else self.noise(x0.shape[1:])
        acc, dsm_sum = None, torch.zeros(x0.shape[0], device=x0.device)
        for t in spec.timesteps:
            tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
            eps_t = None if noise is None else noise[t].expand_as(x0)
            # r comes from the same forward as the gradient (one forward per timestep).
            r = Residual(spec.loss, self.schedule, tt, x0=x0, noise=eps_t)
            if region is not None:
                r = RegionResidual(r, region)
            terms = self.terms(traj[t], tt, cond, r, spec.normalize)
            acc = terms if acc is None else add_blocks(acc, terms)  # fresh: no copy to start
            dsm_sum += r.dsm
        return acc, dsm_sum

    def __call__(
        self, x0: torch.Tensor, cond: torch.Tensor, region=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 [B,C,H,W] in [-1,1], cond [B,F] -> (features [B,k] float32, dsm_sum [B]);
        region: see gradient_sum."""
        blocks, dsm_sum = self.gradient_sum(x0, cond, region)
        return self.features(blocks), dsm_sum


def layer_normalize_(blocks: Blocks, slots) -> Blocks:
    """Scale each module's per-sample gradient (all its parameter blocks together: weight and
    bias) to unit L2 norm, in place; zero gradients stay zero. blocks [(offset, [B, n])] are in
    slot order."""
    groups: dict[str, list[torch.Tensor]] = {}
    for slot, (off, b) in zip(slots, blocks, strict=True):
        if slot.offset != off:
            raise ValueError("blocks are not in the order of the parameter slots")
        groups.setdefault(slot.name.rsplit(".", 1)[0], []).append(b)
    for bs in groups.values():
        norm = sum(b.float().pow(2).sum(1) for b in bs).sqrt()
        scale = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
        for b in bs:
            b.mul_(scale[:, None].to(b.dtype))
    return blocks
