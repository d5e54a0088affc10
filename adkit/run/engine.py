"""Detector-agnostic training and inference.

Every random draw of training step ``s`` comes from a generator seeded by (seed, s), and batch ``s`` is a slice of
a permutation seeded by (seed, epoch): a run resumed from any checkpoint reaches the same weights as an
uninterrupted one. Checkpoints are written to a temporary file and renamed, so a run killed at any moment leaves
the previous checkpoint intact; a non-finite loss stops training before anything is saved.
"""

from __future__ import annotations

import hashlib
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adkit.core import distributed, threads
from adkit.core.bf16 import choose_backbone_precision
from adkit.core.checkpoints import (  # noqa: F401 - the checkpoint's names, importable from here as before 0.4
    CHECKPOINT_FORMAT,
    load_checkpoint,
    restore,
    save_checkpoint,
    write_checkpoint,
)
from adkit.core.components import Detector, LabelledDefects
from adkit.core.errors import AdkitError
from adkit.core.pipeline import Pipeline
from adkit.run.precision import autocast


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*key: object) -> int:
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10
    compile: bool = False  # torch.compile the training step
    precision: str = "auto"  # see autocast()


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Indices of training batch ``step``: epoch-wise shuffles, deterministic from (seed, epoch)."""
    if n >= batch_size:
        per_epoch = n // batch_size
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch)))
        return perm[i * batch_size:(i + 1) * batch_size]
    return torch.randint(0, n, (batch_size,), generator=torch.Generator().manual_seed(derived_seed(seed, "step", step)))


def _finite_or_stop(losses: dict[str, Tensor], step: int, checkpoint: Path) -> dict[str, float]:
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not distributed.all_finite(losses["loss"]):
        kept = f"the last good checkpoint is kept at {checkpoint}" if checkpoint.exists() else "no checkpoint was written"
        raise AdkitError(f"training stopped: non-finite loss ({values['loss']}) at step {step + 1}; {kept}. "
                         "Lower the learning rate or check the data.")
    return values


def train_detector(detector: Detector, images: Tensor, settings: TrainSettings, device: torch.device,
                   checkpoint: Path, meta: dict[str, Any], resume: bool = False,
                   on_step: Callable[[int, int, dict[str, float] | None], None] | None = None,
                   held_out: Tensor | None = None, defects: LabelledDefects | None = None) -> TrainResult:
    """Train ``detector`` on normal ``images`` (N, 3, H, W) in [0, 1]; writes ``checkpoint`` every
    ``settings.checkpoint_every`` steps and at the end. ``meta`` is stored in the checkpoint to rebuild the run.
    A fitted detector then checks its approximations on ``held_out`` normal images (``Detector.calibrate``; the
    training images when None) before its checkpoint is written."""
    detector.to(device)
    if device.type == "cuda":
        detector.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    if not detector.trainable:
        if images.shape[0] == 0:
            raise AdkitError("no training images to fit on")
        # statistics of frozen features: no autograd, and BatchNorm layers keep their running statistics
        detector.eval()
        mine = images[distributed.shard(images.shape[0])] if detector.fit_shards else images
        with torch.inference_mode(), autocast(device, settings.precision):
            if detector.uses_defects and defects is not None:  # labelled defects, for detectors that learn from them
                detector.fit(_batches(mine, settings.batch_size, device), defects=defects)
            else:
                detector.fit(_batches(mine, settings.batch_size, device))
            checked = images if held_out is None else held_out
            detector.calibrate(_batches(checked, settings.batch_size, device))
            backbones = detector.backbones()
            choose_backbone_precision(list(backbones.values()), detector.detect,
                                      lambda: _batches(checked, settings.batch_size, device), settings.precision, device)
        if distributed.is_main():
            write_checkpoint(checkpoint, detector, backbones, None, None, 0, settings.steps, meta, None)
        distributed.barrier()
        return TrainResult(steps=0, seconds=time.perf_counter() - start)

    detector.train()
    n = images.shape[0]
    if n == 0:
        raise AdkitError("no training images")
    optimizer, scheduler = detector.configure_optimizer(settings.steps)
    backbones = detector.backbones()  # frozen ones: named in the checkpoints, never stored
    first_step, history = 0, []
    if checkpoint.exists():  # resumed: the detector and the optimizer as they were, before anything wraps them
        if not resume:
            raise AdkitError(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
        payload = load_checkpoint(checkpoint)
        restore(detector, payload, checkpoint, backbones)
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload.get("scheduler") is not None:
            scheduler.load_state_dict(payload["scheduler"])
        first_step, history = payload["step"], payload.get("history", [])
    world, rank = distributed.world_size(), distributed.rank()
    # under torchrun, gradients are averaged across ranks by DistributedDataParallel
    step_module = _TrainingStep(detector, device, settings.precision)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        step_module = torch.compile(step_module)
    resident = _resident(images, device)
    starting = torch.Generator(device=device).manual_seed(derived_seed(settings.seed, "start"))
    if detector.uses_defects:  # labelled defective images, for the detectors that learn from them
        detector.on_train_start(images, starting, defects=defects)
    else:
        detector.on_train_start(images, starting)
    for step in range(first_step, settings.steps):
        threads.rebalance()
        idx = batch_indices(step * world + rank, n, settings.batch_size, settings.seed)
        x = resident[idx.to(resident.device, non_blocking=True)].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        rank_key = (rank,) if world > 1 else ()  # single-process seeds stay as they were
        generator = torch.Generator(device=device).manual_seed(derived_seed(settings.seed, "train", step, *rank_key))
        losses = step_module(x, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        logged = None
        # On CPU a check costs nothing; on a GPU only every log_every steps, to avoid host-device syncs.
        if device.type == "cpu" or (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            logged = _finite_or_stop(losses, step, checkpoint)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if logged is not None and ((step + 1) % settings.log_every == 0 or step + 1 == settings.steps):
            history.append({"step": step + 1, **logged})
        if on_step is not None:
            on_step(step + 1, settings.steps, logged)
        at_checkpoint = settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0
        if at_checkpoint or step + 1 == settings.steps:
            if logged is None:
                _finite_or_stop(losses, step, checkpoint)
            if distributed.is_main():  # with history.csv beside it, up to this step
                write_checkpoint(checkpoint, detector, backbones, optimizer, scheduler, step + 1, settings.steps, meta,
                                 history)
            distributed.barrier()
    distributed.broadcast_state(detector)
    return TrainResult(steps=settings.steps - first_step, seconds=time.perf_counter() - start, history=history)


def update_detector(detector: Detector, images: Tensor, batch_size: int, device: torch.device,
                    held_out: Tensor | None = None, defects: LabelledDefects | None = None) -> None:
    """Add normal ``images`` (N, 3, H, W) to a fitted detector that declares ``updatable`` (``Detector.update``),
    and ``defects`` to one that also declares ``uses_defects``; then check its approximations again on
    ``held_out`` normal images (``Detector.calibrate``; the added images when None), as ``train_detector`` does
    after a fit."""
    detector.to(device).eval()
    with torch.inference_mode():
        if detector.uses_defects and defects is not None:
            detector.update(_batches(images, batch_size, device), defects=defects)
        else:
            detector.update(_batches(images, batch_size, device))
        # the backbones keep the precision their fit's check chose: they are unchanged
        detector.calibrate(_batches(images if held_out is None else held_out, batch_size, device))


RESIDENT_BYTES = 4 << 30


def _resident(images: Tensor, device: torch.device) -> Tensor:
    """The training images where batches are cut from without stalling the GPU: on the GPU itself when they
    take under RESIDENT_BYTES (an MVTec category at 256 px is ~0.2 GB), else in pinned host memory, whose
    copies run asynchronously. Unchanged on the CPU."""
    if device.type != "cuda":
        return images
    if images.numel() * images.element_size() < RESIDENT_BYTES:
        return images.to(device)
    return images.pin_memory()


class _TrainingStep(torch.nn.Module):
    """Makes ``training_step`` the forward of a module, so DistributedDataParallel can wrap it; the forward runs
    at the run's ``--precision`` (``autocast``)."""

    def __init__(self, detector: Detector, device: torch.device, precision: str):
        super().__init__()
        self.detector, self.device, self.precision = detector, device, precision

    def forward(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        with autocast(self.device, self.precision):
            return self.detector.training_step(images, generator)


def _batches(images: Tensor, batch_size: int, device: torch.device):
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size].to(device)


