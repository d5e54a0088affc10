"""The dataset contract: a source of categories, each with train / validation / test splits of labelled image
paths. Layouts on disk (MVTec, folders, the synthetic textures) implement it in ``adkit.data``."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import ClassVar

from adkit.core.errors import AdkitError

SHAPE_SAMPLE = 32  # training images whose headers tell a category's typical shape


@dataclass(frozen=True)
class Sample:
    """One image of a split: label 0 normal, 1 anomalous; ``mask`` None for normal images or unknown masks."""

    path: Path
    label: int
    mask: Path | None = None
    defect: str = "good"


@dataclass
class CategorySplits:
    """A category's splits: normal training images, validation images (normal, and defective ones a dataset holds
    out for thresholds), the test split, and ``defects``: labelled defective training images (``train_defects``),
    each with its mask or, for image labels only, ``mask`` None; never in the test split."""

    name: str
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    defects: list[Sample] = field(default_factory=list)


class AnomalyDataset(ABC):
    """A source of categories. Subclasses list their categories and build each one's splits, and declare what
    the core needs to know of them (read by the registry at registration, never by building them)."""

    name = "dataset"
    # the detector preset that suits this data when the user names none ("quick" for small generated images)
    default_preset: ClassVar[str] = ""
    # the dataset that --normal/--abnormal/--masks select: its parameters of those names take the folders
    takes_folders: ClassVar[bool] = False
    # the dataset a run reads when the user names none (--data left out); the built-in synthetic textures
    default_data: ClassVar[bool] = False

    @abstractmethod
    def categories(self) -> list[str]:
        """The categories available (for a root on disk: those present)."""

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Named groups of categories (e.g. ``textures``)."""
        return {}

    def default_categories(self) -> list[str]:
        return self.categories()

    @abstractmethod
    def load(self, category: str) -> CategorySplits:
        """The splits of one category; user errors (missing folders, orphan masks) raise AdkitError."""

    def shape(self, category: str) -> tuple[int, int] | None:
        """The typical (height, width) of the category's training images, or None when unknown: what the default
        input geometry follows (images far from square are tiled at their own aspect). By default the median
        over the headers of up to SHAPE_SAMPLE training images, read without decoding them."""
        train = self.load(category).train
        step = max(1, len(train) // SHAPE_SAMPLE)
        shapes = [s for s in (image_shape(sample.path) for sample in train[::step][:SHAPE_SAMPLE]) if s]
        if not shapes:
            return None
        return int(median(h for h, _ in shapes)), int(median(w for _, w in shapes))

    def resolve_categories(self, requested: list[str]) -> list[str]:
        """Expand groups, check names, keep order without duplicates."""
        if not requested:
            return self.default_categories()
        available = self.categories()
        out: list[str] = []
        for item in requested:
            names = self.groups().get(item, (item,))
            for name in names:
                if name not in available:
                    hint = f"; available: {', '.join(available) or 'none'}"
                    groups = ", ".join(self.groups())
                    raise AdkitError(f"{self.name}: category {name!r} not found{hint}" + (f" (groups: {groups})" if groups else ""))
                if name not in out:
                    out.append(name)
        return out


def split_validation(normal: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of the normal training images (at least one when there are two or more)."""
    if fraction <= 0 or len(normal) < 2:
        return list(normal), []
    order = list(range(len(normal)))
    random.Random(seed).shuffle(order)
    n_val = min(len(normal) - 1, max(1, round(fraction * len(normal))))
    val_idx = set(order[:n_val])
    train = [s for i, s in enumerate(normal) if i not in val_idx]
    val = [s for i, s in enumerate(normal) if i in val_idx]
    return train, val


def image_shape(path: Path) -> tuple[int, int] | None:
    """(height, width) from an image file's header, without decoding it; None for an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    return height, width
