"""adkit export and predict --model: the exported ONNX and TorchScript models reproduce predict from the
checkpoint (one module runs both), for every built-in pipeline; bad requests fail with one line and write
nothing."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adkit import hookimpl
from adkit.core.errors import AdkitError
from adkit.core.exporting import ExportFormat
from adkit.deploy.export import Deployed, load_runner, read_model, threshold_input
from adkit.run.assembly import load_trained
from adkit.run.config import RunConfig
from adkit.serve.models import watched
from adkit.stats.thresholds import widest_gap
from adkit.testing import tiny_defects, tiny_images

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:size=64,n_train=8,n_test=6"
PIPELINES = {  # name: (run arguments, image size)
    "draem-freqmask": (["--detector", "draem:recon_width=4,disc_width=4", "--post", "freqmask", "--scorer", "maxmin",
                        "--steps", "3", "--batch-size", "2"], 32),
    "draem-avgpool-gaussian": (["--detector", "draem:recon_width=4,disc_width=4", "--post", "avgpool:kernel=5",
                                "--post", "gaussian", "--steps", "3", "--batch-size", "2"], 32),
    "patchcore": (["--detector", "patchcore"], 64),
    "padim": (["--detector", "padim"], 64),
    "ebm-image": (["--detector", "ebm-image:depth=10,widen=1,buffer_size=8", "--steps", "2", "--batch-size", "4"], 32),
    "ebm-patch": (["--detector", "ebm-patch:depth=10,widen=1,buffer_size=8,patch_size=8,grid=2", "--steps", "2",
                   "--batch-size", "4"], 32),
    "pixel-gauss": (["--detector", "pixel-gauss"], 32),
    "feature-ebm-patch": (["--detector", "feature-ebm-patch:buffer_size=64,steps_batch=16", "--steps", "2"], 64),
    "feature-ebm-image": (["--detector", "feature-ebm-image:buffer_size=64,steps_batch=16", "--steps", "2"], 64),
    "supersimplenet": (["--detector", "supersimplenet:hidden=16,dec=8", "--steps", "3", "--batch-size", "4"], 64),
    # PatchCore with a bank of labelled defects' patches (2 defective images moved from the test split)
    "patchcore-defects": (["--detector", "patchcore"], 64),
    # tiled: 2 x 2 tiles of 64 px over a 96 px input, stitched inside the exported graph
    "padim-tiled": (["--detector", "padim", "--tile", "64", "--overlap", "0.5"], 96),
}
PIPELINE_DATA = {"patchcore-defects": DATA + ",train_defects=2"}  # other pipelines: DATA


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each pipeline trained once on the tiny synthetic tiles: name -> checkpoint."""
    from adkit.testing import invoke

    root = tmp_path_factory.mktemp("deploy")
    checkpoints = {}
    for name, (args, size) in PIPELINES.items():
        code, _, err = invoke("run", *args, "--data", PIPELINE_DATA.get(name, DATA), "--category", "tile", "--image-size", str(size),
                              "--out", str(root / name))
        assert code == 0, err
        checkpoints[name] = root / name / "tile" / "checkpoint.pt"
    return checkpoints


