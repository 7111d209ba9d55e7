"""Parameter layout of per-sample gradients: blocks `[(global_offset, Tensor[B, n]), ...]`.

global_offset is a parameter's first row in the *full* model's flattened parameter vector, so a
parameter subset is projected with exactly the rows a full projection would use for it, and
parameters outside the filter cost nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

Blocks = list[tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class ParamSlot:
    name: str
    offset: int  # first row in the full flattened parameter vector
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


CONDITION_PATH = "@condition"
"""param_filter value meaning: the modules through which the condition enters the model, as the
model declares them in its `condition_param_filter` attribute (FactorUNet: the factor embeddings
and every resnet's time-embedding projection, which adds the summed condition embedding; a
text-to-image UNet: the cross-attention layers, attn2)."""


def resolve_param_filter(model: nn.Module, param_filter: str | None) -> str | None:
    """The regex a filter stands for on `model` (CONDITION_PATH -> the model's declaration)."""
    if param_filter != CONDITION_PATH:
        return param_filter
    declared = getattr(model, "condition_param_filter", None)
    if not isinstance(declared, str):
        raise ValueError(
            f"{type(model).__name__} declares no condition_param_filter: give the modules that "
            "read the condition as a --param-filter regex"
        )
    return declared


def parameter_layout(model: nn.Module, param_filter: str | None = None) -> list[ParamSlot]:
    """Slots of the parameters whose name matches the regex `param_filter` (all when None).

    Offsets follow `model.named_parameters()` order over *all* parameters, so they do not depend on
    the filter. Raises ValueError when the filter matches nothing.
    """
    param_filter = resolve_param_filter(model, param_filter)
    pattern = re.compile(param_filter) if param_filter else None
    slots, offset = [], 0
    for name, p in model.named_parameters():
        if pattern is None or pattern.search(name):
            slots.append(ParamSlot(name, offset, tuple(p.shape)))
        offset += p.numel()
    if not slots:
        raise ValueError(f"parameter filter {param_filter!r} matches no parameter of the model")
    return slots


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks_sq_norm(blocks: Blocks) -> torch.Tensor:
    """Exact per-sample squared L2 norm over all blocks: [B] float32."""
    return sum(b.float().pow(2).sum(1) for _, b in blocks)


def scale_blocks_(blocks: Blocks, scale: torch.Tensor) -> Blocks:
    """Multiply each sample's gradient by scale[b] (scale [B]) in place; returns blocks."""
    for _, b in blocks:
        b.mul_(scale[:, None].to(b.dtype))
    return blocks


def add_blocks(acc: Blocks | None, blocks: Blocks) -> Blocks:
    if acc is None:
        return [(off, b.clone()) for off, b in blocks]
    for (off_a, a), (off_b, b) in zip(acc, blocks, strict=True):
        assert off_a == off_b
        a.add_(b)
    return acc


def flatten_blocks(blocks: Blocks) -> torch.Tensor:
    """[B, p_selected] in block order (for tests and small models)."""
    return torch.cat([b for _, b in blocks], 1)
