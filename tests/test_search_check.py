"""PatchCore's search check: an approximate search proves itself on held-out normal patches or searches harder,
and falls back to exact search when no effort is enough. The failure class it guards against: images that are
mostly one flat background, whose few bank features a greedy graph walk does not reach."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adkit_plugins.patchcore.search import found, knn

# textures as small objects on a flat background, 128 px: a bank of ~700 features, indexed for the test; 12
# validation images, whose 3,072 patches can show a recall of 0.999 at 95 % confidence
DATA = "synthetic:size=128,n_train=40,n_test=20,object=0.375,val_fraction=0.3"


@pytest.fixture
def small_index(monkeypatch):
    import adkit_plugins.patchcore.index as module

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 256)


def run(invoke, tmp_path, detector: str, category: str = "tile") -> dict:
    out = tmp_path / detector.replace(":", "-").replace(",", "-")
    code, _, err = invoke("run", "--detector", detector, "--data", DATA, "--category", category,
                          "--image-size", "128", "--out", str(out))
    assert code == 0, err
    return json.loads((out / category / "metrics.json").read_text())


def test_the_check_makes_a_failing_graph_search_equal_exact_search(invoke, tmp_path, small_index):
    exact = run(invoke, tmp_path, "patchcore:search=exact")
    # ef=1 is a greedy walk: here it misses the flat background's few bank features for most patches (a float32
    # graph: a float16 one's walk returns two candidates, which misses fewer)
    unchecked = run(invoke, tmp_path, "patchcore:ef=1,recall=0,graph=fp32")
    checked = run(invoke, tmp_path, "patchcore:ef=1,graph=fp32")
    default = run(invoke, tmp_path, "patchcore")
    assert exact["approximations"]["search"]["used"] == "exact"
    first = unchecked["approximations"]["search"]["trail"]
    assert len(first) == 1 and first[0]["recall_held_out"] < 0.99  # measured, recorded, not acted on
    # the failure the check exists for, in the map: the walk's image scores are exact search's (the highest patch
    # of each image is searched again until exact), its maps are not
    assert exact["aupro"] - unchecked["aupro"] > 0.01, (unchecked["aupro"], exact["aupro"])  # 0.850 / 0.872 here
    assert abs(unchecked["image_auroc"] - exact["image_auroc"]) <= 1e-3
    search = checked["approximations"]["search"]
    assert search["trail"][0]["ef"] == 1 and search["trail"][0]["recall_held_out"] < 0.999
    assert search["used"] == "exact" or (search["recall_held_out"] >= 0.999 and search["recall_bank"] >= 0.999)
    assert abs(checked["image_auroc"] - exact["image_auroc"]) <= 0.005
    assert abs(default["image_auroc"] - exact["image_auroc"]) <= 0.005
    assert default["approximations"]["search"]["trail"], "the default search is checked"
    assert default["approximations"]["search"]["graph"] == "float16 features in walk order"  # what it searched
    assert default["approximations"]["search"]["summary"].endswith("; graph of float16 features in walk order")


def test_the_check_falls_back_to_exact_search_and_the_checkpoint_says_so(tiny_catalog, tmp_path, monkeypatch):
    from test_feature_detectors import images, set_up

    import adkit_plugins.patchcore.index as module
    from adkit.run.engine import TrainSettings, load_checkpoint, restore, train_detector

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 100)
    monkeypatch.setattr(module, "EFFORT_DOUBLINGS", 0)  # ef=1 and nothing more: no effort is enough
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,ef=1,recall=1")
    checkpoint = tmp_path / "checkpoint.pt"
    train_detector(detector, images(4, 0), TrainSettings(steps=1, batch_size=4), torch.device("cpu"), checkpoint,
                   meta={}, held_out=images(2, 5))
    record = detector.approximations()["search"]
    assert record["used"] == "exact" and record["summary"].startswith("exact search: hnsw up to ef=1 reached only")
    assert detector.hnsw_graph.numel() == 0 and detector.effort == 0
    restored = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,ef=1,recall=1")
    restore(restored, load_checkpoint(checkpoint), "checkpoint")
    assert restored.approximations() == detector.approximations()
    exact = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,search=exact")
    train_detector(exact, images(4, 0), TrainSettings(steps=1, batch_size=4), torch.device("cpu"),
                   tmp_path / "exact.pt", meta={})
    test = images(2, 1)
    with torch.inference_mode():
        a, b = restored.detect(test), exact.detect(test)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.image_scores, b.image_scores)


def test_a_checkpoint_from_before_the_check_loads_and_says_its_recall_is_unmeasured(tiny_catalog, tmp_path,
                                                                                  monkeypatch):
    from test_feature_detectors import fit, set_up
    from test_feature_detectors import images as make_images

    import adkit_plugins.patchcore.index as module
    from adkit.run.engine import restore

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 100)
    detector = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,ef=64,recall=0")
    payload = fit(detector, make_images(4, 0), tmp_path)  # the graph kept (a check that cannot fail)
    for key in ("search_effort", "search_trail"):
        del payload["model"][key]
    old = set_up(tiny_catalog, "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,ef=64")
    restore(old, payload, "old checkpoint")
    assert old.effort == 64 and "recall not measured" in old.approximations()["search"]["summary"]


def test_recall_counts_a_neighbour_as_near_as_the_exact_one_as_found():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=g) * 10
    queries = torch.cat([bank[:10], bank[10:20] + 0.01 * torch.randn(10, 8, generator=g)])  # ten at distance ~0
    exact = knn(queries, bank, 1)[1]
    assert found(queries, bank, exact, exact).all()
    duplicate = torch.cat([bank, bank[:1]])  # the same feature twice: either copy is the nearest
    assert found(bank[:1], duplicate, torch.tensor([[50]]), torch.tensor([[0]])).all()
    wrong = exact.clone()
    wrong[:5] = (wrong[:5] + 1) % 50
    assert found(queries, bank, wrong, exact).tolist() == [False] * 5 + [True] * 15


def test_the_recall_bound_needs_enough_queries():
    from adkit_plugins.patchcore.check import lower_bound

    assert lower_bound(1.0, 1024) < 0.999  # 1,024 patches, none missed: not yet proof of 0.999
    assert lower_bound(1.0, 3000) >= 0.999  # 1 - 0.05 ** (1 / n) >= 0.999 from n = 2,995
    assert lower_bound(1.0, 2990) < 0.999
    assert lower_bound(0.9995, 60000) >= 0.999 > lower_bound(0.999, 60000)


@pytest.fixture
def tiny_catalog(catalog):
    from test_backbones import TinyBackbonePlugin

    catalog.add_plugin(TinyBackbonePlugin(), name="tiny-plugin")
    return catalog


def test_the_exact_nearest_of_an_update_reuses_the_last_check_and_equals_a_full_search():
    from adkit_plugins.patchcore.check import exact_nearest, row_keys
    from adkit_plugins.patchcore.search import direct_distances

    g = torch.Generator().manual_seed(1)
    bank = torch.randn(300, 8, generator=g)
    old = torch.randn(200, 8, generator=g)
    empty = torch.zeros(0, dtype=torch.long)
    first = exact_nearest(old, bank[:200], row_keys(old), empty, empty, 0)  # no cache: a full search
    torch.testing.assert_close(first, knn(old, bank[:200], 1)[1][:, 0])
    # the bank grew by 100 features (an update appends); the next check's queries are the old ones, reordered,
    # one changed by a rounding step, and 50 new ones
    nudged = old.clone()
    nudged[7, 3] = torch.nextafter(nudged[7, 3], torch.tensor(float("inf")))
    queries = torch.cat([nudged[torch.randperm(200, generator=g)], torch.randn(50, 8, generator=g)])
    keys = row_keys(queries)
    assert len(set(row_keys(nudged).tolist()) & set(row_keys(old).tolist())) == 199
    again = exact_nearest(queries, bank, keys, row_keys(old), first, 200)
    exact = knn(queries, bank, 1)[1][:, 0]
    torch.testing.assert_close(direct_distances(queries, bank, again), direct_distances(queries, bank, exact))
    assert (again >= 200).any() and (again < 200).any()  # some nearest among the added features, some before


def test_row_keys_ignore_the_batch_a_row_came_in():
    from adkit_plugins.patchcore.check import row_keys

    rows = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    keys = row_keys(rows)
    assert torch.equal(row_keys(rows[10:20]), keys[10:20]) and keys.unique().numel() == 64
    assert not torch.equal(row_keys(rows * -1), keys)


def test_a_graph_extended_by_an_update_finds_every_feature_as_a_rebuilt_one_does():
    from adkit_plugins.patchcore.search import hnsw_build, hnsw_load, knn_hnsw

    g = torch.Generator().manual_seed(3)
    bank = torch.randn(3000, 16, generator=g)
    first = hnsw_build(bank[:2000], 16)
    extended = hnsw_build(bank, 16, first)
    assert torch.equal(extended, hnsw_build(bank, 16, first))  # deterministic
    index = hnsw_load(extended)
    assert index.ntotal == 3000
    _, found_index = knn_hnsw(bank, index, 64, bank)
    assert (found_index[:, 0] == torch.arange(3000)).float().mean() >= 0.999  # every feature, old and added


@pytest.mark.parametrize("storage", ["fp16", "fp32"])
def test_a_graph_stored_in_walk_order_returns_bank_rows_and_the_bank_s_own_distances(storage):
    import faiss

    from adkit_plugins.patchcore.search import hnsw_build, hnsw_load, knn_hnsw, walk_order

    g = torch.Generator().manual_seed(4)
    bank = torch.randn(3000, 16, generator=g)
    index = hnsw_load(hnsw_build(bank, 16, storage=storage))
    inner = faiss.downcast_index(index.index)
    assert isinstance(inner, faiss.IndexHNSWSQ if storage == "fp16" else faiss.IndexHNSWFlat)
    ids = faiss.vector_to_array(index.id_map)
    assert sorted(ids.tolist()) == list(range(3000)) and not (ids == range(3000)).all()  # stored in walk order
    assert sorted(walk_order(inner).tolist()) == list(range(3000))
    _, itself = knn_hnsw(bank, index, 64, bank)
    assert (itself[:, 0] == torch.arange(3000)).float().mean() >= 0.999  # the id map gives bank rows
    queries = torch.randn(200, 16, generator=g)
    distance, found = knn_hnsw(queries, index, 64, bank, k=5)
    assert (distance[:, 1:] >= distance[:, :-1]).all()  # ascending, by the bank's own distances
    torch.testing.assert_close(distance, (queries[:, None] - bank[found]).pow(2).sum(-1).sqrt(), rtol=0, atol=0)
    exact = torch.cdist(queries.double(), bank.double()).min(1).values.float()
    assert (distance[:, 0] >= exact * (1 - 1e-6)).all()  # never nearer than the nearest


def test_a_graph_stored_before_the_id_map_searches_and_extends():
    import faiss
    import numpy as np

    from adkit_plugins.patchcore.search import hnsw_build, hnsw_load, knn_hnsw

    g = torch.Generator().manual_seed(5)
    bank = torch.randn(2500, 16, generator=g)
    old = faiss.IndexHNSWFlat(16, 16)  # the graph as stored before the walk order: bank order, no id map
    old.add(bank[:2000].numpy())
    stored = torch.from_numpy(faiss.serialize_index(old).copy())
    _, found = knn_hnsw(bank[:2000], hnsw_load(stored), 64, bank[:2000])
    assert (found[:, 0] == torch.arange(2000)).float().mean() >= 0.999
    extended = hnsw_load(hnsw_build(bank, 16, stored))
    assert isinstance(extended, faiss.IndexIDMap) and extended.ntotal == 2500
    assert isinstance(faiss.downcast_index(extended.index), faiss.IndexHNSWFlat)  # the stored graph's kind is kept
    assert np.array_equal(np.sort(faiss.vector_to_array(extended.id_map)), np.arange(2500))
    _, found = knn_hnsw(bank, extended, 64, bank)
    assert (found[:, 0] == torch.arange(2500)).float().mean() >= 0.999


@pytest.mark.parametrize("spec", ["", ",score=max"])
def test_an_approximate_search_gives_each_image_exact_search_s_score(tiny_catalog, tmp_path, monkeypatch, spec):
    """A graph walk at ef=1 (unchecked) misses many patches' nearest bank features; the images' scores are still
    exact search's (the highest patch searched again until exact), while the rest of the map is the walk's."""
    from test_feature_detectors import fit, images, set_up

    import adkit_plugins.patchcore.index as module

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 100)
    base = "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=1.0" + spec
    walk = set_up(tiny_catalog, base + ",ef=1,recall=0")
    fit(walk, images(6, 0), tmp_path)
    assert walk.effort == 1 and walk.hnsw_graph.numel()
    exact = set_up(tiny_catalog, base + ",search=exact")
    fit(exact, images(6, 0), tmp_path / "exact")
    test = torch.cat([images(6, 3), images(2, 4) * 0.2])  # two dark images: far from every bank feature
    with torch.inference_mode():
        a, b = walk.detect(test), exact.detect(test)
        raw = walk._search(walk.embed(test).permute(0, 2, 3, 1).reshape(-1, walk.dim), 1, walk.effort)[0]
    exact_raw = knn(walk.embed(test).permute(0, 2, 3, 1).reshape(-1, walk.dim), walk.memory_bank, 1)[0]
    assert (raw > exact_raw * (1 + 1e-4) + 1e-6).float().mean() > 0.05  # the walk misses: the test is not vacuous
    torch.testing.assert_close(a.image_scores, b.image_scores, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.anomaly_map, b.anomaly_map)  # the map away from the top is the walk's


def test_the_exact_top_searches_until_the_highest_exact_score_bounds_the_rest(monkeypatch):
    """A hand case of the rounds: approximate distances are upper bounds; the first round's exact values fall
    below the next patches' bounds, so a second round is searched, and the result is the exact maximum."""
    import adkit_plugins.patchcore.index as module

    class Bank(module.IndexedBank):
        effort = 1
        memory_bank = torch.zeros(1, 1)  # bank = {0}: a patch's exact distance is |x|

    exact_values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 0.5, 9.5])
    distance = exact_values.clone()
    distance[:8] = 20.0  # eight patches' bounds far above the true maximum
    index = torch.zeros(12, dtype=torch.long)
    rounds = []

    def counting_knn(queries, bank, k, **kwargs):
        rounds.append(queries.shape[0])
        return knn(queries, bank, k, **kwargs)

    monkeypatch.setattr(module, "knn", counting_knn)
    Bank()._exact_at_the_top(exact_values[:, None], distance, index, 1, lambda d: d)
    assert rounds == [8, 4]  # the eight bounds at 20; then the four left (10 beats 9.5, 9 and 0.5's bounds)
    assert float(distance.max()) == pytest.approx(10.0)
    torch.testing.assert_close(distance, exact_values)  # everything searched is exact


