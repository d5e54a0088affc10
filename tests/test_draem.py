from __future__ import annotations

import json
import math

import pytest
import torch

from adkit.core.components import DetectorContext
from adkit.core.errors import AdkitError
from adkit.data.perlin import perlin_noise
from adkit.run.engine import TrainSettings, load_checkpoint, train_detector
from adkit_plugins.draem import synthesis
from adkit_plugins.draem.detector import Draem, random_crops
from adkit_plugins.draem.networks import DiscriminativeSubNetwork, ReconstructiveSubNetwork
from adkit_plugins.draem.synthesis import AnomalySource, SynthesisSettings, rotate, synthesize


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_default_widths():
    assert count(ReconstructiveSubNetwork()) == 69_048_579
    assert count(DiscriminativeSubNetwork()) == 28_374_146


def tiny_draem(catalog, losses=(), replace=False):
    torch.manual_seed(0)
    detector = Draem(recon_width=4, disc_width=4, lr=1e-3, schedule="constant")
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=torch.device("cpu"),
                                   losses=list(losses), replace_losses=replace))
    return detector


def test_losses_compose_by_name(catalog):
    names = [name for name, _, _ in tiny_draem(catalog, ["color:weight=0.1", "psnr:weight=0.2"]).reconstruction_losses]
    assert names == ["l2:weight=1.0", "ssim:weight=1.0", "color:weight=0.1", "psnr:weight=0.2"]
    only = tiny_draem(catalog, ["l2"], replace=True).reconstruction_losses
    assert [w for _, w, _ in only] == [1.0] and len(only) == 1


def test_training_steps_decrease_loss_on_a_fixed_batch(catalog):
    detector = tiny_draem(catalog)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    optimizer, _ = detector.configure_optimizer(10)
    losses = []
    for _ in range(15):
        out = detector.training_step(images, torch.Generator().manual_seed(7))  # same synthesis every step
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0]


