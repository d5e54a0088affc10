"""Multi-process training on torch.distributed, as launched by ``torchrun``.

``torchrun --nproc-per-node N -m adkit train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address;
adkit then joins the process group (NCCL on GPUs, gloo on CPUs), wraps training in DistributedDataParallel, gives
every rank its own batches and anomaly-synthesis seeds, and lets only rank 0 write files. Evaluation shards the
images across ranks and gathers every prediction back in order, so metrics equal a single process's. ``adkit
bench`` instead hands whole jobs to ranks: inside ``alone()`` a rank trains and evaluates as if it were the only
process.
"""

from __future__ import annotations

import atexit
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from adkit.core.errors import AdkitError

_alone = False


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    """This process's rank in the process group, even inside ``alone()`` (0 without torchrun)."""
    return dist.get_rank() if _initialized() else 0


def process_count() -> int:
    """The number of processes in the group, even inside ``alone()`` (1 without torchrun)."""
    return dist.get_world_size() if _initialized() else 1


def world_size() -> int:
    """The ranks that share the current piece of work: 1 inside ``alone()``."""
    return 1 if _alone else process_count()


def rank() -> int:
    return 0 if _alone else process_rank()


@contextmanager
def alone() -> Iterator[None]:
    """Within the block this process works by itself (world size 1, rank 0): no DDP, no sharding, no barriers,
    and it writes its own files. For jobs handed whole to one rank."""
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes checkpoints, logs and reports."""
    return rank() == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AdkitError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise AdkitError(f"--device {name}: use auto, cpu or cuda")
    return torch.device(name)


def run_device(name: str) -> torch.device:
    """This rank's device for a ``--device`` name (``resolve_device``, then ``local_device``)."""
    return local_device(resolve_device(name))


def local_device(device: torch.device) -> torch.device:
    """This rank's device for ``device``: under torchrun a GPU rank takes cuda:LOCAL_RANK. Changes nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once); returns this rank's device. A no-op without torchrun.
    The workflows call it once, at their entry (adkit.app.workflows.joined); planning only computes the device
    (``local_device``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = local_device(device)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when first imported
        # (torch._dynamo imports it, e.g. on the first optimizer step). Imported after the group exists, those
        # defaults hold the group for the life of the process: destroy_process_group() then cannot free it and
        # its worker threads run on into interpreter teardown (see ``leave``). Imported first, they hold None.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave)
    return device


def leave() -> None:
    """Leave the process group and stop its threads; registered to run at exit. A gloo worker thread drops its
    references to a collective's tensors just after the caller has been released; if the interpreter is already
    tearing down when it does, that thread cannot take the GIL and the process aborts ("terminate called without
    an active exception", exit -6) after all its work is done. Destroying the group joins those threads while
    the interpreter is whole."""
    if _initialized():
        dist.destroy_process_group()


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


def broadcast_state(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers. DDP keeps parameters equal, but each rank updates its
    own BatchNorm statistics in its last forward: after training, this makes every rank hold the checkpoint."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def shard(n: int) -> Tensor:
    """Indices of the items this rank handles out of ``n``: rank, rank + world, ... (all of them in one process)."""
    return torch.arange(rank(), n, world_size())


def gather_shards(parts: list[Tensor], n: int) -> list[Tensor]:
    """Inverse of ``shard``: every rank passes its rows of each tensor; every rank gets the full tensors (n, ...)
    in the original order. Ranks with no rows pass empty tensors, whose trailing shape does not matter."""
    world = world_size()
    if world == 1:
        return parts
    everyone = all_gather_objects([p.cpu() for p in parts])
    full = []
    for k in range(len(parts)):
        pieces = [everyone[r][k] for r in range(world)]
        shaped = next((p for p in pieces if p.shape[0] > 0), pieces[0])
        out = torch.empty(n, *shaped.shape[1:], dtype=shaped.dtype)
        for r, piece in enumerate(pieces):
            if piece.shape[0] > 0:
                out[r::world] = piece
        full.append(out)
    return full


def gather_sharded(local: Tensor) -> Tensor:
    """Every rank passes the rows it computed for its ``shard`` of n items (n unknown to it); every rank gets all
    n rows in the original item order, on the device ``local`` is on (unchanged in one process)."""
    if world_size() == 1:
        return local
    n = sum(all_gather_objects(int(local.shape[0])))
    return gather_shards([local.cpu()], n)[0].to(local.device)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks, on every rank (unchanged in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (``[value]`` in one process)."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
