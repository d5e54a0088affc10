"""How far training images scored as if left out of the fit (Detector.leaving_out) stand from held-out images: a
detector is fitted with a larger validation split than the default, then its scores of every training image left
out, of the validation images, and of the training images as fitted (in the bank, for PatchCore) are compared by
their quantiles and the two-sample test an fpr threshold uses to pool them (docs/thresholds.md).

    python benchmarks/left_out_bias.py --data mvtec:val_fraction=0.3 --root ../shared/data/magnetic-tile --detector patchcore
    python benchmarks/left_out_bias.py --data mvtec:val_fraction=0.3 --root ../shared/data/magnetic-tile --detector padim

Prints one JSON line per detector and category.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from adkit.run import evaluation
from adkit.run.assembly import build_pipeline
from adkit.run.config import RunConfig
from adkit.run.engine import predict
from adkit.run.planning import plan
from adkit.stats import thresholds

QUANTILES = (0.5, 0.9, 0.95, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--root")
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--detector", action="append", default=[])
    args = parser.parse_args()
    for spec in args.detector or ["patchcore", "padim"]:
        plan_ = plan(RunConfig(detector=[spec], data=args.data, root=args.root, category=args.category))
        for category in plan_.categories:
            with tempfile.TemporaryDirectory() as tmp:
                run_ = evaluation.train_category(plan_, category, Path(tmp), load_test=False)
                pipeline = build_pipeline(plan_, run_.detector)
                val = predict(pipeline, run_.val.images[run_.val.labels == 0], plan_.scoring_batch, plan_.device,
                              precision=plan_.config.precision).scores.double().numpy()
                fitted = predict(pipeline, run_.train.images, plan_.scoring_batch, plan_.device,
                                 precision=plan_.config.precision).scores.double().numpy()
                evaluation.LEAVE_OUT_IMAGES = len(run_.train.samples)  # every training image
                left = evaluation.left_out_scores(plan_, run_, pipeline, val)
            row = {"detector": spec, "category": category, "validation": len(val), "training": len(fitted)}
            for name, scores in (("validation", val), ("left_out", left), ("in_fit", fitted)):
                if scores is not None:
                    scores = np.asarray(scores, dtype=np.float64)
                    row[f"{name}_quantiles"] = [round(float(q), 4) for q in np.quantile(scores, QUANTILES)]
            if left is not None:
                row["check"] = thresholds.left_out_agree(val, left.double().numpy())[1]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
