"""Training images scored as if left out of the fit (Detector.leaving_out), for fpr thresholds pooled with the
validation images: PaDiM's against a refit without the image (float64 reference), PatchCore's against a brute-force
search of the bank without the image's own features; the two-sample check that decides the pooling; the records
that carry the scores to predict's re-fitted policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_feature_detectors import images, set_up

from adkit.run.engine import TrainSettings, train_detector, update_detector
from adkit.stats import decisions, thresholds


@pytest.fixture
def tiny_catalog(catalog):
    from test_backbones import TinyBackbonePlugin

    catalog.add_plugin(TinyBackbonePlugin(), name="tiny-plugin")
    return catalog


def fitted(catalog, spec: str, train: torch.Tensor, tmp_path):
    detector = set_up(catalog, spec)
    train_detector(detector, train, TrainSettings(steps=1, batch_size=4), torch.device("cpu"),
                   tmp_path / f"{len(list(tmp_path.iterdir()))}.pt", meta={})
    return detector


@pytest.mark.parametrize(("n", "precision"), [(7, "fp32"), (4, "fp32"), (7, "bf16")])
def test_padim_left_out_is_the_distance_to_the_other_images_gaussians(tiny_catalog, tmp_path, n, precision):
    """4 images: fewer than features, the regularisation holds the covariance. bf16: the backbone's precision check
    chose bf16 after the fit, so an image is scored from other features than those it gave the fit."""
    spec = "padim:backbone=tiny,layers=0+1,features=5"
    train = images(n, 0)
    detector = fitted(tiny_catalog, spec, train, tmp_path)
    assert detector.can_leave_out() and not detector.can_leave_out(group=n - 1)  # one image would be left
    with torch.inference_mode():
        embeddings = detector.embed(train).flatten(2).double()  # (N, d, P) as fitted, in float32
        detector.backbone.precision = precision
        scored = detector.embed(train).flatten(2).double()  # as scored now
        with detector.leaving_out(torch.arange(n)):
            left_out = detector.anomaly_map(train)
        in_bank = detector.anomaly_map(train)
    if precision == "bf16":
        assert not torch.equal(scored, embeddings)
    for i in (0, n // 2, n - 1):
        others = torch.cat([embeddings[:i], embeddings[i + 1:]])  # the Gaussians of the others, in float64
        mean = others.mean(0)  # (d, P)
        centred = others - mean
        covariance = torch.einsum("nip,njp->pij", centred, centred) / (others.shape[0] - 1)
        covariance = covariance + 0.01 * torch.eye(5, dtype=torch.float64)
        delta = (scored[i] - mean).T[:, :, None]  # (P, d, 1)
        squared = (delta.mT @ torch.linalg.inv(covariance) @ delta)[:, 0, 0]
        reference = squared.sqrt().reshape(1, 1, 16, 16).float()
        expected = torch.nn.functional.interpolate(reference, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(left_out[i:i + 1], expected, rtol=2e-4, atol=2e-4)
    assert (left_out > in_bank).float().mean() > 0.95  # an image is farther from the Gaussians without it


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padim_left_out_parts_of_tiles_are_the_distance_to_the_other_parts_gaussians(tiny_catalog, tmp_path,
                                                                                     precision):
    """Rows 2k and 2k + 1 are one part (an image's two tiles): both leave the Gaussians together (Woodbury)."""
    train = images(10, 0)
    detector = fitted(tiny_catalog, "padim:backbone=tiny,layers=0+1,features=5", train, tmp_path)
    rows = torch.tensor([2, 3, 8, 9])
    with torch.inference_mode():
        embeddings = detector.embed(train).flatten(2).double()  # (N, d, P) as fitted
        detector.backbone.precision = precision
        scored = detector.embed(train).flatten(2).double()
        with detector.leaving_out(rows, 2):
            first = detector.anomaly_map(train[rows[:2]])  # a call holds whole parts
            with pytest.raises(ValueError, match="whole parts"):
                detector.anomaly_map(train[rows[2:3]])
        with detector.leaving_out(rows, 2):
            left_out = detector.anomaly_map(train[rows])
    torch.testing.assert_close(first, left_out[:2])
    for j, row in enumerate(rows.tolist()):
        part = {row // 2 * 2, row // 2 * 2 + 1}
        others = embeddings[[i for i in range(10) if i not in part]]
        mean = others.mean(0)
        centred = others - mean
        covariance = torch.einsum("nip,njp->pij", centred, centred) / (others.shape[0] - 1)
        covariance = covariance + 0.01 * torch.eye(5, dtype=torch.float64)
        delta = (scored[row] - mean).T[:, :, None]
        squared = (delta.mT @ torch.linalg.inv(covariance) @ delta)[:, 0, 0]
        expected = torch.nn.functional.interpolate(squared.sqrt().reshape(1, 1, 16, 16).float(), size=(32, 32),
                                                   mode="bilinear", align_corners=False)
        torch.testing.assert_close(left_out[j:j + 1], expected, rtol=2e-4, atol=2e-4)


def brute_force_outside(detector, patches: torch.Tensor, parts: torch.Tensor, group: int) -> torch.Tensor:
    """Each patch's distance to its nearest bank feature from another part, by a float64 scan."""
    distances = torch.cdist(patches.double(), detector.memory_bank.double())
    distances[(detector.bank_origin // group)[None, :] == parts[:, None]] = float("inf")
    return distances.min(1).values


def test_patchcore_bank_knows_each_features_training_row_through_fit_and_update(tiny_catalog, tmp_path):
    detector = fitted(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.1,search=exact",
                      images(4, 0), tmp_path)
    new = images(3, 1)
    update_detector(detector, new, 4, torch.device("cpu"))
    assert detector.can_leave_out() and detector.bank_origin.shape[0] == detector.memory_bank.shape[0]
    with torch.inference_mode():
        rows = detector.embed(torch.cat([images(4, 0), new])).permute(0, 2, 3, 1).reshape(7, -1, 6)
    for feature, origin in zip(detector.memory_bank, detector.bank_origin):
        assert (rows[origin] - feature).abs().sum(1).min() < 1e-6  # a patch of the row it is said to come from
    assert set(detector.bank_origin.tolist()) & {4, 5, 6}  # the update's rows follow the fitted ones


@pytest.mark.parametrize("candidates", [16, 1])  # 1: most patches' one candidate is their own: the exact fallback
def test_patchcore_left_out_searches_the_bank_without_the_parts_own_features(tiny_catalog, tmp_path, monkeypatch,
                                                                            candidates):
    from adkit_plugins.patchcore import index

    monkeypatch.setattr(index, "LEAVE_OUT_CANDIDATES", candidates)
    train = images(8, 0)
    detector = fitted(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.25,search=exact,score=max",
                      train, tmp_path)
    for group in (1, 2):  # 2: rows 2k and 2k + 1 are one part (an image's two tiles)
        rows = torch.tensor([1, 2, 7])
        with torch.inference_mode():
            with detector.leaving_out(rows, group):  # the rows in order, call after call
                first, rest = detector.detect(train[rows[:1]]), detector.detect(train[rows[1:]])
                with pytest.raises(ValueError, match="3 rows"):
                    detector.detect(train[:1])
            detection = type(first)(None, torch.cat([first.image_scores, rest.image_scores]))
            patches = detector.embed(train[rows]).permute(0, 2, 3, 1).reshape(-1, 6)
        expected = brute_force_outside(detector, patches, (rows // group).repeat_interleave(256), group).view(3, 256)
        torch.testing.assert_close(detection.image_scores.double(), expected.max(1).values, rtol=1e-4, atol=1e-4)
        with torch.inference_mode():
            in_bank = detector.detect(train[rows]).image_scores
        assert (detection.image_scores > in_bank).all()


def test_patchcore_left_out_reweighting_reads_the_bank_without_the_part(tiny_catalog, tmp_path):
    train = images(6, 0)
    detector = fitted(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.25,search=exact",
                      train, tmp_path)
    rows = torch.tensor([0, 4])
    with torch.inference_mode():
        with detector.leaving_out(rows):
            scores = detector.detect(train[rows]).image_scores
        patches = detector.embed(train[rows]).permute(0, 2, 3, 1).reshape(2, 256, 6)
    bank, origin = detector.memory_bank.double(), detector.bank_origin
    for j, row in enumerate(rows.tolist()):
        others = bank[origin != row]
        distances = torch.cdist(patches[j].double(), others).min(1)
        where = int(distances.values.argmax())
        test_feature, nearest = patches[j, where].double(), others[distances.indices[where]]
        support = others[torch.cdist(nearest[None], others)[0].topk(9, largest=False).indices]
        d = (test_feature - support).norm(dim=1)
        weight = 1 - torch.exp((test_feature - nearest).norm() - torch.logsumexp(d, 0))
        torch.testing.assert_close(scores[j].double(), distances.values[where] * weight, rtol=1e-4, atol=1e-4)


def test_patchcore_left_out_along_the_graph_matches_the_scan(tiny_catalog, tmp_path, monkeypatch):
    from adkit_plugins.patchcore import index

    monkeypatch.setattr(index, "INDEX_MIN_BANK", 32)
    train = images(8, 0)
    detector = fitted(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.25,recall=0,score=max",
                      train, tmp_path)
    assert detector.hnsw_graph.numel() and detector.effort  # the graph is searched
    rows = torch.arange(8)
    with torch.inference_mode():
        patches = detector.embed(train).permute(0, 2, 3, 1).reshape(-1, 6)
        parts = rows.repeat_interleave(256)
        found, _ = detector._nearest_outside(patches, parts, 1)
    exact = brute_force_outside(detector, patches, parts, 1).float()
    assert (found >= exact - 1e-4).all()  # never a feature of the part itself
    assert (found <= exact + 1e-4).float().mean() > 0.99  # and the nearest of the others, as a graph finds it


def test_left_out_scores_are_pooled_only_where_they_look_like_the_validation_images():
    rng = np.random.default_rng(0)
    validation, alike, higher = rng.normal(0, 1, 60), rng.normal(0, 1, 500), rng.normal(2, 1, 500)
    pooled, note = thresholds.left_out_agree(validation, alike)
    assert pooled and note.startswith("pooled")
    pooled, note = thresholds.left_out_agree(validation, higher)
    assert not pooled and "differ" in note and "median higher" in note
    assert not thresholds.left_out_agree(validation, np.array([np.inf, 1.0, 2.0]))[0]

    scores, labels = torch.tensor(validation), torch.zeros(60, dtype=torch.long)
    alone = decisions.fit_threshold(thresholds.parse_policy("fpr:0.01"), scores, labels, "c")
    fit = decisions.fit_threshold(thresholds.parse_policy("fpr:0.01"), scores, labels, "c", torch.tensor(alike))
    assert fit.n_normal == 560 and fit.n_left_out == 500 and alone.n_left_out == 0
    assert fit.warning is None and alone.warning is not None  # 560 scores can place a 1 % rate; 60 cannot
    expected = thresholds.fit("fpr:0.01", np.concatenate([validation, alike]))
    assert fit.threshold == expected.threshold
    refused = decisions.fit_threshold(thresholds.parse_policy("fpr:0.01"), scores, labels, "c", torch.tensor(higher))
    assert refused.n_left_out == 0 and refused.threshold == alone.threshold and "differ" in refused.left_out


def test_the_record_carries_the_left_out_scores_to_other_policies():
    rng = np.random.default_rng(1)
    validation, alike = torch.tensor(rng.normal(0, 1, 40)), torch.tensor(rng.normal(0, 1, 400))
    labels = torch.zeros(40, dtype=torch.long)
    fit = decisions.fit_threshold(thresholds.parse_policy("fpr:0.01"), validation, labels, "c", alike)
    record = decisions.validation_record(fit, validation, labels, alike)
    assert len(record["left_out_scores"]) == 400 and record["fit"]["n_left_out"] == 400
    chosen = decisions.chosen_threshold(record, "fpr:0.05", "threshold.json")
    assert chosen["fit"]["n_normal"] == 440 and chosen["fit"]["n_left_out"] == 400
    expected = thresholds.fit("fpr:0.05", np.concatenate([validation.numpy(), alike.numpy()]))
    assert chosen["threshold"] == expected.threshold
    # a record without them (older, or not pooled) fits on the validation images alone
    bare = {key: value for key, value in record.items() if key != "left_out_scores"}
    assert decisions.chosen_threshold(bare, "fpr:0.05", "threshold.json")["fit"]["n_normal"] == 40


@pytest.mark.parametrize(("detector", "geometry"), [("patchcore", []), ("patchcore", ["--image-size", "64", "--tile", "32"]),
                                                    ("padim:features=20", ["--image-size", "64", "--tile", "32"])])
def test_run_pools_the_left_out_training_scores_and_says_so(invoke, tmp_path, detector, geometry):
    import json

    out = tmp_path / "run"
    code, out_text, err = invoke("run", "--detector", detector, "--data",
                                 "synthetic:size=64,n_train=24,n_test=6,val_fraction=0.25", "--category", "tile",
                                 *(geometry or ["--image-size", "32"]), "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "tile" / "metrics.json").read_text())
    record = json.loads((out / "tile" / "threshold.json").read_text())
    said = " ".join((out_text + err).split())  # the terminal wraps lines
    # 18 training images scored as if left out, pooled with the 6 validation images where the check allows it
    assert "left-out scores against 6 normal validation images" in said
    if metrics["val_left_out"]:
        assert metrics["val_left_out"] == 18 and metrics["val_normal"] == 24
        assert len(record["left_out_scores"]) == 18 and record["fit"]["left_out"].startswith("pooled")
        assert "6 normal validation images + 18 training images left out" in said
        page = (out / "report.html").read_text()
        assert "Left-out training scores: pooled (18 training images" in page
        assert "6 normal validation images + 18 training images left out" in page
    else:
        assert "left_out_scores" not in record and record["fit"]["left_out"].startswith("not pooled")


def test_test_and_update_keep_the_left_out_scores_of_the_fit(invoke, tmp_path):
    import json

    data = "synthetic:size=32,n_train=24,n_test=6,val_fraction=0.25"
    run = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "patchcore", "--data", data, "--category", "tile", "--image-size", "32",
                          "--out", str(run))
    assert code == 0, err
    fitted = json.loads((run / "tile" / "threshold.json").read_text())
    if not fitted["fit"]["n_left_out"]:
        pytest.skip("the check did not pool these left-out scores (what it does then is tested above)")
    # adkit test reads no training images: the threshold it records pools the fit's left-out scores again
    code, _, err = invoke("test", "--checkpoint", str(run / "tile" / "checkpoint.pt"), "--data", data,
                          "--out", str(tmp_path / "t"))
    assert code == 0, err
    tested = json.loads((run / "tile" / "threshold.json").read_text())
    assert tested["left_out_scores"] == fitted["left_out_scores"] and tested["fit"]["n_left_out"] == 18
    # the same model, validation images and pool (scored again: to rounding)
    assert tested["threshold"] == pytest.approx(fitted["threshold"], rel=1e-5)
    # adkit train records the same threshold as run
    code, _, err = invoke("train", "--detector", "patchcore", "--data", data, "--category", "tile", "--image-size",
                          "32", "--out", str(tmp_path / "train"))
    assert code == 0, err
    trained = json.loads((tmp_path / "train" / "tile" / "threshold.json").read_text())
    np.testing.assert_allclose(trained["left_out_scores"], fitted["left_out_scores"], rtol=1e-5)
    assert trained["threshold"] == pytest.approx(fitted["threshold"], rel=1e-5)
    # an update pools them with the new validation scores (measured against the parent: docs/update.md)
    code, _, err = invoke("synth", "--out", str(tmp_path / "more"), "--category", "tile", "--size", "32", "--train", "4",
                          "--test", "2", "--seed", "3")
    assert code == 0, err
    code, _, err = invoke("update", "--checkpoint", str(run / "tile" / "checkpoint.pt"),
                          str(tmp_path / "more" / "tile" / "train" / "good"))
    assert code == 0, err
    updated = json.loads((run / "tile@2" / "threshold.json").read_text())
    assert updated["left_out_scores"] == fitted["left_out_scores"]
    assert updated["fit"]["n_normal"] == 6 + 1 + 18 and updated["fit"]["n_left_out"] == 18


def test_an_ensemble_pools_its_members_combined_left_out_scores(invoke, tmp_path):
    import json

    out = tmp_path / "ens"
    code, _, err = invoke("run", "--detector", "patchcore", "--detector", "padim:features=20", "--data",
                          "synthetic:size=32,n_train=24,n_test=6,val_fraction=0.25", "--category", "tile",
                          "--image-size", "32", "--out", str(out))
    assert code == 0, err
    said = " ".join(err.split())
    members = [json.loads((out / name / "tile" / "metrics.json").read_text()) for name in ("patchcore", "padim")]
    ensemble = json.loads((out / "ensemble" / "tile" / "metrics.json").read_text())
    # the members' 18 left-out scores each, combined as their validation scores are, were offered to the check
    assert said.count("18 training images' left-out scores against 6 normal validation images") == 3
    assert ensemble["val_left_out"] in (0, 18) and all(m["val_left_out"] in (0, 18) for m in members)
    assert ensemble["val_normal"] == 6 + ensemble["val_left_out"]
    # an ensemble with a member that cannot leave images out fits on the validation images alone
    code, _, err = invoke("run", "--detector", "patchcore", "--detector", "pixel-gauss", "--data",
                          "synthetic:size=32,n_train=24,n_test=6,val_fraction=0.25", "--category", "tile",
                          "--image-size", "32", "--out", str(tmp_path / "mixed"))
    assert code == 0, err
    assert json.loads((tmp_path / "mixed" / "ensemble" / "tile" / "metrics.json").read_text())["val_left_out"] == 0


def test_patchcore_without_its_features_origins_cannot_leave_out(tiny_catalog, tmp_path):
    from adkit.core.errors import AdkitError

    # IVF stores the bank cell by cell: the rows' order is gone, and so is leaving out
    ivf = fitted(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=ivf,cells=4", images(4, 0),
                 tmp_path)
    assert ivf.ivf_centroids.shape[0] and not ivf.can_leave_out()
    with pytest.raises(AdkitError, match="fit it again"), ivf.leaving_out(torch.arange(4)):
        pass
    # a checkpoint from before bank_origin loads, scores, and cannot leave out
    exact = fitted(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=exact", images(4, 0),
                   tmp_path)
    state = {k: v for k, v in exact.state_dict().items() if k != "bank_origin"}
    old = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=exact")
    old.load_state_dict(state, strict=False)
    assert not old.can_leave_out() and exact.can_leave_out()
    with torch.inference_mode():
        torch.testing.assert_close(old.detect(images(2, 5)).image_scores, exact.detect(images(2, 5)).image_scores)


def test_left_out_scores_whose_tail_runs_below_the_validation_images_are_not_pooled():
    """Alike in the two-sample test, but at the pooled threshold 5 of 60 validation images are flagged, where 1 %
    allows about one: the pooled threshold would flag too many new parts; the validation images decide alone."""
    rng = np.random.default_rng(0)
    validation = rng.normal(0, 1, 60)
    validation[np.argsort(validation)[-5:]] += 10  # a heavier upper tail than the left-out scores have
    left_out = rng.normal(0, 1, 500)
    assert thresholds.left_out_agree(validation, left_out)[0]
    fit = thresholds.fit_pooled("fpr:0.01", validation, None, left_out)
    assert fit.n_left_out == 0 and fit.left_out.startswith("not pooled: at the pooled threshold 5 of the 60")
    assert fit.threshold == thresholds.fit("fpr:0.01", validation).threshold and fit.n_normal == 60
    # the same left-out scores with validation images like them are pooled
    alike = thresholds.fit_pooled("fpr:0.01", rng.normal(0, 1, 60), None, left_out)
    assert alike.n_left_out == 500 and alike.left_out.startswith("pooled")
