"""Evaluation protocols: every scorer (baselines and GNN embeddings) ranked against all items by the same code.

(A) ours, temporal hold-out (the split's valid/test rows):
    * item→item: :func:`gnn.pairs.holdout_pairs` gives (query, positive) pairs; the positive is ranked among
      all items except the query (optionally also the user's context items) -> hit@K, MRR.
    * user→item: each user with held-out rows is scored from the training history; the user's training items
      are excluded; relevant = the held-out items not seen in training (users left with none are excluded
      and counted) -> precision/recall/F1/hit/NDCG/MRR@K.
(B) DGL's PinSAGE-example protocol (:func:`leave_last_out`, :func:`evaluate_leave_last_out`): per user, the
    last item is the test item and the second-last the validation item; the query is the user's latest
    training item; HR@10 over all items with the user's training items excluded (a target the user already
    saw in training is therefore a miss, as in DGL), averaged over users that have the target.

Ties count at their expected value under random tie-breaking (:mod:`gnn.metrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gnn.baselines import Histories, Scorer
from gnn.metrics import DEFAULT_KS, MetricAccumulator, multi_target_metrics, rank_counts, single_target_metrics
from gnn.pairs import EvalPairs

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 1024
_BLOCK_SCORES = 1 << 26  # at most 64M scores (256 MB float32) per block, whatever block_size says


def _block(block_size: int, n_items: int) -> int:
    """Rows per block: ``block_size``, fewer when a block would exceed the score budget."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: pass 1 or more")
    return max(1, min(block_size, _BLOCK_SCORES // max(n_items, 1)))


def _scores(block: np.ndarray, n_items: int, who: str) -> np.ndarray:
    s = np.asarray(block)
    if s.ndim != 2 or s.shape[1] != n_items:
        raise ValueError(f"scorer {who} returned a block of shape {s.shape}: expected (B, {n_items})")
    if s.dtype != np.float32 or not s.flags.writeable or not s.flags.c_contiguous:
        s = np.ascontiguousarray(s, dtype=np.float32).copy()
    return s


def evaluate_item_to_item(scorer: Scorer, pairs: EvalPairs, *, ks: Sequence[int] = DEFAULT_KS,
                          exclude_seen: Histories | None = None, block_size: int = DEFAULT_BLOCK
                          ) -> dict[str, Any]:
    """Rank each pair's positive among all items for its query.

    Args:
        scorer: the model or baseline.
        pairs: held-out pairs (query, positive, user).
        ks: hit@K cut-offs (default (10, 50, 100)).
        exclude_seen: when given, each user's items in these histories are excluded as candidates, and pairs
            whose positive is among them are dropped (counted in ``n_excluded``).
        block_size: queries scored at once (default 1024).

    Returns ``{"hit@K": .., "mrr": .., "mean_rank": .., "n_evaluated": .., "n_excluded": .., "seconds": ..}``.
    """
    started = time.perf_counter()
    acc = MetricAccumulator()
    n = scorer.n_items
    keep = np.ones(len(pairs), bool)
    if exclude_seen is not None:
        row, item = exclude_seen.rows(pairs.user)
        seen_pos = np.zeros(len(pairs), bool)
        seen_pos[row[item == pairs.positive[row]]] = True
        keep &= ~seen_pos
    acc.n_excluded = int((~keep).sum())
    user, query, positive = pairs.user[keep], pairs.query[keep], pairs.positive[keep]
    block_size = _block(block_size, n)
    for lo in range(0, query.shape[0], block_size):
        q = query[lo : lo + block_size]
        local = np.arange(q.shape[0])
        s = _scores(scorer.score_items(q), n, scorer.name)
        s[local, q] = -np.inf
        if exclude_seen is not None:
            r, i = exclude_seen.rows(user[lo : lo + block_size])
            s[r, i] = -np.inf
        higher, group = rank_counts(s, local, positive[lo : lo + block_size])
        per = single_target_metrics(higher, group, ks=ks)
        acc.add({k: v for k, v in per.items() if k.startswith("hit@")} | {"mrr": per["rr"], "mean_rank": per["rank"]})
    out: dict[str, Any] = dict(acc.means())
    out.update(n_evaluated=acc.n_evaluated, n_excluded=acc.n_excluded,
               seconds=round(time.perf_counter() - started, 3))
    return out


def _top_rank_counts(scores: np.ndarray, owner: np.ndarray, items: np.ndarray, kmax: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rank_counts` for the relevant items that can reach the top ``kmax``; the others get distinct
    placeholder ranks beyond ``kmax`` (every @K metric with K <= kmax is then unchanged).

    An item scoring below the row's ``kmax``-th largest score is beaten by at least ``kmax`` items, so only the
    few items at or above that threshold need a full pass over the row: one ``np.partition`` per block instead
    of one pass per relevant item.
    """
    n_items = scores.shape[1]
    if kmax >= n_items:
        return rank_counts(scores, owner, items)
    threshold = -np.partition(-scores, kmax - 1, axis=1)[:, kmax - 1]  # (B,) kmax-th largest score
    near = scores[owner, items] >= threshold[owner]
    higher = kmax + np.arange(owner.shape[0], dtype=np.int64)  # distinct, so each forms its own group
    group = np.ones(owner.shape[0], dtype=np.int64)
    higher[near], group[near] = rank_counts(scores, owner[near], items[near])
    return higher, group


def relevant_items(history: Histories, holdout: Histories, *, exclude_seen: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's distinct held-out items, minus the ones in ``history`` when ``exclude_seen``.

    Returns ``users`` (U,) with at least one relevant item, and CSR ``indptr`` (U+1,), ``items`` (R,).
    """
    users = np.repeat(np.arange(holdout.n_users, dtype=np.int64), holdout.lengths())
    key = np.unique(users * holdout.n_items + holdout.items)  # distinct (user, item), sorted by user
    if exclude_seen and key.size:
        hu = np.repeat(np.arange(history.n_users, dtype=np.int64), history.lengths())
        seen = np.unique(hu * holdout.n_items + history.items)
        key = key[~np.isin(key, seen, assume_unique=True)]
    u, it = key // holdout.n_items, key % holdout.n_items
    users_out, counts = np.unique(u, return_counts=True)
    indptr = np.zeros(users_out.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return users_out, indptr, it


def evaluate_user_to_item(scorer: Scorer, history: Histories, holdout: Histories, *,
                          ks: Sequence[int] = DEFAULT_KS, exclude_seen: bool = True,
                          block_size: int = DEFAULT_BLOCK, users: np.ndarray | None = None) -> dict[str, Any]:
    """Top-K recommendation from each user's training history against the user's held-out items.

    Args:
        scorer: the model or baseline.
        history: each user's training items (their scores are set to -inf when ``exclude_seen``).
        holdout: each user's held-out items (same user and item id spaces).
        ks: cut-offs (default (10, 50, 100)).
        exclude_seen: recommend only unseen items; relevant = held-out items not in training (default True).
        block_size: users scored at once (default 1024).
        users: evaluate only these users (e.g. a seeded sample); default all with held-out rows.

    Returns the averaged metrics plus ``n_evaluated`` (users averaged) and ``n_excluded`` (users with held-out
    rows but no relevant item left).
    """
    started = time.perf_counter()
    if history.n_items != holdout.n_items or history.n_users != holdout.n_users:
        raise ValueError("history and holdout must share the user and item id spaces (n_users, n_items)")
    cand = np.flatnonzero(holdout.lengths() > 0) if users is None else np.asarray(users, dtype=np.int64)
    rel_users, indptr, rel_items = relevant_items(history, holdout, exclude_seen=exclude_seen)
    pos = np.searchsorted(rel_users, cand)
    found = (pos < rel_users.shape[0]) & (rel_users[np.minimum(pos, max(rel_users.shape[0] - 1, 0))] == cand) \
        if rel_users.size else np.zeros(cand.shape[0], bool)
    acc = MetricAccumulator(n_excluded=int((~found).sum()))
    cand, pos = cand[found], pos[found]
    n = scorer.n_items
    block_size = _block(block_size, n)
    for lo in range(0, cand.shape[0], block_size):
        u, p = cand[lo : lo + block_size], pos[lo : lo + block_size]
        s = _scores(scorer.score_users(history, u), n, scorer.name)
        if exclude_seen:
            r, i = history.rows(u)
            s[r, i] = -np.inf
        counts = indptr[p + 1] - indptr[p]
        owner = np.repeat(np.arange(u.shape[0]), counts)
        offs = np.arange(owner.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
        items = rel_items[np.repeat(indptr[p], counts) + offs]
        higher, group = _top_rank_counts(s, owner, items, max(ks))
        acc.add(multi_target_metrics(owner, higher, group, counts, ks=ks))
    out: dict[str, Any] = dict(acc.means())
    out.update(n_evaluated=acc.n_evaluated, n_excluded=acc.n_excluded,
               seconds=round(time.perf_counter() - started, 3))
    return out


@dataclass(frozen=True)
class LeaveLastOut:
    """DGL's split: per user, ``test`` = last item, ``valid`` = second-last (-1 where the user is too short).

    ``train`` holds every earlier item. Shapes: ``valid``, ``test`` (n_users,) int64.
    """

    train: Histories
    valid: np.ndarray
    test: np.ndarray


def leave_last_out(users: np.ndarray, items: np.ndarray, *, n_users: int, n_items: int,
                   order: Sequence[np.ndarray] = ()) -> LeaveLastOut:
    """Split each user's sequence as DGL's PinSAGE example does (``train_test_split_by_time``): with more
    than one row the last is the test item, with more than two the second-last is the validation item.

    ``order``: lexsort keys (least significant first) fixing the time order, e.g. ``(line, ts)``; default the
    input order.
    """
    full = Histories.from_arrays(users, items, n_users=n_users, n_items=n_items, order=order)
    length = full.lengths()
    end = full.indptr[1:]
    test = np.where(length > 1, full.items[np.maximum(end - 1, 0)] if full.items.size else -1, -1)
    valid = np.where(length > 2, full.items[np.maximum(end - 2, 0)] if full.items.size else -1, -1)
    n_train = length - (length > 1) - (length > 2)
    owner = np.repeat(np.arange(n_users), length)
    within = np.arange(full.items.shape[0]) - full.indptr[owner]  # position inside the user's sequence
    train_items = full.items[within < n_train[owner]]
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(n_train, out=indptr[1:])
    return LeaveLastOut(Histories(indptr, train_items, int(n_items)), valid.astype(np.int64), test.astype(np.int64))


def evaluate_leave_last_out(scorer: Scorer, split: LeaveLastOut, *, target: str = "test", ks: Sequence[int] = (10,),
                            block_size: int = DEFAULT_BLOCK, users: np.ndarray | None = None) -> dict[str, Any]:
    """Protocol (B): hit@K of the user's ``target`` ("test" or "valid") item, query = latest training item,
    candidates = all items minus the user's training items. Users without the target or without training
    items are excluded and counted. ``users``: evaluate only these (e.g. a seeded sample; default all)."""
    if target not in ("test", "valid"):
        raise ValueError(f"target={target!r}: pass 'test' or 'valid'")
    goal = split.test if target == "test" else split.valid
    cand = np.arange(goal.shape[0]) if users is None else np.asarray(users, dtype=np.int64)
    users = cand[(goal[cand] >= 0) & (split.train.lengths(cand) > 0)]
    last = split.train.last_items(users)
    pairs = EvalPairs(users, last, goal[users], np.zeros(users.shape[0], bool))
    started = time.perf_counter()
    acc = MetricAccumulator(n_excluded=int(cand.shape[0] - users.shape[0]))
    n = scorer.n_items
    block_size = _block(block_size, n)
    for lo in range(0, len(pairs), block_size):
        u, q = pairs.user[lo : lo + block_size], pairs.query[lo : lo + block_size]
        s = _scores(scorer.score_items(q), n, scorer.name)
        r, i = split.train.rows(u)
        s[r, i] = -np.inf  # includes the query itself
        higher, group = rank_counts(s, np.arange(q.shape[0]), pairs.positive[lo : lo + block_size])
        per = single_target_metrics(higher, group, ks=ks)
        acc.add({k: v for k, v in per.items() if k.startswith("hit@")} | {"mrr": per["rr"]})
    out: dict[str, Any] = dict(acc.means())
    out.update(n_evaluated=acc.n_evaluated, n_excluded=acc.n_excluded,
               seconds=round(time.perf_counter() - started, 3))
    return out


ScorerFactory = Callable[[Histories], Scorer]


def baseline_factories(*, seed: int = 0, cooc_normalize: str = "count", cooc_window: int | None = None,
                       popularity_tiebreak: bool = True, user_mode: str = "last", recent: int = 10
                       ) -> dict[str, ScorerFactory]:
    """The standard baselines as ``name -> (training histories -> scorer)``."""
    from gnn.baselines import PopularityScorer, RandomScorer, cooccurrence, item_cf

    um: Any = user_mode
    norm: Any = cooc_normalize
    return {
        "random": lambda h: RandomScorer(h.n_items, seed=seed),
        "popularity": PopularityScorer.from_histories,
        "itemcf": lambda h: item_cf(h, popularity_tiebreak=popularity_tiebreak, user_mode=um, recent=recent),
        "cooccurrence": lambda h: cooccurrence(h, normalize=norm, window=cooc_window,
                                               popularity_tiebreak=popularity_tiebreak, user_mode=um, recent=recent),
    }
