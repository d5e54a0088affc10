from __future__ import annotations

import csv
import json

import pytest
from sklearn.metrics import roc_auc_score

TINY = "synthetic:size=32,n_train=8,n_test=6"


def test_plugins_command_lists_plugins_and_components(invoke):
    code, out, _ = invoke("plugins", "--all")
    assert code == 0
    for name in ("draem", "freqmask", "hello", "pixel-gauss", "maxmin", "recon_width"):
        assert name in out


@pytest.mark.parametrize("args,needle", [
    (["run", "--detector", "dream"], "unknown detector 'dream'; did you mean draem"),
    (["run", "--detector", "draem:widht=3"], "detector 'draem' has no parameter 'widht'"),
    (["run", "--detector", "draem:recon_width=big"], "parameter 'recon_width' expects int, got 'big'"),
    (["run", "--detector", "draem", "--post", "freqmask:kernels=4"], "odd sizes"),
    (["run", "--detector", "draem", "--scorer", "maxx"], "unknown scorer 'maxx'; did you mean max"),
    (["run", "--detector", "draem", "--loss", "colour"], "unknown loss 'colour'; did you mean color"),
    (["run", "--detector", "draem", "--data", "mvtec"], "mvtec: give the dataset folder with --root"),
    (["run", "--detector", "draem", "--preset", "fast"], "--preset fast: detector 'draem' has presets quick, paper"),
    (["run", "--detector", "draem", "--category", "velvet"], "category 'velvet' not found"),
    (["run"], "give a detector with --detector"),
    (["run", "--detector", "draem", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["run", "--detector", "draem", "--image-size", "-3"], "--image-size must be >= 1, got -3"),
    (["run", "--detector", "draem", "--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
])
def test_user_errors_are_one_line_without_traceback(invoke, args, needle):
    code, _out, err = invoke(*args)
    assert code != 0
    assert needle in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("Error")]) == 1


def test_debug_shows_traceback(invoke):
    code, _, err = invoke("--debug", "run", "--detector", "dream")
    assert code != 0 and "Traceback" in err


def test_example_plugin_detector_runs_from_cli(invoke, tmp_path):
    out = tmp_path / "run"
    code, _stdout, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile",
                               "--image-size", "32", "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "tile" / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "tile" / "scores.csv").open()))
    assert metrics["n_test"] == len(rows) == 6 and metrics["n_anomalous"] == 3
    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    # the synthetic tile's defects are far from the per-pixel Gaussian (a constant map would give 0.5)
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] > 0.85
    assert [int(r["prediction"]) for r in rows] == [int(s > metrics["threshold"]) for s in scores]
    assert (out / "config.toml").is_file() and "pixel-gauss" in (out / "config.toml").read_text()
    assert any((out / "tile" / "overlays").iterdir())
    assert not (out / "tile" / "history.csv").exists()  # fitted, not trained: no training log


def test_config_file_and_flags_are_interchangeable(invoke, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'detector = "pixel-gauss"\ndata = "{TINY}"\ncategory = ["tile"]\nimage-size = 32\n')
    code_a, *_ = invoke("run", "--config", str(config), "--out", str(tmp_path / "a"))
    code_b, *_ = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile",
                        "--image-size", "32", "--out", str(tmp_path / "b"))
    assert code_a == code_b == 0
    a = json.loads((tmp_path / "a" / "tile" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "tile" / "metrics.json").read_text())
    assert a["image_auroc"] == b["image_auroc"]
    assert (tmp_path / "a" / "config.toml").read_text() == (tmp_path / "b" / "config.toml").read_text().replace(
        str(tmp_path / "b"), str(tmp_path / "a"))


def test_bad_config_key(invoke, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('detectr = "draem"\n')
    code, _, err = invoke("run", "--config", str(config))
    assert code != 0 and "unknown key 'detectr'" in err


def test_plugin_command(invoke):
    code, out, _ = invoke("hello")
    assert code == 0 and "pixel-gauss" in out


def test_python_api_matches_cli(invoke, tmp_path):
    from adkit import api
    from adkit.run.config import RunConfig

    results = api.run(RunConfig(detector=["pixel-gauss"], data=TINY, category=["wood"], image_size=32,
                                out=str(tmp_path / "py")))
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "wood", "--image-size",
                          "32", "--out", str(tmp_path / "cli"))
    assert code == 0, err
    from_cli = json.loads((tmp_path / "cli" / "wood" / "metrics.json").read_text())
    timings = ("train_s", "infer_img_s")
    assert {k: v for k, v in results[0].items() if k not in timings} == \
        {k: v for k, v in from_cli.items() if k not in timings}


def test_folder_flags(invoke, tmp_path, mvtec_tree):
    base = mvtec_tree / "widget"
    out = tmp_path / "f"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--normal", str(base / "train" / "good"),
                          "--abnormal", str(base / "test" / "scratch"), "--masks", str(base / "ground_truth" / "scratch"),
                          "--image-size", "16", "--out", str(out))
    assert code == 0, err
    # named by the folder the normal images' folder sits in (train/good -> train)
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert metrics["n_anomalous"] == 2 and metrics["n_test"] == 3
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--abnormal", str(base), "--image-size", "16")
    assert code != 0 and "give --normal DIR" in err


