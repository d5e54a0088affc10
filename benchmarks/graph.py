"""PatchCore's HNSW graphs side by side on one fitted bank: the effort each graph's search check chooses, the test
split's image and pixel AUROC with each graph and with exact search, and the pipeline's images per second at batch
8, the graphs timed alternately in one process. ``--vary build``: built from BUILD_EFFORT candidates a node (adkit's
default) against faiss's default 40; ``--vary storage``: the bank stored in float16 (the default) against float32,
both in walk order, and float32 in bank order (the graph as adkit stored it before the walk order).

    python benchmarks/graph.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/graph.py --data mvtec --root ../shared/data/kolektorsdd --images 32
    python benchmarks/graph.py --data folder:normal=../shared/data/elpv/normal,abnormal=../shared/data/elpv/abnormal,name=elpv
    python benchmarks/graph.py --vary storage --data mvtec --root ../shared/data/magnetic-tile

PatchCore is fitted once per category with its defaults (--precision fp32, so that the fit is the same on every
CPU); the other graphs are built over the same bank and checked on the same held-out images. Prints one JSON line
per category and graph, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adkit.run.assembly import build_pipeline
from adkit.run.config import RunConfig
from adkit.run.engine import predict
from adkit.run.evaluation import train_category
from adkit.run.planning import plan
from adkit.stats import metrics
from adkit_plugins.patchcore import search

FAISS_DEFAULT = 40
BANK_ORDER = "fp32, bank order"
# each graph compared: (candidates a node is built from, the bank's storage)
VARIANTS = {"200": (search.BUILD_EFFORT, "fp16"), "40": (FAISS_DEFAULT, "fp16"), "fp16": (search.BUILD_EFFORT, "fp16"),
            "fp32": (search.BUILD_EFFORT, "fp32"), BANK_ORDER: (search.BUILD_EFFORT, "fp32")}
VARY = {"build": ("200", "40"), "storage": ("fp16", "fp32", BANK_ORDER)}


def bank_order_graph(bank: torch.Tensor, links: int) -> torch.Tensor:
    """The graph as adkit built it before the walk order: float32 features, node i is bank row i, no id map."""
    faiss = search._faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index = faiss.IndexHNSWFlat(bank.shape[1], links)
        index.hnsw.efConstruction = max(search.BUILD_EFFORT, 2 * links)
        index.add(np.ascontiguousarray(bank.float().cpu().numpy()))
    finally:
        faiss.omp_set_num_threads(threads)
    return torch.from_numpy(faiss.serialize_index(index).copy())


def rebuilt(detector, variant: str, held_out: torch.Tensor, batch: int) -> tuple[torch.Tensor, int, float]:
    """The detector's bank indexed again by the graph ``variant`` names (VARIANTS), checked on ``held_out``: (graph,
    chosen effort, build seconds)."""
    kept = search.BUILD_EFFORT, detector.graph
    search.BUILD_EFFORT, detector.graph = VARIANTS[variant]
    try:
        if variant == BANK_ORDER:  # the buffers as a fit leaves them, then the old graph in place of the new
            detector._index(detector.memory_bank, origin=detector.bank_origin)
        started = time.perf_counter()
        if variant == BANK_ORDER:
            detector.hnsw_graph = bank_order_graph(detector.memory_bank, detector.links)
        else:
            detector._index(detector.memory_bank, origin=detector.bank_origin)
        seconds = time.perf_counter() - started
    finally:
        search.BUILD_EFFORT, detector.graph = kept
    detector._forget_check()
    with torch.inference_mode():
        detector.calibrate(held_out[i:i + batch] for i in range(0, held_out.shape[0], batch))
    return detector.hnsw_graph, detector.effort, seconds


def measured(pipeline, test, device) -> tuple[float, float | None]:
    """The test split's image AUROC and pixel AUROC (None without masks)."""
    out = predict(pipeline, test.images, 8, device)
    masks = test.masks[:, 0].numpy()
    pixel = metrics.pixel_metrics(out.processed[:, 0].numpy(), masks, with_aupro=False)["pixel_auroc"] \
        if masks.any() else None
    return metrics.auroc(test.labels.numpy(), out.scores.numpy()), pixel


def use(detector, graph: torch.Tensor, effort: int) -> None:
    detector.hnsw_graph = graph
    detector._set_effort(effort)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--images", type=int, default=64, help="test images timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vary", choices=sorted(VARY), default="build")
    args = parser.parse_args()
    rows = []
    config = RunConfig(detector=["patchcore"], data=args.data, root=args.root, category=args.category,
                       precision="fp32")
    plan_ = plan(config)
    for category in plan_.categories:
        with tempfile.TemporaryDirectory() as tmp:
            run_ = train_category(plan_, category, Path(tmp), resume=False)
        detector = run_.detector
        pipeline = build_pipeline(plan_, detector).eval()
        test, held_out = run_.test, plan_.geometry.tiles(run_.val.images[run_.val.labels == 0])
        graphs = {variant: rebuilt(detector, variant, held_out, plan_.scoring_batch) for variant in VARY[args.vary]}
        use(detector, next(iter(graphs.values()))[0], 0)
        exact = measured(pipeline, test, plan_.device)
        timed = test.images[:args.images]
        seconds: dict[str, list[float]] = {v: [] for v in graphs}
        aurocs = {}
        for variant, (graph, effort, _) in graphs.items():
            use(detector, graph, effort)
            aurocs[variant] = measured(pipeline, test, plan_.device)
        for _ in range(args.repeats):  # alternately, so that the machine's load falls on each alike
            for variant, (graph, effort, _) in graphs.items():
                use(detector, graph, effort)
                started = time.perf_counter()
                predict(pipeline, timed, 8, plan_.device)
                seconds[variant].append(time.perf_counter() - started)
        for variant, (graph, effort, build_s) in graphs.items():
            row = {"category": category, "graph": variant, "bank": int(detector.memory_bank.shape[0]),
                   "build_s": round(build_s, 1), "effort": effort, "image_auroc": round(aurocs[variant][0], 4),
                   "image_auroc_exact": round(exact[0], 4),
                   "pixel_auroc": aurocs[variant][1] and round(aurocs[variant][1], 4),
                   "pixel_auroc_exact": exact[1] and round(exact[1], 4),
                   "img_s": round(timed.shape[0] / statistics.median(seconds[variant]), 1),
                   "threads": torch.get_num_threads()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| category | graph | bank | build s | effort chosen | image AUROC (exact) | pixel AUROC (exact) | "
          "img/s, batch 8 |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        pixel = "-" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.4f} ({r['pixel_auroc_exact']:.4f})"
        print(f"| {r['category']} | {r['graph']} | {r['bank']:,} | {r['build_s']} | ef {r['effort']} | "
              f"{r['image_auroc']:.4f} ({r['image_auroc_exact']:.4f}) | {pixel} | {r['img_s']} |")


if __name__ == "__main__":
    main()
