"""PatchCore with labelled defects: which defective patches join the second bank (masks, labels only, tiles), the
score they weight (by hand and against brute force), the checkpoint, and a run that learns from them."""

from __future__ import annotations

import json

import torch
from test_feature_detectors import images, set_up, tiny_catalog  # noqa: F401  (a fixture)

from adkit.core.components import LabelledDefects
from adkit.run.engine import TrainSettings, load_checkpoint, restore, train_detector
from adkit.testing import tiny_defects
from adkit_plugins.patchcore.defects import DEFECT_COVER, defect_patches, weighted_by_defects


def grid_embed(images: torch.Tensor) -> torch.Tensor:
    """A 2x2 grid of features per image: feature = (image's first pixel value, cell index), so each row can be
    named; images (B, 3, 4, 4)."""
    b = images.shape[0]
    cell = torch.arange(4.0).view(1, 1, 2, 2).expand(b, 1, 2, 2)
    first = images[:, :1, :1, :1].expand(b, 1, 2, 2)
    return torch.cat([first, cell], dim=1)


def test_defect_patches_follow_the_masks_and_the_farthest_patch_without_one():
    masks = torch.zeros(4, 1, 4, 4)
    masks[0, 0, :2, :] = 1  # image 0: cells 0 and 1 fully covered, 2 and 3 not
    masks[1, 0, 3, 3] = 1  # image 1: a defect of one pixel, a quarter of cell 3: below DEFECT_COVER, the most covered
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 4, 4).clone()
    defects = LabelledDefects(images, masks, torch.tensor([True, True, False, True]))
    # image 2 has its label only, image 3 a known but empty mask: both take their patch farthest from the normal bank
    far = {2.0: 1, 3.0: 2}  # image -> the cell the distance makes farthest

    def normal_distance(patches: torch.Tensor) -> torch.Tensor:
        return (patches[:, 1] == far[float(patches[0, 0])]).float()

    chosen = defect_patches(defects, grid_embed, normal_distance)
    assert 0.25 < DEFECT_COVER
    assert chosen.tolist() == [[0, 0], [0, 1], [1, 3], [2, 1], [3, 2]]


def test_the_farthest_patch_is_taken_over_all_of_an_images_tiles():
    images = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(4, 1, 1, 1).expand(4, 3, 4, 4).clone()
    images[1, 0, 0, 0] = 0.5  # image 0's second tile (its first pixel marks it)
    defects = LabelledDefects(images, torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.bool), tiles=2)
    chosen = defect_patches(defects, grid_embed, lambda patches: patches[:, 0] * 10 + patches[:, 1])
    assert chosen.tolist() == [[0.5, 3], [1, 3]]  # one patch per image, from whichever tile holds it


def test_the_weighted_distance_by_hand():
    normal, defective = torch.tensor([3.0, 0.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, 2.0, 9.0])
    torch.testing.assert_close(weighted_by_defects(normal, defective), torch.tensor([2.25, 0.0, 1.0, 0.1]))


