"""Training and evaluating one category: its data loaded, a fresh detector trained or fitted on it, and the test
metrics of a pipeline as a result object."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adkit.core import console, distributed
from adkit.core.components import Detector, upsample
from adkit.core.datasets import CategorySplits
from adkit.core.errors import AdkitError
from adkit.core.grammar import PipelineSpec
from adkit.core.pipeline import Pipeline
from adkit.data.loading import LoadedSplit, load_defects, load_split
from adkit.run.assembly import build_detector
from adkit.run.engine import TrainSettings, derived_seed, seed_everything, train_detector
from adkit.run.engine import predict as run_pipeline
from adkit.run.planning import RunPlan
from adkit.stats import metrics, thresholds
from adkit.stats.decisions import decision_metrics, fit_threshold, validation_record

log = logging.getLogger("adkit")

# the most training images an fpr threshold scores left out of the fit (left_out_scores): with the validation images,
# enough to place a 1 % rate among a few hundred scores
LEAVE_OUT_IMAGES = 512


@dataclass
class CategoryRun:
    """A trained detector for one category with its loaded splits."""

    category: str
    detector: Detector
    splits: CategorySplits
    train: LoadedSplit
    val: LoadedSplit
    test: LoadedSplit
    train_seconds: float
    folder: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def threshold_split(self) -> LoadedSplit:
        """The normal images thresholds are fitted on: the validation split, or the training images without one."""
        return self.val if len(self.val.samples) else self.train


@dataclass
class Evaluation:
    """A pipeline's results on one category's test split. Under torchrun only rank 0 has ``metrics`` and
    ``threshold``; the other ranks hold an empty dict and None."""

    metrics: dict[str, Any]  # the row of metrics.json: counts, threshold, image and pixel metrics, timings
    test_scores: Tensor  # (N_test,) image scores
    val_scores: Tensor  # (N_val,) image scores of the threshold split
    pixel_maps: Tensor  # (N_test, 1, H, W) the maps pixel metrics were computed on (raw or post-processed)
    fit: thresholds.ThresholdFit | None  # the decision threshold fitted on the threshold split
    val_labels: Tensor | None = None  # (N_val,) 0 normal, 1 defective (defective ones only with val_defects)
    pixel_level: bool = True  # the detector declares a pixel-level map (not image_level)
    validation: dict[str, Any] | None = None  # the threshold's record (decisions.validation_record), for its files
    decisions: Tensor | None = None  # (N_test,) 1 anomalous, 0 normal at the fitted threshold
    left_out: Tensor | None = None  # training images' left-out scores offered to the threshold (pooled or not)

    @property
    def threshold(self) -> float | None:
        return None if self.fit is None else self.fit.threshold

    @property
    def normal_val_scores(self) -> Tensor:
        """The threshold split's scores of normal images (what ensembles normalise on)."""
        return self.val_scores if self.val_labels is None else self.val_scores[self.val_labels == 0]


