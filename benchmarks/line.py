"""A line that learns: fit on the first 20 % of the good training images, then add the rest in steps of 10 %
with ``adkit update``'s detector path (``update_detector``: Detector.update, then the approximations' check);
after every step, the test split's image AUROC and recall at exactly 1 % false alarms (the ROC's point) against a
full refit on the same images, and the update's seconds per added image.

    python benchmarks/line.py --data mvtec --root ../shared/data/magnetic-tile --detector padim --detector patchcore
    python benchmarks/line.py --data mvtec --root ../shared/data/kolektorsdd --detector padim --detector patchcore
    python benchmarks/line.py ... --timing-only     # the updates' times alone, without refits beside them

The images are added in the dataset's order (sorted file names); the validation split is the one adkit run makes
and checks the approximations at every step, for the update and the refit alike. Prints one JSON line per step
and detector, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adkit.data.loading import load_split
from adkit.run.assembly import build_detector, build_pipeline
from adkit.run.config import RunConfig
from adkit.run.engine import TrainSettings, predict, train_detector, update_detector
from adkit.run.planning import plan
from adkit.stats import metrics


def recall_at_fpr(scores: np.ndarray, labels: np.ndarray, rate: float = 0.01) -> float:
    """Recall above the lowest threshold that keeps the good images' false-alarm rate at or below ``rate``."""
    normal = np.sort(scores[labels == 0])
    threshold = normal[len(normal) - 1 - int(np.floor(rate * len(normal)))]
    return float((scores[labels == 1] > threshold).mean())


def evaluate(plan_, detector, test) -> tuple[float, float]:
    scores = predict(build_pipeline(plan_, detector), test.images, plan_.scoring_batch, plan_.device).scores.numpy()
    labels = test.labels.numpy()
    return metrics.auroc(labels, scores), recall_at_fpr(scores, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--detector", action="append", default=[])
    parser.add_argument("--first", type=float, default=0.2, help="the share fitted on first")
    parser.add_argument("--step", type=float, default=0.1, help="the share added at each step")
    parser.add_argument("--timing-only", action="store_true",
                        help="updates alone, timed with nothing else running in this process: no refits, no scores")
    args = parser.parse_args()
    rows = []
    for spec in args.detector or ["padim", "patchcore"]:
        plan_ = plan(RunConfig(detector=[spec], data=args.data, root=args.root, category=args.category))
        split = plan_.geometry.tiles
        for category in plan_.categories:
            splits = plan_.dataset.load(category)
            train = load_split(splits.train, plan_.geometry).images
            val = load_split(splits.val, plan_.geometry)
            test = load_split(splits.test, plan_.geometry)
            held_out = split(val.images[val.labels == 0])
            n = len(train)
            bounds = [round(n * args.first)]
            while bounds[-1] < n:
                bounds.append(min(n, bounds[-1] + max(1, round(n * args.step))))
            settings = TrainSettings(steps=1, batch_size=plan_.batch_size)
            with tempfile.TemporaryDirectory() as tmp:
                updated = build_detector(plan_)
                started = time.perf_counter()
                train_detector(updated, split(train[:bounds[0]]), settings, plan_.device, Path(tmp) / "u.pt", {},
                               held_out=held_out)
                first_s = time.perf_counter() - started
                for step, (low, high) in enumerate(zip([0, *bounds[:-1]], bounds)):
                    update_s = None
                    if step:
                        started = time.perf_counter()
                        update_detector(updated, split(train[low:high]), plan_.batch_size, plan_.device,
                                        held_out=held_out)
                        update_s = time.perf_counter() - started
                    auroc_u = recall_u = auroc_r = recall_r = refit_s = float("nan")
                    if not args.timing_only:
                        refit = build_detector(plan_)
                        started = time.perf_counter()
                        train_detector(refit, split(train[:high]), settings, plan_.device, Path(tmp) / f"r{step}.pt",
                                       {}, held_out=held_out)
                        refit_s = time.perf_counter() - started
                        auroc_u, recall_u = evaluate(plan_, updated, test)
                        auroc_r, recall_r = evaluate(plan_, refit, test)
                    search = updated.approximations().get("search", {}).get("used")
                    row = {"detector": spec, "category": category, "images": high, "added": high - low if step else high,
                           "auroc_update": round(auroc_u, 4), "auroc_refit": round(auroc_r, 4),
                           "recall1_update": round(recall_u, 4), "recall1_refit": round(recall_r, 4),
                           "update_ms_per_image": None if update_s is None else round(1000 * update_s / (high - low), 1),
                           "fit_s": round(first_s, 1) if not step else None, "refit_s": round(refit_s, 1),
                           "search": search, "threads": torch.get_num_threads()}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\n| detector | images | image AUROC update / refit | recall at 1 % FPR update / refit | update ms per "
          "image | refit s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detector']} | {r['images']} | {r['auroc_update']:.4f} / {r['auroc_refit']:.4f} | "
              f"{r['recall1_update']:.3f} / {r['recall1_refit']:.3f} | {r['update_ms_per_image'] or '-'} | "
              f"{r['refit_s']} |")


if __name__ == "__main__":
    main()
