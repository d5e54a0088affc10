"""Moved in adkit 0.3: the MVTec and folder layouts live in the datasets plugin, decoded splits in
``adkit.data.loading``. The old names keep working until adkit 0.4, each warning (DeprecationWarning) with the import
to use instead; nothing here is imported until a name is asked for."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# name -> (where it lives now, what a plugin should write instead)
_MOVED = {
    "MVTecDataset": ("adkit_plugins.datasets.layouts", "the dataset registered as 'mvtec' (adkit.plugin.get_catalog())"),
    "FolderDataset": ("adkit_plugins.datasets.layouts", "the dataset registered as 'folder' (adkit.plugin.get_catalog())"),
    "LoadedSplit": ("adkit.data.loading", "adkit.data.loading.LoadedSplit"),
    "load_split": ("adkit.data.loading", "adkit.data.loading.load_split"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'adkit.data.datasets' has no attribute {name!r}")
    module, instead = _MOVED[name]
    warnings.warn(f"adkit.data.datasets.{name} moved in adkit 0.3 and goes in 0.4: use {instead}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)
