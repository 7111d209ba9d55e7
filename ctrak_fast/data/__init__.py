"""Concept datasets: images with one value per factor (shape, colour, ...).

`ConceptDataset` (dataset.py) is the one container every data source returns: synthetic renders
(synthetic.py) or a user's labelled image folder (folder.py).
"""

from .dataset import ConceptDataset, drop_captions
from .folder import load_image_folder
from .synthetic import SyntheticConfig, make_dataset, render

__all__ = [
    "ConceptDataset",
    "drop_captions",
    "SyntheticConfig",
    "make_dataset",
    "render",
    "load_image_folder",
]
