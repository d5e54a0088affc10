"""adkit's DRAEM against anomalib 2.x's Draem, side by side on this machine (issue: speed and memory).

    python benchmarks/compare_anomalib.py --install            # once: a throw-away venv with anomalib
    python benchmarks/compare_anomalib.py [--size 128] [--batch 4] [--steps 3] [--device auto]
                                          [--precision auto|fp32|bf16] [--anomalib-precision fp32|bf16] [--json]

anomalib is never a dependency of adkit: it lives in its own virtual environment (--env, default
~/.cache/adkit/anomalib-env), created by --install with the same torch version as this one. Each side runs in its
own process, one after the other, at default widths (anomalib's Draem has no width parameters), with the same
image size, batch, device and thread count:
- training step = anomaly synthesis + forward + loss + backward + Adam step, median after one warm-up; anomalib's
  is its LightningModule's own pieces (its PerlinAnomalyGenerator given an empty DTD folder, so that both sides
  use the Perlin fallback, DraemModel, DraemLoss,
  its configure_optimizers), timed without the Lightning Trainer around them, which only adds to its time;
- inference = the detector's anomaly map for a batch (adkit: softmax map; anomalib: DraemModel in eval mode,
  which also computes its image score).
Prints both sides and the ratios anomalib / adkit (above 1: adkit is faster); --json ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from adkit.engine import resolve_device

HERE = Path(__file__).resolve().parent
DEFAULT_ENV = Path.home() / ".cache" / "adkit" / "anomalib-env"

ANOMALIB_WORKER = textwrap.dedent('''
    import json, resource, statistics, sys, tempfile, time, warnings
    warnings.filterwarnings("ignore")
    import torch
    import anomalib
    from anomalib.models.image.draem import Draem

    size, batch, steps, device, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    bf16 = sys.argv[6] == "bf16"  # what Lightning's precision="bf16-mixed" does around the step
    torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(0)
    # an empty DTD folder: anomalib's Perlin fallback, as adkit's default (a missing folder makes it download DTD)
    module = Draem(dtd_dir=tempfile.mkdtemp(prefix="no-dtd-")).to(device)
    model, augmenter, loss_fn = module.model, module.augmenter, module.loss
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else (
        optimizers[0][0] if isinstance(optimizers, tuple) else optimizers)
    images = torch.rand(batch, 3, size, size, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    times = []
    for step in range(steps + 1):
        sync(); t0 = time.perf_counter()
        augmented, mask = augmenter(images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            reconstruction, prediction = model(augmented)
            loss = loss_fn(images, reconstruction, mask, prediction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        if step:
            times.append(time.perf_counter() - t0)
    model.eval()
    infer = []
    with torch.inference_mode():
        for rep in range(max(2, steps // 2) + 1):
            sync(); t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                model(images)
            sync()
            if rep:
                infer.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"anomalib": anomalib.__version__, "torch": torch.__version__,
                      "train_step_s": statistics.median(times), "infer_img_s": batch / statistics.median(infer),
                      "peak_memory_mib": peak}))
''')


def install(env: Path) -> None:
    """A fresh virtual environment holding anomalib and this process's torch (so both sides run the same kernels)."""
    version = torch.__version__.split("+")[0]
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "pip"), "install", "-q", f"torch=={version}", "anomalib"], check=True)
    print(f"anomalib installed in {env}")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="adkit's precision (auto: bf16 on GPUs only)")
    parser.add_argument("--anomalib-precision", default="fp32", choices=["fp32", "bf16"],
                        help="anomalib's: fp32 is its Trainer's default; bf16 = precision='bf16-mixed'")
    parser.add_argument("--env", type=Path, default=DEFAULT_ENV, help="anomalib's virtual environment")
    parser.add_argument("--install", action="store_true", help="create --env with anomalib, then exit")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    if args.install:
        install(args.env)
        return
    python = args.env / "bin" / "python"
    if not python.exists():
        sys.exit(f"--env {args.env}: no anomalib environment there; create it with "
                 f"`python {Path(__file__).name} --install --env {args.env}`")
    device = resolve_device(args.device).type
    threads = torch.get_num_threads()

    ours = last_json(subprocess.run(
        [sys.executable, str(HERE / "speed.py"), "--size", str(args.size), "--batch", str(args.batch),
         "--steps", str(args.steps), "--device", device, "--precision", args.precision, "--json"],
        check=True, capture_output=True, text=True).stdout)
    theirs = last_json(subprocess.run(
        [str(python), "-c", ANOMALIB_WORKER, str(args.size), str(args.batch), str(args.steps), device, str(threads),
         args.anomalib_precision],
        check=True, capture_output=True, text=True).stdout)
    result = {
        "size": args.size, "batch": args.batch, "device": device, "threads": threads,
        "precision": {"adkit": args.precision, "anomalib": args.anomalib_precision},
        "adkit": {k: ours[k] for k in ("train_step_s", "infer_img_s", "peak_memory_mib")},
        "anomalib": theirs,
        "train_speedup": theirs["train_step_s"] / ours["train_step_s"],
        "infer_speedup": ours["infer_img_s"] / theirs["infer_img_s"],
        "machine": ours["machine"],
    }
    if not args.json:
        print(f"{'':>14} {'train step s':>13} {'infer img/s':>12} {'peak MiB':>9}")
        for name in ("adkit", "anomalib"):
            side = result[name]
            print(f"{name:>14} {side['train_step_s']:>13.3f} {side['infer_img_s']:>12.2f} {side['peak_memory_mib']:>9.0f}")
        print(f"adkit is {result['train_speedup']:.2f}x anomalib's training speed and "
              f"{result['infer_speedup']:.2f}x its inference speed ({device}, anomalib {theirs['anomalib']}; "
              f"precision adkit {args.precision}, anomalib {args.anomalib_precision})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
