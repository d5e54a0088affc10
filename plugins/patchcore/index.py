"""PatchCore's memory bank as a searchable index: the search's index built over the bank (IVF cells or an HNSW
graph), the search at an effort, and the check that holds an approximate search to exact search on held-out normal
patches (check.py measures, this keeps what it chose)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from adkit.plugin import AdkitError, derived_seed, is_exporting
from adkit_plugins.patchcore import check
from adkit_plugins.patchcore.check import CHECK_QUERIES, EFFORT, EFFORT_DOUBLINGS
from adkit_plugins.patchcore.search import (
    graph_kind,
    hnsw_build,
    hnsw_load,
    ivf_index,
    knn,
    knn_hnsw,
    knn_ivf,
    knn_projected,
    norms,
    squared_distances,
    tracing,
)

# search=ivf with cells=0 (automatic): about sqrt(bank) cells, each of at least this many features on average;
# search=ivf (automatic cells) and search=hnsw build no index for banks below INDEX_MIN_BANK features: exact search
# of such a bank costs a few milliseconds an image
IVF_MIN_CELL = 64
INDEX_MIN_BANK = 4096
# leaving a training image out (IndexedBank._nearest_outside): each patch's candidates from the fitted search, and
# the rows searched exactly at once where all of them came from the image itself
LEAVE_OUT_CANDIDATES = 16
LEAVE_OUT_EXACT_ROWS = 1024
# an approximate search's patches searched again exactly per image and round, highest scores first, until the
# image's highest score is exact (IndexedBank._exact_at_the_top)
EXACT_TOP = 8


class IndexedBank:
    """What PatchCore does with its bank once it is chosen: index it, search it, check the search. A mixin of
    PatchCore (its buffers: memory_bank, bank_origin, bank_projected, search_projection, ivf_*, hnsw_graph,
    search_effort, search_trail, check_*; its parameters: search, ef, probes, candidates, cells, links, graph, recall,
    seed,
    dim)."""

    _norms: tuple[tuple, Tensor] | None = None  # the bank's squared norms, for the bank they came from
    # the HNSW graph of the bank ``_index`` kept, until it is built: the graph it extends (None: built anew) while
    # nothing has started it, then the worker thread building it beside the check (``calibrate``); ``hnsw_graph``
    # is read only once it is there (``_graph_built``)
    _unbuilt: tuple[Tensor | None] | None = None
    _building: Future | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "hnsw_graph" and (self._unbuilt is not None or self._building is not None):
            self._graph_built()
        return super().__getattr__(name)  # type: ignore[misc]

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._graph_built()
        super()._save_to_state_dict(*args, **kwargs)  # type: ignore[misc]

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        self._graph_built()
        return super()._apply(*args, **kwargs)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        self._graph_built()
        return super().__getstate__()  # type: ignore[misc]

    def _index(self, bank: Tensor, extends: int = 0, origin: Tensor | None = None) -> None:
        """Keep ``bank`` and index it at the asked effort, unchecked: IVF's cells built now, an HNSW graph left to
        build (beside the check that follows, or when first read: ``_graph_built``).
        ``extends``: the bank's first rows are the bank indexed now (an update), whose graph is extended.
        ``origin``: the training row each bank feature came from (kept for ``leaving_out``; not with IVF cells,
        which reorder the bank)."""
        device = bank.device
        cells = self.ivf_cells(bank.shape[0])
        graph = self.hnsw_graph.cpu()
        extend = extends and graph.numel() > 0 and self._hnsw().ntotal == extends
        self.ivf_centroids, self.ivf_offsets = bank.new_zeros(0, self.dim), torch.zeros(0, dtype=torch.long)
        self.hnsw_graph = torch.zeros(0, dtype=torch.uint8)
        if cells:
            generator = torch.Generator(device=device).manual_seed(derived_seed(self.seed, "patchcore-ivf"))
            bank, self.ivf_centroids, self.ivf_offsets = ivf_index(bank, cells, generator)
            self._forget_check()  # the bank is stored cell by cell: its indices changed
        self.memory_bank = bank.contiguous()
        self._norms = None
        known = origin is not None and not cells and origin.shape[0] == bank.shape[0]
        self.bank_origin = origin.to(device) if known else torch.zeros(0, dtype=torch.long, device=device)
        self.bank_projected = (bank @ self.search_projection).contiguous()
        building = self.search == "hnsw" and bank.shape[0] >= INDEX_MIN_BANK
        if building:  # when first read, or beside the check that follows a fit or an update (calibrate)
            self._unbuilt = (graph if extend else None,)
        indexed = building or self.ivf_centroids.shape[0] > 0 or self.search == "projected"
        self._set_effort(getattr(self, EFFORT[self.search]) if indexed else 0)
        self.search_trail = torch.zeros(0, 5, dtype=torch.float64, device=device)

    def _forget_check(self) -> None:
        device = self.memory_bank.device
        self.check_keys = torch.zeros(0, dtype=torch.long, device=device)
        self.check_nearest = torch.zeros(0, dtype=torch.long, device=device)
        self.check_bank = torch.zeros((), dtype=torch.long, device=device)

    def _set_effort(self, effort: int) -> None:
        self.effort = int(effort)
        self.search_effort = torch.tensor(self.effort, dtype=torch.long, device=self.memory_bank.device)

    def calibrate(self, batches: Iterable[Tensor]) -> None:
        """The search check. An approximate search's recall@1 against exact search is measured on the patches of
        held-out normal images (which test images resemble) and on the bank itself; while the held-out recall's
        lower 95 % confidence bound, or the bank's recall (its bound when the bank is sampled), is below ``recall``
        the effort doubles (EFFORT_DOUBLINGS times at most), and when that is not enough the search becomes exact
        (check.py). Every effort tried stays in ``search_trail`` (checkpoint, model card, report)."""
        if not self.effort:  # exact search: asked for, or a bank too small for an index
            return
        bank = self.memory_bank
        # on every core, as a fit without a check embeds (the backbone's rounding depends on the threads)
        held_out = self._held_out_patches(batches)
        keys = check.row_keys(held_out)
        # the exact nearest needs no graph; the threads it runs on did not change its results where measured (each
        # distance is one product of the features' length), and ``found`` compares distances with a tolerance
        with self._beside_the_build() as cores_back:
            nearest = check.exact_nearest(held_out, bank, keys, self.check_keys, self.check_nearest,
                                          int(self.check_bank), between=cores_back)
        self._graph_built()
        self.check_keys, self.check_nearest = keys, nearest
        self.check_bank = torch.tensor(bank.shape[0], device=bank.device)
        trail, effort, passed = check.measure(lambda queries, e: self._search(queries, 1, e)[1], held_out, nearest,
                                              bank, self.effort, self._effort_ceiling(), self.recall, self._exact_at)
        self.search_trail = torch.tensor(trail, dtype=torch.float64, device=bank.device)
        if passed:
            self._set_effort(effort)
            return
        self._set_effort(0)  # exact search; the index is dropped from the checkpoint
        self.hnsw_graph = torch.zeros(0, dtype=torch.uint8, device=bank.device)
        self.ivf_centroids = bank.new_zeros(0, self.dim)
        self.ivf_offsets = torch.zeros(0, dtype=torch.long, device=bank.device)

    def _graph_built(self) -> None:
        """Build the graph ``_index`` left to build, or wait for the worker building it, and keep it in
        ``hnsw_graph``; nothing when there is none. Every read of ``hnsw_graph`` comes here first (``__getattr__``,
        the state's save and copy, a move to a device)."""
        unbuilt, building = self._unbuilt, self._building
        self._unbuilt = self._building = None
        if building is not None:
            graph = building.result()
        elif unbuilt is not None:
            graph = hnsw_build(self.memory_bank, self.links, unbuilt[0], self.graph)
        else:
            return
        self.hnsw_graph = graph.to(self.memory_bank.device)

    def _forget_the_build(self) -> None:
        """The graph ``_index`` left to build, for a bank about to be replaced (a checkpoint's load): not built, or
        waited for and dropped where a worker is building it."""
        building, self._unbuilt, self._building = self._building, None, None
        if building is not None:
            building.exception()  # waits; whatever it built or raised belongs to the replaced bank

    @contextlib.contextmanager
    def _beside_the_build(self) -> Iterator[Callable[[], None]]:
        """The graph ``_index`` left to build is built by a worker thread on one core (one thread: the same bank
        gives the same graph) while torch's operations run on the others (one fewer thread), which get all the
        cores back, through the callable this yields (called between blocks of work), once the build is done; at
        the end, as many threads as before. Without a graph to build, or on fewer than two threads, or a bank on a
        GPU: nothing changes."""
        threads = torch.get_num_threads()
        unbuilt = self._unbuilt
        if unbuilt is None or threads < 2 or self.memory_bank.device.type != "cpu":
            yield lambda: None
            return
        worker = ThreadPoolExecutor(1, thread_name_prefix="adkit-hnsw")
        self._building, self._unbuilt = worker.submit(hnsw_build, self.memory_bank, self.links, unbuilt[0],
                                                      self.graph), None
        worker.shutdown(wait=False)
        building = self._building

        def cores_back() -> None:
            if building.done():
                torch.set_num_threads(threads)

        torch.set_num_threads(threads - 1)
        try:
            yield cores_back
        finally:
            torch.set_num_threads(threads)

    def _held_out_patches(self, batches: Iterable[Tensor]) -> Tensor:
        """The patch features of whole held-out images, in order, up to CHECK_QUERIES of them: (M, dim)."""
        collected, total = [], 0
        for images in batches:
            patches = self.embed(images).permute(0, 2, 3, 1).reshape(images.shape[0], -1, self.dim)
            room = max(1, (CHECK_QUERIES - total) // patches.shape[1])
            collected.append(patches[:room].reshape(-1, self.dim))
            total += collected[-1].shape[0]
            if total >= CHECK_QUERIES:
                break
        return torch.cat(collected) if collected else self.memory_bank.new_zeros(0, self.dim)

    def _exact_at(self, effort: int) -> bool:
        """Whether the search is exact by construction at ``effort``: IVF probing every cell, the projected search
        re-ranking every bank feature (a graph walk never is)."""
        if self.search == "ivf":
            return effort >= self.ivf_centroids.shape[0]
        return self.search == "projected" and effort >= self.memory_bank.shape[0]

    def _effort_ceiling(self) -> int:
        """The highest effort worth trying: every cell probed (IVF is then exact), every bank feature a candidate,
        the HNSW ef doubled EFFORT_DOUBLINGS times."""
        if self.search == "ivf":
            return self.ivf_centroids.shape[0]
        if self.search == "projected":
            return self.memory_bank.shape[0]
        return self.effort * 2 ** EFFORT_DOUBLINGS

    def approximations(self) -> dict[str, Any]:
        """The search: what was asked, what runs, and the recall@1 the check measured at each effort it tried
        (with its lower 95 % confidence bound, which the check holds to ``recall``)."""
        name = EFFORT.get(self.search)
        record = check.describe(self.search, name and getattr(self, name), self.effort, self.search_trail.tolist(),
                                self.memory_bank.shape[0], self.recall, INDEX_MIN_BANK)
        if self.effort and self.search in ("hnsw", "ivf") and is_exporting():  # the graph and cells are eager-only
            record["used"] = "exact"
            record["summary"] = f"exact search in the exported graph (the checkpoint's: {record['summary']})"
        elif self.effort and self.hnsw_graph.numel():
            record["graph"] = graph_kind(self._hnsw())
            record["summary"] += f"; graph of {record['graph']}"
        return {"search": record}

    def ivf_cells(self, bank: int) -> int:
        """The cells of search=ivf for a bank of ``bank`` features: ``cells``, or about sqrt(bank) with cells=0;
        0 (exact search) for other searches and for automatic cells on a small bank."""
        if self.search != "ivf":
            return 0
        if self.cells == 0:
            return 0 if bank < INDEX_MIN_BANK else max(self.probes, round(bank ** 0.5))
        if bank < self.cells * IVF_MIN_CELL:
            raise AdkitError(f"patchcore: search=ivf,cells={self.cells} needs a bank of at least "
                             f"{self.cells * IVF_MIN_CELL} features ({IVF_MIN_CELL} a cell); this one has {bank}: use "
                             "fewer cells, cells=0 (automatic) or search=exact")
        return self.cells

    def _nearest(self, patches: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self._search(patches, k, self.effort)

    def _search(self, patches: Tensor, k: int, effort: int) -> tuple[Tensor, Tensor]:
        """The k nearest bank features by the fitted search at ``effort`` (ef, probes or candidates; 0: exact).
        The graph and the cells are eager-only: an exported graph searches exactly."""
        eager = k == 1 and not (is_exporting() or tracing())
        if effort and eager and self.hnsw_graph.numel():
            return knn_hnsw(patches, self._hnsw(), effort, self.memory_bank)
        if effort and eager and self.ivf_centroids.shape[0]:
            return knn_ivf(patches, self.memory_bank, self.ivf_centroids, self.ivf_offsets, effort)
        if effort and self.search == "projected":
            return knn_projected(patches, self.memory_bank, self.search_projection, self.bank_projected, k, effort)
        return self._exact(patches, k)

    def _nearest_outside(self, patches: Tensor, parts: Tensor, group: int) -> tuple[Tensor, Tensor]:
        """Each patch's nearest bank feature that did not come from the patch's own part (``parts`` (M,): each
        patch's training row // ``group``): distances (M,) and bank indices (M,). Taken from the fitted search's
        LEAVE_OUT_CANDIDATES nearest (the graph at its checked effort, else exact); a patch whose candidates all
        came from its own part is searched exactly over the rest of the bank."""
        bank_parts = self.bank_origin // group
        k = min(LEAVE_OUT_CANDIDATES, self.memory_bank.shape[0])
        if self.effort and self.hnsw_graph.numel():
            distance, index = knn_hnsw(patches, self._hnsw(), self.effort, self.memory_bank, k)
        else:
            distance, index = self._exact(patches, k)
        own = (index < 0) | (bank_parts[index.clamp_min(0)] == parts[:, None])
        first = (~own).int().argmax(1, keepdim=True)
        nearest_distance, nearest = distance.gather(1, first)[:, 0], index.gather(1, first)[:, 0]
        missing = own.all(1).nonzero()[:, 0]
        if missing.numel():
            nearest_distance[missing], nearest[missing] = self._exact_outside(patches, parts, missing, group)
        return nearest_distance, nearest

    def _exact_outside(self, patches: Tensor, parts: Tensor, rows: Tensor, group: int) -> tuple[Tensor, Tensor]:
        """The exact nearest bank feature outside its own part of each patch ``rows`` (indices into ``patches``,
        whose parts are ``parts``): distances (R,) and bank indices (R,)."""
        bank_parts = self.bank_origin // group
        distance = patches.new_empty(rows.numel())
        nearest = torch.empty(rows.numel(), dtype=torch.long, device=patches.device)
        for start in range(0, rows.numel(), LEAVE_OUT_EXACT_ROWS):
            chunk = rows[start:start + LEAVE_OUT_EXACT_ROWS]
            squared = squared_distances(patches[chunk].float(), self.memory_bank.float(), self._bank_norms())
            squared[bank_parts[None, :] == parts[chunk, None]] = float("inf")
            smallest, where = squared.min(1)
            distance[start:start + chunk.numel()], nearest[start:start + chunk.numel()] = smallest.sqrt(), where
        return distance, nearest

    def _exact_at_the_top(self, patches: Tensor, distance: Tensor, index: Tensor, images: int,
                          score: Callable[[Tensor], Tensor], parts: Tensor | None = None) -> None:
        """Make each image's highest patch score that of exact search, in place, where the search that gave
        ``distance`` and ``index`` (M,: each patch's nearest bank feature, ``images`` images of M / images patches;
        under leaving_out outside the patch's row's part, ``parts`` (images,)) is approximate and eager. ``score``
        maps distances (images, M / images) to patch scores, never lower for a larger distance. A found neighbour
        is never nearer than the nearest, so a patch's approximate score bounds its exact score from above: the
        EXACT_TOP highest unchecked patches of an image are searched exactly, round after round, until its highest
        exact score is at least every unchecked patch's bound. Its image score, the nearest bank feature that
        PatchCore's re-weighting starts from, and so its decisions, are then exact search's; the rest of the map
        stays the approximate search's (its recall checked by calibrate)."""
        if not self.effort or not distance.numel() or is_exporting() or tracing():
            return
        per_image = distance.numel() // images
        if parts is None:
            def exact(rows: Tensor) -> tuple[Tensor, Tensor]:
                found, where = self._exact(patches[rows], 1)
                return found[:, 0], where[:, 0]
        else:
            patch_parts = parts.repeat_interleave(per_image)

            def exact(rows: Tensor) -> tuple[Tensor, Tensor]:
                return self._exact_outside(patches, patch_parts, rows, self._left_out.group)
        checked = torch.zeros(images, per_image, dtype=torch.bool, device=distance.device)
        while True:
            scores = score(distance.view(images, per_image))
            highest_checked = scores.masked_fill(~checked, float("-inf")).amax(1)
            unchecked = scores.masked_fill(checked, float("-inf"))
            open_ = (unchecked.amax(1) > highest_checked).nonzero()[:, 0]
            if not open_.numel():
                return
            top = unchecked[open_].topk(min(EXACT_TOP, per_image), dim=1).indices  # checked ones rank last
            rows = (open_[:, None] * per_image + top).reshape(-1)
            rows = rows[~checked.view(-1)[rows]]
            if not rows.numel():
                return
            distance[rows], index[rows] = exact(rows)
            checked.view(-1)[rows] = True

    def _exact(self, patches: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``knn`` of ``patches`` in the bank, with the bank's kept norms."""
        return knn(patches, self.memory_bank, k, bank_norms=self._bank_norms())

    def _bank_norms(self) -> Tensor | None:
        """``norms`` of the bank, computed once per bank (``_index`` and a checkpoint's load forget them): an exact
        search of a few patches, as ``_exact_at_the_top`` and the re-weighting run for every image, otherwise
        reads the whole bank twice more to get them. None while a graph is traced or compiled: the search then
        computes them in the graph."""
        if tracing():
            return None
        bank = self.memory_bank
        key = (bank.data_ptr(), tuple(bank.shape), bank.device)
        if self._norms is None or self._norms[0] != key:
            self._norms = (key, norms(bank))
        return self._norms[1]

    def _hnsw(self) -> object:
        """The HNSW index of ``hnsw_graph``, deserialised once per graph (a restore or refit replaces it)."""
        key = (self.hnsw_graph.data_ptr(), self.hnsw_graph.numel())
        if self._graph is None or self._graph[0] != key:
            self._graph = (key, hnsw_load(self.hnsw_graph))
        return self._graph[1]
