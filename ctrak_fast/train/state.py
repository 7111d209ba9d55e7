"""A diffusion training run's resumable state, as one safetensors file (no pickle).

What train_diffusion needs to continue a killed run exactly where its last checkpoint left it:
the model's and the EMA's tensors, AdamW's moments, the data order (permutation and position),
the random generator's state, and the step, elapsed seconds and running loss. A `run` key (the
settings that must not change: data size, steps, batch, lr, seed, ...) is stored too; a state
written by other settings is refused rather than silently mixed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctrak_fast.engine.atomic import atomic_path


def save_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ema_params: list[torch.Tensor],
    generator: torch.Generator,
    perm: torch.Tensor,
    scalars: dict,
    run: dict,
) -> None:
    """Write the state atomically (a killed save leaves the previous state)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{i}": p.detach().contiguous() for i, p in enumerate(ema_params)})
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().contiguous()
    tensors["rng"] = generator.get_state()
    tensors["perm"] = perm.contiguous()
    meta = {"scalars": json.dumps(scalars), "run": json.dumps(run, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ema_params: list[torch.Tensor],
    generator: torch.Generator,
    run: dict,
) -> tuple[torch.Tensor, dict]:
    """Restore a state written by save_state into the given objects; returns (perm, scalars).

    Raises:
        ValueError: the state was written by a run with other settings (names the first one).
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        stored = json.loads(meta.get("run", "{}"))
        want = json.loads(json.dumps(run, sort_keys=True))
        diff = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
        if diff:
            key = diff[0]
            raise ValueError(
                f"{path}: a training state of another run ({key}: {stored.get(key)!r} there, "
                f"{want.get(key)!r} now); delete it to start afresh"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    with torch.no_grad():
        for i, p in enumerate(ema_params):
            p.copy_(tensors[f"ema.{i}"])
    for i, p in enumerate(opt.param_groups[0]["params"]):
        prefix = f"opt.{i}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            opt.state[p] = state
    generator.set_state(tensors["rng"])
    return tensors["perm"], json.loads(meta["scalars"])


__all__ = ["load_state", "save_state"]
