"""PatchCore's nearest-neighbour search on one fitted memory bank per category: exact search against the
approximate ones, unchecked (HNSW at fixed ef, IVF at fixed probes) and checked (the default: HNSW from ef 32, its
effort raised until its recall@1 on held-out normal patches and on the bank reaches 0.999, or exact search;
docs/methods/patchcore.md). Per row: the recall@1 of the test patches against exact search, the image AUROC, and
images per second at batch 1 and 8.

    python benchmarks/search.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/search.py --data mvtec --root ../shared/data/kolektorsdd
    python benchmarks/search.py --data folder:normal=../shared/data/elpv/normal,abnormal=../shared/data/elpv/abnormal
    python benchmarks/search.py --data synthetic --category carpet --probes 16 --ef 32,64

The bank is fitted once per category (the default PatchCore's, at the default geometry); every row searches that
bank and scores the same test images with the default pipeline (re-weighted score, smoothing). Prints one JSON
line per row.
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
from adkit.run.engine import _batches, derived_seed
from adkit.run.evaluation import train_category
from adkit.run.planning import plan
from adkit.stats import metrics
from adkit_plugins.patchcore.search import found, hnsw_build, ivf_index, knn


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
    parser.add_argument("--probes", default="", help="IVF rows: probe counts, comma-separated (none by default)")
    parser.add_argument("--ef", default="32", help="unchecked HNSW rows: ef values, comma-separated")
    parser.add_argument("--timing-images", type=int, default=48)
    args = parser.parse_args()
    config = RunConfig(detector=["patchcore:search=exact"], data=args.data, root=args.root, category=args.category)
    plan_ = plan(config)
    for category in plan_.categories:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            run_ = train_category(plan_, category, Path(tmp))
            fit_s = time.perf_counter() - started
        detector, test = run_.detector, run_.test
        bank = detector.memory_bank.clone()
        labels = test.labels.numpy()
        split = plan_.geometry.tiles
        held_out = split(run_.val.images[run_.val.labels == 0])
        with torch.inference_mode():
            test_tiles = split(test.images)
            patches = torch.cat([detector.embed(test_tiles[i:i + 16]).permute(0, 2, 3, 1).reshape(-1, detector.dim)
                                 for i in range(0, len(test_tiles), 16)])
            nearest = knn(patches, bank, 1)[1]
        rows = [("exact", "exact", 0)] + [(f"ivf probes={p}", "ivf", int(p)) for p in args.probes.split(",") if p] + \
            [(f"hnsw ef={e}, unchecked", "hnsw", int(e)) for e in args.ef.split(",") if e] + \
            [("hnsw, checked (default)", "checked", 32)]
        graph_started = time.perf_counter()
        graph = hnsw_build(bank, detector.links)
        graph_s = time.perf_counter() - graph_started
        for name, kind, effort in rows:
            detector.search = "ivf" if kind == "ivf" else ("exact" if kind == "exact" else "hnsw")
            detector.memory_bank, detector.hnsw_graph = bank, torch.zeros(0, dtype=torch.uint8)
            detector.ivf_centroids, detector.ivf_offsets = bank.new_zeros(0, detector.dim), torch.zeros(0).long()
            detector.search_trail = torch.zeros(0, 5, dtype=torch.float64)
            check_s = None
            if kind == "ivf":
                cells = max(8, round(bank.shape[0] ** 0.5))
                generator = torch.Generator().manual_seed(derived_seed(0, "patchcore-ivf"))
                detector.memory_bank, detector.ivf_centroids, detector.ivf_offsets = ivf_index(bank, cells, generator)
            elif kind in ("hnsw", "checked"):
                detector.hnsw_graph = graph
            detector._set_effort(effort)
            if kind == "checked":
                started = time.perf_counter()
                with torch.inference_mode():
                    detector.calibrate(_batches(held_out, 8, torch.device("cpu")))
                check_s = time.perf_counter() - started
            with torch.inference_mode():
                found_index = detector._search(patches, 1, detector.effort)[1]
            recall = float(found(patches, detector.memory_bank, found_index,
                                 nearest if kind != "ivf" else knn(patches, detector.memory_bank, 1)[1]).double().mean())
            pipeline = build_pipeline(plan_, detector).eval()
            with torch.inference_mode():
                scores = torch.cat([pipeline(test.images[i:i + 8])[2] for i in range(0, len(test.images), 8)])
            timing = test.images[:args.timing_images]
            print(json.dumps({
                "category": category, "search": name, "used": detector.approximations()["search"]["used"],
                "bank": int(bank.shape[0]), "test_recall_at_1": round(recall, 5),
                "image_auroc": round(metrics.auroc(labels, scores.numpy()), 4),
                "img_s_batch1": round(images_per_second(pipeline, timing, 1), 1),
                "img_s_batch8": round(images_per_second(pipeline, timing, 8), 1),
                "check": detector.approximations()["search"].get("summary") if kind == "checked" else None,
                "check_s": None if check_s is None else round(check_s, 1), "graph_s": round(graph_s, 1),
                "fit_s": round(fit_s, 1), "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
