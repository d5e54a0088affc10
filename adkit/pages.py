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

from adkit import report
from adkit.errors import AdkitError
from adkit.render import fmt

PAGE = "report.html"
THUMBS = "thumbs"
METRICS = (("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("image_f1max", "image F1-max"),
           ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP"), ("aupro", "AUPRO@0.3"),
           ("threshold", "threshold"), ("infer_img_s", "img/s"))
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f3f3f3; cursor: default; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.sortable { cursor: pointer; } .figures img { max-width: 32%; margin-right: 1%; vertical-align: top; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; } .gallery figure { margin: 0; font-size: .75em; }
.gallery img { display: block; height: 96px; } .miss { outline: 3px solid #d00; } .ok { outline: 1px solid #ccc; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; }
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
    report.write_text_atomic(folder / PAGE, page)
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
                    [[html.escape(r["category"]), *[fmt(r.get(k), 1 if k == "infer_img_s" else 3) for k, _ in METRICS]]
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
    figures = [f"{rel}/{name}" for name in ("roc.png", "pro.png") if (folder / name).is_file()]
    if rows and threshold is not None:
        _score_histogram(rows, float(threshold), folder / "scores.png", result["category"])
        figures.append(f"{rel}/scores.png")
    if (folder / "history.csv").is_file() and _history_plot(folder / "history.csv", folder / "history.png",
                                                             result["category"]):
        figures.append(f"{rel}/history.png")
    summary = (f"<p>{result.get('n_test', len(rows))} test images, {result.get('n_anomalous', '?')} defective; "
               f"image AUROC {fmt(result.get('image_auroc'))}, pixel AUROC {fmt(result.get('pixel_auroc'))}; "
               f"threshold {fmt(threshold, 4)}.</p>")
    parts = [f"<h2 id='{html.escape(anchor or result['category'])}'>{category}</h2>", summary,
             "<div class='figures'>" + "".join(f"<img src='{html.escape(f)}' alt='{html.escape(f)}'>"
                                               for f in figures) + "</div>"]
    if rows:
        parts.append(_gallery(folder, rel, rows, threshold))
    return "\n".join(parts)


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
        name = Path(row["path"]).name
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


def _score_histogram(rows: list[dict[str, str]], threshold: float, path: Path, category: str) -> None:
    """Scores of normal and defective test images, and the threshold."""
    figure, axes = report.new_figure(420, 320)
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([r.get("label", "") for r in rows])
    bins = np.histogram_bin_edges(scores, bins=min(40, max(5, len(scores) // 4)))
    for value, name, colour in (("0", "normal", "tab:blue"), ("1", "defective", "tab:red")):
        if (labels == value).any():
            axes.hist(scores[labels == value], bins=bins, alpha=0.6, label=name, color=colour)
    axes.axvline(threshold, color="black", linestyle="--", label="threshold")
    axes.set(title=f"test scores, {category}", xlabel="image score", ylabel="images")
    axes.legend(fontsize=8)
    report.save_figure_atomic(figure, path)


def _history_plot(source: Path, path: Path, category: str) -> bool:
    """Every logged training value against the step (False when the log is empty)."""
    rows = _read_scores(source)
    if not rows:
        return False
    figure, axes = report.new_figure(420, 320)
    steps = [float(r["step"]) for r in rows]
    for key in rows[0]:
        if key != "step":
            axes.plot(steps, [float(r[key]) if r[key] else np.nan for r in rows], label=key)
    axes.set(title=f"training, {category}", xlabel="step")
    axes.legend(fontsize=8)
    report.save_figure_atomic(figure, path)
    return True


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
    sections = [_category_section(folder, r["folder"], r, title=f"{r['configuration']}: {r['category']}",
                                  anchor=_anchor(r))
                for r in rows if r.get("folder") and (folder / r["folder"] / "metrics.json").is_file()]
    return "\n".join([
        f"<h2>Per configuration and category (delta: image AUROC against {html.escape(configurations[0])})</h2>",
        "<p>Click a column to sort.</p>",
        _table(["configuration", "category", "image AUROC", "delta", "pixel AUROC", "AUPRO@0.3", "train s", "img/s"],
               table_rows, sortable=True),
        "<h2>Mean image AUROC per configuration</h2>", _table(["configuration", "mean image AUROC"], means),
        *sections])


def _anchor(row: dict[str, Any]) -> str:
    return "run-" + "".join(c if c.isalnum() else "-" for c in f"{row['configuration']}-{row['category']}")


def _predict_page(folder: Path) -> str:
    rows = _read_scores(folder / "scores.csv")
    decided = any(r.get("prediction") in ("0", "1") for r in rows)
    flagged = sum(r.get("prediction") == "1" for r in rows)
    head = (f"<h2>{len(rows)} scored images</h2><p>" + (f"{flagged} anomalous at the recorded threshold. "
                                                         if decided else "No threshold: no decisions. ")
            + "Highest score first.</p>")
    return head + _gallery(folder, "", rows, None)


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """A headless-capable Chromium on the PATH, or None."""
    import shutil

    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1800) -> float:
    """Render ``page`` in headless Chromium and save the top ``width`` x ``height`` px to ``png``; returns the
    seconds it took (browser start included)."""
    import subprocess
    import time

    browser = find_browser()
    if browser is None:
        raise AdkitError("--screenshot needs Chromium on the PATH (Debian: apt install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                             f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
                             page.resolve().as_uri()], capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0 or not png.is_file():
        raise AdkitError(f"{browser} could not render {page}: {result.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def write_thumbnail(panel: Any, path: Path, height: int = 96) -> None:
    """A small JPEG of an overlay panel for the report's gallery."""
    width = max(1, round(panel.width * height / panel.height))
    with report.atomic_path(path, suffix=".jpg") as tmp:
        panel.convert("RGB").resize((width, height)).save(tmp, format="JPEG", quality=85)

