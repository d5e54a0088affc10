"""The one spec grammar: every spec has one canonical text that parses back to the same value, and what each
built-in component declares is readable from the registry without building it."""

from __future__ import annotations

import pytest

from adkit import hookimpl
from adkit.core.errors import AdkitError
from adkit.core.grammar import ComponentSpec, split_chain, split_top_level
from adkit.core.plugins import get_catalog
from adkit.run.config import RunConfig
from adkit.run.planning import dataset_spec, plan
from adkit.testing import tiny_dataset
from adkit_plugins.datasets.layouts import FolderDataset, MVTecDataset
from adkit_plugins.draem.detector import Draem

SPECS = [
    ("detector", "patchcore:search=exact,coreset=0.25,layers=2+3"),
    ("detector", "ebm-image:sampler=(pyld:M=5,N=3),lr=0.001,depth=10"),
    ("detector", "draem:recon_width=16"),
    ("postprocessor", "freqmask:kernels=3+5"),
    ("postprocessor", "freqmask:weight=0.5,stride=4"),
    ("postprocessor", "gaussian"),
    ("scorer", "maxmin"),
    ("loss", "ssim:weight=2"),
    ("sampler", "pyld:N=3,M=5"),
    ("dataset", "synthetic:size=32,n_train=8"),
]


@pytest.mark.parametrize(("kind", "text"), SPECS)
def test_parse_canonical_text_parse_again_is_the_same_value(kind, text):
    registry = get_catalog()[kind]
    parsed = registry.parse(text)
    canonical = str(parsed)
    again = registry.parse(canonical)
    assert isinstance(again, ComponentSpec) and again == parsed and str(again) == canonical
    order = list(registry.get(parsed.name).params)
    assert [order.index(k) for k in parsed.params] == sorted(order.index(k) for k in parsed.params)


def test_written_in_another_order_the_text_is_the_same():
    registry = get_catalog()["postprocessor"]
    assert str(registry.parse("freqmask:stride=4,weight=0.5")) == str(registry.parse("freqmask:weight=0.5,stride=4"))


def test_chains_keep_list_values_and_parenthesised_specs():
    assert split_chain("avgpool:kernel=21+freqmask:kernels=3+5", "post") == ["avgpool:kernel=21", "freqmask:kernels=3+5"]
    assert split_top_level("freqmask:kernels=3+5,(freqmask:weight=0.5,stride=4)", ",", "grid") == [
        "freqmask:kernels=3+5", "(freqmask:weight=0.5,stride=4)"]


def test_every_built_in_declares_its_traits_in_the_registry():
    catalog = get_catalog()
    detectors = {info.name: info for info in catalog["detector"] if info.builtin}
    assert set(detectors) >= {"draem", "patchcore", "padim", "ebm-image", "ebm-patch"}
    for name, info in detectors.items():
        cls = info.factory
        traits = info.traits
        assert (traits.trainable, traits.image_level, traits.own_scores, traits.exportable) == (
            cls.trainable, cls.image_level, cls.own_scores, cls.exportable), name
        assert traits.presets == tuple(cls.presets) and traits.consumes == frozenset(cls.consumes), name
        assert {k: dict(v) for k, v in traits.preset_values.items()} == cls.presets, name  # planning reads these
        assert traits.default_pixel_map in ("raw", "post"), name
        for spec in traits.default_postprocessors:  # a declared default pipeline must build
            catalog["postprocessor"].create(spec)
        catalog["scorer"].create(traits.default_scorer)
    assert detectors["ebm-image"].traits.image_level and not detectors["ebm-patch"].traits.image_level
    assert detectors["patchcore"].traits.own_scores and not detectors["padim"].traits.own_scores
    assert not detectors["patchcore"].traits.trainable and detectors["draem"].traits.trainable
    assert "quick" in detectors["draem"].traits.presets
    for kind in ("postprocessor", "scorer"):
        for info in catalog[kind]:
            if info.builtin:
                assert info.traits.exportable == info.factory.exportable, info.name


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_the_smoothing_of_patchcore_and_padim_is_in_their_recorded_pipeline(name):
    catalog = get_catalog()
    info = catalog["detector"].get(name)
    assert info.traits.default_postprocessors == ("gaussian:sigma=4",)
    assert info.traits.default_pixel_map == "post"
    config = RunConfig(detector=[name], data="synthetic:size=32,n_train=4,n_test=4", category=["carpet"],
                       image_size="64")
    resolved = plan(config)
    assert resolved.posts == ["gaussian:sigma=4.0"] and resolved.config.post == ["gaussian:sigma=4.0"]
    assert resolved.config.pixel_map == "post"
    assert "sigma" not in catalog["detector"].get(name).params  # no hidden second smoothing inside the detector
    off = plan(config.replace(post=["none"]))
    assert off.posts == []


