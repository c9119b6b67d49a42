"""Ranking metrics for recommendations, exact under ties: hit@K, MRR, precision/recall/F1@K, NDCG@K.

Every item is ranked against *all* items (not a sampled pool); items a protocol excludes (the query
itself, a user's training items) carry the score ``-inf``. Metrics are computed blockwise over queries or
users from dense score blocks ``(B, n_items)``, so 30k users x 24k items take a few seconds.

Tie convention (deterministic, not gameable by constant scores): **expected value under uniformly random
tie-breaking**. A relevant item whose score is beaten by ``h`` items and shared by ``n - 1`` others holds
each position ``h+1 .. h+n`` with probability ``1/n``. So

* a single true item (item→item): ``hit@K = clip((K - h) / n, 0, 1)``, ``RR = (H(h+n) - H(h)) / n``
  (``H`` = harmonic numbers); a constant scorer gets exactly the random-guess value, never 0 or 1;
* several relevant items (user→item): precision, recall and NDCG are sums over relevant items, so their
  expectations are exact by linearity (``E[DCG] = sum_i (D(min(K, h_i+n_i)) - D(min(K, h_i))) / n_i`` with
  ``D(m) = sum_{p<=m} 1/log2(p+1)``); hit@K and MRR@K depend on the first relevant position only, which lies
  in the best-scored relevant tie group (``h``, size ``n``, holding ``r`` relevant items):
  ``P(first = h + x) = C(n-x, r-1) / C(n, r)``; F1@K is the harmonic mean of the expected precision and
  recall (exact when there are no ties at the cut-off).

Users or queries without relevant items are excluded from the averages and counted (``n_excluded``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import digamma, gammaln

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (10, 50, 100)
_CHUNK_ELEMENTS = 1 << 24  # scores compared at once when counting (bounds temporary memory to ~64 MB)


def _harmonic(n: np.ndarray) -> np.ndarray:
    """H(n) = sum_{k=1..n} 1/k for integer arrays n >= 0 (float64; exact to ~1e-12)."""
    return digamma(np.asarray(n, dtype=np.float64) + 1.0) + np.euler_gamma


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in ks)
    if not out or any(k < 1 for k in out):
        raise ValueError(f"ks={ks!r}: pass positive cut-offs such as (10, 50, 100)")
    return out


def rank_counts(scores: np.ndarray, rows: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (row, item) pair: how many items of that row score strictly higher, and the tie-group size.

    Shapes: ``scores`` (B, N) float; ``rows``, ``items`` (R,) int. Returns ``higher`` (R,) int64 and
    ``group`` (R,) int64 = number of items with exactly the item's score (itself included, so >= 1).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores has shape {scores.shape}: pass a (B, n_items) block")
    rows = np.asarray(rows, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if rows.shape != items.shape:
        raise ValueError(f"rows {rows.shape} and items {items.shape} must have the same length")
    n_pairs, n_items = rows.shape[0], scores.shape[1]
    if n_pairs and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"items must lie in [0, {n_items}): a target item id is out of range")
    target = scores[rows, items]  # (R,)
    if scores.size and np.isnan(scores.max()):  # max propagates NaN; one cheap pass
        raise ValueError("scores contain NaN: a scorer must return finite scores or -inf for excluded items")
    higher = np.empty(n_pairs, dtype=np.int64)
    group = np.empty(n_pairs, dtype=np.int64)
    identity = n_pairs == scores.shape[0] and np.array_equal(rows, np.arange(n_pairs))
    step = max(1, _CHUNK_ELEMENTS // max(n_items, 1))
    for lo in range(0, n_pairs, step):
        sel = slice(lo, lo + step)
        block = scores[sel] if identity else scores[rows[sel]]  # (C, N); a view when rows are 0..B-1
        t = target[sel, None]
        higher[sel] = np.count_nonzero(block > t, axis=1)
        group[sel] = np.count_nonzero(block == t, axis=1)
    # -inf == -inf is True, so an excluded true item ties with every other excluded item: ranked last.
    return higher, group


def single_target_metrics(higher: np.ndarray, group: np.ndarray, *, ks: Sequence[int] = DEFAULT_KS
                          ) -> dict[str, np.ndarray]:
    """Per-query hit@K and reciprocal rank of one true item (expected value under random tie-breaking).

    Shapes: ``higher``, ``group`` (Q,) from :func:`rank_counts`. Returns ``{"hit@K": (Q,), "rr": (Q,),
    "rank": (Q,)}`` where ``rank`` is the expected rank ``h + (n + 1) / 2``.
    """
    h = np.asarray(higher, dtype=np.float64)
    n = np.asarray(group, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for k in _check_ks(ks):
        out[f"hit@{k}"] = np.clip((k - h) / n, 0.0, 1.0)
    out["rr"] = (_harmonic(h + n) - _harmonic(h)) / n
    out["rank"] = h + (n + 1.0) / 2.0
    return out


def _discount_cumsum(m: int) -> np.ndarray:
    """D[j] = sum_{p=1..j} 1/log2(p+1) for j = 0..m (float64, D[0] = 0)."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, m + 2, dtype=np.float64)))])


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log C(n, k) elementwise; -inf where k < 0 or k > n."""
    n = np.asarray(n, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    ok = (k >= 0) & (k <= n)
    with np.errstate(invalid="ignore"):
        val = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    return np.where(ok, val, -np.inf)


def multi_target_metrics(owner: np.ndarray, higher: np.ndarray, group: np.ndarray, n_relevant: np.ndarray, *,
                         ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-user precision/recall/F1/hit/NDCG/MRR@K from the rank counts of each user's relevant items.

    Shapes: ``owner`` (R,) int, the user (0..U-1, local to the block) of each relevant pair, sorted or not;
    ``higher``, ``group`` (R,) from :func:`rank_counts`; ``n_relevant`` (U,) relevant items per user (> 0).
    Returns a dict of (U,) float64 arrays keyed ``precision@K``, ``recall@K``, ``f1@K``, ``hit@K``,
    ``ndcg@K``, ``mrr@K``.
    """
    ks = _check_ks(ks)
    owner = np.asarray(owner, dtype=np.int64)
    h = np.asarray(higher, dtype=np.int64)
    n = np.asarray(group, dtype=np.int64)
    n_rel = np.asarray(n_relevant, dtype=np.int64)
    n_users = int(n_rel.shape[0])
    if np.any(n_rel <= 0):
        raise ValueError("n_relevant must be > 0 for every user: drop users without relevant items first")
    if np.any(np.bincount(owner, minlength=n_users)[:n_users] != n_rel):
        raise ValueError("owner does not hold n_relevant pairs per user: pass one pair per relevant item")
    kmax = max(ks)
    disc = _discount_cumsum(kmax)
    # best (first) relevant tie group per user: smallest `higher`; r = relevant items sharing it.
    best_h = np.full(n_users, np.iinfo(np.int64).max)
    np.minimum.at(best_h, owner, h)
    in_best = h == best_h[owner]
    best_n = np.zeros(n_users, dtype=np.int64)
    np.maximum.at(best_n, owner[in_best], n[in_best])
    best_r = np.bincount(owner[in_best], minlength=n_users).astype(np.int64)
    # P(first relevant at position best_h + x), x = 1..kmax: C(n-x, r-1) / C(n, r)
    x = np.arange(1, kmax + 1, dtype=np.int64)[None, :]  # (1, kmax)
    log_p = _log_comb(best_n[:, None] - x, best_r[:, None] - 1) - _log_comb(best_n, best_r)[:, None]
    p_first = np.exp(log_p)  # (U, kmax)
    pos = best_h[:, None] + x  # (U, kmax) absolute positions
    out: dict[str, np.ndarray] = {}
    hf = h.astype(np.float64)
    nf = n.astype(np.float64)
    for k in ks:
        within = pos <= k
        out[f"hit@{k}"] = np.minimum((p_first * within).sum(1), 1.0)
        out[f"mrr@{k}"] = (p_first * within / pos).sum(1)
        hits = np.bincount(owner, weights=np.clip((k - hf) / nf, 0.0, 1.0), minlength=n_users)
        dcg_pairs = (disc[np.minimum(k, h + n)] - disc[np.minimum(k, h)]) / nf
        dcg = np.bincount(owner, weights=dcg_pairs, minlength=n_users)
        precision = hits / k
        recall = hits / n_rel
        out[f"precision@{k}"] = precision
        out[f"recall@{k}"] = recall
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"f1@{k}"] = np.where(hits > 0, 2 * precision * recall / (precision + recall), 0.0)
        out[f"ndcg@{k}"] = dcg / disc[np.minimum(n_rel, k)]
    return out


