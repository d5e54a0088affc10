"""PatchCore's exact search on a CPU in cache-sized blocks (``CPU_BLOCK_ELEMENTS``, 4 MiB of distances) against
the 64 MiB blocks used before session 25: the exact search alone at the shapes the search check and the coreset's
continuation ask for, whole fits with their check, and the line's updates (fit on the first 20 %, steps of 10 %),
each timed both ways, alternated, and the results compared.

    python benchmarks/exact_blocks.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/exact_blocks.py --data mvtec --root ../shared/data/kolektorsdd --no-updates
    python benchmarks/exact_blocks.py --data folder:normal=../shared/data/elpv/normal,abnormal=../shared/data/elpv/abnormal,name=elpv --no-updates

The fits run at --precision fp32, the updates at the precision the fit's check chose (as adkit update runs). An
update step runs from the same state both ways (a copy each) and the line goes on from the new one. Prints one
line per measurement.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adkit.data.loading import load_split
from adkit.run.assembly import build_detector
from adkit.run.config import RunConfig
from adkit.run.engine import TrainSettings, train_detector, update_detector
from adkit.run.planning import plan
from adkit_plugins.patchcore import search

BLOCKS = {"64 MiB (before)": 1 << 24, "4 MiB (now)": search.CPU_BLOCK_ELEMENTS}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(
        x[k].shape == y[k].shape and torch.equal(x[k].double().nan_to_num(), y[k].double().nan_to_num()) for k in x)


def paired(modes: list[str], step: int) -> list[str]:
    """The modes in the order of a pair: reversed every other pair."""
    return modes if step % 2 == 0 else modes[::-1]


def time_search(detector: torch.nn.Module, held_out: torch.Tensor, batch_size: int, repeats: int) -> None:
    """The searches alone on the fitted bank, medians of ``repeats`` pairs: exact search of 8,192 held-out patches
    (a block of the check's exact nearest, or a batch of 8 images searched exactly), of 256 (a coreset
    continuation's refinement), and the graph's search of 8,192 at the effort the check chose (its candidates
    re-ranked in blocks of the same size)."""
    with torch.inference_mode():
        patches = torch.cat([detector.embed(held_out[i:i + batch_size]).permute(0, 2, 3, 1).reshape(-1, detector.dim)
                             for i in range(0, held_out.shape[0], batch_size)])
    bank = detector.memory_bank
    kept = search.norms(bank)

    def exact(queries: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        return search.knn(queries, bank, 1, block_elements=BLOCKS[mode], bank_norms=kept)

    def graph(queries: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        search.CPU_BLOCK_ELEMENTS = BLOCKS[mode]
        return detector._search(queries, 1, detector.effort)

    runs = [("exact search", patches[:8192], exact), ("exact search", patches[:256], exact)]
    if detector.effort and detector.hnsw_graph.numel():
        runs.append((f"graph search at ef {detector.effort}", patches[:8192], graph))
    for name, queries, run in runs:
        seconds: dict[str, list[float]] = {mode: [] for mode in BLOCKS}
        found = {}
        for repeat in range(repeats + 1):
            for mode in paired(list(BLOCKS), repeat):
                started = time.perf_counter()
                found[mode] = run(queries, mode)
                if repeat:  # the first pair warms up
                    seconds[mode].append(time.perf_counter() - started)
        first = found[next(iter(BLOCKS))]
        same = all(torch.equal(found[m][0], first[0]) and torch.equal(found[m][1], first[1]) for m in BLOCKS)
        print(f"{name} of {queries.shape[0]:,} held-out patches in a bank of {bank.shape[0]:,}: " +
              ", ".join(f"{mode} {1000 * statistics.median(s):.1f} ms" for mode, s in seconds.items()) +
              f"; the same distances and indices: {same}", flush=True)
    search.CPU_BLOCK_ELEMENTS = BLOCKS["4 MiB (now)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category")
    parser.add_argument("--fits", type=int, default=2, help="pairs of whole fits")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of exact searches alone")
    parser.add_argument("--no-updates", action="store_true")
    args = parser.parse_args()
    for precision, what in (("fp32", "fit"), ("auto", "update")):
        if what == "update" and args.no_updates:
            continue
        plan_ = plan(RunConfig(detector=["patchcore"], data=args.data, root=args.root, precision=precision,
                               category=[args.category] if args.category else []))
        category = plan_.categories[0]
        splits = plan_.dataset.load(category)
        split = plan_.geometry.tiles
        train = load_split(splits.train, plan_.geometry).images
        val = load_split(splits.val, plan_.geometry)
        held_out = split(val.images[val.labels == 0])
        settings = TrainSettings(steps=1, batch_size=plan_.batch_size)
        if what == "fit":
            fitted: dict[str, torch.nn.Module] = {}
            for pair in range(max(1, args.fits)):
                for mode in paired(list(BLOCKS), pair):
                    search.CPU_BLOCK_ELEMENTS = BLOCKS[mode]
                    detector = build_detector(plan_)
                    with tempfile.TemporaryDirectory() as tmp:
                        started = time.perf_counter()
                        train_detector(detector, split(train), settings, plan_.device, Path(tmp) / "c.pt", {},
                                       held_out=held_out)
                        seconds = time.perf_counter() - started
                    fitted[mode] = detector
                    if args.fits:
                        print(f"{category} fit, exact search in {mode} blocks: {seconds:.1f} s (ef {detector.effort})",
                              flush=True)
            print(f"{category} fit: the same state both ways: {same_state(*fitted.values())}", flush=True)
            search.CPU_BLOCK_ELEMENTS = BLOCKS["4 MiB (now)"]
            time_search(detector, held_out, plan_.batch_size, args.repeats)
            continue
        n = len(train)
        bounds = [round(n * 0.2)]
        while bounds[-1] < n:
            bounds.append(min(n, bounds[-1] + max(1, round(n * 0.1))))
        line = build_detector(plan_)
        with tempfile.TemporaryDirectory() as tmp:
            train_detector(line, split(train[:bounds[0]]), settings, plan_.device, Path(tmp) / "u.pt", {},
                           held_out=held_out)
        for step, (low, high) in enumerate(itertools.pairwise(bounds)):
            ms, states = {}, {}
            for mode in paired(list(BLOCKS), step):
                search.CPU_BLOCK_ELEMENTS = BLOCKS[mode]
                states[mode] = copy.deepcopy(line)
                started = time.perf_counter()
                update_detector(states[mode], split(train[low:high]), plan_.batch_size, plan_.device,
                                held_out=held_out)
                ms[mode] = 1000 * (time.perf_counter() - started) / (high - low)
            search.CPU_BLOCK_ELEMENTS = BLOCKS["4 MiB (now)"]
            line = states["4 MiB (now)"]
            print(f"{category} update of {high - low} images: ms per added image, " +
                  ", ".join(f"{mode} {value:.1f}" for mode, value in ms.items()) +
                  f"; the same state: {same_state(*states.values())} (ef {line.effort})", flush=True)


if __name__ == "__main__":
    main()
