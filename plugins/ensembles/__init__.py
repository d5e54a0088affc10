"""Ensemble scorers: combine several detectors' image scores, each normalised on held-out normal images.

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_ensembles(register):
    from adkit_plugins.ensembles.components import Maximum, RankMean, WeightedMean

    register("mean", WeightedMean)
    register("max", Maximum)
    register("rank", RankMean)
