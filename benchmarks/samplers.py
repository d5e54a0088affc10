"""PYLD-M-N versus SGLD on the same trained energy network: energy reached versus wall time and full passes.

    python benchmarks/samplers.py [--category carpet] [--size 32] [--train-steps 150] [--json]
    python benchmarks/samplers.py --checkpoint RUN/CATEGORY/checkpoint.pt [--batch 2048] [--steps 40]

Pixel space (the first form): trains a small EBM (WRN-10-2, quick preset) on a synthetic texture category, then
starts both samplers from the same replay-buffer draws and records, after each outer step (PYLD) or step (SGLD),
the mean energy E = -f of the samples, the wall time and the number of full network passes. The JEM++ paper
claims sampling 2.4x faster than SGLD.

Feature space (``--checkpoint`` of a trained feature-ebm-patch or feature-ebm-image): the trained energy network,
chains started uniformly in the box [-1, 1] (far above the model's energies); PYLD with the detector's sampler
spec against SGLD at PYLD's inner step (alpha, noise sqrt(2 alpha): Langevin at the same step per gradient) and at
PYLD's whole outer step (N alpha, the step PYLD's repeated first-layer steps add up to: a linear first layer has a
constant gradient, so N inner steps are one step N times as long). Each is timed to 90 % of the energy descent
PYLD makes in ``--steps`` outer steps (the end point itself is each sampler's own stationary level).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from adkit.api import build_detector, plan
from adkit.data.loading import load_split
from adkit.run.config import RunConfig
from adkit.run.engine import TrainSettings, train_detector
from adkit_plugins.ebm.samplers import PYLD, SGLD


def trace(sampler, network, x0, outer: int, stop_at: float | None = None) -> list[dict[str, float]]:
    """Run up to ``outer`` single-step calls, recording energy, seconds and full passes after each; stop early
    once the mean energy is at or below ``stop_at``."""
    points, x, start = [], x0, time.perf_counter()
    for _ in range(outer):
        if stop_at is not None and points and points[-1]["energy"] <= stop_at:
            break
        x = sampler.sample(network, x, torch.Generator().manual_seed(len(points)))
        with torch.no_grad():
            energy = (-network(x)).mean().item()
        points.append({"energy": energy, "seconds": time.perf_counter() - start,
                       "full_passes": sampler.full_passes, "first_layer_passes": sampler.first_layer_passes})
    return points


def feature_space(args: argparse.Namespace) -> dict:
    """PYLD against SGLD on a trained feature-space energy network (module docstring)."""
    from adkit.api import get_catalog
    from adkit.run.assembly import load_trained
    from adkit.run.config import RunConfig as Config

    pipeline, meta = load_trained(Config(), Path(args.checkpoint), torch.device("cpu"))
    detector = pipeline.detector
    network = detector.network.eval()
    spec = get_catalog()["sampler"].parse(detector.sampler_spec)
    pyld_params = dict(spec.params)
    alpha, inner = float(pyld_params["alpha"]), int(pyld_params["N"])
    x0 = torch.rand(args.batch, network.first.in_features, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        start_energy = (-network(x0)).mean().item()
    pyld = trace(PYLD(**{**pyld_params, "M": 1}), network, x0, args.steps)
    # the chains end near their stationary energy, which each sampler's step biases differently: compare the time
    # to 90 % of PYLD's descent from the start, not to its end point
    target = start_energy - 0.9 * (start_energy - pyld[-1]["energy"])
    rows = {"pyld": pyld}
    for name, step in (("sgld_same_step", alpha), ("sgld_outer_step", alpha * inner)):
        rows[name] = trace(SGLD(K=1, step=step, noise=(2 * step) ** 0.5), network, x0, args.steps * inner * 2,
                           stop_at=target)
    result = {"checkpoint": args.checkpoint, "detector": meta["detector"], "sampler": detector.sampler_spec,
              "batch": args.batch, "start_energy": start_energy, "pyld_end_energy": pyld[-1]["energy"],
              "target_energy": target}
    for name, points in rows.items():
        hit = next((p for p in points if p["energy"] <= target), None)
        result[name] = {"seconds": hit["seconds"], "full_passes": hit["full_passes"]} if hit else \
            {"reached": False, "energy": points[-1]["energy"], "seconds": points[-1]["seconds"]}
    for name in ("sgld_same_step", "sgld_outer_step"):
        if "reached" not in result[name] and "reached" not in result["pyld"]:
            result[name]["time_ratio_to_pyld"] = result[name]["seconds"] / result["pyld"]["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="carpet")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="PYLD outer steps M and SGLD steps K")
    parser.add_argument("--N", type=int, default=10, help="PYLD inner steps")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--checkpoint", help="a trained feature-ebm-patch or feature-ebm-image checkpoint")
    args = parser.parse_args()
    if args.checkpoint:
        print(json.dumps(feature_space(args)))
        return

    config = RunConfig(detector=["ebm-image"], preset="quick", category=[args.category], image_size=args.size,
                       steps=args.train_steps)
    plan_ = plan(config)
    detector = build_detector(plan_)
    splits = plan_.dataset.load(args.category)
    images = load_split(splits.train, args.size).images
    with tempfile.TemporaryDirectory() as tmp:
        train_detector(detector, images, TrainSettings(steps=args.train_steps, batch_size=16), plan_.device,
                       Path(tmp) / "ebm.pt", {})
    network = detector.network.train()  # BatchNorm in train mode while sampling, as in JEM++
    x0 = detector.buffer.fresh(args.batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        start_energy = (-network(x0)).mean().item()
    pyld = trace(PYLD(M=1, N=args.N), network, x0, args.steps)
    sgld = trace(SGLD(K=1), network, x0, args.steps * 10, stop_at=pyld[-1]["energy"])
    # the energy PYLD reaches after all its steps, and when SGLD first gets there
    target = pyld[-1]["energy"]
    sgld_hit = next((p for p in sgld if p["energy"] <= target), None)
    result = {
        "category": args.category, "size": args.size, "batch": args.batch, "start_energy": start_energy,
        "pyld": {"M": args.steps, "N": args.N, **pyld[-1]}, "sgld": {"K": len(sgld), **sgld[-1]},
        "sgld_seconds_to_pyld_energy": sgld_hit["seconds"] if sgld_hit else None,
        "sgld_passes_to_pyld_energy": sgld_hit["full_passes"] if sgld_hit else None,
        "speedup_at_pyld_energy": (sgld_hit["seconds"] / pyld[-1]["seconds"]) if sgld_hit else None,
        "pyld_trace": pyld, "sgld_trace": sgld,
    }
    if not args.json:
        print(f"start energy {start_energy:.3f}")
        print("step | PYLD energy  s  full | SGLD energy  s  full")
        for i, s in enumerate(sgld):
            p = pyld[i] if i < len(pyld) else None
            left = f"{p['energy']:10.3f} {p['seconds']:5.2f} {p['full_passes']:3d}" if p else " " * 20
            print(f"{i + 1:4d} | {left} | {s['energy']:10.3f} {s['seconds']:5.2f} {s['full_passes']:3d}")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("trace")}))


if __name__ == "__main__":
    main()
