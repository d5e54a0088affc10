"""The workflows that use a fitted model: ``predict`` (score images without labels, from a checkpoint or an
export), ``export`` (a checkpoint's pipeline in a registered format), and ``synth`` (the synthetic textures on
disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adkit.app.workflows import joined
from adkit.core import console, distributed
from adkit.core.datasets import Sample
from adkit.core.errors import AdkitError
from adkit.core.exporting import exporting
from adkit.data.geometry import Geometry
from adkit.data.io import is_image_file, list_images
from adkit.data.loading import load_split
from adkit.deploy import export as deploy
from adkit.deploy.export import Deployed
from adkit.deploy.models import open_checkpoint, open_model
from adkit.deploy.quantize import CALIBRATION_IMAGES, Quantization, require
from adkit.outputs import artifacts, pages
from adkit.run.assembly import checkpoint_geometry, checkpoint_splits
from adkit.run.config import RunConfig
from adkit.run.engine import in_batches
from adkit.stats.decisions import chosen_threshold


def image_paths(inputs: list[Path]) -> list[Path]:
    """The image files ``inputs`` name, folders expanded."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise AdkitError(f"{item} holds no images (png, jpg, bmp, tif)")
            paths += found
        elif is_image_file(item):
            paths.append(item)
        else:
            raise AdkitError(f"{item} is neither an image file nor a folder")
    return paths


@joined
def predict(config: RunConfig, checkpoint: Path | None, inputs: list[Path], model: Path | None = None,
            save_maps: bool = False) -> Path:
    """Score images without labels, from a checkpoint or from a model ``adkit export`` wrote (the same module
    either way): scores.csv with decisions at the recorded threshold (or at ``config.threshold``, fitted anew on
    the stored validation scores), overlays at each image's own size (and with ``save_maps`` its map as .npy),
    to --out (default: beside the checkpoint or model)."""
    if (checkpoint is None) == (model is None):
        raise AdkitError("predict: give --checkpoint CKPT or --model EXPORT_DIR (one of them)")
    device = distributed.run_device(config.device)
    if model is not None:
        deploy.read_model(model)  # --model is an export: one line when its model.json is missing or unreadable
    opened = open_model(checkpoint or model, config, device)
    decision = chosen_threshold(opened.decision, config.threshold, str(opened.decision_source))
    runner, geometry = opened.runner, opened.geometry
    threshold = None if decision is None else float(decision["threshold"])
    out = Path(config.out) if config.out else opened.file.parent / "predict"
    paths = image_paths(inputs)
    _warn_resized(paths, geometry)
    loaded = load_split([Sample(path, 0) for path in paths], geometry, config.skip_bad)
    if not loaded.samples:
        raise AdkitError("no readable images to score")
    maps, scores, decisions = in_batches(lambda images: runner(images, threshold), loaded.images,
                                         config.batch_size or 8, 3)
    if not distributed.is_main():  # under torchrun every rank scored a shard; rank 0 writes
        return out
    artifacts.write_predictions(out, loaded, maps, scores, None if threshold is None else decisions, decision,
                                geometry, save_maps)
    pages.build(out)
    decided = "no threshold: no decisions" if decision is None else \
        f"{int(decisions.sum())} anomalous at threshold {threshold:.6g} ({decision['policy']})"
    console.say(f"scored {len(loaded.samples)} images ({len(loaded.skipped)} skipped), {decided}; results in {out} "
               f"(open {out / pages.PAGE})")
    return out


def _warn_resized(paths: list[Path], geometry: Geometry) -> None:
    """One warning when images are not of the input size: they are brought to it as training images were."""
    from PIL import Image, UnidentifiedImageError

    other = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                other += image.size != (geometry.width, geometry.height)
        except (OSError, UnidentifiedImageError):
            continue  # unreadable: reported (or skipped) by the loader
    if other:
        how = {"squash": "resized to it (bilinear, antialiased)", "pad": "scaled to fit and padded (aspect kept)",
               "crop": "scaled to cover and cropped (aspect kept)"}[geometry.resize]
        console.warn(f"{other} of {len(paths)} images are not {geometry.width}x{geometry.height} px; they are {how}, as "
                    "the training images were; maps and overlays are at each image's own size")


