"""The plugin API: adkit.plugin is the one module the built-in plugins, the example plugin and the templates
import from adkit (an import-graph check, like the layer tests); every name it offers resolves; and a third-party
plugin written against the internal modules still loads, warned with a DeprecationWarning naming adkit.plugin."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import adkit.plugin

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"adkit.plugin"}


def adkit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an adkit module in a file: top level, lazy, under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "adkit" or name.startswith("adkit.")]
    return found


def plugin_sources() -> list[Path]:
    return [*sorted((ROOT / "plugins").rglob("*.py")), *sorted((ROOT / "examples").rglob("*.py"))]


def test_plugins_and_the_example_import_adkit_only_through_the_plugin_api():
    sources = plugin_sources()
    assert len(sources) > 30
    reaching = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in sources
                for line, module in adkit_imports(path) if module not in ALLOWED]
    assert not reaching, "\n".join(reaching)


def test_the_templates_of_new_plugins_import_only_the_plugin_api():
    for template in (ROOT / "adkit" / "app" / "templates").rglob("*.tmpl"):
        for line in template.read_text().splitlines():
            if line.lstrip().startswith(("from adkit", "import adkit")):
                assert line.lstrip().startswith("from adkit.plugin import"), f"{template.name}: {line}"


def test_every_name_of_the_plugin_api_resolves_and_is_listed():
    for name in adkit.plugin.__all__:
        assert getattr(adkit.plugin, name) is not None, name
    with pytest.raises(AttributeError, match="the plugin API"):
        adkit.plugin.train_category  # noqa: B018 - internal: not offered
    assert set(dir(adkit.plugin)) == set(adkit.plugin.__all__)


def test_importing_the_plugin_api_for_hookimpl_does_not_load_torch():
    import subprocess

    code = "import sys; import adkit.plugin; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_plugin_written_against_internal_modules_loads_with_a_deprecation_warning(catalog, tmp_path, monkeypatch):
    package = tmp_path / "legacy_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from adkit import hookimpl\n\n\n@hookimpl\ndef register_detectors(register):\n"
        "    from legacy_plugin.components import Legacy\n\n    register('legacy', Legacy)\n")
    (package / "components.py").write_text(
        "import torch\nfrom adkit.core.components import Detector\n\n\nclass Legacy(Detector):\n"
        "    trainable = False\n\n    def fit(self, batches):\n        pass\n\n"
        "    def anomaly_map(self, images):\n        return images.mean(1, keepdim=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("legacy_plugin")
    with pytest.warns(DeprecationWarning, match=r"components.py:2 imports Detector from adkit.core.components.*"
                                                r"import them from adkit.plugin"):
        record = catalog.add_plugin(module, name="legacy", source="package legacy-plugin")
    assert record.status == "ok" and "legacy" in catalog["detector"]  # it still loads and registers
    assert any("adkit.plugin" in warning for warning in record.warnings)  # adkit plugins shows it


def test_the_dataset_layouts_live_in_their_plugin_and_the_core_names_none():
    """MVTec, folder and synthetic are implemented in the datasets plugin; the core imports none of them and
    names no dataset as the default (the registry's default_data trait does)."""
    allowed = {"adkit/plugin.py", "adkit/data/datasets.py", "adkit/data/synthetic.py"}  # deprecation shims
    for path in sorted((ROOT / "adkit").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        text = path.read_text()
        if where not in allowed:
            assert "adkit_plugins" not in text, where
            for name in ("MVTecDataset", "FolderDataset", "SyntheticDataset", 'DEFAULT_DATA'):
                assert name not in text, f"{where} names {name}"
    assert (ROOT / "plugins" / "datasets" / "layouts.py").is_file()


def test_the_default_dataset_is_a_registry_trait(catalog):
    from adkit.core.plugins import Catalog
    from adkit.plugin import AdkitError, AnomalyDataset, CategorySplits, hookimpl
    from adkit.run.config import RunConfig
    from adkit.run.planning import dataset_spec, default_data

    assert [i.name for i in catalog["dataset"] if i.traits.default_data] == ["synthetic"]
    assert default_data(catalog) == "synthetic"
    assert dataset_spec(catalog, RunConfig(detector=["padim"]))[0] == "synthetic"
    assert dataset_spec(catalog, RunConfig(detector=["padim"], normal="good"))[0] == "folder"

    class Other(AnomalyDataset):
        name = "other"
        default_data = True

        def categories(self):
            return ["x"]

        def load(self, category):
            return CategorySplits(category, [], [], [])

    class Plugin:
        @hookimpl
        def register_datasets(self, register):
            register("other", Other)

    catalog.add_plugin(Plugin(), name="other-data", source="package other-data")
    assert default_data(catalog) == "synthetic"  # adkit's own first: installing a plugin changes nothing
    bare = Catalog()
    bare.add_plugin(Plugin(), name="other-data", source="package other-data")
    assert default_data(bare) == "other"
    with pytest.raises(AdkitError, match="no dataset declares itself the default: give --data NAME"):
        default_data(Catalog())


@pytest.mark.parametrize(("module", "name", "says"), [
    ("adkit.plugin", "MVTecDataset", "the dataset registered as 'mvtec'"),
    ("adkit.plugin", "SyntheticDataset", "the dataset registered as 'synthetic'"),
    ("adkit.data.datasets", "FolderDataset", "the dataset registered as 'folder'"),
    ("adkit.data.datasets", "load_split", "adkit.data.loading.load_split"),
    ("adkit.data.synthetic", "write_dataset", "adkit.plugin.write_textures"),
    ("adkit.run.engine", "in_float32", "adkit.plugin.in_float32"),  # precision's names moved to their own room
    ("adkit.run.engine", "uses_bf16", "adkit.run.precision.uses_bf16"),
])
def test_the_moved_names_still_resolve_with_a_warning_naming_the_new_one(module, name, says):
    with pytest.warns(DeprecationWarning, match=f"{name}.*use {says}"):
        value = getattr(importlib.import_module(module), name)
    assert value is not None
