"""The checkpoints shipped in the package (ctrak_fast/assets): the tiny FactorUNet, its judge and
the synthetic data set they were trained on (regenerated bit-identically from its config)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ctrak_fast.data import ConceptDataset, SyntheticConfig, load_image_folder, make_dataset
from ctrak_fast.data.dataset import images_tensor
from ctrak_fast.data.marks import stamp_marks
from ctrak_fast.engine.atomic import atomic_write_text

from .factor_unet import FactorUNet, load_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = "shapes16"  # the demo's: 2 held-out combinations
# `bench quality`'s: the same grid with 4 held-out combinations, a Latin square over 4 x 4
FULL_SIZE = "shapes16lat"
# `bench partial`'s: the demo's grid trained with half of each factor's captions left out
PARTIAL = "shapes16partial"
# `bench mark`'s: the demo's grid with an uncaptioned mark stamped on 15% of the images
MARKED = "shapes16mark"
# `bench counterfactual`'s ground truth: a setting small enough to retrain 100 times on 2 cores
COUNTERFACTUAL = ASSETS / "counterfactual" / "shapes9"


@dataclass(frozen=True)
class FolderData:
    """Where a model trained by `ctrak train --folder` got its data: the <name>.json beside it
    (a SyntheticConfig's JSON plays the same part for synthetic data)."""

    folder: str
    labels: str
    image_size: int
    # an uncaptioned mark stamped on this fraction of the images (data/marks.py), from mark_seed
    mark_fraction: float = 0.0
    mark_seed: int = 0

    def to_dict(self) -> dict:
        d = {"kind": "folder", **asdict(self)}
        if not self.mark_fraction:  # files without a mark stay as they were written
            del d["mark_fraction"], d["mark_seed"]
        return d

    def save_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def dataset(self, model: FactorUNet | None = None) -> ConceptDataset:
        """The folder as a ConceptDataset, indexed by `model`'s values when given."""
        names: dict[str, Any] = {}
        if model is not None and model.config.get("values"):
            names = {"factors": model.config["factors"], "values": model.config["values"]}
        data = load_image_folder(self.folder, self.labels, image_size=self.image_size, **names)
        if not self.mark_fraction:
            return data
        clean = images_tensor(data.images)
        images, _, marks = stamp_marks(clean, self.mark_fraction, self.mark_seed)
        return replace(data, images=images, marks=marks)


def load_data_spec(path: str | Path) -> SyntheticConfig | FolderData:
    """The data description of <name>.json: a FolderData or a SyntheticConfig."""
    d = json.loads(Path(path).read_text())
    if isinstance(d, dict) and d.get("kind") == "folder":
        mark = {
            "mark_fraction": float(d.get("mark_fraction", 0.0)),
            "mark_seed": int(d.get("mark_seed", 0)),
        }
        return FolderData(str(d["folder"]), str(d["labels"]), int(d["image_size"]), **mark)
    return SyntheticConfig.load_json(path)


def asset_dataset(spec: SyntheticConfig | FolderData, model=None) -> ConceptDataset:
    """The training set a data description names (synthetic: regenerated bit for bit)."""
    return spec.dataset(model) if isinstance(spec, FolderData) else make_dataset(spec)


def shipped(name: str = SHIPPED, assets: Path = ASSETS):
    """(model, judge, data description: SyntheticConfig or FolderData) of `name` in `assets`
    (default: the checkpoints shipped in the package); a clear error if one is missing."""
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
        load_data_spec(paths["config"]),
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
