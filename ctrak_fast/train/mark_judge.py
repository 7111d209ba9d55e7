"""The mark judge: an independent detector of the uncaptioned mark (data/marks.py), which confirms
that a generated query image shows the mark and says where (`ctrak bench mark`).

Trained on images stamped by the same generator as the training set but from seeds of its own:
for synthetic data, fresh renders of every combination (it never sees a training image). Small
pixel noise and blur make it robust to the softer marks a diffusion model draws.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from ctrak_fast.data import SyntheticConfig, render
from ctrak_fast.data.marks import stamp_marks
from ctrak_fast.models.factor_unet import MarkJudge, save_model
from ctrak_fast.train.judge import pixel_noise, train_steps

log = logging.getLogger(__name__)

POS_WEIGHT = 4.0  # a box covers ~5% of an image's pixels: weigh them up


def stamped(images: torch.Tensor, seed: int, fraction: float = 0.5):
    """`images` with the mark stamped on `fraction` of them: (images [N,3,S,S], marked bool
    [N], box masks float [N,S,S], 1 inside a mark's box)."""
    x, marked, boxes = stamp_marks(images, fraction, seed)
    masks = torch.zeros(len(x), *x.shape[-2:])
    for i in marked.nonzero().flatten().tolist():
        x0, y0, x1, y1 = boxes[i].tolist()
        masks[i, y0:y1, x0:x1] = 1.0
    return x, marked, masks


def synthetic_pool(cfg: SyntheticConfig, per_combo: int, seed: int) -> torch.Tensor:
    """Fresh renders of every combination (seeds far from the training set's: the judge never
    sees a training image)."""
    combos = cfg.combos("all")
    return torch.cat([render(s, c, per_combo, seed, cfg.image_size, cfg) for s, c in combos])


def detection_report(judge: MarkJudge, x: torch.Tensor, marked: torch.Tensor, masks) -> dict:
    """Accuracy of the image-level call, its rates on marked and unmarked images, and the mean
    IoU of the found box with the true one on the marked images."""
    score, boxes = judge.detect(x)
    found = score >= 0.5
    ious = []
    for i in (marked & found).nonzero().flatten().tolist():
        x0, y0, x1, y1 = boxes[i].tolist()
        pred = torch.zeros_like(masks[i])
        pred[y0:y1, x0:x1] = 1.0
        ious.append(((pred * masks[i]).sum() / ((pred + masks[i]) > 0).sum()).item())
    return {
        "accuracy": (found == marked).float().mean().item(),
        "found_on_marked": found[marked].float().mean().item(),
        "found_on_unmarked": found[~marked].float().mean().item(),
        "box_iou": sum(ious) / len(ious) if ious else float("nan"),
    }


def train_mark_judge(
    images: torch.Tensor,
    out_path: str | os.PathLike,
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    progress: bool = True,
) -> MarkJudge:
    """Train a MarkJudge on `images` [N,3,S,S] (unmarked; half of them get a stamp from seeds of
    the judge's own, twice over), report on a held-back tenth stamped afresh (judge.validation,
    logged) and save it."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    n_val = max(1, len(images) // 10)
    fit = images[order[n_val:]]
    parts = [stamped(fit, seed + 5_000_011), stamped(fit, seed + 5_500_003)]
    x, masks = torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts])
    val = stamped(images[order[:n_val]], seed + 6_000_007)
    judge = MarkJudge(image_size=images.shape[-1]).train()
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blur = blur.expand(3, 1, 3, 3)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb, mb = x[idx], masks[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        mb = torch.where(flip[:, None, None], mb.flip(-1), mb)
        soft = torch.rand(len(idx), 1, 1, 1, generator=g)  # half of them blurred a little
        xb = torch.where(soft < 0.5, F.conv2d(xb, blur, padding=1, groups=3), xb)
        xb = pixel_noise(xb, 0.1, g)
        return F.binary_cross_entropy_with_logits(
            judge(xb), mb, pos_weight=torch.tensor(POS_WEIGHT)
        )

    t0 = time.time()
    train_steps(judge, batch_loss, steps, lr, "mark judge", progress)
    judge.eval()
    report = detection_report(judge, *val)
    log.info(f"mark judge done in {time.time() - t0:.0f}s; validation {report}")
    judge.validation = report
    save_model(judge, out_path)
    return judge


__all__ = ["detection_report", "stamped", "synthetic_pool", "train_mark_judge"]
