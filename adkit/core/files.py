"""Files written atomically (readers never see half a file): a temporary path or folder renamed into place, and
the JSON and CSV writers built on it. The one place that knows how adkit writes a file."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The mode ``open()`` or ``mkdir`` would give under the process's umask (temporary files get 0600)."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it gets the usual file mode and is renamed over
    ``path`` (readers never see half a file), on failure it is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(usual_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; on success it gets the usual mode and is renamed to ``path``
    (which must not exist, or be an empty folder), so readers see the whole folder or none; on failure it is
    removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        staging.chmod(usual_mode(directory=True))  # mkdtemp's 0700 would hide the folder from other users
        if path.is_dir():
            path.rmdir()
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_torch(path: Path, payload: Any) -> None:
    """``torch.save`` atomically, synced to the disk before the rename (a checkpoint survives a crash whole)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class Table:
    """A CSV file's content: a header row of ``columns``, then ``rows``; a row's keys outside ``columns`` are left
    out, and the columns a row lacks are empty."""

    columns: list[str]
    rows: list[dict[str, Any]]


def encode(content: Any) -> bytes:
    """A file's bytes: bytes as they are, text as UTF-8, a Table as CSV, anything else as indented JSON."""
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, Table):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=content.columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(content.rows)
        return buffer.getvalue().encode()
    return _json(content)


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=_jsonable) + "\n").encode()


def write_files(folder: Path, contents: Mapping[str, Any]) -> None:
    """Every file of ``contents`` (its path under ``folder`` -> what ``encode`` takes), each written atomically,
    in order: a folder's outputs are rendered first and written by this one call."""
    for name, content in contents.items():
        write_bytes_atomic(folder / name, encode(content))


def write_json(path: Path, data: Any) -> None:
    write_bytes_atomic(path, _json(data))  # a string too is written as JSON here


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


SCORE_COLUMNS = ["path", "label", "score", "prediction"]


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """A table with a header row, written atomically (see Table)."""
    write_bytes_atomic(path, encode(Table(columns, rows)))


def scores_table(rows: list[dict[str, Any]]) -> Table:
    """scores.csv: one row per image: path, label (empty without labels), score, prediction (0/1)."""
    return Table(SCORE_COLUMNS, rows)


def history_table(history: list[dict[str, float]]) -> Table:
    """The training log: one row per logged step, a column per logged value (``loss`` and what the detector
    adds, e.g. an EBM's ``f_data`` / ``f_sample``)."""
    return Table(list(dict.fromkeys(key for row in history for key in row)) or ["step"], history)