@dataclass
class Predictions:
    """raw: detector maps at image size (N, 1, H, W); processed: post-processed maps (N, 1, h, w);
    scores: image scores (N,). All on the CPU."""

    raw: Tensor
    processed: Tensor
    scores: Tensor
    seconds: float


def in_batches(run: Callable[[Tensor], tuple[Tensor, ...]], images: Tensor, batch_size: int, outputs: int,
               on_batch: Callable[[int], None] | None = None) -> list[Tensor]:
    """``run`` over ``images`` (N, ...) in batches, each of its ``outputs`` tensors concatenated on the CPU. Under
    torchrun every rank runs its shard and gets all N rows back, in order. ``on_batch`` gets the number done."""
    n = images.shape[0]
    mine = images[distributed.shard(n)] if distributed.world_size() > 1 else images
    parts: list[list[Tensor]] = [[] for _ in range(outputs)]
    for i in range(0, mine.shape[0], batch_size):
        threads.rebalance()
        for part, tensor in zip(parts, run(mine[i:i + batch_size])):
            part.append(tensor.cpu())
        if on_batch is not None:
            on_batch(min(i + batch_size, mine.shape[0]))
    # a rank without images passes empty tensors, whose trailing shape gather_shards ignores
    joined = [torch.cat(part) if part else torch.zeros(0) for part in parts]
    return distributed.gather_shards(joined, n) if distributed.world_size() > 1 else joined


