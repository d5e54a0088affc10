"""The narrow door through which a detector builds other components (DetectorContext.build). Light on purpose:
the catalog hands one out before any component module, or torch, is imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ComponentBuilder:
    """What a detector may build: a registered component of a kind from its spec, ``build("loss", "ssim")``, and
    the parsed spec itself, ``build.parse("loss", "ssim:weight=2")`` (its canonical text and extras such as a
    loss's weight). Narrower than the catalogue on purpose: no listing, no plugins, no datasets."""

    def __init__(self, registries: Mapping[str, Any]):
        self._registries = registries

    def __call__(self, kind: str, spec: Any) -> Any:
        return self._registries[kind].create(spec)

    def parse(self, kind: str, spec: Any) -> Any:
        return self._registries[kind].parse(spec)
