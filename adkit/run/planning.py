"""Planning a run: a configuration checked against the catalog and resolved (preset, defaults, device), and the
folder its files go to."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adkit.core import console, distributed, files
from adkit.core.datasets import AnomalyDataset
from adkit.core.errors import AdkitError
from adkit.core.grammar import ComponentSpec, PipelineSpec, split_spec
from adkit.core.plugins import Catalog, get_catalog
from adkit.core.registry import ComponentInfo
from adkit.data.geometry import Geometry, GeometryError, choose_geometry
from adkit.run.config import RunConfig
from adkit.stats.thresholds import DEFAULT_POLICY, ThresholdPolicy, parse_policy

log = logging.getLogger("adkit")

ENGINE_DEFAULTS = {"image_size": 256, "batch_size": 8, "steps": 1000}


@dataclass
class RunPlan:
    """A configuration resolved against the catalog: specs checked, preset applied."""

    config: RunConfig
    catalog: Catalog
    pipeline: PipelineSpec  # detector -> post-processors -> scorer, made here once
    preset: dict[str, Any]
    image_size: int
    batch_size: int
    steps: int | None  # None: derived from epochs and the training-set size
    epochs: int | None
    dataset: AnomalyDataset
    categories: list[str]
    device: torch.device
    threshold: ThresholdPolicy  # how decision thresholds are fitted on the validation split
    geometry: Geometry  # how images reach the input size, and the tiles the detector sees (image_size: their side)
    # a member of an ensemble: labelled defects it cannot learn from are left to the members that can, not refused
    member: bool = False

    @property
    def learns_defects(self) -> bool:
        """Whether the detector learns from the dataset's labelled defects (``uses_defects``)."""
        return self.detector_info.traits.uses_defects

    @property
    def detector(self) -> ComponentSpec:
        return self.pipeline.detector

    @property
    def posts(self) -> list[str]:
        """The post-processors' canonical texts."""
        return self.pipeline.post_texts

    @property
    def scorer(self) -> str:
        return self.pipeline.scorer_text

    def steps_for(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, self.epochs * max(1, n_train // self.batch_size))

    @property
    def detector_info(self) -> ComponentInfo:
        """What the registry knows of the detector, its declared traits among it."""
        return self.catalog["detector"].get(self.detector.name)

    @property
    def scoring_batch(self) -> int:
        """Inference batch size: at least 8, since scoring holds no gradients."""
        return max(self.batch_size, 8)


def plan(config: RunConfig, catalog: Catalog | None = None, member: bool = False) -> RunPlan:
    """Check every spec of ``config`` against the catalog and apply the preset. ``member``: the detector is one of
    an ensemble's, where labelled defects it cannot learn from go to the members that can."""
    catalog = catalog or get_catalog()
    if not config.detector:
        raise AdkitError(f"give a detector with --detector NAME (available: {', '.join(catalog['detector'].names()) or 'none'})")
    if len(config.detector) > 1:
        raise AdkitError("plan() takes one detector; run() trains several as an ensemble")
    data_name, data_params = dataset_spec(catalog, config)
    name, raw = split_spec(config.detector[0], "detector")
    info = catalog["detector"].get(name)
    presets = info.traits.preset_values  # declared by the detector's class, read from the registry
    suggested = catalog["dataset"].get(data_name).traits.default_preset  # declared by the dataset
    preset_name = config.preset or (suggested if suggested in presets else None)
    if not presets:  # nothing to set (a fitted detector): --preset is for the other detectors of an ensemble
        preset_name = None
    if preset_name is not None and preset_name not in presets:
        raise AdkitError(f"--preset {preset_name}: detector {name!r} has presets {', '.join(presets) or 'none'}")
    preset = presets.get(preset_name, {}) if preset_name else {}
    # --sampler / --backbone replace the detector's own parameter of that name: the spec shows what is used
    flags = {key: value for key, value in (("sampler", config.sampler), ("backbone", config.backbone))
             if value and key in info.params}
    detector = catalog["detector"].parse(name, overrides={**preset.get("params", {}), **raw, **flags})
    for option, value in (("loss", config.loss), ("sampler", config.sampler), ("backbone", config.backbone),
                          ("anomaly-source", config.anomaly_source)):
        if value and option.replace("-", "_") not in info.traits.consumes:
            console.warn(f"--{option} is ignored: detector {name!r} uses no {option.replace('-', ' ')}")
    for spec in config.loss:
        catalog["loss"].parse(spec)
    pipeline = PipelineSpec(detector, catalog.checked_posts(list(config.post) or list(info.traits.default_postprocessors)),
                            catalog.checked("scorer", config.scorer or info.traits.default_scorer or "max"))
    if config.sampler:
        catalog["sampler"].parse(config.sampler)
    if config.backbone:
        catalog["backbone"].parse(config.backbone)
    pixel_map = config.pixel_map or info.traits.default_pixel_map
    if pixel_map not in ("raw", "post"):
        raise AdkitError("--pixel-map must be raw or post")
    dataset = catalog["dataset"].create(data_name, **data_params)
    categories = dataset.resolve_categories(list(config.category))
    if "train_defects" in data_params:  # its errors, and a detector that cannot learn from them, before any file
        users = ", ".join(i.name for i in catalog["detector"] if i.traits.uses_defects) or "none"
        for category in categories:
            if dataset.load(category).defects and not info.traits.uses_defects and not member:
                raise AdkitError(f"{category}: the dataset gives labelled defects for training (train_defects), which "
                                 f"{name} cannot learn from; drop train_defects, or use a detector that can ({users})")
    threshold = parse_policy(config.threshold or DEFAULT_POLICY)
    if threshold.kind == "f1":  # refused before any folder is claimed or anything trained
        for category in categories:
            if not any(sample.label for sample in dataset.load(category).val):
                raise AdkitError(f"--threshold f1 needs defective validation images and {category}'s validation "
                                 "split has none: use fpr:RATE, or hold defective images out for validation "
                                 "(--data mvtec:val_defects=0.2)")
    for option, value in (("--batch-size", config.batch_size), ("--steps", config.steps),
                          ("--checkpoint-every", config.checkpoint_every)):
        if value is not None and value < 1:
            raise AdkitError(f"{option} must be >= 1, got {value}")

    def setting(value: int | None, key: str) -> int | None:
        return value if value is not None else preset.get(key)

    steps = setting(config.steps, "steps")
    epochs = preset.get("epochs") if steps is None else None
    if steps is None and epochs is None:
        steps = ENGINE_DEFAULTS["steps"]
    shapes = [dataset.shape(category) for category in categories] if categories else []
    try:
        geometry = choose_geometry(setting(None, "image_size") or ENGINE_DEFAULTS["image_size"], config.image_size,
                                   config.resize, config.tile, config.overlap, shapes)
    except GeometryError as exc:
        raise AdkitError(str(exc)) from None
    batch_size = setting(config.batch_size, "batch_size") or ENGINE_DEFAULTS["batch_size"]
    size_text = geometry.height if geometry.height == geometry.width else f"{geometry.width}x{geometry.height}"
    resolved = config.replace(data=config.data or data_name, preset=preset_name, image_size=size_text, batch_size=batch_size, steps=steps,
                              post=pipeline.post_texts, scorer=pipeline.scorer_text, pixel_map=pixel_map, category=categories, threshold=str(threshold),
                              resize=geometry.resize, tile=geometry.tile or None, overlap=geometry.overlap)
    device = distributed.run_device(config.device)  # the workflows join the process group
    return RunPlan(resolved, catalog, pipeline, preset, geometry.detector_size, batch_size, steps, epochs, dataset,
                   categories, device, threshold, geometry, member)


def default_data(catalog: Catalog) -> str:
    """The dataset a run reads when ``--data`` is left out: the one that declares ``default_data`` (adkit's own
    first, so that installing a plugin does not silently change what a bare command reads)."""
    declared = sorted((not info.builtin, info.name) for info in catalog["dataset"] if info.traits.default_data)
    if not declared:
        raise AdkitError(f"no dataset declares itself the default: give --data NAME "
                         f"(available: {', '.join(catalog['dataset'].names()) or 'none'})")
    return declared[0][1]


def dataset_spec(catalog: Catalog, config: RunConfig) -> tuple[str, dict[str, str]]:
    """The dataset name and parameters a config means: ``--data``, or with ``--normal/--abnormal/--masks`` the
    dataset that declares it takes folders (when ``--data`` is left out or names such a dataset); ``--root``
    fills a ``root`` parameter."""
    name, raw = split_spec(config.data or default_data(catalog), "dataset")
    folders = {k: v for k, v in (("normal", config.normal), ("abnormal", config.abnormal),
                                 ("masks", config.masks)) if v}
    if folders:
        takers = [info.name for info in catalog["dataset"] if info.traits.takes_folders]
        named = name in catalog["dataset"] and catalog["dataset"].get(name).traits.takes_folders
        if not takers or "normal" not in folders or not (named or config.data is None):
            where = f"use --data {' or --data '.join(takers)} or leave --data out" if takers else \
                "no registered dataset takes folders"
            raise AdkitError(f"--normal/--abnormal/--masks describe a dataset of folders: give --normal DIR ({where})")
        name = name if named else takers[0]
        raw = {**raw, **folders}
    info = catalog["dataset"].get(name)
    if config.root and "root" in info.params and "root" not in raw:
        raw = {**raw, "root": config.root}
    return name, raw


def output_dir(config: RunConfig, detector: str) -> Path:
    """``--out``, else runs/<detector>-<data>-<categories>-<time>."""
    if config.out:
        return Path(config.out)
    cats = "-".join(config.category) if len(config.category) <= 2 else f"{len(config.category)}cats"
    data = split_spec(config.data)[0] if config.data else "data"
    default = Path("runs") / f"{detector}-{data}-{cats}-{time.strftime('%Y%m%d-%H%M%S')}"
    return distributed.all_gather_objects(default)[0]  # under torchrun every rank takes rank 0's clock


def claim_output(out: Path, resume: bool, config_toml: str | None = None) -> bool:
    """The start every training workflow shares: refuse to write into a folder that holds another run's
    checkpoints (unless resuming it), before any file is written there; then the log and, given the run's
    configuration (``RunConfig.to_toml``), its config.toml. Returns whether this process reports (rank 0 under
    torchrun)."""
    if out.is_dir() and not resume:
        existing = next(out.rglob("checkpoint.pt"), None)
        if existing is not None:
            raise AdkitError(f"{out} already holds a run ({existing}): choose another --out, or pass --resume")
    main = distributed.is_main()
    if main:
        configure_log(out)
    distributed.barrier()  # no rank writes there before every rank has checked
    if main and config_toml is not None:
        files.write_text_atomic(out / "config.toml", config_toml)
    return main


def configure_log(out: Path) -> None:
    """Send adkit's log to <out>/log.txt."""
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers = [handler]
    log.setLevel(logging.INFO)
