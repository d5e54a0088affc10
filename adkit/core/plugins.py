"""The plugin manager: built-in and third-party plugins load the same way, through the ``adkit`` entry-point group.

``ADKIT_LOAD_PLUGINS=a,b`` loads only the named plugins; ``ADKIT_DISABLE_PLUGINS=a,b`` blocks the named ones. A
plugin that fails to import or to register is recorded as broken with its error; the others keep working.
"""

from __future__ import annotations

import ast
import logging
import os
import traceback
import types
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from adkit import PLUGIN_API, __version__
from adkit.core import hookspecs
from adkit.core.builder import ComponentBuilder
from adkit.core.grammar import NO_POSTPROCESSING, ComponentSpec
from adkit.core.registry import KINDS, ComponentRejected, Register, Registry

log = logging.getLogger("adkit")

ENTRY_POINT_GROUP = "adkit"
CORE_DISTRIBUTION = "adkit"
# what a plugin may import from adkit: the plugin API (adkit.plugin; hookimpl also from adkit) and the checks
PUBLIC_MODULES = frozenset({"adkit", "adkit.plugin", "adkit.testing", "adkit.api"})
SCANNED_FILES = 200  # a plugin package's files read for internal imports, at most

@dataclass
class PluginRecord:
    """What ``adkit plugins`` shows about one plugin."""

    name: str
    version: str
    source: str  # "built-in" or "package <distribution>" or "python"
    status: str = "ok"  # ok | broken | disabled
    error: str = ""
    detail: str = field(default="", repr=False)  # full traceback of a broken plugin, for --debug
    warnings: list[str] = field(default_factory=list)  # e.g. a component dropped for a name another plugin has


