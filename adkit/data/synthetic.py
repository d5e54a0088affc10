"""Moved in adkit 0.3: the synthetic textures' generator is ``adkit.data.textures`` (``write_dataset`` is
``write_textures``, ``FORMAT_VERSION`` is ``TEXTURES_FORMAT``; adkit.plugin exports them) and the dataset lives in
the datasets plugin. The old names keep working until adkit 0.4, each warning (DeprecationWarning) with the name to
use instead."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_RENAMED = {"write_dataset": "write_textures", "FORMAT_VERSION": "TEXTURES_FORMAT"}


def __getattr__(name: str) -> Any:
    if name == "SyntheticDataset":
        module, new, instead = ("adkit_plugins.datasets.synthetic", name,
                                "the dataset registered as 'synthetic' (adkit.plugin.get_catalog())")
    else:
        module, new = "adkit.data.textures", _RENAMED.get(name, name)
        instead = f"adkit.plugin.{new}"
    value = getattr(importlib.import_module(module), new, None)
    if value is None:
        raise AttributeError(f"module 'adkit.data.synthetic' has no attribute {name!r}")
    warnings.warn(f"adkit.data.synthetic.{name} moved in adkit 0.3 and goes in 0.4: use {instead}",
                  DeprecationWarning, stacklevel=2)
    return value
