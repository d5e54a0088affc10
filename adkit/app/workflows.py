"""The workflows that train and evaluate: ``run`` (train then test, alone or as an ensemble), ``train`` and
``test``. Each plans, assembles, evaluates and writes through the modules that own those ideas; scoring new images,
exporting and writing the textures are in adkit.app.deployment."""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from adkit.core import console, distributed, threads
from adkit.core.checkpoints import load_checkpoint
from adkit.core.errors import AdkitError
from adkit.core.plugins import get_catalog
from adkit.data.loading import load_split
from adkit.outputs import artifacts, pages, render
from adkit.run.assembly import (
    build_pipeline,
    checkpoint_data,
    load_trained,
    plan_from_checkpoint,
)
from adkit.run.config import RunConfig
from adkit.run.engine import predict as run_pipeline
from adkit.run.evaluation import CategoryRun, evaluate, left_out_scores, train_category
from adkit.run.planning import RunPlan, claim_output, configure_log, dataset_spec, output_dir, plan
from adkit.stats import metrics, thresholds
from adkit.stats.decisions import (
    decision_metrics,
    fit_threshold,
    kept_left_out,
    record_threshold,
    validation_record,
)

T = TypeVar("T")


def joined(workflow: Callable[..., T]) -> Callable[..., T]:
    """A workflow's entry: join the process group torchrun describes (once; nothing in a single process) before
    anything is planned, so rank handling starts in one place and ``plan()`` has no side effect."""

    @functools.wraps(workflow)
    def entry(config: RunConfig, *args: Any, **kwargs: Any) -> T:
        distributed.init_from_environment(distributed.resolve_device(config.device))
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
    main = claim_output(out, resume, plan_.config.to_toml())
    workers = category_workers(plan_)
    if workers > 1:
        results = _categories_in_workers(plan_.config.replace(out=str(out)), plan_.categories, workers, resume)
    else:
        results = [_run_category(plan_, category, out / category, resume) for category in plan_.categories]
    if not main:  # under torchrun the other ranks helped train and score; rank 0 reports
        return []
    _finish(out, plan_.config.__dict__, results, f"{plan_.detector} on {plan_.config.data}")
    return results


def _finish(out: Path, header: dict[str, Any], results: list[dict[str, Any]], title: str) -> None:
    """The end of ``run`` and ``test`` on rank 0: the table, the summary files and the page, and where they are."""
    render.print_summary(results, title)
    artifacts.write_summary(out, header, results)
    console.say(f"results in {out} (open {out / pages.PAGE})")


def _run_category(plan_: RunPlan, category: str, folder: Path, resume: bool) -> dict[str, Any]:
    """Train, evaluate and write one category of ``run``; its metrics (rank 0 writes and reports)."""
    run_ = train_category(plan_, category, folder, resume=resume)
    evaluation = evaluate(plan_, run_, build_pipeline(plan_, run_.detector))
    if distributed.is_main():  # under torchrun rank 0 reports; the other ranks helped train and score
        # the threshold predict reads beside the checkpoint, written with the category's other files
        artifacts.write_category(run_.test, category, evaluation, folder,
                                 (plan_.pipeline, _source(plan_, category, "run")))
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
    plans = [plan(config.replace(detector=[spec], ensemble=None), member=True) for spec in config.detector]
    if not any(p.learns_defects for p in plans) and "train_defects" in dataset_spec(catalog, config)[1]:
        plan(config.replace(detector=config.detector[:1], ensemble=None))  # refuses: no member learns from them
    names = [_unique_name(p.detector.name, i, plans) for i, p in enumerate(plans)]
    out = output_dir(plans[0].config.replace(detector=config.detector), "ensemble")
    main = claim_output(out, resume, config.replace(data=plans[0].config.data, category=plans[0].categories,
                                                       ensemble=ensemble_spec).to_toml())
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
        # the members' left-out scores of the same training images, combined, where every member gave them
        left = [e.left_out for e in evaluations]
        together = all(x is not None for x in left) and len({len(x) for x in left}) == 1
        fit = fit_threshold(plans[0].threshold, ensemble.combine([e.val_scores for e in evaluations]).float(),
                            evaluations[0].val_labels, category, ensemble.combine(left).float() if together else None)
        result = {"category": category, "n_test": int(labels.size), "n_anomalous": int(labels.sum()),
                  "train_defects": max(e.metrics["train_defects"] for e in evaluations),  # by its members that learn
                  **decision_metrics(fit, combined, labels, [s.defect for s in run_.test.samples]), **metrics.image_metrics(labels, combined.numpy())}
        artifacts.write_scored(out / "ensemble" / category, run_.test, combined,
                               thresholds.decide(combined, fit.threshold), result)
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
    main = claim_output(out, resume, plan_.config.to_toml())
    for category in plan_.categories:
        run_ = train_category(plan_, category, out / category, resume=resume, load_test=False)
        # so that predict can decide right after train: the threshold on held-out validation images (and the
        # training images left out, where the detector can), as run fits it
        split = run_.threshold_split
        pipeline = build_pipeline(plan_, run_.detector)
        scores = run_pipeline(pipeline, split.images, plan_.scoring_batch, plan_.device,
                              precision=plan_.config.precision).scores
        left_out = left_out_scores(plan_, run_, pipeline, scores[split.labels == 0])
        fit = fit_threshold(plan_.threshold, scores, split.labels, category, left_out)
        record_threshold(out / category, validation_record(fit, scores, split.labels, left_out), plan_.pipeline,
                         _source(plan_, category, "train"))
        if main:
            console.say(f"{category}: {render.threshold_line(fit)}")
    if main:
        console.say(f"checkpoints in {out}")
    return out


@joined
def test(config: RunConfig, checkpoint: Path) -> list[dict[str, Any]]:
    """Evaluate a checkpoint on the test split of the dataset it was trained on (its recorded configuration)
    or of the one ``config`` names, its own category by default."""
    payload = load_checkpoint(checkpoint)
    plan_ = plan_from_checkpoint(checkpoint_data(config, payload["meta"]), payload["meta"])
    out = Path(config.out) if config.out else checkpoint.parent / "test"
    main = distributed.is_main()
    if main:
        configure_log(out)
    pipeline, meta = load_trained(plan_.config, checkpoint, plan_.device, payload, plan_.pipeline)
    # the training images' left-out scores its threshold pooled: the training images are not read here
    kept = kept_left_out(checkpoint.parent, plan_.pipeline)
    results = []
    for category in plan_.categories:
        splits = plan_.dataset.load(category)
        size, skip = plan_.geometry, plan_.config.skip_bad
        run_ = CategoryRun(category, pipeline.detector, splits, load_split([], size),
                           load_split(splits.val, size, skip), load_split(splits.test, size, skip), 0.0, out)
        if not run_.val.samples:
            run_.train = load_split(splits.train, size, skip)
        evaluation = evaluate(plan_, run_, pipeline, left_out=kept if category == meta["category"] else None)
        if main:
            if meta.get("lineage"):  # the updates this model went through (adkit update)
                evaluation.metrics["lineage"] = meta["lineage"]
            artifacts.write_category(run_.test, category, evaluation, out / category)
            results.append(evaluation.metrics)
            if category == meta["category"]:  # a threshold for the data the checkpoint was trained on
                record_threshold(checkpoint.parent, evaluation.validation,
                                 plan_.pipeline, _source(plan_, category, "test"))
    if main:
        _finish(out, {"checkpoint": str(checkpoint), **plan_.config.__dict__}, results,
                f"{plan_.detector} from {checkpoint}")
    return results
