"""The one spec grammar: ``name:key=value,...`` component specs, ``+`` lists and chains, parentheses around a
value that holds separators of its own, and the conversion of spec text to typed values and back. The registry,
the CLI, config files and the bench grid all parse through here, so a spec has one canonical text:
``str(registry.parse(text))``, which parses back to the same value.

Values are parsed to a parameter's type: ``int``, ``float``, ``bool`` (true/false/1/0/yes/no/on/off), ``str``,
``Path``, ``Literal`` choices, optional types (``none``), and tuples written with ``+`` (``kernels=3+5``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any

from adkit.core.errors import AdkitError


@dataclass(frozen=True)
class ComponentSpec:
    """A parsed, type-checked spec: the component's name and its parameter values (factory params + extras)."""

    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        values = {**self.params, **self.extras}
        if not values:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in values.items())


NO_POSTPROCESSING = "none"  # --post none: no post-processor, not even the detector's default ones


@dataclass(frozen=True)
class PipelineSpec:
    """The pipeline a run evaluates, as one value: the detector, its post-processors in order and its scorer, each
    a parsed spec (``str`` of each is its canonical text). Planning makes it once; checkpoints and threshold
    records store its texts (``record``), and what reads them back parses them and compares the values."""

    detector: ComponentSpec
    posts: tuple[ComponentSpec, ...]
    scorer: ComponentSpec

    @property
    def post_texts(self) -> list[str]:
        return [str(post) for post in self.posts]

    @property
    def scorer_text(self) -> str:
        return str(self.scorer)

    def record(self) -> dict[str, Any]:
        """The texts a checkpoint's meta and a threshold record store: detector, posts and scorer."""
        return {"detector": str(self.detector), "posts": self.post_texts, "scorer": self.scorer_text}

    def rescored(self, posts: tuple[ComponentSpec, ...] | None = None,
                 scorer: ComponentSpec | None = None) -> PipelineSpec:
        """The same detector with other post-processors or another scorer (a bench grid's re-scoring)."""
        return PipelineSpec(self.detector, self.posts if posts is None else tuple(posts), scorer or self.scorer)

    def __str__(self) -> str:
        return " -> ".join([str(self.detector), *self.post_texts, self.scorer_text])


def split_spec(spec: str, kind: str = "component") -> tuple[str, dict[str, str]]:
    """Split ``name:key=value,key=value`` into the name and raw string values. A value holding commas of its own
    (another component's spec) is written in parentheses: ``ebm-image:sampler=(pyld:M=5,N=3)``."""
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise AdkitError(f"empty {kind} spec {spec!r}: write name or name:key=value,...")
    raw: dict[str, str] = {}
    if rest.strip():
        for item in split_top_level(rest, ",", f"{kind} spec {spec!r}"):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise AdkitError(f"{kind} spec {spec!r}: {item!r} is not key=value")
            value = value.strip()
            if value.startswith("(") and value.endswith(")"):
                value = value[1:-1].strip()
            raw[key.strip()] = value
    return name, raw


def split_top_level(text: str, separator: str, what: str) -> list[str]:
    """``text`` split at ``separator`` outside parentheses (the one spec grammar: a value holding separators of
    its own is written in parentheses); ``what`` names the text in errors."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise AdkitError(f"{what}: a ')' without its '('")
        elif char == separator and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise AdkitError(f"{what}: a '(' without its ')'")
    items.append(text[start:])
    return items


def unwrap(text: str) -> str:
    """A value without its enclosing parentheses: ``(a:b=1,c=2)`` -> ``a:b=1,c=2``."""
    text = text.strip()
    return text[1:-1].strip() if text.startswith("(") and text.endswith(")") else text


def split_chain(text: str, what: str) -> list[str]:
    """A chain of component specs joined by '+' (``avgpool:kernel=21+gaussian``); a '+' inside a parameter's
    list value stays (``freqmask:kernels=3+5``): a chain link starts with a component name, a list item does
    not. Parenthesised links keep everything inside."""
    links: list[str] = []
    for part in split_top_level(text, "+", what):
        stripped = part.strip()
        if links and not (stripped[:1].isalpha() or stripped.startswith("(")):
            links[-1] += "+" + part  # the next item of a list value, not a new component
        else:
            links.append(part)
    return [unwrap(link) for link in links if link.strip()]


def unsupported(annotation: Any) -> str:
    """Why a spec value could not be parsed to ``annotation`` ("" when it can)."""
    from pathlib import Path

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return next((p for p in (unsupported(a) for a in args if a is not type(None)) if p), "")
    if origin is typing.Literal:
        return ""
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return unsupported(args[0])
        return "write tuple[T, ...]: spec values are lists of one type"
    if origin is list:
        return "specs give tuples: write tuple[T, ...]"
    if annotation in (int, float, bool, str, Path, Any):
        return ""
    if isinstance(annotation, str):
        return "an annotation the registry could not resolve"
    return "specs cannot write it"


def convert(raw: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(raw, arg)
            except (ValueError, TypeError) as exc:
                errors.append(exc)
        raise ValueError(str(errors))
    if origin is typing.Literal:
        for choice in args:
            if raw == choice or str(raw) == str(choice):
                return choice
        raise ValueError(f"not one of {args}")
    if origin in (tuple, list):
        items = raw.split("+") if isinstance(raw, str) else list(raw)
        item_type = args[0] if args else str
        return tuple(convert(item, item_type) for item in items)
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError("not a boolean")
    if annotation is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("not an integer")
        return int(raw)
    if annotation is float:
        if isinstance(raw, bool):
            raise ValueError("not a number")
        return float(raw)
    if annotation is str:
        return str(raw)
    if annotation is Any:
        return raw
    return annotation(raw)


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"{type_name(args[0]) if args else 'str'}+..."
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and "," in value:  # a nested spec: parentheses keep its commas together
        return f"({value})"
    return str(value)
