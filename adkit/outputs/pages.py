"""report.html: one self-contained page per run, test, bench and predict folder, built from the files already
there (``adkit report DIR`` rebuilds it). No server and no network: pictures are files of the folder referenced
by relative paths, so the page still works when the folder is zipped and mailed. Plots are drawn with matplotlib.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from adkit.core import files
from adkit.core.errors import AdkitError
from adkit.outputs import report
from adkit.outputs.render import fmt, normal_images

PAGE = "report.html"
THUMBS = "thumbs"
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
        body = _bench_page(folder)
    elif (folder / "summary.json").is_file():
        body = _run_page(folder)
    elif (folder / "scores.csv").is_file():
        body = _predict_page(folder)
    else:
        raise AdkitError(f"{folder} holds no adkit results (summary.json, bench.json or scores.csv): give the "
                         "--out folder of adkit run, test, bench or predict")
    title = html.escape(f"adkit report: {folder.name}")
    page = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>\n<h1>{title}</h1>\n{body}\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")
    files.write_text_atomic(folder / PAGE, page)
    return folder / PAGE


def _table(header: list[str], rows: list[list[str]], sortable: bool = False) -> str:
    cls = " class='sortable'" if sortable else ""
    head = "".join(f"<th{cls}>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if _numeric(c) else f"<td>{c}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _numeric(cell: str) -> bool:
    try:
        float(cell.lstrip("+"))
    except ValueError:
        return False
    return True


def _read_scores(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _run_page(folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    results = summary["results"]
    parts = ["<h2>Metrics (test split; thresholds fitted on the validation split)</h2>",
             _table(["category", *[label for _, label in METRICS]],
                    [[html.escape(r["category"]), *[html.escape(fmt(r.get(k), DIGITS.get(k, 3))) for k, _ in METRICS]]
                     for r in results], sortable=True)]
    for result in results:
        parts.append(_category_section(folder, result["category"], result))
    config = summary.get("config", {})
    if (folder / "config.toml").is_file():
        config_text = (folder / "config.toml").read_text()
    else:
        config_text = json.dumps(config, indent=1, default=str)
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>")
    return "\n".join(parts)


def _category_section(page_folder: Path, rel: str, result: dict[str, Any], title: str | None = None,
                      anchor: str | None = None) -> str:
    """One category's results: ``rel`` is its folder relative to the page's."""
    folder = page_folder / rel
    category = html.escape(title or result["category"])
    rows = _read_scores(folder / "scores.csv") if (folder / "scores.csv").is_file() else []
    threshold = result.get("threshold")
    validation = _read_json(folder / "validation.json")
    band = tuple((validation or {}).get("fit", {}).get(k) for k in ("band_low", "band_high"))
    figures = [f"{rel}/{name}" for name in ("roc.png", "pro.png") if (folder / name).is_file()]
    if rows and threshold is not None:
        report.score_histogram(rows, float(threshold), band, folder / "scores.png", result["category"])
        figures.append(f"{rel}/scores.png")
    if (folder / "history.csv").is_file() and report.history_plot(folder / "history.csv", folder / "history.png",
                                                             result["category"]):
        figures.append(f"{rel}/history.png")
    summary = (f"<p>{result.get('n_test', len(rows))} test images, {result.get('n_anomalous', '?')} defective; "
               f"image AUROC {fmt(result.get('image_auroc'))}, pixel AUROC {fmt(result.get('pixel_auroc'))}; "
               f"threshold {fmt(threshold, 4)}{_decision_text(result)}.{_defects_text(result)}</p>" +
               _left_out_text(validation) + _approximations_text(result) + _lineage_text(result))
    parts = [f"<h2 id='{html.escape(anchor or result['category'])}'>{category}</h2>", summary,
             "<div class='figures'>" + "".join(f"<img src='{html.escape(f)}' alt='{html.escape(f)}'>"
                                               for f in figures) + "</div>"]
    if rows and validation is not None:
        parts.append(_slider(folder, rows, validation))
    if rows:
        parts.append(_gallery(folder, rel, rows, threshold))
    return "\n".join(parts)


def _defects_text(result: dict[str, Any]) -> str:
    """How many labelled defects the detector learned from (a dataset's train_defects); they are not tested on."""
    count = result.get("train_defects") or 0
    if not count:
        return ""
    return (f" The model learned from {count} labelled defective images ({result.get('train_defects_masked', 0)} "
            "with masks), which are not among the test images.")


def _left_out_text(validation: dict[str, Any] | None) -> str:
    """Whether the threshold pooled training images scored as if left out, and what the check measured."""
    verdict = ((validation or {}).get("fit") or {}).get("left_out")
    return f"<p class='left-out'>Left-out training scores: {html.escape(verdict)}.</p>" if verdict else ""


def _approximations_text(result: dict[str, Any]) -> str:
    """The detector's approximate paths and what they measured against the exact ones (its search, ...)."""
    records = result.get("approximations") or {}
    items = "".join(f"<li>{html.escape(name)}: {html.escape(record.get('summary', ''))}</li>"
                    for name, record in records.items())
    return f"<p class='approximations'>Approximations, checked against the exact path:</p><ul>{items}</ul>" \
        if items else ""


def _lineage_text(result: dict[str, Any]) -> str:
    """The updates (adkit update) the model went through, oldest first."""
    steps = result.get("lineage") or []
    items = "".join(f"<li>{html.escape(str(step.get('at', '?')))}: {step.get('added', '?')} good images added "
                    f"({step.get('held_out', 0)} held out)"
                    + (f", {step['defects_added']} labelled defects learned from" if step.get("defects_added") else "")
                    + ", parent sha256 "
                    f"{html.escape(str(step.get('parent_sha256', '?'))[:12])}</li>" for step in steps)
    return f"<p class='lineage'>Lineage: fitted, then updated {len(steps)} time(s):</p><ul>{items}</ul>" if items else ""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _decision_text(result: dict[str, Any]) -> str:
    """What the threshold means in parts, for a category's summary line."""
    if result.get("threshold_policy") is None:
        return ""
    by_defect = ", ".join(f"{html.escape(d)} {fmt(r)}" for d, r in result.get("recall_by_defect", {}).items())
    return (f" ({html.escape(result['threshold_policy'])}; on "
            f"{normal_images(result['val_normal'], result.get('val_left_out'))} "
            f"{result['val_false_alarms']} false alarms, rate &le; {fmt(result['val_fpr_upper95'])} at 95 % "
            f"confidence). On the test split: {fmt(result['false_alarms_per_1000'], 1)} false alarms per 1,000 good "
            f"parts, {fmt(result['recall'])} of defective parts caught" + (f" ({by_defect})" if by_defect else ""))


def _slider(folder: Path, rows: list[dict[str, str]], validation: dict[str, Any]) -> str:
    """A threshold slider over the score axis: false alarms per 1,000 good parts (validation and test) and recall
    per defect type as it moves, and the command that sets that threshold. Data and script are inline."""
    test = [[float(r["score"]), int(r["label"]), _defect(r)] for r in rows if r.get("label") in ("0", "1")]
    val = [[float(s), int(label)] for s, label in zip(validation["val_scores"], validation["val_labels"])]
    val += [[float(s), 0] for s in validation.get("left_out_scores", [])]  # pooled with them (thresholds.md)
    every = [r[0] for r in test] + [r[0] for r in val]
    if not every:
        return ""
    low, high = min(every), max(every)
    pad = (high - low) * 0.05 or max(abs(high), 1e-6) * 0.05
    defects = sorted({r[2] for r in test if r[1] == 1})
    checkpoint = folder / "checkpoint.pt"
    where = str(checkpoint.resolve()) if checkpoint.is_file() else "CKPT"
    data = {"val": val, "test": test, "defects": defects,
            "command": f"adkit predict --checkpoint {where} --threshold value:X IMAGES"}
    rows_html = [("threshold", "threshold"), ("val", "false alarms per 1,000 good validation parts"),
                 ("test", "false alarms per 1,000 good test parts"), ("recall", "defective test parts caught")]
    rows_html += [(f"defect-{d}", f"caught: {d}") for d in defects]
    table = "".join(f"<tr><td>{html.escape(label)}</td><td class='num' data-cell='{html.escape(key)}'></td></tr>"
                    for key, label in rows_html)
    payload = json.dumps(data).replace("</", "<\\/")
    return (f"<div class='slider'><b>Move the threshold</b> (fitted: {validation['threshold']:.6g}, "
            f"{html.escape(str(validation.get('policy')))})"
            f"<input type='range' min='{low - pad!r}' max='{high + pad!r}' step='any' "
            f"value='{float(validation['threshold'])!r}'><table>{table}</table><code></code>"
            f"<script type='application/json'>{payload}</script></div>")


def _defect(row: dict[str, str]) -> str:
    """A test image's defect type: the folder it lies in (MVTec layout), "good" for normal images."""
    return "good" if row.get("label") == "0" else Path(row["path"]).parent.name


def _gallery(folder: Path, rel: str, rows: list[dict[str, str]], threshold: float | None) -> str:
    """Test images by score, highest first; misses at the threshold (defective images scored normal, normal
    images flagged) first of all."""
    for index, row in enumerate(rows):
        row["index"] = str(index)

    def missed(row: dict[str, str]) -> bool:
        return row.get("label") in ("0", "1") and row.get("prediction") in ("0", "1") and \
            row["label"] != row["prediction"]

    ordered = sorted(rows, key=lambda r: (not missed(r), -float(r["score"])))
    misses = sum(missed(r) for r in rows)
    cards = []
    for row in ordered:
        thumb = f"{THUMBS}/{int(row['index']):05d}.jpg"
        name = "/".join(Path(row["path"]).parts[-2:])  # good/015.png and scratch/015.png are different images
        label = {"0": "normal", "1": "defective"}.get(row.get("label", ""), "")
        decision = {"0": "normal", "1": "anomalous"}.get(row.get("prediction", ""), "")
        kind = "miss" if missed(row) else "ok"
        picture = (f"<img loading='lazy' src='{html.escape(rel + '/' + thumb if rel else thumb)}' "
                   f"alt='{html.escape(name)}'>") if (folder / thumb).is_file() else ""
        cards.append(f"<figure class='{kind}'>{picture}<figcaption>{html.escape(name)}<br>{label}"
                     f"{' -> ' + decision if decision else ''} · {float(row['score']):.4g}</figcaption></figure>")
    head = (f"<p>{len(rows)} images by score, highest first"
            + (f"; the {misses} misses at the threshold (outlined) first" if threshold is not None else "")
            + ". Each picture: input, ground truth (where known), heatmap, pixels above the 99th percentile of normal images' maps.</p>")
    return head + "<div class='gallery'>" + "".join(cards) + "</div>"


def _bench_page(folder: Path) -> str:
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
    sections = [_category_section(folder, r["folder"], r, title=f"{r['configuration']}: {r['category']}",
                                  anchor=_anchor(r)) for r in with_files]
    trainings: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in with_files:  # the re-scoring combinations of one trained model
        if r.get("trained_in"):
            trainings.setdefault((r["trained_in"], r["category"]), []).append(r)
    side = [_side_by_side(folder, group) for group in trainings.values() if len(group) > 1]
    return "\n".join([
        f"<h2>Per configuration and category (delta: image AUROC against {html.escape(configurations[0])})</h2>",
        "<p>Click a column to sort.</p>",
        _table(["configuration", "category", "image AUROC", "delta", "pixel AUROC", "AUPRO@0.3", "train s", "img/s"],
               table_rows, sortable=True),
        "<h2>Mean image AUROC per configuration</h2>", _table(["configuration", "mean image AUROC"], means),
        *side, *sections])


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
    rows = _read_scores(first / "scores.csv") if (first / "scores.csv").is_file() else []
    picked = round_robin([_defect(row) for row in rows], count)
    scores = {r["folder"]: _read_scores(page_folder / r["folder"] / "scores.csv") for r in group}
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
    rows = _read_scores(folder / "scores.csv")
    decided = any(r.get("prediction") in ("0", "1") for r in rows)
    flagged = sum(r.get("prediction") == "1" for r in rows)
    decision = _read_json(folder / "decision.json") or {}
    at = (f"threshold {decision['threshold']:.6g} ({html.escape(str(decision.get('policy')))})"
          if decision.get("threshold") is not None else "the recorded threshold")
    head = (f"<h2>{len(rows)} scored images</h2><p>" + (f"{flagged} anomalous at {at}. "
                                                         if decided else "No threshold: no decisions. ")
            + "Highest score first.</p>")
    return head + _gallery(folder, "", rows, None)
