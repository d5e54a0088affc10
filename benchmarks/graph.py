"""PatchCore's HNSW graph built from BUILD_EFFORT candidates a node (adkit's default) against faiss's default 40, on
one fitted bank: the effort each graph's search check chooses, the test split's image AUROC with each graph and with
exact search, and the pipeline's images per second at batch 8, the two graphs timed alternately in one process.

    python benchmarks/graph.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/graph.py --data mvtec --root ../shared/data/kolektorsdd --images 32
    python benchmarks/graph.py --data folder:normal=../shared/data/elpv/normal,abnormal=../shared/data/elpv/abnormal,name=elpv

PatchCore is fitted once per category with its defaults (--precision fp32, so that the fit is the same on every
CPU); the other graph is built over the same bank and checked on the same held-out images. Prints one JSON line
per category and graph, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adkit.run.assembly import build_pipeline
from adkit.run.config import RunConfig
from adkit.run.engine import predict
from adkit.run.evaluation import train_category
from adkit.run.planning import plan
from adkit.stats import metrics
from adkit_plugins.patchcore import search

FAISS_DEFAULT = 40


def rebuilt(detector, build_effort: int, held_out: torch.Tensor, batch: int) -> tuple[torch.Tensor, int, float]:
    """The detector's bank indexed again by a graph built from ``build_effort`` candidates, checked on
    ``held_out``: (graph, chosen effort, build seconds)."""
    kept = search.BUILD_EFFORT
    search.BUILD_EFFORT = build_effort
    try:
        started = time.perf_counter()
        detector._index(detector.memory_bank, origin=detector.bank_origin)
        seconds = time.perf_counter() - started
    finally:
        search.BUILD_EFFORT = kept
    detector._forget_check()
    with torch.inference_mode():
        detector.calibrate(held_out[i:i + batch] for i in range(0, held_out.shape[0], batch))
    return detector.hnsw_graph, detector.effort, seconds


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
        graphs = {}
        for build_effort in (search.BUILD_EFFORT, FAISS_DEFAULT):
            graphs[build_effort] = rebuilt(detector, build_effort, held_out, plan_.scoring_batch)
        labels = test.labels.numpy()
        use(detector, graphs[search.BUILD_EFFORT][0], 0)
        exact = metrics.auroc(labels, predict(pipeline, test.images, 8, plan_.device).scores.numpy())
        timed = test.images[:args.images]
        seconds: dict[int, list[float]] = {b: [] for b in graphs}
        aurocs = {}
        for build_effort, (graph, effort, _) in graphs.items():
            use(detector, graph, effort)
            aurocs[build_effort] = metrics.auroc(labels, predict(pipeline, test.images, 8, plan_.device).scores.numpy())
        for _ in range(args.repeats):  # alternately, so that the machine's load falls on both alike
            for build_effort, (graph, effort, _) in graphs.items():
                use(detector, graph, effort)
                started = time.perf_counter()
                predict(pipeline, timed, 8, plan_.device)
                seconds[build_effort].append(time.perf_counter() - started)
        for build_effort, (graph, effort, build_s) in graphs.items():
            row = {"category": category, "build_effort": build_effort, "bank": int(detector.memory_bank.shape[0]),
                   "build_s": round(build_s, 1), "effort": effort, "image_auroc": round(aurocs[build_effort], 4),
                   "image_auroc_exact": round(exact, 4),
                   "img_s": round(timed.shape[0] / statistics.median(seconds[build_effort]), 1),
                   "threads": torch.get_num_threads()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| category | graph built from | bank | build s | effort chosen | image AUROC (exact) | img/s, batch 8 |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['category']} | {r['build_effort']} | {r['bank']:,} | {r['build_s']} | ef {r['effort']} | "
              f"{r['image_auroc']:.4f} ({r['image_auroc_exact']:.4f}) | {r['img_s']} |")


if __name__ == "__main__":
    main()