def train_category(plan_: RunPlan, category: str, folder: Path, resume: bool = False,
                   load_test: bool = True) -> CategoryRun:
    """Load one category's data and train a fresh detector on it (checkpoint in ``folder``)."""
    cfg = plan_.config
    seed_everything(cfg.seed)
    splits = plan_.dataset.load(category)
    if splits.defects and not plan_.learns_defects and plan_.member:
        console.say(f"{category}: {plan_.detector.name} cannot learn from the {len(splits.defects)} labelled defects: "
                    "it fits on the good images alone (the ensemble's members that can learn from them do)")
    elif splits.defects and not plan_.learns_defects:
        users = ", ".join(i.name for i in plan_.catalog["detector"] if i.traits.uses_defects) or "none"
        raise AdkitError(f"{category}: the dataset gives {len(splits.defects)} labelled defects for training "
                         f"(train_defects), which {plan_.detector.name} cannot learn from; drop train_defects, or use "
                         f"a detector that can ({users})")
    detector = build_detector(plan_)
    geometry = plan_.geometry
    train = load_split(splits.train, geometry, cfg.skip_bad)
    val = load_split(splits.val, geometry, cfg.skip_bad)
    test = load_split(splits.test, geometry, cfg.skip_bad) if load_test else load_split([], geometry)
    defects = load_defects(splits.defects, geometry, cfg.skip_bad) if plan_.learns_defects else None
    if len(train.samples) == 0:
        raise AdkitError(f"{category}: no readable training images")
    # with tiling the detector learns from tiles: (N * tiles, 3, tile, tile)
    train_images = geometry.tiles(train.images)
    # a fitted detector checks its approximations on normal images it was not fitted on
    held_out = geometry.tiles(val.images[val.labels == 0]) if bool((val.labels == 0).any()) else None
    steps = plan_.steps_for(len(train_images)) if detector.trainable else 1
    settings = TrainSettings(steps=steps, batch_size=plan_.batch_size, seed=cfg.seed,
                             checkpoint_every=cfg.checkpoint_every or 0, compile=cfg.compile,
                             precision=cfg.precision)
    meta = {**plan_.pipeline.record(), "backbone": cfg.backbone, "category": category,
            "image_size": plan_.image_size, "geometry": geometry.as_dict(),
            "config": cfg.to_toml(), "cwd": str(Path.cwd()),  # the folder relative paths in config start from
            "declared_pipeline": True}  # posts as run, defaults resolved: [] is an empty chain (adkit >= 0.2)
    with console.progress() as progress:
        task = progress.add_task(f"train {plan_.detector.name} {category}", total=steps, info="")
        started = time.perf_counter()

        def on_step(step: int, total: int, losses: dict[str, float] | None) -> None:
            rate = (step * plan_.batch_size) / max(time.perf_counter() - started, 1e-9)
            info = f"loss {losses['loss']:.4f} | {rate:.1f} img/s" if losses else ""
            progress.update(task, completed=step, info=info if info else progress.tasks[task].fields["info"])

        result = train_detector(detector, train_images, settings, plan_.device, folder / "checkpoint.pt", meta,
                                resume=resume, on_step=on_step, held_out=held_out, defects=defects)
        progress.update(task, completed=steps)
    log.info("%s: trained %d steps in %.1f s", category, result.steps, result.seconds)
    for name, record in detector.all_approximations().items():
        log.info("%s: %s: %s", category, name, record["summary"])
        if distributed.is_main() and (record.get("trail") or "noise" in record):  # a check ran: say what it chose
            console.say(f"{category}: {name}: {record['summary']}")
    skipped = train.skipped + val.skipped + test.skipped
    return CategoryRun(category, detector, splits, train, val, test, result.seconds, folder, skipped)


