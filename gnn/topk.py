"""Exact top-K by inner product over an item matrix, one block of queries at a time (pure numpy / torch).

A block of query vectors is multiplied with the item matrix one chunk of items at a time; each chunk's top-K is
merged into a running top-K, so memory stays ``(B, chunk)`` scores whatever the catalogue size. Used by
``pipeline/recommend.py`` inside one Dask task per query block; usable alone in a notebook.

**Tie rule** (deterministic, documented for every caller): higher score first; equal scores are ordered by the
**lower item id first**. An item excluded for a query (the query item itself, a user's seen items) is never
returned; a query with fewer than K candidates left gets fewer results, padded with item id ``NO_ITEM`` (-1)
and score ``-inf`` in the ``(B, K)`` arrays.

Scores are float32 dot products computed by ``torch.matmul``; a brute-force ranking must use the same
arithmetic to reproduce ties exactly (the tests do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gnn.baselines import Histories

log = logging.getLogger(__name__)

NO_ITEM = -1
DEFAULT_CHUNK = 2048  # items scored at once: a (1024, 2048) float32 block is 8 MiB (cache-sized; measured best)
UserMode = Literal["last", "recent_sum", "recent_mean"]


@dataclass(frozen=True)
class TopK:
    """The K best items of a block of queries, best first.

    Shapes: ``items`` (B, K) int64 (``NO_ITEM`` where a query has fewer candidates), ``scores`` (B, K) float32
    (``-inf`` there).
    """

    items: np.ndarray
    scores: np.ndarray

    @property
    def k(self) -> int:
        return int(self.items.shape[1])

    def counts(self) -> np.ndarray:
        """(B,) number of real results per query."""
        return np.count_nonzero(self.items != NO_ITEM, axis=1)


def check_k(k: int, n_items: int, *, name: str = "k") -> int:
    """``k`` as an int, or a ValueError naming it when it is not in [1, n_items]."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"{name}={k!r}: pass a positive whole number of recommendations per query, e.g. 10")
    if k > n_items:
        raise ValueError(f"{name}={k}: larger than the catalogue of {n_items} items; pass {name} <= {n_items}")
    return int(k)


