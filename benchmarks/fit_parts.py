"""PatchCore's fit, part by part, on one set: the training patches' embedding, the greedy coreset with its
partitions on torch's threads against one partition at a time (timed alternately, the two selections compared),
the HNSW graph's build, and the search check: the held-out patches' exact nearest, then the graph's tries with the
bank sampled at CHECK_BANK_QUERIES features against the whole bank up to 65,536 (the rule before session 23),
each try's queries searched (a try stops once its misses fail it) and the effort chosen.

    python benchmarks/fit_parts.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/fit_parts.py --data mvtec --root ../shared/data/kolektorsdd
    python benchmarks/fit_parts.py --data folder:normal=../shared/data/elpv/normal,abnormal=../shared/data/elpv/abnormal,name=elpv
    python benchmarks/fit_parts.py --data synthetic

PatchCore's defaults at --precision fp32 (the same features on every CPU); the held-out patches are the validation
split's normal images, as adkit run checks them. Prints one JSON line per category, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adkit.data.loading import load_split
from adkit.run.assembly import build_detector
from adkit.run.config import RunConfig
from adkit.run.engine import derived_seed
from adkit.run.planning import plan
from adkit_plugins.patchcore import check
from adkit_plugins.patchcore.coreset import partitioned_greedy_coreset, random_projection
from adkit_plugins.patchcore.search import hnsw_build, hnsw_load, knn, knn_hnsw

BANK_BEFORE = 65536  # the bank queries of the check before session 23


def embedded(detector, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([detector.embed(images[i:i + batch]).permute(0, 2, 3, 1).reshape(-1, detector.dim)
                      for i in range(0, images.shape[0], batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of each coreset")
    args = parser.parse_args()
    plan_ = plan(RunConfig(detector=["patchcore"], data=args.data, root=args.root, category=args.category,
                           precision="fp32"))
    rows = []
    for category in plan_.categories:
        splits = plan_.dataset.load(category)
        train = plan_.geometry.tiles(load_split(splits.train, plan_.geometry).images)
        val = load_split(splits.val, plan_.geometry)
        held_images = plan_.geometry.tiles(val.images[val.labels == 0])
        detector = build_detector(plan_).eval()
        row = {"category": category}
        with torch.inference_mode():
            started = time.perf_counter()
            features = embedded(detector, train, plan_.batch_size)
            row["embed_s"] = round(time.perf_counter() - started, 2)
            count = max(1, round(detector.coreset * features.shape[0]))
            times: dict[str, list[float]] = {"threads": [], "one at a time": []}
            chosen = {}
            for _ in range(args.repeats):
                for name, threads in (("one at a time", 1), ("threads", None)):
                    generator = torch.Generator().manual_seed(derived_seed(detector.seed, "patchcore-coreset"))
                    projected = features @ random_projection(detector.dim, detector.projection_dim, generator,
                                                             torch.device("cpu"))
                    started = time.perf_counter()
                    chosen[name] = partitioned_greedy_coreset(projected, count, generator, detector.partition,
                                                              threads=threads)
                    times[name].append(round(time.perf_counter() - started, 2))
            bank = features[chosen["threads"]].contiguous()
            row.update(features=features.shape[0], bank=count, coreset_one_at_a_time_s=times["one at a time"],
                       coreset_threads_s=times["threads"],
                       same_bank=bool(torch.equal(chosen["threads"], chosen["one at a time"])))
            started = time.perf_counter()
            graph = hnsw_load(hnsw_build(bank, detector.links, storage=detector.graph))
            row["graph_build_s"] = round(time.perf_counter() - started, 2)
            per_image = features.shape[0] // train.shape[0]
            held = embedded(detector, held_images[:max(1, check.CHECK_QUERIES // per_image)], plan_.batch_size)
            started = time.perf_counter()
            nearest = knn(held, bank, 1)[1][:, 0]
            row["exact_nearest_s"] = round(time.perf_counter() - started, 2)
            row["held_out_patches"] = held.shape[0]
            sampled = check.CHECK_BANK_QUERIES
            for name, bank_queries in (("before", BANK_BEFORE), ("now", sampled)):
                check.CHECK_BANK_QUERIES = bank_queries
                started = time.perf_counter()
                def search(queries, effort, graph=graph, bank=bank):
                    return knn_hnsw(queries, graph, effort, bank)[1][:, 0]

                trail, effort, passed = check.measure(search, held, nearest, bank, detector.ef, detector.ef * 16,
                                                      detector.recall, lambda e: False)
                row[f"tries_{name}_s"] = round(time.perf_counter() - started, 2)
                row[f"effort_{name}"] = effort if passed else 0
                row[f"trail_{name}"] = [[int(r[0]), int(r[3]), int(r[4])] for r in trail]
            check.CHECK_BANK_QUERIES = sampled
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| category | features -> bank | embed s | coreset s, one partition at a time / on threads (same bank) "
          "| graph s | exact nearest s | tries s, bank whole to 65,536 / sampled | effort | tries (ef: held-out, "
          "bank queries) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tries = "; ".join(f"{e}: {h:,}, {b:,}" for e, h, b in r["trail_now"])
        print(f"| {r['category']} | {r['features']:,} -> {r['bank']:,} | {r['embed_s']} | "
              f"{min(r['coreset_one_at_a_time_s'])} / {min(r['coreset_threads_s'])} ({r['same_bank']}) | "
              f"{r['graph_build_s']} | {r['exact_nearest_s']} | {r['tries_before_s']} / {r['tries_now_s']} | "
              f"{r['effort_before']} / {r['effort_now']} | {tries} |")


if __name__ == "__main__":
    main()
