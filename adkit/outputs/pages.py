"""report.html: one self-contained page per run, test, bench and predict folder, built from the files already
there (``adkit report DIR`` rebuilds it). No server and no network: pictures are files of the folder referenced
by relative paths, so the page still works when the folder is zipped and mailed. Plots are drawn with matplotlib.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from adkit.core import files
from adkit.core.errors import AdkitError
from adkit.outputs.render import fmt
from adkit.outputs.sections import THUMBS, category_section, defect_type, gallery, read_json, read_scores, table

PAGE = "report.html"
METRICS = (("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("image_f1max", "image F1-max"),
           ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP"), ("aupro", "AUPRO@0.3"),
           ("threshold", "threshold"), ("threshold_policy", "policy"),
           ("false_alarms_per_1000", "false alarms / 1,000 good"), ("recall", "defects caught"),
           ("infer_img_s", "img/s"))
DIGITS = {"infer_img_s": 1, "false_alarms_per_1000": 1, "threshold": 4}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f3f3f3; cursor: default; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.sortable { cursor: pointer; } .figures img { max-width: 32%; margin-right: 1%; vertical-align: top; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; } .gallery figure { margin: 0; font-size: .75em; }
.gallery img, .side img { display: block; height: 96px; }
.miss { outline: 3px solid #d00; } .ok { outline: 1px solid #ccc; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; }
.slider { background: #f7f7f7; padding: .6em; margin: .6em 0; } .slider input { width: 100%; }
.slider code { display: block; margin-top: .4em; }
"""
# sorts a table by the clicked column (numbers numerically); inline, so the page needs nothing from a network
SORT_SCRIPT = """
for (const th of document.querySelectorAll("th.sortable")) {
  th.addEventListener("click", () => {
    const table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    const down = th.dataset.down !== "1"; th.dataset.down = down ? "1" : "0";
    const key = r => { const t = r.cells[i].innerText, v = parseFloat(t); return isNaN(v) ? t : v; };
    [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (down ? -1 : 1))
      .forEach(r => body.appendChild(r));
  });
}
// the threshold sliders: decisions are score > threshold, as the models decide
for (const box of document.querySelectorAll(".slider")) {
  const data = JSON.parse(box.querySelector("script").textContent), input = box.querySelector("input");
  const show = () => {
    const t = parseFloat(input.value), cells = {};
    const good = rows => rows.filter(r => r[1] === 0), bad = rows => rows.filter(r => r[1] === 1);
    const per1000 = rows => rows.length ? (1000 * rows.filter(r => r[0] > t).length / rows.length).toFixed(1) : "-";
    const caught = rows => rows.length ? (rows.filter(r => r[0] > t).length / rows.length).toFixed(3) : "-";
    cells.threshold = t.toPrecision(6);
    cells.val = per1000(good(data.val)) + " (" + good(data.val).length + " images)";
    cells.test = per1000(good(data.test)) + " (" + good(data.test).length + " images)";
    cells.recall = caught(bad(data.test)) + " (" + bad(data.test).length + " images)";
    for (const d of data.defects) cells["defect-" + d] = caught(bad(data.test).filter(r => r[2] === d));
    for (const el of box.querySelectorAll("[data-cell]")) el.textContent = cells[el.dataset.cell];
    box.querySelector("code").textContent = data.command.replace("X", t.toPrecision(6));
  };
  input.addEventListener("input", show);
  show();
}
"""


def build(folder: Path) -> Path:
    """Write ``folder``/report.html for the run, test, bench or predict results the folder holds."""
    folder = Path(folder)
    if (folder / "bench.json").is_file():
        body, figures = _bench_page(folder)
    elif (folder / "summary.json").is_file():
        return _write(folder, run_page_files(folder, json.loads((folder / "summary.json").read_text())))
    elif (folder / "scores.csv").is_file():
        body, figures = _predict_page(folder), {}
    else:
        raise AdkitError(f"{folder} holds no adkit results (summary.json, bench.json or scores.csv): give the "
                         "--out folder of adkit run, test, bench or predict")
    return _write(folder, {**figures, PAGE: _page(folder, body)})


