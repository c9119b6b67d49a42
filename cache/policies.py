"""Which remote vertices a static cache holds: the most important ones, or a seeded random subset.

Importance can be global (the walk stage's visit counts, ``Neighborhoods.item_importance``) or specific to the
shard: :func:`count_accesses` over a pre-sampling pass (GNNLab's "pre-sampled visit frequency": run the shard's
own sampler over some minibatches and count how often each remote vertex was asked for). The second predicts a
shard's requests better, because the global counts weigh every shard's neighbourhoods alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def remote_items(owner_of: np.ndarray, local_rank: int) -> np.ndarray:
    """(r,) int64 sorted ids of the items not owned by ``local_rank``."""
    return np.flatnonzero(np.asarray(owner_of) != local_rank).astype(np.int64)


def select_by_importance(candidates: np.ndarray, importance: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates with the highest importance (> 0), ties by smaller id; sorted ids (≤ k,) int64.

    Shapes: ``candidates`` (r,) int64 item ids; ``importance`` (n_items,) indexed by item id.
    """
    cand = np.asarray(candidates, dtype=np.int64)
    imp = np.asarray(importance, dtype=np.float64)[cand]
    keep = imp > 0
    cand, imp = cand[keep], imp[keep]
    if k >= cand.shape[0]:
        return np.sort(cand)
    if k <= 0:
        return np.empty(0, np.int64)
    order = np.lexsort((cand, -imp))  # by importance desc, then id asc: deterministic on ties
    return np.sort(cand[order[:k]])


def select_random(candidates: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """``k`` candidates drawn without replacement with ``numpy.random.default_rng(seed)``; sorted (≤ k,) int64."""
    cand = np.asarray(candidates, dtype=np.int64)
    k = max(0, min(int(k), cand.shape[0]))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(cand, size=k, replace=False)) if k else np.empty(0, np.int64)


def count_accesses(requests: Iterable[np.ndarray], n_items: int, *, distinct_per_request: bool = True
                   ) -> np.ndarray:
    """Pre-sampling: how often each item was requested over a stream of requests (e.g. each minibatch's ids).

    ``distinct_per_request`` (default True) counts an item once per request, as the cache sees it (it asks for a
    row once per minibatch). Returns (n_items,) float64, usable as ``importance``.
    """
    counts = np.zeros(n_items, np.float64)
    for ids in requests:
        ids = np.asarray(ids, dtype=np.int64)
        if distinct_per_request:
            ids = np.unique(ids)
        counts += np.bincount(ids, minlength=n_items)
    return counts