@pytest.mark.parametrize(("enough_from", "chosen", "efforts"), [(48, 48, [32, 64, 48]), (50, 64, [32, 48, 64]),
                                                                 (32, 32, [32]), (100, 128, [32, 64, 96, 128])])
def test_a_raised_effort_is_tried_halfway_back_and_the_chosen_one_ends_the_trail(enough_from, chosen, efforts):
    from adkit_plugins.patchcore.check import measure

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 4, generator=g)
    held_out = bank.repeat(10, 1) + 0.001 * torch.randn(3000, 4, generator=g)  # 3,000 patches: bound >= 0.999
    nearest = knn(held_out, bank, 1)[1][:, 0]

    def search(queries, effort):  # exact from ``enough_from`` on, else every query's neighbour one off
        index = knn(queries, bank, 1)[1][:, 0]
        return index if effort >= enough_from else (index + 1) % bank.shape[0]

    trail, effort, passed = measure(search, held_out, nearest, bank, 32, 512, 0.999, lambda e: False)
    assert passed and effort == chosen
    assert [int(row[0]) for row in trail] == efforts


def test_allowed_misses_is_the_most_a_passing_recall_has():
    from adkit_plugins.patchcore.check import allowed_misses, lower_bound

    for n in (1, 50, 2995, 3000, 10000, 60000):
        def passes(recall, n=n):
            return lower_bound(recall, n) >= 0.999

        brute = max([m for m in range(min(n, 80) + 1) if passes((n - m) / n)], default=-1)
        assert allowed_misses(n, passes) == brute
    assert allowed_misses(10000, lambda recall: recall >= 0.999) == 10  # 9,990 of 10,000 found: exactly 0.999
    assert allowed_misses(0, lambda recall: True) == -1  # no held-out patch: nothing passes


