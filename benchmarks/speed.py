"""Speed and memory of DRAEM training and inference, or of fitting a detector on pretrained features.

    python benchmarks/speed.py [--size 256] [--batch 8] [--device auto] [--recon-width 128] [--disc-width 64]
                               [--steps 5] [--compile [--compile-mode reduce-overhead]] [--precision auto|fp32|bf16]
                               [--json]
    python benchmarks/speed.py --detector patchcore[:key=value,...] [--train-images 600] [--size 256] [--json]
    python benchmarks/speed.py --export --detector SPEC [--post SPEC ...] [--size 256] [--batch 8] [--json]

With --detector SPEC (a fitted detector such as patchcore or padim): seconds to fit on --train-images random
images (backbone features, then the rest: PatchCore's coreset), inference images per second at batch 1 and at
--batch, the first call's seconds after the fit (batch 1: what a service's first request waits for, lazy builds
and a GPU's first kernels included), and peak memory.

With --export: the deployed pipeline (detector, its default or --post post-processors, scorer, threshold) timed
four ways, torch eager, torch.compile, TorchScript and onnxruntime, at batch 1 (latency) and --batch (images per
second): one median over --steps timed calls after warm-up. Weights are random (a fitted detector is fitted on
--train-images random images): speed does not depend on them.

Median seconds per training step (anomaly synthesis + forward + backward + optimiser step, after a warm-up),
split into synthesis / forward / backward+update; inference images per second of the detector alone and followed
by each built-in post-processor; peak memory (RSS on CPU, max allocated on GPU). With --json the last line is one
JSON object with those figures and the machine. --compile runs the training step and the map through
torch.compile (compilation happens in the warm-up steps, which are not timed); --compile-mode picks
torch.compile's mode (reduce-overhead: CUDA graphs on a GPU, three warm-up steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from adkit.core.components import DetectorContext
from adkit.core.distributed import resolve_device
from adkit.core.plugins import get_catalog
from adkit.run.precision import autocast, uses_bf16
from adkit_plugins.draem.synthesis import synthesize


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def forward_flop(detector, size: int, device: torch.device) -> float:
    """FLOPs of one image's anomaly map (both sub-networks), counted by torch's FlopCounterMode (a multiply-add
    counts 2)."""
    x = torch.rand(1, 3, size, size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        detector.anomaly_map(x)
    return float(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device, bf16: bool) -> float:
    """Measured dense matrix-multiply throughput in the dtype the forward runs in (bf16 under autocast)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def fitted_speed(spec: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Fit time, inference rate and peak memory of a fitted detector on random images (timing does not depend
    on the pixel values; accuracy figures come from adkit run / bench)."""
    catalog = get_catalog()
    detector = catalog["detector"].create(spec)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=args.size, device=device))
    detector.to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(args.train_images, 3, args.size, args.size, generator=generator)
    batches = [train[i:i + args.batch].to(device) for i in range(0, len(train), args.batch)]
    embed_s = 0.0

    def timed_batches():  # the backbone's share of fit() is the time spent producing and embedding batches
        nonlocal embed_s
        for batch in batches:
            t0 = time.perf_counter()
            yield batch
            sync(device)
            embed_s += time.perf_counter() - t0

    with torch.inference_mode(), autocast(device, args.precision):
        t0 = time.perf_counter()
        detector.fit(timed_batches())
        sync(device)
        fit_s = time.perf_counter() - t0
    rates, first_call_s = {}, None
    with torch.inference_mode(), autocast(device, args.precision):
        for batch_size in (1, args.batch):
            x = torch.rand(batch_size, 3, args.size, args.size, generator=generator).to(device)
            times = []
            for rep in range(args.steps + 1):
                sync(device)
                t0 = time.perf_counter()
                detector.detect(x)
                sync(device)
                if rep:
                    times.append(time.perf_counter() - t0)
                elif first_call_s is None:
                    first_call_s = time.perf_counter() - t0
            rates[batch_size] = batch_size / statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    bank = getattr(detector, "memory_bank", None)
    return {"detector": spec, "size": args.size, "train_images": args.train_images, "batch": args.batch,
            "device": str(device), "precision": args.precision, "fit_s": fit_s,
            "fit_features_s": embed_s, "fit_rest_s": fit_s - embed_s,
            "bank_size": None if bank is None else int(bank.shape[0]), "first_call_s": first_call_s,
            "infer_img_s_batch1": rates[1], "infer_latency_ms_batch1": 1000 / rates[1],
            f"infer_img_s_batch{args.batch}": rates[args.batch], "peak_memory_mib": peak}


def export_speed(spec: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Images per second and latency of the Deployed pipeline: eager, torch.compile, TorchScript, onnxruntime."""
    import tempfile
    from pathlib import Path

    from adkit.core.pipeline import Pipeline
    from adkit.data.geometry import Geometry
    from adkit.deploy.export import Deployed, export, load_runner, threshold_input

    catalog = get_catalog()
    detector = catalog["detector"].create(spec)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=args.size, device=torch.device("cpu")))
    generator = torch.Generator().manual_seed(0)
    if not detector.trainable:
        train = torch.rand(args.train_images, 3, args.size, args.size, generator=generator)
        detector.eval()
        with torch.inference_mode():
            detector.fit(train[i:i + args.batch] for i in range(0, len(train), args.batch))
    posts = args.post if args.post is not None else list(type(detector).default_postprocessors)
    pipeline = Pipeline(detector, [catalog["postprocessor"].create(p) for p in posts],
                        catalog["scorer"].create(type(detector).default_scorer))
    model = Deployed(pipeline).eval()
    threshold = threshold_input(0.0)
    runners = {}
    with tempfile.TemporaryDirectory() as folder:
        for fmt in ("torchscript", "onnx"):
            export(model, fmt, Path(folder) / fmt, Geometry(args.size, args.size), {"threshold": 0.0}, {})
            loaded = load_runner(Path(folder) / fmt / ("model.pt" if fmt == "torchscript" else "model.onnx"),
                                 fmt, device)
            runners[fmt] = lambda images, loaded=loaded: loaded(images, 0.0)
        model.to(device)
        compiled = torch.compile(model)

        def eager_runner(module):
            def run(images):
                with torch.inference_mode():
                    return module(images.to(device), threshold.to(device))
            return run

        runners = {"eager": eager_runner(model), "compile": eager_runner(compiled), **runners}
        timings: dict[str, dict[str, float]] = {}
        for name, run in runners.items():
            for batch_size in (1, args.batch):
                x = torch.rand(batch_size, 3, args.size, args.size, generator=generator)
                for _ in range(2 if name == "compile" else 1):  # warm-up (compilation for torch.compile)
                    run(x)
                times = []
                for _ in range(args.steps):
                    sync(device)
                    t0 = time.perf_counter()
                    run(x)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                median = statistics.median(times)
                timings.setdefault(name, {})[f"batch{batch_size}_img_s"] = batch_size / median
                if batch_size == 1:
                    timings[name]["latency_ms"] = 1000 * median
    return {"detector": spec, "posts": posts, "size": args.size, "batch": args.batch, "device": str(device),
            "timings": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="draem", help="draem (training speed) or a fitted detector spec")
    parser.add_argument("--train-images", type=int, default=600, help="fitted detectors: images to fit on")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--recon-width", type=int, default=128)
    parser.add_argument("--disc-width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps after one warm-up step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step and the map")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile's mode (implies --compile); reduce-overhead: CUDA graphs on a GPU")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="bf16 autocast: auto = on GPUs only")
    parser.add_argument("--export", action="store_true", help="time eager, compile, TorchScript and onnxruntime")
    parser.add_argument("--post", action="append", help="with --export: post-processor specs (default: the "
                                                        "detector's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.compile = args.compile or args.compile_mode is not None
    mode = None if args.compile_mode in (None, "default") else args.compile_mode

    device = resolve_device(args.device)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    if args.export:
        result = {**export_speed(args.detector, args, device), "machine": machine}
        if not args.json:
            print(f"{args.detector} ({', '.join(result['posts']) or 'no post-processors'}), {args.size} px, "
                  f"{device}: images/s at batch 1 and {args.batch}, latency at batch 1")
            for name, row in result["timings"].items():
                print(f"{name:>12}: {row['batch1_img_s']:8.2f} {row[f'batch{args.batch}_img_s']:8.2f} img/s  "
                      f"{row['latency_ms']:8.1f} ms")
        print(json.dumps(result))
        return
    if args.detector.split(":")[0] != "draem":
        result = {**fitted_speed(args.detector, args, device), "machine": machine}
        if not args.json:
            for key, value in result.items():
                print(f"{key:>24}: {value}")
        print(json.dumps(result))
        return
    catalog = get_catalog()
    detector = catalog["detector"].create(f"draem:recon_width={args.recon_width},disc_width={args.disc_width}")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=args.size, device=device))
    detector.to(device).train()
    if device.type == "cuda":
        detector.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats()
    optimizer, _ = detector.configure_optimizer(1000)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)

    training_step, anomaly_map = detector.training_step, detector.anomaly_map
    if args.compile:
        training_step, anomaly_map = torch.compile(training_step, mode=mode), torch.compile(anomaly_map, mode=mode)
    # CUDA graphs are recorded after a warm-up run of their own
    warmup = (3 if mode == "reduce-overhead" else 2) if args.compile else 1

    parts: dict[str, list[float]] = {"synthesis_s": [], "forward_s": [], "backward_update_s": [], "train_step_s": []}
    for step in range(args.steps + warmup):
        g = torch.Generator(device=device).manual_seed(step)
        sync(device)
        t0 = time.perf_counter()
        batch = synthesize(images, g, None, detector.synthesis)
        sync(device)
        t1 = time.perf_counter()
        with autocast(device, args.precision):
            out = training_step(images, torch.Generator(device=device).manual_seed(step))
        sync(device)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        sync(device)
        t3 = time.perf_counter()
        if step < warmup:
            continue
        # training_step includes its own synthesis: forward = (t2 - t1) - synthesis time
        parts["synthesis_s"].append(t1 - t0)
        parts["forward_s"].append(max(0.0, (t2 - t1) - (t1 - t0)))
        parts["backward_update_s"].append(t3 - t2)
        parts["train_step_s"].append(t3 - t1)
        del batch

    detector.eval()
    infer: dict[str, float] = {}
    posts = [None] + [f"{name}" for name in ("avgpool", "gaussian", "freqmask")]
    with torch.inference_mode():
        for post_name in posts:
            post = catalog["postprocessor"].create(post_name).to(device) if post_name else None
            times = []
            for rep in range(max(2, args.steps // 2) + warmup):
                sync(device)
                t0 = time.perf_counter()
                with autocast(device, args.precision):
                    maps = anomaly_map(images)
                if post is not None:
                    maps = post(maps.float())
                sync(device)
                if rep >= warmup:
                    times.append(time.perf_counter() - t0)
            infer[post_name or "detector"] = args.batch / statistics.median(times)

    flop = forward_flop(detector, args.size, device)
    matmul = matmul_flops_per_s(device, uses_bf16(device, args.precision))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {
        "size": args.size, "batch": args.batch, "recon_width": args.recon_width, "disc_width": args.disc_width,
        "device": str(device), "compile": args.compile, "compile_mode": args.compile_mode or "default",
        "precision": args.precision,
        **{k: statistics.median(v) for k, v in parts.items()},
        "infer_img_s": infer["detector"],
        "forward_gflop_per_img": flop / 1e9,
        "matmul_tflop_s": matmul / 1e12,
        # the share of the machine's measured matmul throughput that inference achieves
        "forward_matmul_fraction": flop * infer["detector"] / matmul,
        "infer_img_s_with_post": {k: v for k, v in infer.items() if k != "detector"},
        "peak_memory_mib": peak,
        "machine": machine,
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key:>22}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