def test_compile_flag_compiles_the_training_step_and_the_map(invoke, tmp_path, monkeypatch):
    import torch

    compiled = []

    def record(target, *args, **kwargs):  # stands in for torch.compile: compiling is measured in benchmarks/
        compiled.append(type(getattr(target, "__self__", target)).__name__)
        return target

    monkeypatch.setattr(torch, "compile", record)
    code, _, err = invoke("run", "--detector", "draem:recon_width=4,disc_width=4", "--data",
                          "synthetic:size=32,n_train=8,n_test=6", "--category", "wood", "--image-size", "32",
                          "--steps", "2", "--batch-size", "2", "--compile", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert compiled == ["_TrainingStep", "Draem"]


def test_precision_flag(invoke, tmp_path):
    import torch

    from adkit.core.errors import AdkitError
    from adkit.run.precision import autocast

    a = torch.rand(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "auto"):
        assert (a @ a).dtype == torch.float32  # auto: bf16 on GPUs only
    with pytest.raises(AdkitError, match="--precision fp16"):
        autocast(torch.device("cpu"), "fp16")
    code, _, err = invoke("run", "--detector", "draem:recon_width=4,disc_width=4", "--data",
                          "synthetic:size=32,n_train=8,n_test=6", "--category", "wood", "--image-size", "32",
                          "--steps", "2", "--batch-size", "2", "--precision", "bf16", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert 'precision = "bf16"' in (tmp_path / "run" / "config.toml").read_text()


def test_plugins_listing_piped_is_one_line_per_component_and_json_on_request(invoke):
    code, out, _ = invoke("plugins", "--all")  # stdout is not a terminal here, as under | grep
    assert code == 0
    line = next(line for line in out.splitlines() if "\tfeature-ebm-patch\t" in line)
    assert line.startswith("component\tdetector\tfeature-ebm-patch\tebm\t") and "backbone: str" in line
    assert "plugin\tpatchcore\t" in out
    code, out, _ = invoke("plugins", "--json")
    listing = json.loads(out)
    patchcore = next(c for c in listing["components"] if c["name"] == "patchcore")
    assert patchcore["kind"] == "detector" and {"name": "ef", "type": "int", "required": False, "default": 32} in \
        patchcore["parameters"]
    assert any(p["plugin"] == "hello" and p["status"] == "ok" for p in listing["plugins"])


def test_plugins_listing_keeps_square_brackets_of_help_text(invoke):
    code, out, _ = invoke("plugins")
    flat = " ".join(out.split())  # rich folds long cells over lines
    assert code == 0 and "[low," in flat and "high]" in flat  # hello's clip: "Clamp map values to [low, high]."


def test_config_values_are_typed_like_flags(invoke, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'detector = "pixel-gauss"\ndata = "{TINY}"\ncategory = "tile"\nimage-size = "32"\n'
                      'skip-bad = "true"\n')
    code, _, err = invoke("run", "--config", str(config), "--out", str(tmp_path / "a"))
    assert code == 0, err
    assert 'image_size = 32' in (tmp_path / "a" / "config.toml").read_text()
    for line, needle in (('steps = "ten"', "steps must be an integer, got 'ten'"),
                         ("compile = 3", "compile must be true or false, got 3"),
                         ("post = 5", "post must be a string or a list of strings, got 5"),
                         ("scorer = 1.5", "scorer must be a string, got 1.5")):
        config.write_text(f'detector = "pixel-gauss"\n{line}\n')
        code, _, err = invoke("run", "--config", str(config))
        assert code != 0 and f"config file {config}: {needle}" in err and "Traceback" not in err


class FailingCommands:
    from adkit import hookimpl

    @hookimpl
    def register_commands(self, cli):
        raise RuntimeError("command hook failed")


def test_a_broken_command_hook_shows_everywhere(invoke, monkeypatch):
    from importlib import metadata

    class EntryPoint:
        name, dist = "cmds", None

        def load(self):
            return FailingCommands()

    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda group: [*real(group=group), EntryPoint()])
    code, out, _ = invoke("plugins")
    assert code == 0 and "broken" in " ".join(out.split()) and "command hook failed" in " ".join(out.split())
    code, out, err = invoke("--help")
    assert code == 0 and "plugin cmds is broken (RuntimeError: command hook failed)" in err
    code, _, err = invoke("mycommand")
    assert code != 0 and "no command 'mycommand'; plugin cmds is broken" in err


def test_options_a_detector_does_not_use_are_warned_and_the_used_sampler_is_shown(invoke, tmp_path):
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile", "--loss", "l2",
                          "--sampler", "sgld", "--out", str(tmp_path / "a"))
    assert code == 0, err
    flat = " ".join(err.split())
    assert "--loss is ignored: detector 'pixel-gauss' uses no loss" in flat
    assert "--sampler is ignored: detector 'pixel-gauss' uses no sampler" in flat
    code, _, err = invoke("train", "--detector", "ebm-image", "--data", TINY, "--category", "tile", "--steps", "1",
                          "--sampler", "pyld:M=1,N=1", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert "ignored" not in err
    import torch

    meta = torch.load(tmp_path / "b" / "tile" / "checkpoint.pt", weights_only=False)["meta"]
    assert "sampler=(pyld:M=1,N=1)" in meta["detector"]  # not the preset's pyld:M=5,N=3


def test_predict_finds_the_threshold_after_train_and_test_and_refuses_one_fitted_for_another_scorer(invoke, tmp_path):
    run = tmp_path / "run"
    code, _, err = invoke("train", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile",
                          "--out", str(run))
    assert code == 0, err
    checkpoint = run / "tile" / "checkpoint.pt"
    recorded = json.loads((run / "tile" / "threshold.json").read_text())
    assert recorded["scorer"] == "max" and "adkit train" in recorded["fitted_on"]
    images = tmp_path / "images"
    code, _, err = invoke("synth", "--out", str(images), "--category", "tile", "--size", "32", "--train", "2",
                          "--test", "4")
    assert code == 0, err
    folders = [str(f) for f in sorted((images / "tile" / "test").iterdir())]  # good and defective

    def decisions(*extra):
        code, _, err = invoke("predict", "--checkpoint", str(checkpoint), *folders, "--out",
                              str(tmp_path / "p"), *extra)
        assert code == 0, err
        rows = [line.split(",") for line in (tmp_path / "p" / "scores.csv").read_text().splitlines()[1:]]
        return [(float(r[2]), r[3]) for r in rows], err

    rows, _ = decisions()
    assert rows and all(decision == str(int(score > recorded["threshold"])) for score, decision in rows)
    rows, err = decisions("--scorer", "mean")  # the threshold holds for max, not for mean
    assert all(decision == "" for _, decision in rows) and "was fitted for" in " ".join(err.split())
    code, _, err = invoke("test", "--checkpoint", str(checkpoint), "--data", TINY, "--scorer", "mean")
    assert code == 0, err
    assert json.loads((run / "tile" / "threshold.json").read_text())["scorer"] == "mean"  # test refits it
    rows, _ = decisions("--scorer", "mean")
    assert rows and all(decision in ("0", "1") for _, decision in rows)


def test_test_reads_the_data_the_checkpoint_was_trained_on_unless_told_otherwise(invoke, tmp_path):
    """adkit test --checkpoint without --data evaluates on the dataset the run recorded (not the default dataset,
    whose synthetic textures here would be other images at another size); --data still names another."""
    run = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile", "--out", str(run))
    assert code == 0, err
    trained = json.loads((run / "tile" / "metrics.json").read_text())
    code, _, err = invoke("test", "--checkpoint", str(run / "tile" / "checkpoint.pt"), "--out", str(tmp_path / "t"))
    assert code == 0, err
    tested = json.loads((tmp_path / "t" / "tile" / "metrics.json").read_text())
    assert tested["n_test"] == trained["n_test"] and tested["image_auroc"] == trained["image_auroc"]
    other = "synthetic:size=32,n_train=8,n_test=10"
    code, _, err = invoke("test", "--checkpoint", str(run / "tile" / "checkpoint.pt"), "--data", other, "--out",
                          str(tmp_path / "o"))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "tile" / "metrics.json").read_text())["n_test"] != trained["n_test"]