def images_for(size: int) -> torch.Tensor:
    normal, (defective, _) = tiny_images(3, size, "tile", split="test"), tiny_defects(2, size, "tile")
    return torch.cat([normal, defective])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_exported_models_reproduce_the_checkpoint(invoke, trained, tmp_path, name, fmt):
    checkpoint = trained[name]
    code, _, err = invoke("export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(tmp_path / "m"))
    assert code == 0, err
    file, card = read_model(tmp_path / "m")
    size = PIPELINES[name][1]
    assert card["input"]["shape"] == ["batch", 3, size, size] and card["format"] == fmt
    assert card["decision"]["threshold"] == card["threshold"] and card["threshold_policy"] == "fpr:0.01"
    assert card["quantization"] == {"scheme": "none"}
    pipeline, _ = load_trained(RunConfig(), checkpoint, torch.device("cpu"))
    reference = Deployed(pipeline).eval()
    exported = load_runner(file, fmt, torch.device("cpu"))
    images = images_for(size)
    with torch.inference_mode():
        maps, scores, _ = reference(images, threshold_input(None))
    # scores may differ by this much between the eager module and the exported file (rtol / atol below)
    tolerance = 1e-4 * float(scores.abs().max()) + 1e-6
    cut, half_gap = widest_gap(scores)
    for batch in (images, images[:1]):  # dynamic batch: 5 and 1 images, traced at 2
        n = len(batch)
        for threshold in (card["threshold"], cut):
            got = exported(batch, threshold)
            assert (got[0] - maps[:n]).abs().max() <= 1e-4 * max(float(maps.abs().max()), 1e-12)
            assert torch.allclose(got[1], scores[:n], rtol=1e-4, atol=1e-6)
            assert torch.equal(got[2], got[1] > threshold_input(threshold))  # the file decides its own scores
            # a decision is meaningful where the score lies farther from the threshold than the scores may differ;
            # there, the exported model must decide as the eager one
            meaningful = (scores[:n].float() - threshold).abs() > tolerance
            assert torch.equal(got[2][meaningful], (scores[:n].float() > threshold)[meaningful])
    if half_gap > tolerance:  # at the widest gap every decision is meaningful: a disagreement fails the test
        assert torch.equal(exported(images, cut)[2], scores.float() > cut)
    if scores.unique().numel() == len(scores):  # no ties: the ranking must be identical
        assert torch.equal(exported(images, None)[1].argsort(), scores.argsort())
    assert not exported(images, None)[2].any()  # no threshold (NaN): no decisions


def read_scores(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_predict_from_a_model_writes_what_predict_from_the_checkpoint_writes(invoke, trained, tmp_path):
    checkpoint = trained["patchcore"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images_for(64)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")).save(folder / f"{i}.png")
    Image.new("RGB", (80, 70), (128, 100, 90)).save(folder / "other-size.png")
    # on the CPU as the exported models run (on a GPU, --precision auto would score in bf16)
    code, _, err = invoke("predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(tmp_path / "a"),
                          "--device", "cpu")
    assert code == 0, err
    assert "1 of 6 images are not 64x64 px; they are resized" in err
    for fmt in ("onnx", "torchscript"):
        assert invoke("export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(tmp_path / fmt))[0] == 0
        code, _, err = invoke("predict", "--model", str(tmp_path / fmt), str(folder), "--out", str(tmp_path / f"p-{fmt}"))
        assert code == 0, err
        a, b = read_scores(tmp_path / "a" / "scores.csv"), read_scores(tmp_path / f"p-{fmt}" / "scores.csv")
        assert [r["path"] for r in a] == [r["path"] for r in b]
        assert [r["prediction"] for r in a] == [r["prediction"] for r in b] and {r["prediction"] for r in a} <= {"0", "1"}
        for x, y in zip(a, b):
            assert float(x["score"]) == pytest.approx(float(y["score"]), rel=1e-4)
        assert sorted(p.name for p in (tmp_path / "a" / "overlays").iterdir()) == \
            sorted(p.name for p in (tmp_path / f"p-{fmt}" / "overlays").iterdir())
    # the onnxruntime-only example of docs/deploy.md, on the images already at the model's size
    same_size = sorted(str(p) for p in folder.glob("[0-9].png"))
    lines = subprocess.run([sys.executable, str(ROOT / "examples" / "onnxruntime_score.py"), str(tmp_path / "onnx"),
                            *same_size], check=True, capture_output=True, text=True).stdout.splitlines()
    expected = {r["path"]: r for r in read_scores(tmp_path / "p-onnx" / "scores.csv")}
    assert len(lines) == len(same_size) == 5
    for line in lines:
        path, score, decision = line.split("\t")
        assert float(score) == pytest.approx(float(expected[path]["score"]), rel=1e-5)
        assert decision == ("anomalous" if expected[path]["prediction"] == "1" else "normal")


def test_bad_export_requests_fail_in_one_line_and_write_nothing(invoke, trained, tmp_path):
    checkpoint = str(trained["pixel-gauss"])
    code, _, err = invoke("export", "--checkpoint", checkpoint, "--format", "tflite")
    assert code == 2 and "--format tflite: choose onnx or torchscript" in err
    (tmp_path / "taken").mkdir()
    code, _, err = invoke("export", "--checkpoint", checkpoint, "--format", "onnx", "--out", str(tmp_path / "taken"))
    assert code == 2 and "exists: choose another --out" in err
    code, _, err = invoke("export", "--checkpoint", checkpoint, "--format", "onnx", "--scorer", "mean",
                          "--out", str(tmp_path / "m"))
    assert code == 2 and "no threshold for post-processors [] and scorer mean" in err and "adkit test" in err
    assert not (tmp_path / "m").exists()
    old = tmp_path / "old.pt"
    torch.save({"format": 0, "model": {}}, old)
    code, _, err = invoke("export", "--checkpoint", str(old), "--format", "onnx", "--out", str(tmp_path / "m"))
    assert code == 2 and "is not an adkit checkpoint of format" in err
    code, _, err = invoke("predict", "--model", str(tmp_path / "taken"), checkpoint)
    assert code == 2 and "model.json not found" in err
    code, _, err = invoke("predict", str(tmp_path))
    assert code == 2 and "give --checkpoint CKPT or --model EXPORT_DIR" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt", "taken"]  # no half-written export


class TorchExport(ExportFormat):
    """A third-party export format: torch.export's ExportedProgram (.pt2), saved and loaded with torch alone."""

    file = "model.pt2"

    def write(self, module, example, path):
        program = torch.export.export(module, example,
                                      dynamic_shapes={"images": {0: torch.export.Dim("batch")}, "threshold": None})
        torch.export.save(program, str(path))

    def load(self, path, device):
        module = torch.export.load(str(path)).module()

        def run(images, threshold):
            with torch.inference_mode():
                return tuple(t.cpu() for t in module(images.to(device), threshold.to(device)))

        return run


class TorchExportPlugin:
    @hookimpl
    def register_exporters(self, register):
        register("torch-export", TorchExport, help="torch.export ExportedProgram (.pt2)")


def test_an_export_format_from_a_plugin_exports_checks_and_predicts(trained, tmp_path, catalog):
    """Export formats are a registered kind: a plugin's format goes through the same check against the pipeline,
    model.json names it, and predict --model and the service read it back by that name; nothing in adkit names
    it. Unknown formats and a model.json whose format no plugin provides fail in one line."""
    from adkit import api

    catalog.add_plugin(TorchExportPlugin(), name="torch-export-plugin")
    out = api.export(RunConfig(), checkpoint=trained["padim"], fmt="torch-export", out=tmp_path / "m")
    assert (out / "model.pt2").is_file() and read_model(out)[1]["format"] == "torch-export"
    images = images_for(64)
    pipeline, _ = load_trained(RunConfig(), trained["padim"], torch.device("cpu"))
    expected = Deployed(pipeline).eval()(images, torch.tensor(float("nan")))
    got = load_runner(out / "model.pt2", "torch-export", torch.device("cpu"))(images, None)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
    assert "model.pt2" in watched()
    with pytest.raises(AdkitError, match="--format tflite: choose onnx or torch-export or torchscript"):
        api.export(RunConfig(), checkpoint=trained["padim"], fmt="tflite", out=tmp_path / "n")
    assert not (tmp_path / "n").exists()
    catalog.remove_plugin("torch-export-plugin")
    with pytest.raises(AdkitError, match="format 'torch-export' is not a registered export format .* install the "
                                         "plugin that provides it"):
        read_model(out)


# PaDiM with enough validation images for the int8 check: 12 good and 2 defective
QUANTIZE_DATA = "synthetic:size=64,n_train=30,n_test=6,val_fraction=0.4,val_defects=0.5"


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory):
    from adkit.testing import invoke

    root = tmp_path_factory.mktemp("quantize")
    code, _, err = invoke("run", "--detector", "padim", "--data", QUANTIZE_DATA, "--category", "tile",
                          "--image-size", "64", "--out", str(root / "padim"))
    assert code == 0, err
    return root / "padim" / "tile" / "checkpoint.pt"


def test_an_int8_export_quantizes_the_backbone_alone_records_its_check_and_predicts(invoke, quantizable, tmp_path,
                                                                                   monkeypatch):
    """With the check measured but not enforced (whether int8 holds on these tiny textures is not this test's question):
    the backbone's convolutions take quantized inputs and nothing else does, model.json says what was quantized,
    how it was calibrated and what the check measured, and predict --model runs the file unchanged."""
    import onnx

    from adkit.deploy import quantize

    real = quantize.drift
    monkeypatch.setattr(quantize, "drift", lambda *args: {**real(*args), "ok": True})
    code, _, err = invoke("export", "--checkpoint", str(quantizable), "--format", "onnx", "--quantize", "int8",
                          "--out", str(tmp_path / "m"))
    assert code == 0, err
    file, card = read_model(tmp_path / "m")
    record = card["quantization"]
    assert record["scheme"] == "int8" and record["quantized"]["scopes"] == ["pipeline.detector.backbone"]
    assert record["quantized"]["nodes"]["Conv"] > 0 and record["check"]["ok"]
    assert record["check"]["images"] == 14 and record["check"]["defects"] == 2 and "auroc_quantized" in record["check"]
    assert record["calibration"].startswith("18 training images of tile")
    graph = onnx.load(str(file)).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        scopes = next(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
        quantized = producers.get(node.input[0]) == "DequantizeLinear"
        assert quantized == ("pipeline.detector.backbone" in scopes), (node.name, scopes)
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(images_for(64)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(images / f"{i}.png")
    code, _, err = invoke("predict", "--model", str(tmp_path / "m"), str(images), "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert len(read_scores(tmp_path / "p" / "scores.csv")) == 5


def test_an_int8_export_whose_quantization_breaks_the_scores_is_refused_and_not_written(quantizable, tmp_path,
                                                                                        monkeypatch):
    """Calibrated on images a thousand times brighter than any, the first convolution's input quantizes every real
    image to zero: every int8 score is the same, so they move by at least the good scores' spread (bound 0.3)."""
    import dataclasses

    from adkit import api
    from adkit.app import deployment

    real = deployment._quantization
    monkeypatch.setattr(deployment, "_quantization", lambda *args: dataclasses.replace(
        (request := real(*args)), calibration=request.calibration * 1000))
    with pytest.raises(AdkitError, match=r"^--quantize int8: on 14 validation images the int8 onnx model moves the "
                                         r"scores by .* of the good images' spread \(bound 0.3\).*not written; export "
                                         r"with --quantize none$"):
        api.export(RunConfig(), checkpoint=quantizable, fmt="onnx", out=tmp_path / "m", quantize="int8")
    assert not (tmp_path / "m").exists()


def test_quantize_requests_it_cannot_serve_fail_in_one_line_before_reading_images(invoke, trained, tmp_path):
    code, _, err = invoke("export", "--checkpoint", str(trained["padim"]), "--format", "torchscript", "--quantize",
                          "int8", "--out", str(tmp_path / "m"))
    assert code == 2 and "--quantize int8: format torchscript cannot (it writes float32 only); use --format onnx" in err
    code, _, err = invoke("export", "--checkpoint", str(trained["pixel-gauss"]), "--format", "onnx", "--quantize",
                          "int8", "--out", str(tmp_path / "m"))
    assert code == 2 and "frozen pretrained backbone and PixelGaussian has none; use --quantize none" in err
    code, _, err = invoke("export", "--checkpoint", str(trained["padim"]), "--format", "onnx", "--quantize", "int8",
                          "--data", "mvtec", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"))
    assert code == 2 and "the checkpoint's training and validation images (--quantize calibrates and checks on them) " \
                         "cannot be read" in err
    assert not (tmp_path / "m").exists()


def test_the_int8_check_bounds_the_noise_the_decisions_and_the_auroc():
    """Hand cases of adkit.deploy.quantize.drift: good scores 0..9 (standard deviation 2.87), threshold 9.5."""
    from adkit.deploy.quantize import drift

    good = np.arange(10.0)
    labels = np.zeros(10, dtype=int)
    assert drift(good, good, labels, 9.5)["ok"] and drift(good, good, labels, 9.5)["noise"] == 0
    shifted = drift(good, good + 0.5, labels, 9.5)  # 0.17 of the spread; 9 (now 9.5) lies inside the margin
    assert shifted["ok"] and shifted["noise"] == pytest.approx(0.5 / good.std(), abs=1e-4)
    moved = drift(good, good + 1.0, labels, 9.5)  # 0.35 of the spread: over the bound
    assert not moved["ok"] and "moves the scores by 0.35" in moved["summary"]
    flipped = good.copy()
    flipped[0] = 10.0  # one good image far below the threshold now above it; RMS 10 / sqrt(10) = 1.1 of the spread
    assert "changes 1 of" in drift(good, flipped, labels, 9.5)["summary"]
    scores = np.concatenate([good, [20.0, 21.0]])
    defects = np.concatenate([labels, [1, 1]])
    worse = scores.copy()
    worse[-1] = 8.5  # a defect now ranked below one good image of ten: AUROC 1.0 -> 0.95
    record = drift(scores, worse, defects, 30.0)
    assert record["auroc"] == 1.0 and record["auroc_quantized"] == pytest.approx(0.95)
    assert not record["ok"] and "drops the image AUROC from 1.0000 to 0.9500" in record["summary"]
    assert "too few" in drift(good[:5], good[:5], labels[:5], 9.5)["summary"]
