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

import statistics
import time

import torch
from paired import Ways, arguments, fits, in_pair_order, line, setting

from adkit_plugins.patchcore import search

BLOCKS = {"64 MiB (before)": 1 << 24, "4 MiB (now)": search.CPU_BLOCK_ELEMENTS}


def switch(elements: int) -> None:
    search.CPU_BLOCK_ELEMENTS = elements


WAYS: Ways = {name: lambda elements=elements: switch(elements) for name, elements in BLOCKS.items()}


def time_search(detector: torch.nn.Module, held_out: torch.Tensor, batch_size: int, repeats: int) -> None:
    """The searches alone on the fitted bank, medians of ``repeats`` pairs: exact search of 8,192 held-out patches
    (a block of the check's exact nearest, or a batch of 8 images searched exactly), of 256 (a coreset
    continuation's refinement), and the graph's search of 8,192 at the effort the check chose (its candidates
    re-ranked in blocks of the same size)."""
    with torch.inference_mode():  # as the check embeds them
        patches = detector._held_out_patches(held_out[i:i + batch_size] for i in range(0, len(held_out), batch_size))
    bank = detector.memory_bank
    kept = search.norms(bank)

    def exact(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return search.knn(queries, bank, 1, bank_norms=kept)

    def graph(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return detector._search(queries, 1, detector.effort)

    runs = [("exact search", patches[:8192], exact), ("exact search", patches[:256], exact)]
    if detector.effort and detector.hnsw_graph.numel():
        runs.append((f"graph search at ef {detector.effort}", patches[:8192], graph))
    for name, queries, run in runs:
        seconds: dict[str, list[float]] = {mode: [] for mode in BLOCKS}
        found = {}
        for repeat in range(repeats + 1):
            for mode in in_pair_order(WAYS, repeat):
                WAYS[mode]()
                started = time.perf_counter()
                found[mode] = run(queries)
                if repeat:  # the first pair warms up
                    seconds[mode].append(time.perf_counter() - started)
        first = found[next(iter(BLOCKS))]
        same = all(torch.equal(found[m][0], first[0]) and torch.equal(found[m][1], first[1]) for m in BLOCKS)
        print(f"{name} of {queries.shape[0]:,} held-out patches in a bank of {bank.shape[0]:,}: " +
              ", ".join(f"{mode} {1000 * statistics.median(s):.1f} ms" for mode, s in seconds.items()) +
              f"; the same distances and indices: {same}", flush=True)
    switch(BLOCKS["4 MiB (now)"])


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="pairs of searches alone")
    args = parser.parse_args()
    fit_on = setting(args, "fp32")
    fitted = fits(fit_on, WAYS, max(1, args.fits), report=args.fits > 0)
    time_search(fitted["4 MiB (now)"], fit_on.held_out, fit_on.plan.batch_size, args.repeats)
    if not args.no_updates:
        line(setting(args, "auto"), WAYS, "4 MiB (now)")
    switch(BLOCKS["4 MiB (now)"])


if __name__ == "__main__":
    main()
