from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adkit.core.errors import AdkitError
from adkit.data.io import ImageReadError, load_image, load_mask, save_image
from adkit.data.loading import load_split
from adkit.data.textures import DEFECTS, TEXTURES, defective_image, normal_image
from adkit.data.textures import write_textures as write_dataset
from adkit_plugins.datasets.layouts import FolderDataset, MVTecDataset


def test_grayscale_rgba_and_16bit(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((4, 6), 51, np.uint8)).save(gray)
    t = load_image(gray)
    assert t.shape == (3, 4, 6) and torch.allclose(t, torch.full_like(t, 0.2))
    rgba = tmp_path / "a.png"
    Image.fromarray(np.dstack([np.full((4, 4), v, np.uint8) for v in (255, 0, 0, 10)])).save(rgba)
    assert torch.allclose(load_image(rgba)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)).save(deep)
    assert abs(load_image(deep).mean().item() - 0.5) < 1e-3
    assert load_image(gray, 8).shape == (3, 8, 8)


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_bad_files_name_the_file(tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png"):
        load_image(bad)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="t.jpg"):
        load_image(path)


def test_mask_binarised_after_resize(tmp_path):
    path = tmp_path / "m.png"
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(path)
    m = load_mask(path, 4)
    assert set(m.unique().tolist()) <= {0.0, 1.0} and m[0, :, :2].all() and not m[0, :, 2:].any()


def test_mvtec_layout(mvtec_tree):
    ds = MVTecDataset(root=str(mvtec_tree))
    assert ds.categories() == ["widget"]
    splits = ds.load("widget")
    assert len(splits.train) + len(splits.val) == 6 and len(splits.val) == 1
    assert sorted(s.label for s in splits.test) == [0, 0, 1, 1]
    loaded = load_split(splits.test, 16)
    assert loaded.images.shape == (4, 3, 16, 16) and loaded.masks[loaded.labels == 1].sum() > 0


