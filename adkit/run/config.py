"""The run configuration shared by ``adkit run``, ``train``, ``test``, ``predict`` and ``bench``.

A TOML file (``--config``) and the command-line flags set the same fields; flags win. The fully resolved
configuration is written beside every result as ``config.toml``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from adkit.core.errors import AdkitError

LIST_FIELDS = ("detector", "loss", "post", "category")


@dataclass
class RunConfig:
    """Everything a run needs; ``None`` means "the detector's or preset's default"."""

    detector: list[str] = field(default_factory=list)
    loss: list[str] = field(default_factory=list)
    loss_only: bool = False
    post: list[str] = field(default_factory=list)
    scorer: str | None = None
    sampler: str | None = None
    backbone: str | None = None
    ensemble: str | None = None
    data: str | None = None  # None: the dataset that declares itself the default (default_data)
    category: list[str] = field(default_factory=list)
    root: str | None = None
    normal: str | None = None
    abnormal: str | None = None
    masks: str | None = None
    preset: str | None = None
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    image_size: int | str | None = None  # a side (256) or WIDTHxHEIGHT (512x256)
    resize: str | None = None  # how images of another shape reach the input size: squash, pad or crop
    tile: int | None = None  # cut the input into square tiles of this side for the detector
    overlap: float | None = None  # the fraction of a tile its neighbours share
    batch_size: int | None = None
    steps: int | None = None
    checkpoint_every: int | None = None
    anomaly_source: str | None = None
    skip_bad: bool = False
    pixel_map: str | None = None  # raw | post; None: the detector's declared default
    compile: bool = False
    precision: str = "auto"
    workers: int | None = None  # categories trained side by side in worker processes; None: one per core on a CPU
    threshold: str | None = None  # a decision-threshold policy (adkit.stats.thresholds); None: fpr:0.01, or the recorded one

    def to_toml(self) -> str:
        values = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return tomli_w.dumps(values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into RunConfig field values, with clear errors for bad files and keys."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise AdkitError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AdkitError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name: f for f in fields(RunConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise AdkitError(f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        values[name] = _typed(path, key, name, value)
    return values


def _typed(path: Path, key: str, name: str, value: Any) -> Any:
    """A config file value converted as the command line converts the flag's text: ``steps = "10"`` is 10, and a
    value that the flag would refuse is a one-line error naming the file and the key."""
    hint = typing.get_type_hints(RunConfig)[name]
    kinds = set(typing.get_args(hint)) or {hint}
    if name == "image_size" and isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    if name in LIST_FIELDS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise AdkitError(f"config file {path}: {key} must be a string or a list of strings, got {value!r}")
        return items
    if bool in kinds:
        text = str(value).lower()
        if isinstance(value, bool) or text in ("true", "false"):
            return value if isinstance(value, bool) else text == "true"
        raise AdkitError(f"config file {path}: {key} must be true or false, got {value!r}")
    if float in kinds:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise AdkitError(f"config file {path}: {key} must be a number, got {value!r}") from None
    if int in kinds:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise AdkitError(f"config file {path}: {key} must be an integer, got {value!r}")
    if not isinstance(value, str):
        raise AdkitError(f"config file {path}: {key} must be a string, got {value!r}")
    return value


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> RunConfig:
    """Merge config-file values with flags (flags given on the command line win)."""
    merged = dict(file_values)
    for key, value in flag_values.items():
        if value is None or (key in LIST_FIELDS and not value) or (isinstance(value, bool) and not value
                                                                    and key in merged):
            continue
        merged[key] = list(value) if key in LIST_FIELDS else value
    try:
        config = RunConfig(**merged)
    except TypeError as exc:
        raise AdkitError(f"bad configuration: {exc}") from None
    if config.threshold is not None:  # a bad policy fails before anything is loaded, trained or written
        from adkit.stats.thresholds import PolicyError, parse_policy

        try:
            config.threshold = str(parse_policy(config.threshold))
        except PolicyError as exc:
            raise AdkitError(str(exc)) from None
    return config
