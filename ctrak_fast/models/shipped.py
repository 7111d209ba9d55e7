"""The checkpoints shipped in the package (ctrak_fast/assets): the tiny FactorUNet, its judge and
the synthetic data set they were trained on (regenerated bit-identically from its config)."""

from __future__ import annotations

from pathlib import Path

from ctrak_fast.data import ConceptDataset, SyntheticConfig, make_dataset

from .factor_unet import FactorUNet, load_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = "shapes16"


def shipped(name: str = SHIPPED, assets: Path = ASSETS):
    """(model, judge, SyntheticConfig) shipped in the package; a clear error if missing."""
    paths = {
        "unet": assets / f"unet_{name}.safetensors",
        "judge": assets / f"judge_{name}.safetensors",
        "config": assets / f"{name}.json",
    }
    for what, p in paths.items():
        if not p.exists():
            raise FileNotFoundError(
                f"shipped {what} checkpoint missing: {p} (run `ctrak train` to make it)"
            )
    return (
        load_model(paths["unet"]),
        load_model(paths["judge"]),
        SyntheticConfig.load_json(paths["config"]),
    )


def shipped_model() -> FactorUNet:
    """The tiny FactorUNet shipped in the package (16x16 shapes x colours; ~1.1M parameters).

    Returns:
        FactorUNet in eval mode, float32 on the CPU: eps(x_t [B,3,16,16], t [B] int64,
        cond [B,2] int64) -> [B,3,16,16]; factors ("shape", "colour").

    Examples:
        >>> model = shipped_model()
        >>> model.config["factors"], model.n_values
        (['shape', 'colour'], [4, 4])
    """
    model = load_model(ASSETS / f"unet_{SHIPPED}.safetensors")
    if not isinstance(model, FactorUNet):
        raise TypeError(f"shipped checkpoint holds a {type(model).__name__}, not a FactorUNet")
    return model


def shipped_dataset(per_combo: int | None = None) -> ConceptDataset:
    """The shipped model's training set (synthetic, regenerated bit-identically from its config).

    Args:
        per_combo: keep the first `per_combo` images of every (shape, colour) combination
            (None: all 250 of each).

    Returns:
        ConceptDataset: images float32 [N,3,16,16] in [-1,1], labels int64 [N,2], ids int64 [N].

    Examples:
        >>> data = shipped_dataset(per_combo=2)
        >>> data.images.shape, data.labels.dtype, data.factors
        (torch.Size([28, 3, 16, 16]), torch.int64, ['shape', 'colour'])
    """
    data = make_dataset(SyntheticConfig.load_json(ASSETS / f"{SHIPPED}.json"))
    return data if per_combo is None else data.train_subset(per_combo)
