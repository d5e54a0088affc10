"""Where one part's inference time goes, per stage, for the detectors on pretrained features (PatchCore, PaDiM):
decoding and resizing, the backbone, the feature assembly, the search or Mahalanobis distances, the post-processing
and the scoring, with the backbone in float32 and in bf16, at batch 1 and 8; and each precision's image AUROC on
the test split (the same fitted model: only the backbone's precision changes).

    python benchmarks/stages.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/stages.py --data mvtec --root ../shared/data/kolektorsdd --images 32

Each detector is fitted once per category with its defaults (--precision fp32, so that the fit is the same on
every CPU). Stage times are medians over the timed test images, in milliseconds per image; "end to end" is the
whole pipeline's images per second (decoding excluded). Prints one JSON line per row and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adkit.core.bf16 import BF16_FLAGS, cpu_flags
from adkit.data.loading import load_split
from adkit.run.assembly import build_pipeline
from adkit.run.config import RunConfig
from adkit.run.engine import predict
from adkit.run.evaluation import train_category
from adkit.run.planning import plan
from adkit.stats import metrics


def timed(function, *arguments, repeats: int = 3) -> float:
    """The median seconds of ``function(*arguments)`` over ``repeats`` runs, after one warm-up."""
    function(*arguments)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(*arguments)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def post_process(pipeline, raw: torch.Tensor) -> torch.Tensor:
    for post in pipeline.postprocessors:
        raw = post(raw)
    return raw


def stages(pipeline, images: torch.Tensor, batch: int) -> dict[str, float]:
    """Milliseconds per image of each stage on ``images`` cut into batches of ``batch``."""
    detector = pipeline.detector
    tiles = pipeline.tiling
    totals: dict[str, float] = {}
    with torch.inference_mode():
        for i in range(0, images.shape[0] - batch + 1, batch):
            x = images[i:i + batch]
            inputs = x if tiles is None else tiles.split(x)
            parts = {
                "backbone": timed(detector.backbone, inputs, tuple(detector.layers)),
                "embed": timed(detector.embed, inputs),
                "detect": timed(detector.detect, inputs),
                "pipeline": timed(pipeline, x),
                "post": timed(post_process, pipeline, pipeline(x)[0]),
            }
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
    n = (images.shape[0] // batch) * batch
    ms = {key: 1000 * value / n for key, value in totals.items()}
    return {"backbone": ms["backbone"], "features": ms["embed"] - ms["backbone"],
            "distance": ms["detect"] - ms["embed"], "post": ms["post"],
            "rest": ms["pipeline"] - ms["detect"] - ms["post"], "end_to_end_img_s": 1000 / ms["pipeline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--detector", action="append", default=[])
    parser.add_argument("--images", type=int, default=48, help="test images timed per row")
    parser.add_argument("--batch", default="1,8")
    args = parser.parse_args()
    bf16 = bool(BF16_FLAGS & cpu_flags())
    rows = []
    for spec in args.detector or ["patchcore", "padim"]:
        config = RunConfig(detector=[spec], data=args.data, root=args.root, category=args.category, precision="fp32")
        plan_ = plan(config)
        for category in plan_.categories:
            with tempfile.TemporaryDirectory() as tmp:
                run_ = train_category(plan_, category, Path(tmp), resume=False)
            pipeline = build_pipeline(plan_, run_.detector).eval()
            test = run_.test
            started = time.perf_counter()
            load_split(test.samples[:args.images], plan_.geometry)
            decode_ms = 1000 * (time.perf_counter() - started) / min(args.images, len(test.samples))
            for precision in ("fp32", "bf16"):
                for backbone in run_.detector.backbones().values():
                    backbone.precision = precision
                scores = predict(pipeline, test.images, 8, plan_.device).scores.numpy()
                auroc = metrics.auroc(test.labels.numpy(), scores)
                for batch in (int(b) for b in args.batch.split(",")):
                    row = {"detector": spec, "category": category, "backbone_precision": precision, "batch": batch,
                           "image_auroc": round(auroc, 4), "decode_ms": round(decode_ms, 2),
                           **{k: round(v, 2) for k, v in stages(pipeline, test.images[:args.images], batch).items()},
                           "threads": torch.get_num_threads(), "cpu_bf16": bf16}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\n| detector | backbone | batch | image AUROC | decode ms | backbone ms | features ms | distance ms | "
          "post ms | rest ms | end to end img/s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detector']} | {r['backbone_precision']} | {r['batch']} | {r['image_auroc']:.4f} | "
              f"{r['decode_ms']:.1f} | {r['backbone']:.1f} | {r['features']:.1f} | {r['distance']:.1f} | "
              f"{r['post']:.1f} | {r['rest']:.1f} | {r['end_to_end_img_s']:.1f} |")


if __name__ == "__main__":
    main()
