"""Small hand-written graphs for the model tests, and a stand-in for gnn.walks.Neighborhoods (imported by the
tests as ``tests.gnn.model_graphs``; a module, not a conftest, so that other engineers' fixtures cannot clash)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gnn.graphstore import GraphStore, csr_from_edges


@dataclass(frozen=True)
class StandInNeighborhoods:
    """Same attributes as the walks engineer's ``gnn.walks.Neighborhoods``."""

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    item_importance: np.ndarray
    user_importance: np.ndarray
    hard_negatives: np.ndarray


def neighborhoods_from_lists(rows: list[list[tuple[int, float]]], n_users: int = 0,
                             hard: list[list[int]] | None = None) -> StandInNeighborhoods:
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    indices = np.array([j for r in rows for j, _ in r], np.int64)
    weights = np.array([w for r in rows for _, w in r], np.float32)
    n = len(rows)
    h = np.full((n, 0), -1, np.int64) if hard is None else np.array(hard, np.int64)
    imp = np.bincount(indices, weights=weights, minlength=n).astype(np.float32)
    return StandInNeighborhoods(indptr, indices, weights, imp, np.zeros(n_users, np.float32), h)


def tiny_neighborhoods() -> StandInNeighborhoods:
    # item -> [(neighbour, visit count)], sorted by count descending; item 4 has no neighbours
    return neighborhoods_from_lists([
        [(1, 5.0), (2, 1.0)],
        [(0, 3.0), (3, 2.0), (2, 1.0)],
        [(3, 4.0)],
        [(2, 2.0), (1, 2.0)],
        [],
    ])


def community_store(n_users: int = 60, n_items: int = 40, n_groups: int = 4, per_user: int = 6,
                    seed: int = 0) -> GraphStore:
    """Users interact mostly with items of their own group: a graph a recommender can learn from."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    group = users % n_groups
    own = rng.random(users.shape[0]) < 0.9
    items = np.where(own, group + n_groups * rng.integers(0, n_items // n_groups, users.shape[0]),
                     rng.integers(0, n_items, users.shape[0]))
    times = np.tile(np.arange(per_user), n_users)
    w = np.ones(users.shape[0], np.float32)
    counts = np.zeros((n_items, 4), np.int64)
    np.add.at(counts[:, 0], items, 1)
    return GraphStore(
        n_users=n_users, n_items=n_items, n_categories=n_groups,
        user_items=csr_from_edges(users, items, w, times, n_users),
        item_users=csr_from_edges(items, users, w, times, n_items),
        item_category=np.arange(n_items) % n_groups, item_counts=counts,
    )



def co_count_neighborhoods(store: GraphStore, top: int = 5, n_hard: int = 4) -> StandInNeighborhoods:
    """Stand-in walk neighbourhoods: each item's top co-interaction partners by count (ties by id)."""
    n = store.n_items
    counts = np.zeros((n, n))
    for u in range(store.n_users):
        items = store.user_items.row(u)
        np.add.at(counts, (np.repeat(items, items.shape[0]), np.tile(items, items.shape[0])), 1.0)
    np.fill_diagonal(counts, 0)
    order = np.lexsort((np.tile(np.arange(n), (n, 1)), -counts), axis=1)[:, :top]
    rows = [[(int(j), float(counts[i, j])) for j in order[i] if counts[i, j] > 0] for i in range(n)]
    hard = np.argsort(counts, axis=1, kind="stable")[:, -(top + n_hard):-top]  # ranked just below the top
    return neighborhoods_from_lists(rows, n_users=store.n_users, hard=hard.tolist())


def pairs_of(store: GraphStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, positive, weight): consecutive items of each user."""
    q, p = [], []
    for u in range(store.n_users):
        items = store.user_items.row(u)
        q.extend(items[:-1].tolist())
        p.extend(items[1:].tolist())
    return np.array(q, np.int64), np.array(p, np.int64), np.ones(len(q), np.float32)
