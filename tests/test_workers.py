"""``adkit run`` trains categories side by side in worker processes on a CPU (``--workers``)."""

from __future__ import annotations

import json

import pytest
import torch

TINY = "synthetic:size=32,n_train=8,n_test=6"


def _run(invoke, out, workers):
    return invoke("run", "--detector", "draem:recon_width=2,disc_width=2", "--data", TINY, "--category", "tile",
                  "--category", "wood", "--image-size", "32", "--steps", "3", "--batch-size", "2", "--out", str(out),
                  "--workers", str(workers))


def test_categories_in_workers_give_what_one_after_the_other_gives(invoke, tmp_path, monkeypatch):
    """Each category's training draws from seeds of its own, so with the same threads per process (one) the
    workers reach the same weights, scores and thresholds as a single process."""
    monkeypatch.setenv("ADKIT_THREADS", "1")
    code, _, err = _run(invoke, tmp_path / "two", 2)
    assert code == 0, err
    assert "2 categories, 2 at a time" in err
    code, _, err = _run(invoke, tmp_path / "one", 1)
    assert code == 0, err
    for category in ("tile", "wood"):
        two = json.loads((tmp_path / "two" / category / "metrics.json").read_text())
        one = json.loads((tmp_path / "one" / category / "metrics.json").read_text())
        for key in ("image_auroc", "pixel_auroc", "aupro", "threshold"):
            assert two[key] == one[key], (category, key)
        a = torch.load(tmp_path / "two" / category / "checkpoint.pt", weights_only=False)["model"]
        b = torch.load(tmp_path / "one" / category / "checkpoint.pt", weights_only=False)["model"]
        assert all(torch.equal(a[k], b[k]) for k in b)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [row["category"] for row in summary["results"]] == ["tile", "wood"]  # the categories' order
    assert (tmp_path / "two" / "report.html").is_file()


def test_a_category_failing_in_its_worker_is_a_one_line_error(invoke, tmp_path, monkeypatch):
    monkeypatch.setenv("ADKIT_THREADS", "1")
    root = tmp_path / "data"
    code, _, err = invoke("synth", "--out", str(root), "--category", "tile", "--category", "wood", "--size", "32",
                          "--train", "4", "--test", "4")
    assert code == 0, err
    broken = root / "wood" / "train" / "good" / "001.png"
    broken.write_bytes(b"not a png")
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "mvtec", "--root", str(root),
                          "--category", "tile", "--category", "wood", "--image-size", "32",
                          "--out", str(tmp_path / "run"), "--workers", "2")
    assert code != 0 and "001.png" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "report.html").exists()


@pytest.mark.parametrize("value", ["0", "two"])
def test_bad_worker_counts_are_one_line_errors(invoke, tmp_path, monkeypatch, value):
    monkeypatch.setenv("ADKIT_WORKERS", value)
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile",
                          "--image-size", "32", "--out", str(tmp_path / "run"))
    assert code != 0 and f"ADKIT_WORKERS={value}: give a positive number" in err
