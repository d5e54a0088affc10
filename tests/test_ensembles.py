from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from adkit_plugins.ensembles.components import Maximum, RankMean, WeightedMean


def test_zscore_mean_hand_values():
    ensemble = WeightedMean(normalise="zscore", weights=(0.25, 0.75))
    ensemble.fit([torch.tensor([0.0, 2.0]), torch.tensor([10.0, 30.0])])
    # z = (s - mean) / std: detector 1 mean 1, std sqrt(2); detector 2 mean 20, std sqrt(200)
    out = ensemble.combine([torch.tensor([1.0 + 2**0.5]), torch.tensor([20.0 - 200**0.5])])
    assert out.item() == pytest.approx(0.25 * 1 + 0.75 * -1)


def test_minmax_max_and_rank():
    maximum = Maximum(normalise="minmax")
    maximum.fit([torch.tensor([0.0, 4.0]), torch.tensor([1.0, 2.0])])
    assert maximum.combine([torch.tensor([2.0]), torch.tensor([3.0])]).item() == pytest.approx(2.0)
    rank = RankMean()
    rank.fit([torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])])
    assert rank.combine([torch.tensor([5.0]), torch.tensor([0.0])]).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="weights"):
        WeightedMean(weights=(-1.0, 1.0))


def test_cli_ensemble_reports_each_detector_and_the_ensemble(invoke, tmp_path):
    out = tmp_path / "ens"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--detector", "pixel-gauss:min_std=0.1",
                          "--ensemble", "rank", "--data", "synthetic:size=32,n_train=8,n_test=6",
                          "--category", "tile", "--image-size", "32", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "bench.json").read_text())
    assert [r["configuration"] for r in rows] == ["pixel-gauss-1", "pixel-gauss-2", "ensemble rank"]
    metrics = json.loads((out / "ensemble" / "tile" / "metrics.json").read_text())
    scored = list(csv.DictReader((out / "ensemble" / "tile" / "scores.csv").open()))  # the combined score, per image
    assert len(scored) == metrics["n_test"] and sum(int(r["label"]) for r in scored) == metrics["n_anomalous"]
    above = [np.float32(r["score"]) > np.float32(metrics["threshold"]) for r in scored]  # decide()'s float32 rule
    assert [int(r["prediction"]) for r in scored] == [int(a) for a in above]
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--ensemble", "mean")
    assert code != 0 and "at least twice" in err
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--detector", "pixel-gauss", "--ensemble",
                          "mean:weights=1+1+1", "--data", "synthetic:size=32,n_train=8,n_test=6",
                          "--category", "tile", "--out", str(tmp_path / "bad"))
    assert code != 0 and "3 ensemble weights for 2 detectors" in err and not (tmp_path / "bad").exists()


def test_energy_detectors_run_from_cli_as_an_ensemble(invoke, tmp_path):
    out = tmp_path / "ebm"
    code, _, err = invoke("run", "--detector", "ebm-image:depth=10,widen=1,buffer_size=8",
                          "--detector", "ebm-patch:depth=10,widen=1,buffer_size=8,patch_size=8,grid=2",
                          "--sampler", "pyld:M=1,N=1", "--data", "synthetic:size=32,n_train=8,n_test=6",
                          "--category", "grid", "--image-size", "16", "--steps", "2", "--batch-size", "4",
                          "--out", str(out))
    assert code == 0, err
    image = json.loads((out / "ebm-image" / "grid" / "metrics.json").read_text())
    patch = json.loads((out / "ebm-patch" / "grid" / "metrics.json").read_text())
    assert "pixel_auroc" not in image and (out / "ebm-image" / "grid" / "roc.png").is_file()
    assert "pixel_auroc" in patch and (out / "ebm-patch" / "grid" / "pro.png").is_file()
    history = (out / "ebm-patch" / "grid" / "history.csv").read_text().splitlines()
    assert history[0] == "step,loss,f_data,f_sample,chain_move" and history[1].startswith("2,")  # last step logged
    rows = json.loads((out / "bench.json").read_text())
    assert rows[-1]["configuration"] == "ensemble mean"
