"""freqmask: the DRAEM-improvement paper's frequency filtering of anomaly maps (docs/methods/draem-improvements.md).

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_postprocessors(register):
    from adkit_plugins.freqmask.components import FreqMask

    register("freqmask", FreqMask, help="Low-frequency emphasis + avg pooling at stride 4 (DRAEM-improvement paper)")
