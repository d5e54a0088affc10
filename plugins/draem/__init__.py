"""DRAEM: discriminatively trained reconstruction embedding (Zavrtanik et al., ICCV 2021)."""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_detectors(register):
    from adkit_plugins.draem.detector import Draem

    register("draem", Draem, help="DRAEM: reconstructive + discriminative networks, synthetic anomalies")
