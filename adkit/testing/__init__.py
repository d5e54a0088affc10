"""A kit for plugin authors' tests: run the CLI in-process, tiny data, and contract checks for each component kind.

    from adkit.testing import check_detector, invoke, TINY_DATA

    def test_my_detector():
        check_detector("my-detector:width=4")          # shapes, dtypes, checkpoint round trip, determinism

    def test_my_detector_runs_end_to_end(tmp_path):
        code, out, err = invoke("run", "--detector", "my-detector", "--data", TINY_DATA,
                                "--category", "wood", "--out", str(tmp_path / "run"))
        assert code == 0, err

Each ``check_*`` builds the component through adkit's catalog, so the plugin's entry point is tested too (the
package must be installed, e.g. ``pip install -e .``), and raises AssertionError naming the broken contract. The
checks are what adkit itself relies on; a plugin's own tests should add the values its method must produce.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adkit.core.checkpoints import load_checkpoint, restore
from adkit.core.components import Backbone, Detector, DetectorContext, EnergyNetwork, Ensemble, Sampler
from adkit.core.datasets import AnomalyDataset
from adkit.core.plugins import Catalog, reset_catalog
from adkit.data.loading import load_split
from adkit.run.engine import TrainSettings, seed_everything, train_detector
from adkit.testing.contract import ContractError, _catalog, _check_map, _expect
from adkit.testing.exporters import check_exporter

__all__ = ["TINY_DATA", "ContractError", "check_backbone", "check_dataset", "check_detector", "check_ensemble",
           "check_exporter", "check_loss", "check_postprocessor", "check_sampler", "check_scorer", "invoke",
           "tiny_dataset", "tiny_defects", "tiny_images"]

# a --data spec for end-to-end tests: 32 px synthetic textures, 8 training and 6 test images per category
TINY_DATA = "synthetic:size=32,n_train=8,n_test=6"


def invoke(*args: str) -> tuple[int, str, str]:
    """Run ``adkit ARGS...`` through the console entry point in this process, as a user's shell would (user
    errors are one line on stderr and a non-zero code); returns (exit code, stdout, stderr). The plugin catalog
    is loaded afresh before and after, so environment changes (ADKIT_LOAD_PLUGINS) take effect."""
    from adkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    reset_catalog()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    reset_catalog()
    return code, out.getvalue(), err.getvalue()


def tiny_images(n: int = 4, size: int = 32, category: str = "wood", seed: int = 0, split: str = "train") -> Tensor:
    """``n`` normal synthetic texture images (n, 3, size, size) in [0, 1], the same for the same arguments."""
    from adkit.data.textures import normal_image

    return torch.stack([normal_image(category, size, seed, split, i) for i in range(n)])


def tiny_defects(n: int = 4, size: int = 32, category: str = "wood", seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` defective synthetic images (n, 3, size, size) and their masks (n, 1, size, size) in {0, 1}."""
    from adkit.data.textures import DEFECTS, defective_image

    pairs = [defective_image(category, DEFECTS[i % len(DEFECTS)], size, seed, i) for i in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([(p[1] > 0.5).float() for p in pairs])


def tiny_dataset(root: Path, categories: tuple[str, ...] = ("wood",), size: int = 32, n_train: int = 8,
                 n_test: int = 6) -> Path:
    """Write synthetic categories in the MVTec AD layout under ``root`` (for ``--data mvtec --root ROOT``)."""
    from adkit.data.textures import write_textures

    write_textures(Path(root), list(categories), size, seed=0, n_train=n_train, n_test=n_test)
    return Path(root)


def _build_detector(catalog: Catalog, spec: str, image_size: int, options: dict[str, Any]) -> Detector:
    seed_everything(0)  # as a run does before building: initial weights come from the global generator
    detector = catalog["detector"].create(spec)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=image_size, device=torch.device("cpu"), **options))
    return detector


