"""The factor-conditioned diffusion model (FactorUNet) and its judges: the concept judge
(ConceptJudge) and the detector of an uncaptioned mark (MarkJudge).

Conditioning: each factor f has an embedding table with n_values[f] + 1 rows; the last row is
the null token ("factor removed"), trained by per-factor condition dropout. The per-factor
embeddings are summed and added to the time embedding through diffusers'
`class_embed_type="identity"`. A null token per factor (rather than one for the whole condition)
is what lets a concept query remove one factor and keep the others (METHOD.md §5).

Checkpoints are safetensors files whose metadata holds the model config as JSON (no pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ctrak_fast.engine.atomic import atomic_path
from ctrak_fast.engine.validation import InputError, show_ids

__all__ = [
    "FactorUNet",
    "ConceptJudge",
    "MarkJudge",
    "save_model",
    "load_model",
    "drop_factor",
    "null_cond",
]

_FORMAT = "ctrak-model/1"

# Cosine betas capped at 0.05 (see diffusion.NoiseSchedule for why not linear, and why the cap).
DEFAULT_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "max_beta": 0.05,
}


class FactorUNet(nn.Module):
    """eps-prediction UNet conditioned on one value per factor.

    Args:
        n_values: number of values per factor (F factors); null token index = n_values[f].
        image_size: H = W of the images.
        block_out_channels / layers_per_block / attention: UNet2DModel layout; attention[i] puts
            self-attention in resolution level i (default only the lowest).
        schedule: noise schedule config (see diffusion.NoiseSchedule), stored with the weights.
        factors / values: optional names, stored so a checkpoint describes its own conditions.

    forward(x_t [B,3,H,W] float32, t [B] int64 or scalar, cond [B,F] int64) -> eps [B,3,H,W].
    """

    # The modules the condition enters through (grads/layout.py CONDITION_PATH): the factor
    # embeddings, summed into the time embedding that every resnet reads via time_emb_proj.
    condition_param_filter = r"time_emb_proj|factor_embeddings"

    def __init__(
        self,
        n_values: list[int],
        image_size: int = 16,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        attention: tuple[bool, ...] = (False, False, True),
        norm_num_groups: int = 8,
        schedule: dict | None = None,
        factors: list[str] | None = None,
        values: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        if len(attention) != len(block_out_channels):
            raise ValueError("attention needs one flag per block")
        self.config = {
            "kind": "FactorUNet",
            "n_values": [int(n) for n in n_values],
            "image_size": int(image_size),
            "in_channels": int(in_channels),
            "block_out_channels": [int(c) for c in block_out_channels],
            "layers_per_block": int(layers_per_block),
            "attention": [bool(a) for a in attention],
            "norm_num_groups": int(norm_num_groups),
            "schedule": dict(schedule or DEFAULT_SCHEDULE),
            "factors": list(factors) if factors else [f"factor{i}" for i in range(len(n_values))],
            "values": values,
        }
        self.n_values = list(self.config["n_values"])
        emb_dim = block_out_channels[0] * 4  # UNet2DModel's time-embedding width
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple(
                "AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)
            ),
            norm_num_groups=norm_num_groups,
            attention_head_dim=8,
            class_embed_type="identity",
        )
        # Classic attention: SDPA has no vmap batching rule on CPU (torch.func per-sample grads).
        for mod in self.unet.modules():
            if isinstance(mod, Attention):
                mod.set_processor(AttnProcessor())
        self.factor_embeddings = nn.ModuleList(nn.Embedding(n + 1, emb_dim) for n in self.n_values)
        for e in self.factor_embeddings:
            nn.init.normal_(e.weight, std=0.5)  # same order of magnitude as the time embedding

    @property
    def n_factors(self) -> int:
        return len(self.n_values)

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def null_index(self) -> torch.Tensor:
        """int64 [F]: the null-token index of each factor."""
        return torch.tensor(self.n_values, dtype=torch.int64)

    def null_cond(self, batch: int, device=None) -> torch.Tensor:
        """int64 [B, F], every factor removed (the unconditional model)."""
        return self.null_index.to(device).expand(batch, -1).clone()

    def embed(self, cond: torch.Tensor) -> torch.Tensor:
        """cond int64 [B, F] -> summed factor embedding [B, emb_dim]."""
        if cond.shape[-1] != self.n_factors:
            raise ValueError(f"cond must be [B, {self.n_factors}], got {tuple(cond.shape)}")
        return sum(e(cond[..., f]) for f, e in enumerate(self.factor_embeddings))

    def forward(self, x_t: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor(t, dtype=torch.int64, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t.to(x_t.device), class_labels=self.embed(cond)).sample


def null_cond(n_values: list[int] | FactorUNet, batch: int, device=None) -> torch.Tensor:
    """int64 [B, F], every factor set to its null token (the unconditional model)."""
    if isinstance(n_values, FactorUNet):
        n_values = n_values.n_values
    return torch.tensor(n_values, dtype=torch.int64, device=device).expand(batch, -1).clone()


def drop_factor(cond: torch.Tensor, f: int, n_values: list[int] | FactorUNet) -> torch.Tensor:
    """Copy of cond [B, F] with factor f set to its null token ("concept removed")."""
    if isinstance(n_values, FactorUNet):
        n_values = n_values.n_values
    out = cond.clone()
    out[..., f] = n_values[f]
    return out


def flip_factor(cond: torch.Tensor, f: int, n_values: list[int] | FactorUNet) -> list[torch.Tensor]:
    """Copies of cond [F] with factor f set to each of its other values ("concept flipped", as
    the paper's synthetic queries do: red -> blue)."""
    if isinstance(n_values, FactorUNet):
        n_values = n_values.n_values
    out = []
    for v in range(n_values[f]):
        if v != int(cond[f]):
            c = cond.clone()
            c[f] = v
            out.append(c)
    return out


class ConceptJudge(nn.Module):
    """Small CNN with one classification head per factor (judges generated images).

    forward(images [B,3,H,W] in [-1,1]) -> list of F logits tensors [B, n_values[f]].
    """

    def __init__(
        self, n_values: list[int], width: int = 32, factors=None, values=None, image_size: int = 16
    ):
        super().__init__()
        self.config = {
            "kind": "ConceptJudge",
            "n_values": [int(n) for n in n_values],
            "width": int(width),
            "factors": list(factors) if factors else [f"factor{i}" for i in range(len(n_values))],
            "values": values,
            "image_size": int(image_size),
        }
        self.n_values = list(self.config["n_values"])
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()
            )

        self.features = nn.Sequential(
            block(3, w, 1),
            block(w, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 2 * w, 1),
            block(2 * w, 2 * w, 2),
        )
        self.heads = nn.ModuleList(nn.Linear(2 * w, n) for n in self.n_values)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(images).mean(dim=(2, 3))
        return [head(h) for head in self.heads]

    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> int64 [B, F] predicted value index per factor."""
        return self.predict_with_confidence(images, batch_size)[0]

    @torch.no_grad()
    def predict_with_confidence(
        self, images: torch.Tensor, batch_size: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] in [-1,1] -> (int64 [B, F] predicted value per factor, float32 [B, F]
        the softmax probability of that value)."""
        was = self.training
        self.eval()
        preds, confs = [], []
        for chunk in images.split(batch_size):
            best = [lg.softmax(-1).max(-1) for lg in self(chunk.clamp(-1, 1))]
            confs.append(torch.stack([b.values for b in best], -1))
            preds.append(torch.stack([b.indices for b in best], -1))
        self.train(was)
        if not preds:
            f = len(self.n_values)
            return torch.empty(0, f, dtype=torch.int64), torch.empty(0, f)
        return torch.cat(preds), torch.cat(confs)


