"""``adkit new-plugin``: write a plugin package with one working component of each kind asked for, its entry
point, and tests that pass as written (templates in adkit/app/templates/plugin)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import adkit
from adkit.core import registry
from adkit.core.errors import AdkitError
from adkit.core.files import atomic_dir

TEMPLATES = Path(__file__).parent / "templates" / "plugin"
# every registered component kind (the registry's one list), then CLI commands; a template per kind in kinds/
KINDS = (*registry.KINDS, "command")
DEFAULT_KINDS = ("detector", "postprocessor", "scorer", "command")
SECTIONS = ("imports", "code", "hook-imports", "hook", "test-imports", "tests")


def _sections(kind: str) -> dict[str, list[str]]:
    """A kind's template split at its ``#@ section`` lines."""
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    current = None
    for line in (TEMPLATES / "kinds" / f"{kind}.py.tmpl").read_text().splitlines():
        if line.startswith("#@ "):
            current = line[3:].strip()
            continue
        sections[current].append(line)
    return sections


def _imports(lines: list[str]) -> list[str]:
    """Import lines merged per module and laid out as isort does: the standard library, other packages, then
    adkit (first-party in the generated pyproject); ``import x`` before ``from x import``, each sorted."""
    plain: set[str] = set()
    froms: dict[str, set[str]] = {}
    for line in lines:
        if line.startswith("import "):
            plain.add(line[len("import "):].strip())
        elif line.startswith("from "):
            module, _, names = line[len("from "):].partition(" import ")
            froms.setdefault(module.strip(), set()).update(n.strip() for n in names.split(","))

    def section(module: str) -> int:
        top = module.split(".")[0]
        return 0 if top in sys.stdlib_module_names else 2 if top == "adkit" else 1

    sections: list[list[str]] = []
    for number in range(3):
        lines_here = [f"import {m}" for m in sorted((m for m in plain if section(m) == number), key=str.lower)]
        for module in sorted((m for m in froms if section(m) == number), key=str.lower):
            names = sorted(froms[module], key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
            line = f"from {module} import {', '.join(names)}"
            if len(line) > 120:
                line = f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")"
            lines_here.append(line)
        if lines_here:
            sections.append(lines_here)
    return [line for i, lines_here in enumerate(sections) for line in ([""] if i else []) + lines_here]


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def new_plugin(name: str, kinds: list[str], out: Path | None = None) -> Path:
    """Write package ``adkit-NAME`` (module ``adkit_NAME``) to ``out`` (default ./adkit-NAME); refuses to write
    into a folder that exists and is not empty."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        raise AdkitError(f"new-plugin: name {name!r} must be lowercase letters and digits, words joined by '-' "
                         "(e.g. acme or acme-vision)")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise AdkitError(f"new-plugin: unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    kinds = [k for k in KINDS if k in (kinds or DEFAULT_KINDS)]
    identifier = name.replace("-", "_")
    package = f"adkit_{identifier}"
    out = Path(out) if out is not None else Path(f"adkit-{name}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdkitError(f"new-plugin: {out} exists and is not empty; choose another --out")
    major = int(adkit.__version__.split(".")[0])
    values = {"name": name, "identifier": identifier, "package": package, "distribution": f"adkit-{name}",
              "Name": "".join(part.capitalize() for part in name.split("-")), "kinds": ", ".join(kinds),
              "kinds_sentence": _sentence(kinds),
              "api_floor": adkit.PLUGIN_API_SINCE, "api_ceiling": str(major + 1)}
    parts = {kind: _sections(kind) for kind in kinds}
    # __init__.py, what the entry point loads whenever adkit starts, holds only the hooks; they import the
    # components (and torch) when they run, so adkit --help stays fast with the plugin installed
    module = ['"""adkit plugin {{name}}:', 'a {{kinds_sentence}}.', "",
              "The entry point loads this module whenever adkit starts: it holds only the hooks, which import the",
              'components when they run.', '"""', "", "from __future__ import annotations", "",
              *_imports([line for p in parts.values() for line in p["hook-imports"]] + ["from adkit.plugin import hookimpl"]),
              "", "# the plugin API this module is written against: adkit refuses it if the number differs",
              f"ADKIT_PLUGIN_API = {adkit.PLUGIN_API}"]
    for kind in kinds:
        module += ["", "", *_strip(parts[kind]["hook"])]
    components = ['"""The components of plugin {{name}}."""', "", "from __future__ import annotations", "",
                  *_imports([line for p in parts.values() for line in p["imports"]])]
    for kind in kinds:
        if _strip(parts[kind]["code"]):
            components += ["", "", *_strip(parts[kind]["code"])]
    tests = ['"""Tests of plugin {{name}}: the adkit.testing contract check of each component and its values."""',
             "", "from __future__ import annotations", "",
             *_imports([line for p in parts.values() for line in p["test-imports"]]
                       + (["import pytest", "from adkit.plugin import load_catalog"]
                          if any(k != "command" for k in kinds) else []))]
    if any(k != "command" for k in kinds):
        tests += ["", "", "@pytest.fixture(scope=\"module\")", "def catalog():",
                  '    """adkit\'s catalog, with this package loaded through its entry point."""',
                  "    catalog = load_catalog()",
                  '    assert catalog.plugins["{{name}}"].status == "ok", catalog.plugins["{{name}}"].error',
                  "    return catalog"]
    for kind in kinds:
        tests += ["", "", *_strip(parts[kind]["tests"])]
    files = {"pyproject.toml": (TEMPLATES / "pyproject.toml.tmpl").read_text(),
             "README.md": (TEMPLATES / "README.md.tmpl").read_text(),
             f"{package}/__init__.py": "\n".join(module) + "\n",
             **({f"{package}/components.py": "\n".join(components) + "\n"} if kinds != ["command"] else {}),
             f"tests/test_{identifier}.py": "\n".join(tests) + "\n"}
    with atomic_dir(out) as staging:  # no half-written package on failure
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_fill(text, values))
    return out


def _sentence(kinds: list[str]) -> str:
    words = {"postprocessor": "post-processor", "command": "CLI command"}
    named = [words.get(k, k) for k in kinds]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def _strip(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines
