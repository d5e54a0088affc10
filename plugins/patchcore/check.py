"""PatchCore's search check: an approximate search's recall@1 against exact search, measured on held-out normal
patches and on the bank, its effort raised until both reach the target or exact search instead; and the record of
what was measured (the log, metrics.json, report.html, model.json and /v1/models show it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adkit.plugin import CONFIDENCE, clopper_pearson_upper
from adkit_plugins.patchcore.search import direct_distances, found, found_slack, knn, norms

# at most this many held-out patches (whole images, in order) as queries
CHECK_QUERIES = 65536
# at most this many bank features as queries, evenly spaced: the bank's recall, measured whole up to this size,
# else bounded like the held-out recall (a bank feature finds itself at any effort the held-out patches pass:
# recall 0.9999-1.0000 on every shared set, where 16,384 queries bound it at >= 0.9996)
CHECK_BANK_QUERIES = 16384
# queries searched at a time by the check: an effort stops at the first block after which its misses fail it
CHECK_BLOCK = 8192
# the search effort is doubled at most this many times before the check falls back to exact search
EFFORT_DOUBLINGS = 4
# what each approximate search's effort is called (its parameter)
EFFORT = {"hnsw": "ef", "ivf": "probes", "projected": "candidates"}
KEY_SEED = 20261205  # row_keys' hash weights


def lower_bound(recall: float, n: int) -> float:
    """The one-sided lower CONFIDENCE bound of a recall measured on ``n`` queries (Clopper-Pearson)."""
    return 1 - clopper_pearson_upper(round((1 - recall) * n), int(n), CONFIDENCE) if n else 0.0


def row_keys(rows: Tensor) -> Tensor:
    """(M,) int64 fingerprints of (M, d) rows' float32 bits: a fixed random linear hash (wrapping int64
    arithmetic, so exact and independent of summation order). Rows with equal keys are taken as the same row; two
    different rows share a key with probability about 2^-64."""
    bits = rows.float().contiguous().view(torch.int32).long()
    generator = torch.Generator().manual_seed(KEY_SEED)
    weights = torch.randint(-(2 ** 62), 2 ** 62, (rows.shape[1],), generator=generator, dtype=torch.long) * 2 + 1
    return (bits * weights.to(rows.device)).sum(1)


def exact_nearest(queries: Tensor, bank: Tensor, keys: Tensor, cached_keys: Tensor, cached_nearest: Tensor,
                  cached_bank: int, between: Callable[[], None] = lambda: None) -> Tensor:
    """(M,) the index of each query's nearest bank feature, exactly. The last check's queries (``cached_keys``,
    ``row_keys``) had their nearest among the first ``cached_bank`` features of a bank that has only grown since
    (an update appends): a query found there keeps that one unless a feature added since is nearer, so only the
    added features are searched for it; every other query searches the whole bank. The queries are searched
    CHECK_BLOCK at a time, ``between`` called before each block."""
    def nearest_in(rows: Tensor, features: Tensor) -> Tensor:
        found_ = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
        kept = norms(features)  # once for every block, as one search of all the rows computes them
        for start in range(0, rows.shape[0], CHECK_BLOCK):
            between()
            found_[start:start + CHECK_BLOCK] = knn(rows[start:start + CHECK_BLOCK], features, 1,
                                                    bank_norms=kept)[1][:, 0]
        return found_

    nearest = torch.empty(queries.shape[0], dtype=torch.long, device=bank.device)
    hit = torch.zeros(queries.shape[0], dtype=torch.bool, device=bank.device)
    if cached_keys.numel() and 0 < cached_bank <= bank.shape[0]:
        order = torch.argsort(cached_keys)
        place = torch.searchsorted(cached_keys[order], keys).clamp(max=cached_keys.numel() - 1)
        hit = cached_keys[order][place] == keys
        before = cached_nearest[order[place[hit]]]
        if cached_bank < bank.shape[0]:
            added = nearest_in(queries[hit], bank[cached_bank:]) + cached_bank
            nearer = direct_distances(queries[hit], bank, added) < direct_distances(queries[hit], bank, before)
            before = torch.where(nearer, added, before)
        nearest[hit] = before
    if (~hit).any():
        nearest[~hit] = nearest_in(queries[~hit], bank)
    return nearest


def allowed_misses(n: int, passes: Callable[[float], bool]) -> int:
    """The most misses among ``n`` queries whose recall, ``(n - misses) / n``, still ``passes`` (fewer misses
    never fail); -1 when none passes (or there are no queries)."""
    if n <= 0:
        return -1
    low, high = -1, n + 1  # passes with ``low`` misses (or none does), fails with ``high``
    while high - low > 1:
        middle = (low + high) // 2
        if passes((n - middle) / n):
            low = middle
        else:
            high = middle
    return low


def measure(search: Callable[[Tensor, int], Tensor], held_out: Tensor, nearest_held: Tensor, bank: Tensor,
            effort: int, ceiling: int, target: float,
            exact_at: Callable[[int], bool]) -> tuple[list[tuple[float, ...]], int, bool]:
    """Search ``held_out`` patches (whose exact nearest bank features are ``nearest_held``, ``exact_nearest``) and
    the bank's own features with ``search(queries, effort)`` (the index of each query's nearest bank feature) from
    ``effort`` up, doubling it to ``ceiling``, until the held-out recall's lower 95 % bound and the bank's recall
    (its bound when the bank is sampled) reach ``target``; an effort raised so is then tried halfway back to the
    last that missed, and kept if it reaches the target too. The queries are searched CHECK_BLOCK at a time, and an
    effort whose misses already fail it stops there (its row counts the queries searched; the decision is the
    one all of them would give). Returns the trail (one row per effort: effort, held-out recall, bank recall
    (NaN where not reached), held-out queries, bank queries; the effort chosen last), the effort chosen and
    whether it passed."""
    step = max(1, -(-bank.shape[0] // CHECK_BANK_QUERIES))
    own = torch.arange(0, bank.shape[0], step, device=bank.device)  # each bank feature is its own nearest
    # held-out patches sample what test images will ask; the bank is searched whole up to CHECK_BANK_QUERIES
    # features (its recall is then exact), else as a sample too
    def held_passes(recall: float) -> bool:
        return lower_bound(recall, held_out.shape[0]) >= target

    def bank_passes(recall: float) -> bool:
        return (recall if step == 1 else lower_bound(recall, own.numel())) >= target

    def misses(queries: Tensor, nearest: Tensor, effort: int, allowed: int) -> tuple[int, int]:
        """(misses, queries searched) of ``search`` at ``effort``, stopped once the misses exceed ``allowed``."""
        missed = searched = 0
        for start in range(0, queries.shape[0], CHECK_BLOCK):
            block = slice(start, start + CHECK_BLOCK)
            missed += int((~found(queries[block], bank, search(queries[block], effort), nearest[block],
                                  slack=slack)).sum())
            searched = min(queries.shape[0], start + CHECK_BLOCK)
            if missed > allowed:
                break
        return missed, searched

    n_held, n_own = held_out.shape[0], own.numel()
    slack = found_slack(bank)  # once per check: it reads the whole bank
    held_allowed, own_allowed = allowed_misses(n_held, held_passes), allowed_misses(n_own, bank_passes)

    def tried(effort: int) -> tuple[tuple[float, ...], bool]:
        exact = exact_at(effort)  # passes whatever it finds: searched whole, for the record
        held_missed, held_searched = misses(held_out, nearest_held, effort, n_held if exact else held_allowed)
        held_ok = exact or (held_searched == n_held and n_held > 0 and held_passes((n_held - held_missed) / n_held))
        own_missed = own_searched = 0
        if held_ok or exact:
            own_missed, own_searched = misses(bank[own], own, effort, n_own if exact else own_allowed)
        own_ok = exact or (own_searched == n_own and n_own > 0 and bank_passes((n_own - own_missed) / n_own))
        row = (effort, (held_searched - held_missed) / held_searched if held_searched else float("nan"),
               (own_searched - own_missed) / own_searched if own_searched else float("nan"),
               held_searched, own_searched)
        return row, held_ok and own_ok

    trail: list[tuple[float, ...]] = []
    passed = False
    for _ in range(EFFORT_DOUBLINGS + 1):
        row, passed = tried(effort)
        trail.append(row)
        if passed or effort >= ceiling:
            break
        effort = min(2 * effort, ceiling)
    if passed and len(trail) > 1 and (trail[-2][0] + effort) // 2 > trail[-2][0]:
        middle = int(trail[-2][0] + effort) // 2
        row, enough = tried(middle)
        if enough:
            trail.append(row)
            effort = middle
        else:
            trail.insert(len(trail) - 1, row)  # the effort chosen stays last
    return trail, effort, passed


def describe(search: str, asked_effort: int | None, effort: int, rows: list[list[float]], bank: int, target: float,
             index_min_bank: int) -> dict[str, Any]:
    """The check's record: ``search`` asked at ``asked_effort``, running at ``effort`` (0: exact), the trail's
    ``rows`` (measure's), for a bank of ``bank`` features."""
    name = EFFORT.get(search)
    asked = search if name is None else f"{search} {name}={asked_effort}"
    def rounded(value: float, n: float) -> float | None:  # None: no query searched
        return round(value, 6) if n else None

    # a try stopped once its held-out misses failed it searched no bank feature (measure)
    trail = [{name: int(tried), "recall_held_out": rounded(held, n_held), "recall_bank": rounded(own, n_own),
              "held_out_patches": int(n_held), "bank_queries": int(n_own),
              "recall_held_out_lower95": rounded(lower_bound(held, n_held), n_held),
              # a bank searched whole has its recall measured, not estimated
              "recall_bank_lower95": rounded(own if n_own >= bank else lower_bound(own, n_own), n_own)}
             for tried, held, own, n_held, n_own in rows] if name else []
    used = "exact" if not effort else f"{search} {name}={effort}"
    record: dict[str, Any] = {"asked": asked, "used": used, "target_recall": target, "trail": trail}
    if search == "exact":
        record["summary"] = "exact search"
    elif not trail and not effort:
        record["summary"] = (f"exact search: a bank of {bank:,} features is below {index_min_bank:,}, where {asked} "
                             "builds no index")
    elif not trail:
        record["summary"] = f"{used}, recall not measured (fitted before adkit 0.4: fit again to check it)"
    else:
        last = trail[-1]
        on_bank = "the bank not searched" if last["recall_bank"] is None else f"{last['recall_bank']:.4f} on the bank"
        measured = ("no held-out patch searched" if last["recall_held_out"] is None else
                    f"recall@1 {last['recall_held_out']:.4f} (>= {last['recall_held_out_lower95']:.4f} at 95 %) "
                    f"on {last['held_out_patches']:,} held-out patches") + f", {on_bank}"
        if not effort:
            record["summary"] = (f"exact search: {search} up to {name}={last[name]} reached only {measured} "
                                 f"(target {target})")
        elif len(trail) > 1 or effort != asked_effort:  # an update's check starts where the last one ended
            record["summary"] = f"{used} (raised from {asked}): {measured}"
        else:
            record["summary"] = f"{used}: {measured}"
        record["recall_held_out"], record["recall_bank"] = last["recall_held_out"], last["recall_bank"]
    return record
