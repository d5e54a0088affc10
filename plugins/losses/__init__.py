"""Losses: ``l2``, ``ssim`` and ``focal`` (DRAEM), ``color`` and ``psnr`` (DRAEM-improvement paper).

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_losses(register):
    from adkit_plugins.losses.components import ColourHistogramLoss, FocalLoss, InversePSNRLoss, L2Loss, SSIMLoss

    register("l2", L2Loss)
    register("ssim", SSIMLoss)
    register("focal", FocalLoss)
    register("color", ColourHistogramLoss)
    register("psnr", InversePSNRLoss)
