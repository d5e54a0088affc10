"""Datasets, image IO and procedural data (Perlin noise, synthetic textures)."""

from adkit.core.datasets import AnomalyDataset, CategorySplits, Sample
from adkit.data.datasets import LoadedSplit, load_split

__all__ = ["AnomalyDataset", "CategorySplits", "LoadedSplit", "Sample", "load_split"]