def test_a_checkpoint_from_before_declared_pipelines_keeps_its_smoothing():
    """adkit 0.1 smoothed inside PatchCore and recorded no post-processors; such a checkpoint restores with the
    declared default chain, while a 0.2 checkpoint's empty chain stays empty."""
    from adkit.run.assembly import checkpoint_pipeline

    old = {"detector": "patchcore", "posts": [], "scorer": "max"}

    def scoring(spec):
        return spec.post_texts, spec.scorer_text

    assert scoring(checkpoint_pipeline(RunConfig(), old)) == (["gaussian:sigma=4.0"], "max")
    assert scoring(checkpoint_pipeline(RunConfig(), {**old, "declared_pipeline": True})) == ([], "max")
    assert checkpoint_pipeline(RunConfig(post=["avgpool"]), old).post_texts == ["avgpool"]


class SmallParts(MVTecDataset):
    """A third-party dataset of small generated images that asks for the quick presets, as the synthetic
    textures do, and a second one that takes --normal/--abnormal/--masks."""

    name = "small-parts"
    default_preset = "quick"


class LineFolders(FolderDataset):
    name = "line-folders"


class DatasetsPlugin:
    @hookimpl
    def register_datasets(self, register):
        register("small-parts", SmallParts)
        register("line-folders", LineFolders)


def test_planning_reads_what_datasets_declare_not_their_names(catalog, tmp_path):
    """The preset a dataset suggests and the dataset that folders select are declarations in the registry:
    a third-party dataset gets the same treatment as the built-ins, and no dataset is known by name."""
    catalog.add_plugin(DatasetsPlugin(), name="datasets-plugin")
    assert catalog["dataset"].get("synthetic").traits.default_preset == "quick"
    assert catalog["dataset"].get("folder").traits.takes_folders
    assert catalog["dataset"].get("small-parts").traits.default_preset == "quick"
    assert not catalog["dataset"].get("mvtec").traits.default_preset
    root = tmp_path / "parts"
    tiny_dataset(root, ("wood",), size=32, n_train=4)
    run = plan(RunConfig(detector=["draem"], data="small-parts", root=str(root)), catalog)
    assert run.config.preset == "quick" and run.steps == Draem.presets["quick"]["steps"]
    assert plan(RunConfig(detector=["draem"], data="mvtec", root=str(root)), catalog).config.preset is None
    normal = root / "wood" / "train" / "good"
    assert dataset_spec(catalog, RunConfig(normal=str(normal)))[0] == "folder"  # --data left out
    assert dataset_spec(catalog, RunConfig(data="line-folders", normal=str(normal)))[0] == "line-folders"
    with pytest.raises(AdkitError, match="use --data folder or --data line-folders or leave --data out"):
        dataset_spec(catalog, RunConfig(data="mvtec", normal=str(normal)))


def test_the_pipeline_is_one_value_from_plan_to_checkpoint_to_threshold_record(tmp_path):
    """Planning makes the PipelineSpec once; a checkpoint's meta stores its texts and reads back the same value;
    a threshold record holds for it when its specs parse to the same values (whatever their spelling), and not
    for another chain."""
    import json

    from adkit.run.assembly import checkpoint_pipeline
    from adkit.stats.decisions import record_threshold, threshold_record

    planned = plan(RunConfig(detector=["patchcore"], post=["gaussian:sigma=4", "avgpool:kernel=3"],
                             data="synthetic:size=32,n_train=8,n_test=6", category=["tile"]))
    spec = planned.pipeline
    assert str(spec) == f"{spec.detector} -> gaussian:sigma=4.0 -> avgpool:kernel=3 -> max"
    meta = {**spec.record(), "declared_pipeline": True}
    assert checkpoint_pipeline(RunConfig(), meta) == spec  # stored as texts, read back as the same value
    record_threshold(tmp_path, {"threshold": 0.5}, spec, "test")
    assert threshold_record(tmp_path, spec)["threshold"] == 0.5
    written = json.loads((tmp_path / "threshold.json").read_text())
    (tmp_path / "threshold.json").write_text(json.dumps({**written, "posts": ["gaussian:sigma=4", "avgpool"]}))
    assert threshold_record(tmp_path, spec) is None  # avgpool's default kernel is not 3: another chain
    (tmp_path / "threshold.json").write_text(json.dumps({**written, "posts": ["gaussian:sigma=4.00",
                                                                                "avgpool:kernel=3"]}))
    assert threshold_record(tmp_path, spec)["threshold"] == 0.5  # another spelling of the same values
