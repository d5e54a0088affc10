"""Everything the CLI does, callable from Python: ``run``, ``train``, ``test``, ``predict``, ``bench``, ``synth``."""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from sklearn.metrics import roc_curve

from adkit import distributed, metrics, report
from adkit.components import Detector, DetectorContext, Pipeline
from adkit.config import RunConfig
from adkit.data.datasets import AnomalyDataset, CategorySplits, LoadedSplit, Sample, load_split
from adkit.data.io import is_image_file, list_images
from adkit.engine import (
    TrainSettings,
    load_checkpoint,
    resolve_device,
    restore,
    seed_everything,
    train_detector,
    upsample,
)
from adkit.engine import predict as run_pipeline
from adkit.errors import AdkitError
from adkit.plugins import Catalog, get_catalog
from adkit.registry import ComponentSpec, split_spec

console = Console(stderr=True)
log = logging.getLogger("adkit")

ENGINE_DEFAULTS = {"image_size": 256, "batch_size": 8, "steps": 1000}
OVERLAY_SAMPLES = 8


@dataclass
class RunPlan:
    """A configuration resolved against the catalog: specs checked, preset applied."""

    config: RunConfig
    catalog: Catalog
    detector: ComponentSpec
    preset: dict[str, Any]
    image_size: int
    batch_size: int
    steps: int | None  # None: derived from epochs and the training-set size
    epochs: int | None
    posts: list[str]
    scorer: str
    dataset: AnomalyDataset
    categories: list[str]
    device: torch.device

    def steps_for(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, self.epochs * max(1, n_train // self.batch_size))


def print_plugins(show_all: bool = False, catalog: Catalog | None = None) -> None:
    """A rich table of plugins, then one of every registered component (with parameters when ``show_all``)."""
    catalog = catalog or get_catalog()
    out = Console()
    table = Table(title="adkit plugins")
    for column in ("plugin", "version", "source", "status"):
        table.add_column(column)
    for record in sorted(catalog.plugins.values(), key=lambda r: r.name):
        status = record.status if record.status != "broken" else f"[red]broken[/red]: {escape(record.error)}"
        status += "".join(f"\n[yellow]warning[/yellow]: {escape(w)}" for w in record.warnings)
        table.add_row(record.name, record.version, record.source, status)
    out.print(table)
    components = Table(title="components")
    for column in ("kind", "name", "plugin", "help") + (("parameters",) if show_all else ()):
        components.add_column(column, overflow="fold")
    for kind, registry in catalog.registries.items():
        for info in registry:
            row = [kind, info.name, info.plugin, escape(info.help)]  # help text is plain text, not rich markup
            if show_all:
                row.append(escape(", ".join(f"{p.name}: {p.type_name}" + ("" if p.required else f" = {p.default!r}")
                                            for p in info.params.values())))
            components.add_row(*row)
    out.print(components)


def _detector_class(catalog: Catalog, name: str) -> type[Detector]:
    return catalog["detector"].get(name).factory


def plan(config: RunConfig, catalog: Catalog | None = None) -> RunPlan:
    """Check every spec of ``config`` against the catalog and apply the preset."""
    catalog = catalog or get_catalog()
    if not config.detector:
        raise AdkitError(f"give a detector with --detector NAME (available: {', '.join(catalog['detector'].names()) or 'none'})")
    if len(config.detector) > 1:
        raise AdkitError("plan() takes one detector; run() trains several as an ensemble")
    name, raw = split_spec(config.detector[0], "detector")
    info = catalog["detector"].get(name)
    cls: type[Detector] = info.factory  # the registry admits only Detector classes
    presets = cls.presets
    on_synthetic = split_spec(config.data)[0] == "synthetic" and not config.normal
    preset_name = config.preset or ("quick" if on_synthetic and "quick" in presets else None)
    if not presets:  # nothing to set (a fitted detector): --preset is for the other detectors of an ensemble
        preset_name = None
    if preset_name is not None and preset_name not in presets:
        raise AdkitError(f"--preset {preset_name}: detector {name!r} has presets {', '.join(presets) or 'none'}")
    preset = presets.get(preset_name, {}) if preset_name else {}
    # --sampler / --backbone replace the detector's own parameter of that name: the spec shows what is used
    flags = {key: value for key, value in (("sampler", config.sampler), ("backbone", config.backbone))
             if value and key in info.params}
    detector = catalog["detector"].parse(name, overrides={**preset.get("params", {}), **raw, **flags})
    consumes = cls.consumes
    for option, value in (("loss", config.loss), ("sampler", config.sampler), ("backbone", config.backbone),
                          ("anomaly-source", config.anomaly_source)):
        if value and option.replace("-", "_") not in consumes:
            console.print(f"warning: --{option} is ignored: detector {name!r} uses no {option.replace('-', ' ')}")
    for spec in config.loss:
        catalog["loss"].parse(spec)
    posts = list(config.post) or list(cls.default_postprocessors)
    # build them once now so that out-of-range values fail before any data is loaded or trained on
    for spec in posts:
        catalog["postprocessor"].create(spec)
    scorer = config.scorer or cls.default_scorer
    catalog["scorer"].create(scorer)
    if config.sampler:
        catalog["sampler"].parse(config.sampler)
    if config.backbone:
        catalog["backbone"].parse(config.backbone)
    if config.pixel_map not in ("raw", "post"):
        raise AdkitError("--pixel-map must be raw or post")
    dataset = make_dataset(catalog, config)
    categories = dataset.resolve_categories(list(config.category))
    for option, value in (("--image-size", config.image_size), ("--batch-size", config.batch_size),
                          ("--steps", config.steps), ("--checkpoint-every", config.checkpoint_every)):
        if value is not None and value < 1:
            raise AdkitError(f"{option} must be >= 1, got {value}")

    def setting(value: int | None, key: str) -> int | None:
        return value if value is not None else preset.get(key)

    steps = setting(config.steps, "steps")
    epochs = preset.get("epochs") if steps is None else None
    if steps is None and epochs is None:
        steps = ENGINE_DEFAULTS["steps"]
    image_size = setting(config.image_size, "image_size") or ENGINE_DEFAULTS["image_size"]
    batch_size = setting(config.batch_size, "batch_size") or ENGINE_DEFAULTS["batch_size"]
    resolved = config.replace(preset=preset_name, image_size=image_size, batch_size=batch_size, steps=steps,
                              post=posts, scorer=scorer, category=categories)
    device = distributed.init_from_environment(resolve_device(config.device))
    return RunPlan(resolved, catalog, detector, preset, image_size, batch_size, steps, epochs, posts, scorer,
                   dataset, categories, device)


def make_dataset(catalog: Catalog, config: RunConfig) -> AnomalyDataset:
    """The dataset a config names; ``--root`` fills a ``root`` parameter, ``--normal/--abnormal/--masks``
    select the folder dataset."""
    name, raw = split_spec(config.data, "dataset")
    folders = {k: v for k, v in (("normal", config.normal), ("abnormal", config.abnormal),
                                 ("masks", config.masks)) if v}
    if folders:
        if name not in ("folder", "synthetic") or "normal" not in folders:
            raise AdkitError("--normal/--abnormal/--masks describe the folder dataset: give --normal DIR "
                             "(and use --data folder or leave --data out)")
        name = "folder"
        raw.update(folders)
    info = catalog["dataset"].get(name)
    if config.root and "root" in info.params and "root" not in raw:
        raw["root"] = config.root
    return catalog["dataset"].create(name, **raw)


def _output_dir(config: RunConfig, detector: str) -> Path:
    if config.out:
        return Path(config.out)
    cats = "-".join(config.category) if len(config.category) <= 2 else f"{len(config.category)}cats"
    data = split_spec(config.data)[0]
    default = Path("runs") / f"{detector}-{data}-{cats}-{time.strftime('%Y%m%d-%H%M%S')}"
    return distributed.all_gather_objects(default)[0]  # under torchrun every rank takes rank 0's clock


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False, disable=distributed.process_rank() != 0)


def build_detector(plan_: RunPlan, detector_spec: ComponentSpec | str | None = None) -> Detector:
    return _make_detector(plan_.catalog, detector_spec or plan_.detector, plan_.config, plan_.image_size,
                          plan_.device)


def _make_detector(catalog: Catalog, spec: ComponentSpec | str, config: RunConfig, image_size: int,
                   device: torch.device) -> Detector:
    """Create a detector from its spec (the registry checks that it is a Detector) and set it up for ``config``
    (losses, sampler, backbone, anomaly source)."""
    detector = catalog["detector"].create(spec)
    detector.setup(DetectorContext(
        catalog=catalog, image_size=image_size, device=device, seed=config.seed,
        losses=list(config.loss), replace_losses=config.loss_only, sampler=config.sampler, backbone=config.backbone,
        anomaly_source=Path(config.anomaly_source) if config.anomaly_source else None))
    return detector


def build_pipeline(plan_: RunPlan, detector: Detector, posts: list[str] | None = None,
                   scorer: str | None = None) -> Pipeline:
    return _make_pipeline(plan_.catalog, detector, plan_.posts if posts is None else posts, scorer or plan_.scorer,
                          plan_.config.compile)


def _make_pipeline(catalog: Catalog, detector: Detector, posts: list[str], scorer: str, compile_: bool) -> Pipeline:
    pipeline = Pipeline(detector, [catalog["postprocessor"].create(p) for p in posts],
                        catalog["scorer"].create(scorer))
    if compile_:
        pipeline.compile()
    return pipeline


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


def train_category(plan_: RunPlan, category: str, folder: Path, resume: bool = False,
                   load_test: bool = True) -> CategoryRun:
    """Load one category's data and train a fresh detector on it (checkpoint in ``folder``)."""
    cfg = plan_.config
    seed_everything(cfg.seed)
    splits = plan_.dataset.load(category)
    train = load_split(splits.train, plan_.image_size, cfg.skip_bad)
    val = load_split(splits.val, plan_.image_size, cfg.skip_bad)
    test = load_split(splits.test, plan_.image_size, cfg.skip_bad) if load_test else load_split([], plan_.image_size)
    if len(train.samples) == 0:
        raise AdkitError(f"{category}: no readable training images")
    detector = build_detector(plan_)
    steps = plan_.steps_for(len(train.samples)) if detector.trainable else 1
    settings = TrainSettings(steps=steps, batch_size=plan_.batch_size, seed=cfg.seed,
                             checkpoint_every=cfg.checkpoint_every or 0, compile=cfg.compile,
                             precision=cfg.precision)
    meta = {"detector": str(plan_.detector), "backbone": cfg.backbone, "category": category,
            "image_size": plan_.image_size,
            "config": cfg.to_toml(), "posts": plan_.posts, "scorer": plan_.scorer}
    with _progress() as progress:
        task = progress.add_task(f"train {plan_.detector.name} {category}", total=steps, info="")
        started = time.perf_counter()

        def on_step(step: int, total: int, losses: dict[str, float] | None) -> None:
            rate = (step * plan_.batch_size) / max(time.perf_counter() - started, 1e-9)
            info = f"loss {losses['loss']:.4f} | {rate:.1f} img/s" if losses else ""
            progress.update(task, completed=step, info=info if info else progress.tasks[task].fields["info"])

        result = train_detector(detector, train.images, settings, plan_.device, folder / "checkpoint.pt", meta,
                                resume=resume, on_step=on_step)
        progress.update(task, completed=steps)
    log.info("%s: trained %d steps in %.1f s", category, result.steps, result.seconds)
    if distributed.is_main() and detector.trainable:
        report.write_history_csv(folder / "history.csv", result.history)
    skipped = train.skipped + val.skipped + test.skipped
    return CategoryRun(category, detector, splits, train, val, test, result.seconds, folder, skipped)


def _threshold_split(run_: CategoryRun) -> LoadedSplit:
    """The normal images thresholds are fitted on: the validation split, or the training images without one."""
    return run_.val if len(run_.val.samples) else run_.train


def _scoring_batch(plan_: RunPlan) -> int:
    """Inference batch size: at least 8, since scoring holds no gradients."""
    return max(plan_.batch_size, 8)


def evaluate(plan_: RunPlan, run_: CategoryRun, pipeline: Pipeline, folder: Path,
             write_files: bool = True, scores_out: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Test metrics for one category and pipeline; the threshold is fitted on the validation split.
    ``scores_out``, when given, receives the image scores of the ``test`` and ``val`` splits. Under torchrun
    every rank scores a shard of the images; rank 0 gets them all, computes the metrics and writes the files,
    the other ranks return an empty dict."""
    device, batch = plan_.device, _scoring_batch(plan_)
    val_source = _threshold_split(run_)
    n_test, n_val = len(run_.test.samples), len(val_source.samples)
    with _progress() as progress:
        task = progress.add_task(f"evaluate {run_.category}", total=n_test + n_val, info="")
        precision = plan_.config.precision
        test = run_pipeline(pipeline, run_.test.images, batch, device,
                            on_batch=lambda done: progress.update(task, completed=done), precision=precision)
        val = run_pipeline(pipeline, val_source.images, batch, device,
                           on_batch=lambda done: progress.update(task, completed=n_test + done), precision=precision)
    if scores_out is not None:
        scores_out.update(test=test.scores, val=val.scores)
    if not distributed.is_main():
        return {}
    default_scorer = _detector_class(plan_.catalog, plan_.detector.name).default_scorer
    if test.own_scores and plan_.scorer != default_scorer:
        console.print(f"warning: {plan_.detector.name} computes its own image scores; --scorer {plan_.scorer} "
                      "is not used (see its score= parameter)")
    threshold = metrics.fit_threshold(val.scores.numpy())
    labels = run_.test.labels.numpy()
    result: dict[str, Any] = {"category": run_.category, "n_test": int(labels.size),
                              "n_anomalous": int(labels.sum()), "threshold": threshold,
                              "image_score": "detector" if test.own_scores else plan_.scorer}
    result.update(metrics.image_metrics(labels, test.scores.numpy()))
    pixel_maps = test.raw if plan_.config.pixel_map == "raw" else upsample(test.processed, test.raw.shape[-2:])
    masks = run_.test.masks[:, 0].numpy()
    if masks.any() and test.native_size != (1, 1):  # an image-level detector has no pixel-level opinion
        result.update(metrics.pixel_metrics(pixel_maps[:, 0].numpy(), masks))
    result["infer_img_s"] = len(labels) / max(test.seconds, 1e-9)
    result["train_s"] = run_.train_seconds
    result["skipped"] = [str(p) for p, _ in run_.skipped]
    if write_files:
        _write_category_files(run_, test.scores, pixel_maps, threshold, result, folder)
    return result


def _write_category_files(run_: CategoryRun, scores: torch.Tensor, maps: torch.Tensor, threshold: float,
                          result: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    report.write_json(folder / "metrics.json", result)
    _write_curves(run_, scores, maps, result, folder)
    samples = run_.test.samples
    report.write_scores_csv(folder / "scores.csv", score_rows([s.path for s in samples], [s.label for s in samples],
                                                              scores, threshold))
    pixel_threshold = float(np.quantile(maps[run_.test.labels == 0].numpy(), 0.99)) if (run_.test.labels == 0).any() else 0.5
    vmax = float(maps.max()) if maps.numel() else 1.0
    for i in _overlay_sample(run_.test.samples):
        sample = run_.test.samples[i]
        panel = report.overlay_panel(run_.test.images[i], maps[i], pixel_threshold, vmax, run_.test.masks[i])
        report.save_png_atomic(panel, folder / "overlays" / f"{sample.defect}-{sample.path.stem}.png")


def score_rows(paths: list[Path], labels: list[Any], scores: torch.Tensor, threshold: float | None) -> list[dict[str, Any]]:
    """scores.csv rows: path, label ("" when unknown), score, and the decision score > threshold (blank without
    a threshold)."""
    return [{"path": str(path), "label": label, "score": f"{float(score):.6g}",
             "prediction": "" if threshold is None else int(float(score) > threshold)}
            for path, label, score in zip(paths, labels, scores)]


def _overlay_sample(samples: list[Any], count: int = OVERLAY_SAMPLES) -> list[int]:
    """Indices of up to ``count`` test images, taken round-robin over defect types (normal images last)."""
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.defect, []).append(i)
    queues = [groups[k] for k in sorted(groups, key=lambda d: (d == "good", d))]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def _write_curves(run_: CategoryRun, scores: torch.Tensor, maps: torch.Tensor, result: dict[str, Any],
                  folder: Path) -> None:
    """roc.png (image and pixel ROC) and pro.png (PRO against FPR, the 0.3 limit marked)."""
    labels = run_.test.labels.numpy()
    masks = run_.test.masks[:, 0].numpy() > 0.5
    curves = []
    if 0 < labels.sum() < labels.size:
        fpr, tpr, _ = roc_curve(labels, scores.numpy())
        curves.append((f"image AUROC {result['image_auroc']:.3f}", fpr, tpr))
    if "pixel_auroc" in result and not masks.all():  # no pixel metrics: image-level detector or no masks
        fpr, tpr, _ = roc_curve(masks.ravel(), maps[:, 0].numpy().ravel())
        curves.append((f"pixel AUROC {result['pixel_auroc']:.3f}", fpr, tpr))
        fprs, pros = metrics.pro_curve(maps[:, 0].numpy(), masks)
        step = max(1, len(fprs) // 2000)
        report.save_png_atomic(report.curve_plot([(f"AUPRO@0.3 {result['aupro']:.3f}", fprs[::step], pros[::step])],
                                                 f"PRO curve, {run_.category}", "FPR", "PRO", x_marker=0.3),
                               folder / "pro.png")
    if curves:
        report.save_png_atomic(report.curve_plot(curves, f"ROC, {run_.category}", "FPR", "TPR"), folder / "roc.png")


def _claim_output(out: Path, resume: bool) -> None:
    """Refuse to write into a folder that holds another run's checkpoints (unless resuming it), before any
    file is written there."""
    if out.is_dir() and not resume:
        existing = next(out.rglob("checkpoint.pt"), None)
        if existing is not None:
            raise AdkitError(f"{out} already holds a run ({existing}): choose another --out, or pass --resume")
    if distributed.is_main():
        _configure_log(out)
    distributed.barrier()  # no rank writes there before every rank has checked


def _configure_log(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers = [handler]
    log.setLevel(logging.INFO)


METRIC_COLUMNS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")


def _summary_table(results: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("category")
    for column in METRIC_COLUMNS:
        table.add_column(column, justify="right")
    table.add_column("train s", justify="right")
    table.add_column("img/s", justify="right")
    for row in results + [_mean_row(results)]:
        table.add_row(row["category"], *[_fmt(row.get(c)) for c in METRIC_COLUMNS],
                      _fmt(row.get("train_s"), 1), _fmt(row.get("infer_img_s"), 1))
    return table


def _mean_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"category": "mean"}
    for column in (*METRIC_COLUMNS, "train_s", "infer_img_s"):
        values = [r[column] for r in results if isinstance(r.get(column), float) and not np.isnan(r[column])]
        mean[column] = float(np.mean(values)) if values else float("nan")
    return mean


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _markdown(results: list[dict[str, Any]]) -> str:
    header = "| category | " + " | ".join(METRIC_COLUMNS) + " | train s | img/s |"
    lines = [header, "|" + "---|" * (len(METRIC_COLUMNS) + 3)]
    for row in results + [_mean_row(results)]:
        cells = [row["category"], *[_fmt(row.get(c)) for c in METRIC_COLUMNS], _fmt(row.get("train_s"), 1),
                 _fmt(row.get("infer_img_s"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config: RunConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Train then test per category; writes everything under the output folder and prints the table.
    Several detectors (or ``--ensemble``) train each one and report each alone and their ensemble."""
    if len(config.detector) > 1 or config.ensemble:
        return run_ensemble(config, resume)
    plan_ = plan(config)
    out = _output_dir(plan_.config, plan_.detector.name)
    _claim_output(out, resume)
    main = distributed.is_main()
    if main:
        report.write_text_atomic(out / "config.toml", plan_.config.to_toml())
    results = []
    for category in plan_.categories:
        folder = out / category
        run_ = train_category(plan_, category, folder, resume=resume)
        result = evaluate(plan_, run_, build_pipeline(plan_, run_.detector), folder)
        if main:  # under torchrun rank 0 reports; the other ranks helped train and score
            results.append(result)
            record_threshold(folder, result["threshold"], plan_.posts, plan_.scorer,
                             f"validation split of {plan_.config.data} {category} (adkit run)")
    if not main:
        return results
    report.write_json(out / "summary.json", {"config": plan_.config.__dict__, "results": results})
    report.write_text_atomic(out / "summary.md", _markdown(results))
    Console().print(_summary_table(results, f"{plan_.detector} on {plan_.config.data}"))
    console.print(f"results in {out}")
    return results


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
    out = _output_dir(plans[0].config.replace(detector=config.detector), "ensemble")
    _claim_output(out, resume)
    main = distributed.is_main()
    if main:
        report.write_text_atomic(out / "config.toml", config.replace(
            category=plans[0].categories, ensemble=ensemble_spec).to_toml())
    rows: list[dict[str, Any]] = []
    for category in plans[0].categories:
        per_detector: list[dict[str, torch.Tensor]] = []
        labels = None
        for name, plan_ in zip(names, plans):
            folder = out / name / category
            run_ = train_category(plan_, category, folder, resume=resume)
            scores: dict[str, torch.Tensor] = {}
            result = evaluate(plan_, run_, build_pipeline(plan_, run_.detector), folder, scores_out=scores)
            rows.append({"configuration": name, **result})
            per_detector.append(scores)
            labels = run_.test.labels.numpy()
        if not main:
            continue
        ensemble = catalog["ensemble"].create(ensemble_spec)
        ensemble.fit([s["val"] for s in per_detector])
        combined = ensemble.combine([s["test"] for s in per_detector]).float()
        result = {"category": category, "n_test": int(labels.size), "n_anomalous": int(labels.sum()),
                  **metrics.image_metrics(labels, combined.numpy())}
        report.write_json(out / "ensemble" / category / "metrics.json", result)
        rows.append({"configuration": f"ensemble {ensemble_spec}", **result})
    if main:
        _print_bench(rows, out)
    return rows if main else []


def _unique_name(name: str, index: int, plans: list[RunPlan]) -> str:
    same = [p for p in plans if p.detector.name == name]
    return name if len(same) == 1 else f"{name}-{index + 1}"


def train(config: RunConfig, resume: bool = False) -> Path:
    """Train per category; checkpoints in <out>/<category>/checkpoint.pt. Returns the output folder."""
    plan_ = plan(config)
    out = _output_dir(plan_.config, plan_.detector.name)
    _claim_output(out, resume)
    if distributed.is_main():
        report.write_text_atomic(out / "config.toml", plan_.config.to_toml())
    for category in plan_.categories:
        run_ = train_category(plan_, category, out / category, resume=resume, load_test=False)
        # so that predict can decide right after train: the threshold on held-out normal images
        scores = run_pipeline(build_pipeline(plan_, run_.detector), _threshold_split(run_).images,
                              _scoring_batch(plan_), plan_.device, precision=plan_.config.precision).scores
        record_threshold(out / category, metrics.fit_threshold(scores.numpy()), plan_.posts, plan_.scorer,
                         f"validation split of {plan_.config.data} {category} (adkit train)")
    if distributed.is_main():
        console.print(f"checkpoints in {out}")
    return out


def _pipeline_specs(config: RunConfig, meta: dict[str, Any]) -> tuple[list[str], str]:
    """The post-processors and scorer to run a checkpoint with: ``config``'s where it names them, else those the
    checkpoint was trained and evaluated with."""
    return list(config.post) or meta.get("posts", []), config.scorer or meta.get("scorer", "max")


def _plan_from_checkpoint(config: RunConfig, payload: dict[str, Any]) -> RunPlan:
    meta = payload["meta"]
    posts, scorer = _pipeline_specs(config, meta)
    return plan(config.replace(detector=[meta["detector"]], image_size=meta["image_size"], post=posts,
                               backbone=config.backbone or meta.get("backbone"), scorer=scorer,
                               category=list(config.category) or [meta["category"]]))


def load_trained(config: RunConfig, checkpoint: Path, device: torch.device,
                 payload: dict[str, Any] | None = None) -> tuple[Pipeline, dict[str, Any]]:
    """The one restore path of ``test`` and ``predict``: the checkpoint's detector, set up as it was trained (its
    spec, image size and backbone; run options from ``config``), its trained or fitted state restored, in the
    pipeline it was evaluated with (post-processors and scorer from the checkpoint unless ``config`` names
    others). Returns the pipeline and the checkpoint's meta."""
    payload = payload if payload is not None else load_checkpoint(checkpoint)
    meta = payload["meta"]
    catalog = get_catalog()
    setup_config = config.replace(backbone=config.backbone or meta.get("backbone"))
    detector = _make_detector(catalog, meta["detector"], setup_config, meta["image_size"], device)
    restore(detector, payload, checkpoint)
    posts, scorer = _pipeline_specs(config, meta)
    pipeline = _make_pipeline(catalog, detector, posts, scorer, config.compile)
    return pipeline, meta


THRESHOLD_FILE = "threshold.json"


def record_threshold(checkpoint_dir: Path, threshold: float, posts: list[str], scorer: str, source: str) -> None:
    """Write the image-score threshold fitted on validation data beside the checkpoint, with the post-processors
    and scorer it holds for: ``predict`` reads it after ``train``, ``test`` or ``run`` alike."""
    if distributed.is_main():
        report.write_json(checkpoint_dir / THRESHOLD_FILE, {"threshold": threshold, "posts": list(posts),
                                                             "scorer": scorer, "fitted_on": source})


def recorded_threshold(checkpoint_dir: Path, posts: list[str], scorer: str) -> float | None:
    """The recorded threshold if it was fitted for these post-processors and scorer; None (with a warning when
    it was fitted for others) otherwise."""
    path = checkpoint_dir / THRESHOLD_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    if recorded.get("posts") != list(posts) or recorded.get("scorer") != scorer:
        console.print(f"warning: the threshold in {path} was fitted for post-processors {recorded.get('posts')} and "
                      f"scorer {recorded.get('scorer')}, not {list(posts)} and {scorer}: no decisions are written; "
                      "run adkit test with these options to fit one")
        return None
    return float(recorded["threshold"])


def test(config: RunConfig, checkpoint: Path) -> list[dict[str, Any]]:
    """Evaluate a checkpoint on the test split of the configured dataset (its own category by default)."""
    payload = load_checkpoint(checkpoint)
    plan_ = _plan_from_checkpoint(config, payload)
    out = Path(config.out) if config.out else checkpoint.parent / "test"
    main = distributed.is_main()
    if main:
        _configure_log(out)
    pipeline, meta = load_trained(plan_.config, checkpoint, plan_.device, payload)
    results = []
    for category in plan_.categories:
        splits = plan_.dataset.load(category)
        size, skip = plan_.image_size, plan_.config.skip_bad
        run_ = CategoryRun(category, pipeline.detector, splits, load_split([], size),
                           load_split(splits.val, size, skip), load_split(splits.test, size, skip), 0.0, out)
        if not run_.val.samples:
            run_.train = load_split(splits.train, size, skip)
        result = evaluate(plan_, run_, pipeline, out / category)
        if main:
            results.append(result)
            if category == meta["category"]:  # a threshold for the data the checkpoint was trained on
                record_threshold(checkpoint.parent, result["threshold"], plan_.posts, plan_.scorer,
                                 f"validation split of {plan_.config.data} {category} (adkit test)")
    if main:
        Console().print(_summary_table(results, f"{plan_.detector} from {checkpoint}"))
    return results


def predict(config: RunConfig, checkpoint: Path, inputs: list[Path]) -> Path:
    """Score images without labels; writes scores.csv and overlays to --out (default: beside the checkpoint)."""
    payload = load_checkpoint(checkpoint)
    meta = payload["meta"]
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
    device = distributed.init_from_environment(resolve_device(config.device))
    size = meta["image_size"]
    pipeline, _ = load_trained(config, checkpoint, device, payload)
    posts, scorer = _pipeline_specs(config, meta)
    threshold = recorded_threshold(checkpoint.parent, posts, scorer)
    out = Path(config.out) if config.out else checkpoint.parent / "predict"
    loaded = load_split([Sample(path, 0) for path in paths], size, config.skip_bad)
    if not loaded.samples:
        raise AdkitError("no readable images to score")
    kept = [sample.path for sample in loaded.samples]
    result = run_pipeline(pipeline, loaded.images, config.batch_size or 8, device, precision=config.precision)
    if not distributed.is_main():  # under torchrun every rank scored a shard; rank 0 writes
        return out
    report.write_scores_csv(out / "scores.csv", score_rows(kept, [""] * len(kept), result.scores, threshold))
    vmax = float(result.raw.max())
    pixel_threshold = float(np.quantile(result.raw.numpy(), 0.99))
    for i, path in enumerate(kept[:OVERLAY_SAMPLES * 4]):
        panel = report.overlay_panel(loaded.images[i], result.raw[i], pixel_threshold, vmax)
        report.save_png_atomic(panel, out / "overlays" / f"{path.stem}.png")
    console.print(f"scored {len(kept)} images ({len(loaded.skipped)} skipped); results in {out}")
    return out


def bench(config: RunConfig, grid: list[str]) -> list[dict[str, Any]]:
    """Run a configuration over categories; with ``grid`` axes (key=v1,v2) run every combination, training
    once per detector/loss setting and re-scoring for post/scorer changes. Under torchrun the jobs (category x
    training setting) are dealt to the ranks round-robin, each trained by one rank alone, and rank 0 gathers the
    rows into the table a single process would write."""
    axes = _parse_grid(grid)
    train_keys = [k for k in axes if k in TRAIN_AXES]
    score_keys = [k for k in axes if k in ("post", "scorer")]
    base = plan(config)
    out = _output_dir(base.config, "bench")
    _claim_output(out, resume=False)
    jobs: list[tuple[tuple[str, ...], RunPlan, str]] = []
    for train_values in itertools.product(*(axes[k] for k in train_keys)):
        train_cfg = config
        for key, value in zip(train_keys, train_values):
            train_cfg = _apply_axis(train_cfg, key, value)
        plan_ = plan(train_cfg)
        jobs += [(train_values, plan_, category) for category in plan_.categories]
    mine: list[tuple[int, list[dict[str, Any]]]] = []
    workers, me = distributed.process_count(), distributed.process_rank()
    with distributed.alone():
        for job in range(me, len(jobs), workers):
            train_values, plan_, category = jobs[job]
            where = f" (rank {me})" if workers > 1 else ""
            console.print(f"bench job {job + 1}/{len(jobs)}{where}: {category} " +
                          " ".join(f"{k}={v}" for k, v in zip(train_keys, train_values)))
            mine.append((job, _bench_job(plan_, category, out, train_keys, train_values, score_keys, axes)))
    gathered = [item for part in distributed.all_gather_objects(mine) for item in part]
    rows = [row for _, job_rows in sorted(gathered, key=lambda item: item[0]) for row in job_rows]
    if distributed.is_main():
        _print_bench(rows, out)
    return rows


def _bench_job(plan_: RunPlan, category: str, out: Path, train_keys: list[str], train_values: tuple[str, ...],
               score_keys: list[str], axes: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Train one category with one training setting, then score it with every post/scorer combination."""
    name = "-".join(str(v).replace(":", "_").replace("+", "_") for v in train_values) or "base"
    run_ = train_category(plan_, category, out / name / category)
    rows = []
    for score_values in itertools.product(*(axes[k] for k in score_keys)):
        posts, scorer = plan_.posts, plan_.scorer
        for key, value in zip(score_keys, score_values):
            if key == "post":
                posts = [] if value == "none" else value.split("+")
            else:
                scorer = value
        label = " ".join(f"{k}={v}" for k, v in zip(train_keys + score_keys, train_values + score_values))
        result = evaluate(plan_, run_, build_pipeline(plan_, run_.detector, posts, scorer),
                          out / name / category, write_files=not score_keys)
        rows.append({"configuration": label or str(plan_.detector), **result})
    return rows


# grid axes that need a training of their own; post and scorer only re-score
TRAIN_AXES = ("detector", "loss", "preset", "seed")


def _parse_grid(grid: list[str]) -> dict[str, list[str]]:
    axes: dict[str, list[str]] = {}
    for item in grid:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or key not in (*TRAIN_AXES, "post", "scorer"):
            raise AdkitError(f"--grid {item!r}: write KEY=v1,v2 with KEY one of "
                             f"{', '.join((*TRAIN_AXES, 'post', 'scorer'))}")
        axes[key] = [v.strip() for v in values.split(",") if v.strip()]
        if not axes[key]:
            raise AdkitError(f"--grid {item!r} has no values")
        if key == "seed" and not all(v.isdigit() for v in axes[key]):
            raise AdkitError(f"--grid {item!r}: seeds are non-negative integers")
    return axes


def _apply_axis(config: RunConfig, key: str, value: str) -> RunConfig:
    if key == "detector":
        return config.replace(detector=[value])
    if key == "preset":
        return config.replace(preset=value)
    if key == "seed":
        return config.replace(seed=int(value))
    # loss: "default" keeps the detector's losses; "default+color+psnr" adds; names without "default" replace
    parts = [p for p in value.split("+") if p]
    if "default" in parts:
        return config.replace(loss=[p for p in parts if p != "default"], loss_only=False)
    return config.replace(loss=parts, loss_only=True)


def _print_bench(rows: list[dict[str, Any]], out: Path) -> None:
    configurations = list(dict.fromkeys(r["configuration"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    table = Table(title="image AUROC (pixel AUROC) per category and configuration")
    table.add_column("category")
    for c in configurations:
        table.add_column(c, justify="right")
    lookup = {(r["category"], r["configuration"]): r for r in rows}
    md = ["| category | " + " | ".join(configurations) + " |", "|---" * (len(configurations) + 1) + "|"]
    means = {c: float(np.nanmean([lookup[(k, c)]["image_auroc"] for k in categories if (k, c) in lookup]))
             for c in configurations}
    for category in categories:
        cells = []
        for c in configurations:
            r = lookup.get((category, c), {})
            cells.append(f"{_fmt(r.get('image_auroc'))} ({_fmt(r.get('pixel_auroc'))})")
        table.add_row(category, *cells)
        md.append(f"| {category} | " + " | ".join(cells) + " |")
    mean_cells = [_fmt(means[c]) for c in configurations]
    delta_cells = [f"{means[c] - means[configurations[0]]:+.3f}" for c in configurations]

    def total(column: str, c: str) -> float:
        values = [lookup[(k, c)].get(column) for k in categories if (k, c) in lookup]
        return float(np.nansum([v for v in values if isinstance(v, float)]))

    train_cells = [_fmt(total("train_s", c), 1) for c in configurations]
    def mean_rate(c: str) -> float:
        rates = [lookup[(k, c)]["infer_img_s"] for k in categories if "infer_img_s" in lookup.get((k, c), {})]
        return float(np.mean(rates)) if rates else float("nan")  # ensembles have no rate of their own

    rate_cells = [_fmt(mean_rate(c), 1) for c in configurations]
    for label, cells in (("mean", mean_cells), ("delta", delta_cells), ("train s (sum)", train_cells),
                         ("infer img/s (mean)", rate_cells)):
        table.add_row(label, *cells)
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    Console().print(table)
    report.write_text_atomic(out / "bench.md", "\n".join(md) + "\n")
    report.write_json(out / "bench.json", rows)
    report.write_csv(out / "bench.csv", ["configuration", "category", *METRIC_COLUMNS, "train_s", "infer_img_s"], rows)
    console.print(f"bench results in {out}")


def synth(out: Path, categories: list[str], seed: int = 0, size: int = 256, n_train: int = 60,
          n_test: int = 40) -> Path:
    """Write the synthetic textures to ``out`` in the MVTec AD layout."""
    from adkit.data.synthetic import TEXTURES, write_dataset

    unknown = [c for c in categories if c not in TEXTURES]
    if unknown:
        raise AdkitError(f"synth: unknown category {unknown[0]!r}; available: {', '.join(TEXTURES)}")
    if size < 16 or n_train < 1 or n_test < 2:
        raise AdkitError("synth: --size must be >= 16, --train >= 1 and --test >= 2")
    write_dataset(out, categories or list(TEXTURES), size, seed, n_train, n_test)
    console.print(f"wrote {', '.join(categories or TEXTURES)} to {out}")
    return out