def test_patchcore_with_defects_matches_brute_force_and_restores(tiny_catalog, tmp_path):  # noqa: F811
    spec = "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=1.0"
    detector = set_up(tiny_catalog, spec)
    defective, masks = tiny_defects(3, 32, "tile")
    masks[2] = 0  # one image with its label only
    defects = LabelledDefects(defective, masks, torch.tensor([True, True, False]))
    checkpoint = tmp_path / "checkpoint.pt"
    train_detector(detector, images(5, 0), TrainSettings(steps=1, batch_size=4), torch.device("cpu"), checkpoint,
                   meta={}, defects=defects)
    bank = detector.memory_bank.double()
    with torch.inference_mode():
        embedded = detector.embed(defective).permute(0, 2, 3, 1).reshape(3, -1, 6).double()
        test = torch.cat([images(2, 1), defective[:1]])
        detection = detector.detect(test)
        patches = detector.embed(test).permute(0, 2, 3, 1).reshape(3, -1, 6).double()
    cover = torch.nn.functional.adaptive_avg_pool2d(masks, (16, 16)).reshape(3, -1)
    farthest = torch.cdist(embedded[2], bank).min(dim=1).values.argmax()
    expected = torch.cat([embedded[0][cover[0] >= DEFECT_COVER], embedded[1][cover[1] >= DEFECT_COVER],
                          embedded[2][farthest][None]])
    torch.testing.assert_close(detector.defect_bank.double(), expected, atol=1e-5, rtol=1e-5)
    d_n = torch.cdist(patches, bank[None].expand(3, -1, -1)).min(dim=2).values
    d_d = torch.cdist(patches, expected[None].expand(3, -1, -1)).min(dim=2).values
    weighted = d_n * d_n / (d_n + d_d)
    torch.testing.assert_close(detection.anomaly_map.double(), torch.nn.functional.interpolate(
        weighted.view(3, 1, 16, 16), size=(32, 32), mode="bilinear", align_corners=False), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(detection.image_scores.double(), weighted.max(dim=1).values, atol=1e-4, rtol=1e-4)
    assert weighted[2].max() > weighted[:2].max()  # a labelled defect scores above the normal images
    restored = set_up(tiny_catalog, spec)
    restore(restored, load_checkpoint(checkpoint), "ckpt")
    with torch.inference_mode():
        again = restored.detect(test)
    assert torch.equal(again.image_scores, detection.image_scores)
    # a checkpoint from before labelled defects (no defect_bank) loads, and scores by the distances alone
    payload = load_checkpoint(checkpoint)
    del payload["model"]["defect_bank"]
    old = set_up(tiny_catalog, spec)
    restore(old, payload, "ckpt")
    assert old.defect_bank.shape == (0, 6)


def test_a_run_learns_from_defects_and_tests_on_the_rest(invoke, tmp_path):
    data = "synthetic:size=64,n_train=8,n_test=10,train_defects=2"
    code, _, err = invoke("run", "--detector", "patchcore", "--data", data, "--category", "tile", "--image-size", "64",
                          "--out", str(tmp_path / "run"))
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "tile" / "metrics.json").read_text())
    assert result["train_defects"] == 2 and result["n_anomalous"] == 5 - 2
    page = " ".join((tmp_path / "run" / "report.html").read_text().split())
    assert "The model learned from 2 labelled defective images (2 with masks)" in page
    payload = load_checkpoint(tmp_path / "run" / "tile" / "checkpoint.pt")
    assert payload["model"]["defect_bank"].shape[0] >= 2


def test_an_update_adds_labelled_defects_by_the_fits_rule(tiny_catalog, tmp_path):  # noqa: F811
    from adkit.run.engine import update_detector

    spec = "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5"
    detector = set_up(tiny_catalog, spec)
    train_detector(detector, images(4, 0), TrainSettings(steps=1, batch_size=4), torch.device("cpu"),
                   tmp_path / "c.pt", meta={})
    assert detector.defect_bank.shape == (0, 6)
    defective, masks = tiny_defects(2, 32, "tile")
    defects = LabelledDefects(defective, masks, torch.tensor([True, False]))
    update_detector(detector, images(2, 5), 4, torch.device("cpu"), defects=defects)
    with torch.inference_mode():
        expected = defect_patches(defects, detector.embed,
                                  lambda p: torch.cdist(p, detector.memory_bank).min(dim=1).values)
    torch.testing.assert_close(detector.defect_bank, expected)
    assert int(detector.feature_count) == 6 * 256  # the good images were added too
    update_detector(detector, images(0, 0), 4, torch.device("cpu"), defects=defects)  # defects alone
    assert detector.defect_bank.shape[0] == 2 * expected.shape[0]


