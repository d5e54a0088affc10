from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from adkit import hookimpl
from adkit.core import hookspecs
from adkit.core.components import Detector, Scorer
from adkit.core.errors import AdkitError
from adkit.core.plugins import Catalog, load_catalog

ROOT = Path(__file__).resolve().parents[1]
BUILT_INS = {"backbones", "datasets", "draem", "ebm", "ensembles", "exporters", "filters", "freqmask", "losses", "padim",
             "patchcore", "scorers", "supersimplenet"}
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_built_ins_load_through_entry_points(catalog):
    records = {name: r for name, r in catalog.plugins.items() if r.source == "built-in"}
    assert set(records) == BUILT_INS
    assert all(r.status == "ok" for r in records.values())
    assert "draem" in catalog["detector"] and "freqmask" in catalog["postprocessor"]
    assert {"l2", "ssim", "focal", "color", "psnr"} <= set(catalog["loss"].names())
    assert {"max", "maxmin", "topk-mean"} <= set(catalog["scorer"].names())
    assert {"mvtec", "folder", "synthetic"} <= set(catalog["dataset"].names())


def test_example_package_is_listed(catalog):
    record = catalog.plugins["hello"]
    assert record.source == "package adkit-hello-plugin" and record.status == "ok"
    assert catalog["detector"].get("pixel-gauss").plugin == "hello"


def test_load_and_disable_filters(monkeypatch):
    monkeypatch.setenv("ADKIT_LOAD_PLUGINS", "losses,scorers")
    catalog = load_catalog()
    assert catalog.plugins["draem"].status == "disabled"
    assert "draem" not in catalog["detector"] and "l2" in catalog["loss"]
    monkeypatch.delenv("ADKIT_LOAD_PLUGINS")
    monkeypatch.setenv("ADKIT_DISABLE_PLUGINS", "freqmask")
    catalog = load_catalog()
    assert catalog.plugins["freqmask"].status == "disabled" and "freqmask" not in catalog["postprocessor"]
    assert "draem" in catalog["detector"]


class RaisingPlugin:
    @hookimpl
    def register_losses(self, register):
        register("half-registered", lambda: None)
        raise RuntimeError("boom")


class CopyCat(Detector):
    def anomaly_map(self, images):
        return images[:, :1]


class Named(Scorer):
    """A scorer that says which plugin registered it."""

    who = ""

    def forward(self, anomaly_map):
        return anomaly_map.flatten(1).amax(1)


def scorer_of(who: str) -> type[Scorer]:
    return type(f"Scorer_{who.replace(' ', '_')}", (Named,), {"who": who})


class DuplicatePlugin:
    @hookimpl
    def register_detectors(self, register):
        register("draem", CopyCat)
        register("copycat-own", CopyCat)

    @hookimpl
    def register_scorers(self, register):
        register("max", scorer_of("not the built-in max"))


def test_failing_registration_is_reported_and_rolled_back(catalog):
    record = catalog.add_plugin(RaisingPlugin(), name="raiser")
    assert record.status == "broken" and "RuntimeError: boom" in record.error
    assert "half-registered" not in catalog["loss"]
    assert "l2" in catalog["loss"]  # the others keep working


def test_a_name_clash_drops_only_that_component_and_built_ins_win(catalog):
    record = catalog.add_plugin(DuplicatePlugin(), name="copycat")
    assert record.status == "ok"  # its other components keep working
    assert catalog["detector"].get("copycat-own").factory is CopyCat
    assert catalog["detector"].get("draem").plugin == "draem"
    assert catalog["scorer"].get("max").plugin == "scorers" and "maxmin" in catalog["scorer"]  # built-ins intact
    assert any("detector 'draem' is registered by both plugin 'draem' and plugin 'copycat': kept from plugin "
               "'draem' (built-in), dropped from plugin 'copycat'" in w for w in record.warnings)
    assert catalog.plugins["draem"].warnings  # both plugins' records say so


class FirstComer:
    @hookimpl
    def register_scorers(self, register):
        register("p50", scorer_of("third party"))
        register("only-mine", scorer_of("kept"))


def test_a_built_in_loaded_after_a_third_party_still_wins():
    catalog = Catalog()
    catalog.add_plugin(FirstComer(), name="aaa", source="package aaa")
    catalog.add_plugin(BuiltInLater(), name="zzz", source="built-in")
    assert catalog["scorer"].get("p50").factory.who == "built-in"
    assert catalog["scorer"].get("only-mine").factory.who == "kept"
    assert catalog.plugins["aaa"].status == "ok" and catalog.plugins["aaa"].warnings


class BuiltInLater:
    @hookimpl
    def register_scorers(self, register):
        register("p50", scorer_of("built-in"))


class MisspelledHook:
    @hookimpl
    def register_scorer(self, register):  # adkit's hook is register_scorers
        register("never", lambda: None)


def test_an_unknown_hook_name_marks_the_plugin_broken(catalog):
    record = catalog.add_plugin(MisspelledHook(), name="typo")
    assert record.status == "broken" and "register_scorer" in record.error
    assert "max" in catalog["scorer"]


def test_unknown_component_names_broken_plugins(catalog):
    catalog.add_plugin(RaisingPlugin(), name="raiser")
    with pytest.raises(AdkitError, match=r"unknown loss 'half-registered'.*plugin 'raiser' is broken \(RuntimeError"):
        catalog["loss"].get("half-registered")


def test_import_failure_is_reported(monkeypatch):
    from importlib import metadata

    class BrokenEntryPoint:
        name = "broken"
        dist = None

        def load(self):
            raise ImportError("No module named 'missing_dependency'")

    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda group: [*real(group=group), BrokenEntryPoint()])
    catalog = load_catalog()
    assert catalog.plugins["broken"].status == "broken"
    assert "missing_dependency" in catalog.plugins["broken"].error
    assert "draem" in catalog["detector"]


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for hook in HOOKS:
        assert re.search(rf"^#+ `?{hook}", docs, re.MULTILINE), f"docs/plugins.md has no section for {hook}"
        assert getattr(hookspecs, hook).__doc__, f"{hook} has no docstring"


def test_every_hook_is_tested():
    # a test function named after the hook (datasette's rule), not a substring a dummy implementation also has
    names = {node.name for path in (ROOT / "tests").glob("test_*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    for hook in HOOKS:
        assert any(name.startswith(f"test_{hook}") for name in names), f"no test named test_{hook}..."
