"""Name -> factory, per component kind, and the ``name:key=value,...`` spec grammar.

A factory's keyword parameters, with their annotations and defaults, are its typed parameters. Values in a spec
are parsed to the parameter's type: ``int``, ``float``, ``bool`` (true/false/1/0/yes/no), ``str``, ``Literal``
choices, optional types (``none``), and tuples written with ``+`` (``kernels=3+5``).
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from adkit.core.errors import AdkitError
from adkit.core.grammar import ComponentSpec, convert, split_spec, type_name, unsupported

# every component kind and the hook that registers it (hookspecs.py declares one hook per kind; a test holds them
# equal)
KINDS = {
    "detector": "register_detectors",
    "backbone": "register_backbones",
    "loss": "register_losses",
    "sampler": "register_samplers",
    "postprocessor": "register_postprocessors",
    "scorer": "register_scorers",
    "ensemble": "register_ensembles",
    "dataset": "register_datasets",
    "exporter": "register_exporters",
}
# kinds whose factory must be a class deriving from the kind's base: the registry reads their declarations (Traits)
# from the class. The other kinds' factories may be functions; what they build is checked against the kind's base
# class when it is built (kind_type).
CLASS_KINDS = ("detector", "postprocessor", "scorer", "dataset")

# Parameters every component of a kind accepts, consumed by the caller rather than the factory.
KIND_EXTRAS: dict[str, dict[str, tuple[type, Any]]] = {"loss": {"weight": (float, 1.0)}}

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One typed parameter of a component factory."""

    name: str
    annotation: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def type_name(self) -> str:
        return type_name(self.annotation)

    def parse(self, raw: Any) -> Any:
        """Convert ``raw`` (a spec string or an already typed config value) to this parameter's type."""
        try:
            return convert(raw, self.annotation)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"expects {self.type_name}, got {raw!r}") from exc


@dataclass(frozen=True)
class Traits:
    """What a component declares about itself, read from its class when it is registered, never by building it
    or probing its outputs (the class attributes of ``adkit.core.components``' base classes)."""

    trainable: bool = False  # detector: trained by gradient steps (else fitted)
    image_level: bool = False  # detector: one value per image, no pixel-level opinion
    own_scores: bool = False  # detector: detect() returns image scores of its own (the scorer is not used)
    updatable: bool = False  # detector: update() adds normal images to a fitted one without refitting
    uses_defects: bool = False  # detector: learns from labelled defective training images (train_defects)
    exportable: bool = True  # detector, post-processor, scorer: its forward traces into a graph
    presets: tuple[str, ...] = ()
    # detector: each preset's settings (image_size, batch_size, steps, epochs, params), read-only
    preset_values: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    consumes: frozenset[str] = frozenset()  # run options the detector reads (loss, sampler, backbone, ...)
    default_postprocessors: tuple[str, ...] = ()  # detector: the pipeline a run uses when the user names none
    default_scorer: str = ""
    default_pixel_map: str = "raw"  # detector: which map pixel metrics read by default (raw | post)
    default_preset: str = ""  # dataset: the detector preset that suits it when the user names none
    takes_folders: bool = False  # dataset: the one --normal/--abnormal/--masks select
    default_data: bool = False  # dataset: the one a run reads when --data is left out

    @classmethod
    def of(cls, kind: str, factory: Callable[..., Any]) -> Traits:
        if kind not in CLASS_KINDS:  # losses, samplers, ensembles, backbones, exporters declare nothing here
            return cls()
        values: dict[str, Any] = {}
        if kind in ("detector", "postprocessor", "scorer"):
            values.update(exportable=factory.exportable)
        if kind == "detector":
            values.update(trainable=factory.trainable, image_level=factory.image_level,
                          own_scores=factory.own_scores, updatable=factory.updatable,
                          uses_defects=factory.uses_defects,
                          presets=tuple(factory.presets),
                          preset_values=MappingProxyType({k: MappingProxyType(dict(v))
                                                          for k, v in factory.presets.items()}),
                          consumes=frozenset(factory.consumes),
                          default_postprocessors=tuple(factory.default_postprocessors),
                          default_scorer=factory.default_scorer, default_pixel_map=factory.default_pixel_map)
        if kind == "dataset":
            values.update(default_preset=factory.default_preset, takes_folders=factory.takes_folders,
                          default_data=factory.default_data)
        return cls(**values)


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component: what the registry knows of it, readable without building it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    help: str
    plugin: str
    params: dict[str, Param] = field(default_factory=dict)
    builtin: bool = False  # registered by one of adkit's own plugins
    traits: Traits = field(default_factory=Traits)


