"""Opening a model for inference: one path from a checkpoint (its pipeline restored, its threshold record read for
that pipeline) or an export folder (its file loaded by its format, model.json read) to what predict, export and
serve need: a runner (images, threshold -> maps, scores, decisions), the input geometry, the recorded decision,
and the model's card."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adkit.core.checkpoints import load_checkpoint
from adkit.core.errors import AdkitError
from adkit.core.grammar import PipelineSpec
from adkit.core.pipeline import Pipeline
from adkit.data.geometry import Geometry
from adkit.deploy.export import MODEL_JSON, Deployed, Runner, eager_runner, load_runner, read_model
from adkit.run.assembly import checkpoint_geometry, checkpoint_pipeline, load_trained
from adkit.run.config import RunConfig
from adkit.stats.decisions import THRESHOLD_FILE, threshold_record

CHECKPOINT = "checkpoint.pt"


@dataclass
class OpenedModel:
    """A model ready to score: ``runner`` and ``geometry``; ``decision`` the recorded threshold record (None
    without one), read from ``decision_source``; ``card`` what a caller outside adkit reads of it (format,
    detector, category, approximations, lineage); ``sha256`` of the model file. A checkpoint also gives its
    ``pipeline``, ``spec`` and ``meta`` (what export needs)."""

    runner: Runner
    geometry: Geometry
    decision: dict[str, Any] | None
    decision_source: Path
    card: dict[str, Any]
    file: Path
    sha256: str
    pipeline: Pipeline | None = None
    spec: PipelineSpec | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def open_model(path: Path, config: RunConfig | None = None, device: torch.device | None = None) -> OpenedModel:
    """The model at ``path``: a checkpoint file, or a folder holding an export (model.json) or a checkpoint.
    ``config`` may name other post-processors or a scorer for a checkpoint (its threshold record must hold for
    them) and the precision; ``device`` defaults to the CPU."""
    config = config or RunConfig()
    device = device or torch.device("cpu")
    folder = path if path.is_dir() else path.parent
    if (folder / MODEL_JSON).is_file() and (path.is_dir() or path.name != CHECKPOINT):
        return _open_export(path, device)
    checkpoint = path / CHECKPOINT if path.is_dir() else path
    if path.is_dir() and not checkpoint.is_file():
        raise AdkitError(f"{path} holds neither {MODEL_JSON} (adkit export) nor {CHECKPOINT}")
    return open_checkpoint(checkpoint, config, device)


def open_checkpoint(checkpoint: Path, config: RunConfig, device: torch.device) -> OpenedModel:
    """A checkpoint's pipeline restored (``config``'s post-processors and scorer where it names them) and the
    threshold record that holds for that pipeline."""
    payload = load_checkpoint(checkpoint)
    meta = payload["meta"]
    spec = checkpoint_pipeline(config, meta)
    pipeline, _ = load_trained(config, checkpoint, device, payload, spec)
    card = {"format": "checkpoint", "detector": meta["detector"], "category": meta["category"],
            "approximations": pipeline.detector.all_approximations(), "lineage": meta.get("lineage", [])}
    return OpenedModel(eager_runner(Deployed(pipeline), device, config.precision), checkpoint_geometry(meta),
                       threshold_record(checkpoint.parent, spec), checkpoint.parent / THRESHOLD_FILE, card, checkpoint,
                       hashlib.sha256(checkpoint.read_bytes()).hexdigest(), pipeline, spec, meta)


def _open_export(path: Path, device: torch.device) -> OpenedModel:
    file, card = read_model(path)
    geometry = Geometry.from_dict(card["geometry"], card["input"]["shape"][-1])
    return OpenedModel(load_runner(file, card["format"], device), geometry, card["decision"], file.parent / MODEL_JSON,
                       card, file, card.get("sha256", ""))
