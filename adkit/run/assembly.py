"""Assembling components: a detector set up for a run, the pipeline around it, and the one path that restores a
trained checkpoint into both."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import torch

from adkit.core.checkpoints import load_checkpoint, restore
from adkit.core.components import Detector, DetectorContext
from adkit.core.datasets import CategorySplits
from adkit.core.errors import AdkitError
from adkit.core.grammar import NO_POSTPROCESSING, ComponentSpec, PipelineSpec, split_spec
from adkit.core.pipeline import Pipeline
from adkit.core.plugins import Catalog, get_catalog
from adkit.data.geometry import Geometry
from adkit.run.config import RunConfig
from adkit.run.planning import RunPlan, plan


def make_detector(catalog: Catalog, spec: ComponentSpec | str, config: RunConfig, image_size: int,
                  device: torch.device) -> Detector:
    """Create a detector from its spec (the registry checks that it is a Detector) and set it up for ``config``
    (losses, sampler, backbone, anomaly source)."""
    detector = catalog["detector"].create(spec)
    detector.setup(DetectorContext(
        build=catalog.builder(), image_size=image_size, device=device, seed=config.seed,
        losses=list(config.loss), replace_losses=config.loss_only, sampler=config.sampler, backbone=config.backbone,
        anomaly_source=Path(config.anomaly_source) if config.anomaly_source else None))
    return detector


def build_detector(plan_: RunPlan, detector_spec: ComponentSpec | str | None = None) -> Detector:
    """A fresh detector for a plan (its own spec unless another is given)."""
    return make_detector(plan_.catalog, detector_spec or plan_.detector, plan_.config, plan_.image_size,
                         plan_.device)


def make_pipeline(catalog: Catalog, detector: Detector, spec: PipelineSpec, compile_: bool,
                  geometry: Geometry | None = None) -> Pipeline:
    """``detector`` -> the post-processors -> the scorer of ``spec`` (on the tiles of ``geometry`` where it has
    tiles), compiled with torch.compile when asked."""
    tiling = geometry.tiling() if geometry else None
    pipeline = Pipeline(detector, [catalog["postprocessor"].create(p) for p in spec.posts],
                        catalog["scorer"].create(spec.scorer), tiling)
    if compile_:
        pipeline.compile()
    return pipeline


def build_pipeline(plan_: RunPlan, detector: Detector, spec: PipelineSpec | None = None) -> Pipeline:
    """The plan's pipeline around ``detector``, or ``spec``'s (a bench grid's re-scoring)."""
    return make_pipeline(plan_.catalog, detector, spec or plan_.pipeline, plan_.config.compile, plan_.geometry)


def checkpoint_pipeline(config: RunConfig, meta: dict[str, Any]) -> PipelineSpec:
    """The pipeline to run a checkpoint with: its detector, and ``config``'s post-processors and scorer where it
    names them, else those the checkpoint was trained and evaluated with (an empty chain stays empty)."""
    catalog = get_catalog()
    recorded = meta.get("posts", [])
    if not recorded and not meta.get("declared_pipeline"):
        # before adkit 0.2 a detector could post-process inside itself (PatchCore's and PaDiM's smoothing, now
        # their declared default post-processor): an empty chain then meant the detector's own defaults
        recorded = list(catalog["detector"].get(split_spec(meta["detector"])[0]).traits.default_postprocessors)
    posts = catalog.checked_posts(list(config.post) or recorded or [NO_POSTPROCESSING])
    return PipelineSpec(catalog["detector"].parse(meta["detector"]), posts,
                        catalog.checked("scorer", config.scorer or meta.get("scorer", "max")))


def plan_from_checkpoint(config: RunConfig, meta: dict[str, Any]) -> RunPlan:
    """The plan that evaluates a checkpoint (its ``meta``): its detector, image size and backbone, on ``config``'s
    data (the checkpoint's own category unless ``config`` names others)."""
    spec = checkpoint_pipeline(config, meta)
    geometry = checkpoint_geometry(meta)
    return plan(config.replace(detector=[meta["detector"]], image_size=f"{geometry.width}x{geometry.height}",
                               resize=geometry.resize, tile=geometry.tile or None, overlap=geometry.overlap,
                               post=spec.post_texts or [NO_POSTPROCESSING],
                               backbone=config.backbone or meta.get("backbone"), scorer=spec.scorer_text,
                               category=list(config.category) or [meta["category"]]))

def checkpoint_data(config: RunConfig, meta: dict[str, Any]) -> RunConfig:
    """``config`` reading the dataset the checkpoint was trained on (its recorded configuration), unless
    ``config`` names one (--data, --root or the folders). A relative path recorded there (--root, a folder, a
    path among the dataset's parameters) that does not exist from here is taken from the folder the training ran
    in (``meta["cwd"]``), where it does."""
    named = config.data is not None or any((config.root, config.normal, config.abnormal, config.masks))
    recorded = {} if named or not meta.get("config") else tomllib.loads(meta["config"])
    base = meta.get("cwd")
    for key in ("root", "normal", "abnormal", "masks"):
        if isinstance(recorded.get(key), str):
            recorded[key] = _relocated(recorded[key], base)
    if isinstance(recorded.get("data"), str) and ":" in recorded["data"]:
        name, params = split_spec(recorded["data"], "dataset")
        moved = {key: _relocated(value, base) for key, value in params.items()}
        if moved != params:
            recorded["data"] = f"{name}:" + ",".join(
                f"{key}=({value})" if "," in value or "(" in value else f"{key}={value}" for key, value in moved.items())
    keys = ("data", "root", "normal", "abnormal", "masks")
    return config.replace(**{key: recorded[key] for key in keys if key in recorded})


def _relocated(value: str, base: str | None) -> str:
    """``value`` as a path seen from here: unchanged when it is absolute, exists here or no training folder was
    recorded (``base``); ``base`` / ``value`` where that exists and ``value`` does not."""
    path = Path(value)
    if base is None or not value or path.is_absolute() or path.exists():
        return value
    there = Path(base) / path
    return str(there) if there.exists() else value


def checkpoint_splits(config: RunConfig, meta: dict[str, Any], what: str) -> tuple[RunPlan, CategorySplits]:
    """The plan of ``plan_from_checkpoint`` on the dataset the checkpoint was trained on (``checkpoint_data``) and
    the checkpoint's category's splits there; one line naming ``what`` was to be read and --data/--root when they
    cannot be read."""
    try:
        plan_ = plan_from_checkpoint(checkpoint_data(config, meta).replace(category=[]), meta)
        return plan_, plan_.dataset.load(meta["category"])
    except AdkitError as exc:
        raise AdkitError(f"the checkpoint's {what} cannot be read ({exc}); give --data and --root of the dataset it "
                         "was trained on") from None


def load_trained(config: RunConfig, checkpoint: Path, device: torch.device, payload: dict[str, Any] | None = None,
                 spec: PipelineSpec | None = None) -> tuple[Pipeline, dict[str, Any]]:
    """The one restore path of ``test`` and ``predict``: the checkpoint's detector, set up as it was trained (its
    spec, image size and backbone; run options from ``config``), its trained or fitted state restored, in the
    pipeline it was evaluated with (post-processors and scorer from the checkpoint unless ``config`` names
    others; ``spec`` when the caller has made it already, ``checkpoint_pipeline``). Returns the pipeline and the
    checkpoint's meta."""
    payload = payload if payload is not None else load_checkpoint(checkpoint)
    meta = payload["meta"]
    catalog = get_catalog()
    setup_config = config.replace(backbone=config.backbone or meta.get("backbone"))
    detector = make_detector(catalog, meta["detector"], setup_config, meta["image_size"], device)
    restore(detector, payload, checkpoint)
    return make_pipeline(catalog, detector, spec or checkpoint_pipeline(config, meta), config.compile,
                         checkpoint_geometry(meta)), meta


def checkpoint_geometry(meta: dict[str, Any]) -> Geometry:
    """The input geometry a checkpoint was trained with (before geometries: a squashed square)."""
    return Geometry.from_dict(meta.get("geometry"), meta["image_size"])
