"""The workflows the CLI runs: ``run`` (train then test, alone or as an ensemble), ``train``, ``test``,
``predict`` and ``synth``. Each plans, assembles, evaluates and writes through the modules that own those ideas."""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from adkit.core import console, distributed, files, threads
from adkit.core.datasets import Sample
from adkit.core.errors import AdkitError
from adkit.core.exporting import exporting
from adkit.core.plugins import get_catalog
from adkit.data.geometry import Geometry
from adkit.data.io import is_image_file, list_images
from adkit.data.loading import load_split
from adkit.deploy import export as deploy
from adkit.deploy.export import Deployed
from adkit.deploy.models import open_checkpoint, open_model
from adkit.outputs import artifacts, pages, render
from adkit.run.assembly import (
    build_pipeline,
    checkpoint_geometry,
    load_trained,
    plan_from_checkpoint,
)
from adkit.run.config import RunConfig
from adkit.run.engine import in_batches, load_checkpoint, resolve_device
from adkit.run.engine import predict as run_pipeline
from adkit.run.evaluation import CategoryRun, evaluate, threshold_metrics, train_category
from adkit.run.planning import RunPlan, claim_output, configure_log, output_dir, plan
from adkit.stats import metrics, thresholds
from adkit.stats.decisions import (
    chosen_threshold,
    fit_threshold,
    record_threshold,
    validation_record,
)

T = TypeVar("T")


def joined(workflow: Callable[..., T]) -> Callable[..., T]:
    """A workflow's entry: join the process group torchrun describes (once; nothing in a single process) before
    anything is planned, so rank handling starts in one place and ``plan()`` has no side effect."""

    @functools.wraps(workflow)
    def entry(config: RunConfig, *args: Any, **kwargs: Any) -> T:
        distributed.init_from_environment(resolve_device(config.device))
        return workflow(config, *args, **kwargs)

    return entry


def _source(plan_: RunPlan, category: str, command: str) -> str:
    return f"validation split of {plan_.config.data} {category} (adkit {command})"


