"""Threshold policies (adkit.stats.thresholds): fits checked against hand computations, stability at the boundary, what
a threshold means in parts; and the policies through the CLI: run, predict and export, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats

from adkit.stats import thresholds
from adkit.stats.thresholds import PolicyError, fit, operating_point, parse_policy

TINY = "synthetic:size=32,n_train=16,n_test=8,val_fraction=0.5"


@pytest.mark.parametrize("text,canonical", [("fpr:0.01", "fpr:0.01"), ("FPR: 0.05", "fpr:0.05"), ("f1", "f1"),
                                            ("value:3", "value:3.0"), ("value:-0.25", "value:-0.25")])
def test_policies_have_one_canonical_text(text, canonical):
    policy = parse_policy(text)
    assert str(policy) == canonical and parse_policy(str(policy)) == policy


@pytest.mark.parametrize("text,needle", [("fpr:2", "strictly between 0 and 1"), ("fpr:-1", "strictly between 0 and 1"),
                                         ("fpr:0", "strictly between 0 and 1"), ("value:abc", "'abc' is not a number"),
                                         ("quantile:0.99", "write fpr:RATE"), ("f1:0.5", "f1 takes no value"),
                                         ("value:inf", "must be finite"), ("fpr", "write fpr:RATE")])
def test_bad_policies_name_the_fix(text, needle):
    with pytest.raises(PolicyError, match=needle):
        parse_policy(text)


def test_fpr_fit_matches_a_hand_computation():
    # 20 normal scores 0, 1, ..., 19. fpr:0.1 allows floor(0.1 * 20) = 2 false alarms: the lowest threshold with at
    # most 2 scores above it is 17 (18 and 19 above); the fit sits midway to the next score, 17.5.
    result = fit("fpr:0.1", np.arange(20.0))
    assert result.threshold == 17.5 and (result.below, result.above) == (17.0, 18.0)
    assert result.val_false_alarms == 2 and result.val_fpr == 0.1
    # one-sided 95 % Clopper-Pearson upper bound: the rate p at which 2 or fewer of 20 has probability 0.05
    assert stats.binom.cdf(2, 20, result.val_fpr_upper) == pytest.approx(0.05, abs=1e-9)
    # fpr:0.01 allows none of 20: above the highest score by half the top gap; the bound is 1 - 0.05 ** (1 / 20)
    none = fit("fpr:0.01", np.arange(20.0))
    assert none.threshold == 19.5 and none.val_false_alarms == 0
    assert none.val_fpr_upper == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-9)
    assert none.val_fpr_upper == pytest.approx(0.13911, abs=1e-5)


def test_fpr_fit_counts_ties_as_one_score():
    # 0.5 five times: a threshold at 0.5 would flag the three 0.9s; fpr:0.3 of 8 allows 2, so the threshold must
    # clear 0.9 too and sits above it
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9])
    assert fit("fpr:0.3", scores).val_false_alarms == 0 and fit("fpr:0.3", scores).threshold > 0.9
    assert fit("fpr:0.4", scores).threshold == pytest.approx(0.7) and fit("fpr:0.4", scores).val_false_alarms == 3


def test_quantile_band_is_the_textbook_median_interval():
    # the distribution-free 95 % interval for the median of 20 values is (x_(6), x_(15))
    low, high = thresholds.quantile_band(np.arange(1.0, 21.0), 0.5)
    assert (low, high) == (6.0, 15.0)
    low, high = thresholds.quantile_band(np.arange(1.0, 21.0), 0.01)  # the 0.99 quantile of 20: open above
    assert high is None


def test_f1_and_value_policies():
    result = fit("f1", [1.0, 2.0, 3.0, 4.0], [3.5, 5.0, 6.0])
    # cut between 3 and 3.5: tp 3, fp 1, F1 6/7; between 4 and 5: tp 2, fp 0, F1 4/5
    assert result.threshold == 3.25 and result.val_recall == 1.0 and result.val_false_alarms == 1
    with pytest.raises(PolicyError, match="needs normal and defective validation images"):
        fit("f1", [1.0, 2.0])
    manual = fit("value:2.5", [1.0, 2.0, 3.0])
    assert manual.threshold == 2.5 and manual.val_false_alarms == 1


def test_too_few_images_for_the_rate_warn():
    assert "too few for fpr:0.001" in fit("fpr:0.001", np.arange(50.0)).warning
    assert fit("fpr:0.05", np.arange(50.0)).warning is None


@pytest.mark.parametrize("policy", ["fpr:0.05", "fpr:0.2", "fpr:0.001", "f1"])
def test_perturbing_scores_by_less_than_half_the_gap_never_flips_their_decisions(policy):
    rng = np.random.default_rng(0)
    normal, anomalous = rng.normal(0, 1, 60), rng.normal(2, 1, 20)
    result = fit(policy, normal, anomalous)
    every = normal if policy.startswith("fpr") else np.concatenate([normal, anomalous])  # what it was fitted on
    assert result.threshold not in every  # never on a score
    assert (result.below, result.above) == (every[every < result.threshold].max(),
                                            every[every > result.threshold].min() if result.above is not None else None)
    lower, upper = result.below, result.above
    gap = (upper - lower) if upper is not None else 2 * (result.threshold - lower)
    before = thresholds.decide(torch.tensor(every), result.threshold)
    for trial in range(200):
        shift = rng.uniform(-0.499, 0.499, every.size) * gap
        if trial == 0:  # the worst case: every score pushed towards the threshold
            shift = np.where(every > result.threshold, -0.499, 0.499) * gap
        after = thresholds.decide(torch.tensor(every + shift), result.threshold)
        assert torch.equal(before, after)


def test_operating_point_in_parts():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.2, 0.95])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    defects = ["good", "good", "good", "good", "crack", "crack", "scratch"]
    point = operating_point(scores, labels, defects, 0.5)
    assert point["false_alarms"] == 1 and point["false_alarms_per_1000"] == 250.0
    assert point["recall"] == pytest.approx(2 / 3) and point["recall_by_defect"] == {"crack": 0.5, "scratch": 1.0}
    assert not thresholds.decide(torch.tensor([1.0, 2.0]), None).any()


# through the command line


def test_run_records_the_threshold_in_parts(invoke, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile",
                               "--image-size", "32", "--threshold", "fpr:0.5", "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "tile" / "metrics.json").read_text())
    record = json.loads((out / "tile" / "threshold.json").read_text())
    rows = list(csv.DictReader((out / "tile" / "scores.csv").open()))
    assert metrics["threshold_policy"] == record["policy"] == "fpr:0.5"
    normal_val = [s for s, label in zip(record["val_scores"], record["val_labels"]) if label == 0]
    assert metrics["threshold"] == fit("fpr:0.5", normal_val).threshold == record["threshold"]
    good = [float(r["score"]) for r in rows if r["label"] == "0"]
    bad = [float(r["score"]) for r in rows if r["label"] == "1"]
    assert metrics["false_alarms_per_1000"] == pytest.approx(1000 * np.mean(np.array(good) > metrics["threshold"]))
    assert metrics["recall"] == pytest.approx(np.mean(np.array(bad) > metrics["threshold"]))
    assert set(metrics["recall_by_defect"]) == {r["path"].split("/")[-2] for r in rows if r["label"] == "1"}
    assert "false alarms per 1,000 good parts" in " ".join(err.split()) and "FA per" in stdout
    assert f"{metrics['false_alarms_per_1000']:.1f}" in stdout and f"{metrics['recall']:.3f}" in stdout
    page = (out / "report.html").read_text()
    assert "class='slider'" in page and "--threshold value:X" in page and "good/" in page


@pytest.mark.parametrize("args,needle", [
    (["--threshold", "fpr:2"], "--threshold fpr:2: a false-alarm rate lies strictly between 0 and 1"),
    (["--threshold", "fpr:-1"], "--threshold fpr:-1: a false-alarm rate lies strictly between 0 and 1"),
    (["--threshold", "value:abc"], "--threshold value:abc: 'abc' is not a number"),
    (["--threshold", "f1"], "--threshold f1 needs defective validation images and tile's validation split has none"),
    (["--threshold", "f1", "--data", TINY + ",val_defects=2"], "val_defects=2"),
])
def test_bad_policies_fail_in_one_line_and_write_nothing(invoke, tmp_path, args, needle):
    out = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile",
                          "--image-size", "32", "--out", str(out), *args)
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_f1_fits_on_defective_validation_images_held_out_of_the_test_split(invoke, tmp_path):
    out = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY + ",val_defects=0.5", "--category",
                          "tile", "--image-size", "32", "--threshold", "f1", "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "tile" / "metrics.json").read_text())
    record = json.loads((out / "tile" / "threshold.json").read_text())
    assert metrics["threshold_policy"] == "f1" and metrics["val_defective"] == sum(record["val_labels"]) >= 1
    assert metrics["n_anomalous"] == 4 - metrics["val_defective"]  # held out of the test split, not shared
    scores, labels = np.array(record["val_scores"]), np.array(record["val_labels"])
    assert metrics["threshold"] == fit("f1", scores[labels == 0], scores[labels == 1]).threshold


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A PaDiM checkpoint on the tiny tiles, its ONNX and TorchScript exports, and images to score."""
    from PIL import Image

    from adkit.testing import invoke, tiny_defects, tiny_images

    root = tmp_path_factory.mktemp("policies")
    code, _, err = invoke("run", "--detector", "padim", "--data", "synthetic:size=64,n_train=10,n_test=6",
                          "--category", "tile", "--image-size", "64", "--out", str(root / "run"))
    assert code == 0, err
    checkpoint = root / "run" / "tile" / "checkpoint.pt"
    for fmt in ("onnx", "torchscript"):
        code, _, err = invoke("export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(root / fmt))
        assert code == 0, err
    images = root / "images"
    images.mkdir()
    batch = torch.cat([tiny_images(4, 64, "tile", split="test"), tiny_defects(4, 64, "tile")[0]])
    for i, image in enumerate(batch):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")).save(images / f"{i}.png")
    return checkpoint, root, images


def _predict(invoke, source: list[str], images, out, *threshold: str) -> tuple[list[dict[str, str]], dict]:
    code, _, err = invoke("predict", *source, str(images), "--out", str(out), "--device", "cpu", *threshold)
    assert code == 0, err
    return list(csv.DictReader((out / "scores.csv").open())), json.loads((out / "decision.json").read_text())


def test_predict_threshold_gives_the_same_decisions_from_the_checkpoint_and_both_exports(invoke, exported, tmp_path):
    checkpoint, root, images = exported
    sources = {"checkpoint": ["--checkpoint", str(checkpoint)], "onnx": ["--model", str(root / "onnx")],
               "torchscript": ["--model", str(root / "torchscript")]}
    rows, _ = _predict(invoke, sources["checkpoint"], images, tmp_path / "base")
    scores = torch.tensor([float(r["score"]) for r in rows])
    cut, _ = thresholds.widest_gap(scores)  # every score far from it
    for policy in (f"value:{cut!r}", "fpr:0.3"):
        seen = {}
        for name, source in sources.items():
            rows, decision = _predict(invoke, source, images, tmp_path / f"{name}-{policy[:3]}", "--threshold", policy)
            seen[name] = ([r["prediction"] for r in rows], decision["threshold"], decision["policy"])
        assert seen["checkpoint"] == seen["onnx"] == seen["torchscript"]
        if policy.startswith("value"):
            assert seen["checkpoint"][0] == [str(int(s > cut)) for s in scores.tolist()]
            assert {"0", "1"} <= set(seen["checkpoint"][0])
    record = json.loads((checkpoint.parent / "threshold.json").read_text())
    scores_val, labels = np.array(record["val_scores"]), np.array(record["val_labels"])
    assert seen["onnx"][1] == fit("fpr:0.3", scores_val[labels == 0]).threshold


def test_a_policy_needs_stored_validation_scores(invoke, exported, tmp_path):
    checkpoint, _, images = exported
    copy = tmp_path / "old"
    copy.mkdir()
    (copy / "checkpoint.pt").write_bytes(checkpoint.read_bytes())
    record = json.loads((checkpoint.parent / "threshold.json").read_text())
    for key in ("val_scores", "val_labels", "policy", "fit"):
        record.pop(key)
    (copy / "threshold.json").write_text(json.dumps(record))  # as adkit wrote it before policies
    code, _, err = invoke("predict", "--checkpoint", str(copy / "checkpoint.pt"), str(images), "--out",
                          str(tmp_path / "p"), "--threshold", "fpr:0.1")
    assert code == 2 and "stores no validation scores to fit it on" in err and "--threshold value:X" in err
    assert not (tmp_path / "p").exists()
    rows, decision = _predict(invoke, ["--checkpoint", str(copy / "checkpoint.pt")], images, tmp_path / "v",
                              "--threshold", "value:1e9")
    assert decision["policy"] == "value:1000000000.0" and {r["prediction"] for r in rows} == {"0"}
