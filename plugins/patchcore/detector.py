"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022); spec §5 and
docs/methods/patchcore.md give our reading.

fit: locally aware patch features of every training image -> greedy coreset on a random projection -> memory
bank -> search index. calibrate: the index's recall@1 against exact search on held-out normal patches and on the
bank, its effort raised until both reach ``recall`` or exact search instead. detect: distance of each test patch
to its nearest bank feature is the patch map, upsampled to the image and Gaussian-smoothed (sigma 4); the image
score is the paper's re-weighted maximum (or the plain maximum). With labelled defects (a dataset's train_defects)
the patches' distances are weighted by their nearness to the defects' patches (defects.py) and the image score is
their maximum.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from adkit.plugin import (
    AdkitError,
    Backbone,
    Detection,
    Detector,
    DetectorContext,
    LabelledDefects,
    LeftOutRows,
    build_backbone,
    check_layers,
    derived_seed,
    gather_sharded,
    locally_aware_patches,
)
from adkit_plugins.patchcore.check import EFFORT
from adkit_plugins.patchcore.coreset import partitioned_greedy_coreset, random_projection
from adkit_plugins.patchcore.defects import defect_patches, weighted_by_defects
from adkit_plugins.patchcore.index import IndexedBank
from adkit_plugins.patchcore.search import block_elements_on, hnsw_candidates, knn, squared_distances

# the upper bounds an update's greedy starts from exceed the graph's nearest feature's distance by this share of
# the two squared norms: more than the rounding of the distances they stand in for
BOUND_MARGIN = 1e-4
# the graph's search effort for those bounds: a bound need not be tight, and a loose one only costs the patch an
# exact search should it come to lead
BOUND_EFFORT = 16
# the graph's nearest features whose projected distances the bound takes the least of: the projection ranks
# features differently from the features themselves, and a tighter bound leaves fewer patches to search exactly
BOUND_CANDIDATES = 8


