"""Each hook, implemented once, registers its kind (test_plugins checks that every hook appears here)."""

from __future__ import annotations

from adkit import hookimpl
from adkit.plugins import Catalog


class EveryHook:
    @hookimpl
    def register_detectors(self, register):
        register("t-detector", lambda: "d")

    @hookimpl
    def register_backbones(self, register):
        register("t-backbone", lambda: "b")

    @hookimpl
    def register_losses(self, register):
        register("t-loss", lambda: "l")

    @hookimpl
    def register_samplers(self, register):
        register("t-sampler", lambda: "s")

    @hookimpl
    def register_postprocessors(self, register):
        register("t-post", lambda: "p")

    @hookimpl
    def register_scorers(self, register):
        register("t-scorer", lambda: "c")

    @hookimpl
    def register_ensembles(self, register):
        register("t-ensemble", lambda: "e")

    @hookimpl
    def register_datasets(self, register):
        register("t-dataset", lambda: "x")

    @hookimpl
    def register_commands(self, cli):
        cli.added = True


def test_each_component_hook_registers_its_kind():
    catalog = Catalog()
    assert catalog.add_plugin(EveryHook(), name="every").status == "ok"
    for kind, value in (("detector", "d"), ("backbone", "b"), ("loss", "l"), ("sampler", "s"), ("postprocessor", "p"),
                        ("scorer", "c"), ("ensemble", "e"), ("dataset", "x")):
        assert catalog[kind].create(f"t-{kind if kind != 'postprocessor' else 'post'}") == value

    class Group:
        added = False

    group = Group()
    catalog.register_commands(group)
    assert group.added