@torch.inference_mode()
def predict(pipeline: Pipeline, images: Tensor, batch_size: int, device: torch.device,
            on_batch: Callable[[int], None] | None = None, precision: str = "auto") -> Predictions:
    """Run detector -> post-processors -> scorer over ``images`` (N, 3, H, W) in batches; ``on_batch`` gets
    the number of images done after each batch. Under torchrun every rank scores its shard of the images and
    every rank gets all the predictions back, in order."""
    pipeline.to(device).eval()

    def run(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x.to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            return pipeline(x)

    start = time.perf_counter()
    raw, processed, score = in_batches(run, images, batch_size, 3, on_batch)
    seconds = time.perf_counter() - start
    if raw.numel() == 0:
        raw = processed = torch.zeros(0, 1, *images.shape[-2:])
    if distributed.world_size() > 1:
        seconds = max(distributed.all_gather_objects(seconds))  # the slowest rank sets the pace
    return Predictions(raw, processed, score, seconds)


# moved to adkit.run.precision in adkit 0.3 (precision is one concern): the old names keep working until 0.4, each
# warning (DeprecationWarning) with the import to use instead
_MOVED = {"in_float32": "adkit.plugin.in_float32", "uses_bf16": "adkit.run.precision.uses_bf16",
          "PRECISIONS": "adkit.run.precision.PRECISIONS"}  # (autocast: engine uses it, so it is still here)


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'adkit.run.engine' has no attribute {name!r}")
    warnings.warn(f"adkit.run.engine.{name} moved in adkit 0.3 and goes in 0.4: use {_MOVED[name]}",
                  DeprecationWarning, stacklevel=2)
    from adkit.run import precision

    return getattr(precision, name)