def test_adkit_update_learns_from_labelled_defects_and_refuses_them_where_it_cannot(invoke, tmp_path):
    from adkit.data.io import save_image

    data = "synthetic:size=32,n_train=10,n_test=6"
    for detector in ("patchcore", "padim:features=20"):
        code, _, err = invoke("run", "--detector", detector, "--data", data, "--category", "tile", "--image-size",
                              "32", "--out", str(tmp_path / detector[:5]))
        assert code == 0, err
    folder = tmp_path / "reported"
    folder.mkdir()
    for i, image in enumerate(tiny_defects(3, 32, "tile", seed=4)[0]):
        save_image(image, folder / f"bad{i}.png")
    checkpoint = tmp_path / "patch" / "tile" / "checkpoint.pt"
    code, _, err = invoke("update", "--checkpoint", str(checkpoint), "--defects", str(folder))
    assert code == 0, err
    assert "and 3 labelled defects" in " ".join(err.split())
    payload = load_checkpoint(tmp_path / "patch" / "tile@2" / "checkpoint.pt")
    assert payload["model"]["defect_bank"].shape[0] == 3  # labels only: one patch an image
    step = payload["meta"]["lineage"][0]
    assert step["defects_added"] == 3 and len(step["defects_sha256"]) == 3 and step["added"] == 0
    code, _, err = invoke("update", "--checkpoint", str(tmp_path / "padim" / "tile" / "checkpoint.pt"), "--defects",
                          str(folder))
    assert code != 0 and "padim cannot learn from labelled defects: drop --defects" in " ".join(err.split())
    assert not (tmp_path / "padim" / "tile@2").exists() and "Traceback" not in err
    # the line's reports: a defect reported with its image joins the bank; padim only scores it
    import hashlib

    results = tmp_path / "results" / "tile"
    (results / "images").mkdir(parents=True)
    save_image(tiny_defects(1, 32, "tile", seed=9)[0][0], results / "images" / "x.png")
    digest = hashlib.sha256((results / "images" / "x.png").read_bytes()).hexdigest()
    (results / "feedback.jsonl").write_text(json.dumps({"image_sha256": digest, "label": "defect",
                                                        "image": "images/x.png"}) + "\n")
    code, _, err = invoke("update", "--checkpoint", str(checkpoint), "--from-feedback", str(results), "--out",
                          str(tmp_path / "fed"))
    assert code == 0, err
    assert "(it learned from them)" in " ".join(err.split())
    assert load_checkpoint(tmp_path / "fed" / "checkpoint.pt")["model"]["defect_bank"].shape[0] == 1
    code, _, err = invoke("update", "--checkpoint", str(tmp_path / "padim" / "tile" / "checkpoint.pt"),
                          "--from-feedback", str(results))
    assert code != 0 and "no report of a false alarm whose image was kept" in " ".join(err.split())


def test_an_ensemble_leaves_the_defects_to_the_members_that_learn_from_them(invoke, tmp_path):
    data = "synthetic:size=32,n_train=8,n_test=8,train_defects=2"
    code, _, err = invoke("run", "--detector", "patchcore", "--detector", "padim:features=20", "--data", data,
                          "--category", "tile", "--image-size", "32", "--out", str(tmp_path / "e"))
    assert code == 0, err
    assert "padim cannot learn from the 2 labelled defects: it fits on the good images alone" in " ".join(err.split())
    learned = {name: json.loads((tmp_path / "e" / name / "tile" / "metrics.json").read_text())
               for name in ("patchcore", "padim", "ensemble")}
    assert [learned[n]["train_defects"] for n in ("patchcore", "padim", "ensemble")] == [2, 0, 2]
    assert {m["n_test"] for m in learned.values()} == {8 - 2}  # every member tested on the same remaining images
    code, _, err = invoke("run", "--detector", "padim:features=20", "--detector", "pixel-gauss", "--data", data,
                          "--category", "tile", "--image-size", "32", "--out", str(tmp_path / "none"))
    assert code == 2 and "which padim cannot learn from" in " ".join(err.split())
    assert not (tmp_path / "none").exists()
