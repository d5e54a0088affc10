"""adkit new-plugin: the generated package installs, registers every component through its entry point, and passes
its own tests as generated; bad names and occupied folders are refused before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import adkit
from adkit import hookimpl
from adkit.app.scaffold import KINDS
from adkit.core.plugins import Catalog


def test_a_generated_package_with_every_kind_passes_its_own_tests(invoke, tmp_path):
    code, out, err = invoke("new-plugin", "acme-vision", "--out", str(tmp_path / "acme"),
                            "--kind", ",".join(KINDS))
    assert code == 0, err
    package = tmp_path / "acme"
    assert "pip install -e" in out and (package / "adkit_acme_vision" / "__init__.py").is_file()
    # installed as pip installs it (entry point and all), into a folder of its own so the test environment stays
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(package)], check=True, capture_output=True)
    # prepended: an adkit found through PYTHONPATH (not installed in the interpreter) stays importable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                           check=False, cwd=package, env=env, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "passed" in tests.stdout and "failed" not in tests.stdout
    listing = subprocess.run([sys.executable, "-m", "adkit", "plugins"], check=True, env=env, capture_output=True,
                             text=True)
    for name in ("acme-vision-pixel", "acme-vision-blur", "acme-vision-quantile", "acme-vision-l1",
                 "acme-vision-langevin", "acme-vision-pyramid", "acme-vision-zmean", "acme-vision-flat"):
        assert name in listing.stdout


def test_default_kinds_and_file_modes(invoke, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = invoke("new-plugin", "widget", "--out", str(tmp_path / "w"))
    finally:
        os.umask(old)
    assert code == 0, err
    module = (tmp_path / "w" / "adkit_widget" / "__init__.py").read_text()
    components = (tmp_path / "w" / "adkit_widget" / "components.py").read_text()
    for present in ("class WidgetPixelDistance(Detector)", "class WidgetBlur(PostProcessor)",
                    "class WidgetQuantile(Scorer)"):
        assert present in components
    assert "def register_commands" in module and "def register_detectors" in module
    assert "Sampler" not in components and "Loss" not in components
    assert "import torch" not in module  # the entry-point module stays light: adkit --help does not load torch
    assert f"ADKIT_PLUGIN_API = {adkit.PLUGIN_API}" in module
    pyproject = (tmp_path / "w" / "pyproject.toml").read_text()
    assert f'"adkit>={adkit.PLUGIN_API_SINCE},<' in pyproject and 'widget = "adkit_widget"' in pyproject
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "w" / "pyproject.toml").stat().st_mode & 0o777 == 0o644


def test_bad_requests_write_nothing(invoke, tmp_path):
    code, _, err = invoke("new-plugin", "Acme_Vision", "--out", str(tmp_path / "a"))
    assert code == 2 and "name 'Acme_Vision' must be lowercase" in err and not (tmp_path / "a").exists()
    code, _, err = invoke("new-plugin", "acme", "--kind", "detectr", "--out", str(tmp_path / "a"))
    assert code == 2 and "unknown kind 'detectr'" in err and not (tmp_path / "a").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    code, _, err = invoke("new-plugin", "acme", "--out", str(tmp_path / "taken"))
    assert code == 2 and "exists and is not empty" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


class FromTheFuture:
    ADKIT_PLUGIN_API = adkit.PLUGIN_API + 1

    @hookimpl
    def register_scorers(self, register):
        raise AssertionError("a plugin for another API must not be asked to register")


def test_a_plugin_for_another_plugin_api_is_refused():
    record = Catalog().add_plugin(FromTheFuture(), name="future")
    assert record.status == "broken"
    assert f"written for adkit plugin API {adkit.PLUGIN_API + 1}, but adkit {adkit.__version__} provides plugin " \
           f"API {adkit.PLUGIN_API}" in record.error
    assert Path(adkit.__file__).parent.joinpath("app", "templates", "plugin", "kinds", "detector.py.tmpl").is_file()