@joined
def run(config: RunConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Train then test per category; writes everything under the output folder and prints the table.
    Several detectors (or ``--ensemble``) train each one and report each alone and their ensemble. On a CPU,
    categories train side by side in worker processes, one per core (``workers``)."""
    if len(config.detector) > 1 or config.ensemble:
        return run_ensemble(config, resume)
    plan_ = plan(config)
    out = output_dir(plan_.config, plan_.detector.name)
    main = _start(out, plan_.config, resume)
    workers = category_workers(plan_)
    if workers > 1:
        results = _categories_in_workers(plan_.config.replace(out=str(out)), plan_.categories, workers, resume)
    else:
        results = [_run_category(plan_, category, out / category, resume) for category in plan_.categories]
    if not main:  # under torchrun the other ranks helped train and score; rank 0 reports
        return []
    _finish(out, plan_.config.__dict__, results, f"{plan_.detector} on {plan_.config.data}")
    return results


def _start(out: Path, config: RunConfig, resume: bool) -> bool:
    """The start every training workflow shares: claim ``out`` (refusing another run's checkpoints unless
    resuming) and write its config.toml. Returns whether this process reports (rank 0 under torchrun)."""
    claim_output(out, resume)
    main = distributed.is_main()
    if main:
        files.write_text_atomic(out / "config.toml", config.to_toml())
    return main


def _finish(out: Path, header: dict[str, Any], results: list[dict[str, Any]], title: str) -> None:
    """The end of ``run`` and ``test`` on rank 0: summary files, the page, the table, and where they are."""
    artifacts.write_summary(out, header, results)
    pages.build(out)
    render.print_summary(results, title)
    console.say(f"results in {out} (open {out / pages.PAGE})")


def _run_category(plan_: RunPlan, category: str, folder: Path, resume: bool) -> dict[str, Any]:
    """Train, evaluate and write one category of ``run``; its metrics (rank 0 writes and reports)."""
    run_ = train_category(plan_, category, folder, resume=resume)
    evaluation = evaluate(plan_, run_, build_pipeline(plan_, run_.detector))
    if distributed.is_main():  # under torchrun rank 0 reports; the other ranks helped train and score
        artifacts.write_category(run_.test, category, evaluation, folder)
        record_threshold(folder, validation_record(evaluation.fit, evaluation.val_scores, evaluation.val_labels),
                         plan_.pipeline, _source(plan_, category, "run"))
    return evaluation.metrics


WORKERS_ENV = "ADKIT_WORKERS"


def category_workers(plan_: RunPlan) -> int:
    """How many categories ``run`` trains at once: ``--workers`` (or ADKIT_WORKERS), else on a CPU one per core
    it may use, up to the number of categories (small networks use one core far better than two: measured in
    docs/benchmarks.md); one on a GPU and under torchrun, whose ranks already share each category."""
    requested = plan_.config.workers
    if requested is None:
        requested = threads.env_count(WORKERS_ENV, "give a positive number of worker processes")
    if requested is not None and requested < 1:
        raise AdkitError(f"--workers {requested}: give a positive number of worker processes")
    if distributed.world_size() > 1:
        if requested not in (None, 1):
            raise AdkitError(f"--workers {requested}: under torchrun the ranks share each category; drop --workers")
        return 1
    if requested is None:
        requested = threads.cores_available() if plan_.device.type == "cpu" else 1
    return max(1, min(requested, len(plan_.categories)))


def _categories_in_workers(config: RunConfig, categories: list[str], workers: int,
                           resume: bool) -> list[dict[str, Any]]:
    """``_run_category`` for each category in ``workers`` processes; the metrics in the categories' order. The
    parent leaves the cores to them and shows one bar over the categories. A category that fails stops the
    others at once (the pool is terminated; their checkpoints are written atomically, so none is half written)."""
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools into the children
    results: dict[str, dict[str, Any]] = {}
    console.say(f"{len(categories)} categories, {workers} at a time in worker processes (--workers 1: one after "
                "the other)")
    started = time.perf_counter()
    jobs = [(config, category, resume) for category in categories]
    with threads.standing_aside(), console.progress() as progress, \
            context.Pool(workers, initializer=console.show_progress, initargs=(False,)) as pool:
        task = progress.add_task("categories", total=len(categories), info="")
        for category, metrics in pool.imap_unordered(_category_job, jobs):
            results[category] = metrics
            progress.update(task, advance=1, info=f"{category} done at {time.perf_counter() - started:.0f} s")
    return [results[category] for category in categories]


def _category_job(job: tuple[RunConfig, str, bool]) -> tuple[str, dict[str, Any]]:
    """One category in a worker process; the worker counts among the running processes only while it works,
    so the last category takes every core once the others are done."""
    config, category, resume = job
    threads.register()
    try:
        plan_ = plan(config.replace(category=[category]))
        out = Path(config.out or ".")
        configure_log(out)
        return category, _run_category(plan_, category, out / category, resume)
    finally:
        threads.unregister()


@joined
def run_ensemble(config: RunConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Train and test every detector per category, then combine their image scores with the ensemble scorer
    (fitted on validation normal images). Rows: each detector alone, then the ensemble."""
    catalog = get_catalog()
    if len(config.detector) < 2:
        raise AdkitError("--ensemble combines several detectors: give --detector at least twice")
    ensemble_spec = config.ensemble or "mean"
    try:  # fail on bad parameters before training
        catalog["ensemble"].create(ensemble_spec).check(len(config.detector))
    except ValueError as exc:
        raise AdkitError(f"--ensemble {ensemble_spec}: {exc}") from None
    plans = [plan(config.replace(detector=[spec], ensemble=None)) for spec in config.detector]
    names = [_unique_name(p.detector.name, i, plans) for i, p in enumerate(plans)]
    out = output_dir(plans[0].config.replace(detector=config.detector), "ensemble")
    main = _start(out, config.replace(data=plans[0].config.data, category=plans[0].categories, ensemble=ensemble_spec), resume)
    rows: list[dict[str, Any]] = []
    for category in plans[0].categories:
        evaluations = []
        labels = None
        for name, plan_ in zip(names, plans):
            folder = out / name / category
            run_ = train_category(plan_, category, folder, resume=resume)
            evaluation = evaluate(plan_, run_, build_pipeline(plan_, run_.detector))
            if main:
                artifacts.write_category(run_.test, category, evaluation, folder)
            rows.append({"configuration": name, **evaluation.metrics, "folder": f"{name}/{category}"})
            evaluations.append(evaluation)
            labels = run_.test.labels.numpy()
        if not main:
            continue
        ensemble = catalog["ensemble"].create(ensemble_spec)
        ensemble.fit([e.normal_val_scores for e in evaluations])
        combined = ensemble.combine([e.test_scores for e in evaluations]).float()
        fit = fit_threshold(plans[0].threshold, ensemble.combine([e.val_scores for e in evaluations]).float(),
                            evaluations[0].val_labels, category)
        result = {"category": category, "n_test": int(labels.size), "n_anomalous": int(labels.sum()),
                  **threshold_metrics(fit, combined, run_.test), **metrics.image_metrics(labels, combined.numpy())}
        files.write_json(out / "ensemble" / category / "metrics.json", result)
        decisions = thresholds.decide(combined, fit.threshold)
        files.write_scores_csv(out / "ensemble" / category / "scores.csv",
                               artifacts.score_rows([s.path for s in run_.test.samples],
                                                    [s.label for s in run_.test.samples], combined, decisions))
        rows.append({"configuration": f"ensemble {ensemble_spec}", **result})
    if main:
        render.print_bench(rows)
        artifacts.write_bench(out, rows)
        pages.build(out)
        console.say(f"results in {out} (open {out / pages.PAGE})")
    return rows if main else []


def _unique_name(name: str, index: int, plans: list[RunPlan]) -> str:
    same = [p for p in plans if p.detector.name == name]
    return name if len(same) == 1 else f"{name}-{index + 1}"


@joined
def train(config: RunConfig, resume: bool = False) -> Path:
    """Train per category; checkpoints in <out>/<category>/checkpoint.pt. Returns the output folder."""
    plan_ = plan(config)
    out = output_dir(plan_.config, plan_.detector.name)
    main = _start(out, plan_.config, resume)
    for category in plan_.categories:
        run_ = train_category(plan_, category, out / category, resume=resume, load_test=False)
        # so that predict can decide right after train: the threshold on held-out validation images
        split = run_.threshold_split
        scores = run_pipeline(build_pipeline(plan_, run_.detector), split.images,
                              plan_.scoring_batch, plan_.device, precision=plan_.config.precision).scores
        fit = fit_threshold(plan_.threshold, scores, split.labels, category)
        record_threshold(out / category, validation_record(fit, scores, split.labels), plan_.pipeline,
                         _source(plan_, category, "train"))
        if main:
            console.say(f"{category}: {render.threshold_line(fit)}")
    if main:
        console.say(f"checkpoints in {out}")
    return out


@joined
def test(config: RunConfig, checkpoint: Path) -> list[dict[str, Any]]:
    """Evaluate a checkpoint on the test split of the configured dataset (its own category by default)."""
    payload = load_checkpoint(checkpoint)
    plan_ = plan_from_checkpoint(config, payload)
    out = Path(config.out) if config.out else checkpoint.parent / "test"
    main = distributed.is_main()
    if main:
        configure_log(out)
    pipeline, meta = load_trained(plan_.config, checkpoint, plan_.device, payload, plan_.pipeline)
    results = []
    for category in plan_.categories:
        splits = plan_.dataset.load(category)
        size, skip = plan_.geometry, plan_.config.skip_bad
        run_ = CategoryRun(category, pipeline.detector, splits, load_split([], size),
                           load_split(splits.val, size, skip), load_split(splits.test, size, skip), 0.0, out)
        if not run_.val.samples:
            run_.train = load_split(splits.train, size, skip)
        evaluation = evaluate(plan_, run_, pipeline)
        if main:
            if meta.get("lineage"):  # the updates this model went through (adkit update)
                evaluation.metrics["lineage"] = meta["lineage"]
            artifacts.write_category(run_.test, category, evaluation, out / category)
            results.append(evaluation.metrics)
            if category == meta["category"]:  # a threshold for the data the checkpoint was trained on
                record_threshold(checkpoint.parent, validation_record(evaluation.fit, evaluation.val_scores,
                                                                      evaluation.val_labels),
                                 plan_.pipeline, _source(plan_, category, "test"))
    if main:
        _finish(out, {"checkpoint": str(checkpoint), **plan_.config.__dict__}, results,
                f"{plan_.detector} from {checkpoint}")
    return results


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
    device = distributed.local_device(resolve_device(config.device))
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


def export(config: RunConfig, checkpoint: Path, fmt: str, out: Path | None) -> Path:
    """Export a checkpoint's pipeline in a registered format (adkit.deploy.export), its recorded threshold (or
    ``config.threshold`` fitted anew on the stored validation scores) and those scores in model.json."""
    deploy.export_format(fmt)  # an unknown format fails before anything is read
    opened = open_checkpoint(checkpoint, config.replace(compile=False), torch.device("cpu"))
    record, spec, meta, pipeline = opened.decision, opened.spec, opened.meta, opened.pipeline
    if record is None:
        raise AdkitError(f"no threshold for post-processors {spec.post_texts} and scorer {spec.scorer_text} beside "
                         f"{checkpoint}: run adkit test --checkpoint {checkpoint} with these options first")
    chosen = chosen_threshold(record, config.threshold, str(opened.decision_source))
    decision = {k: v for k, v in chosen.items() if k not in ("posts", "scorer")}
    out = out or checkpoint.parent / f"export-{fmt}"
    with exporting():  # what the exported graph computes, which may differ from the eager path
        approximations = pipeline.detector.all_approximations()
    info = {**spec.record(), "backbone": meta.get("backbone"),
            "category": meta["category"], "checkpoint": str(checkpoint),
            "threshold_fitted_on": record["fitted_on"], "approximations": approximations,
            "lineage": meta.get("lineage", [])}
    deploy.export(Deployed(pipeline), fmt, out, checkpoint_geometry(meta), decision, info)
    console.say(f"exported to {out} ({fmt}, threshold {decision['threshold']:.6g}, {decision['policy']})")
    return out


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
