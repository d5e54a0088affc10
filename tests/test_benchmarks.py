"""The benchmarks a lent GPU runs (benchmarks/gpu_suite.sh) run on a CPU at toy sizes: a session with a device has
minutes, and a benchmark left behind by an API change must fail here, not there."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy(**overrides) -> argparse.Namespace:
    values = {"train_images": 4, "size": 64, "batch": 2, "steps": 1, "precision": "fp32", "post": None}
    return argparse.Namespace(**{**values, **overrides})


def test_speed_measures_fitted_detectors_and_their_exports_and_draem_steps(monkeypatch, capsys):
    speed = load("speed")
    cpu = torch.device("cpu")
    for spec in ("padim", "patchcore"):
        fitted = speed.fitted_speed(spec, toy(), cpu)
        assert fitted["first_call_s"] > 0 and fitted["infer_img_s_batch2"] > 0 and fitted["fit_s"] > 0
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # compiling is measured, not tested
    exported = speed.export_speed("padim", toy(), cpu)
    assert set(exported["timings"]) == {"eager", "compile", "torchscript", "onnx"}
    assert all(row["batch2_img_s"] > 0 for row in exported["timings"].values())
    monkeypatch.setattr(sys, "argv", ["speed.py", "--size", "32", "--batch", "2", "--recon-width", "4",
                                      "--disc-width", "4", "--steps", "1", "--compile-mode", "reduce-overhead",
                                      "--json"])
    speed.main()
    draem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert draem["compile"] and draem["compile_mode"] == "reduce-overhead" and draem["train_step_s"] > 0


def test_serve_load_reads_core_lists():
    assert load("serve_load").cores("0,1") == {0, 1}
    assert load("serve_load").cores("2-5,9") == {2, 3, 4, 5, 9}