@dataclass
class MetricAccumulator:
    """Running sums of per-query/per-user metrics over blocks; ``means()`` gives the averages.

    ``n_evaluated`` counts the rows averaged; ``n_excluded`` those skipped for want of relevant items.
    """

    sums: dict[str, float] = field(default_factory=dict)
    n_evaluated: int = 0
    n_excluded: int = 0

    def add(self, per_row: dict[str, np.ndarray]) -> None:
        sizes = {int(v.shape[0]) for v in per_row.values()}
        if len(sizes) != 1:
            raise ValueError(f"per-row metrics have different lengths {sorted(sizes)}")
        for name, values in per_row.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(np.sum(values, dtype=np.float64))
        self.n_evaluated += sizes.pop()

    def means(self) -> dict[str, float]:
        if self.n_evaluated == 0:
            return {name: float("nan") for name in self.sums}
        return {name: total / self.n_evaluated for name, total in self.sums.items()}

    def __repr__(self) -> str:
        return f"MetricAccumulator(n_evaluated={self.n_evaluated}, n_excluded={self.n_excluded}, " \
               f"metrics={sorted(self.sums)})"


def top_k_items(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` item ids per row, best first; ties broken by the lower item id (deterministic).

    Shapes: ``scores`` (B, N) -> (B, k) int64. For recommendation lists; metrics use :func:`rank_counts`.
    """
    if k < 1 or k > scores.shape[1]:
        raise ValueError(f"k={k}: pass 1 <= k <= n_items ({scores.shape[1]})")
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k].astype(np.int64)
