"""PatchCore: a coreset memory bank of pretrained patch features, nearest-neighbour distances as the map."""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_detectors(register):
    from adkit_plugins.patchcore.detector import PatchCore

    register("patchcore", PatchCore,
             help="PatchCore (Roth et al. 2022): kNN distance to a coreset of pretrained patch features")