class Catalog:
    """The loaded plugins and, per kind, the registry of their components.

    Loading has two steps: importing each plugin and checking its hooks (cheap when the plugin module imports its
    components inside its hooks, as adkit's own do), then calling the component hooks, which import the
    components (torch and the rest). The second step runs on the first look at a registry, so ``adkit --help``
    and a plugin's own command need only the first."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("adkit")
        self.pm.add_hookspecs(hookspecs)
        self._registries: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
        self.plugins: dict[str, PluginRecord] = {}
        self._deferred: list[str] = []  # plugins whose component hooks have not run yet
        for registry in self._registries.values():
            registry.broken_plugins = lambda: [(r.name, r.error) for r in self.broken()]

    @property
    def registries(self) -> dict[str, Registry]:
        self.load_components()
        return self._registries

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    def checked(self, kind: str, spec: str | ComponentSpec) -> ComponentSpec:
        """A spec parsed and built once, so that out-of-range values fail before any data is loaded or trained
        on; its ``str`` is its one text (parameters in the factory's order, values formatted)."""
        parsed = self[kind].parse(spec)
        self[kind].create(parsed)
        return parsed

    def checked_posts(self, specs: list[str]) -> tuple[ComponentSpec, ...]:
        """A post-processor chain, each checked; ``none`` alone is the empty chain (a detector's declared default
        post-processing turned off)."""
        if [s.strip() for s in specs] == [NO_POSTPROCESSING]:
            return ()
        return tuple(self.checked("postprocessor", spec) for spec in specs)

    def builder(self) -> ComponentBuilder:
        """What a detector may build from this catalog (DetectorContext.build)."""
        return ComponentBuilder(self.registries)

    def load_components(self) -> None:
        """Run the component hooks of the plugins added with ``defer=True`` (once)."""
        deferred, self._deferred = self._deferred, []
        for name in deferred:
            record = self.plugins.get(name)
            if record is not None and record.status == "ok":
                self._register_components(name, record)

    def add_plugin(self, plugin: Any, name: str, version: str = "", source: str = "python",
                   defer: bool = False) -> PluginRecord:
        """Register a plugin object (module or instance) and, unless ``defer``, its components; failures mark it
        broken."""
        record = PluginRecord(name=name, version=version, source=source)
        self.plugins[name] = record
        declared = getattr(plugin, "ADKIT_PLUGIN_API", PLUGIN_API)  # optional: a plugin may declare what it needs
        if declared != PLUGIN_API:
            return _mark_broken(record, PluginAPIError(
                f"written for adkit plugin API {declared}, but adkit {__version__} provides plugin API {PLUGIN_API}: "
                "install a release of the plugin made for it (docs/plugins.md, changelog)"))
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()  # a hook name adkit does not define (a typo such as register_scorer)
        except Exception as exc:  # noqa: BLE001 - a malformed or unknown hookimpl: report, keep going
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return _mark_broken(record, exc)
        if source != "built-in" and isinstance(plugin, types.ModuleType):
            for line in internal_imports(plugin):
                message = f"plugin {name}: {line}"
                record.warnings.append(message)
                warnings.warn(message, DeprecationWarning, stacklevel=2)
        if defer:
            self._deferred.append(name)
            return record
        self.load_components()  # the plugins added before this one register first, as they were added
        return self._register_components(name, record)

    def _register_components(self, name: str, record: PluginRecord) -> PluginRecord:
        for kind, hook_name in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                if impl.plugin_name != name:
                    continue
                try:
                    impl.function(register=Register(self._registries[kind], name,
                                                    builtin=record.source == "built-in", on_conflict=self._conflict))
                except Exception as exc:  # noqa: BLE001 - a plugin's failure must not take the others down
                    self.remove_plugin(name)
                    self.plugins[name] = record
                    return _mark_broken(record, exc)
        return record

    def _conflict(self, conflict: ComponentRejected) -> None:
        """A component was refused (two plugins registered one name, or specs could not build it): only that
        component is dropped; the record of every plugin concerned says so."""
        for name in dict.fromkeys(conflict.plugins):  # once, when a plugin clashes with itself
            if name in self.plugins:
                self.plugins[name].warnings.append(str(conflict))
        log.warning(str(conflict))

    def remove_plugin(self, name: str) -> None:
        for registry in self._registries.values():
            registry.remove_plugin(name)
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.plugins.pop(name, None)

    def register_commands(self, cli: Any) -> None:
        """Let every working plugin add its click commands; a failure marks that plugin broken."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            record = self.plugins.get(impl.plugin_name)
            try:
                impl.function(cli=cli)
            except Exception as exc:  # noqa: BLE001 - as above, for its commands
                if record is not None:
                    _mark_broken(record, exc)

    def broken(self) -> list[PluginRecord]:
        return [r for r in self.plugins.values() if r.status == "broken"]


def internal_imports(module: types.ModuleType) -> list[str]:
    """Where a plugin's source imports adkit past its plugin API (adkit's internal modules, which keep working for
    now but may move in any release), each as one line naming the file, the line and the import to use instead.
    Read from the source (the whole package of a package), not from what ran: a lazy import counts too."""
    file = getattr(module, "__file__", None)
    if not file:
        return []
    path = Path(file)
    files = sorted(path.parent.rglob("*.py"))[:SCANNED_FILES] if hasattr(module, "__path__") else [path]
    found = []
    for source in files:
        try:
            tree = ast.parse(source.read_text(), filename=str(source))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [(node.module, ", ".join(alias.name for alias in node.names))]
            elif isinstance(node, ast.Import):
                modules = [(alias.name, "") for alias in node.names]
            else:
                continue
            for name, names in modules:
                if name.startswith("adkit.") and name not in PUBLIC_MODULES:
                    what = f"{names} from {name}" if names else name
                    found.append(f"{source.name}:{node.lineno} imports {what}, an internal module that may move in "
                                 f"any release: import {'them' if names else 'what it needs'} from adkit.plugin "
                                 "(docs/plugins.md, 'The plugin API')")
    return found


class PluginAPIError(Exception):
    """A plugin declares a plugin API this adkit does not provide."""


def _mark_broken(record: PluginRecord, exc: BaseException) -> PluginRecord:
    record.status = "broken"
    record.error = f"{type(exc).__name__}: {exc}"
    record.detail = "".join(traceback.format_exception(exc))
    return record


def _env_names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def load_catalog() -> Catalog:
    """Load every plugin of the ``adkit`` entry-point group, honouring the environment filters."""
    catalog = Catalog()
    only = _env_names("ADKIT_LOAD_PLUGINS")
    blocked = _env_names("ADKIT_DISABLE_PLUGINS") or set()
    entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    for ep in entry_points:
        dist = ep.dist.name if ep.dist is not None else ""
        version = ep.dist.version if ep.dist is not None else ""
        source = "built-in" if dist == CORE_DISTRIBUTION else f"package {dist}"
        if ep.name in catalog.plugins:
            # a second distribution claiming the same plugin name: keep the first, report the second
            record = PluginRecord(ep.name + f" ({dist})", version, source, status="broken",
                                  error=f"plugin name {ep.name!r} is already used by {catalog.plugins[ep.name].source}")
            catalog.plugins[record.name] = record
            continue
        if (only is not None and ep.name not in only) or ep.name in blocked:
            catalog.plugins[ep.name] = PluginRecord(ep.name, version, source, status="disabled")
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - an import error of any kind marks the plugin broken
            catalog.plugins[ep.name] = _mark_broken(PluginRecord(ep.name, version, source), exc)
            continue
        catalog.add_plugin(plugin, name=ep.name, version=version, source=source, defer=True)
    return catalog


_catalog: Catalog | None = None


def get_catalog() -> Catalog:
    """The process-wide catalog, loaded on first use."""
    global _catalog
    if _catalog is None:
        _catalog = load_catalog()
    return _catalog


def reset_catalog() -> None:
    """Forget the loaded catalog (tests and environment changes)."""
    global _catalog
    _catalog = None
