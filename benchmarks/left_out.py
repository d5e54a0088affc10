"""Thresholds with and without the training images' left-out scores, from finished runs: for each category of each
run folder, the fitted threshold's false alarms per 1,000 good test parts and share of defective test parts caught,
next to the same policy fitted on the validation images alone (the same model: each run's validation.json keeps
both score sets, scores.csv the test scores).

    adkit run --detector patchcore --data mvtec --root ../shared/data/magnetic-tile --out runs/tiles-patchcore
    python benchmarks/left_out.py runs/tiles-patchcore [more run folders ...]

An ensemble run's members are read from their own folders (RUN/patchcore, RUN/padim). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from adkit.stats import thresholds


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """False alarms per 1,000 good parts and the share of defective parts caught at ``threshold`` (float32)."""
    flagged = scores.astype(np.float32) > np.float32(threshold)
    return (1000 * float((flagged & (labels == 0)).sum()) / max(int((labels == 0).sum()), 1),
            float((flagged & (labels == 1)).sum()) / max(int((labels == 1).sum()), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | category | normal scores (validation + left out) | check | validation alone | pooled |\n"
          "|---|---|---|---|---|---|")
    for run in args.runs:
        for validation in sorted(run.glob("**/validation.json")):
            folder = validation.parent
            record = json.loads(validation.read_text())
            rows = list(csv.DictReader((folder / "scores.csv").open()))
            scores = np.array([float(r["score"]) for r in rows])
            labels = np.array([int(r["label"]) for r in rows])
            val = np.array(record["val_scores"])
            normal = val[np.array(record["val_labels"]) == 0]
            alone = thresholds.fit(record["policy"], normal, val[np.array(record["val_labels"]) == 1]).threshold
            fit = record["fit"]
            check = fit.get("left_out") or "not offered"
            print(f"| {folder.relative_to(run.parent)} | {folder.name} | {len(normal)} + {fit.get('n_left_out', 0)} | "
                  f"{check.split(' (')[0]} | %.1f / %.3f | %.1f / %.3f |"
                  % (*operating_point(scores, labels, alone), *operating_point(scores, labels, record["threshold"])))


if __name__ == "__main__":
    main()
