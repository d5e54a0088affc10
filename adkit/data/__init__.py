"""Splits decoded into tensors, image IO, geometry and procedural data (Perlin noise, the synthetic textures); the
dataset layouts themselves live in the datasets plugin."""

from adkit.core.datasets import AnomalyDataset, CategorySplits, Sample
from adkit.data.loading import LoadedSplit, load_split

__all__ = ["AnomalyDataset", "CategorySplits", "LoadedSplit", "Sample", "load_split"]
