"""Dataset layouts: MVTec AD (and anything in its layout) and a user's own folders.

A dataset yields, per category, a train split (normal images), a validation split (normal images held out from
training, for thresholds and ensemble normalisation; never test images) and a labelled test split. With
``val_defects`` an MVTec-layout dataset also moves that fraction of each defect type's test images into the
validation split (and out of the test split), for thresholds that need defective examples (``--threshold f1``).
"""

from __future__ import annotations

import random
from pathlib import Path

from adkit.plugin import AdkitError, AnomalyDataset, CategorySplits, Sample, list_images, split_validation

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                 "transistor", "zipper")
MVTEC_CATEGORIES = MVTEC_TEXTURES + MVTEC_OBJECTS
MVTEC_GROUPS = {"textures": MVTEC_TEXTURES, "objects": MVTEC_OBJECTS, "all": MVTEC_CATEGORIES}


class MVTecDataset(AnomalyDataset):
    """``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``."""

    name = "mvtec"

    def __init__(self, root: str = "", val_fraction: float = 0.1, seed: int = 0, val_defects: float = 0.0,
                 train_defects: int = 0, train_masks: bool = True):
        if not root:
            raise AdkitError("mvtec: give the dataset folder with --root DIR (it holds one folder per category)")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise AdkitError(f"mvtec: --root {self.root} is not a folder")
        if not 0 <= val_defects < 1:
            raise AdkitError(f"{self.name}: val_defects={val_defects} must be in [0, 1): the fraction of each defect "
                             "type's test images held out for validation")
        if train_defects < 0:
            raise AdkitError(f"{self.name}: train_defects={train_defects} must be >= 0: the defective test images "
                             "moved into training")
        self.val_fraction = val_fraction
        self.seed = seed
        self.val_defects = val_defects
        # labelled defects for detectors that learn from them: this many defective test images, spread over the
        # defect types, move into training (with their masks, or with train_masks=false their labels only)
        self.train_defects, self.train_masks = train_defects, train_masks

    def categories(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "train" / "good").is_dir())

    def groups(self) -> dict[str, tuple[str, ...]]:
        return dict(MVTEC_GROUPS)

    def resolve_categories(self, requested: list[str]) -> list[str]:
        available = set(self.categories())
        expanded: list[str] = []
        for item in requested:
            if item in MVTEC_GROUPS:
                present = [c for c in MVTEC_GROUPS[item] if c in available]
                if not present:
                    raise AdkitError(f"mvtec: none of the {item} categories is under {self.root}")
                expanded += present
            else:
                expanded.append(item)
        for name in expanded:
            if name not in available:
                raise AdkitError(f"mvtec: category folder {self.root / name / 'train' / 'good'} does not exist")
        return super().resolve_categories(expanded) if expanded else self.default_categories()

    def load(self, category: str) -> CategorySplits:
        base = self.root / category
        good = base / "train" / "good"
        if not good.is_dir():
            raise AdkitError(f"mvtec: category folder {good} does not exist")
        normal = [Sample(p, 0) for p in list_images(good)]
        if not normal:
            raise AdkitError(f"mvtec: {good} holds no images (png, jpg, bmp, tif)")
        test_dir, gt_dir = base / "test", base / "ground_truth"
        if not test_dir.is_dir():
            raise AdkitError(f"mvtec: test folder {test_dir} does not exist")
        test: list[Sample] = []
        used_masks: set[Path] = set()
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image in list_images(defect_dir):
                if defect == "good":
                    test.append(Sample(image, 0))
                    continue
                mask = _find_mask(gt_dir / defect, image.stem)
                if mask is None:
                    raise AdkitError(f"mvtec: test image {image} has no mask {gt_dir / defect / (image.stem + '_mask.png')}")
                used_masks.add(mask)
                test.append(Sample(image, 1, mask, defect))
        if gt_dir.is_dir():
            for defect_dir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
                for mask in list_images(defect_dir):
                    if mask not in used_masks:
                        raise AdkitError(f"mvtec: orphan mask {mask} has no test image in {test_dir / defect_dir.name}")
        if not test:
            raise AdkitError(f"mvtec: {test_dir} holds no test images")
        train, val = split_validation(normal, self.val_fraction, self.seed)
        test, defects = take_defects(test, self.train_defects, self.seed, f"{self.name} {category}")
        if not self.train_masks:
            defects = [Sample(s.path, 1, None, s.defect) for s in defects]
        test, val_defective = hold_out_defects(test, self.val_defects, self.seed)
        return CategorySplits(category, train, val + val_defective, test, defects)


def spread_over_types(defective: list[Sample], count: int, seed: int) -> set[Path]:
    """The paths of ``count`` of the defective images, spread evenly over the defect types (a systematic sample of
    the images sorted by type, shuffled within each with ``seed``)."""
    rng = random.Random(seed)
    ordered = sorted(defective, key=lambda s: (s.defect, rng.random()))
    return {ordered[int((j + 0.5) * len(ordered) / count)].path for j in range(count)}


