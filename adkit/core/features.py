"""Helpers for detectors on pretrained features: building a backbone from a spec, aligning stages on one grid,
pooling channels to a fixed length, and checked weight loading. No method is named here; PatchCore and PaDiM (and
third-party detectors) compose these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adkit.core.components import Backbone, DetectorContext
from adkit.core.errors import AdkitError


def build_backbone(context: DetectorContext, spec: str) -> Backbone:
    """The backbone a detector asks for: ``--backbone`` (context.backbone) wins over the detector's own
    ``backbone=`` parameter ``spec``; the result is frozen, on the run's device, and remembers its spec (the
    registry has checked that it is a Backbone)."""
    parsed = context.build.parse("backbone", context.backbone or spec)
    backbone = context.build("backbone", parsed)
    backbone.spec = str(parsed)
    backbone.freeze()
    return backbone.to(context.device)


def check_layers(layers: Sequence[int], who: str) -> tuple[int, ...]:
    """Stage indices as a sorted tuple without duplicates; a user error otherwise."""
    stages = tuple(layers)
    if not stages or list(stages) != sorted(set(stages)):
        raise ValueError(f"{who} layers must be increasing stage indices such as 2+3, got {'+'.join(map(str, stages))}")
    return stages


def align_stages(features: list[Tensor], mode: Literal["bilinear", "nearest"] = "bilinear") -> list[Tensor]:
    """Resize every stage (B, C_i, h_i, w_i) to the first (shallowest) stage's grid: (B, C_i, h_0, w_0)."""
    size = features[0].shape[-2:]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode=mode, **kwargs) for f in features]


def pool_channels(features: Tensor, length: int) -> Tensor:
    """Adaptive average pooling over the channel axis: (B, C, h, w) -> (B, length, h, w). Shorter targets average
    neighbouring channels; longer ones repeat them (so every stage can weigh the same in a distance)."""
    if features.shape[1] == length:
        return features
    b, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, 1, c)
    pooled = F.adaptive_avg_pool1d(flat, length)
    return pooled.reshape(b, h, w, length).permute(0, 3, 1, 2)


def locally_aware_patches(backbone: Backbone, images: Tensor, layers: Sequence[int], dim: int) -> Tensor:
    """PatchCore's locally aware patch features (B, dim, h, w) on the first layer's grid: each stage averaged over
    3x3 neighbourhoods (zero border, as the reference's unfold), deeper stages bilinearly upsampled, each pooled
    over channels to dim / layers, concatenated."""
    features = backbone(images, layers)
    features = align_stages([F.avg_pool2d(f.float(), 3, stride=1, padding=1) for f in features])
    share = [dim // len(layers) + (i < dim % len(layers)) for i in range(len(layers))]
    return torch.cat([pool_channels(f, n) for f, n in zip(features, share)], dim=1)


def read_state_dict(path: str | Path, who: str) -> dict[str, Tensor]:
    """Tensors of a weights file (.pth / .pt / .bin via torch.load without code execution, or .safetensors);
    a ``state_dict`` or ``model`` wrapper is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdkitError(f"{who}: weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a foreign or truncated file raises many kinds; all mean unreadable
        raise AdkitError(f"{who}: cannot read weights file {path} ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AdkitError(f"{who}: {path} holds no state dict of tensors")
    return state


def load_exact(model: nn.Module, state: dict[str, Tensor], who: str, optional: Sequence[str] = ()) -> None:
    """Load ``state`` into ``model`` only if every name and shape matches; keys starting with a prefix in
    ``optional`` (a classifier head a feature extractor never uses) may be missing. Errors give the counts
    and the first names of what is missing, unexpected or mis-shaped."""
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.startswith(tuple(optional))]
    unexpected = [k for k in state if k not in target]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in state
                 if k in target and state[k].shape != target[k].shape]
    problems = [f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise AdkitError(f"{who}: the weights do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
