"""Multi-process training on torch.distributed, as launched by ``torchrun``.

``torchrun --nproc-per-node N -m adkit train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address;
adkit then joins the process group (NCCL on GPUs, gloo on CPUs), wraps training in DistributedDataParallel, gives
every rank its own batches and anomaly-synthesis seeds, and lets only rank 0 write files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes checkpoints, logs and reports."""
    return rank() == 0


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once); returns this rank's device. A no-op without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank (so that all ranks stop together)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if world_size() > 1:
        flag = flag.to(value.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)
