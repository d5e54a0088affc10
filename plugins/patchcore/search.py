"""Nearest-neighbour search of patch features in a memory bank, in chunks that bound memory.

``nearest`` is exact: squared Euclidean distances |q|^2 - 2 q.b + |b|^2 by matrix products over (query chunk x
bank chunk) blocks, a running minimum per query. ``nearest_projected`` is approximate: candidates from the same
search on a random projection of both sides, re-ranked with exact distances.
"""

from __future__ import annotations

import torch
from torch import Tensor

# elements of one (queries x bank) distance block: 2^24 floats = 64 MiB
BLOCK_ELEMENTS = 1 << 24


def _blocks(queries: int, bank: int, block_elements: int) -> tuple[int, int]:
    bank_chunk = min(bank, max(1, block_elements // max(1, min(queries, 4096))))
    query_chunk = max(1, block_elements // bank_chunk)
    return query_chunk, bank_chunk


def squared_distances(queries: Tensor, bank: Tensor) -> Tensor:
    """(M, d), (K, d) -> (M, K) squared Euclidean distances, clamped at 0 against rounding."""
    return (queries.pow(2).sum(1, keepdim=True) - 2 * queries @ bank.T + bank.pow(2).sum(1)).clamp_min_(0)


def _tracing() -> bool:
    """True while torch.jit.trace or torch.export records the graph: the query count is then a symbol of the
    batch size, and a Python loop over query chunks would be frozen at the traced batch."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def knn(queries: Tensor, bank: Tensor, k: int = 1, block_elements: int = BLOCK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours: Euclidean distances (M, k) ascending and bank indices (M, k). The loop over
    bank chunks depends only on the bank; queries are chunked in eager mode only (one chunk in a traced graph)."""
    n = bank.shape[0]
    k = min(k, n)
    if _tracing():
        return _knn_chunk(queries.float(), bank.float(), bank.float().pow(2).sum(1), k,
                          _blocks(4096, n, block_elements)[1])
    m = queries.shape[0]
    query_chunk, bank_chunk = _blocks(m, n, block_elements)
    queries, bank = queries.float(), bank.float()
    bank_norms = bank.pow(2).sum(1)
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
                  candidates: int = 10, block_elements: int = BLOCK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Approximate k nearest neighbours: the ``candidates`` nearest in the projected space (queries @ projection
    against ``bank_projected``), re-ranked exactly. Distances (M, k) ascending and indices (M, k)."""
    _, index = knn(queries.float() @ projection, bank_projected, max(k, candidates), block_elements)
    exact = (queries.float()[:, None, :] - bank.float()[index]).pow(2).sum(-1).sqrt()
    distance, order = exact.topk(min(k, index.shape[1]), dim=1, largest=False)
    return distance, index.gather(1, order)