def evaluate(plan_: RunPlan, run_: CategoryRun, pipeline: Pipeline, spec: PipelineSpec | None = None,
             left_out: Tensor | None = None) -> Evaluation:
    """Test metrics for one category and pipeline (built from ``spec``, by default the plan's); the threshold is
    fitted on the validation split, with the training images' left-out scores where the detector gives them
    (``left_out_scores``) or, without the training images, ``left_out`` (the ones its threshold record kept).
    Under torchrun every rank scores a shard of the images; rank 0 gets them all and computes the metrics."""
    device, batch = plan_.device, plan_.scoring_batch
    val_source = run_.threshold_split
    n_test, n_val = len(run_.test.samples), len(val_source.samples)
    precision = plan_.config.precision
    with console.progress() as progress:
        task = progress.add_task(f"evaluate {run_.category}", total=n_test + n_val, info="")
        test = run_pipeline(pipeline, run_.test.images, batch, device,
                            on_batch=lambda done: progress.update(task, completed=done), precision=precision)
        val = run_pipeline(pipeline, val_source.images, batch, device,
                           on_batch=lambda done: progress.update(task, completed=n_test + done), precision=precision)
    pixel_maps = test.raw if plan_.config.pixel_map == "raw" else upsample(test.processed, test.raw.shape[-2:])
    traits = plan_.detector_info.traits
    pixel_level = not traits.image_level
    # every rank scores its share of the left-out training images (the pipeline gathers them)
    computed = left_out_scores(plan_, run_, pipeline, val.scores[val_source.labels == 0])
    if not distributed.is_main():
        return Evaluation({}, test.scores, val.scores, pixel_maps, None, val_source.labels, pixel_level)
    scorer = (spec or plan_.pipeline).scorer_text
    if pipeline.own_scores and scorer != traits.default_scorer:
        console.warn(f"{plan_.detector.name} computes its own image scores; --scorer {scorer} is not used "
                    "(see its score= parameter)")
    left_out = computed if computed is not None else left_out
    fit = fit_threshold(plan_.threshold, val.scores, val_source.labels, run_.category, left_out)
    validation = validation_record(fit, val.scores, val_source.labels, left_out)
    labels = run_.test.labels.numpy()
    result: dict[str, Any] = {"category": run_.category, "n_test": int(labels.size),
                              "n_anomalous": int(labels.sum()),
                              "image_score": "detector" if pipeline.own_scores else scorer}
    result.update(decision_metrics(fit, test.scores, labels, [s.defect for s in run_.test.samples]))
    decided = thresholds.decide(test.scores, fit.threshold)
    result.update(metrics.image_metrics(labels, test.scores.numpy()))
    masks = run_.test.masks[:, 0].numpy()
    if masks.any() and pixel_level:
        result.update(metrics.pixel_metrics(pixel_maps[:, 0].numpy(), masks))
    learned = run_.splits.defects if plan_.learns_defects else []  # labelled defects it learned from (not tested on)
    result["train_defects"] = len(learned)
    result["train_defects_masked"] = sum(s.mask is not None for s in learned)
    result["infer_img_s"] = len(labels) / max(test.seconds, 1e-9)
    result["train_s"] = run_.train_seconds
    result["approximations"] = pipeline.detector.all_approximations()
    result["skipped"] = [str(p) for p, _ in run_.skipped]
    return Evaluation(result, test.scores, val.scores, pixel_maps, fit, val_source.labels, pixel_level, validation,
                      decided, left_out)


def left_out_scores(plan_: RunPlan, run_: CategoryRun, pipeline: Pipeline, normal_val: Tensor) -> Tensor | None:
    """The pipeline's scores of the training images, each as if the detector had not been fitted on it
    (``Detector.leaving_out``; at most LEAVE_OUT_IMAGES of them, a seeded sample), for an fpr threshold to pool
    with the normal validation images' scores: None where the detector cannot leave images out, the policy is not
    fpr, or there are no normal validation images to check them against (thresholds.left_out_agree). The training
    images must be the ones the detector was fitted on, in order: train_category's (``adkit test`` reads none)."""
    detector = pipeline.detector
    n = len(run_.train.samples) if len(run_.val.samples) else 0  # without a validation split: nothing to check by
    tiling = plan_.geometry.tiling()
    parts = 1 if tiling is None else tiling.count  # the detector was fitted on each image's tiles, in order
    if plan_.threshold.kind != "fpr" or not len(normal_val) or not n or not detector.can_leave_out(parts):
        return None
    chosen = torch.arange(n)
    if n > LEAVE_OUT_IMAGES:
        generator = torch.Generator().manual_seed(derived_seed(plan_.config.seed, "leave-out", run_.category))
        chosen = torch.randperm(n, generator=generator)[:LEAVE_OUT_IMAGES].sort().values
    # the training rows the pipeline gives the detector, in order (under torchrun: this rank's share of them)
    mine = chosen[distributed.shard(len(chosen))] if distributed.world_size() > 1 else chosen
    rows = (mine[:, None] * parts + torch.arange(parts)).flatten()
    with console.progress() as progress, detector.leaving_out(rows, parts):
        task = progress.add_task(f"leave out {run_.category}", total=len(chosen), info="")
        images = run_.train.images if len(chosen) == n else run_.train.images[chosen]  # no copy of them all
        return run_pipeline(pipeline, images, plan_.scoring_batch, plan_.device,
                            on_batch=lambda done: progress.update(task, completed=done),
                            precision=plan_.config.precision).scores
