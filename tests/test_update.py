"""adkit update: good images added to a fitted model without refitting. PaDiM's and the feature energy models'
Gaussians updated in two steps equal a fit on all images (float64 references); PatchCore's bank keeps what it had
and grows by the coreset rule; the new version's lineage travels through the checkpoint, adkit test, an export and
/v1/models; detectors that train networks are refused in one line, and nothing is written over a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_feature_detectors import images, set_up

from adkit.run.engine import TrainSettings, train_detector, update_detector

TINY = "synthetic:size=32,n_train=10,n_test=6"


@pytest.fixture
def tiny_catalog(catalog):
    from test_backbones import TinyBackbonePlugin

    catalog.add_plugin(TinyBackbonePlugin(), name="tiny-plugin")
    return catalog


def fitted(catalog, spec: str, train: torch.Tensor, tmp_path, steps: int = 1):
    detector = set_up(catalog, spec)
    train_detector(detector, train, TrainSettings(steps=steps, batch_size=4), torch.device("cpu"),
                   tmp_path / f"{len(list(tmp_path.iterdir()))}.pt", meta={})
    return detector


def test_padim_updated_in_two_steps_is_the_fit_on_all_images(tiny_catalog, tmp_path):
    first, second = images(5, 0), images(4, 1)
    spec = "padim:backbone=tiny,layers=0+1,features=5"
    updated = fitted(tiny_catalog, spec, first, tmp_path)
    update_detector(updated, second[:2], 4, torch.device("cpu"))
    update_detector(updated, second[2:], 4, torch.device("cpu"))
    whole = fitted(tiny_catalog, spec, torch.cat([first, second]), tmp_path)
    assert int(updated.count) == 9
    with torch.inference_mode():
        embeddings = updated.embed(torch.cat([first, second])).flatten(2).double().numpy()  # (N, d, P)
        test = images(2, 7)
        maps = updated.anomaly_map(test)
    np.testing.assert_allclose(updated.mean.double().numpy(), embeddings.mean(0).T, rtol=1e-5, atol=1e-6)
    covariance = updated.scatter.double() / 8
    reference = np.stack([np.cov(embeddings[:, :, p].T) for p in range(embeddings.shape[2])])
    np.testing.assert_allclose(covariance.numpy(), reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps, whole.anomaly_map(test), rtol=1e-4, atol=1e-4)
    # row-major inverses, fitted and updated: LAPACK's column-major batch made every Mahalanobis product slow
    assert updated.inverse_covariance.is_contiguous() and whole.inverse_covariance.is_contiguous()


def test_feature_energy_bases_updated_are_the_fit_on_all_images(tiny_catalog, tmp_path):
    for spec in ("feature-ebm-patch:backbone=tiny,layers=0+1,dim=4,tilt=0,buffer_size=16,steps_batch=8",
                 "feature-ebm-image:backbone=tiny,layers=0+1,tilt=0,buffer_size=16,steps_batch=8"):
        first, second = images(6, 0), images(5, 1)
        updated = fitted(tiny_catalog, spec, first, tmp_path)
        update_detector(updated, second, 4, torch.device("cpu"))
        whole = fitted(tiny_catalog, spec, torch.cat([first, second]), tmp_path)
        assert int(updated.base_count) == 11
        torch.testing.assert_close(updated.feature_mean, whole.feature_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(updated.whitening, whole.whitening, rtol=1e-3, atol=1e-4)
        test = images(3, 9)
        with torch.inference_mode():
            torch.testing.assert_close(updated.anomaly_map(test), whole.anomaly_map(test), rtol=1e-3, atol=1e-3)


def test_patchcore_keeps_its_bank_and_adds_the_greedy_choice_of_the_new_patches(tiny_catalog, tmp_path):
    from adkit_plugins.patchcore.coreset import greedy_coreset, random_projection
    from adkit_plugins.patchcore.search import knn

    detector = fitted(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.1,partition=0", images(4, 0),
                      tmp_path)
    before = detector.memory_bank.clone()
    assert int(detector.feature_count) == 4 * 256
    new = images(3, 1)
    update_detector(detector, new, 4, torch.device("cpu"))
    bank = detector.memory_bank
    assert bank.shape[0] == round(0.1 * 7 * 256) and int(detector.feature_count) == 7 * 256
    assert torch.equal(bank[:before.shape[0]], before)  # nothing the fit chose is dropped
    with torch.inference_mode():
        patches = detector.embed(new).permute(0, 2, 3, 1).reshape(-1, 6)
    projection = random_projection(6, 128, torch.Generator().manual_seed(
        __import__("adkit.run.engine", fromlist=["derived_seed"]).derived_seed(0, "patchcore-coreset")),
        torch.device("cpu"))
    start = knn(patches @ projection, before @ projection, 1)[0][:, 0].pow(2)
    chosen = greedy_coreset(patches @ projection, bank.shape[0] - before.shape[0], torch.Generator(), start)
    torch.testing.assert_close(bank[before.shape[0]:], patches[chosen])


def test_update_writes_a_new_version_with_its_lineage_everywhere(invoke, tmp_path):
    run = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "padim:features=20", "--data", TINY, "--category", "tile",
                          "--image-size", "32", "--out", str(run))
    assert code == 0, err
    code, _, err = invoke("synth", "--out", str(tmp_path / "more"), "--category", "tile", "--size", "32", "--train", "6",
                          "--test", "2", "--seed", "3")
    assert code == 0, err
    checkpoint = run / "tile" / "checkpoint.pt"
    parent = checkpoint.read_bytes()
    code, _, err = invoke("update", "--checkpoint", str(checkpoint), str(tmp_path / "more" / "tile" / "train" / "good"))
    assert code == 0, err
    assert checkpoint.read_bytes() == parent  # the old version is untouched
    version = run / "tile@2"
    payload = torch.load(version / "checkpoint.pt", weights_only=False)
    step = payload["meta"]["lineage"][0]
    assert step["parent_sha256"] == __import__("hashlib").sha256(parent).hexdigest()
    assert step["added"] + step["held_out"] == 6 and step["held_out"] == 1 and len(step["added_sha256"]) == 5
    assert step["command"].startswith("adkit") and step["at"]
    assert int(payload["model"]["count"]) == 9 + 5  # padim's moments: 9 training images, then 5 more
    threshold = json.loads((version / "threshold.json").read_text())
    assert threshold["policy"] == "fpr:0.01" and len(threshold["val_scores"]) == 1 + 1  # old validation + held out
    # a second update continues the lineage into tile@3
    code, _, err = invoke("update", "--checkpoint", str(version / "checkpoint.pt"),
                          str(tmp_path / "more" / "tile" / "test" / "good"))
    assert code == 0, err
    assert len(torch.load(run / "tile@3" / "checkpoint.pt", weights_only=False)["meta"]["lineage"]) == 2
    # the lineage in adkit test's metrics and page, an export's model.json and the service's card
    code, _, err = invoke("test", "--checkpoint", str(version / "checkpoint.pt"), "--data", TINY, "--out",
                          str(tmp_path / "test"))
    assert code == 0, err
    assert json.loads((tmp_path / "test" / "tile" / "metrics.json").read_text())["lineage"][0]["added"] == 5
    assert "Lineage: fitted, then updated 1 time(s)" in (tmp_path / "test" / "report.html").read_text()
    code, _, err = invoke("export", "--checkpoint", str(version / "checkpoint.pt"), "--format", "onnx")
    assert code == 0, err
    card = json.loads((version / "export-onnx" / "model.json").read_text())
    assert card["lineage"][0]["parent_sha256"] == step["parent_sha256"]
    from adkit.serve.models import load_model

    for folder in (version, version / "export-onnx"):
        assert load_model(folder).public_card()["lineage"][0]["added"] == 5


def test_update_refuses_in_one_line_and_writes_nothing(invoke, tmp_path):
    run = tmp_path / "run"
    code, _, err = invoke("run", "--detector", "draem:recon_width=4,disc_width=4", "--data", TINY, "--category", "tile",
                          "--image-size", "32", "--steps", "2", "--out", str(run))
    assert code == 0, err
    good = tmp_path / "run" / "tile"  # any folder: refused before images are read
    code, _, err = invoke("update", "--checkpoint", str(run / "tile" / "checkpoint.pt"), str(good))
    assert code != 0 and "draem learns its network by training" in err and "adkit train --resume" in err
    assert not (run / "tile@2").exists() and "Traceback" not in err
    code, _, err = invoke("run", "--detector", "pixel-gauss", "--data", TINY, "--category", "tile", "--image-size",
                          "32", "--out", str(tmp_path / "pg"))
    assert code == 0, err
    code, _, err = invoke("update", "--checkpoint", str(tmp_path / "pg" / "tile" / "checkpoint.pt"), str(good))
    assert code != 0 and "pixel-gauss declares no update: fit it again" in err
    code, _, err = invoke("run", "--detector", "padim:features=20", "--data", TINY, "--category", "tile",
                          "--image-size", "32", "--out", str(tmp_path / "padim"))
    assert code == 0, err
    (tmp_path / "taken").mkdir()
    code, _, err = invoke("update", "--checkpoint", str(tmp_path / "padim" / "tile" / "checkpoint.pt"), str(good),
                          "--out", str(tmp_path / "taken"))
    assert code != 0 and "never writes over a model" in err


def test_patchcore_updates_check_its_graph_from_the_last_checks_nearest(tiny_catalog, tmp_path, monkeypatch):
    """An update's search check reuses the last check's exact nearest for the held-out patches it saw before and
    searches the features added since for them: the stored nearest equals a full exact search of the grown bank,
    and the check starts at the effort the last one chose."""
    import adkit_plugins.patchcore.index as module
    from adkit_plugins.patchcore.search import direct_distances, knn

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 100)
    # recall=0: the graph is kept (512 held-out patches cannot bound a recall of 0.999), the check still runs
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,ef=4,recall=0")
    held = images(2, 5)
    train_detector(detector, images(4, 0), TrainSettings(steps=1, batch_size=4), torch.device("cpu"),
                   tmp_path / "fit.pt", meta={}, held_out=held)
    fitted_effort, fitted_bank = detector.effort, int(detector.check_bank)
    assert fitted_effort and detector.hnsw_graph.numel()  # a graph: the update's greedy starts from its bounds
    assert fitted_bank == detector.memory_bank.shape[0] and detector.check_keys.numel() == 2 * 256
    searched = []
    original = module.check.knn
    monkeypatch.setattr(module.check, "knn",
                        lambda q, b, k=1, **kept: searched.append(b.shape[0]) or original(q, b, k, **kept))
    before = detector.memory_bank.clone()
    update_detector(detector, images(3, 1), 4, torch.device("cpu"), held_out=held)
    bank = detector.memory_bank
    assert searched == [bank.shape[0] - fitted_bank]  # only the added features were searched
    # the greedy continued from the graph's bounds chose what it chooses from the exact distances
    from adkit.run.engine import derived_seed
    from adkit_plugins.patchcore.coreset import partitioned_greedy_coreset, random_projection

    with torch.inference_mode():
        new = detector.embed(images(3, 1)).permute(0, 2, 3, 1).reshape(-1, 6)
    generator = torch.Generator().manual_seed(derived_seed(0, "patchcore-coreset"))
    projection = random_projection(6, 128, generator, torch.device("cpu"))
    start = knn(new @ projection, before @ projection, 1)[0][:, 0].pow(2)
    chosen = partitioned_greedy_coreset(new @ projection, bank.shape[0] - before.shape[0], generator, 16384, start)
    torch.testing.assert_close(bank[before.shape[0]:], new[chosen])
    with torch.inference_mode():
        patches = detector.embed(held).permute(0, 2, 3, 1).reshape(-1, 6)
    exact = knn(patches, bank, 1)[1][:, 0]
    torch.testing.assert_close(direct_distances(patches, bank, detector.check_nearest),
                               direct_distances(patches, bank, exact))
    assert detector.search_trail[0, 0] == fitted_effort  # the check started where the last one ended


def test_the_greedy_continued_from_upper_bounds_chooses_what_the_distances_choose():
    """An update's greedy starts from upper bounds of the new patches' distances to the bank (the graph's
    nearest) and searches the whole bank only for the patches that come to lead: the same selection as from the
    distances themselves, partitioned or not, and far fewer patches searched."""
    from adkit_plugins.patchcore.coreset import greedy_coreset, partitioned_greedy_coreset
    from adkit_plugins.patchcore.search import knn

    g = torch.Generator().manual_seed(4)
    bank, new = torch.randn(2000, 8, generator=g), torch.randn(3000, 8, generator=g) * 1.2
    distances = knn(new, bank, 1)[0][:, 0].pow(2)
    loose = (new - bank[torch.randint(0, 2000, (3000,), generator=g)]).pow(2).sum(1)  # any bank feature: a bound
    bounds = torch.minimum(loose, distances * (1 + torch.rand(3000, generator=g)))  # bounds of mixed tightness
    searched = []

    def exact(rows):
        searched.append(rows.numel())
        return knn(new[rows], bank, 1)[0][:, 0].pow(2)

    for partition in (0, 1000):
        reference = partitioned_greedy_coreset(new, 300, torch.Generator().manual_seed(0), partition, distances)
        lazy = partitioned_greedy_coreset(new, 300, torch.Generator().manual_seed(0), partition, bounds, exact)
        assert torch.equal(lazy, reference)
    assert sum(searched) < 2 * 3000  # two selections, each searching well under all 3,000 patches
    assert torch.equal(greedy_coreset(new, 50, torch.Generator(), distances),
                       greedy_coreset(new, 50, torch.Generator(), bounds, exact))


def test_patchcore_update_bounds_hold_the_distances_and_tighten_with_more_candidates(tiny_catalog, tmp_path,
                                                                                     monkeypatch):
    """The bounds an update's greedy starts from: the least projected distance among the graph's BOUND_CANDIDATES
    nearest features, plus the rounding margin; never below the exact projected distance to the bank, and tighter
    than the bound from the graph's one nearest."""
    import adkit_plugins.patchcore.detector as detector_module
    import adkit_plugins.patchcore.index as module
    from adkit_plugins.patchcore.coreset import random_projection
    from adkit_plugins.patchcore.search import knn

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 100)
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,ef=4,recall=0")
    train_detector(detector, images(4, 0), TrainSettings(steps=1, batch_size=4), torch.device("cpu"),
                   tmp_path / "fit.pt", meta={}, held_out=images(2, 5))
    assert detector.hnsw_graph.numel() and detector.effort
    with torch.inference_mode():
        new = detector.embed(images(3, 1)).permute(0, 2, 3, 1).reshape(-1, 6)
        projection = random_projection(6, 128, torch.Generator().manual_seed(1), torch.device("cpu"))
        projected, bank_projected = new @ projection, detector.memory_bank @ projection
        exact = knn(projected, bank_projected, 1)[0][:, 0].pow(2)
        bounds = {}
        for candidates in (1, 8):
            monkeypatch.setattr(detector_module, "BOUND_CANDIDATES", candidates)
            bounds[candidates], search = detector._distances_to_bank(new, projected, bank_projected)
            torch.testing.assert_close(search(torch.arange(5)), exact[:5])
    assert bool((bounds[1] >= exact).all()) and bool((bounds[8] >= exact).all())
    assert float(bounds[8].sum()) < float(bounds[1].sum())  # tighter, taken together
