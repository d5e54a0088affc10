"""The parts of report.html that show one category's results: its summary (metrics, decisions, labelled defects,
left-out scores, approximations, lineage), the threshold slider and the gallery of test images; and the table and
file readers every page uses (adkit.outputs.pages puts the pages together)."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

from adkit.outputs import report
from adkit.outputs.render import fmt, normal_images

THUMBS = "thumbs"


def table(header: list[str], rows: list[list[str]], sortable: bool = False) -> str:
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


def read_scores(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows (scores.csv, history.csv) as dicts of text."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def category_section(page_folder: Path, rel: str, result: dict[str, Any], title: str | None = None,
                     anchor: str | None = None) -> tuple[str, dict[str, bytes]]:
    """One category's results: ``rel`` is its folder relative to the page's. Returns the section's HTML and the
    figures it draws (their paths relative to the page's folder -> PNG bytes), for the page's writer."""
    folder = page_folder / rel
    category = html.escape(title or result["category"])
    rows = read_scores(folder / "scores.csv") if (folder / "scores.csv").is_file() else []
    threshold = result.get("threshold")
    validation = read_json(folder / "validation.json")
    band = tuple((validation or {}).get("fit", {}).get(k) for k in ("band_low", "band_high"))
    history = read_scores(folder / "history.csv") if (folder / "history.csv").is_file() else []
    histogram = bool(rows) and threshold is not None
    figures = [f"{rel}/{name}" for name in ("roc.png", "pro.png") if (folder / name).is_file()]
    figures += [f"{rel}/scores.png"] * histogram + [f"{rel}/history.png"] * bool(history)
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
        parts.append(gallery(folder, rel, rows, threshold))
    drawn: dict[str, bytes] = {}  # the figures this section draws (roc.png and pro.png are the run's)
    if histogram:
        drawn[f"{rel}/scores.png"] = report.score_histogram(rows, float(threshold), band, result["category"])
    if history:
        drawn[f"{rel}/history.png"] = report.history_plot(history, result["category"])
    return "\n".join(parts), drawn


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


def read_json(path: Path) -> Any:
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
    test = [[float(r["score"]), int(r["label"]), defect_type(r)] for r in rows if r.get("label") in ("0", "1")]
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


def defect_type(row: dict[str, str]) -> str:
    """A test image's defect type: the folder it lies in (MVTec layout), "good" for normal images."""
    return "good" if row.get("label") == "0" else Path(row["path"]).parent.name


def gallery(folder: Path, rel: str, rows: list[dict[str, str]], threshold: float | None) -> str:
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
