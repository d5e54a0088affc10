"""PatchCore's graph built beside the search check, against built at once (as before session 24): the whole fit
with its check (``train_detector``), then the line's updates (fit on the first 20 %, steps of 10 %), each timed
both ways, alternated, and the two fitted states compared tensor for tensor.

    python benchmarks/graph_beside.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/graph_beside.py --data mvtec --root ../shared/data/kolektorsdd --no-updates
    python benchmarks/graph_beside.py --data folder:normal=../shared/data/elpv/normal,abnormal=../shared/data/elpv/abnormal,name=elpv --no-updates

"At once" builds the graph as soon as the bank is kept (``IndexedBank._index`` followed by ``_graph_built``),
before the check's held-out patches are searched exactly; "beside" is adkit's default. PatchCore's defaults; the
fits at --precision fp32, the updates at the precision the fit's check chose (as adkit update runs). An update
step runs from the same state both ways (a copy each) and the line goes on from the "beside" one. Prints one
line per run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time
from pathlib import Path

import torch

from adkit.data.loading import load_split
from adkit.run.assembly import build_detector
from adkit.run.config import RunConfig
from adkit.run.engine import TrainSettings, train_detector, update_detector
from adkit.run.planning import plan
from adkit_plugins.patchcore.index import IndexedBank

BESIDE = IndexedBank._index


def at_once(self, *args, **kwargs) -> None:
    BESIDE(self, *args, **kwargs)
    self._graph_built()


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(
        x[k].shape == y[k].shape and torch.allclose(x[k].double(), y[k].double(), rtol=0, atol=0, equal_nan=True)
        for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category")
    parser.add_argument("--fits", type=int, default=2, help="pairs of whole fits")
    parser.add_argument("--no-updates", action="store_true")
    args = parser.parse_args()
    for precision, what in (("fp32", "fit"), ("auto", "update")):
        if what == "fit" and not args.fits or what == "update" and args.no_updates:
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
            for pair in range(args.fits):
                for mode in ("at once", "beside") if pair % 2 == 0 else ("beside", "at once"):
                    IndexedBank._index = at_once if mode == "at once" else BESIDE
                    detector = build_detector(plan_)
                    with tempfile.TemporaryDirectory() as tmp:
                        started = time.perf_counter()
                        train_detector(detector, split(train), settings, plan_.device, Path(tmp) / "c.pt", {},
                                       held_out=held_out)
                        seconds = time.perf_counter() - started
                    fitted[mode] = detector
                    print(f"{category} fit, graph built {mode}: {seconds:.1f} s (ef {detector.effort})", flush=True)
                print(f"{category} fit: the same state both ways: {same_state(fitted['at once'], fitted['beside'])}")
            IndexedBank._index = BESIDE
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
            for mode in ("at once", "beside") if step % 2 == 0 else ("beside", "at once"):
                IndexedBank._index = at_once if mode == "at once" else BESIDE
                states[mode] = copy.deepcopy(line)
                started = time.perf_counter()
                update_detector(states[mode], split(train[low:high]), plan_.batch_size, plan_.device,
                                held_out=held_out)
                ms[mode] = 1000 * (time.perf_counter() - started) / (high - low)
            IndexedBank._index = BESIDE
            line = states["beside"]
            print(f"{category} update of {high - low} images: ms per added image, graph built at once "
                  f"{ms['at once']:.1f}, beside {ms['beside']:.1f}; the same state: "
                  f"{same_state(states['at once'], states['beside'])} (ef {line.effort})", flush=True)


if __name__ == "__main__":
    main()
