"""The checkpoint file: what a trained or fitted detector leaves (its state without the frozen pretrained weights,
the backbones' identities, the optimizer's state, the training log, the run's record), written atomically and read
back with clear errors, and restored into a detector whose backbones are the ones it was made with. The one place
that knows the format (CHECKPOINT_FORMAT); the engine trains and fits. ``backbones`` is a detector's frozen
backbones by attribute path (``Detector.backbones()``), whose tensors a checkpoint names and never stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adkit.core import files
from adkit.core.backbone import Backbone
from adkit.core.bf16 import precision_here
from adkit.core.errors import AdkitError

CHECKPOINT_FORMAT = 1
HISTORY_FILE = "history.csv"  # the training log beside a trained detector's checkpoint


def frozen_state(detector: nn.Module, backbones: dict[str, Backbone]) -> dict[str, Tensor]:
    """The detector's state dict without its frozen backbones' tensors, on the CPU."""
    frozen = tuple(name + "." for name in backbones)
    return {k: v.detach().cpu() for k, v in detector.state_dict().items() if not k.startswith(frozen)}


def identities(backbones: dict[str, Backbone]) -> dict[str, dict[str, Any]]:
    """Per backbone: the spec it was built from and the digest of its weights, and the precision its forward pass
    runs at with what the check measured."""
    return {name: {"spec": b.spec, "sha256": b.digest(), "precision": b.precision,
                   **({"precision_check": b.precision_check} if b.precision_check else {})}
            for name, b in backbones.items()}


def load_state(detector: nn.Module, backbones: dict[str, Backbone], state: dict[str, Tensor],
               saved: dict[str, dict[str, Any]], where: str = "checkpoint") -> None:
    """Load ``frozen_state`` output into ``detector`` after checking that its ``backbones`` are the ones the state
    was fitted with (same weights digest, ``saved`` being their ``identities`` then); anything else missing or
    unexpected is an error. The backbones take the precision their check chose (float32 before adkit 0.4)."""
    mine = identities(backbones)
    for name, identity in saved.items():
        current = mine.get(name)
        if current is None or current["sha256"] != identity["sha256"]:
            now = f"{current['spec']} (sha256 {current['sha256'][:12]})" if current else "no backbone"
            raise AdkitError(f"{where} was fitted with backbone {identity['spec']} (sha256 {identity['sha256'][:12]}), "
                             f"but this run builds {now}: use the same weights (--backbone); a checkpoint "
                             "fitted before adkit fed EfficientNet-Lite its own input scale must be fitted again")
    for name, backbone in backbones.items():
        backbone.precision = saved.get(name, {}).get("precision", "fp32")
        backbone.precision_check = saved.get(name, {}).get("precision_check")
    frozen = tuple(name + "." for name in mine)
    missing, unexpected = detector.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(frozen)]
    if missing or unexpected:
        raise AdkitError(f"{where} does not fit this detector: missing {missing[:3]}, unexpected {unexpected[:3]}")


def write_checkpoint(path: Path, detector: nn.Module, backbones: dict[str, Backbone], optimizer: Any, scheduler: Any,
                     step: int, total_steps: int, meta: dict[str, Any], history: list[dict[str, float]] | None) -> None:
    """``detector``'s checkpoint at ``step`` of ``total_steps`` (``optimizer`` and ``scheduler`` None for a fitted
    one), written atomically; with ``history`` (a trained detector's log), history.csv beside it, up to this step."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "total_steps": total_steps,
        "model": frozen_state(detector, backbones),  # frozen pretrained weights are named, not stored
        "backbones": identities(backbones),
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


def restore(detector: nn.Module, payload: dict[str, Any], where: Path | str,
            backbones: dict[str, Backbone] | None = None) -> None:
    """Load a checkpoint's trained or fitted state into ``detector`` (built and set up for the same run); its
    backbones (``detector.backbones()`` unless given) must have the weights the checkpoint was made with."""
    backbones = detector.backbones() if backbones is None else backbones
    load_state(detector, backbones, payload["model"], payload.get("backbones", {}), where=f"checkpoint {where}")
    precision_here(list(backbones.values()))
