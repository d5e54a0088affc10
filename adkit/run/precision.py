"""What ``--precision`` means for a run: bf16 autocast or float32 (``autocast``), and losses kept in float32 under
it (``in_float32``). A fitted detector's backbone alone may run bf16 on a CPU with bf16 instructions, where a check
allows it (adkit.core.bf16)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from adkit.core.errors import AdkitError

PRECISIONS = ("auto", "fp32", "bf16")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for ``bf16``, and for ``auto`` on CUDA; float32 otherwise. ``auto`` keeps the CPU's pipeline
    in float32: bf16 is slow on CPUs without bf16 instructions; on those with them (AVX512-BF16, AMX) a fitted
    detector's backbone alone runs bf16 where a check allows it (choose_backbone_precision)."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether ``precision`` on ``device`` means bf16 autocast (see ``autocast``)."""
    if precision not in PRECISIONS:
        raise AdkitError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def in_float32(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Decorate a loss of two tensors, a function ``f(a, b, ...)`` or a method ``forward(self, a, b, ...)``, to
    compute in float32 with autocast off, whatever precision the network ran in; floating inputs are cast, others
    (integer masks) kept. Under bf16 autocast the blurs inside SSIM run in bf16, where var = E[x^2] - E[x]^2
    cancels catastrophically: the SSIM denominator reaches zero and the loss is NaN from the first step."""

    @functools.wraps(loss)
    def wrapper(*args, **kwargs) -> Tensor:
        lead = 0 if isinstance(args[0], Tensor) else 1  # a method's self comes first
        first, second = args[lead], args[lead + 1]
        with torch.autocast(first.device.type, enabled=False):
            pair = tuple(t.float() if t.is_floating_point() else t for t in (first, second))
            return loss(*args[:lead], *pair, *args[lead + 2:], **kwargs)

    return wrapper
