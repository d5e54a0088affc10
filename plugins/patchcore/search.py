"""Nearest-neighbour search of patch features in a memory bank.

``knn`` is exact: squared Euclidean distances |q|^2 - 2 q.b + |b|^2 by matrix products over (query chunk x bank
chunk) blocks that bound memory, a running minimum per query. The approximate searches: ``knn_projected``
(candidates from the same scan on a random projection, re-ranked exactly), ``knn_ivf`` (an inverted file of
k-means cells) and ``knn_hnsw`` (faiss's HNSW graph). benchmarks/search.py measures them against ``knn``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from adkit.plugin import AdkitError

# elements of one (queries x bank) distance block: 2^24 floats = 64 MiB (on a GPU: few launches; in a traced
# graph, whose loop over bank chunks is unrolled: few chunks, as exports have always had)
BLOCK_ELEMENTS = 1 << 24
# ... and on a CPU in eager mode: 2^20 floats = 4 MiB, a block that stays in the cache while its minimum is taken,
# where a 64 MiB one goes out to memory and back (the same results, the exact search 1.5x as fast on 2 cores;
# docs/benchmarks.md, "Exact search in cache-sized blocks")
CPU_BLOCK_ELEMENTS = 1 << 20


def block_elements_on(device: torch.device) -> int:
    """The elements of one block of distances (or of candidates' differences) computed at a time in eager mode on
    ``device``: CPU_BLOCK_ELEMENTS on a CPU, BLOCK_ELEMENTS elsewhere."""
    return CPU_BLOCK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS


# the candidates each node's links are chosen from while the HNSW graph is built (hnswlib's default; faiss's is
# 40): a graph built with more reaches the check's recall at half the search effort (docs/benchmarks.md,
# "PatchCore's graph")
BUILD_EFFORT = 200


def _blocks(queries: int, bank: int, block_elements: int) -> tuple[int, int]:
    bank_chunk = min(bank, max(1, block_elements // max(1, min(queries, 4096))))
    query_chunk = max(1, block_elements // bank_chunk)
    return query_chunk, bank_chunk


def squared_distances(queries: Tensor, bank: Tensor, bank_norms: Tensor | None = None) -> Tensor:
    """(M, d), (K, d) -> (M, K) squared Euclidean distances, clamped at 0 against rounding. ``bank_norms``: the
    bank's |b|^2 (``norms``), when kept."""
    bank_norms = norms(bank) if bank_norms is None else bank_norms
    return (queries.pow(2).sum(1, keepdim=True) - 2 * queries @ bank.T + bank_norms).clamp_min_(0)


def norms(bank: Tensor) -> Tensor:
    """(K,) the squared norms |b|^2 of a bank's rows (K, d), in float32, as ``knn`` and ``squared_distances`` use
    them: kept beside a bank, an exact search of a few queries reads the bank once instead of three times."""
    return bank.float().pow(2).sum(1)


def tracing() -> bool:
    """True while torch.jit.trace or torch.export records the graph: the query count is then a symbol of the
    batch size, and a Python loop over query chunks would be frozen at the traced batch."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def knn(queries: Tensor, bank: Tensor, k: int = 1, block_elements: int | None = None,
        bank_norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours: Euclidean distances (M, k) ascending and bank indices (M, k). The loop over
    bank chunks depends only on the bank; queries are chunked in eager mode only (one chunk in a traced graph).
    ``block_elements``: the distances computed at a time (default: CPU_BLOCK_ELEMENTS on a CPU in eager mode,
    else BLOCK_ELEMENTS). ``bank_norms``: ``norms(bank)``, where the caller keeps them (eager only)."""
    n = bank.shape[0]
    k = min(k, n)
    if tracing():
        return _knn_chunk(queries.float(), bank.float(), bank.float().pow(2).sum(1), k,
                          _blocks(4096, n, block_elements or BLOCK_ELEMENTS)[1])
    if block_elements is None:
        block_elements = block_elements_on(queries.device)
    m = queries.shape[0]
    query_chunk, bank_chunk = _blocks(m, n, block_elements)
    queries, bank = queries.float(), bank.float()
    bank_norms = norms(bank) if bank_norms is None else bank_norms
    out_d = torch.empty(m, k, device=queries.device)
    out_i = torch.empty(m, k, dtype=torch.long, device=queries.device)
    for q0 in range(0, m, query_chunk):
        out_d[q0:q0 + query_chunk], out_i[q0:q0 + query_chunk] = _knn_chunk(queries[q0:q0 + query_chunk], bank,
                                                                            bank_norms, k, bank_chunk)
    return out_d, out_i


def _knn_chunk(q: Tensor, bank: Tensor, bank_norms: Tensor, k: int, bank_chunk: int) -> tuple[Tensor, Tensor]:
    """The k nearest bank rows of every query row, over the bank in chunks with a running best k."""
    n = bank.shape[0]
    # full_like keeps the query count symbolic in a traced graph, where torch.full((M, k)) would freeze M
    best_d = torch.full_like(q[:, :1], float("inf")).expand(-1, k).clone()
    best_i = torch.zeros_like(best_d, dtype=torch.long)
    for b0 in range(0, n, bank_chunk):
        # |b|^2 - 2 q.b in one fused product; |q|^2 is the same for every bank feature and is added at the end
        d = torch.addmm(bank_norms[b0:b0 + bank_chunk], q, bank[b0:b0 + bank_chunk].T, alpha=-2.0)
        kk = min(k, d.shape[1])
        values, index = d.topk(kk, dim=1, largest=False) if kk > 1 else d.min(dim=1, keepdim=True)
        merged_d, order = torch.cat((best_d, values), 1).topk(k, dim=1, largest=False)
        best_i = torch.cat((best_i, index + b0), 1).gather(1, order)
        best_d = merged_d
    squared = (best_d + q.pow(2).sum(1, keepdim=True)).clamp_min_(0)
    return squared.sqrt(), best_i


def knn_projected(queries: Tensor, bank: Tensor, projection: Tensor, bank_projected: Tensor, k: int = 1,
                  candidates: int = 10, block_elements: int | None = None) -> tuple[Tensor, Tensor]:
    """Approximate k nearest neighbours: the ``candidates`` nearest in the projected space (queries @ projection
    against ``bank_projected``), re-ranked exactly. Distances (M, k) ascending and indices (M, k)."""
    _, index = knn(queries.float() @ projection, bank_projected, max(k, candidates), block_elements)
    exact = (queries.float()[:, None, :] - bank.float()[index]).pow(2).sum(-1).sqrt()
    distance, order = exact.topk(min(k, index.shape[1]), dim=1, largest=False)
    return distance, index.gather(1, order)


# Inverted file (IVF): the bank cut into cells by k-means; a query scans only the bank features of its ``probes``
# nearest cells. Exact within the cells it scans, so recall@1 is the share of queries whose nearest bank feature
# lies in one of them. Eager only: the cells' sizes decide the shapes, which a traced graph cannot follow (an
# exported PatchCore searches exactly; adkit.plugin.exporting).

KMEANS_ITERATIONS = 10


def kmeans(points: Tensor, cells: int, generator: torch.Generator, iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """(cells, d) centroids by Lloyd's algorithm from ``cells`` distinct random points; a cell left empty takes
    the point farthest from its centroid."""
    points = points.float()
    n = points.shape[0]
    if not 0 < cells <= n:
        raise ValueError(f"k-means of {n} points into {cells} cells")
    start = torch.randperm(n, generator=generator, device=generator.device)[:cells].to(points.device)
    centroids = points[start].clone()
    for _ in range(iterations):
        distance, assign = knn(points, centroids, 1)
        assign = assign[:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=cells)
        empty = counts == 0
        centroids = sums / counts.clamp_min(1)[:, None].float()
        if empty.any():
            far = distance[:, 0].topk(int(empty.sum())).indices
            centroids[empty] = points[far]
    return centroids


def ivf_index(bank: Tensor, cells: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(bank reordered so that each cell's features are contiguous, centroids (cells, d), offsets (cells + 1,)):
    cell c is bank[offsets[c]:offsets[c + 1]]."""
    centroids = kmeans(bank, cells, generator)
    assign = knn(bank, centroids, 1)[1][:, 0]
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=cells)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return bank[order].contiguous(), centroids, offsets


def knn_ivf(queries: Tensor, bank: Tensor, centroids: Tensor, offsets: Tensor, probes: int) -> tuple[Tensor, Tensor]:
    """The nearest bank feature of every query among the cells of its ``probes`` nearest centroids: distances
    (M, 1) and indices (M, 1) into the cell-ordered ``bank``."""
    queries, bank = queries.float(), bank.float()
    m = queries.shape[0]
    probes = min(probes, centroids.shape[0])
    _, probed = knn(queries, centroids, probes)  # (M, probes)
    best_d = torch.full((m,), float("inf"), device=queries.device)
    best_i = torch.zeros(m, dtype=torch.long, device=queries.device)
    query_norms = queries.pow(2).sum(1)
    pairs_cell = probed.reshape(-1)
    pairs_query = torch.arange(m, device=queries.device).repeat_interleave(probes)
    order = torch.argsort(pairs_cell, stable=True)
    pairs_cell, pairs_query = pairs_cell[order], pairs_query[order]
    bounds = torch.searchsorted(pairs_cell, torch.arange(centroids.shape[0] + 1, device=queries.device))
    starts, ends = offsets.tolist(), bounds.tolist()
    for cell in range(centroids.shape[0]):
        if ends[cell] == ends[cell + 1] or starts[cell] == starts[cell + 1]:
            continue
        rows = pairs_query[ends[cell]:ends[cell + 1]]
        segment = bank[starts[cell]:starts[cell + 1]]
        distance = torch.addmm(segment.pow(2).sum(1), queries[rows], segment.T, alpha=-2.0)
        value, where = distance.min(dim=1)
        better = value < best_d[rows]
        best_d[rows] = torch.where(better, value, best_d[rows])
        best_i[rows] = torch.where(better, where + starts[cell], best_i[rows])
    return (best_d + query_norms).clamp_min_(0).sqrt()[:, None], best_i[:, None]


# HNSW (hierarchical navigable small-world graph, faiss's IndexHNSWFlat): a query walks the graph greedily from
# the top layer down, keeping the ``ef`` best candidates; recall grows with ef. Eager only, like IVF.


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise AdkitError("patchcore search=hnsw needs faiss: pip install faiss-cpu (adkit's install brings it)") from None
    return faiss


# the graph's stored copy of the bank: "fp16" halves the memory a walk reads, which bounds its speed on a CPU
# (docs/benchmarks.md, "PatchCore's graph in half precision"); the distances a search returns are computed again
# from the float32 bank
GRAPH_STORAGE = ("fp16", "fp32")
# a graph of rounded features may rank two nearly equidistant bank features the wrong way round (the synthetic
# grid's repeated patches: recall@1 0.9994 at every effort): its walk returns this many, re-ranked by the bank's
# own distances, which gives the float32 graph's recall
ROUNDED_CANDIDATES = 2


def hnsw_build(bank: Tensor, links: int, graph: Tensor | None = None, storage: str = "fp16") -> Tensor:
    """The HNSW graph of ``bank`` (K, d) with ``links`` neighbours a node, its features stored in ``storage``
    (GRAPH_STORAGE), serialised to a uint8 tensor (what a checkpoint stores). Built with one thread: the same bank
    gives the same graph. Given ``graph``, the serialised graph of the bank's first rows (of whatever storage), those
    keep their links and the rest are inserted into it, as HNSW builds (an update's added features: a graph of the
    same kind at a fraction of a rebuild's cost). The nodes are stored in the order of a breadth-first walk of the
    graph (``walk_order``), so that a search reads neighbours that lie near each other in memory; an id map gives
    each node's bank row, which a search returns."""
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        if graph is None:
            if storage not in GRAPH_STORAGE:
                raise ValueError(f"patchcore graph storage is one of {', '.join(GRAPH_STORAGE)}, got {storage!r}")
            inner = faiss.IndexHNSWFlat(bank.shape[1], links) if storage == "fp32" else \
                faiss.IndexHNSWSQ(bank.shape[1], faiss.ScalarQuantizer.QT_fp16, links)
            inner.hnsw.efConstruction = max(BUILD_EFFORT, 2 * links)
            index = faiss.IndexIDMap(inner)
        else:
            index = hnsw_load(graph)
            if not isinstance(index, faiss.IndexIDMap):  # a graph stored before the walk order: nodes in bank order
                index = _mapped_in_bank_order(index)
        first = index.ntotal
        added = np.ascontiguousarray(bank[first:].detach().float().cpu().numpy())
        hnsw = _walked(index)
        if not hnsw.is_trained:
            hnsw.train(added)  # float16 storage learns nothing from the data
        index.add_with_ids(added, np.arange(first, bank.shape[0], dtype=np.int64))
        order = walk_order(hnsw)
        hnsw.permute_entries(order)
        faiss.copy_array_to_vector(faiss.vector_to_array(index.id_map)[order], index.id_map)
    finally:
        faiss.omp_set_num_threads(threads)
    return torch.from_numpy(faiss.serialize_index(index).copy())


def _mapped_in_bank_order(hnsw: Any) -> Any:
    """An id map over a filled HNSW index whose node i is bank row i (faiss wraps only an empty index: the nodes
    are set aside while it does)."""
    faiss = _faiss()
    count = hnsw.ntotal
    hnsw.ntotal = 0
    index = faiss.IndexIDMap(hnsw)
    hnsw.ntotal = index.ntotal = count
    faiss.copy_array_to_vector(np.arange(count, dtype=np.int64), index.id_map)
    return index


def walk_order(hnsw: Any) -> np.ndarray:
    """The nodes of a faiss HNSW index in the order a breadth-first walk of its bottom layer visits them from the
    entry point, then any node the walk did not reach, in index order: deterministic for a given graph."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    faiss = _faiss()
    graph = hnsw.hnsw
    n = hnsw.ntotal
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bottom = faiss.vector_to_array(graph.cum_nneighbor_per_level).astype(np.int64)[:2]
    starts = faiss.vector_to_array(graph.offsets).astype(np.int64)[:n] + bottom[0]
    links = faiss.vector_to_array(graph.neighbors)[starts[:, None] + np.arange(bottom[1] - bottom[0])]
    rows, present = np.repeat(np.arange(n), links.shape[1]), links.reshape(-1) >= 0
    adjacency = csr_matrix((np.ones(int(present.sum()), dtype=np.int8), (rows[present], links.reshape(-1)[present])),
                           shape=(n, n))
    walked = breadth_first_order(adjacency, int(graph.entry_point), directed=True, return_predecessors=False)
    unreached = np.ones(n, dtype=bool)
    unreached[walked] = False
    return np.concatenate([walked, np.flatnonzero(unreached)]).astype(np.int64)


def graph_kind(index: Any) -> str:
    """What a loaded graph stores and in which order, for the search's record: e.g. "float16 features in walk
    order"."""
    faiss = _faiss()
    features = "float32" if isinstance(_walked(index), faiss.IndexHNSWFlat) else "float16"
    return f"{features} features in {'walk' if isinstance(index, faiss.IndexIDMap) else 'bank'} order"


def _walked(index: Any) -> Any:
    """The HNSW index a loaded graph walks: the one behind its id map (a graph stored before the walk order has
    none)."""
    faiss = _faiss()
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def hnsw_load(graph: Tensor) -> Any:
    return _faiss().deserialize_index(graph.cpu().numpy())


def hnsw_candidates(queries: Tensor, index: Any, ef: int, k: int) -> Tensor:
    """The bank indices (M, k) of the ``k`` features the graph walk at effort max(ef, k) returns for each query,
    nearest first by the graph's stored copy (which may be rounded); -1 where it found fewer."""
    faiss = _faiss()
    faiss.omp_set_num_threads(torch.get_num_threads())
    _walked(index).hnsw.efSearch = max(ef, k)
    _, found = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
    return torch.from_numpy(found).long().to(queries.device)


def knn_hnsw(queries: Tensor, index: Any, ef: int, bank: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest bank features of every query along the graph (at effort max(ef, k)): distances (M, k)
    ascending and bank indices (M, k), -1 (at an infinite distance) where the graph found fewer. The distances are
    computed from ``bank`` (K, d) itself, as |q - b| in float32: the graph's stored copy may be rounded (a rounded
    graph's walk returns at least ROUNDED_CANDIDATES, re-ranked so)."""
    fetched = k if isinstance(_walked(index), _faiss().IndexHNSWFlat) else max(k, ROUNDED_CANDIDATES)
    found = hnsw_candidates(queries, index, ef, fetched)
    distance = torch.empty(found.shape, device=queries.device)
    rows = max(1, block_elements_on(queries.device) // max(1, fetched * bank.shape[1]))
    for start in range(0, found.shape[0], rows):
        near = bank[found[start:start + rows].clamp_min(0)].float()
        distance[start:start + rows] = (queries[start:start + rows, None, :].float() - near).pow(2).sum(-1).sqrt()
    distance.masked_fill_(found < 0, float("inf"))
    if fetched > 1:
        distance, order = distance.sort(dim=1, stable=True)
        found = found.gather(1, order)
    return distance[:, :k], found[:, :k]


# Recall of an approximate search against exact search. Distances are recomputed directly as |q - b| for the
# bank features each search returned: the expansion |q|^2 - 2 q.b + |b|^2 that ``knn`` uses has an absolute
# error of about sqrt(eps) |q|, which would count a found neighbour at distance ~0 (a uniform background's
# patch) as missed.


def direct_distances(queries: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """|queries[i] - bank[index[i]]| for index (M,) or (M, 1): (M,) float64."""
    return (queries.double() - bank[index.reshape(-1)].double()).norm(dim=1)  # the rows asked, not the whole bank


def found_slack(bank: Tensor) -> float:
    """``found``'s allowance for a distance of about zero: 1e-6 of the bank's mean norm."""
    return 1e-6 * float(bank.double().norm(dim=1).mean()) if bank.shape[0] else 0.0


def found(queries: Tensor, bank: Tensor, found_index: Tensor, exact_index: Tensor,
          relative: float = 1e-4, slack: float | None = None) -> Tensor:
    """(M,) bool: whether each query's found bank feature is as near as the exact nearest one (within
    ``relative`` of its distance, or ``slack``, ``found_slack(bank)`` unless given, for a distance of about
    zero)."""
    slack = found_slack(bank) if slack is None else slack
    found_d = direct_distances(queries, bank, found_index)
    return found_d <= direct_distances(queries, bank, exact_index) * (1 + relative) + slack