def test_training_step_under_bf16_autocast_matches_float32(catalog):
    # the quick preset's setting, where SSIM under bf16 autocast was NaN at the first step: smooth 64 px images
    detector = tiny_draem(catalog)
    images = (0.6 + 0.05 * perlin_noise(4, (64, 64), (4, 4), generator=torch.Generator().manual_seed(2))
              ).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    fp32 = detector.training_step(images, torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = detector.training_step(images, torch.Generator().manual_seed(7))
    for key in ("l2", "ssim", "focal", "loss"):
        assert torch.isfinite(bf16[key]), key
        assert bf16[key].item() == pytest.approx(fp32[key].item(), rel=0.05), key


def test_anomaly_map_shape_and_range(catalog):
    maps = tiny_draem(catalog).eval().anomaly_map(torch.rand(2, 3, 32, 32))
    assert maps.shape == (2, 1, 32, 32) and 0 <= maps.min() and maps.max() <= 1


def _train(catalog, path, steps, resume=False, every=0):
    detector = tiny_draem(catalog)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    settings = TrainSettings(steps=steps, batch_size=2, seed=5, checkpoint_every=every)
    train_detector(detector, images, settings, torch.device("cpu"), path, {"detector": "draem"}, resume=resume)
    return detector


def test_resume_reaches_the_same_weights(catalog, tmp_path):
    straight = _train(catalog, tmp_path / "a.pt", steps=6)
    # an interrupted run: stop after 3 steps (as a kill would leave the step-3 checkpoint), then resume
    _train(catalog, tmp_path / "b.pt", steps=3)
    payload = load_checkpoint(tmp_path / "b.pt")
    payload["total_steps"] = 6
    resumed = _train(catalog, tmp_path / "b.pt", steps=6, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_existing_checkpoint_is_never_overwritten_without_resume(catalog, tmp_path):
    _train(catalog, tmp_path / "c.pt", steps=1)
    before = (tmp_path / "c.pt").read_bytes()
    with pytest.raises(AdkitError, match="pass --resume"):
        _train(catalog, tmp_path / "c.pt", steps=1)
    assert (tmp_path / "c.pt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(catalog, tmp_path):
    path = tmp_path / "n.pt"
    _train(catalog, path, steps=2, every=1)
    good = path.read_bytes()
    detector = tiny_draem(catalog)
    images = torch.full((6, 3, 32, 32), math.nan)
    with pytest.raises(AdkitError, match="non-finite loss .* last good checkpoint is kept"):
        train_detector(detector, images, TrainSettings(steps=4, batch_size=2, checkpoint_every=1),
                       torch.device("cpu"), path, {}, resume=True)
    assert path.read_bytes() == good


def slow_synthesis_stats(n, size, seed):
    """Per-sample reference: one Perlin field per sample, rotated, thresholded; p = 0.5 no anomaly."""
    g = torch.Generator().manual_seed(seed)
    coverage, empty = [], 0
    for _ in range(n):
        a, b = torch.randint(0, 6, (2,), generator=g).tolist()
        noise = perlin_noise(1, (size, size), (2**a, 2**b), generator=g)
        noise = rotate(noise[:, None], torch.empty(1).uniform_(-90, 90, generator=g))
        mask = (noise > 0.5).float()
        if torch.rand((), generator=g) < 0.5:
            mask.zero_()
        empty += int(mask.sum() == 0)
        coverage.append(mask.mean().item())
    return torch.tensor(coverage), empty / n


def test_batched_synthesis_statistics_match_slow_reference():
    size, n = 32, 400
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))
    batch = synthesize(images, torch.Generator().manual_seed(4))
    assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 <= batch.beta.min() and batch.beta.max() < 0.8
    coverage = batch.mask.mean(dim=(1, 2, 3))
    reference, reference_empty = slow_synthesis_stats(n, size, 5)
    empty = (coverage == 0).float().mean().item()
    assert abs(empty - reference_empty) < 0.1 and 0.45 < empty < 0.75
    nonzero, ref_nonzero = coverage[coverage > 0], reference[reference > 0]
    assert abs(nonzero.mean() - ref_nonzero.mean()) < 0.03
    # outside the mask the image is the (possibly rotated) normal image; inside it is the blend
    outside = batch.mask == 0
    assert torch.equal(batch.augmented.expand_as(images)[outside.expand_as(images)],
                       batch.normal[outside.expand_as(images)])
    rotated = ~torch.isclose(batch.normal, images).flatten(1).all(dim=1)
    assert 0.2 < rotated.float().mean() < 0.4


def test_texture_source_and_augmentations(tmp_path):
    import numpy as np
    from PIL import Image

    for i in range(3):
        folder = tmp_path / "images" / f"class{i}"
        folder.mkdir(parents=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.jpg")
    source = AnomalySource(tmp_path / "images", 32, torch.device("cpu"))
    images = torch.rand(16, 3, 32, 32)
    batch = synthesize(images, torch.Generator().manual_seed(0), source, SynthesisSettings(no_anomaly_p=0.0))
    assert batch.augmented.min() >= 0 and batch.augmented.max() <= 1
    assert batch.has_anomaly.any()
    with pytest.raises(AdkitError, match="not a folder"):
        AnomalySource(tmp_path / "nope", 32, torch.device("cpu"))


def test_cli_train_test_predict_on_a_folder(invoke, tmp_path):
    data = "synthetic:size=32,n_train=8,n_test=6"
    out = tmp_path / "run"
    common = ["--data", data, "--category", "carpet", "--image-size", "32", "--steps", "3", "--batch-size", "2"]
    code, _, err = invoke("run", "--detector", "draem:recon_width=4,disc_width=4", "--post", "freqmask",
                          "--scorer", "maxmin", *common, "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "carpet" / "metrics.json").read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "threshold"} <= set(metrics)
    checkpoint = out / "carpet" / "checkpoint.pt"
    code, _, err = invoke("test", "--checkpoint", str(checkpoint), "--data", data, "--out", str(tmp_path / "t"))
    assert code == 0, err
    tested = json.loads((tmp_path / "t" / "carpet" / "metrics.json").read_text())
    timings = ("train_s", "infer_img_s")  # the restored pipeline (freqmask, maxmin) reproduces the run's evaluation
    assert {k: v for k, v in tested.items() if k not in timings} == \
        {k: v for k, v in metrics.items() if k not in timings}
    images = out / "carpet" / "overlays"  # a folder of unlabelled PNGs
    code, _, err = invoke("predict", "--checkpoint", str(checkpoint), str(images), "--out", str(tmp_path / "p"))
    assert code == 0, err
    rows = (tmp_path / "p" / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,label,score,prediction" and len(rows) > 1
    assert all(row.rsplit(",", 1)[1] in ("0", "1") for row in rows[1:])  # threshold fitted by run on validation
    config_before = (out / "config.toml").read_text()
    code, _, err = invoke("run", "--detector", "draem:recon_width=4,disc_width=4", *common, "--out", str(out))
    assert code != 0 and "already holds a run" in err and "--resume" in err
    assert (out / "config.toml").read_text() == config_before  # nothing of the earlier run overwritten


def test_fallback_sources_without_a_texture_folder():
    images = torch.rand(8, 3, 32, 32) * 0.1

    def synthesize_with(fallback):
        # beta ~ 0 and no rotation: inside the mask the augmented image is the anomaly source itself
        settings = SynthesisSettings(no_anomaly_p=0.0, beta_max=1e-6, rotate_p=0.0, fallback=fallback)
        return synthesize(images, torch.Generator().manual_seed(1), None, settings)

    grey = synthesize_with("perlin")
    inside = grey.mask[:, 0].bool()
    assert inside.any()
    source = grey.augmented.permute(0, 2, 3, 1)[inside]  # (pixels, 3)
    assert torch.allclose(source[:, 0], source[:, 1]) and torch.allclose(source[:, 1], source[:, 2])
    assert source.min() >= 0.5 - 1e-4 and source.max() <= 0.75 + 1e-4  # noise * 0.5 + 0.25 where noise > 0.5
    for name in ("noise-texture", "self"):
        batch = synthesize_with(name)
        inside = batch.mask[:, 0].bool()
        source = batch.augmented.permute(0, 2, 3, 1)[inside]
        assert 0 <= source.min() and source.max() <= 1
        assert (source[:, 0] - source[:, 1]).abs().max() > 0.05  # coloured, not grey
        outside = ~batch.mask.bool().expand_as(images)
        assert torch.equal(batch.augmented[outside], images[outside])
    with pytest.raises(ValueError, match="fallback 'dtd'"):
        synthesize_with("dtd")


def test_random_crops_are_slices_of_each_image():
    b, c, h, w, side = 6, 2, 9, 7, 4
    images = torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)  # every value unique
    crops = random_crops(images, side, torch.Generator().manual_seed(0))
    assert crops.shape == (b, c, side, side)
    offsets = set()
    for i in range(b):
        # the top-left value locates the crop; the crop must then be exactly that slice of image i
        where = (images[i, 0] == crops[i, 0, 0, 0]).nonzero()
        assert where.shape[0] == 1
        top, left = where[0].tolist()
        assert top + side <= h and left + side <= w
        assert torch.equal(crops[i], images[i, :, top:top + side, left:left + side])
        offsets.add((top, left))
    assert len(offsets) > 1  # drawn per image
    same = random_crops(images, side, torch.Generator().manual_seed(0))
    assert torch.equal(crops, same)


def test_training_on_crops_and_mapping_whole_images(catalog):
    with pytest.raises(ValueError, match="crop=48"):
        Draem(crop=48)
    torch.manual_seed(0)
    detector = Draem(recon_width=4, disc_width=4, lr=1e-3, schedule="constant", crop=32)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=64, device=torch.device("cpu")))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = detector.reconstructive.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    out = detector.training_step(images, torch.Generator().manual_seed(3))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert seen[0].shape == (2, 3, 32, 32)  # the networks trained on 32 px crops of the 64 px images
    detector.eval()
    with torch.no_grad():
        assert detector.anomaly_map(images).shape == (2, 1, 64, 64)  # whole images at test time
    assert seen[1].shape == (2, 3, 64, 64)
    hook.remove()
    # each crop is a window of its own image, drawn by the generator
    crops = random_crops(images, 32, torch.Generator().manual_seed(5))
    for image, crop in zip(images, crops):
        windows = image.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 33, 33, 32, 32)
        assert (windows == crop[:, None, None]).flatten(3).all(dim=(0, 3)).any()
    assert torch.equal(crops, random_crops(images, 32, torch.Generator().manual_seed(5)))


