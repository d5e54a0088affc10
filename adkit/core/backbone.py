"""The backbone contract: a frozen, pretrained feature extractor (images -> one feature map per requested stage)
that detectors on pretrained features build on, with its precision (bf16 where a check allows it) and its CPU
batching. adkit.core.components re-exports it beside the other component kinds."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adkit.core.errors import AdkitError
from adkit.core.exporting import is_exporting

# a frozen backbone's inference on a CPU runs in chunks of at most this many input pixels (twice as many in bf16):
# a larger batch's activations outgrow the caches and run slower per image (docs/benchmarks.md, session 18)
CPU_BATCH_PIXELS = 4 * 256 * 256


class Backbone(nn.Module, ABC):
    """A frozen, pretrained feature extractor. ``forward(images, stages)`` maps images (B, 3, H, W) in [0, 1]
    (the backbone normalises them itself) to one feature map per requested stage, (B, C_i, H / s_i, W / s_i)
    for stage i's channel count C_i and stride s_i. Its parameters never train and it always stays in eval
    mode (no BatchNorm drift); the caller decides on autograd (inference mode for fitting, gradients for a
    sampler that climbs the input). ``spec`` is the component spec it was built from."""

    spec: str = ""
    # per stage index: channels and stride (declared by the implementation)
    channels: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._digest: str | None = None
        # "bf16": the forward pass runs under bf16 autocast and returns float32 features (chosen per fitted model
        # by a check against float32, adkit.core.bf16); never while exporting
        self.precision = "fp32"
        self.precision_check: dict[str, Any] | None = None  # what that check measured

    def __call__(self, images: Tensor, stages: Sequence[int]) -> list[Tensor]:
        chunk = self._chunk(images)
        if chunk is not None and chunk < len(images):
            parts = [self._forward(images[start:start + chunk], stages) for start in range(0, len(images), chunk)]
            return [torch.cat(stage) for stage in zip(*parts)]
        return self._forward(images, stages)

    def _forward(self, images: Tensor, stages: Sequence[int]) -> list[Tensor]:
        if self.precision != "bf16" or is_exporting():
            return super().__call__(images, stages)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            features = super().__call__(images, stages)
        return [f.float() for f in features]

    def _chunk(self, images: Tensor) -> int | None:
        """Images per forward pass: on a CPU, without gradients, a batch of more than CPU_BATCH_PIXELS input pixels
        (twice as many in bf16) runs in chunks; ADKIT_CPU_BATCH_PIXELS overrides the budget (0: whole batches).
        None: the batch whole (and while exporting, where the batch size is symbolic, nothing compares it)."""
        if is_exporting() or torch.compiler.is_compiling() or images.device.type != "cpu" or torch.is_grad_enabled():
            return None
        text = os.environ.get("ADKIT_CPU_BATCH_PIXELS", str(CPU_BATCH_PIXELS))
        if not text.strip().isdigit():
            raise AdkitError(f"ADKIT_CPU_BATCH_PIXELS={text}: give a whole number of input pixels (0: whole batches)")
        budget = int(text)
        if budget <= 0:
            return None
        return max(1, budget * (2 if self.precision == "bf16" else 1) // (images.shape[-2] * images.shape[-1]))

    def freeze(self) -> None:
        """Turn off gradients of every parameter and switch to eval mode; call at the end of ``__init__``."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        # frozen: a detector's .train() must not switch BatchNorm back to batch statistics
        return super().train(False)

    def normalise(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> the input of the first layer (e.g. ImageNet-normalised); identity by default.
        ``forward`` applies it; energy models climb through it."""
        return images

    def check_stages(self, stages: Sequence[int], who: str) -> None:
        """Raise a user error if a stage index does not exist."""
        bad = [s for s in stages if not 0 <= s < len(self.channels)]
        if bad or not stages:
            raise AdkitError(f"{who}: backbone {self.spec or type(self).__name__} has stages 0-{len(self.channels) - 1} "
                             f"(strides {'/'.join(map(str, self.strides))}); got layers={'+'.join(map(str, stages))}")

    def check_size(self, images: Tensor, stages: Sequence[int], who: str) -> None:
        """Raise a user error if the images are smaller than the deepest requested stride."""
        deepest = max(self.strides[s] for s in stages)
        if min(images.shape[-2:]) < deepest:
            raise AdkitError(f"{who}: images of {images.shape[-2]}x{images.shape[-1]} px are smaller than the deepest "
                             f"stride ({deepest} px) of layers {'+'.join(map(str, stages))}; use a larger --image-size")

    def digest(self) -> str:
        """sha256 of the weights (every tensor of the state dict, in order): what a checkpoint records to refuse a
        different backbone file later."""
        if self._digest is None:
            hasher = hashlib.sha256()
            for name, tensor in self.state_dict().items():
                hasher.update(name.encode())
                hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._digest = hasher.hexdigest()
        return self._digest

    @abstractmethod
    def forward(self, images: Tensor, stages: Sequence[int]) -> list[Tensor]:
        """Features of ``stages`` (indices into ``channels`` / ``strides``), shallowest first as requested."""
