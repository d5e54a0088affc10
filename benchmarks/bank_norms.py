"""PatchCore's time an image at batch 1 and 8 with the bank's squared norms kept (computed once per bank) against
computed at every exact search, as before session 23: the exact searches of a few patches that every image runs
(its highest patches, ``_exact_at_the_top``, and the re-weighting's neighbours) read the whole bank once for the
product and, without the kept norms, twice more for them. Alternated in one process on one fitted model; the
image scores of both compared.

    python benchmarks/bank_norms.py --data mvtec --root ../shared/data/magnetic-tile

PatchCore's defaults at --precision fp32, fitted once; 48 test images (tiles), medians of three runs each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adkit.data.loading import load_split
from adkit.run.assembly import build_detector
from adkit.run.config import RunConfig
from adkit.run.engine import TrainSettings, train_detector
from adkit.run.planning import plan
from adkit_plugins.patchcore import index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plan_ = plan(RunConfig(detector=["patchcore"], data=args.data, root=args.root, category=args.category,
                           precision="fp32"))
    kept = index.IndexedBank._bank_norms
    for category in plan_.categories:
        splits = plan_.dataset.load(category)
        train = plan_.geometry.tiles(load_split(splits.train, plan_.geometry).images)
        val = load_split(splits.val, plan_.geometry)
        held_out = plan_.geometry.tiles(val.images[val.labels == 0])
        test = plan_.geometry.tiles(load_split(splits.test, plan_.geometry).images)[:args.images]
        detector = build_detector(plan_)
        with tempfile.TemporaryDirectory() as tmp:
            train_detector(detector, train, TrainSettings(steps=1, batch_size=plan_.batch_size), plan_.device,
                           Path(tmp) / "fit.pt", {}, held_out=held_out)
        times: dict[tuple[str, int], list[float]] = {}
        scores: dict[tuple[str, int], torch.Tensor] = {}
        try:
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for name in ("every search", "kept"):
                        index.IndexedBank._bank_norms = kept if name == "kept" else (lambda self: None)
                        for batch in (1, 8):
                            started = time.perf_counter()
                            scores[name, batch] = torch.cat([detector.detect(test[i:i + batch]).image_scores
                                                             for i in range(0, len(test), batch)])
                            times.setdefault((name, batch), []).append(
                                (time.perf_counter() - started) / len(test) * 1e3)
        finally:
            index.IndexedBank._bank_norms = kept
        print(f"{category}: bank {detector.memory_bank.shape[0]:,}, {detector.approximations()['search']['used']}")
        for batch in (1, 8):
            before, now = statistics.median(times["every search", batch]), statistics.median(times["kept", batch])
            same = torch.equal(scores["every search", batch], scores["kept", batch])
            print(f"| {category} | {batch} | {before:.1f} | {now:.1f} | {1000 / before:.1f} -> {1000 / now:.1f} | "
                  f"{'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
