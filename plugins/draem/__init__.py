"""DRAEM: discriminatively trained reconstruction embedding (Zavrtanik et al., ICCV 2021)."""

from __future__ import annotations

from adkit import hookimpl
from adkit_plugins.draem.detector import Draem


@hookimpl
def register_detectors(register):
    register("draem", Draem, help="DRAEM: reconstructive + discriminative networks, synthetic anomalies")