@pytest.mark.parametrize("beyond", [0, 1])
def test_a_failing_effort_stops_at_the_first_block_that_fails_it_with_the_same_decision(monkeypatch, beyond):
    from adkit_plugins.patchcore import check

    monkeypatch.setattr(check, "CHECK_BLOCK", 1000)
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 4, generator=g)
    held_out = bank.repeat(20, 1) + 0.001 * torch.randn(6000, 4, generator=g)  # 6,000 patches
    nearest = knn(held_out, bank, 1)[1][:, 0]
    allowed = check.allowed_misses(6000, lambda recall: check.lower_bound(recall, 6000) >= 0.999)
    missed = allowed + beyond  # the most that pass, or one more
    asked = []

    def search(queries, effort):  # at effort 32, the first ``missed`` held-out patches find a neighbour one off
        asked.append((effort, queries.shape[0]))
        index = knn(queries, bank, 1)[1][:, 0]
        if effort == 32 and len(asked) == 1:
            index[:missed] = (index[:missed] + 1) % bank.shape[0]
        return index

    trail, effort, passed = check.measure(search, held_out, nearest, bank, 32, 512, 0.999, lambda e: False)
    assert passed
    if missed <= allowed:  # passes at 32: every held-out block, then the bank, searched
        assert effort == 32 and [int(r[3]) for r in trail] == [6000] and int(trail[0][4]) == 300
    else:  # fails at the first block, no other searched; 64 passes, then 48 halfway back
        assert [int(r[0]) for r in trail] == [32, 64, 48] and effort == 48
        assert int(trail[0][3]) == 1000 and int(trail[0][4]) == 0 and math.isnan(trail[0][2])
        assert asked[:2] == [(32, 1000), (64, 1000)]
        record = check.describe("hnsw", 32, effort, [list(r) for r in trail], 300, 0.999, 4096)
        stopped = record["trail"][0]
        assert stopped["held_out_patches"] == 1000 and stopped["recall_bank"] is None
        assert stopped["recall_held_out"] == pytest.approx(1 - missed / 1000)


