"""Training-side and query-side functions of Concept-TRAK and its baselines (METHOD.md §4-6).

Each loss is written literally, as in the paper, on batched tensors; it returns one value per
sample. Every one of them has a per-sample parameter gradient of the form

    grad_theta loss = (2 / D) * J_theta^T r,        J_theta = d eps_theta(x_t, t, c) / d theta,

for a detached *residual* r of the shape of eps. The featurizer uses that form (one vector-Jacobian
product per sample, see grads.py); the literal losses are the specification the tests check.

| loss      | literal form                                   | residual r      |
|-----------|------------------------------------------------|-----------------|
| dps       | mean((sg[eps - v] - eps)^2)                    | v               |
| dsm       | mean((target - eps)^2)                         | eps - target    |
| eps-norm  | mean(eps^2)                                    | eps             |
| slider    | mean((sg[eps(c+) + w d] - eps(c+))^2)          | -w d            |

eps stands for the model's output, what its schedule says it predicts (method/schedules.py):
the noise (target = noise), or for a flow the velocity v (target = noise - x0, the
flow-matching loss; DPS's x0_hat = x_t - sigma_t v; the slider's d = v(c+) - v(c-)).
"""

from __future__ import annotations

from typing import Any

import torch

from ctrak_fast.method.diffusion import Schedule, tweedie_x0

