"""PatchCore timed two ways on one set, pair by pair: whole fits with their check, and the line's updates (fit on
the first 20 %, steps of 10 %), each way switched on before the run it times, the order reversed every other pair,
and the fitted states compared tensor for tensor. The harness of benchmarks/graph_beside.py and
benchmarks/exact_blocks.py; not a command itself."""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adkit.data.loading import load_split
from adkit.run.assembly import build_detector
from adkit.run.config import RunConfig
from adkit.run.engine import TrainSettings, train_detector, update_detector
from adkit.run.planning import RunPlan, plan

# each way's name and its switch, called before every run that way
Ways = dict[str, Callable[[], None]]


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options every paired benchmark takes (a set, how many pairs of fits, whether the line runs)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root")
    parser.add_argument("--category")
    parser.add_argument("--fits", type=int, default=2, help="pairs of whole fits")
    parser.add_argument("--no-updates", action="store_true")
    return parser


@dataclass
class Setting:
    """A set's first category as adkit run loads it: its training images, the held-out normal images the checks
    search, and how they are tiled."""

    plan: RunPlan
    category: str
    split: Callable[[torch.Tensor], torch.Tensor]
    train: torch.Tensor
    held_out: torch.Tensor
    settings: TrainSettings


def setting(args: argparse.Namespace, precision: str) -> Setting:
    plan_ = plan(RunConfig(detector=["patchcore"], data=args.data, root=args.root, precision=precision,
                           category=[args.category] if args.category else []))
    category = plan_.categories[0]
    splits = plan_.dataset.load(category)
    split = plan_.geometry.tiles
    val = load_split(splits.val, plan_.geometry)
    return Setting(plan_, category, split, load_split(splits.train, plan_.geometry).images,
                   split(val.images[val.labels == 0]), TrainSettings(steps=1, batch_size=plan_.batch_size))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(
        x[k].shape == y[k].shape and torch.allclose(x[k].double(), y[k].double(), rtol=0, atol=0, equal_nan=True)
        for k in x)


def in_pair_order(ways: Ways, pair: int) -> list[str]:
    """The ways in the order of pair ``pair``: reversed every other pair."""
    names = list(ways)
    return names if pair % 2 == 0 else names[::-1]


def fits(s: Setting, ways: Ways, pairs: int, report: bool = True) -> dict[str, torch.nn.Module]:
    """``pairs`` pairs of whole fits with their check, one line each (``report``), then whether the last pair's
    states are the same; the last pair's fitted detectors by way."""
    fitted: dict[str, torch.nn.Module] = {}
    for pair in range(pairs):
        for way in in_pair_order(ways, pair):
            ways[way]()
            detector = build_detector(s.plan)
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                train_detector(detector, s.split(s.train), s.settings, s.plan.device, Path(tmp) / "c.pt", {},
                               held_out=s.held_out)
                seconds = time.perf_counter() - started
            fitted[way] = detector
            if report:
                print(f"{s.category} fit, {way}: {seconds:.1f} s (ef {detector.effort})", flush=True)
    print(f"{s.category} fit: the same state both ways: {same_state(*fitted.values())}", flush=True)
    return fitted


def line(s: Setting, ways: Ways, goes_on: str) -> None:
    """The line: a fit on the first 20 % of the training images, then steps of 10 %, each step run both ways from
    the same state (a copy each) and timed, one line a step; the line goes on from way ``goes_on``'s state."""
    n = len(s.train)
    bounds = [round(n * 0.2)]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + max(1, round(n * 0.1))))
    ways[goes_on]()
    detector = build_detector(s.plan)
    with tempfile.TemporaryDirectory() as tmp:
        train_detector(detector, s.split(s.train[:bounds[0]]), s.settings, s.plan.device, Path(tmp) / "u.pt", {},
                       held_out=s.held_out)
    for step, (low, high) in enumerate(itertools.pairwise(bounds)):
        ms, states = {}, {}
        for way in in_pair_order(ways, step):
            ways[way]()
            states[way] = copy.deepcopy(detector)
            started = time.perf_counter()
            update_detector(states[way], s.split(s.train[low:high]), s.plan.batch_size, s.plan.device,
                            held_out=s.held_out)
            ms[way] = 1000 * (time.perf_counter() - started) / (high - low)
        ways[goes_on]()
        detector = states[goes_on]
        print(f"{s.category} update of {high - low} images: ms per added image, " +
              ", ".join(f"{way} {value:.1f}" for way, value in ms.items()) +
              f"; the same state: {same_state(*states.values())} (ef {detector.effort})", flush=True)