def test_a_check_that_falls_back_after_stopped_tries_says_what_it_searched():
    from adkit_plugins.patchcore import check

    rows = [[32, 0.98, float("nan"), 8192, 0], [64, 0.99, float("nan"), 8192, 0]]
    record = check.describe("hnsw", 32, 0, rows, 20000, 0.999, 4096)
    assert record["used"] == "exact" and record["recall_bank"] is None
    assert "on 8,192 held-out patches, the bank not searched" in record["summary"]
    json.dumps(record, allow_nan=False)  # no NaN reaches metrics.json or /v1/models


@pytest.mark.parametrize(("missed", "passes"), [(3, True), (5, False)])
def test_a_bank_above_the_check_size_is_sampled_evenly_and_its_recall_bounded(monkeypatch, missed, passes):
    from adkit_plugins.patchcore import check

    monkeypatch.setattr(check, "CHECK_BANK_QUERIES", 100)
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 4, generator=g)
    held_out = bank.repeat(10, 1) + 0.001 * torch.randn(3000, 4, generator=g)
    nearest = knn(held_out, bank, 1)[1][:, 0]
    sampled = []

    def search(queries, effort):  # the held-out patches all found; ``missed`` of the bank's sample find a neighbour
        index = knn(queries, bank, 1)[1][:, 0]
        if queries.shape[0] == 100:  # the bank's sample: every third feature
            sampled.append(index.clone())
            index[:missed] = (index[:missed] + 1) % bank.shape[0]
        return index

    # measured on the whole bank, 5 misses of 300 would pass 0.9; of a sample of 100 its lower bound is 0.898
    trail, _, passed = check.measure(search, held_out, nearest, bank, 32, 32, 0.9, lambda e: False)
    assert passed is passes and int(trail[0][4]) == 100
    assert torch.equal(sampled[0], torch.arange(0, 300, 3))
    assert trail[0][2] == pytest.approx(1 - missed / 100)