def order_by_rule(items: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by the tie rule (score descending, then item id ascending; ``NO_ITEM`` last).

    Shapes: ``items``, ``scores`` (B, M) -> the same, sorted along axis 1.
    """
    invalid = items == NO_ITEM
    neg = np.where(invalid, np.inf, -scores.astype(np.float32))  # -inf scores sort last as +inf
    big = np.where(invalid, np.iinfo(np.int64).max, items)
    order = np.lexsort((big, neg), axis=1)
    return np.take_along_axis(items, order, axis=1), np.take_along_axis(scores, order, axis=1)


def merge(a: TopK, b: TopK, k: int) -> TopK:
    """The K best of two candidate sets of the same queries (disjoint items), by the tie rule."""
    items, scores = order_by_rule(np.concatenate([a.items, b.items], axis=1),
                                  np.concatenate([a.scores, b.scores], axis=1))
    return TopK(items[:, :k], scores[:, :k])


def chunk_topk(scores: torch.Tensor, k: int, offset: int = 0) -> TopK:
    """Exact top-K of every row of one score chunk by the tie rule; ``-inf`` entries count as excluded.

    ``torch.topk`` orders equal values arbitrarily, so it is asked for K+1 values: where the K-th and the
    (K+1)-th are equal, the tie straddles the cut and that row is redone from all its entries equal to the cut
    value (lowest ids first). Ties inside the K are then sorted by id. Shapes: ``scores`` (B, C) float32 ->
    ``TopK`` with (B, min(K, C)) arrays whose ids are ``offset + column``.
    """
    n_rows, n_cols = scores.shape
    kk = min(k + 1, n_cols)
    vals_t, idx_t = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
    vals, idx = vals_t.numpy(), idx_t.numpy().astype(np.int64)
    take = min(k, n_cols)
    if kk > k:  # rows whose cut value is shared by an item outside the K
        cut = vals[:, k - 1]
        for r in np.flatnonzero((cut == vals[:, k]) & (cut > -np.inf)):
            row = scores[r].numpy()
            above = np.flatnonzero(row > cut[r])
            equal = np.flatnonzero(row == cut[r])[: k - above.shape[0]]
            idx[r, :k] = np.concatenate([above, equal])
            vals[r, :k] = row[idx[r, :k]]
    items = idx[:, :take] + offset
    top = vals[:, :take].copy()
    items[top == -np.inf] = NO_ITEM
    items, top = order_by_rule(items, top)
    if take < k:  # a chunk narrower than K: pad
        pad = k - take
        items = np.concatenate([items, np.full((n_rows, pad), NO_ITEM, np.int64)], axis=1)
        top = np.concatenate([top, np.full((n_rows, pad), -np.inf, np.float32)], axis=1)
    return TopK(items, top)


def block_topk(queries: np.ndarray, item_matrix: np.ndarray, k: int, *,
               exclude: tuple[np.ndarray, np.ndarray] | None = None, chunk: int = DEFAULT_CHUNK) -> TopK:
    """Exact top-K items by dot product for a block of query vectors, scanning the items chunk by chunk.

    Args:
        queries: (B, D) query vectors.
        item_matrix: (N, D) item vectors (any array, e.g. a memory map: each chunk is read once).
        k: results per query, 1 <= k <= N.
        exclude: (rows, items) pairs, each (R,) int: item ``items[j]`` is never returned for query ``rows[j]``.
        chunk: items scored at once.

    Returns ``TopK`` with (B, K) arrays, ordered by the tie rule of this module.
    """
    n_items, dim = item_matrix.shape
    check_k(k, n_items)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries have shape {queries.shape}; the item matrix has D={dim}: "
                         "query and item vectors must have the same dimension")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: pass a positive number of items")
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (B, D)
    ex_rows, ex_items = exclude if exclude is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ex_order = np.argsort(ex_items, kind="stable")
    ex_rows, ex_items = np.asarray(ex_rows, np.int64)[ex_order], np.asarray(ex_items, np.int64)[ex_order]
    best = TopK(np.full((q.shape[0], k), NO_ITEM, np.int64), np.full((q.shape[0], k), -np.inf, np.float32))
    buffer = torch.empty(q.shape[0], min(chunk, n_items))  # reused: a fresh block per chunk costs page faults
    for lo in range(0, n_items, chunk):
        hi = min(lo + chunk, n_items)
        block = torch.from_numpy(np.ascontiguousarray(item_matrix[lo:hi], dtype=np.float32))  # (C, D)
        scores = torch.matmul(q, block.T, out=buffer) if hi - lo == buffer.shape[1] else q @ block.T  # (B, C)
        a, b = np.searchsorted(ex_items, [lo, hi])
        if b > a:
            scores[torch.from_numpy(ex_rows[a:b]), torch.from_numpy(ex_items[a:b] - lo)] = -torch.inf
        best = _merge_chunk(best, scores, k, lo)
    return best


def _merge_chunk(best: TopK, scores: torch.Tensor, k: int, offset: int) -> TopK:
    """Fold one score chunk (items ``offset + column``, all of higher id than ``best``'s) into the running top-K.

    Only entries strictly above a row's current K-th score can enter it (an equal score loses the tie: its id is
    higher). One max-reduction pass finds the rows that have any such entry (few, once the first chunks are in);
    of those, rows with at most K candidates contribute them all, the others their chunk top-K.
    Shapes: ``scores`` (B, C).
    """
    cut = torch.from_numpy(best.scores[:, k - 1])  # (B,) -inf while a row has fewer than K results
    active_t = torch.nonzero(scores.amax(dim=1) > cut, as_tuple=True)[0]
    if active_t.numel() == 0:
        return best
    active = active_t.numpy()
    sub = scores[active_t]  # (A, C)
    above = sub > cut[active_t, None]  # (A, C)
    counts = above.sum(dim=1).numpy()
    width = int(min(counts.max(), k))
    items = np.full((active.shape[0], width), NO_ITEM, np.int64)
    values = np.full((active.shape[0], width), -np.inf, np.float32)
    heavy = np.flatnonzero(counts > k)
    if heavy.size:
        top = chunk_topk(sub[torch.from_numpy(heavy)], k, offset)
        items[heavy], values[heavy] = top.items, top.scores
        above[torch.from_numpy(heavy)] = False
    rows_t, cols_t = torch.nonzero(above, as_tuple=True)
    if rows_t.numel():
        rows, cols = rows_t.numpy(), cols_t.numpy()
        light = np.where(counts > k, 0, counts)
        start = np.cumsum(light) - light  # nonzero() lists entries row by row
        position = np.arange(rows.shape[0]) - start[rows]
        items[rows, position] = cols + offset
        values[rows, position] = sub[rows_t, cols_t].numpy()
    merged = merge(TopK(best.items[active], best.scores[active]), TopK(items, values), k)
    out_items, out_scores = best.items.copy(), best.scores.copy()
    out_items[active], out_scores[active] = merged.items, merged.scores
    return TopK(out_items, out_scores)


def item_queries(item_matrix: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Query vectors of item→item recommendation and the exclusion of each query item itself.

    Shapes: ``items`` (B,) -> (B, D) vectors and the (rows, items) exclusion pairs.
    """
    items = np.asarray(items, dtype=np.int64)
    return np.asarray(item_matrix[items], dtype=np.float32), (np.arange(items.shape[0], dtype=np.int64), items)


def user_queries(item_matrix: np.ndarray, history: Histories, *, user_mode: UserMode = "last", recent: int = 10
                 ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Query vectors of user→item recommendation for every user of ``history``, and their seen items.

    A user's query is the vector of their latest history item (``"last"``, the default, as in the evaluation),
    or the sum / mean of the vectors of their latest ``recent`` items. Every item in the history (not only the
    recent ones) is excluded. A user without history gets the zero vector; callers skip such users.
    Shapes: ``history`` of B users -> (B, D) vectors, (rows, items) exclusion pairs.
    """
    if user_mode not in ("last", "recent_sum", "recent_mean"):
        raise ValueError(f"user_mode={user_mode!r}: pass 'last', 'recent_sum' or 'recent_mean'")
    if recent < 1:
        raise ValueError(f"recent={recent}: pass 1 or more history items")
    n_users, dim = history.n_users, item_matrix.shape[1]
    users = np.arange(n_users, dtype=np.int64)
    row, item = history.rows(users, recent=1 if user_mode == "last" else recent)
    vectors = np.zeros((n_users, dim), dtype=np.float32)
    np.add.at(vectors, row, np.asarray(item_matrix[item], dtype=np.float32))
    if user_mode == "recent_mean":
        vectors /= np.maximum(np.bincount(row, minlength=n_users), 1)[:, None].astype(np.float32)
    return vectors, history.rows(users)
