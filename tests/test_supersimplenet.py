"""SuperSimpleNet against references: the feature-space anomaly generator's masks and noise statistics, the losses
on hand-computed cases, the contract and export parity (adkit.testing), labelled defects reaching training with
and without masks, and the one-line errors of train_defects."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adkit.plugin import check_detector
from adkit.run.engine import load_checkpoint
from adkit_plugins.supersimplenet.model import binary_focal, perlin_masks, synthetic_anomalies, truncated_l1


def test_perlin_masks_are_binary_half_empty_and_blobs():
    masks = perlin_masks(400, (16, 24), 0.2, torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 16, 24) and set(masks.unique().tolist()) <= {0.0, 1.0}
    empty = (masks.flatten(1).sum(1) == 0).float().mean()
    assert 0.42 <= float(empty) <= 0.65  # half emptied at random, and a few whose noise never passes 0.2
    full = masks[masks.flatten(1).sum(1) > 0]
    assert 0.05 < float(full.mean()) < 0.6  # regions, not the whole grid
    assert torch.equal(masks, perlin_masks(400, (16, 24), 0.2, torch.Generator().manual_seed(0)))  # the generator's


def test_synthetic_anomalies_add_noise_only_inside_the_masks_with_the_asked_spread():
    generator = torch.Generator().manual_seed(1)
    adapted = torch.randn(64, 8, 12, 12, generator=generator)
    masks, labels = torch.zeros(64, 1, 12, 12), torch.zeros(64)
    masks[0, :, 2:4, 2:4], labels[0] = 1, 1  # one real defect in the batch
    known = torch.ones(64, dtype=torch.bool)
    features, out_masks, out_labels, out_known = synthetic_anomalies(adapted, masks, labels, known, 0.3, 0.2,
                                                                     torch.Generator().manual_seed(2))
    assert features.shape == (128, 8, 12, 12) and out_known.shape == (128,)
    added = features - torch.cat([adapted, adapted])
    regions = out_masks.clone()
    regions[0, :, 2:4, 2:4], regions[64, :, 2:4, 2:4] = 0, 0  # the real defect carries no noise of its own
    noise = added[regions.expand_as(added) > 0]
    assert added[regions.expand_as(added) == 0].abs().max() < 1e-6  # nothing outside the masks
    assert noise.numel() > 1000 and abs(float(noise.std()) - 0.3) < 0.02 and abs(float(noise.mean())) < 0.02
    assert out_masks[0, 0, 2:4, 2:4].all() and out_masks[64, 0, 2:4, 2:4].all()  # real defects stay marked
    assert torch.equal(out_labels, (out_masks.flatten(1).amax(1) > 0).float())  # a label: any anomalous position


def test_binary_focal_and_truncated_l1_on_hand_computed_cases():
    # focal: p = sigmoid(0) = 0.5 for both targets: -(0.5)^4 log 0.5
    assert float(binary_focal(torch.zeros(2), torch.tensor([0.0, 1.0]))) == pytest.approx(0.5 ** 4 * math.log(2))
    p = 1 / (1 + math.exp(-2.0))  # logit 2 for a positive: p_t = p; for a negative: p_t = 1 - p
    expected = (-(1 - p) ** 4 * math.log(p) - p ** 4 * math.log(1 - p)) / 2
    assert float(binary_focal(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0]))) == pytest.approx(expected)
    assert float(binary_focal(torch.tensor([40.0]), torch.tensor([1.0]))) == pytest.approx(0.0, abs=1e-12)
    # truncated L1 with margin 0.5: normal positions above -0.5 and anomalous below 0.5 cost their distance
    logits = torch.tensor([-1.0, 0.0, 0.3, 1.0, 0.2])
    masks = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    normal = (0.0 + 0.5 + 0.8) / 3  # -1 costs nothing, 0 costs 0.5, 0.3 costs 0.8
    anomalous = (0.0 + 0.3) / 2  # 1 costs nothing, 0.2 costs 0.3
    assert float(truncated_l1(logits, masks)) == pytest.approx(normal + anomalous)
    assert float(truncated_l1(torch.tensor([-2.0]), torch.tensor([0.0]))) == 0.0  # no anomalous positions: 0


def test_supersimplenet_keeps_the_detector_contract_and_exports(catalog):
    check_detector("supersimplenet:hidden=16,dec=8", catalog=catalog, image_size=64, steps=2)


@pytest.mark.parametrize("masks", [True, False], ids=["masks", "labels-only"])
def test_labelled_defects_reach_training_and_leave_the_test_split(invoke, tmp_path, masks):
    data = f"synthetic:size=64,n_train=10,n_test=16,train_defects=3,train_masks={str(masks).lower()}"
    code, _, err = invoke("run", "--detector", "supersimplenet:hidden=16,dec=8", "--data", data, "--category", "tile",
                          "--image-size", "64", "--steps", "3", "--out", str(tmp_path / "run"))
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "tile" / "metrics.json").read_text())
    assert result["train_defects"] == 3 and result["train_defects_masked"] == (3 if masks else 0)
    assert result["n_test"] == 16 - 3 and result["n_anomalous"] == 8 - 3  # tested on the remaining images only
    # score=auto: the classification head scores where labelled defects trained it
    assert load_checkpoint(tmp_path / "run" / "tile" / "checkpoint.pt")["model"]["head_score"].item() is True


def test_without_labelled_defects_the_map_scores_and_the_choice_survives_a_checkpoint(invoke, tmp_path):
    from adkit_plugins.supersimplenet.detector import SuperSimpleNet

    code, _, err = invoke("run", "--detector", "supersimplenet:hidden=16,dec=8", "--data",
                          "synthetic:size=64,n_train=10,n_test=16", "--category", "tile", "--image-size", "64",
                          "--steps", "3", "--out", str(tmp_path / "run"))
    assert code == 0, err
    state = load_checkpoint(tmp_path / "run" / "tile" / "checkpoint.pt")["model"]
    assert state["head_score"].item() is False  # score=auto, unsupervised: the map's largest value
    restored = SuperSimpleNet()
    restored.load_state_dict({"head_score": state["head_score"]}, strict=False)
    assert restored.scored_by_head is False
    # a checkpoint from before the choice was stored: scored as it was then, by the head unless told map
    for score, by_head in (("auto", True), ("head", True), ("map", False)):
        old = SuperSimpleNet(score=score)
        old.load_state_dict({}, strict=False)
        assert old.scored_by_head is by_head and bool(old.head_score) is by_head


def test_train_defects_errors_are_one_line_and_write_nothing(invoke, tmp_path):
    cases = [
        (["--detector", "padim", "--data", "synthetic:size=32,n_train=6,n_test=8,train_defects=2"],
         "which padim cannot learn from; drop train_defects, or use a detector that can (patchcore, supersimplenet)"),
        (["--detector", "supersimplenet", "--data", "synthetic:size=32,n_train=6,n_test=8,train_defects=4"],
         "train_defects=4, but the test split holds 4 defective images and at least one must stay"),
    ]
    for args, needle in cases:
        code, _, err = invoke("run", *args, "--category", "tile", "--image-size", "32", "--out", str(tmp_path / "x"))
        assert code == 2 and needle in " ".join(err.split()) and "Traceback" not in err
        assert not (tmp_path / "x").exists()


def test_a_folder_of_defects_without_a_mask_where_masks_were_asked_is_refused(tmp_path):
    from adkit.core.errors import AdkitError
    from adkit.data.io import save_image
    from adkit_plugins.datasets.layouts import FolderDataset

    for folder in ("good", "bad", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        save_image(torch.rand(3, 8, 8), tmp_path / "good" / f"{i}.png")
    save_image(torch.rand(3, 8, 8), tmp_path / "bad" / "crack.png")
    dataset = FolderDataset(normal=str(tmp_path / "good"), train_defects=str(tmp_path / "bad"),
                            train_masks=str(tmp_path / "masks"))
    with pytest.raises(AdkitError, match="training defect .*crack.png has no mask in .*masks"):
        dataset.load(dataset.categories()[0])
    save_image(torch.ones(1, 8, 8), tmp_path / "masks" / "crack_mask.png")
    splits = dataset.load(dataset.categories()[0])
    assert [s.path.name for s in splits.defects] == ["crack.png"] and splits.defects[0].mask is not None