def test_the_graph_is_built_beside_the_check_and_read_only_once_it_is_there(tiny_catalog, tmp_path, monkeypatch):
    """The fit's graph is built on a worker thread while the check finds its held-out patches' exact nearest on
    the other cores; the fitted state is the one a build at once gives, and whatever reads the graph before the
    check (an attribute read, the state's save, a copy, a move) builds it first; a load over it forgets it."""
    import copy
    import threading

    from test_feature_detectors import images, set_up

    import adkit_plugins.patchcore.check as check_module
    import adkit_plugins.patchcore.index as module
    from adkit.run.engine import _batches

    monkeypatch.setattr(module, "INDEX_MIN_BANK", 100)
    spec = "patchcore:backbone=tiny,layers=0+1,dim=6,coreset=0.5,recall=0"  # the graph kept whatever it finds
    release, built_on = threading.Event(), []

    def build(*args):
        built_on.append(threading.current_thread().name)
        assert release.wait(60)
        return original_build(*args)

    original_build, original_knn = module.hnsw_build, check_module.knn
    monkeypatch.setattr(module, "hnsw_build", build)
    threads_seen = []

    def knn(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        release.set()  # the build goes on once the check's exact search has started beside it
        return original_knn(*args, **kwargs)

    monkeypatch.setattr(check_module, "knn", knn)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def fitted(wait_at_once: bool):
            detector = set_up(tiny_catalog, spec)
            with torch.inference_mode():
                detector.fit(_batches(images(4, 0), 4, torch.device("cpu")))
                assert detector._unbuilt is not None and detector._building is None  # left to build
                if wait_at_once:
                    release.set()
                    detector._graph_built()
                detector.calibrate(_batches(images(2, 5), 4, torch.device("cpu")))
            release.clear()
            return detector

        awaited, beside = fitted(True), fitted(False)
        assert threads_seen == [2, 1]  # the check's exact search on the core the build leaves free
        assert torch.get_num_threads() == 2 and beside._unbuilt is None and beside._building is None
        assert built_on == ["MainThread", "adkit-hnsw_0"]
        a, b = awaited.state_dict(), beside.state_dict()
        assert beside.hnsw_graph.numel() > 0 and a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)

        release.set()  # every read of the graph waits for it: as an attribute, the state's save, a copy, a move
        for read in (lambda d: d.hnsw_graph, lambda d: d.state_dict()["hnsw_graph"],
                     lambda d: copy.deepcopy(d)._buffers["hnsw_graph"], lambda d: d.to("cpu")._buffers["hnsw_graph"]):
            detector = set_up(tiny_catalog, spec)
            with torch.inference_mode():
                detector.fit(_batches(images(4, 0), 4, torch.device("cpu")))
            assert torch.equal(read(detector), a["hnsw_graph"]) and detector._unbuilt is None
        detector = set_up(tiny_catalog, spec)
        loaded = {**a, "hnsw_graph": a["hnsw_graph"].flip(0)}  # another graph of the same size
        with torch.inference_mode():
            detector.fit(_batches(images(4, 0), 4, torch.device("cpu")))
            built = len(built_on)
            detector.load_state_dict(loaded)  # the graph left to build is forgotten, not built, nor kept over it
        assert len(built_on) == built and detector._unbuilt is None
        assert torch.equal(detector._buffers["hnsw_graph"], loaded["hnsw_graph"])
    finally:
        release.set()
        torch.set_num_threads(threads)
