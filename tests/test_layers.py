"""The import-layer contract: adkit's folders are floors, and a module imports only from its own floor or the floors
below it, with no import cycle anywhere. Every import counts: top-level, inside functions (lazy) and under
TYPE_CHECKING, since each one is a dependency a reader must know about."""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import import_statements

PACKAGE = Path(__file__).resolve().parent.parent / "adkit"

# bottom to top; a module belongs to the first floor with a prefix it matches
FLOORS = (
    ("core", ("adkit", "adkit.core")),  # contracts, registry, grammar, plugin loading, small shared services
    ("stats", ("adkit.stats",)),  # metrics and thresholds: numbers in, numbers out
    ("data", ("adkit.data",)),  # datasets on disk, decoding, geometry, the synthetic textures
    ("run", ("adkit.run",)),  # configuration, planning, assembly, the engine, evaluation
    ("outputs", ("adkit.outputs",)),  # result files, pictures, report pages, terminal tables
    ("deploy", ("adkit.deploy",)),  # exported models and their runners
    ("app", ("adkit.app", "adkit.serve")),  # workflows, bench, scaffold, the inspection service
    ("entry", ("adkit.cli", "adkit.api", "adkit.testing", "adkit.plugin", "adkit.__main__")),  # what users and plugin authors call
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    for index, (_, prefixes) in reversed(list(enumerate(FLOORS))):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "adkit"):
            return index
    if module == "adkit":
        return 0
    raise AssertionError(f"{module} is on no floor: add its folder to FLOORS")


def imports(module: str) -> set[str]:
    """The adkit modules ``module`` imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = imported(path.read_text(), package)
    found.discard(module)
    return found


def imported(source: str, package: str) -> set[str]:
    """The adkit modules a source imports (``from adkit.x import y`` counts as adkit.x.y where that is a module,
    else as adkit.x)."""
    found = {f"{module}.{name}" if name and f"{module}.{name}" in MODULES else module
             for module, name in import_statements(source, package)}
    return {m for m in found if m in MODULES}


GRAPH = {module: imports(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_a_higher_floor(module):
    upward = sorted(t for t in GRAPH[module] if floor(t) > floor(module))
    assert not upward, (f"{module} (floor {FLOORS[floor(module)][0]}) imports "
                        + ", ".join(f"{t} (floor {FLOORS[floor(t)][0]})" for t in upward))


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(MODULES):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor(module)


def test_the_contract_sees_lazy_and_type_checking_imports():
    """The checker reads imports inside functions and under TYPE_CHECKING, and resolves ``from pkg import mod``."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from adkit.run.planning import RunPlan\n"
              "def f():\n    from adkit.outputs import render\n")
    assert imported(source, "adkit.core") == {"adkit.run.planning", "adkit.outputs.render"}
    assert floor("adkit.run.planning") > floor("adkit.core.registry")


@pytest.mark.parametrize("detector", ["pixel-gauss", "draem:recon_width=2,disc_width=2"])
def test_a_runs_configuration_enters_each_module_at_most_twice(invoke, tmp_path, detector):
    """From `adkit run` the configuration (RunConfig, then the RunPlan made from it) goes down through the
    layers and comes back only to the module that holds the loop: every call that receives it from another
    module counts as an entry, and no module is entered more than twice (when issue #26 was filed the same path
    climbed back up 17 times: planning 5, engine 6, report 6). The value's own methods do not count."""
    import collections
    import sys

    from adkit.run.config import RunConfig
    from adkit.run.planning import RunPlan

    values = (RunConfig, RunPlan)
    entries: collections.Counter[str] = collections.Counter()
    path: list[str] = []

    def carries(value) -> bool:
        return isinstance(value, values) or (isinstance(value, tuple) and any(isinstance(v, values) for v in value))

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if not module.startswith("adkit.") or module == caller:
            return
        code = frame.f_code
        args = [frame.f_locals.get(name) for name in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        if args and code.co_varnames[0] == "self" and isinstance(args[0], values):
            return  # a method of the configuration itself
        if any(carries(value) for value in args):
            entries[module] += 1
            path.append(f"{module}.{code.co_name}")

    sys.setprofile(profile)
    try:
        code, _, err = invoke("run", "--detector", detector, "--data", "synthetic:size=32,n_train=8,n_test=6",
                              "--category", "tile", "--image-size", "32", "--steps", "2", "--batch-size", "2",
                              "--out", str(tmp_path / "run"), "--workers", "1")
    finally:
        sys.setprofile(None)
    assert code == 0, err
    assert "adkit.run.planning" in entries and "adkit.run.evaluation" in entries  # the tracer saw the path
    assert max(entries.values()) <= 2, " -> ".join(path)