class Register:
    """The ``register`` callable a hook receives: ``register(name, factory, help=...)``. A component that cannot
    be registered (a name another plugin already uses, a parameter type specs cannot express, a detector factory
    that is not a Detector class) is not an error of the plugin as a whole: ``on_conflict`` receives the
    ComponentRejected and that one component is dropped (built-in components win a name over third-party ones;
    otherwise the first one stays)."""

    def __init__(self, registry: Registry, plugin: str, builtin: bool = False,
                 on_conflict: Callable[[ComponentRejected], None] | None = None):
        self._registry = registry
        self._plugin = plugin
        self._builtin = builtin
        self._on_conflict = on_conflict

    def __call__(self, name: str, factory: Callable[..., Any], help: str | None = None) -> None:
        try:
            self._registry.add(name, factory, help=help, plugin=self._plugin, builtin=self._builtin)
        except ComponentRejected as conflict:
            if self._on_conflict is None:
                raise
            self._on_conflict(conflict)


class ComponentRejected(Exception):
    """A component the registry refused; ``plugins`` names the plugins concerned."""

    def __init__(self, message: str, plugins: tuple[str, ...]):
        super().__init__(message)
        self.plugins = plugins


class DuplicateComponentError(ComponentRejected):
    """Two plugins registered the same name for one kind; ``plugins`` names both (the first one registered first)."""


