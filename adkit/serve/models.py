"""The models a service serves: every folder under MODELS_DIR holding an export (model.json) or a checkpoint
(checkpoint.pt), named by the folder. The folder is scanned again and again: a model that appears is loaded, one
whose files changed is loaded anew and swapped in (requests already queued finish on the old one), one that is
removed is dropped."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adkit.core.plugins import get_catalog
from adkit.data.geometry import Geometry

# a model folder: a product's name, with ``@N`` for its version N (the plain name is version 1)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(@[0-9]{1,6})?$")


def watched() -> tuple[str, ...]:
    """The files a model folder's loading depends on: model.json and each registered export format's file, or a
    checkpoint and its threshold record."""
    formats = [getattr(info.factory, "file", "") for info in get_catalog()["exporter"]]
    return ("model.json", *sorted({f for f in formats if f}), "checkpoint.pt", "threshold.json")


def valid_name(name: str) -> bool:
    """A model name that is a plain folder name: letters, digits, '_', '.', '-' and a version ``@N``, not '..' (no
    path can escape)."""
    return bool(NAME.match(name)) and ".." not in name


def split_version(name: str) -> tuple[str, int]:
    """A model folder's product and version: ``tiles`` -> (tiles, 1), ``tiles@3`` -> (tiles, 3)."""
    product, at, number = name.rpartition("@")
    return (product, int(number)) if at and number.isdigit() else (name, 1)


def resolve(models: dict[str, ServedModel], name: str) -> ServedModel | None:
    """The model a request names: ``tiles@3`` that version, ``tiles`` the product's current one (its highest
    version present); None when there is none."""
    product, version = split_version(name)
    versions = {split_version(m.name)[1]: m for m in models.values() if split_version(m.name)[0] == product}
    if "@" in name:
        return versions.get(version)
    return versions[max(versions)] if versions else None


def signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What a model folder's loading depends on: its watched files' names, sizes and modification times."""
    out = []
    for name in watched():
        path = folder / name
        if path.is_file():
            stat = path.stat()
            out.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


@dataclass
class ServedModel:
    """A loaded model: its runner (images, threshold -> maps, scores, decisions), input geometry, recorded
    decision and card."""

    name: str
    runner: Any
    geometry: Geometry
    decision: dict[str, Any] | None
    card: dict[str, Any]
    sha256: str
    signature: tuple = ()
    batcher: Any = field(default=None, repr=False)

    def public_card(self, current: bool = True) -> dict[str, Any]:
        fit = (self.decision or {}).get("fit") or {}
        product, version = split_version(self.name)
        return {"name": self.name, "product": product, "version": version, "current": current,
                "sha256": self.sha256, "format": self.card.get("format"),
                "detector": self.card.get("detector"), "category": self.card.get("category"),
                "input": {"width": self.geometry.width, "height": self.geometry.height,
                          "resize": self.geometry.resize, "tile": self.geometry.tile},
                "threshold": None if self.decision is None else self.decision["threshold"],
                "threshold_policy": None if self.decision is None else self.decision.get("policy"),
                "validation": {k: fit.get(k) for k in ("n_normal", "val_false_alarms", "val_fpr_upper")},
                "approximations": self.card.get("approximations", {}), "lineage": self.card.get("lineage", []),
                "notes": self.card.get("notes", [])}


def load_model(folder: Path) -> ServedModel:
    """Load one model folder (AdkitError, one line, when it cannot be): an export or a checkpoint, opened as
    predict and export open them (adkit.deploy.models)."""
    from adkit.deploy.models import open_model

    sig = signature(folder)
    opened = open_model(folder)
    return warmed(ServedModel(folder.name, opened.runner, opened.geometry, opened.decision, opened.card,
                              opened.sha256, sig))


WARM_UP_ROUNDS = 2


def warmed(model: ServedModel) -> ServedModel:
    """The model after scoring a blank image WARM_UP_ROUNDS times, before it serves: a first call allocates
    (onnxruntime's arenas, torch's caches) and took 2-3x a steady call (twice for PatchCore), so without this the
    line's first parts after a model (re)loads wait for it."""
    blank = torch.zeros(1, 3, model.geometry.height, model.geometry.width)
    for _ in range(WARM_UP_ROUNDS):
        model.runner(blank, None)
    return model


def scan(root: Path) -> dict[str, Path]:
    """Model folders under ``root`` by name."""
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if valid_name(folder.name) and ((folder / "model.json").is_file() or (folder / "checkpoint.pt").is_file()):
            found[folder.name] = folder
    return found
