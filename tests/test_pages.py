"""report.html: every picture it references exists, its table numbers are those of metrics.json / bench.json,
misses come first in the gallery, and adkit report rebuilds the same page."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

TINY = "synthetic:size=32,n_train=8,n_test=12"


class Page(HTMLParser):
    """The pictures, tables (rows of cell texts) and gallery figures (their classes) of a page."""

    def __init__(self, path: Path):
        super().__init__()
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.figures: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self._cell: list[str] | None = None
        self.feed(path.read_text())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "figure":
            self.figures.append(attrs.get("class", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_run_page_shows_what_the_files_hold(invoke, tmp_path):
    out = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile", "--category",
                          "wood", "--image-size", "32", "--out", str(out))
    assert code == 0, err
    page = Page(out / "report.html")
    assert page.images and all((out / src).is_file() for src in page.images)
    header, *rows = page.tables[0]
    assert header[:3] == ["category", "image AUROC", "image AP"]
    for row in rows:
        metrics = json.loads((out / row[0] / "metrics.json").read_text())
        assert row[1] == f"{metrics['image_auroc']:.3f}" and row[4] == f"{metrics['pixel_auroc']:.3f}"
        assert row[6] == f"{metrics['aupro']:.3f}" and row[7] == f"{metrics['threshold']:.4f}"
        assert row[8] == metrics["threshold_policy"] == "fpr:0.01"
        assert row[9] == f"{metrics['false_alarms_per_1000']:.1f}" and row[10] == f"{metrics['recall']:.3f}"
    misses = 0
    for category in ("tile", "wood"):
        with open(out / category / "scores.csv") as handle:
            misses += sum(r["label"] != r["prediction"] for r in csv.DictReader(handle))
    assert len(page.figures) == 24 and page.figures.count("miss") == misses
    tile = page.figures[:12]  # the tile gallery: its misses first
    assert tile == sorted(tile, key=lambda kind: kind != "miss")
    before = (out / "report.html").read_text()
    (out / "report.html").unlink()
    code, _, err = invoke("report", str(out))
    assert code == 0, err
    assert (out / "report.html").read_text() == before


def test_bench_and_predict_pages(invoke, tmp_path):
    out = tmp_path / "ens"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--detector", "pixel-gauss:min_std=0.1", "--data",
                          TINY, "--category", "tile", "--image-size", "32", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "bench.json").read_text())
    table = Page(out / "report.html").tables[0]
    assert len(table) == 1 + len(rows)
    for cells, row in zip(table[1:], rows):
        assert cells[0] == row["configuration"] and cells[2] == f"{row['image_auroc']:.3f}"
    page = Page(out / "report.html")  # each detector's row links to its section: curves and gallery
    assert len(page.links) == 2 and all(link.startswith("#") and link[1:] in page.ids for link in page.links)
    assert page.images and all((out / src).is_file() for src in page.images)
    code, _, err = invoke("predict", "--checkpoint", str(out / "pixel-gauss-1" / "tile" / "checkpoint.pt"),
                          str(out / "pixel-gauss-1" / "tile" / "overlays"), "--out", str(tmp_path / "p"))
    assert code == 0, err
    page = Page(tmp_path / "p" / "report.html")
    assert page.images and all((tmp_path / "p" / src).is_file() for src in page.images)
    with open(tmp_path / "p" / "scores.csv") as handle:
        scores = sorted((float(r["score"]) for r in csv.DictReader(handle)), reverse=True)
    assert len(page.figures) == len(scores)
    code, _, err = invoke("report", str(tmp_path))
    assert code == 2 and "holds no adkit results" in err


def test_the_page_renders_in_chromium(invoke, tmp_path):
    from PIL import Image

    from adkit.outputs.screenshots import find_browser

    if find_browser() is None:
        pytest.skip("Chromium is not installed (Debian: apt install chromium); .ci/run installs it when it can")
    out = tmp_path / "run"
    assert invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile", "--image-size", "32",
                  "--out", str(out))[0] == 0
    code, stdout, err = invoke("report", str(out), "--screenshot", str(tmp_path / "shot.png"))
    assert code == 0, err
    assert "rendered it to" in stdout
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("L"), dtype=float)
    assert shot.shape == (1800, 1280) and shot.std() > 10  # a page with content, not a blank or an error page