def run_page_files(folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """report.html of a run or test folder whose summary (summary.json's content) is ``summary``, and the figures
    it draws: their paths in the folder -> content, the page last."""
    body, figures = _run_page(folder, summary)
    return {**figures, PAGE: _page(folder, body)}


def _page(folder: Path, body: str) -> str:
    title = html.escape(f"adkit report: {folder.name}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>\n<h1>{title}</h1>\n{body}\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


def _write(folder: Path, contents: dict[str, Any]) -> Path:
    files.write_files(folder, contents)  # the figures the page draws, then the page
    return folder / PAGE


def _run_page(folder: Path, summary: dict[str, Any]) -> tuple[str, dict[str, bytes]]:
    results = summary["results"]
    parts = ["<h2>Metrics (test split; thresholds fitted on the validation split)</h2>",
             table(["category", *[label for _, label in METRICS]],
                    [[html.escape(r["category"]), *[html.escape(fmt(r.get(k), DIGITS.get(k, 3))) for k, _ in METRICS]]
                     for r in results], sortable=True)]
    figures: dict[str, bytes] = {}
    for result in results:
        section, drawn = category_section(folder, result["category"], result)
        parts.append(section)
        figures.update(drawn)
    config = summary.get("config", {})
    if (folder / "config.toml").is_file():
        config_text = (folder / "config.toml").read_text()
    else:
        config_text = json.dumps(config, indent=1, default=str)
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>")
    return "\n".join(parts), figures


def _bench_page(folder: Path) -> tuple[str, dict[str, bytes]]:
    rows = json.loads((folder / "bench.json").read_text())
    configurations = list(dict.fromkeys(r["configuration"] for r in rows))
    first = {r["category"]: r for r in rows if r["configuration"] == configurations[0]}
    table_rows = []
    for r in rows:
        base = first.get(r["category"], {})
        delta = (r["image_auroc"] - base["image_auroc"]) if "image_auroc" in base and "image_auroc" in r else None
        name = html.escape(r["configuration"])
        if r.get("folder") and (folder / r["folder"] / "metrics.json").is_file():
            name = f"<a href='#{html.escape(_anchor(r))}'>{name}</a>"
        table_rows.append([name, html.escape(r["category"]), fmt(r.get("image_auroc")),
                           "-" if delta is None else f"{delta:+.3f}", fmt(r.get("pixel_auroc")), fmt(r.get("aupro")),
                           fmt(r.get("train_s"), 1), fmt(r.get("infer_img_s"), 1)])
    means = []
    for c in configurations:
        values = [r["image_auroc"] for r in rows if r["configuration"] == c and "image_auroc" in r]
        means.append([html.escape(c), fmt(float(np.mean(values)) if values else None)])
    with_files = [r for r in rows if r.get("folder") and (folder / r["folder"] / "metrics.json").is_file()]
    drawn = [category_section(folder, r["folder"], r, title=f"{r['configuration']}: {r['category']}",
                              anchor=_anchor(r)) for r in with_files]
    sections = [section for section, _ in drawn]
    figures = {path: picture for _, pictures in drawn for path, picture in pictures.items()}
    trainings: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in with_files:  # the re-scoring combinations of one trained model
        if r.get("trained_in"):
            trainings.setdefault((r["trained_in"], r["category"]), []).append(r)
    side = [_side_by_side(folder, group) for group in trainings.values() if len(group) > 1]
    return "\n".join([
        f"<h2>Per configuration and category (delta: image AUROC against {html.escape(configurations[0])})</h2>",
        "<p>Click a column to sort.</p>",
        table(["configuration", "category", "image AUROC", "delta", "pixel AUROC", "AUPRO@0.3", "train s", "img/s"],
               table_rows, sortable=True),
        "<h2>Mean image AUROC per configuration</h2>", table(["configuration", "mean image AUROC"], means),
        *side, *sections]), figures


def round_robin(defects: list[str], count: int) -> list[int]:
    """Indices of up to ``count`` images, taken round-robin over their defect types in name order, normal
    ("good") images last: the sample the overlays and the side-by-side view show."""
    groups: dict[str, list[int]] = {}
    for i, defect in enumerate(defects):
        groups.setdefault(defect, []).append(i)
    queues = [groups[k] for k in sorted(groups, key=lambda d: (d == "good", d))]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def _side_by_side(page_folder: Path, group: list[dict[str, Any]], count: int = 8) -> str:
    """One trained model's re-scoring combinations next to each other: a row per test image (defective images
    first, one defect type after another, then normal ones), a column per combination, each cell that
    combination's picture (input, truth, map, marked pixels) and score."""
    first = page_folder / group[0]["folder"]
    rows = read_scores(first / "scores.csv") if (first / "scores.csv").is_file() else []
    picked = round_robin([defect_type(row) for row in rows], count)
    scores = {r["folder"]: read_scores(page_folder / r["folder"] / "scores.csv") for r in group}
    header = ["image"] + [f"{html.escape(r['configuration'])}<br>image AUROC {fmt(r.get('image_auroc'))}"
                          for r in group]
    body = []
    for index in picked:
        name = "/".join(Path(rows[index]["path"]).parts[-2:])
        cells = [html.escape(name)]
        for r in group:
            thumb = f"{r['folder']}/{THUMBS}/{index:05d}.jpg"
            score = scores[r["folder"]][index]["score"] if index < len(scores[r["folder"]]) else "nan"
            picture = f"<img loading='lazy' src='{html.escape(thumb)}' alt='{html.escape(name)}'>" \
                if (page_folder / thumb).is_file() else ""
            cells.append(f"{picture}{float(score):.4g}")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    title = f"{group[0]['category']}: the same model, the maps of every re-scoring combination side by side"
    return (f"<h2 id='{html.escape(_anchor({'configuration': 'side', 'category': group[0]['trained_in']}))}'>"
            f"{html.escape(title)}</h2><table class='side'><tr>" + "".join(f"<th>{h}</th>" for h in header) +
            "</tr>" + "".join(body) + "</table>")


def _anchor(row: dict[str, Any]) -> str:
    return "run-" + "".join(c if c.isalnum() else "-" for c in f"{row['configuration']}-{row['category']}")


def _predict_page(folder: Path) -> str:
    rows = read_scores(folder / "scores.csv")
    decided = any(r.get("prediction") in ("0", "1") for r in rows)
    flagged = sum(r.get("prediction") == "1" for r in rows)
    decision = read_json(folder / "decision.json") or {}
    at = (f"threshold {decision['threshold']:.6g} ({html.escape(str(decision.get('policy')))})"
          if decision.get("threshold") is not None else "the recorded threshold")
    head = (f"<h2>{len(rows)} scored images</h2><p>" + (f"{flagged} anomalous at {at}. "
                                                         if decided else "No threshold: no decisions. ")
            + "Highest score first.</p>")
    return head + gallery(folder, "", rows, None)
