"""Each hook, implemented once, registers its kind: one test named after each hook (test_plugins checks)."""

from __future__ import annotations

import pytest
from torch import nn

from adkit import hookimpl
from adkit.core.components import Backbone, Detector, Ensemble, Loss, PostProcessor, Sampler, Scorer
from adkit.core.datasets import AnomalyDataset
from adkit.core.errors import AdkitError
from adkit.core.exporting import ExportFormat
from adkit.core.plugins import Catalog


class D(Detector):
    def anomaly_map(self, images):
        return images[:, :1]


class B(Backbone):
    def forward(self, images, stages):
        return [images for _ in stages]


class L(Loss):
    def forward(self, prediction, target):
        return (prediction - target).abs().mean()


class P(PostProcessor):
    def forward(self, anomaly_map):
        return anomaly_map


class C(Scorer):
    def forward(self, anomaly_map):
        return anomaly_map.flatten(1).amax(1)


class S(Sampler):
    def sample(self, network, x0, generator=None):
        return x0


class E(Ensemble):
    def fit(self, normal_scores):
        pass

    def combine(self, scores):
        return scores[0]


class X(AnomalyDataset):
    def categories(self):
        return []

    def load(self, category):
        raise NotImplementedError


class F(ExportFormat):
    file = "model.bin"

    def write(self, module, example, path):
        path.write_bytes(b"")

    def load(self, path, device):
        return lambda images, threshold: (images[:, :1], images.mean((1, 2, 3)), images.mean((1, 2, 3)) > threshold)


class EveryHook:
    @hookimpl
    def register_detectors(self, register):
        register("t-detector", D)
        register("t-function", lambda: D())

    @hookimpl
    def register_backbones(self, register):
        register("t-backbone", B)

    @hookimpl
    def register_losses(self, register):
        register("t-loss", L)
        register("t-plain-loss", nn.L1Loss)

    @hookimpl
    def register_samplers(self, register):
        register("t-sampler", S)

    @hookimpl
    def register_postprocessors(self, register):
        register("t-post", P)
        register("t-plain-post", nn.Identity)

    @hookimpl
    def register_scorers(self, register):
        register("t-scorer", C)

    @hookimpl
    def register_ensembles(self, register):
        register("t-ensemble", E)

    @hookimpl
    def register_datasets(self, register):
        register("t-dataset", X)

    @hookimpl
    def register_exporters(self, register):
        register("t-exporter", F)

    @hookimpl
    def register_commands(self, cli):
        cli.added = True


def registered(kind: str, name: str):
    """Build ``name`` of ``kind`` from a catalog holding only EveryHook."""
    catalog = Catalog()
    assert catalog.add_plugin(EveryHook(), name="every").status == "ok"
    return catalog[kind].create(name)


def test_register_detectors():
    assert isinstance(registered("detector", "t-detector"), D)


def test_register_backbones():
    assert isinstance(registered("backbone", "t-backbone"), B)


def test_register_losses():
    assert isinstance(registered("loss", "t-loss"), L)


def test_register_samplers():
    assert isinstance(registered("sampler", "t-sampler"), S)


def test_register_postprocessors():
    assert isinstance(registered("postprocessor", "t-post"), P)


def test_register_scorers():
    assert isinstance(registered("scorer", "t-scorer"), C)


def test_register_ensembles():
    assert isinstance(registered("ensemble", "t-ensemble"), E)


def test_register_datasets():
    assert isinstance(registered("dataset", "t-dataset"), X)


def test_register_exporters():
    assert isinstance(registered("exporter", "t-exporter"), F)


def test_register_commands():
    catalog = Catalog()
    catalog.add_plugin(EveryHook(), name="every")

    class Group:
        added = False

    group = Group()
    catalog.register_commands(group)
    assert group.added


def test_a_factory_returning_the_wrong_kind_fails_when_built():
    """Losses may come from functions; what one builds must still be a Loss (plugin API 3): a plain nn.Module
    with the right forward is refused, naming the base class to derive from."""
    catalog = Catalog()
    catalog.add_plugin(EveryHook(), name="every")
    with pytest.raises(AdkitError, match=r"loss 't-plain-loss' of plugin 'every' returned a L1Loss, not a "
                                         r"adkit.core.components.Loss"):
        catalog["loss"].create("t-plain-loss")


def test_post_processors_scorers_and_datasets_are_classes_of_their_kind():
    """The registry reads their declarations (exportable; a dataset's default_preset and takes_folders) from the
    class: a plain nn.Module is refused at registration, like a detector factory that is a function."""
    catalog = Catalog()
    record = catalog.add_plugin(EveryHook(), name="every")
    assert "t-post" in catalog["postprocessor"] and "t-plain-post" not in catalog["postprocessor"]
    assert any("postprocessor 't-plain-post' of plugin 'every' is not registered" in w for w in record.warnings)
    with pytest.raises(AdkitError, match="is not a subclass of adkit.core.components.PostProcessor"):
        catalog["postprocessor"].get("t-plain-post")
    assert catalog["scorer"].get("t-scorer").traits.exportable


def test_a_detector_factory_must_be_a_detector_class():
    """The core reads presets and defaults from the detector's class, so a function is refused at registration:
    that one component is dropped with a warning, the plugin's others stay, and asking for it says why."""
    catalog = Catalog()
    record = catalog.add_plugin(EveryHook(), name="every")
    assert record.status == "ok"
    assert "t-detector" in catalog["detector"] and "t-function" not in catalog["detector"]
    assert any("detector 't-function' of plugin 'every' is not registered" in w for w in record.warnings)
    with pytest.raises(AdkitError, match="is not a subclass of adkit.core.components.Detector"):
        catalog["detector"].get("t-function")