def test_augmenting_only_the_samples_that_use_an_augmenter_gives_the_whole_batch_result():
    """The CPU path runs each augmenter on the samples that drew it; the GPU path on the whole batch, keeping
    those samples. Every augmenter works per sample and draws its magnitudes for the whole batch, so the two
    agree image for image, whatever was chosen."""
    images = torch.rand(12, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    for seed in range(6):
        chosen = synthesis.choose_augmenters(12, 3, torch.Generator().manual_seed(seed), images.device)
        chosen[0] = False  # a sample with no augmenter, and one with every augmenter
        chosen[1] = True
        subset = synthesis.augment(images, chosen, torch.Generator().manual_seed(100 + seed), subset=True)
        whole = synthesis.augment(images, chosen, torch.Generator().manual_seed(100 + seed), subset=False)
        torch.testing.assert_close(subset, whole, atol=1e-6, rtol=0)
        assert torch.equal(subset[0], images[0].clamp(0, 1))


def test_noise_texture_pool_is_made_once_from_the_start_generator(catalog, tmp_path):
    pool = synthesis.noise_texture_pool(70, (16, 16), torch.Generator().manual_seed(3))
    again = synthesis.noise_texture_pool(70, (16, 16), torch.Generator().manual_seed(3))
    assert pool.textures.shape == (70, 3, 16, 16) and pool.textures.dtype == torch.uint8
    assert torch.equal(pool.textures, again.textures)  # two chunks of POOL_CHUNK, the same for the same seed
    assert len({t.float().mean().item() for t in pool.textures}) == 70  # distinct textures
    drawn = pool.draw(5, torch.Generator().manual_seed(0))
    assert drawn.shape == (5, 3, 16, 16) and 0 <= drawn.min() and drawn.max() <= 1
    # inside training: made at the training images' size before the first step; a resumed run makes the same
    # pool and reaches the same weights
    detector = Draem(recon_width=4, disc_width=4, lr=1e-3, schedule="constant", fallback="noise-texture", pool=16)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=torch.device("cpu")))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    train_detector(detector, images, TrainSettings(steps=2, batch_size=2), torch.device("cpu"),
                   tmp_path / "a.pt", meta={})
    assert detector.source.textures.shape == (16, 3, 32, 32)
    with pytest.raises(ValueError, match="only with fallback=noise-texture"):
        Draem(fallback="perlin", pool=8)
    with pytest.raises(ValueError, match="pool=-1"):
        Draem(fallback="noise-texture", pool=-1)
