"""What adkit shows on a terminal: warnings, progress bars and result tables. The only module that imports rich."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adkit.core import console
from adkit.core.plugins import Catalog

METRIC_COLUMNS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
# at the decision threshold, on the test split: false alarms per 1,000 good parts and the share of defects caught
DECISION_COLUMNS = ("false_alarms_per_1000", "recall")


def print_plugins(catalog: Catalog, show_all: bool = False, as_json: bool = False) -> None:
    """The plugins, then every registered component (with parameters when ``show_all``): tables on a terminal;
    one tab-separated line per plugin or component when the output is piped (``grep`` finds a whole name);
    JSON with ``as_json``."""
    out = Console()
    plugins = [{"plugin": r.name, "version": r.version, "source": r.source, "status": r.status,
                "error": r.error or None, "warnings": list(r.warnings)}
               for r in sorted(catalog.plugins.values(), key=lambda r: r.name)]
    components = [{"kind": kind, "name": info.name, "plugin": info.plugin, "help": info.help,
                   "parameters": [{"name": p.name, "type": p.type_name, "required": p.required,
                                   "default": None if p.required else p.default} for p in info.params.values()]}
                  for kind, registry in catalog.registries.items() for info in registry]
    if as_json:
        print(json.dumps({"plugins": plugins, "components": components}, indent=1, default=repr))
    elif not out.is_terminal:
        for row in plugins:
            status = row["status"] + (f": {row['error']}" if row["error"] else "")
            status += "".join(f"; warning: {w}" for w in row["warnings"])
            print("\t".join(("plugin", row["plugin"], row["version"], row["source"], status)))
        for row in components:
            cells = ["component", row["kind"], row["name"], row["plugin"], row["help"]]
            print("\t".join(cells + ([_parameters(row["parameters"])] if show_all else [])))
    else:
        out.print(_plugin_table(plugins))
        out.print(_component_table(components, show_all))


def _parameters(parameters: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['name']}: {p['type']}" + ("" if p["required"] else f" = {p['default']!r}")
                     for p in parameters)


def _plugin_table(plugins: list[dict[str, Any]]) -> Table:
    table = Table(title="adkit plugins")
    for column in ("plugin", "version", "source", "status"):
        table.add_column(column)
    for row in plugins:
        status = row["status"] if row["status"] != "broken" else f"[red]broken[/red]: {escape(row['error'] or '')}"
        status += "".join(f"\n[yellow]warning[/yellow]: {escape(w)}" for w in row["warnings"])
        table.add_row(row["plugin"], row["version"], row["source"], status)
    return table


def _component_table(components: list[dict[str, Any]], show_all: bool) -> Table:
    table = Table(title="components")
    for column in ("kind", "name", "plugin", "help") + (("parameters",) if show_all else ()):
        table.add_column(column, overflow="fold")
    for row in components:
        cells = [row["kind"], row["name"], row["plugin"], escape(row["help"])]  # help is plain text, not markup
        table.add_row(*cells, *([escape(_parameters(row["parameters"]))] if show_all else []))
    return table


def fmt(value: Any, digits: int = 3) -> str:
    """A metric cell: numbers with ``digits`` decimals, "-" for a missing or NaN value, other values as text."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def mean_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over categories of every metric column (NaN and missing values left out)."""
    mean: dict[str, Any] = {"category": "mean"}
    for column in (*METRIC_COLUMNS, *DECISION_COLUMNS, "train_s", "infer_img_s"):
        values = [r[column] for r in results if isinstance(r.get(column), float) and not np.isnan(r[column])]
        mean[column] = float(np.mean(values)) if values else float("nan")
    return mean


SUMMARY_HEADER = ("category", *METRIC_COLUMNS, "threshold", "FA/1000", "recall", "train s", "img/s")
# the terminal's table keeps to 80 columns: the APs are in summary.md and metrics.json, the thresholds in the
# line under the table
TERMINAL_HEADER = ("category", "image\nAUROC", "pixel\nAUROC", "AUPRO", "FA per\n1,000", "recall", "train\ns", "img/s")


def _summary_cells(row: dict[str, Any]) -> list[str]:
    return [row["category"], *[fmt(row.get(c)) for c in METRIC_COLUMNS], *_decision_cells(row),
            fmt(row.get("train_s"), 1), fmt(row.get("infer_img_s"), 1)]


def _decision_cells(row: dict[str, Any]) -> list[str]:
    return [fmt(row.get("threshold"), 4), fmt(row.get("false_alarms_per_1000"), 1), fmt(row.get("recall"))]