class Registry:
    """The components of one kind, by name."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}")
        self.kind = kind
        self._items: dict[str, ComponentInfo] = {}
        # set by the catalog: (plugin, error) of the plugins that failed to load, named when a lookup fails
        self.broken_plugins: Callable[[], list[tuple[str, str]]] = list
        self._rejected: dict[str, str] = {}  # name -> why it was refused at registration

    def add(self, name: str, factory: Callable[..., Any], help: str | None, plugin: str, builtin: bool = False) -> None:
        """Register ``name``. If another plugin has it, the built-in one (else the first) keeps it and
        DuplicateComponentError names both plugins and says whose component was dropped."""
        if not name or any(c in name for c in ":,= "):
            raise ValueError(f"{self.kind} name {name!r} must be non-empty without ':', ',', '=' or spaces")
        try:
            params = _signature_params(factory)
            self._check_factory(factory, params)
        except ValueError as exc:
            message = f"{self.kind} {name!r} of plugin {plugin!r} is not registered: {exc}"
            self._rejected.setdefault(name, message)
            raise ComponentRejected(message, plugins=(plugin,)) from None
        info = ComponentInfo(kind=self.kind, name=name, factory=factory, help=help or _first_line(factory.__doc__),
                             plugin=plugin, params=params, builtin=builtin, traits=Traits.of(self.kind, factory))
        existing = self._items.get(name)
        if existing is not None:
            replace = builtin and not existing.builtin
            kept, dropped = (info, existing) if replace else (existing, info)
            if replace:
                self._items[name] = info
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered by both plugin {existing.plugin!r} and plugin {plugin!r}: "
                f"kept from plugin {kept.plugin!r}{' (built-in)' if kept.builtin else ''}, dropped from plugin "
                f"{dropped.plugin!r}",
                plugins=(existing.plugin, plugin))
        self._items[name] = info

    def _check_factory(self, factory: Callable[..., Any], params: dict[str, Param]) -> None:
        """Raise ValueError if specs could not build this factory: a parameter type the spec grammar cannot
        parse, or (for detectors, whose class attributes the core reads) a factory that is not a Detector class."""
        for param in params.values():
            problem = unsupported(param.annotation)
            if problem:
                raise ValueError(f"parameter {param.name!r} has type {param.type_name} ({problem}); use int, float, "
                                 "bool, str, Path, a Literal, an optional type or tuple[T, ...]")
        if self.kind in CLASS_KINDS:
            expected = kind_type(self.kind)
            if not (inspect.isclass(factory) and issubclass(factory, expected)):
                raise ValueError(f"its factory {getattr(factory, '__qualname__', factory)!r} is not a subclass of "
                                 f"{expected.__module__}.{expected.__name__} (the core reads its declarations "
                                 "from the class)")

    def remove_plugin(self, plugin: str) -> None:
        """Forget every component a plugin registered (used when its registration fails half-way)."""
        self._items = {k: v for k, v in self._items.items() if v.plugin != plugin}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[ComponentInfo]:
        return iter(sorted(self._items.values(), key=lambda info: info.name))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> ComponentInfo:
        try:
            return self._items[name]
        except KeyError:
            raise AdkitError(self._unknown_message(name)) from None

    def parse(self, spec: str | ComponentSpec, overrides: dict[str, Any] | None = None) -> ComponentSpec:
        """Parse ``name`` or ``name:key=value,...`` into a checked spec; ``overrides`` win over the text."""
        if isinstance(spec, ComponentSpec):
            name, raw = spec.name, {**spec.params, **spec.extras}
        else:
            name, raw = split_spec(spec, self.kind)
        raw.update(overrides or {})
        info = self.get(name)
        extras_decl = KIND_EXTRAS.get(self.kind, {})
        params: dict[str, Any] = {}
        extras: dict[str, Any] = {k: default for k, (_, default) in extras_decl.items()}
        for key, value in raw.items():
            if key in extras_decl:
                extras[key] = _parse_extra(self.kind, name, key, value, extras_decl[key][0])
                continue
            if key not in info.params:
                known = ", ".join(f"{p.name}: {p.type_name}" for p in info.params.values()) or "none"
                extra = ", ".join(f"{k}: {t.__name__}" for k, (t, _) in extras_decl.items())
                raise AdkitError(
                    f"{self.kind} {name!r} has no parameter {key!r}; its parameters: {known}"
                    + (f" (and {extra})" if extra else "")
                )
            try:
                params[key] = info.params[key].parse(value)
            except ValueError as exc:
                raise AdkitError(f"{self.kind} {name!r} parameter {key!r} {exc}") from None
        params = {key: params[key] for key in info.params if key in params}  # the factory's order: one text
        missing = [p.name for p in info.params.values() if p.required and p.name not in params]
        if missing:
            raise AdkitError(f"{self.kind} {name!r} needs parameter(s) {', '.join(missing)}: write {name}:{missing[0]}=...")
        return ComponentSpec(kind=self.kind, name=name, params=params, extras=extras)

    def create(self, spec: str | ComponentSpec, **overrides: Any) -> Any:
        """Build the component a spec names (extras such as a loss weight are not passed to the factory)."""
        parsed = self.parse(spec, overrides)
        info = self.get(parsed.name)
        try:
            component = info.factory(**parsed.params)
        except ValueError as exc:  # factories reject out-of-range values with ValueError
            raise AdkitError(f"{self.kind} {str(parsed)!r}: {exc}") from None
        expected = kind_type(self.kind)
        if not isinstance(component, expected):
            raise AdkitError(f"{self.kind} {parsed.name!r} of plugin {info.plugin!r} returned a "
                             f"{type(component).__name__}, not a {expected.__module__}.{expected.__name__}: "
                             "the plugin's factory is wrong")
        return component

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        available = ", ".join(self.names()) or "none registered"
        broken = "".join(f"; plugin {plugin!r} is broken ({error}) and may be the one that provides it"
                         for plugin, error in self.broken_plugins())
        if name in self._rejected:
            return f"{self._rejected[name]} (see `adkit plugins`)"
        return f"unknown {self.kind} {name!r}{hint}{broken} (available: {available}; `adkit plugins` lists them)"


def kind_type(kind: str) -> type:
    """The class every component of ``kind`` is an instance of (imported on first use: torch is heavy)."""
    from adkit.core import components
    from adkit.core.datasets import AnomalyDataset
    from adkit.core.exporting import ExportFormat

    return {"detector": components.Detector, "backbone": components.Backbone, "loss": components.Loss,
            "sampler": components.Sampler, "postprocessor": components.PostProcessor, "scorer": components.Scorer,
            "ensemble": components.Ensemble, "dataset": AnomalyDataset, "exporter": ExportFormat}[kind]


def _parse_extra(kind: str, name: str, key: str, value: Any, typ: type) -> Any:
    try:
        return convert(value, typ)
    except (ValueError, TypeError):
        raise AdkitError(f"{kind} {name!r} parameter {key!r} expects {typ.__name__}, got {value!r}") from None


def _signature_params(factory: Callable[..., Any]) -> dict[str, Param]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable forward references: fall back to raw annotations
        hints = {}
    params: dict[str, Param] = {}
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = hints.get(p.name, p.annotation)
        if isinstance(annotation, str):  # get_type_hints failed on another annotation: resolve this one alone
            annotation = _resolve(annotation, getattr(target, "__globals__", {}))
        if annotation is _MISSING:
            annotation = type(p.default) if p.default not in (_MISSING, None) else str
        params[p.name] = Param(p.name, annotation, p.default)
    return params


def _resolve(annotation: str, namespace: dict[str, Any]) -> Any:
    """The type a string annotation names, or the string itself when it names none here (registration then
    refuses the parameter)."""
    try:
        return eval(annotation, namespace, {"typing": typing})
    except Exception:  # noqa: BLE001 - any failure leaves the text, reported as unresolvable
        return annotation


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""