def check_detector(spec: str, catalog: Catalog | None = None, image_size: int = 32, steps: int = 2,
                   batch_size: int = 2, **context: Any) -> Detector:
    """Train (or fit) the detector ``spec`` names on tiny images through adkit's engine and check: the map is
    (B, 1, h, w) finite floats; ``detect`` returns image scores, (B,), exactly when the class declares
    ``own_scores``, and an ``image_level`` detector's map is (B, 1, 1, 1); each image's map does
    not depend on the rest of its batch; the checkpoint restores a fresh detector to the same maps; and a second
    training with the same seed gives the same maps. ``context`` is passed to DetectorContext (losses, sampler,
    backbone, ...). Returns the trained detector."""
    catalog = _catalog(catalog)
    train, test = tiny_images(6, image_size), tiny_images(3, image_size, split="test")
    settings = TrainSettings(steps=steps, batch_size=batch_size, seed=0)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        first = Path(folder) / "first.pt"
        trained = _build_detector(catalog, spec, image_size, context)
        _expect(isinstance(trained.trainable, bool), f"{spec}: trainable must be a bool")
        train_detector(trained, train, settings, cpu, first, meta={})
        trained.eval()
        with torch.inference_mode():
            detection = trained.detect(test)
            maps = detection.anomaly_map
            _check_map(maps, len(test), f"{spec}: detect()")
            declared = type(trained)
            _expect((detection.image_scores is not None) == declared.own_scores,
                    f"{spec}: declares own_scores = {declared.own_scores} but detect() returned "
                    f"{'no' if detection.image_scores is None else ''} image scores: declare what it does")
            _expect(not declared.image_level or tuple(maps.shape[-2:]) == (1, 1),
                    f"{spec}: declares image_level but its map is {tuple(maps.shape[-2:])}, not (1, 1)")
            if detection.image_scores is not None:
                scores = detection.image_scores
                _expect(scores.shape == (len(test),), f"{spec}: image scores must be (B,), got {tuple(scores.shape)}")
            alone = trained.detect(test[1:2]).anomaly_map
        _expect(torch.allclose(alone, maps[1:2], rtol=1e-4, atol=1e-5),
                f"{spec}: an image's map changes with the rest of its batch (batch statistics at inference?)")
        restored = _build_detector(catalog, spec, image_size, context)
        restore(restored, load_checkpoint(first), first)
        restored.eval()
        hint = "state outside the state dict? fitted buffers not listed in fitted_buffers?"
        try:
            with torch.inference_mode():
                restored_maps = restored.detect(test).anomaly_map
        except Exception as exc:  # any failure here is the contract broken
            raise ContractError(f"{spec}: a detector restored from its checkpoint fails ({type(exc).__name__}: "
                                f"{exc}) where the trained one gives maps: {hint}") from exc
        _expect(torch.allclose(restored_maps, maps, rtol=1e-4, atol=1e-5),
                f"{spec}: a detector restored from its checkpoint gives other maps: {hint}")
        again = _build_detector(catalog, spec, image_size, context)
        train_detector(again, train, settings, cpu, Path(folder) / "again.pt", meta={})
        again.eval()
        with torch.inference_mode():
            _expect(torch.allclose(again.detect(test).anomaly_map, maps, rtol=1e-4, atol=1e-5),
                    f"{spec}: two trainings with the same seed give other maps (randomness not drawn from the "
                    "generator the engine passes?)")
    return trained


def _maps(batch: int = 3, size: int = 16) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 1, size, size, generator=generator) * 4


def check_postprocessor(spec: str, catalog: Catalog | None = None, size: int = 32) -> nn.Module:
    """A post-processor maps (B, 1, H, W) to (B, 1, H', W') finite floats of the input's dtype and device, and
    treats each image of a batch on its own."""
    post = _catalog(catalog)["postprocessor"].create(spec)
    maps = _maps(size=size)
    out = post(maps)
    _check_map(out, len(maps), f"{spec}")
    _expect(out.dtype == maps.dtype and out.device == maps.device, f"{spec}: output dtype/device must follow the input")
    _expect(torch.allclose(post(maps[1:2]), out[1:2], rtol=1e-4, atol=1e-5),
            f"{spec}: an image's output changes with the rest of its batch")
    return post


def check_scorer(spec: str, catalog: Catalog | None = None) -> nn.Module:
    """A scorer reduces (B, 1, H, W) to (B,) finite floats, each image on its own. (No monotonicity is asked:
    maxmin, a ratio, scores a map raised everywhere lower.)"""
    scorer = _catalog(catalog)["scorer"].create(spec)
    maps = _maps()
    scores = scorer(maps)
    _expect(isinstance(scores, Tensor) and scores.shape == (len(maps),),
            f"{spec}: scores must be (B,)={len(maps)}, got {getattr(scores, 'shape', type(scores).__name__)}")
    _expect(scores.is_floating_point() and bool(torch.isfinite(scores).all()), f"{spec}: scores must be finite floats")
    _expect(torch.allclose(scorer(maps[1:2]), scores[1:2], rtol=1e-4, atol=1e-5),
            f"{spec}: an image's score changes with the rest of its batch")
    return scorer


