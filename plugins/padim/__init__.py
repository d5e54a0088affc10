"""PaDiM (Defard et al., ICPR 2021): a Gaussian per feature-map position over pretrained features, the

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_detectors(register):
    from adkit_plugins.padim.components import PaDiM

    register("padim", PaDiM, help="PaDiM (Defard et al. 2021): per-position Gaussians of pretrained features")