def export(config: RunConfig, checkpoint: Path, fmt: str, out: Path | None, quantize: str = "none") -> Path:
    """Export a checkpoint's pipeline in a registered format (adkit.deploy.export), its recorded threshold (or
    ``config.threshold`` fitted anew on the stored validation scores) and those scores in model.json. With
    ``quantize`` (int8) the backbone is quantized, calibrated on training images and checked on the validation
    images of the checkpoint's dataset (its recorded one, or ``config``'s --data/--root): adkit.deploy.quantize."""
    writer = deploy.export_format(fmt)  # an unknown format fails before anything is read
    opened = open_checkpoint(checkpoint, config.replace(compile=False), torch.device("cpu"))
    record, spec, meta, pipeline = opened.decision, opened.spec, opened.meta, opened.pipeline
    if record is None:
        raise AdkitError(f"no threshold for post-processors {spec.post_texts} and scorer {spec.scorer_text} beside "
                         f"{checkpoint}: run adkit test --checkpoint {checkpoint} with these options first")
    quantization = None
    if quantize != "none":
        require(writer, fmt, pipeline, quantize)  # before any image is read
        quantization = _quantization(config, meta, quantize)
    chosen = chosen_threshold(record, config.threshold, str(opened.decision_source))
    decision = {k: v for k, v in chosen.items() if k not in ("posts", "scorer")}
    out = out or checkpoint.parent / (f"export-{fmt}" if quantize == "none" else f"export-{fmt}-{quantize}")
    with exporting():  # what the exported graph computes, which may differ from the eager path
        approximations = pipeline.detector.all_approximations()
    info = {**spec.record(), "backbone": meta.get("backbone"),
            "category": meta["category"], "checkpoint": str(checkpoint),
            "threshold_fitted_on": record["fitted_on"], "approximations": approximations,
            "lineage": meta.get("lineage", [])}
    deploy.export(Deployed(pipeline), fmt, out, checkpoint_geometry(meta), decision, info, quantization)
    quantized = "" if quantization is None else f", {quantize} backbone"
    console.say(f"exported to {out} ({fmt}{quantized}, threshold {decision['threshold']:.6g}, {decision['policy']})")
    return out


def _quantization(config: RunConfig, meta: dict[str, Any], scheme: str) -> Quantization:
    """Calibration and check images for ``scheme``: a seeded sample of the checkpoint's training images and its
    validation images, from the dataset it was trained on."""
    plan_, splits = checkpoint_splits(config, meta, "training and validation images (--quantize calibrates and checks on them)")
    category = meta["category"]
    if not splits.val:
        raise AdkitError(f"--quantize {scheme} checks the quantized model on the validation images and {category} has "
                         "none; use --quantize none")
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    train = [splits.train[int(i)] for i in order[:CALIBRATION_IMAGES]]
    calibration = load_split(train, plan_.geometry, config.skip_bad)
    validation = load_split(splits.val, plan_.geometry, config.skip_bad)
    return Quantization(scheme, calibration.images, validation.images, validation.labels,
                        f"{len(calibration.samples)} training images of {category} (a sample, seed 0); checked on "
                        f"{len(validation.samples)} validation images")


def synth(out: Path, categories: list[str], seed: int = 0, size: int = 256, n_train: int = 60,
          n_test: int = 40) -> Path:
    """Write the synthetic textures to ``out`` in the MVTec AD layout."""
    from adkit.data.textures import TEXTURES, write_textures

    unknown = [c for c in categories if c not in TEXTURES]
    if unknown:
        raise AdkitError(f"synth: unknown category {unknown[0]!r}; available: {', '.join(TEXTURES)}")
    if size < 16 or n_train < 1 or n_test < 2:
        raise AdkitError("synth: --size must be >= 16, --train >= 1 and --test >= 2")
    write_textures(out, categories or list(TEXTURES), size, seed, n_train, n_test)
    console.say(f"wrote {', '.join(categories or TEXTURES)} to {out}")
    return out