def check_loss(spec: str, catalog: Catalog | None = None, size: int = 32) -> nn.Module:
    """A reconstruction loss takes (prediction, target), both (B, 3, H, W) in [0, 1], and returns a finite
    scalar whose gradient reaches the prediction; it computes in float32 under bf16 autocast."""
    loss = _catalog(catalog)["loss"].create(spec)
    target = tiny_images(2, size)
    prediction = (target + 0.1 * torch.rand(target.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    prediction.requires_grad_(True)
    value = loss(prediction, target)
    _expect(isinstance(value, Tensor) and value.ndim == 0, f"{spec}: must return a scalar (0-dim) tensor")
    _expect(bool(torch.isfinite(value)), f"{spec}: returned {float(value.detach())}")
    value.backward()
    _expect(prediction.grad is not None and bool(torch.isfinite(prediction.grad).all()),
            f"{spec}: no finite gradient reaches the prediction")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(prediction.detach().bfloat16(), target.bfloat16())
    _expect(low.dtype == torch.float32, f"{spec}: under bf16 autocast it returns {low.dtype}; decorate forward "
                                        "with adkit.run.precision.in_float32")
    return loss


class _TinyEnergy(EnergyNetwork):
    """f(x) (B,) of a small convolutional network: the kind of network samplers climb."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, 0]


def check_sampler(spec: str, catalog: Catalog | None = None, network: nn.Module | None = None,
                  size: int = 16) -> Sampler:
    """A sampler returns detached samples of x0's shape, the same for the same generator seed, and counts its
    passes through the network."""
    sampler = _catalog(catalog)["sampler"].create(spec)
    network = network if network is not None else _TinyEnergy()
    x0 = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = sampler.sample(network, x0.clone(), torch.Generator().manual_seed(3))
    _expect(isinstance(first, Tensor) and first.shape == x0.shape, f"{spec}: samples must have x0's shape")
    _expect(not first.requires_grad, f"{spec}: samples must be detached")
    second = sampler.sample(network, x0.clone(), torch.Generator().manual_seed(3))
    _expect(torch.equal(first, second), f"{spec}: the same generator seed must give the same samples")
    _expect(sampler.full_passes + sampler.first_layer_passes > 0, f"{spec}: counts no passes through the network")
    return sampler


def check_backbone(spec: str, catalog: Catalog | None = None, size: int = 64) -> Backbone:
    """A backbone is frozen and stays in eval mode, and each stage's features have the declared channels and
    stride."""
    backbone = _catalog(catalog)["backbone"].create(spec)
    _expect(len(backbone.channels) == len(backbone.strides) > 0, f"{spec}: declare channels and strides per stage")
    _expect(not any(p.requires_grad for p in backbone.parameters()), f"{spec}: call self.freeze() in __init__")
    backbone.train()
    _expect(not backbone.training, f"{spec}: must stay in eval mode")
    stages = list(range(len(backbone.channels)))
    size = max(size, max(backbone.strides))
    with torch.inference_mode():
        features = backbone(tiny_images(2, size), stages)
    _expect(len(features) == len(stages), f"{spec}: returned {len(features)} feature maps for {len(stages)} stages")
    for stage, feature in zip(stages, features):
        expected = (2, backbone.channels[stage], size // backbone.strides[stage], size // backbone.strides[stage])
        _expect(tuple(feature.shape) == expected, f"{spec}: stage {stage} gives {tuple(feature.shape)}, declared "
                                                  f"{expected}")
    return backbone


def check_ensemble(spec: str, catalog: Catalog | None = None, detectors: int = 2) -> Ensemble:
    """An ensemble fitted on normal scores combines one (N,) tensor per detector into (N,) finite scores, and
    ranks an image that every detector scores higher at least as high."""
    ensemble = _catalog(catalog)["ensemble"].create(spec)
    generator = torch.Generator().manual_seed(0)
    ensemble.fit([torch.rand(20, generator=generator) * (i + 1) for i in range(detectors)])
    scores = [torch.linspace(0, 1, 5) * (i + 1) for i in range(detectors)]
    combined = ensemble.combine(scores)
    _expect(isinstance(combined, Tensor) and combined.shape == (5,), f"{spec}: combine must return (N,)=5 scores")
    _expect(bool(torch.isfinite(combined).all()), f"{spec}: combined scores must be finite")
    _expect(bool((combined[1:] >= combined[:-1]).all()), f"{spec}: higher scores from every detector must not "
                                                         "rank lower")
    return ensemble


def check_dataset(spec: str, catalog: Catalog | None = None, image_size: int = 32) -> AnomalyDataset:
    """A dataset lists categories and loads each one's splits: training images all normal, test images with
    labels 0/1 and masks only where anomalous, every image readable."""
    dataset = _catalog(catalog)["dataset"].create(spec)
    categories = dataset.categories()
    _expect(len(categories) > 0, f"{spec}: lists no categories")
    splits = dataset.load(categories[0])
    _expect(len(splits.train) > 0, f"{spec}: {categories[0]} has no training images")
    _expect(all(s.label == 0 for s in splits.train + splits.val), f"{spec}: training and validation must be normal")
    _expect(all(s.label in (0, 1) for s in splits.test), f"{spec}: test labels must be 0 or 1")
    _expect(all(s.mask is None for s in splits.test if s.label == 0), f"{spec}: a normal test image has a mask")
    for split in (splits.train, splits.val, splits.test):
        loaded = load_split(split, image_size)
        _expect(not loaded.skipped, f"{spec}: unreadable images {loaded.skipped[:2]}")
    return dataset
