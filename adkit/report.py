"""Writing results: resolved config, metrics.json, scores.csv, heatmap overlays. Files are written atomically."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


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
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """A table with a header row, written atomically; a row's keys outside ``columns`` are left out, and the
    columns a row lacks are empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_scores_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per image: path, label (empty without labels), score, prediction (0/1)."""
    write_csv(path, ["path", "label", "score", "prediction"], rows)


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    """The training log: one row per logged step, a column per logged value (``loss`` and what the detector
    adds, e.g. an EBM's ``f_data`` / ``f_sample``)."""
    write_csv(path, list(dict.fromkeys(key for row in history for key in row)) or ["step"], history)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue -> green -> yellow -> red map for values in [0, 1]: (H, W) -> (H, W, 3)."""
    stops = np.array([[0.0, 0.0, 0.5], [0.0, 0.4, 1.0], [0.0, 0.9, 0.6], [1.0, 0.9, 0.0], [0.9, 0.0, 0.0]])
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    t = (x - i)[..., None]
    return stops[i] * (1 - t) + stops[i + 1] * t


def overlay_panel(image: torch.Tensor, anomaly_map: torch.Tensor, threshold: float, vmax: float,
                  mask: torch.Tensor | None = None) -> Image.Image:
    """Side by side: input | ground truth (if any) | heatmap over the input | thresholded prediction.
    image (3, H, W) in [0, 1]; anomaly_map (1, H, W); mask (1, H, W)."""
    img = image.permute(1, 2, 0).numpy()
    values = anomaly_map[0].numpy()
    heat = 0.5 * img + 0.5 * heat_colours(values / max(vmax, 1e-12))
    predicted = np.repeat((values > threshold)[..., None], 3, axis=2).astype(np.float32)
    panels = [img]
    if mask is not None:
        panels.append(np.repeat(mask[0].numpy()[..., None], 3, axis=2))
    panels += [heat, predicted]
    gap = np.ones((img.shape[0], 4, 3))
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    return Image.fromarray((np.clip(row, 0, 1) * 255 + 0.5).astype(np.uint8))


def save_png_atomic(picture: Image.Image, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    """An array as .npy (no pickling: numbers only)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def new_figure(width: int, height: int) -> tuple[Any, Any]:
    """A matplotlib figure of ``width`` x ``height`` px and its axes, on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(figsize=(width / 100, height / 100), dpi=100)


def figure_png(figure: Any) -> bytes:
    """The figure laid out tightly as PNG bytes; the figure is closed."""
    from matplotlib import pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def save_figure_atomic(figure: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(figure_png(figure))


def curve_plot(curves: list[tuple[str, np.ndarray, np.ndarray]], title: str, x_label: str, y_label: str,
               x_marker: float | None = None, size: int = 420) -> Image.Image:
    """A matplotlib line plot of ``curves`` (label, x, y) with x and y in [0, 1], a legend and an optional
    vertical marker (e.g. the AUPRO FPR limit), as a ``size`` x ``size`` px picture."""
    figure, axes = new_figure(size, size)
    for label, x, y in curves:
        axes.plot(x, y, label=label, linewidth=1.2)
    if x_marker is not None:
        axes.axvline(x_marker, color="grey", linestyle=":", linewidth=1)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), title=title, xlabel=x_label, ylabel=y_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return Image.open(io.BytesIO(figure_png(figure))).convert("RGB")