class MarkJudge(nn.Module):
    """A fully convolutional detector of the uncaptioned mark (data/marks.py): a logit per pixel
    that the pixel lies in a mark's box. Its receptive field (9 x 9) covers the largest glyph and
    no more, so it reads the glyph itself, never where or on what it is drawn.

    forward(images [B,3,H,W] in [-1,1]) -> logits [B, H, W].
    """

    def __init__(self, width: int = 32, image_size: int = 16):
        super().__init__()
        self.config = {"kind": "MarkJudge", "width": int(width), "image_size": int(image_size)}
        w = int(width)
        layers: list[nn.Module] = []
        for cin in (3, w, w, w):
            layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(w, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[:, 0]

    @torch.no_grad()
    def detect(
        self, images: torch.Tensor, threshold: float = 0.5, reach: int = 4
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] in [-1,1] -> (score [B]: the largest per-pixel probability, boxes
        int64 [B, 4]: (x0, y0, x1, y1) around the pixels above `threshold` within `reach` pixels
        of the most probable one; -1 where the score is below `threshold`)."""
        was = self.training
        self.eval()
        prob = torch.sigmoid(self(images.clamp(-1, 1)))
        self.train(was)
        b, h, w = prob.shape
        score, at = prob.flatten(1).max(1)
        boxes = torch.full((b, 4), -1, dtype=torch.int64)
        ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
        for i in (score >= threshold).nonzero().flatten().tolist():
            cy, cx = divmod(int(at[i]), w)
            near = ((ys - cy).abs() <= reach) & ((xs - cx).abs() <= reach)
            on = (prob[i] >= threshold) & near
            rows, cols = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
            boxes[i] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        return score, boxes


_KINDS = {"FactorUNet": FactorUNet, "ConceptJudge": ConceptJudge, "MarkJudge": MarkJudge}


def save_model(
    model: FactorUNet | ConceptJudge | MarkJudge, path: str | os.PathLike, dtype=torch.float32
) -> None:
    """Weights (in `dtype`) + config JSON in one safetensors file; atomic (tmp + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_path(path) as tmp:  # 0644: checkpoints are shared read-only assets
        save_file(
            tensors, str(tmp), metadata={"format": _FORMAT, "config": json.dumps(model.config)}
        )


def _build(config: dict) -> nn.Module:
    config = dict(config)
    kind = config.pop("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    return _KINDS[kind](**config)


def load_model(path: str | os.PathLike, device="cpu") -> FactorUNet | ConceptJudge | MarkJudge:
    """Rebuild the model from the file's config and load its weights as float32; eval mode."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a ctrak model file (format {meta.get('format')!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = _build(json.loads(meta["config"]))
    expected = model.state_dict()
    for k, v in state.items():  # load_state_dict would cast integers into float weights silently
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point():
            raise ValueError(f"{path}: weight {k!r} is {v.dtype}, not a floating-point tensor")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def check_data_matches_model(
    images: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    config: Mapping,
    factors: Sequence[str] | None = None,
    values: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """The images and labels are what the model (its ``config``, e.g. FactorUNet.config) expects.

    Checks image size and channel count, the number of factors, and each label against the
    model's value range (index n_values[f], the null token, stands for a caption that leaves
    factor f out). With names on both sides (a model saved with ``values``), the factors
    must be the model's, in its order, and each value must have the model's index for it: labels
    are indices, and another order would silently condition the model on other values.
    """
    size, channels = config.get("image_size"), config.get("in_channels", 3)
    if images.shape[1] != channels:
        raise InputError(f"images have {images.shape[1]} channel(s), the model expects {channels}")
    if size is not None and tuple(images.shape[2:]) != (size, size):
        h, w = images.shape[2:]
        raise InputError(f"images are {h}x{w} pixels, the model expects {size}x{size}")
    n_values = config.get("n_values")
    if n_values is None:
        return
    if labels.shape[1] != len(n_values):
        raise InputError(f"labels have {labels.shape[1]} factor(s), the model has {len(n_values)}")
    model_factors, model_values = config.get("factors"), config.get("values")
    if model_values and factors is not None and values is not None:
        if list(factors) != list(model_factors):
            raise InputError(
                f"dataset factors {list(factors)} differ from the model's {model_factors}"
            )
        for f in model_factors:
            for i, name in enumerate(values[f]):
                theirs = model_values[f][i] if i < len(model_values[f]) else "<none>"
                if name != theirs:
                    raise InputError(
                        f"dataset value {name!r} of factor {f!r} has index {i}, which is "
                        f"{theirs!r} for the model (labels are indices into the model's values)"
                    )
    for f, n in enumerate(n_values):
        bad = (labels[:, f] < 0) | (labels[:, f] > n)  # index n: the null token, not captioned
        if bad.any():
            name = (model_factors or [f"factor {f}"])[f]
            raise InputError(
                f"labels of {name!r} outside the model's {n} values (and its null token) for "
                "sample id(s) "
                f"{show_ids(ids[bad].tolist())}"
            )
