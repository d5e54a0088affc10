"""Datasets, image IO and procedural data (Perlin noise, synthetic textures)."""

from adkit.data.datasets import AnomalyDataset, CategorySplits, LoadedSplit, Sample, load_split

__all__ = ["AnomalyDataset", "CategorySplits", "LoadedSplit", "Sample", "load_split"]
