"""Input geometry and tiling: aspect ratios kept, maps returned at each image's own size, tiles stitched without
seams, small defects in large images found with tiles and lost without; bad geometry options in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adkit.core.tiling import Tiling, tile_starts
from adkit.data.geometry import Geometry, GeometryError, native_geometry, parse_size


def test_sizes_parse_as_width_by_height():
    assert parse_size(256) == (256, 256) and parse_size("512x256") == (256, 512)
    with pytest.raises(GeometryError, match="WIDTHxHEIGHT"):
        parse_size("big")


@pytest.mark.parametrize("resize", ["squash", "pad", "crop"])
def test_a_map_goes_back_to_the_image_it_came_from(resize):
    # a 1:3 image whose value is its column index: brought to the input and back, every pixel keeps its value
    # (crop: where the input saw it)
    h0, w0 = 90, 30
    image = torch.arange(w0, dtype=torch.float32).expand(3, h0, w0) / w0
    geometry = Geometry(48, 48, resize)
    x, placement = geometry.to_input(image)
    assert x.shape == (3, 48, 48)
    back = geometry.to_original(x[:1], placement)
    assert back.shape == (1, h0, w0)
    # the middle row (crop keeps the width of a portrait image and cuts its height): values where they were
    assert torch.allclose(back[0, 45, 1:-1], image[0, 45, 1:-1], atol=0.06)
    if resize == "pad":  # the padding repeats the border, the image keeps its shape: 16 px wide in the middle
        assert placement.scaled == (48, 16) and placement.offset == (0, 16)


def test_tiles_cover_the_input_and_stitch_without_seams():
    assert tile_starts(100, 32, 0.25) == [0, 24, 48, 68]  # the last tile ends at the border
    tiling = Tiling((100, 70), 32, 0.25)
    constant = torch.full((2 * tiling.count, 1, 32, 32), 0.37)
    assert torch.allclose(tiling.stitch(constant), torch.full((2, 1, 100, 70), 0.37), atol=1e-6)
    # a per-pixel detector (here: the mean over channels) tiled and stitched equals it run on the whole image
    images = torch.rand(2, 3, 100, 70)
    tiles = tiling.split(images)
    assert tiles.shape == (2 * tiling.count, 3, 32, 32)
    stitched = tiling.stitch(tiles.mean(1, keepdim=True))
    torch.testing.assert_close(stitched, images.mean(1, keepdim=True), atol=1e-6, rtol=1e-6)


def textured(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blobs of a few pixels: a texture whose grain is larger than a small defect."""
    coarse = rng.normal(0.5, 0.08, (size // 4, size // 4))
    return np.kron(coarse, np.ones((4, 4)))


def write_category(root, size: tuple[int, int], defect: int, seed: int = 0, n_train: int = 24, n_test: int = 8):
    """MVTec layout: normal textured images of (h, w) and defective ones with a bright square of ``defect`` px."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = root / "part"

    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)

    def texture():
        return textured(rng, max(h, w))[:h, :w]

    for i in range(n_train):
        save(base / "train" / "good" / f"{i:03d}.png", texture())
    for i in range(n_test):
        save(base / "test" / "good" / f"{i:03d}.png", texture())
        image, mask = texture(), np.zeros((h, w))
        y, x = rng.integers(4, h - defect - 4), rng.integers(4, w - defect - 4)
        image[y:y + defect, x:x + defect] = 1.0
        mask[y:y + defect, x:x + defect] = 1.0
        save(base / "test" / "dot" / f"{i:03d}.png", image)
        save(base / "ground_truth" / "dot" / f"{i:03d}_mask.png", mask)
    return root


def test_a_small_defect_in_a_large_image_is_found_with_tiles_and_lost_without(invoke, tmp_path):
    root = write_category(tmp_path / "data", (128, 128), defect=2)
    results = {}
    for name, args in {"whole": ["--image-size", "32"],
                       "tiled": ["--image-size", "128", "--tile", "32", "--overlap", "0.25"]}.items():
        code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "mvtec", "--root", str(root),
                              "--out", str(tmp_path / name), *args)
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "part" / "metrics.json").read_text())
    assert results["tiled"]["image_auroc"] >= 0.95 and results["tiled"]["recall"] >= 0.75
    assert results["whole"]["image_auroc"] <= 0.75


def test_a_one_to_three_image_keeps_its_shape_and_its_defect_where_the_mask_says(invoke, tmp_path):
    root = write_category(tmp_path / "data", (96, 32), defect=5)  # 1:3, portrait
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "mvtec", "--root", str(root), "--image-size",
                          "96", "--resize", "pad", "--out", str(tmp_path / "run"))
    assert code == 0, err
    checkpoint = tmp_path / "run" / "part" / "checkpoint.pt"
    images = sorted((root / "part" / "test" / "dot").glob("*.png"))[:3]
    code, _, err = invoke("predict", "--checkpoint", str(checkpoint), *map(str, images), "--save-maps",
                          "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert "are scaled to fit and padded" in " ".join(err.split())
    for image in images:
        anomaly_map = np.load(tmp_path / "p" / "maps" / f"{image.stem}.npy")
        mask = np.asarray(Image.open(root / "part" / "ground_truth" / "dot" / f"{image.stem}_mask.png")) > 127
        assert anomaly_map.shape == mask.shape == (96, 32)
        y, x = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        assert mask[max(0, y - 1):y + 2, max(0, x - 1):x + 2].any()  # the peak on the defect (within a pixel)
    overlay = Image.open(tmp_path / "p" / "overlays" / f"{images[0].stem}.png")
    assert overlay.height == 96  # panels at the image's own size


def test_the_default_geometry_tiles_long_images_at_their_own_aspect():
    assert native_geometry(256, (1257, 500)) == Geometry(640, 256, "squash", 256, 0.25)  # KolektorSDD, 1:2.5
    assert native_geometry(256, (300, 760)) == Geometry(256, 640, "squash", 256, 0.25)  # landscape
    assert native_geometry(64, (1257, 500)) == Geometry(160, 64, "squash", 64, 0.25)  # a preset's side
    for near_square in ((300, 300), (261, 229), (200, 299), None):  # up to 1:1.5 squashed as before
        assert native_geometry(256, near_square) == Geometry(256, 256)
    assert tile_starts(640, 256, 0.25) == [0, 192, 384]  # the long side is whole strides: no tile moved back


def test_a_run_on_long_images_tiles_them_unless_a_geometry_is_given(invoke, tmp_path):
    root = write_category(tmp_path / "data", (96, 32), defect=5)  # 1:3, portrait
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "mvtec", "--root", str(root),
                          "--out", str(tmp_path / "auto"))
    assert code == 0, err
    assert "tiles of 256 px over 256x832, at their own aspect" in " ".join(err.split())
    config = (tmp_path / "auto" / "config.toml").read_text()
    assert 'image_size = "256x832"' in config and "tile = 256" in config and "overlap = 0.25" in config
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "mvtec", "--root", str(root), "--image-size",
                          "64", "--out", str(tmp_path / "given"))
    assert code == 0, err
    assert "image_size = 64" in (tmp_path / "given" / "config.toml").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--image-size", "64", "--tile", "96"], "--tile 96 is larger than the image (64x64)"),
    (["--image-size", "64", "--tile", "32", "--overlap", "1"], "--overlap 1.0 must be in [0, 1)"),
    (["--image-size", "64", "--tile", "32", "--overlap", "-0.5"], "--overlap -0.5 must be in [0, 1)"),
    (["--image-size", "96x32"], "is not square: detectors see square inputs; add --tile SIZE"),
    (["--image-size", "64", "--overlap", "0.5"], "--overlap needs --tile SIZE"),
    (["--image-size", "64x"], "write a side in pixels (256) or WIDTHxHEIGHT"),
])
def test_bad_geometry_fails_in_one_line_and_writes_nothing(invoke, tmp_path, args, needle):
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", "synthetic:size=32,n_train=4,n_test=4",
                          "--category", "tile", "--out", str(tmp_path / "run"), *args)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
