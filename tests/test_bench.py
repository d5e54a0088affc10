from __future__ import annotations

import csv
import json


def test_bench_grid_trains_once_and_rescores(invoke, tmp_path):
    out = tmp_path / "bench"
    code, stdout, err = invoke("bench", "synthetic:size=32,n_train=8,n_test=6", "--categories", "carpet,tile",
                               "--detector", "draem:recon_width=4,disc_width=4", "--image-size", "32",
                               "--steps", "2", "--batch-size", "2",
                               "--grid", "post=avgpool:kernel=5,freqmask", "--grid", "scorer=max,maxmin",
                               "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "bench.json").read_text())
    assert len(rows) == 2 * 4
    configurations = list(dict.fromkeys(r["configuration"] for r in rows))
    assert configurations == ["post=avgpool:kernel=5 scorer=max", "post=avgpool:kernel=5 scorer=maxmin",
                              "post=freqmask scorer=max", "post=freqmask scorer=maxmin"]
    # one training per category: re-scoring must not retrain
    assert len(list(out.rglob("checkpoint.pt"))) == 2
    table = (out / "bench.md").read_text()
    assert "| carpet |" in table and "| mean |" in table and "| delta | +0.000 |" in table
    assert "| train s (sum) |" in table and "| infer img/s (mean) |" in table
    with open(out / "bench.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    assert "carpet" in stdout and "delta" in stdout
    # every combination has its own files beside its training's checkpoint: curves, scores, gallery
    for row in rows:
        files = out / row["folder"]
        assert (files / "metrics.json").is_file() and (files / "scores.csv").is_file(), row["folder"]
        assert (out / row["trained_in"] / "checkpoint.pt").is_file()
        written = json.loads((files / "metrics.json").read_text())
        assert written["image_auroc"] == row["image_auroc"]
        assert written["image_score"] == row["configuration"].split("scorer=")[1]  # the combination's scorer
    assert len({row["folder"] for row in rows}) == 8
    page = (out / "report.html").read_text()
    for category in ("carpet", "tile"):  # the four combinations' maps next to each other, per category
        assert f"{category}: the same model, the maps of every re-scoring combination side by side" in page
    side = page.split("combination side by side")[1].split("</table>")[0]
    assert side.count("<th>") == 1 + 4 and "post=freqmask scorer=maxmin" in side
    pictures = [src for src in side.split("src='")[1:]]
    assert pictures and all((out / src.split("'")[0]).is_file() for src in pictures)


def test_run_writes_curves_and_overlays_across_defects(invoke, tmp_path):
    out = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "synthetic:size=32,n_train=8,n_test=12",
                          "--category", "wood", "--image-size", "32", "--out", str(out))
    assert code == 0, err
    folder = out / "wood"
    assert (folder / "roc.png").stat().st_size > 0 and (folder / "pro.png").stat().st_size > 0
    defects = {p.name.split("-")[0] for p in (folder / "overlays").iterdir()}
    assert len(defects) >= 6  # round-robin over the six defect types, then normal images
    assert (out / "summary.md").read_text().startswith("| category |")


def test_bench_seed_axis_trains_once_per_seed(invoke, tmp_path):
    out = tmp_path / "seeds"
    common = ["synthetic:size=32,n_train=8,n_test=6", "--categories", "wood",
              "--detector", "draem:recon_width=8,disc_width=8", "--image-size", "32", "--steps", "3",
              "--batch-size", "2"]
    code, _, err = invoke("bench", *common, "--grid", "seed=0,1", "--scorer", "mean", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "bench.json").read_text())
    assert [r["configuration"] for r in rows] == ["seed=0", "seed=1"]
    assert len(list(out.rglob("checkpoint.pt"))) == 2
    assert rows[0]["threshold"] != rows[1]["threshold"]  # different trainings, not one scored twice
    code, _, err = invoke("bench", *common, "--grid", "seed=a", "--out", str(tmp_path / "bad"))
    assert code != 0 and "seeds are non-negative integers" in err


def test_grid_values_follow_the_one_spec_grammar():
    from adkit.app.bench import parse_grid, post_chain
    from adkit.core.grammar import split_chain

    assert split_chain("freqmask:kernels=3+5", "t") == ["freqmask:kernels=3+5"]  # a list value, not a chain
    assert split_chain("avgpool:kernel=21+gaussian", "t") == ["avgpool:kernel=21", "gaussian"]
    assert split_chain("(freqmask:kernels=3+5,weight=0.5)+gaussian", "t") == ["freqmask:kernels=3+5,weight=0.5",
                                                                              "gaussian"]
    axes = parse_grid(["post=freqmask:kernels=3+5,(freqmask:weight=0.5,stride=4)", "scorer=max,maxmin"])
    assert axes == {"post": ["freqmask:kernels=3+5", "freqmask:weight=0.5,stride=4"], "scorer": ["max", "maxmin"]}
    assert post_chain("none") == [] and post_chain("avgpool+gaussian") == ["avgpool", "gaussian"]


def test_bench_grid_runs_nested_specs_and_refuses_a_misspelled_value_before_training(invoke, tmp_path):
    common = ["synthetic:size=32,n_train=6,n_test=4", "--categories", "carpet", "--detector", "pixel-gauss",
              "--image-size", "32"]
    out = tmp_path / "grid"
    code, _, err = invoke("bench", *common, "--grid", "post=freqmask:kernels=3+5,(freqmask:weight=0.5,stride=4)",
                          "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "bench.json").read_text())
    assert [r["configuration"] for r in rows] == ["post=freqmask:kernels=3+5", "post=freqmask:weight=0.5,stride=4"]
    code, _, err = invoke("bench", *common, "--grid", "post=avgpool,freqmsk", "--out", str(tmp_path / "bad"))
    assert code == 2 and "unknown postprocessor 'freqmsk'" in err
    assert not (tmp_path / "bad").exists()  # refused before the output folder was claimed
