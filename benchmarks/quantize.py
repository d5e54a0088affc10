"""INT8 exports against float32 on the data each checkpoint was fitted on: what ``adkit export --quantize int8``'s
check measures on the validation images, whether it passes, and (reported, never used by the check) the test
split's image AUROC and the two files' images per second at batch 8.

    python benchmarks/quantize.py RUN_DIR/CATEGORY/checkpoint.pt [...]

Each checkpoint is exported twice into a temporary folder: float32 (``--quantize none``) and int8 with the check
measured as always but not enforced, so that its figures are printed whether or not it would refuse; "passes" says
what the check decides. The checkpoint's recorded dataset is read (its configuration in the checkpoint). Prints one JSON line per
checkpoint and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from adkit import api
from adkit.core.checkpoints import load_checkpoint
from adkit.data.loading import load_split
from adkit.deploy import quantize
from adkit.deploy.export import load_runner, read_model
from adkit.run.assembly import checkpoint_splits
from adkit.run.config import RunConfig
from adkit.stats import metrics


def measure(checkpoint: Path, folder: Path) -> dict:
    meta = load_checkpoint(checkpoint)["meta"]
    plan_, splits = checkpoint_splits(RunConfig(), meta, "images")
    test = load_split(splits.test, plan_.geometry)
    float_dir = api.export(RunConfig(), checkpoint=checkpoint, fmt="onnx", out=folder / "fp32")
    measured = []
    real_drift = quantize.drift

    def lenient(*arguments):  # the real check's figures and verdict kept; the file written either way
        measured.append(real_drift(*arguments))
        return {**measured[-1], "ok": True}

    quantize.drift = lenient
    try:
        int8_dir = api.export(RunConfig(), checkpoint=checkpoint, fmt="onnx", out=folder / "int8", quantize="int8")
    finally:
        quantize.drift = real_drift
    check = measured[-1]
    row = {"checkpoint": str(checkpoint), "detector": meta["detector"], "category": meta["category"],
           "val_images": check["images"], "noise": check["noise"], "decisions_changed": check["decisions_changed"],
           "passes": check["ok"], "summary": check["summary"]}
    labels = test.labels.numpy()
    for name, path in (("fp32", float_dir), ("int8", int8_dir)):
        file, card = read_model(path)
        scores, speed = quantize.scores_and_speed(load_runner(file, "onnx", torch.device("cpu")), test.images)
        row[f"{name}_test_auroc"] = round(metrics.auroc(labels, scores), 4)
        row[f"{name}_img_s"] = round(speed, 1)
        row[f"{name}_fa_per_1000"] = round(1000 * float(np.mean(scores[labels == 0] > card["threshold"])), 1)
        row[f"{name}_recall"] = round(float(np.mean(scores[labels == 1] > card["threshold"])), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    args = parser.parse_args()
    rows = []
    for checkpoint in args.checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(checkpoint, Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)
    print("| detector | category | validation noise (bound 0.3) | decisions changed | passes | test AUROC fp32 / int8 "
          "| FA per 1,000 fp32 / int8 | recall fp32 / int8 | img/s fp32 / int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detector']} | {r['category']} | {r['noise']:.2f} | {r['decisions_changed']} | "
              f"{'yes' if r['passes'] else 'no'} | {r['fp32_test_auroc']:.4f} / {r['int8_test_auroc']:.4f} | "
              f"{r['fp32_fa_per_1000']} / {r['int8_fa_per_1000']} | {r['fp32_recall']:.3f} / {r['int8_recall']:.3f} | "
              f"{r['fp32_img_s']} / {r['int8_img_s']} |")


if __name__ == "__main__":
    main()