def memory_limit_bytes() -> int:
    """Half the machine's physical memory: the most the patch features collected before the coreset may take."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 8 << 30


class PatchCore(IndexedBank, Detector):
    """PatchCore: nearest-neighbour distance of locally aware patch features to a coreset memory bank."""

    trainable = False
    own_scores = True
    # the paper's smoothing of the upsampled map (sigma 4 px), as the pipeline's first post-processor: it shows in
    # the recorded pipeline, and pixel metrics read the smoothed map as the method defines it
    default_postprocessors = ("gaussian:sigma=4",)
    default_pixel_map = "post"
    default_scorer = "max"
    consumes: ClassVar[frozenset[str]] = frozenset({"backbone"})
    fitted_buffers: ClassVar[tuple[str, ...]] = ("memory_bank", "bank_origin", "bank_projected", "ivf_centroids",
                                                 "ivf_offsets", "hnsw_graph", "search_trail", "check_keys",
                                                 "check_nearest", "defect_bank")
    fit_shards = True  # under torchrun each rank embeds its share; every rank selects the same coreset from all
    updatable = True  # new images' patches join the bank by the coreset rule, continuing the fitted selection
    uses_defects = True  # labelled defects' patches make a second bank that re-weights the distances (defects.py)

    def __init__(self, backbone: str = "efficientnet-lite0", layers: tuple[int, ...] = (2, 3), dim: int = 128,
                 coreset: float = 0.1, projection: int = 128, partition: int = 16384, neighbours: int = 9,
                 score: Literal["reweighted", "max"] = "reweighted",
                 search: Literal["exact", "projected", "ivf", "hnsw"] = "hnsw", search_dim: int = 32,
                 candidates: int = 10, cells: int = 0, probes: int = 8, links: int = 16, ef: int = 32,
                 graph: Literal["fp16", "fp32"] = "fp16", recall: float = 0.999, seed: int = 0):
        super().__init__()
        self.layers = check_layers(layers, "patchcore")
        if dim < len(self.layers):
            raise ValueError(f"patchcore dim must be at least one per layer ({len(self.layers)}), got {dim}")
        if not 0 < coreset <= 1:
            raise ValueError(f"patchcore coreset is a fraction in (0, 1], got {coreset}")
        if projection < 1 or neighbours < 1 or candidates < 1 or partition < 0 or search_dim < 1:
            raise ValueError("patchcore needs projection >= 1, partition >= 0, neighbours >= 1, search_dim >= 1, "
                             "candidates >= 1")
        if cells < 0 or probes < 1:
            raise ValueError(f"patchcore search=ivf needs cells >= 0 (0: automatic) and probes >= 1, got cells={cells}, "
                             f"probes={probes}")
        if links < 2 or ef < 1:
            raise ValueError(f"patchcore search=hnsw needs links >= 2 and ef >= 1, got links={links}, ef={ef}")
        if not 0 <= recall <= 1:
            raise ValueError(f"patchcore recall is the recall@1 an approximate search must show, in [0, 1] (0: not "
                             f"enforced), got {recall}")
        self.cells, self.probes, self.links, self.ef, self.recall = cells, probes, links, ef, recall
        self.graph = graph  # the HNSW graph's stored copy of the bank (search.GRAPH_STORAGE)
        self._graph: tuple[int, object] | None = None  # the deserialised HNSW index, for the graph it came from
        # greedy coreset on random partitions of this many features (0: exact greedy over all; coreset.py)
        self.partition = partition
        self.backbone_spec, self.dim, self.coreset = backbone, dim, coreset
        self.projection_dim, self.neighbours, self.score_mode = projection, neighbours, score
        self.search, self.search_dim, self.candidates, self.seed = search, search_dim, candidates, seed
        self.backbone: Backbone | None = None
        self.register_buffer("memory_bank", torch.zeros(0, dim))
        # the training row (an image, or a tile of one) each bank feature came from: leaving_out() searches the bank
        # without a part's own features; empty where unknown (IVF's reordered cells, fitted before adkit 0.4)
        self.register_buffer("bank_origin", torch.zeros(0, dtype=torch.long))
        self._left_out: LeftOutRows | None = None  # leaving_out's rows while it is open
        # search=projected: candidates come from a scan on this projection of the bank, then exact re-ranking
        self.register_buffer("search_projection", torch.zeros(dim, search_dim))
        self.register_buffer("bank_projected", torch.zeros(0, search_dim))
        # search=ivf: k-means cells of the bank (memory_bank is stored cell by cell); empty: exact search
        self.register_buffer("ivf_centroids", torch.zeros(0, dim))
        self.register_buffer("ivf_offsets", torch.zeros(0, dtype=torch.long))
        # search=hnsw: faiss's graph of the bank, serialised (built once at fit, deterministic)
        self.register_buffer("hnsw_graph", torch.zeros(0, dtype=torch.uint8))
        # the effort (ef, probes or candidates) the search runs at after the check; 0: exact search
        self.register_buffer("search_effort", torch.zeros((), dtype=torch.long))
        self.effort = 0  # search_effort as a Python number: a traced graph must not read a buffer's value
        # the training patch features the bank was selected from (fit and every update): the coreset's budget is
        # ``coreset`` of them
        self.register_buffer("feature_count", torch.zeros((), dtype=torch.long))
        # one row per effort the check tried: effort, recall@1 on held-out patches and on the bank, and how many
        # held-out patches and bank features were searched
        self.register_buffer("search_trail", torch.zeros(0, 5, dtype=torch.float64))
        # the last check's held-out patches (check.row_keys) and their exact nearest among the first check_bank bank
        # features: an update's check searches only the features added since for them (check.exact_nearest)
        self.register_buffer("check_keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("check_nearest", torch.zeros(0, dtype=torch.long))
        self.register_buffer("check_bank", torch.zeros((), dtype=torch.long))
        # the labelled defects' patch features (defects.py); empty: none were given, the distances stand alone
        self.register_buffer("defect_bank", torch.zeros(0, dim))

    def setup(self, context: DetectorContext) -> None:
        self.backbone = build_backbone(context, self.backbone_spec)
        self.backbone.check_stages(self.layers, "patchcore")
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "patchcore-search"))
        self.search_projection = random_projection(self.dim, self.search_dim, generator, context.device)

    def embed(self, images: Tensor) -> Tensor:
        """Locally aware patch features (B, dim, h, w): adkit.core.features.locally_aware_patches."""
        return locally_aware_patches(self.backbone, images, self.layers, self.dim)

    def fit(self, batches: Iterable[Tensor], defects: LabelledDefects | None = None) -> None:
        limit = memory_limit_bytes()
        collected: list[Tensor] = []
        total = 0
        for images in batches:
            patches = self.embed(images).permute(0, 2, 3, 1).reshape(-1, self.dim)
            total += patches.numel() * patches.element_size()
            if total > limit:
                raise AdkitError(f"patchcore: the patch features exceed {limit / 2**30:.1f} GiB (half this machine's "
                                 f"memory) before the coreset; use fewer or smaller images (--image-size), a smaller "
                                 f"dim (now {self.dim}) or layers with a coarser grid")
            collected.append(patches.view(images.shape[0], -1, self.dim).cpu())
        local = torch.cat(collected) if collected else torch.zeros(0, 1, self.dim)
        # (images, patches, dim) in the original image order on every rank: the same coreset as one process
        gathered = gather_sharded(local)
        per_row = gathered.shape[1]
        features = gathered.reshape(-1, self.dim)
        if features.shape[0] == 0:
            raise AdkitError("patchcore: no training images to fit on")
        device = self.memory_bank.device
        count = max(1, round(self.coreset * features.shape[0]))
        on_device = features.to(device)
        if count < features.shape[0]:
            generator = torch.Generator(device=device).manual_seed(derived_seed(self.seed, "patchcore-coreset"))
            projected = on_device @ random_projection(self.dim, self.projection_dim, generator, device)
            chosen = partitioned_greedy_coreset(projected, count, generator, self.partition)
            bank = on_device[chosen]
        else:
            chosen, bank = torch.arange(features.shape[0], device=device), on_device
        self.feature_count = torch.tensor(features.shape[0], device=device)
        self._forget_check()
        self._index(bank, origin=chosen // per_row)
        self.defect_bank = self._defect_patches(defects)

    def update(self, batches: Iterable[Tensor], defects: LabelledDefects | None = None) -> None:
        """Add normal images: the bank's budget stays ``coreset`` of all the patch features it was chosen from, and
        the new patches fill the difference by the same greedy rule, continued: each next one is the new patch
        farthest (in the same random projection) from the bank and from those added before it. The bank keeps
        every feature it had; the index takes the added ones (the graph inserts them, IVF's cells are built again)
        and is checked by ``calibrate``, from the effort the last check chose (a bank that grew needs no less).
        Labelled ``defects`` join the defect bank by the fit's rule, against the updated bank."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("patchcore: fit() must run before update()")
        embedded = [self.embed(images) for images in batches]
        if embedded:
            per_row = embedded[0].shape[2] * embedded[0].shape[3]
            new = torch.cat([e.permute(0, 2, 3, 1).reshape(-1, self.dim) for e in embedded])
            self._add_normal(new.to(self.memory_bank.device), per_row)
        self.defect_bank = torch.cat([self.defect_bank, self._defect_patches(defects)])

    def _defect_patches(self, defects: LabelledDefects | None) -> Tensor:
        """The patches of ``defects`` that join the defect bank (defects.py's rule, against the bank as it is now):
        (K, dim) on the bank's device, K = 0 without defects."""
        device = self.memory_bank.device
        chosen = defect_patches(defects, lambda images: self.embed(images.to(device)),
                                lambda patches: self._exact(patches, 1)[0][:, 0])
        return chosen.to(device) if chosen.numel() else torch.zeros(0, self.dim, device=device)

    def _add_normal(self, new: Tensor, per_row: int) -> None:
        """The new patch features (M, dim), ``per_row`` an image, into the bank by the continued greedy rule
        (``update``); they are the training rows after the fitted ones."""
        bank = self.memory_bank
        fitted = int(self.feature_count) or round(bank.shape[0] / self.coreset)  # before adkit 0.4: estimated
        total = fitted + new.shape[0]
        add = min(new.shape[0], max(0, round(self.coreset * total) - bank.shape[0]))
        origin = self.bank_origin if self.bank_origin.shape[0] == bank.shape[0] else None
        if add:
            device = bank.device
            generator = torch.Generator(device=device).manual_seed(derived_seed(self.seed, "patchcore-coreset"))
            projection = random_projection(self.dim, self.projection_dim, generator, device)  # the fit's
            projected, bank_projected = new @ projection, bank @ projection
            chosen = partitioned_greedy_coreset(projected, add, generator, self.partition,
                                                *self._distances_to_bank(new, projected, bank_projected))
            bank = torch.cat([bank, new[chosen]])
            if origin is not None:
                origin = torch.cat([origin, fitted // per_row + chosen.to(origin.device) // per_row])
        self.feature_count = torch.tensor(total, device=bank.device)
        chosen_effort = self.effort
        self._index(bank, extends=self.memory_bank.shape[0], origin=origin)
        if chosen_effort > self.effort:
            self._set_effort(chosen_effort)

    def _distances_to_bank(self, new: Tensor, projected: Tensor, bank_projected: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
        """The greedy continuation's start: each new patch's squared distance, in the projection, to its nearest
        bank feature (as ``knn`` computes it). With a graph over the bank, upper bounds and the exact distances
        on demand (greedy_coreset's ``exact``): the least projected distance among the BOUND_CANDIDATES features
        the graph finds nearest (any bank feature's distance bounds the nearest one's; a margin covers rounding)
        stands in until a patch could be chosen, so only those patches are searched against the whole bank."""
        def exact(rows: Tensor) -> Tensor:
            return knn(projected[rows], bank_projected, 1)[0][:, 0].pow(2)

        if not self.hnsw_graph.numel() or not self.effort:
            return exact(torch.arange(projected.shape[0], device=projected.device)), None
        candidates = min(BOUND_CANDIDATES, self.memory_bank.shape[0])
        # -1 (the walk found fewer): bank row 0, whose distance bounds the nearest one's as any bank feature's does
        near = hnsw_candidates(new, self._hnsw(), min(self.effort, BOUND_EFFORT), candidates).clamp_min(0)
        bound = torch.empty(new.shape[0], device=new.device)
        rows = max(1, block_elements_on(new.device) // (candidates * projected.shape[1]))
        for start in range(0, new.shape[0], rows):
            mine = slice(start, start + rows)
            squared = (projected[mine, None, :] - bank_projected[near[mine]]).pow(2).sum(-1)
            least, which = squared.min(1)
            nearest = bank_projected[near[mine].gather(1, which[:, None])[:, 0]]
            # knn's |q|^2 - 2 q.b + |b|^2 errs by up to about d * eps * (|q|^2 + |b|^2): the margin covers it
            bound[mine] = least + BOUND_MARGIN * (projected[mine].pow(2).sum(1) + nearest.pow(2).sum(1))
        return bound, exact

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._forget_the_build()  # a graph left to build belongs to the bank the load replaces
        if prefix + "feature_count" not in state_dict:  # fitted before updates (adkit < 0.4): update estimates it
            state_dict[prefix + "feature_count"] = torch.zeros((), dtype=torch.long)
        if prefix + "search_effort" not in state_dict:  # fitted before the search check (adkit < 0.4)
            indexed = state_dict[prefix + "hnsw_graph"].numel() > 0 or \
                state_dict[prefix + "ivf_centroids"].shape[0] > 0 or self.search == "projected"
            name = EFFORT.get(self.search)
            state_dict[prefix + "search_effort"] = torch.tensor(getattr(self, name) if indexed and name else 0)
            state_dict[prefix + "search_trail"] = torch.zeros(0, 5, dtype=torch.float64)
        if prefix + "check_keys" not in state_dict:  # fitted before the check kept its nearest (adkit < 0.4)
            state_dict[prefix + "check_keys"] = torch.zeros(0, dtype=torch.long)
            state_dict[prefix + "check_nearest"] = torch.zeros(0, dtype=torch.long)
            state_dict[prefix + "check_bank"] = torch.zeros((), dtype=torch.long)
        if prefix + "defect_bank" not in state_dict:  # fitted before labelled defects (adkit < 0.4)
            state_dict[prefix + "defect_bank"] = torch.zeros(0, self.dim)
        if prefix + "bank_origin" not in state_dict:  # fitted before leaving_out (adkit < 0.4): unknown
            state_dict[prefix + "bank_origin"] = torch.zeros(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.effort = int(self.search_effort)
        # a fitted buffer of the saved shape is loaded in place: what is kept for the tensors it replaced goes
        self._norms = self._graph = None

    def detect(self, images: Tensor) -> Detection:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("patchcore: fit() must run before detect()")
        embedding = self.embed(images)
        b, _, h, w = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(-1, self.dim)
        parts = None
        if self._left_out is not None:  # leaving_out: each row's own part's bank features are not searched
            parts, distance, index = self._next_left_out(patches, b)
        else:
            distance, index = self._nearest(patches, 1)
        defect = knn(patches, self.defect_bank, 1)[0][:, 0].view(b, h * w) if self.defect_bank.shape[0] else None

        def score(d: Tensor) -> Tensor:
            return d if defect is None else weighted_by_defects(d, defect)

        self._exact_at_the_top(patches, distance[:, 0], index[:, 0], b, score, parts)  # an approximate search's
        patch_scores = score(distance[:, 0].view(b, h * w))
        anomaly_map = F.interpolate(patch_scores.view(b, 1, h, w), size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)
        top, where = patch_scores.max(dim=1)
        if self.score_mode == "max" or self.defect_bank.shape[0]:  # the re-weighting reads the normal bank alone
            return Detection(anomaly_map, top)
        # m_test* (the most anomalous patch) and m* (its nearest bank feature), by gather rather than arange(b)
        # indexing, which a traced graph would freeze at the traced batch size
        test_feature = patches.view(b, h * w, self.dim).gather(1, where[:, None, None].expand(-1, 1, self.dim))[:, 0]
        nearest_bank = index[:, 0].view(b, h * w).gather(1, where[:, None])[:, 0]
        return Detection(anomaly_map, top * self.reweighting(test_feature, nearest_bank, parts))

    @torch.compiler.disable  # eager under --compile: it reads and advances leaving_out's rows
    def _next_left_out(self, patches: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """The next ``b`` rows of leaving_out: their parts (b,), and each patch's nearest bank feature outside its
        part, distances (M, 1) and bank indices (M, 1)."""
        parts = self._left_out.take(b)
        distance, index = self._nearest_outside(patches, parts.repeat_interleave(patches.shape[0] // b),
                                                self._left_out.group)
        return parts, distance[:, None], index[:, None]

    def reweighting(self, test_feature: Tensor, nearest_bank: Tensor, parts: Tensor | None = None) -> Tensor:
        """PatchCore's w = 1 - exp|m_test* - m*| / sum over N_b(m*) of exp|m_test* - m| (Eq. 7), with N_b(m*)
        the b nearest bank features of m* (m* itself among them): (B, d), (B,) bank indices -> (B,). ``parts``
        (leaving_out): N_b(m*) among the bank features not from each row's own part."""
        if parts is None:
            _, support = self._exact(self.memory_bank[nearest_bank], self.neighbours)
        else:
            squared = squared_distances(self.memory_bank[nearest_bank], self.memory_bank, self._bank_norms())
            squared[self.bank_origin[None, :] // self._left_out.group == parts[:, None]] = float("inf")
            support = squared.topk(min(self.neighbours, squared.shape[1]), dim=1, largest=False).indices
        distances = (test_feature[:, None, :] - self.memory_bank[support]).pow(2).sum(-1).sqrt()
        own = (test_feature - self.memory_bank[nearest_bank]).pow(2).sum(-1).sqrt()
        return 1 - torch.exp(own - torch.logsumexp(distances, dim=1))

    def anomaly_map(self, images: Tensor) -> Tensor:
        return self.detect(images).anomaly_map

    def can_leave_out(self, group: int = 1) -> bool:
        """Whether each bank feature's training row is known (not after IVF's reordering, nor in checkpoints fitted
        before adkit 0.4)."""
        return 0 < self.memory_bank.shape[0] == self.bank_origin.shape[0]

    @contextlib.contextmanager
    def leaving_out(self, rows: Tensor, group: int = 1) -> Iterator[None]:
        """``detect`` searches, for each input row (the training rows ``rows`` in order, call after call), the bank
        without the features that came from the row's part (the training rows with the same row // ``group``):
        the patch's nearest feature among the rest (the fitted search's nearest candidates, exactly where they all
        came from the part) and the re-weighting's neighbourhood among the rest: the score a bank selected without
        the image would give, but for the features the coreset left out because this image's stood near them
        (docs/thresholds.md measures the difference)."""
        if not self.can_leave_out():
            raise AdkitError("patchcore: this bank does not know which training image each feature came from "
                             "(search=ivf reorders it; checkpoints fitted before adkit 0.4): fit it again")
        self._left_out = LeftOutRows(rows.to(self.memory_bank.device), group, "patchcore")
        try:
            yield
        finally:
            self._left_out = None

    def export_note(self) -> str | None:
        if self.search == "exact":
            return None
        return (f"patchcore searches its memory bank exactly in this graph (search={self.search} is an eager-only "
                "index); its scores can be slightly lower than predict --checkpoint's where the index missed")
