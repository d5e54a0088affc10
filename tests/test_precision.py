"""bf16 backbones on CPUs with bf16 instructions (adkit.core.bf16): the check's rule, its record through the
checkpoint and the model card, float32 on a CPU without them, float32 while exporting."""

from __future__ import annotations

import pytest
import torch
from test_backbones import TinyBackbonePlugin

from adkit.core import bf16 as precision
from adkit.core.components import DetectorContext
from adkit.core.exporting import exporting
from adkit.run.engine import TrainSettings, load_checkpoint, restore, train_detector


@pytest.fixture
def tiny_catalog(catalog):
    catalog.add_plugin(TinyBackbonePlugin(), name="tiny-plugin")
    return catalog


def padim(catalog):
    detector = catalog["detector"].create("padim:backbone=tiny,layers=0+1,features=5")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=torch.device("cpu")))
    return detector


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def fit(detector, tmp_path, held_out=None, settings=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = settings or TrainSettings(steps=1, batch_size=4)
    train_detector(detector, images(12, 0), settings, torch.device("cpu"), tmp_path / "checkpoint.pt", meta={},
                   held_out=images(10, 1) if held_out is None else held_out)
    return load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_cpu_without_bf16_keeps_float32_and_says_so(tiny_catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("ADKIT_CPU_BF16", "0")
    detector = padim(tiny_catalog)
    payload = fit(detector, tmp_path)
    assert detector.backbone.precision == "fp32"
    record = detector.all_approximations()["precision"]
    assert record["used"] == "fp32" and "no bf16 instructions" in record["summary"]
    assert payload["backbones"]["backbone"]["precision"] == "fp32"


def test_the_flags_decide_unless_overridden(monkeypatch):
    monkeypatch.delenv("ADKIT_CPU_BF16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not precision.cpu_has_bf16()
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert precision.cpu_has_bf16()
    monkeypatch.setenv("ADKIT_CPU_BF16", "0")
    assert not precision.cpu_has_bf16()


def test_the_rule_is_the_recorded_measurement(tiny_catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("ADKIT_CPU_BF16", "1")
    detector = padim(tiny_catalog)
    fit(detector, tmp_path)
    record = detector.all_approximations()["precision"]
    keep = record["noise"] <= precision.MAX_NOISE and record["speedup"] >= precision.MIN_SPEEDUP
    assert record["used"] == ("bf16" if keep else "fp32") == detector.backbone.precision
    assert record["images"] == 10 and 0 <= record["noise"] and -1 <= record["spearman"] <= 1


def test_bf16_chosen_runs_the_backbone_in_bf16_returns_float32_and_round_trips(tiny_catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("ADKIT_CPU_BF16", "1")
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)  # this machine's speed must not decide the test
    monkeypatch.setattr(precision, "MAX_NOISE", float("inf"))
    detector = padim(tiny_catalog)
    payload = fit(detector, tmp_path)
    assert detector.backbone.precision == "bf16" and payload["backbones"]["backbone"]["precision"] == "bf16"
    x = images(2, 3)
    with torch.inference_mode():
        features = detector.backbone(x, (0, 1))
        detector.backbone.precision = "fp32"
        exact = detector.backbone(x, (0, 1))
        detector.backbone.precision = "bf16"
        with exporting():  # an export traces float32
            traced = detector.backbone(x, (0, 1))
            assert detector.all_approximations()["precision"]["used"] == "fp32"
    assert all(f.dtype == torch.float32 for f in features)
    assert any(not torch.equal(f, e) for f, e in zip(features, exact))  # bf16 did round
    assert all(torch.equal(t, e) for t, e in zip(traced, exact))
    restored = padim(tiny_catalog)
    restore(restored, payload, "ckpt")
    assert restored.backbone.precision == "bf16"
    assert restored.all_approximations()["precision"]["used"] == "bf16"
    monkeypatch.setenv("ADKIT_CPU_BF16", "0")  # the same checkpoint on a CPU without bf16 instructions
    elsewhere = padim(tiny_catalog)
    restore(elsewhere, payload, "ckpt")
    assert elsewhere.backbone.precision == "fp32"
    assert "this CPU has no bf16 instructions" in elsewhere.all_approximations()["precision"]["summary"]


def test_a_failed_check_and_too_few_images_keep_float32(tiny_catalog, tmp_path, monkeypatch):
    monkeypatch.setenv("ADKIT_CPU_BF16", "1")
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(precision, "MAX_NOISE", -1.0)  # no rounding is small enough
    detector = padim(tiny_catalog)
    fit(detector, tmp_path)
    assert detector.backbone.precision == "fp32"
    assert detector.all_approximations()["precision"]["summary"].startswith("float32 backbone: on 10 held-out")
    few = padim(tiny_catalog)
    fit(few, tmp_path / "few", held_out=images(3, 1))
    assert few.backbone.precision == "fp32" and "too few" in few.all_approximations()["precision"]["summary"]


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_an_explicit_precision_is_not_second_guessed(tiny_catalog, tmp_path, monkeypatch, asked):
    monkeypatch.setenv("ADKIT_CPU_BF16", "1")
    detector = padim(tiny_catalog)
    fit(detector, tmp_path, settings=TrainSettings(steps=1, batch_size=4, precision=asked))
    assert detector.backbone.precision == "fp32" and "precision" not in detector.all_approximations()


def test_the_speed_is_a_paired_measurement_each_batch_at_both_precisions_in_turn():
    from types import SimpleNamespace

    backbone = SimpleNamespace(precision="fp32", precision_check=None)
    calls = []

    class Fake:
        def detect(self, images):
            calls.append((backbone.precision, int(images[0, 0])))
            scale = 1.0 if backbone.precision == "fp32" else 1.001
            return SimpleNamespace(image_scores=images[:, 0] * scale, anomaly_map=None)

    batches = [torch.full((2, 1), float(i)) for i in range(4)]
    fp32, bf16, fp32_s, bf16_s = precision._paired_scores(Fake().detect, [backbone], batches)
    assert calls == [("fp32", 0), ("bf16", 0), ("bf16", 1), ("fp32", 1), ("fp32", 2), ("bf16", 2), ("bf16", 3),
                     ("fp32", 3)]  # each batch at both in turn, the first alternating
    assert fp32.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and bf16 == pytest.approx(fp32 * 1.001)
    assert fp32_s > 0 and bf16_s > 0
