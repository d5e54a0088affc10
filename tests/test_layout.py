"""The house layout, checked: the core knows no plugin, and two modules draw on the terminal (import layers:
test_layers.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from import_graph import import_statements

CORE = Path(__file__).resolve().parents[1] / "adkit"


def imported_modules(path: Path) -> set[str]:
    return {module for module, _ in import_statements(path.read_text())}


def core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_the_core_never_imports_a_plugin():
    offenders = [p.name for p in core_modules() if any(m.split(".")[0] == "adkit_plugins" for m in imported_modules(p))]
    assert offenders == []


def test_console_and_render_are_the_only_modules_that_import_rich():
    """Lines and progress bars (core/console.py, used while running) and result tables (outputs/render.py)."""
    users = sorted(p.relative_to(CORE).as_posix() for p in core_modules()
                   if any(m.split(".")[0] == "rich" for m in imported_modules(p)))
    assert users == ["core/console.py", "outputs/render.py"]


def test_api_is_a_facade():
    """api.py defines no workflow of its own: everything it exports is imported (print_plugins only fetches the
    catalog for render)."""
    tree = ast.parse((CORE / "api.py").read_text())
    defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert defined == ["print_plugins"]
    from adkit import api

    for name in api.__all__:
        assert hasattr(api, name), name


HEAVY = ("torch", "sklearn", "timm", "kornia")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["hello"]])
def test_the_cli_answers_without_importing_torch(args):
    """Importing the CLI, its help and version, and a plugin command that builds no component, load no heavy
    library: plugin modules register their components lazily (checked through sys.modules, not a timing)."""
    code = (f"import sys\nfrom adkit.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_running_a_command_loads_the_components():
    code = ("import sys\nfrom adkit.core.plugins import get_catalog\ncatalog = get_catalog()\n"
            "print('torch' in sys.modules, len(catalog['detector']) > 0, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["False", "True", "True"]