def test_mvtec_errors(mvtec_tree):
    ds = MVTecDataset(root=str(mvtec_tree))
    with pytest.raises(AdkitError, match="velvet"):
        ds.resolve_categories(["velvet"])
    with pytest.raises(AdkitError, match="none of the textures"):
        ds.resolve_categories(["textures"])
    orphan = mvtec_tree / "widget" / "ground_truth" / "scratch" / "999_mask.png"
    orphan.write_bytes((mvtec_tree / "widget" / "ground_truth" / "scratch" / "000_mask.png").read_bytes())
    with pytest.raises(AdkitError, match="orphan mask .*999_mask.png"):
        ds.load("widget")
    orphan.unlink()
    (mvtec_tree / "widget" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(AdkitError, match="001.png has no mask"):
        ds.load("widget")
    with pytest.raises(AdkitError, match="--root"):
        MVTecDataset(root="")


def test_skip_bad_counts(mvtec_tree):
    (mvtec_tree / "widget" / "test" / "good" / "zz.png").write_bytes(b"junk")
    splits = MVTecDataset(root=str(mvtec_tree)).load("widget")
    with pytest.raises(ImageReadError, match="zz.png"):
        load_split(splits.test, 8)
    loaded = load_split(splits.test, 8, skip_bad=True)
    assert len(loaded.samples) == 4 and len(loaded.skipped) == 1


def test_folder_dataset(mvtec_tree):
    base = mvtec_tree / "widget"
    ds = FolderDataset(normal=str(base / "train" / "good"), abnormal=str(base / "test" / "scratch"),
                       masks=str(base / "ground_truth" / "scratch"))
    splits = ds.load(ds.categories()[0])
    test_paths = {s.path for s in splits.test}
    assert not test_paths & {s.path for s in splits.train + splits.val}
    assert sum(s.label for s in splits.test) == 2 and all(s.mask for s in splits.test if s.label)
    assert splits.val and not {s.path for s in splits.val} & {s.path for s in splits.train}
    with pytest.raises(AdkitError, match="is not a folder"):
        FolderDataset(normal=str(base / "nothing"))
    # the category is named by the folder the normal folder sits in, or by the user; never 'good' or 'normal'
    assert ds.categories() == ["train"]
    assert FolderDataset(normal=str(base / "train" / "good"), name="widget").categories() == ["widget"]
    with pytest.raises(AdkitError, match="must be a plain name"):
        FolderDataset(normal=str(base / "train" / "good"), name="a/b")


def test_folder_runs_name_their_category_after_the_product(invoke, tmp_path):
    product = tmp_path / "bracket"
    (product / "normal").mkdir(parents=True)
    (product / "defective").mkdir()
    for i in range(8):
        save_image(normal_image("wood", 32, 0, "train", i), product / "normal" / f"{i}.png")
    for i in range(2):
        save_image(defective_image("wood", DEFECTS[i], 32, 0, i)[0], product / "defective" / f"{i}.png")
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--normal", str(product / "normal"),
                          "--abnormal", str(product / "defective"), "--image-size", "32", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert (tmp_path / "run" / "bracket" / "metrics.json").is_file()
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| bracket |" in summary and "| normal |" not in summary


def test_synthetic_is_deterministic_and_masks_are_exact():
    a = normal_image("wood", 48, 3, "train", 5)
    assert torch.equal(a, normal_image("wood", 48, 3, "train", 5))
    assert not torch.equal(a, normal_image("wood", 48, 3, "train", 6))
    for category in TEXTURES:
        for defect in DEFECTS:
            image, mask = defective_image(category, defect, 48, 0, 1)
            assert image.shape == (3, 48, 48) and 0 <= image.min() and image.max() <= 1
            assert mask.sum() > 0 and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_synth_output_reads_back_unchanged(tmp_path):
    write_dataset(tmp_path, ["grid"], 32, 0, 4, 4)
    splits = MVTecDataset(root=str(tmp_path), val_fraction=0).load("grid")
    assert len(splits.train) == 4 and len(splits.test) == 4
    loaded = load_split(splits.test, 32)
    for sample, image, mask in zip(loaded.samples, loaded.images, loaded.masks):
        if sample.label:
            index = int(sample.path.stem)
            expected_image, expected_mask = defective_image("grid", sample.defect, 32, 0, index)
            assert torch.equal(mask, expected_mask)
            assert (image - expected_image).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG rounding only


def test_magnetic_tile_reads_as_is():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic-tile"
    if not root.is_dir():
        pytest.skip("shared magnetic-tile data not beside this checkout")
    splits = MVTecDataset(root=str(root)).load("magnetic_tile")
    assert len(splits.train) + len(splits.val) == 571 and sum(s.label for s in splits.test) > 0
    loaded = load_split(splits.test[:4] + splits.test[-4:], 64)
    assert loaded.images.shape == (8, 3, 64, 64)


def test_synth_command_writes_what_mvtec_reads(invoke, tmp_path):
    out = tmp_path / "synth"
    code, _, err = invoke("synth", "--out", str(out), "--category", "leather", "--size", "32", "--train", "3",
                          "--test", "4")
    assert code == 0, err
    splits = MVTecDataset(root=str(out), val_fraction=0).load("leather")
    assert len(splits.train) == 3 and sum(s.label for s in splits.test) == 2
    code, _, err = invoke("synth", "--out", str(out), "--category", "velvet")
    assert code != 0 and "unknown category 'velvet'" in err


def test_batched_perlin_equals_per_resolution_noise():
    import math

    from adkit.data.perlin import noise_from_angles, perlin_noise, perlin_noise_batch

    size, top = (40, 56), 32
    resolutions = [(1, 1), (2, 32), (32, 4), (8, 8), (16, 1)]
    angles = torch.zeros(len(resolutions), top + 1, top + 1)
    expected = []
    for b, (ry, rx) in enumerate(resolutions):  # perlin_noise draws its lattice as below; place it in the corner
        angles[b, :ry + 1, :rx + 1] = 2 * math.pi * torch.rand(1, ry + 1, rx + 1, generator=torch.Generator().manual_seed(b))
        expected.append(perlin_noise(1, size, (ry, rx), generator=torch.Generator().manual_seed(b))[0])
    got = noise_from_angles(angles, torch.tensor(resolutions), size)
    assert got.shape == (5, *size)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)
    drawn = perlin_noise_batch(torch.tensor(resolutions), size, top, torch.Generator().manual_seed(0))
    assert drawn.shape == (5, *size) and drawn.abs().max() <= 1.5 and drawn[0].std() > 0