LOSSES = ("dps", "dsm", "eps-norm")


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def dps_loss(eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Concept-TRAK training loss. eps, v: [B, C, H, W] -> [B]."""
    return _mean_per_sample(((eps - v).detach() - eps).pow(2))


def dsm_loss(eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising score matching (TRAK): the model's training loss. eps (the model output),
    target (the noise; for a flow, noise - x0): [B, C, H, W] -> [B]."""
    return _mean_per_sample((target - eps).pow(2))


def eps_norm_loss(eps: torch.Tensor) -> torch.Tensor:
    """D-TRAK's output function. eps: [B, C, H, W] -> [B]."""
    return _mean_per_sample(eps.pow(2))


def slider_loss(eps_pos: torch.Tensor, d: torch.Tensor, w: float) -> torch.Tensor:
    """Concept-slider reward. eps_pos = eps(x_t, t, c+); d = eps(c+) - eps(c-), detached.

    eps_pos, d: [B, C, H, W] -> [B]."""
    return _mean_per_sample(((eps_pos + w * d).detach() - eps_pos).pow(2))


def dps_guidance(
    model,
    schedule: Schedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    x0: torch.Tensor,
) -> torch.Tensor:
    """DPS direction v_t = -grad_{x_t} mean((x0_hat(x_t) - x0)^2), theta frozen.

    x_t, x0: [B, C, H, W]; t: [B] int64; cond: [B, F] -> v: [B, C, H, W].
    Samples do not interact, so the gradient of the summed loss is each sample's own gradient.
    """
    return Residual("dps", schedule, t, x0=x0).standalone(model, x_t, t, cond)


class Residual:
    """The residual r of a training-side loss (see the module table) as a function of the model
    output, so that the forward whose Jacobian is taken also yields r (grads_hooks.capture_deltas
    calls it between its forward and backward): one forward per (batch, timestep) instead of two.

    ``res(eps, x)`` -> r [B, C, H, W] (detached); eps = model(x, t, cond) with x requiring grad
    when ``needs_input_grad`` (dps differentiates x0_hat(x) with respect to x; the graph is kept
    for the backward that follows). After a call, ``res.dsm`` holds the per-sample DSM loss at the
    given noise (NaN without noise; it feeds DAS weights).

    Examples:
        >>> res = Residual("eps-norm", schedule, t)  # doctest: +SKIP
        >>> r = res.standalone(model, x_t, t, cond)  # its own forward  # doctest: +SKIP
    """

    def __init__(
        self,
        loss: str,
        schedule: Schedule,
        t: torch.Tensor,
        *,
        x0: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        if loss == "dsm" and noise is None:
            raise ValueError("the dsm loss needs the noise that made x_t")
        if loss == "dps" and x0 is None:
            raise ValueError("the dps loss needs the clean image x0")
        self.loss, self.schedule, self.t, self.x0, self.noise = loss, schedule, t, x0, noise
        # what the output regresses onto: the noise, or for a flow noise - x0
        self.target = None if noise is None else schedule.target(x0, noise)
        self.needs_input_grad = loss == "dps"
        self.dsm: torch.Tensor | None = None

    def __call__(self, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        eps_value = eps.detach()
        if self.target is not None:
            self.dsm = dsm_loss(eps_value, self.target).detach()
        else:
            self.dsm = torch.full(eps.shape[:1], float("nan"), device=eps.device)
        if self.loss == "dps":  # v = -grad_x mean((x0_hat(x) - x0)^2), as dps_guidance
            x0_hat = tweedie_x0(x, eps, self.t, self.schedule)
            loss = _mean_per_sample((x0_hat - self.x0).pow(2)).sum()
            (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
            return -grad.detach()
        return eps_value - self.target if self.loss == "dsm" else eps_value

    def standalone(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
        """r from a forward of its own (for paths that do not share theirs)."""
        grad = self.needs_input_grad
        with torch.set_grad_enabled(grad):
            x = x_t.detach().requires_grad_(grad)
            return self(model(x, t, cond), x)


def region_mask(region, height: int, width: int) -> torch.Tensor:
    """A region of an image as a mask [height, width] float32: a box (x0, y0, x1, y1) in pixels
    (x0, y0 inclusive, x1, y1 exclusive), or a mask [height, width] (non-zero: inside).

    Examples:
        >>> region_mask((1, 0, 3, 2), 3, 4).tolist()
        [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    if isinstance(region, torch.Tensor):
        if tuple(region.shape) != (height, width):
            raise ValueError(
                f"the region mask is {list(region.shape)}, the image {height} x {width}"
            )
        if not torch.isfinite(region.float()).all():
            raise ValueError("the region mask holds NaN or Inf")
        mask = (region.float() != 0).float()
    else:
        if len(region) != 4 or any(int(v) != v for v in region):
            raise ValueError(f"a region box is four whole pixels (x0, y0, x1, y1), got {region}")
        x0, y0, x1, y1 = (int(v) for v in region)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"the region box {(x0, y0, x1, y1)} is not inside the {width} x {height} image "
                "with x0 < x1 and y0 < y1"
            )
        mask = torch.zeros(height, width)
        mask[y0:y1, x0:x1] = 1.0
    if mask.sum() == 0:
        raise ValueError("the region is empty")
    return mask


def region_weight(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The per-pixel weight that restricts a loss mean to a region: mask [H, W] (any size; 1 in
    the region, fractions allowed) resampled to the model's grid `size` (h, w) by area (a latent
    model's grid: each latent cell weighs the part of its pixels inside), then scaled so that
    mean(weight * l) = sum over the region of l / its area. Returns [1, 1, h, w].

    Examples:
        >>> m = torch.zeros(4, 4); m[:2, :2] = 1
        >>> w = region_weight(m, (4, 4)); w.sum().item(), w[0, 0, 0, 0].item()
        (16.0, 4.0)
    """
    if mask.dim() != 2:
        raise ValueError(f"a region mask is [H, W], got {list(mask.shape)}")
    m = mask.float().clamp(0, 1)[None, None]
    if tuple(m.shape[-2:]) != tuple(size):
        m = torch.nn.functional.interpolate(m, size=tuple(size), mode="area")
    total = m.sum()
    if total <= 0:
        raise ValueError("the region is empty")
    return m * (m[0, 0].numel() / total)


def region_on_grid(region: Any, image: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
    """The loss weight [1, 1, h, w] of `region` (a box or mask in the pixels of `image` [C, H, W])
    on the grid of the model's x0 [c, h, w] (latents for latent models); None for no region."""
    if region is None:
        return None
    mask = region_mask(region, image.shape[-2], image.shape[-1])
    return region_weight(mask, (x0.shape[-2], x0.shape[-1]))


def region_meta(region: Any) -> Any:
    """What a query's meta records of its region: the box (x0, y0, x1, y1), or a mask's pixel
    count and bounding box (what galleries outline)."""
    if isinstance(region, torch.Tensor):
        ys, xs = (region != 0).nonzero(as_tuple=True)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        return {"mask_pixels": int(len(xs)), "bbox": box}
    return [int(v) for v in region]


class RegionResidual:
    """A residual (a tensor, or a Residual evaluated on the gradient's forward) restricted to a
    region: r * weight (region_weight), the residual of the loss mean taken over the region only.
    The per-sample DSM loss it reports stays the whole image's (DAS weights are the training
    side's)."""

    def __init__(self, inner, weight: torch.Tensor):
        self.inner, self.weight = inner, weight
        self.needs_input_grad = getattr(inner, "needs_input_grad", False)

    @property
    def dsm(self) -> torch.Tensor | None:
        return getattr(self.inner, "dsm", None)

    def __call__(self, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r = self.inner(eps, x) if callable(self.inner) else self.inner
        return r * self.weight.to(r.device)

    def standalone(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
        if not callable(self.inner):
            return self.inner * self.weight.to(self.inner.device)
        return self.inner.standalone(model, x_t, t, cond) * self.weight.to(x_t.device)


def residual(
    loss: str,
    model,
    schedule: Schedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual r of a training-side loss (see the module table) and the per-sample DSM loss.

    Returns (r [B, C, H, W], dsm [B]); dsm is NaN where no noise is given (it feeds DAS weights).
    """
    res = Residual(loss, schedule, t, x0=x0, noise=noise)
    r = res.standalone(model, x_t, t, cond)
    return r, res.dsm
