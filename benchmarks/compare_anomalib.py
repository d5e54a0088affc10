"""adkit's DRAEM or PatchCore against anomalib 2.x's, side by side on this machine (speed and memory).

    python benchmarks/compare_anomalib.py --install            # once: a throw-away venv with anomalib
    python benchmarks/compare_anomalib.py [--size 128] [--batch 4] [--steps 3] [--device auto]
                                          [--precision auto|fp32|bf16] [--anomalib-precision fp32|bf16] [--json]
    python benchmarks/compare_anomalib.py --detector patchcore [--coreset 0.1] [--train-images 100] [--size 256]

PatchCore: both sides with EfficientNet-Lite0 (anomalib: timm's tf_efficientnet_lite0, blocks.2 + blocks.4, the
stride-8 and stride-16 stages; adkit: efficientnet-lite0, layers 2+3) without pretrained weights on anomalib's
side (it cannot load them offline; timing does not need them), the same coreset ratio, random images of the same
size: seconds to fit (features + coreset) and inference images/s at batch 1 and --batch.

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

from adkit.core.distributed import resolve_device

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


PATCHCORE_WORKER = textwrap.dedent('''
    import json, resource, statistics, sys, time, warnings
    warnings.filterwarnings("ignore")
    import torch
    import anomalib
    from anomalib.models.image.patchcore import Patchcore

    size, batch, n_train, ratio, device, threads = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                    float(sys.argv[4]), torch.device(sys.argv[5]), int(sys.argv[6]))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = Patchcore(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=False,
                       coreset_sampling_ratio=ratio)
    model = module.model.to(device)
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(n_train, 3, size, size, generator=generator)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n_train, batch):
            model(train[i:i + batch].to(device))
        sync(); t1 = time.perf_counter()
        model.subsample_embedding(ratio)
        sync(); t2 = time.perf_counter()
    model.eval()
    rates = {}
    with torch.inference_mode():
        for b in (1, batch):
            x = torch.rand(b, 3, size, size, generator=generator).to(device)
            times = []
            for rep in range(4):
                sync(); t = time.perf_counter()
                model(x)
                sync()
                if rep:
                    times.append(time.perf_counter() - t)
            rates[b] = b / statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"anomalib": anomalib.__version__, "fit_s": t2 - t0, "fit_features_s": t1 - t0,
                      "fit_rest_s": t2 - t1, "bank_size": int(model.memory_bank.shape[0]),
                      "embedding_dim": int(model.memory_bank.shape[1]),
                      "infer_img_s_batch1": rates[1], f"infer_img_s_batch{batch}": rates[batch],
                      "peak_memory_mib": peak}))
''')


def compare_patchcore(args: argparse.Namespace, python: Path, device: str, threads: int) -> None:
    ours = last_json(subprocess.run(
        [sys.executable, str(HERE / "speed.py"), "--detector", f"patchcore:coreset={args.coreset}",
         "--train-images", str(args.train_images), "--size", str(args.size), "--batch", str(args.batch),
         "--device", device, "--precision", args.precision, "--json"],
        check=True, capture_output=True, text=True).stdout)
    theirs = last_json(subprocess.run(
        [str(python), "-c", PATCHCORE_WORKER, str(args.size), str(args.batch), str(args.train_images),
         str(args.coreset), device, str(threads)], check=True, capture_output=True, text=True).stdout)
    keys = ("fit_s", "fit_features_s", "fit_rest_s", "bank_size", "infer_img_s_batch1",
            f"infer_img_s_batch{args.batch}", "peak_memory_mib")
    result = {"detector": "patchcore", "size": args.size, "batch": args.batch, "train_images": args.train_images,
              "coreset": args.coreset, "device": device, "threads": threads,
              "adkit": {k: ours[k] for k in keys}, "anomalib": theirs,
              "fit_speedup": theirs["fit_s"] / ours["fit_s"],
              "infer_speedup_batch1": ours["infer_img_s_batch1"] / theirs["infer_img_s_batch1"],
              "machine": ours["machine"]}
    if not args.json:
        print(f"{'':>10} {'fit s':>8} {'features s':>11} {'coreset s':>10} {'bank':>7} {'img/s b1':>9} {'peak MiB':>9}")
        for name in ("adkit", "anomalib"):
            side = result[name]
            print(f"{name:>10} {side['fit_s']:>8.1f} {side['fit_features_s']:>11.1f} {side['fit_rest_s']:>10.1f} "
                  f"{side['bank_size']:>7} {side['infer_img_s_batch1']:>9.2f} {side['peak_memory_mib']:>9.0f}")
    print(json.dumps(result))


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
    parser.add_argument("--detector", default="draem", choices=["draem", "patchcore"])
    parser.add_argument("--coreset", type=float, default=0.1, help="patchcore: coreset ratio on both sides")
    parser.add_argument("--train-images", type=int, default=100, help="patchcore: images to fit on")
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
    if args.detector == "patchcore":
        compare_patchcore(args, python, device, threads)
        return

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
