"""The checkpoint file: what a trained or fitted detector leaves (its state without the frozen pretrained weights,
the backbones' identities, the optimizer's state, the training log, the run's record), written atomically and read
back with clear errors. The one place that knows the format (CHECKPOINT_FORMAT); the engine trains and fits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adkit.core import files
from adkit.core.bf16 import precision_here
from adkit.core.components import Detector
from adkit.core.errors import AdkitError

CHECKPOINT_FORMAT = 1
HISTORY_FILE = "history.csv"  # the training log beside a trained detector's checkpoint


def write_checkpoint(path: Path, detector: Detector, optimizer: Any, scheduler: Any, step: int, total_steps: int,
                     meta: dict[str, Any], history: list[dict[str, float]] | None) -> None:
    """``detector``'s checkpoint at ``step`` of ``total_steps`` (``optimizer`` and ``scheduler`` None for a fitted
    one), written atomically; with ``history`` (a trained detector's log), history.csv beside it, up to this step."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "total_steps": total_steps,
        "model": detector.checkpoint_state(),  # frozen pretrained weights are named, not stored
        "backbones": detector.backbone_identities(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": history or [],
        "meta": meta,
    }
    files.write_torch(path, payload)
    if history is not None:
        files.write_files(path.parent, {HISTORY_FILE: files.history_table(history)})


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint's ``payload`` atomically: a temporary file in the same folder, fsync, then rename over
    ``path``."""
    files.write_torch(path, payload)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdkitError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file raises many kinds; all mean unreadable
        raise AdkitError(f"checkpoint {path} cannot be read ({type(exc).__name__}); is it an adkit checkpoint?") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise AdkitError(f"checkpoint {path} is not an adkit checkpoint of format {CHECKPOINT_FORMAT}")
    return payload


def restore(detector: Detector, payload: dict[str, Any], where: Path | str) -> None:
    """Load a checkpoint's trained or fitted state into ``detector`` (built and set up for the same run); its
    backbones must have the weights the checkpoint was made with."""
    detector.load_checkpoint_state(payload["model"], payload.get("backbones", {}), where=f"checkpoint {where}")
    backbones = list(detector.backbones().values())
    precision_here(backbones)
