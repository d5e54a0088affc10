"""The plugin API: the one module a plugin imports from adkit (docs/plugins.md, "The plugin API").

    from adkit.plugin import Detector, DetectorContext, build_backbone, hookimpl

Everything a component needs is here by name: the hook marker, the component base classes and the tensors and
contexts between them, the errors, the helpers for detectors on pretrained features, the few engine, distributed
and statistics helpers built-in plugins use, the synthetic textures, and the checks and training
functions a plugin's tests call. adkit's other modules are internal: they may move in any release (a plugin that
imports them is warned when it loads). What may change here, and how a name is retired, is the policy in
docs/plugins.md: names are added in minor releases; a name is removed only after one minor release in which using
it warns (DeprecationWarning naming the replacement); the plugin API number (``PLUGIN_API``) changes with any
change that breaks a plugin.

Every name but ``hookimpl`` and the version numbers is imported on first use, so a plugin's entry module can
import its hooks' marker here without loading torch (``adkit --help`` stays fast).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from adkit import PLUGIN_API, PLUGIN_API_SINCE, hookimpl

# name -> the internal module that defines it (imported on first use)
_WHERE = {
    # component contracts (docs/architecture.md) and what passes between components
    **dict.fromkeys(("Detector", "Detection", "DetectorContext", "LeftOutRows", "LabelledDefects", "Backbone", "Loss",
                     "PostProcessor", "Scorer", "Sampler", "Ensemble", "EnergyNetwork", "check_images", "check_map",
                     "upsample"), "adkit.core.components"),
    **dict.fromkeys(("ExportFormat", "ExportedRun", "Exportable", "exporting", "is_exporting"), "adkit.core.exporting"),
    "Pipeline": "adkit.core.pipeline",
    "AdkitError": "adkit.core.errors",
    # datasets: the contract (the built-in layouts live in the datasets plugin)
    **dict.fromkeys(("AnomalyDataset", "CategorySplits", "Sample", "split_validation"), "adkit.core.datasets"),
    # the synthetic textures (procedural, with exact masks) and adkit's cache folder
    **dict.fromkeys(("TEXTURES", "DEFECTS", "TEXTURES_FORMAT", "normal_image", "defective_image", "write_textures"),
                    "adkit.data.textures"),
    "cache_root": "adkit.core.cache",
    **dict.fromkeys(("load_image", "load_mask", "save_image", "list_images", "is_image_file", "ImageReadError"),
                    "adkit.data.io"),
    **dict.fromkeys(("perlin_noise", "perlin_noise_batch", "fractal_noise"), "adkit.data.perlin"),
    # detectors on pretrained features
    **dict.fromkeys(("build_backbone", "check_layers", "align_stages", "pool_channels", "locally_aware_patches",
                     "read_state_dict", "load_exact"), "adkit.core.features"),
    # engine: precision and seeds
    "in_float32": "adkit.run.precision",
    "derived_seed": "adkit.run.engine",
    # fitting under torchrun (fit_shards)
    **dict.fromkeys(("world_size", "rank", "is_main", "gather_sharded", "all_reduce_sum"), "adkit.core.distributed"),
    # statistics
    **dict.fromkeys(("ledoit_wolf", "whitening", "spd_inverse"), "adkit.stats.covariance"),
    **dict.fromkeys(("Moments", "moments", "merge", "merge_into", "ledoit_wolf_from"), "adkit.stats.moments"),
    **dict.fromkeys(("clopper_pearson_upper", "CONFIDENCE"), "adkit.stats.thresholds"),
    # a plugin's tests
    **dict.fromkeys(("check_detector", "check_postprocessor", "check_scorer", "check_loss", "check_sampler",
                     "check_backbone", "check_ensemble", "check_dataset", "check_exporter", "ContractError", "invoke",
                     "tiny_images", "tiny_defects", "tiny_dataset"), "adkit.testing"),
    **dict.fromkeys(("TrainSettings", "train_detector", "update_detector"), "adkit.run.engine"),
    **dict.fromkeys(("load_checkpoint", "restore"), "adkit.core.checkpoints"),
    **dict.fromkeys(("load_catalog", "get_catalog"), "adkit.core.plugins"),
}

# names retired from the plugin API: they resolve, warning, until the release named (docs/plugins.md's policy)
_DEPRECATED = {
    "MVTecDataset": ("adkit_plugins.datasets.layouts", "0.4", "the dataset registered as 'mvtec' (get_catalog())"),
    "FolderDataset": ("adkit_plugins.datasets.layouts", "0.4", "the dataset registered as 'folder' (get_catalog())"),
    "SyntheticDataset": ("adkit_plugins.datasets.synthetic", "0.4",
                         "the dataset registered as 'synthetic' (get_catalog()), or write_textures"),
}

__all__ = ["PLUGIN_API", "PLUGIN_API_SINCE", "hookimpl", *sorted(_WHERE)]  # noqa: PLE0604 - names from _WHERE


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:  # the built-in layouts moved into the datasets plugin (adkit 0.3)
        module, until, instead = _DEPRECATED[name]
        warnings.warn(f"adkit.plugin.{name} is deprecated and goes in adkit {until}: use {instead}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'adkit.plugin' has no attribute {name!r} (the plugin API: docs/plugins.md)")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return __all__
