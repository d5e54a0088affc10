"""Built-in datasets: MVTec AD layout, a user's folders, and the synthetic textures.

The hooks import the components when they run: importing this module (plugin discovery, adkit --help) stays
cheap.
"""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_datasets(register):
    from adkit_plugins.datasets.layouts import FolderDataset, MVTecDataset
    from adkit_plugins.datasets.synthetic import SyntheticDataset

    register("mvtec", MVTecDataset, help="MVTec AD layout under --root (any category folder in that layout)")
    register("folder", FolderDataset, help="Your own images: normal=DIR[,abnormal=DIR,masks=DIR,name=CATEGORY]")
    register("synthetic", SyntheticDataset, help="Built-in procedural textures with exact defect masks")
