"""The synthetic textures as a dataset: generated on first use into adkit's cache (adkit.data.textures), then read
as the MVTec AD layout. The dataset a run uses when the user names none (``default_data``)."""

from __future__ import annotations

from pathlib import Path

from adkit.plugin import TEXTURES, TEXTURES_FORMAT, AdkitError, CategorySplits, cache_root, write_textures
from adkit_plugins.datasets.layouts import MVTecDataset


class SyntheticDataset(MVTecDataset):
    """The built-in synthetic textures: generated on first use into the cache, then read as MVTec AD."""

    name = "synthetic"
    default_data = True  # what a run reads when --data is left out: no download, exact masks
    default_preset = "quick"  # 256 px generated textures, 80 training images: the quick presets' budget

    def __init__(self, size: int = 256, n_train: int = 80, n_test: int = 60, seed: int = 0,
                 val_fraction: float = 0.1, root: str = "", val_defects: float = 0.0, object: float = 0.0,
                 train_defects: int = 0, train_masks: bool = True):
        if not 0 <= object < 1:
            raise AdkitError(f"synthetic: object={object} is the object's side as a fraction of the image's, in (0, 1) "
                             "(0: the texture fills the image)")
        self.size, self.n_train, self.n_test, self.data_seed = size, n_train, n_test, seed
        self.object = object
        shape = f"-object{object:g}" if object else ""
        folder = Path(root) if root else \
            cache_root() / "synthetic" / f"v{TEXTURES_FORMAT}-s{seed}-{size}px-{n_train}-{n_test}{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder
        super().__init__(root=str(folder), val_fraction=val_fraction, seed=seed, val_defects=val_defects,
                         train_defects=train_defects, train_masks=train_masks)

    def categories(self) -> list[str]:
        return list(TEXTURES)

    def groups(self) -> dict[str, tuple[str, ...]]:
        return {"textures": TEXTURES, "all": TEXTURES}

    def resolve_categories(self, requested: list[str]) -> list[str]:
        return super(MVTecDataset, self).resolve_categories(requested)

    def shape(self, category: str) -> tuple[int, int]:
        return self.size, self.size  # square by construction: nothing is generated to find it out

    def load(self, category: str) -> CategorySplits:
        write_textures(self._folder, [category], self.size, self.data_seed, self.n_train, self.n_test, self.object)
        return super().load(category)