def test_a_checkpoint_trained_on_relative_paths_is_tested_from_another_folder(invoke, tmp_path, monkeypatch):
    """The recorded --root and the dataset's folder parameters are relative to where the training ran; adkit test
    started elsewhere finds them there (the checkpoint records that folder)."""
    from adkit.testing import tiny_dataset

    trained_in, elsewhere = tmp_path / "lab", tmp_path / "line"
    elsewhere.mkdir()
    tiny_dataset(trained_in / "data", ("tile",), n_train=8, n_test=6)
    monkeypatch.chdir(trained_in)
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "mvtec", "--root", "data", "--category", "tile",
                          "--out", "run")
    assert code == 0, err
    good = trained_in / "data" / "tile" / "train" / "good"
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "folder:normal=data/tile/train/good,name=f",
                          "--out", "folder-run")
    assert code == 0, err
    trained = json.loads((trained_in / "run" / "tile" / "metrics.json").read_text())
    monkeypatch.chdir(elsewhere)  # ./data does not exist here
    code, _, err = invoke("test", "--checkpoint", str(trained_in / "run" / "tile" / "checkpoint.pt"), "--out", "t")
    assert code == 0, err
    assert json.loads((elsewhere / "t" / "tile" / "metrics.json").read_text())["n_test"] == trained["n_test"]
    code, _, err = invoke("test", "--checkpoint", str(trained_in / "folder-run" / "f" / "checkpoint.pt"), "--out", "u")
    assert code == 0, err
    assert good.is_dir() and (elsewhere / "u" / "f" / "metrics.json").is_file()
