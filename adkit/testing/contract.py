"""What every check of adkit.testing shares: the error a broken contract raises, and the checks of a map."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adkit.core.plugins import Catalog, get_catalog


class ContractError(AssertionError):
    """A component breaks the contract of its kind (docs/plugins.md)."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ContractError(message)


def _catalog(catalog: Catalog | None) -> Catalog:
    return catalog if catalog is not None else get_catalog()


def _check_map(anomaly_map: Any, batch: int, who: str) -> None:
    _expect(isinstance(anomaly_map, Tensor), f"{who} must return a tensor, got {type(anomaly_map).__name__}")
    _expect(anomaly_map.ndim == 4 and anomaly_map.shape[:2] == (batch, 1),
            f"{who} must return an anomaly map (B={batch}, 1, h, w), got {tuple(anomaly_map.shape)}")
    _expect(anomaly_map.is_floating_point(), f"{who} must return floats, got {anomaly_map.dtype}")
    _expect(bool(torch.isfinite(anomaly_map).all()), f"{who} returned non-finite values")
