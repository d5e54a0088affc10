"""Greedy coreset selection (minimax facility location, Sener & Savarese 2018; PatchCore §3.2).

Start from one random point; repeatedly add the point farthest from the points chosen so far. Distances are
computed on a random linear projection of the features (Johnson-Lindenstrauss), as PatchCore does, so the cost is
count x N x projection multiply-adds and one (N,) vector of running minimum distances.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor


def random_projection(dim: int, target: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A (dim, target) Gaussian matrix scaled by 1 / sqrt(target): distances keep their scale on average."""
    matrix = torch.randn(dim, target, generator=generator, device=generator.device)
    return (matrix / target ** 0.5).to(device)


# upper bounds are refined this many points at a time (one product with the earlier centres)
REFINE_BATCH = 256


def greedy_coreset(features: Tensor, count: int, generator: torch.Generator,
                   nearest: Tensor | None = None, exact: Callable[[Tensor], Tensor] | None = None,
                   first: int | None = None) -> Tensor:
    """Indices (count,) of a greedy k-centre subset of ``features`` (N, d), the first drawn with ``generator``
    (or given: ``first``); or, given ``nearest`` (N,), the squared distances of the points to centres chosen
    before (a bank being extended), the first is the point farthest from those and the selection continues theirs.

    Each step computes the squared distance of every point to the newest centre as |x|^2 - 2 x.c + |c|^2 (one
    matrix-vector product) and keeps the running minimum over the centres; the next centre is its argmax.

    With ``exact``, ``nearest`` holds upper bounds of those distances and ``exact(indices)`` the distances
    themselves (the earlier centres being many, a bank): a point's bound is replaced by its distance only when
    the point leads the running minimum (REFINE_BATCH leaders at a time). A leader whose distance is known is the
    argmax of the true running minimum (every other point's value is at most its bound), so the selection is the
    one the distances themselves give, at the cost of the distances of the points that came to lead.
    """
    n = features.shape[0]
    if not 0 < count <= n:
        raise ValueError(f"coreset of {count} points from {n}")
    features = features.float()
    norms = features.pow(2).sum(dim=1)
    chosen = torch.empty(count, dtype=torch.long, device=features.device)
    known = torch.full((n,), exact is None, dtype=torch.bool, device=features.device)
    if nearest is None:
        nearest = torch.full((n,), float("inf"), device=features.device)
        index = first_index(n, generator) if first is None else torch.tensor(first, device=features.device)
    else:
        nearest = nearest.float().to(features.device).clone()
        index = torch.argmax(nearest)
    i = 0
    while i < count:
        if not known[index]:  # refine the leaders' bounds, then look again
            # distances are >= 0: the top ones of this are unknown points only
            leaders = torch.topk(torch.where(known, -1.0, nearest), min(REFINE_BATCH, int((~known).sum()))).indices
            nearest[leaders] = torch.minimum(nearest[leaders], exact(leaders).float().to(features.device))
            known[leaders] = True
            index = torch.argmax(nearest)
            continue
        chosen[i] = index
        i += 1
        centre = features[index]
        distance = torch.addmv(norms + norms[index], features, centre, alpha=-2.0)
        torch.minimum(nearest, distance, out=nearest)
        index = torch.argmax(nearest)
    return chosen


def first_index(n: int, generator: torch.Generator) -> Tensor:
    """The greedy's first point among ``n``, drawn with ``generator``."""
    return torch.randint(n, (1,), generator=generator, device=generator.device)[0]


def partitioned_greedy_coreset(features: Tensor, count: int, generator: torch.Generator, partition: int,
                               nearest: Tensor | None = None,
                               exact: Callable[[Tensor], Tensor] | None = None, threads: int | None = None) -> Tensor:
    """Greedy coresets of random partitions of at most ``partition`` points, each keeping its share of ``count``;
    their union, indices (count,). Exact greedy costs count x N x d for N points, and each step streams all N
    projected features from memory; on partitions that fit the processor's cache it costs N / partition times
    less and runs from cache. The union of per-partition greedy k-centre sets is a composable coreset (Indyk et
    al., PODS 2014): a constant-factor approximation of the whole set's cover radius. ``partition >= N`` is the
    exact greedy. ``nearest`` (N,) and ``exact``: as in ``greedy_coreset``, each partition continuing the earlier
    centres (``exact`` takes indices into ``features``).

    On a CPU the partitions run on ``threads`` (default: torch's) threads, one partition a thread: a step's
    matrix-vector product over a partition runs on one core at the speed of its cache, so two partitions at once
    take about the time of one. Each partition's first point is drawn before, in partition order: the selection is
    the one-at-a-time one, whatever the threads."""
    n = features.shape[0]
    if partition <= 0 or partition >= n:
        return greedy_coreset(features, count, generator, nearest, exact)
    groups = -(-n // partition)
    order = torch.randperm(n, generator=generator, device=generator.device).to(features.device)
    bounds = [round(i * n / groups) for i in range(groups + 1)]
    shares = [round(count * bounds[i + 1] / n) - round(count * bounds[i] / n) for i in range(groups)]
    jobs = [(bounds[i], bounds[i + 1], share) for i, share in enumerate(shares) if share]
    firsts = [None if nearest is not None else int(first_index(high - low, generator)) for low, high, _ in jobs]

    threads = min(threads or torch.get_num_threads(), len(jobs)) if features.device.type == "cpu" else 1
    # ``exact`` searches the whole bank on all of torch's threads: one partition's search at a time, so that the
    # threads that run partitions never multiply the threads that search
    searching = threading.Lock()

    def select(job: tuple[int, int, int], first: int | None) -> Tensor:
        low, high, share = job
        members = order[low:high]
        start = None if nearest is None else nearest[members]

        def mine(rows: Tensor) -> Tensor:
            with searching:
                return exact(members[rows])

        return members[greedy_coreset(features[members], share, generator, start, None if exact is None else mine,
                                         first)]

    if threads <= 1:
        return torch.cat([select(job, first) for job, first in zip(jobs, firsts)])
    with ThreadPoolExecutor(threads) as pool:
        return torch.cat(list(pool.map(select, jobs, firsts)))


def greedy_coreset_reference(features: Tensor, count: int, first: int | None,
                             centres: Tensor | None = None) -> list[int]:
    """The same selection written plainly (Python loops over points): a reference for tests. With ``centres``
    (K, d) chosen before, ``first`` is None and the selection continues from them."""
    points = features.double()
    before = [] if centres is None else list(centres.double())
    chosen: list[int] = [] if first is None else [first]
    while len(chosen) < count:
        best, best_distance = -1, -1.0
        for i in range(points.shape[0]):
            distance = min([float((points[i] - points[j]).pow(2).sum()) for j in chosen] +
                           [float((points[i] - c).pow(2).sum()) for c in before])
            if distance > best_distance:
                best, best_distance = i, distance
        chosen.append(best)
    return chosen
