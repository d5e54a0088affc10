"""PatchCore's nearest-neighbour search, exact against the inverted-file index (search=ivf) at several probe
counts and the HNSW graph (search=hnsw) at several ef, on one fitted memory bank: recall@1 of the test patches
against exact search, image AUROC, and images per second at batch 1 and 8.

    python benchmarks/search.py --data mvtec --root ../shared/data/magnetic-tile --category magnetic_tile
    python benchmarks/search.py --data synthetic --category carpet --category grid

The bank is fitted once per category (exact, the default PatchCore); each IVF row builds its index from that bank
(cells=0: about sqrt(bank) cells) or graph and scores the same test images. Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from adkit.run.assembly import build_pipeline
from adkit.run.config import RunConfig
from adkit.run.engine import derived_seed
from adkit.run.evaluation import train_category
from adkit.run.planning import plan
from adkit.stats import metrics
from adkit_plugins.patchcore.search import hnsw_build, hnsw_load, ivf_index, knn, knn_hnsw, knn_ivf


def images_per_second(pipeline, images: torch.Tensor, batch: int, repeats: int = 2) -> float:
    with torch.inference_mode():
        pipeline(images[:batch])  # warm-up
        started = time.perf_counter()
        done = 0
        for _ in range(repeats):
            for i in range(0, len(images), batch):
                pipeline(images[i:i + batch])
                done += len(images[i:i + batch])
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--detector", default="patchcore")
    parser.add_argument("--probes", default="4,8,16")
    parser.add_argument("--ef", default="16,32,64")
    parser.add_argument("--links", type=int, default=16)
    parser.add_argument("--timing-images", type=int, default=48)
    args = parser.parse_args()
    config = RunConfig(detector=[args.detector], data=args.data, root=args.root, category=args.category)
    plan_ = plan(config)
    for category in plan_.categories:
        with tempfile.TemporaryDirectory() as tmp:
            run_ = train_category(plan_, category, Path(tmp))
        detector = run_.detector
        exact_bank = detector.memory_bank.clone()
        test = run_.test
        labels = test.labels.numpy()
        with torch.inference_mode():
            patches = detector.embed(test.images).permute(0, 2, 3, 1).reshape(-1, detector.dim)
            exact_distance = knn(patches, exact_bank, 1)[0][:, 0]
        timing = test.images[:args.timing_images]
        rows = [("exact", "exact", None)] + [(f"ivf probes={p}", "ivf", int(p)) for p in args.probes.split(",")] + \
            [(f"hnsw links={args.links} ef={e}", "hnsw", int(e)) for e in args.ef.split(",")]
        cells = max(8, round(exact_bank.shape[0] ** 0.5))
        generator = torch.Generator().manual_seed(derived_seed(0, "patchcore-ivf"))
        started = time.perf_counter()
        ordered, centroids, offsets = ivf_index(exact_bank, cells, generator)
        ivf_seconds = time.perf_counter() - started
        started = time.perf_counter()
        graph = hnsw_build(exact_bank, args.links)
        hnsw_seconds = time.perf_counter() - started
        empty = torch.zeros(0, dtype=torch.uint8)
        for name, kind, setting in rows:
            index_seconds = None
            detector.memory_bank, detector.ivf_centroids, detector.hnsw_graph = \
                exact_bank, torch.zeros(0, detector.dim), empty
            if kind == "exact":
                found = exact_distance
            elif kind == "ivf":
                detector.memory_bank, detector.ivf_centroids, detector.ivf_offsets = ordered, centroids, offsets
                detector.probes, index_seconds = setting, ivf_seconds
                with torch.inference_mode():
                    found = knn_ivf(patches, ordered, centroids, offsets, setting)[0][:, 0]
            else:
                detector.hnsw_graph, detector.ef, index_seconds = graph, setting, hnsw_seconds
                with torch.inference_mode():
                    found = knn_hnsw(patches, hnsw_load(graph), setting)[0][:, 0]
            recall = float(((found - exact_distance).abs() <= 1e-4 * exact_distance.clamp_min(1e-6)).float().mean())
            pipeline = build_pipeline(plan_, detector).eval()
            with torch.inference_mode():
                scores = torch.cat([pipeline(test.images[i:i + 8])[2] for i in range(0, len(test.images), 8)])
            print(json.dumps({
                "category": category, "search": name, "bank": int(exact_bank.shape[0]),
                "cells": cells if kind == "ivf" else None,
                "index_s": None if index_seconds is None else round(index_seconds, 1),
                "recall_at_1": round(recall, 4), "image_auroc": round(metrics.auroc(labels, scores.numpy()), 4),
                "img_s_batch1": round(images_per_second(pipeline, timing, 1), 1),
                "img_s_batch8": round(images_per_second(pipeline, timing, 8), 1),
                "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
