"""Ranking metrics against hand-computed rankings and against brute-force enumeration of tie orders."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gnn.metrics import (
    MetricAccumulator,
    multi_target_metrics,
    rank_counts,
    single_target_metrics,
    top_k_items,
)


def test_rank_counts_by_hand() -> None:
    scores = np.array([[3, 1, 2, 2], [0, 0, 0, 0], [1, -np.inf, -np.inf, 5]], dtype=np.float32)
    higher, group = rank_counts(scores, np.array([0, 0, 1, 2]), np.array([2, 0, 1, 1]))
    assert higher.tolist() == [1, 0, 0, 2]
    assert group.tolist() == [2, 1, 4, 2]  # an excluded (-inf) target ties with the other excluded item


def test_rank_counts_rejects_nan_and_bad_ids() -> None:
    with pytest.raises(ValueError, match="NaN"):
        rank_counts(np.array([[0.0, np.nan]], dtype=np.float32), np.array([0]), np.array([0]))
    with pytest.raises(ValueError, match="out of range"):
        rank_counts(np.zeros((1, 2), np.float32), np.array([0]), np.array([2]))


def test_single_target_by_hand() -> None:
    # beaten by one item, tied with one other: positions 2 or 3 with probability 1/2 each
    m = single_target_metrics(np.array([1]), np.array([2]), ks=(1, 2, 3))
    assert m["hit@1"][0] == 0.0
    assert m["hit@2"][0] == pytest.approx(0.5)
    assert m["hit@3"][0] == pytest.approx(1.0)
    assert m["rr"][0] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["rank"][0] == pytest.approx(2.5)


def test_constant_scores_get_exactly_the_random_value() -> None:
    n_items = 40
    m = single_target_metrics(np.array([0]), np.array([n_items]), ks=(10,))
    assert m["hit@10"][0] == pytest.approx(10 / n_items)
    assert m["rr"][0] == pytest.approx(sum(1 / p for p in range(1, n_items + 1)) / n_items)


def _brute_force(scores: np.ndarray, relevant: set[int], k: int) -> dict[str, float]:
    """Average the metrics over every ranking consistent with the scores (random tie-breaking)."""
    totals: dict[str, float] = {}
    n = 0
    for perm in itertools.permutations(range(len(scores))):
        if any(scores[perm[i]] < scores[perm[i + 1]] for i in range(len(perm) - 1)):
            continue
        n += 1
        ranks = [p + 1 for p, item in enumerate(perm) if item in relevant]
        top = [r for r in ranks if r <= k]
        precision, recall = len(top) / k, len(top) / len(relevant)
        idcg = sum(1 / math.log2(p + 1) for p in range(1, min(len(relevant), k) + 1))
        values = {
            "precision": precision,
            "recall": recall,
            "hit": float(bool(top)),
            "ndcg": sum(1 / math.log2(r + 1) for r in top) / idcg,
            "mrr": 1 / min(ranks) if min(ranks) <= k else 0.0,
        }
        for name, v in values.items():
            totals[name] = totals.get(name, 0.0) + v
    return {name: v / n for name, v in totals.items()}


@pytest.mark.parametrize("seed", range(6))
def test_multi_target_matches_enumerated_tie_orders(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=7).astype(np.float32)
    relevant = sorted(rng.choice(7, size=int(rng.integers(1, 4)), replace=False).tolist())
    higher, group = rank_counts(scores[None, :], np.zeros(len(relevant), np.int64), np.array(relevant))
    for k in (1, 2, 3, 5):
        got = multi_target_metrics(np.zeros(len(relevant), np.int64), higher, group, np.array([len(relevant)]),
                                   ks=(k,))
        want = _brute_force(scores, set(relevant), k)
        for name in ("precision", "recall", "hit", "ndcg", "mrr"):
            assert got[f"{name}@{k}"][0] == pytest.approx(want[name]), (name, k, scores, relevant)


def test_multi_target_by_hand_without_ties() -> None:
    scores = np.array([[5, 4, 3, 2, 1]], dtype=np.float32)
    higher, group = rank_counts(scores, np.array([0, 0]), np.array([1, 3]))  # positions 2 and 4
    m = multi_target_metrics(np.array([0, 0]), higher, group, np.array([2]), ks=(2, 4))
    assert m["precision@2"][0] == pytest.approx(0.5)
    assert m["recall@2"][0] == pytest.approx(0.5)
    assert m["f1@2"][0] == pytest.approx(0.5)
    assert m["hit@2"][0] == 1.0
    assert m["mrr@2"][0] == pytest.approx(0.5)
    assert m["ndcg@2"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["recall@4"][0] == pytest.approx(1.0)
    assert m["f1@4"][0] == pytest.approx(2 / 3)
    assert m["ndcg@4"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_multi_target_all_tied_by_hand() -> None:
    scores = np.ones((1, 4), np.float32)
    higher, group = rank_counts(scores, np.array([0, 0]), np.array([0, 1]))
    m = multi_target_metrics(np.array([0, 0]), higher, group, np.array([2]), ks=(1, 2, 4))
    assert m["hit@1"][0] == pytest.approx(0.5)
    assert m["hit@2"][0] == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert m["precision@2"][0] == pytest.approx(0.5)
    assert m["mrr@2"][0] == pytest.approx(1 / 2 + 1 / 6)
    assert m["mrr@4"][0] == pytest.approx(1 / 2 + 1 / 6 + 1 / 18)


def test_multi_target_validates_counts() -> None:
    with pytest.raises(ValueError, match="n_relevant"):
        multi_target_metrics(np.array([0]), np.array([0]), np.array([1]), np.array([0]), ks=(1,))
    with pytest.raises(ValueError, match="owner"):
        multi_target_metrics(np.array([0]), np.array([0]), np.array([1]), np.array([2]), ks=(1,))
    with pytest.raises(ValueError, match="ks"):
        single_target_metrics(np.array([0]), np.array([1]), ks=(0,))


def test_accumulator_averages_over_evaluated_rows_only() -> None:
    acc = MetricAccumulator(n_excluded=3)
    acc.add({"hit@1": np.array([1.0, 0.0])})
    acc.add({"hit@1": np.array([1.0])})
    assert acc.means() == {"hit@1": pytest.approx(2 / 3)}
    assert (acc.n_evaluated, acc.n_excluded) == (3, 3)
    assert "n_evaluated=3" in repr(acc)


def test_top_k_breaks_ties_by_lower_item_id() -> None:
    scores = np.array([[1, 3, 3, 0, 3], [0, 0, 0, 0, 1]], dtype=np.float32)
    assert top_k_items(scores, 3).tolist() == [[1, 2, 4], [4, 0, 1]]