def _terminal_cells(row: dict[str, Any]) -> list[str]:
    return [row["category"], *[fmt(row.get(c)) for c in ("image_auroc", "pixel_auroc", "aupro")],
            *_decision_cells(row)[1:], fmt(row.get("train_s"), 1), fmt(row.get("infer_img_s"), 1)]


def normal_images(n_normal: int, n_left_out: int | None = None) -> str:
    """What an fpr threshold's normal scores came from: "57 normal validation images", and "+ 514 training images
    left out" where left-out scores were pooled (ThresholdFit.n_left_out)."""
    left_out = n_left_out or 0
    text = f"{n_normal - left_out} normal validation images"
    return text + (f" + {left_out} training images left out" if left_out else "")


def threshold_line(fit: Any) -> str:
    """A ThresholdFit in one line: the threshold, its policy and what the validation images say of it."""
    line = f"threshold {fit.threshold:.6g} ({fit.policy})"
    if fit.val_false_alarms is not None:
        line += (f": {fit.val_false_alarms} of {normal_images(fit.n_normal, fit.n_left_out)} flagged, false-alarm rate "
                 f"<= {fit.val_fpr_upper:.3g} at 95 % confidence")
    if fit.val_recall is not None:
        line += f", {fit.val_recall:.0%} of {fit.n_anomalous} defective validation images caught"
    return line


def print_summary(results: list[dict[str, Any]], title: str) -> None:
    """One row per category and their mean: the five metrics, the decision threshold with its false alarms per
    1,000 good test parts and recall, training seconds and inference rate; then each threshold's validation
    record."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in TERMINAL_HEADER:
        table.add_column(column, justify="left" if column == "category" else "right", no_wrap=True)
    for row in results + [mean_row(results)]:
        table.add_row(*_terminal_cells(row))
    Console().print(table)
    for row in results:
        if row.get("threshold_policy"):
            console.say(f"{row['category']}: threshold {row['threshold']:.6g} ({row['threshold_policy']}) fitted on "
                f"{normal_images(row['val_normal'], row.get('val_left_out'))}: {row['val_false_alarms']} flagged, false-alarm rate "
                f"<= {row['val_fpr_upper95']:.3g} (95 %); on the test split {fmt(row['false_alarms_per_1000'], 1)} "
                f"false alarms per 1,000 good parts, {fmt(row['recall'])} of defective parts caught")


def summary_markdown(results: list[dict[str, Any]]) -> str:
    """The summary table as Markdown (summary.md)."""
    lines = ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(_summary_cells(row)) + " |" for row in results + [mean_row(results)]]
    return "\n".join(lines) + "\n"


def bench_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The bench table: configurations (columns) and rows of cells, one per category ("image AUROC (pixel
    AUROC)") then mean, delta to the first configuration, summed training seconds and mean inference rate."""
    configurations = list(dict.fromkeys(r["configuration"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    lookup = {(r["category"], r["configuration"]): r for r in rows}
    body = []
    for category in categories:
        cells = [f"{fmt(lookup.get((category, c), {}).get('image_auroc'))} "
                 f"({fmt(lookup.get((category, c), {}).get('pixel_auroc'))})" for c in configurations]
        body.append([category, *cells])

    def present(c: str) -> list[dict[str, Any]]:
        return [lookup[(k, c)] for k in categories if (k, c) in lookup]

    means = {c: float(np.nanmean([r["image_auroc"] for r in present(c)])) for c in configurations}
    first = configurations[0]
    train = {c: float(np.nansum([r["train_s"] for r in present(c) if isinstance(r.get("train_s"), float)]))
             for c in configurations}
    rates = {c: [r["infer_img_s"] for r in present(c) if "infer_img_s" in r] for c in configurations}
    body.append(["mean", *[fmt(means[c]) for c in configurations]])
    body.append(["delta", *[f"{means[c] - means[first]:+.3f}" for c in configurations]])
    body.append(["train s (sum)", *[fmt(train[c], 1) for c in configurations]])
    # ensembles have no inference rate of their own
    body.append(["infer img/s (mean)", *[fmt(float(np.mean(rates[c])) if rates[c] else float("nan"), 1)
                                         for c in configurations]])
    return configurations, body


def print_bench(rows: list[dict[str, Any]]) -> None:
    configurations, body = bench_cells(rows)
    table = Table(title="image AUROC (pixel AUROC) per category and configuration")
    table.add_column("category")
    for c in configurations:
        table.add_column(c, justify="right")
    for cells in body:
        table.add_row(*cells)
    Console().print(table)


def bench_markdown(rows: list[dict[str, Any]]) -> str:
    configurations, body = bench_cells(rows)
    lines = ["| category | " + " | ".join(configurations) + " |", "|---" * (len(configurations) + 1) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"
