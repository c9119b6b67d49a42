"""Scorers: one interface for the baselines and for GNN embeddings, so every model is ranked by the same code.

A scorer turns queries into dense score blocks over all items (higher = better). Baselines: random (seeded),
popularity (training interaction counts), item-CF (previous → next transition counts), item co-occurrence
(users holding both items, raw counts or cosine-normalised) and :class:`EmbeddingScorer` (dot products of
item embeddings, e.g. the PinSage output). Build the count baselines from :class:`Histories` (each user's
training items in time order).

Choices, measured with DGL's protocol (B) on the Amazon video-games sample, HR@10 of the validation item
(``benchmarks/bench_baselines.py``; ANCHORS.md calibration in brackets): popularity 0.0194 [0.019]; item-CF
0.0868 [0.086] with the popularity tie-break, 0.0778 without; co-occurrence raw counts 0.0882 [0.088], cosine
0.0416, counts within 3 positions 0.0941. So item-CF and co-occurrence default to raw counts plus the
popularity tie-break. User scores default to the latest item (``user_mode="last"``, DGL's convention): on
the Amazon leave-last-out test it gives the best NDCG@10 (co-occurrence 0.046 vs 0.043 for the sum over the
latest 3 items), while ``recent_sum`` with 3 items has the better recall@100 (0.250 vs 0.222).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch

log = logging.getLogger(__name__)

UserMode = Literal["last", "recent_sum", "recent_mean"]


@dataclass(frozen=True)
class Histories:
    """Each user's training items in time order, as CSR rows.

    Shapes: ``indptr`` (U+1,) int64; ``items`` (E,) int64. ``n_items`` bounds the item ids.
    """

    indptr: np.ndarray
    items: np.ndarray
    n_items: int

    @property
    def n_users(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @classmethod
    def from_arrays(cls, users: np.ndarray, items: np.ndarray, *, n_users: int, n_items: int,
                    order: Sequence[np.ndarray] = ()) -> Histories:
        """Group ``items`` by ``users``; within a user keep the order given by the ``order`` keys (lexsort keys,
        least significant first, e.g. ``(line, ts)``) or the input order when none."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if users.shape != items.shape:
            raise ValueError(f"users {users.shape} and items {items.shape} must have the same length")
        if users.size and (users.min() < 0 or users.max() >= n_users):
            raise ValueError(f"user ids must lie in [0, n_users={n_users})")
        if items.size and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(f"item ids must lie in [0, n_items={n_items})")
        keys = [np.arange(users.shape[0]), *(np.asarray(k) for k in order), users]
        perm = np.lexsort(keys)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
        return cls(indptr, items[perm], int(n_items))

    @classmethod
    def from_interactions(cls, table: Any, *, n_users: int, n_items: int) -> Histories:
        """From an interactions table (user, item, ts, line; pipeline/schema.py), ordered by (ts, line)."""
        return cls.from_arrays(np.asarray(table["user"]), np.asarray(table["item"]), n_users=n_users,
                               n_items=n_items, order=(np.asarray(table["line"]), np.asarray(table["ts"])))

    def lengths(self, users: np.ndarray | None = None) -> np.ndarray:
        d = np.diff(self.indptr)
        return d if users is None else d[users]

    def last_items(self, users: np.ndarray) -> np.ndarray:
        """(B,) each user's latest item, -1 for a user without history."""
        users = np.asarray(users, dtype=np.int64)
        end = self.indptr[users + 1]
        has = end > self.indptr[users]
        return np.where(has, self.items[np.maximum(end - 1, 0)] if self.items.size else -1, -1)

    def rows(self, users: np.ndarray, *, recent: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(block row, item) of every history entry of ``users`` (the latest ``recent`` only, if given).

        Shapes: ``users`` (B,) -> two (R,) int64 arrays; rows index into ``users``.
        """
        users = np.asarray(users, dtype=np.int64)
        start, end = self.indptr[users], self.indptr[users + 1]
        if recent is not None:
            start = np.maximum(start, end - recent)
        counts = end - start
        row = np.repeat(np.arange(users.shape[0], dtype=np.int64), counts)
        offsets = np.arange(row.shape[0], dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        return row, self.items[np.repeat(start, counts) + offsets]

    def item_counts(self) -> np.ndarray:
        """(n_items,) int64 training interactions per item."""
        return np.bincount(self.items, minlength=self.n_items).astype(np.int64)

    def __repr__(self) -> str:
        return f"Histories(n_users={self.n_users}, n_items={self.n_items}, n_entries={self.items.shape[0]})"


@runtime_checkable
class Scorer(Protocol):
    """What the evaluation calls. Both methods return a *new, writable* float32 (B, n_items) block."""

    name: str
    n_items: int

    def score_items(self, queries: np.ndarray) -> np.ndarray:
        """Scores of every item for each query item. Shapes: ``queries`` (B,) int -> (B, n_items)."""
        ...

    def score_users(self, history: Histories, users: np.ndarray) -> np.ndarray:
        """Scores of every item for each user from the user's history. Shapes: (B,) -> (B, n_items)."""
        ...


class ItemScorer:
    """Base: a user's scores are the sum (or mean) of the item scores of the latest ``recent`` history items
    (``user_mode="last"``: only the latest item, the DGL PinSAGE convention). Users without history get 0."""

    name = "item"

    def __init__(self, n_items: int, *, user_mode: UserMode = "last", recent: int = 10) -> None:
        if user_mode not in ("last", "recent_sum", "recent_mean"):
            raise ValueError(f"user_mode={user_mode!r}: pass 'last', 'recent_sum' or 'recent_mean'")
        if recent < 1:
            raise ValueError(f"recent={recent}: pass 1 or more history items")
        self.n_items = int(n_items)
        self.user_mode = user_mode
        self.recent = 1 if user_mode == "last" else int(recent)

    def score_items(self, queries: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_users(self, history: Histories, users: np.ndarray) -> np.ndarray:
        row, item = history.rows(users, recent=self.recent)
        out = np.zeros((len(users), self.n_items), dtype=np.float32)
        if row.size == 0:
            return out
        per_item = self.score_items(item)  # (R, N)
        np.add.at(out, row, per_item)
        if self.user_mode == "recent_mean":
            out /= np.maximum(np.bincount(row, minlength=len(users)), 1)[:, None].astype(np.float32)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_items={self.n_items}, user_mode={self.user_mode!r})"


class RandomScorer(ItemScorer):
    """Uniform random scores from a seeded generator (deterministic for a given call sequence)."""

    name = "random"

    def __init__(self, n_items: int, *, seed: int = 0) -> None:
        super().__init__(n_items)
        self.rng = np.random.default_rng(seed)

    def score_items(self, queries: np.ndarray) -> np.ndarray:
        return self.rng.random((len(queries), self.n_items), dtype=np.float32)

    def score_users(self, history: Histories, users: np.ndarray) -> np.ndarray:
        return self.score_items(np.asarray(users))


class PopularityScorer(ItemScorer):
    """Every query gets the items' training interaction counts. Shapes: ``counts`` (n_items,)."""

    name = "popularity"

    def __init__(self, counts: np.ndarray) -> None:
        super().__init__(int(np.asarray(counts).shape[0]))
        self.counts = np.asarray(counts, dtype=np.float32)

    @classmethod
    def from_histories(cls, history: Histories) -> PopularityScorer:
        return cls(history.item_counts())

    def score_items(self, queries: np.ndarray) -> np.ndarray:
        return np.tile(self.counts, (len(queries), 1))

    def score_users(self, history: Histories, users: np.ndarray) -> np.ndarray:
        return self.score_items(np.asarray(users))


class SparseItemScorer(ItemScorer):
    """Scores = rows of a sparse item×item matrix, optionally plus a popularity tie-break below 1 count.

    ``popularity_tiebreak``: add ``0.5 * count / (max count + 1)`` (< 0.5) to every score, so equal counts
    (above all the zeros of a sparse row) are ordered by popularity instead of tying. Shapes: ``matrix``
    (n_items, n_items) scipy CSR.
    """

    def __init__(self, matrix: sp.csr_matrix, *, name: str, popularity: np.ndarray | None = None,
                 user_mode: UserMode = "last", recent: int = 10) -> None:
        super().__init__(matrix.shape[0], user_mode=user_mode, recent=recent)
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix has shape {matrix.shape}: pass a square item×item matrix")
        self.matrix = sp.csr_matrix(matrix, dtype=np.float32)
        self.name = name
        self.bonus = None
        if popularity is not None:
            pop = np.asarray(popularity, dtype=np.float64)
            self.bonus = (0.5 * pop / (pop.max(initial=0.0) + 1.0)).astype(np.float32)

    def score_items(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.int64)
        out = self.matrix[queries].toarray()
        if self.bonus is not None:
            out += self.bonus
        return out

    def score_users(self, history: Histories, users: np.ndarray) -> np.ndarray:
        row, item = history.rows(users, recent=self.recent)
        select = sp.csr_matrix((np.ones(row.shape[0], np.float32), (row, item)), shape=(len(users), self.n_items))
        if self.user_mode == "recent_mean":
            select = sp.diags(1.0 / np.maximum(np.bincount(row, minlength=len(users)), 1)) @ select
        out = np.asarray((select @ self.matrix).toarray(), dtype=np.float32)
        if self.bonus is not None:
            out += self.bonus
        return out


def _consecutive(history: Histories, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """(previous, next) items at distance 1..max_lag in each user's sequence, self-pairs dropped."""
    owner = np.repeat(np.arange(history.n_users), history.lengths())
    prev, nxt = [], []
    for lag in range(1, max_lag + 1):
        ok = owner[:-lag] == owner[lag:] if owner.size > lag else np.zeros(0, bool)
        a, b = history.items[:-lag][ok], history.items[lag:][ok]
        keep = a != b
        prev.append(a[keep])
        nxt.append(b[keep])
    return np.concatenate(prev), np.concatenate(nxt)


def item_cf(history: Histories, *, popularity_tiebreak: bool = True, user_mode: UserMode = "last",
            recent: int = 10) -> SparseItemScorer:
    """Item-CF: score of ``j`` for query ``q`` = times ``j`` directly followed ``q`` in a training sequence.

    ``popularity_tiebreak`` (default True) orders equal counts, and the many zeros, by training popularity.
    """
    a, b = _consecutive(history, 1)
    n = history.n_items
    m = sp.csr_matrix((np.ones(a.shape[0], np.float32), (a, b)), shape=(n, n))
    m.sum_duplicates()
    return SparseItemScorer(m, name="itemcf", popularity=history.item_counts() if popularity_tiebreak else None,
                            user_mode=user_mode, recent=recent)


def cooccurrence(history: Histories, *, normalize: Literal["count", "cosine"] = "count", window: int | None = None,
                 popularity_tiebreak: bool = True, user_mode: UserMode = "last", recent: int = 10
                 ) -> SparseItemScorer:
    """Item co-occurrence: number of users whose training history holds both items (``window=None``), or
    number of times they occur within ``window`` positions of each other in a sequence (both directions).

    ``normalize="cosine"`` divides by ``sqrt(deg_i * deg_j)`` (deg = users holding the item, or the row sums
    in the window variant). The diagonal is zero. Defaults (raw counts, popularity tie-break) scored best of
    the variants on the Amazon sample (module docstring).
    """
    if normalize not in ("count", "cosine"):
        raise ValueError(f"normalize={normalize!r}: pass 'count' or 'cosine'")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: pass a number of positions >= 1, or None for whole histories")
    n = history.n_items
    if window is None:
        owner = np.repeat(np.arange(history.n_users), history.lengths())
        x = sp.csr_matrix((np.ones(owner.shape[0], np.float32), (owner, history.items)),
                          shape=(history.n_users, n))
        x.data[:] = 1.0  # binary: a user counts once per item pair
        x.sum_duplicates()
        x.data[:] = 1.0
        m = (x.T @ x).tocsr()
        deg = np.asarray(x.sum(0)).ravel()
    else:
        a, b = _consecutive(history, window)
        m = sp.csr_matrix((np.ones(2 * a.shape[0], np.float32), (np.r_[a, b], np.r_[b, a])), shape=(n, n))
        m.sum_duplicates()
        deg = np.asarray(m.sum(1)).ravel()
    m.setdiag(0)
    m.eliminate_zeros()
    if normalize == "cosine":
        inv = 1.0 / np.sqrt(np.maximum(deg, 1.0))
        m = (sp.diags(inv) @ m @ sp.diags(inv)).tocsr()
    name = "cooccurrence" if window is None else f"cooccurrence_w{window}"
    return SparseItemScorer(m.astype(np.float32), name=name if normalize == "count" else f"{name}_cosine",
                            popularity=history.item_counts() if popularity_tiebreak else None,
                            user_mode=user_mode, recent=recent)


class EmbeddingScorer(ItemScorer):
    """Dot products of item embeddings (e.g. PinSage's ``embed_items`` output); with ``query_embeddings`` the
    query item / user side uses those (``gnn.trainer.query_side`` of the embeddings) against the item embeddings.

    A user is represented by the embedding of the latest history item (``user_mode="last"``, default, the DGL
    protocol), or the sum / mean of the latest ``recent`` items' embeddings. Shapes: ``item_embeddings``
    (n_items, D) float.
    """

    def __init__(self, item_embeddings: np.ndarray, *, name: str = "gnn", user_mode: UserMode = "last",
                 recent: int = 10, query_embeddings: np.ndarray | None = None) -> None:
        emb = np.asarray(item_embeddings)
        if emb.ndim != 2:
            raise ValueError(f"item_embeddings has shape {emb.shape}: pass an (n_items, D) matrix")
        if not np.all(np.isfinite(emb)):
            raise ValueError("item_embeddings contain NaN or inf: check the training run that wrote them")
        super().__init__(emb.shape[0], user_mode=user_mode, recent=recent)
        self.name = name
        self.emb = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        # The query side (a model's query head applied to the item embeddings), default the embeddings themselves.
        self.query_emb = self.emb
        if query_embeddings is not None:
            q = np.asarray(query_embeddings)
            if q.shape[1:] != emb.shape[1:] or q.shape[0] < emb.shape[0] or not np.all(np.isfinite(q)):
                raise ValueError(f"query_embeddings has shape {q.shape}: pass finite ({emb.shape[0]}, "
                                 f"{emb.shape[1]}) query vectors, one per item")
            self.query_emb = torch.from_numpy(np.ascontiguousarray(q[: emb.shape[0]], dtype=np.float32))

    def score_items(self, queries: np.ndarray) -> np.ndarray:
        q = self.query_emb[torch.from_numpy(np.asarray(queries, dtype=np.int64))]  # (B, D)
        return (q @ self.emb.T).numpy()  # (B, N)

    def score_users(self, history: Histories, users: np.ndarray) -> np.ndarray:
        row, item = history.rows(users, recent=self.recent)
        user_vec = torch.zeros(len(users), self.emb.shape[1])
        user_vec.index_add_(0, torch.from_numpy(row), self.query_emb[torch.from_numpy(item)])
        if self.user_mode == "recent_mean":
            user_vec /= torch.from_numpy(np.maximum(np.bincount(row, minlength=len(users)), 1))[:, None]
        return (user_vec @ self.emb.T).numpy()