def take_defects(test: list[Sample], count: int, seed: int, where: str) -> tuple[list[Sample], list[Sample]]:
    """Move ``count`` defective test images into training (labelled defects), spread over the defect types; at
    least one defective image must stay in the test split. Returns (test, defects)."""
    if count <= 0:
        return test, []
    defective = [s for s in test if s.label == 1]
    if count >= len(defective):
        raise AdkitError(f"{where}: train_defects={count}, but the test split holds {len(defective)} defective "
                         f"images and at least one must stay there to test on: give train_defects <= "
                         f"{max(0, len(defective) - 1)}")
    taken = spread_over_types(defective, count, derived(seed, "train-defects"))
    return [s for s in test if s.path not in taken], [s for s in test if s.path in taken]


def derived(seed: int, purpose: str) -> int:
    """A seed of its own for each purpose, so that moving defects into training does not change which ones
    validation holds out at the same seed (an integer from the pair)."""
    return seed * 1000003 + sum(ord(c) for c in purpose)


def hold_out_defects(test: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Move ``fraction`` of the defective test images (at least one, never all) into a labelled validation set,
    spread evenly over the defect types (a systematic sample of the images sorted by type, shuffled within each);
    returns (test, held out)."""
    defective = [s for s in test if s.label == 1]
    if fraction <= 0 or len(defective) < 2:
        return test, []
    count = min(len(defective) - 1, max(1, round(fraction * len(defective))))
    held = spread_over_types(defective, count, seed)
    return [s for s in test if s.path not in held], [s for s in test if s.path in held]


def _find_mask(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".PNG", ".bmp", ".tif", ".tiff", ".jpg"):
        for name in (f"{stem}_mask{suffix}", f"{stem}{suffix}"):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


class FolderDataset(AnomalyDataset):
    """A user's own images: a folder of normal images, optional folders of anomalous images and their masks."""

    name = "folder"
    takes_folders = True

    def __init__(self, normal: str = "", abnormal: str = "", masks: str = "", test_fraction: float = 0.2,
                 val_fraction: float = 0.1, seed: int = 0, name: str = "", train_defects: str = "",
                 train_masks: str = ""):
        if not normal:
            raise AdkitError("folder: give the normal images with --data folder:normal=DIR[,abnormal=DIR,masks=DIR]")
        self.normal = Path(normal).expanduser()
        self.abnormal = Path(abnormal).expanduser() if abnormal else None
        self.masks = Path(masks).expanduser() if masks else None
        for label, folder in (("normal", self.normal), ("abnormal", self.abnormal), ("masks", self.masks)):
            if folder is not None and not folder.is_dir():
                raise AdkitError(f"folder: {label}={folder} is not a folder")
        if self.masks is not None and self.abnormal is None:
            raise AdkitError("folder: masks= needs abnormal= (the masks belong to the anomalous images)")
        # labelled defective images for training (never tested on), with their masks in train_masks= if given
        self.train_defects = Path(train_defects).expanduser() if train_defects else None
        self.train_masks = Path(train_masks).expanduser() if train_masks else None
        for label, folder in (("train_defects", self.train_defects), ("train_masks", self.train_masks)):
            if folder is not None and not folder.is_dir():
                raise AdkitError(f"folder: {label}={folder} is not a folder")
        if self.train_masks is not None and self.train_defects is None:
            raise AdkitError("folder: train_masks= needs train_defects= (the masks belong to those images)")
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        self.seed = seed
        # the category's name in results: the user's, else the folder the normal images' folder sits in
        # (data/elpv/normal -> elpv), which names the product where the normal folder's own name names a label
        self.category = name or self.normal.resolve().parent.name or self.normal.resolve().name or "images"
        if "/" in self.category or self.category in (".", ".."):
            raise AdkitError(f"folder: name={self.category} must be a plain name (it names the results' folder)")

    def categories(self) -> list[str]:
        return [self.category]

    def load(self, category: str) -> CategorySplits:
        normal = [Sample(p, 0) for p in list_images(self.normal)]
        if len(normal) < 2:
            raise AdkitError(f"folder: {self.normal} needs at least two normal images")
        abnormal: list[Sample] = []
        if self.abnormal is not None:
            for image in list_images(self.abnormal):
                mask = _find_mask(self.masks, image.stem) if self.masks is not None else None
                if self.masks is not None and mask is None:
                    raise AdkitError(f"folder: anomalous image {image} has no mask in {self.masks}")
                abnormal.append(Sample(image, 1, mask, "anomaly"))
        # Normal test images are held out only when there is something to compare them with.
        test_normal: list[Sample] = []
        if abnormal:
            rest, test_normal = split_validation(normal, self.test_fraction, self.seed + 1)
            normal = rest
        train, val = split_validation(normal, self.val_fraction, self.seed)
        defects = []
        if self.train_defects is not None:
            for image in list_images(self.train_defects):
                mask = _find_mask(self.train_masks, image.stem) if self.train_masks is not None else None
                if self.train_masks is not None and mask is None:
                    raise AdkitError(f"folder: training defect {image} has no mask in {self.train_masks} (masks were "
                                     "asked for with train_masks=; drop it for image labels only)")
                defects.append(Sample(image, 1, mask, "labelled"))
            if not defects:
                raise AdkitError(f"folder: train_defects={self.train_defects} holds no images")
        return CategorySplits(category, train, val, test_normal + abnormal, defects)
