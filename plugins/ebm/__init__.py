"""Energy-based anomaly detection (patch-based EBM with the JEM++ PYLD-M-N sampler)."""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_detectors(register):
    from adkit_plugins.ebm.detectors import EBMImage, EBMPatch
    from adkit_plugins.ebm.features import FeatureEBMImage, FeatureEBMPatch

    register("ebm-image", EBMImage, help="Image-level energy-based model (JEM++ WRN), score = energy")
    register("ebm-patch", EBMPatch, help="Patch-level energy-based model, map = grid of patch energies")
    register("feature-ebm-patch", FeatureEBMPatch,
             help="Patch-level energy model on pretrained patch features and position (PYLD-M-N), map = energies")
    register("feature-ebm-image", FeatureEBMImage,
             help="Image-level energy model on pooled pretrained features (PYLD-M-N), score = energy")


@hookimpl
def register_samplers(register):
    from adkit_plugins.ebm.samplers import PYLD, SGLD

    register("pyld", PYLD, help="PYLD-M-N (JEM++): M full passes, N first-layer steps each")
    register("sgld", SGLD, help="SGLD (JEM): K full-gradient Langevin steps")
