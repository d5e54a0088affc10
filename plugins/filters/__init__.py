"""Classic post-processors for anomaly maps: ``avgpool`` (DRAEM's image-score smoothing), ``gaussian``, ``unsharp``,

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_postprocessors(register):
    from adkit_plugins.filters.components import AvgPool, Crop, Gaussian, Unsharp

    register("avgpool", AvgPool)
    register("gaussian", Gaussian)
    register("unsharp", Unsharp)
    register("crop", Crop)
