"""Baseline scorers on tiny hand-made histories; protocols A and B; calibration on the Amazon sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gnn.baselines import (
    EmbeddingScorer,
    Histories,
    PopularityScorer,
    RandomScorer,
    Scorer,
    cooccurrence,
    item_cf,
)
from gnn.evaluation import (
    baseline_factories,
    evaluate_item_to_item,
    evaluate_leave_last_out,
    evaluate_user_to_item,
    leave_last_out,
    relevant_items,
)
from gnn.metrics import multi_target_metrics, rank_counts
from gnn.pairs import EvalPairs

# user 0: 0 1 2, user 1: 0 1, user 2: 1 2 3; item 4 never seen
HIST = Histories.from_arrays(np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 0, 1, 1, 2, 3]),
                             n_users=3, n_items=5)


def test_histories_rows_and_last_items() -> None:
    assert HIST.lengths().tolist() == [3, 2, 3]
    assert HIST.last_items(np.array([2, 0, 1])).tolist() == [3, 2, 1]
    row, item = HIST.rows(np.array([2, 1]), recent=2)
    assert row.tolist() == [0, 0, 1, 1] and item.tolist() == [2, 3, 0, 1]
    ordered = Histories.from_arrays(np.array([0, 0, 0]), np.array([5, 6, 7]), n_users=2, n_items=8,
                                    order=(np.array([3, 1, 2]),))
    assert ordered.items.tolist() == [6, 7, 5]
    assert ordered.last_items(np.array([0, 1])).tolist() == [5, -1]


def test_popularity_and_random() -> None:
    pop = PopularityScorer.from_histories(HIST)
    assert pop.score_items(np.array([0, 3])).tolist() == [[2, 3, 2, 1, 0]] * 2
    a = RandomScorer(5, seed=7).score_items(np.array([0, 1]))
    b = RandomScorer(5, seed=7).score_items(np.array([0, 1]))
    assert a.shape == (2, 5) and np.array_equal(a, b)
    assert isinstance(pop, Scorer)


def test_item_cf_counts_transitions() -> None:
    cf = item_cf(HIST, popularity_tiebreak=False)
    assert cf.score_items(np.array([0, 1, 2, 4])).tolist() == [
        [0, 2, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    tie = item_cf(HIST).score_items(np.array([2]))[0]  # popularity below one count orders the zeros
    assert np.argsort(-tie, kind="stable").tolist() == [3, 1, 0, 2, 4]
    assert tie.max() < 1.5


def test_cooccurrence_counts_and_cosine() -> None:
    co = cooccurrence(HIST, popularity_tiebreak=False)
    want = np.array([[0, 2, 1, 0, 0], [2, 0, 2, 1, 0], [1, 2, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert co.score_items(np.arange(5)).tolist() == want.tolist()
    cos = cooccurrence(HIST, normalize="cosine", popularity_tiebreak=False).score_items(np.array([0]))[0]
    assert cos[1] == pytest.approx(2 / np.sqrt(2 * 3)) and cos[2] == pytest.approx(1 / np.sqrt(2 * 2))
    win = cooccurrence(HIST, window=1, popularity_tiebreak=False).score_items(np.array([1]))[0]
    assert win.tolist() == [2, 0, 2, 0, 0]  # neighbours of item 1 at distance 1, both directions
    with pytest.raises(ValueError, match="normalize"):
        cooccurrence(HIST, normalize="jaccard")  # type: ignore[arg-type]


def test_user_scores_from_recent_items() -> None:
    co = cooccurrence(HIST, popularity_tiebreak=False, user_mode="recent_sum", recent=2)
    got = co.score_users(HIST, np.array([0]))[0]
    assert got.tolist() == (co.score_items(np.array([1]))[0] + co.score_items(np.array([2]))[0]).tolist()
    last = item_cf(HIST, popularity_tiebreak=False).score_users(HIST, np.array([0, 1]))
    assert last.tolist() == [[0, 0, 0, 1, 0], [0, 0, 2, 0, 0]]  # rows of the last items 2 and 1


def test_embedding_scorer_dot_products() -> None:
    emb = np.eye(5, dtype=np.float32)
    emb[0, 1] = 0.5
    sc = EmbeddingScorer(emb)
    assert sc.score_items(np.array([0]))[0].tolist() == [1.25, 0.5, 0, 0, 0]
    mean = EmbeddingScorer(emb, user_mode="recent_mean", recent=2).score_users(HIST, np.array([1]))[0]
    assert mean.tolist() == pytest.approx([0.875, 0.75, 0, 0, 0])  # mean of e0, e1 = (0.5, 0.75)
    with pytest.raises(ValueError, match="NaN"):
        EmbeddingScorer(np.full((2, 2), np.nan, np.float32))


def test_item_to_item_protocol_on_a_tiny_case() -> None:
    cf = item_cf(HIST, popularity_tiebreak=False)
    pairs = EvalPairs(np.array([0, 1]), np.array([0, 2]), np.array([1, 4]), np.array([False, False]))
    out = evaluate_item_to_item(cf, pairs, ks=(1,))
    # pair 1: item 1 is the only positive score -> rank 1; pair 2: item 4 ties with 3 zero items (query excluded)
    assert out["hit@1"] == pytest.approx((1 + 0) / 2)
    assert out["mrr"] == pytest.approx((1 + (1 / 2 + 1 / 3 + 1 / 4) / 3) / 2)
    assert out["n_evaluated"] == 2
    seen = evaluate_item_to_item(cf, pairs, ks=(1,), exclude_seen=HIST)
    assert (seen["n_evaluated"], seen["n_excluded"]) == (1, 1)  # item 1 was seen by user 0


def test_user_to_item_excludes_users_without_unseen_holdout_items() -> None:
    holdout = Histories.from_arrays(np.array([0, 1, 1]), np.array([1, 3, 4]), n_users=3, n_items=5)
    users, indptr, items = relevant_items(HIST, holdout)
    assert indptr.tolist() == [0, 2]
    assert users.tolist() == [1] and items.tolist() == [3, 4]  # user 0's item 1 was seen in training
    pop = PopularityScorer.from_histories(HIST)
    out = evaluate_user_to_item(pop, HIST, holdout, ks=(1, 2))
    assert (out["n_evaluated"], out["n_excluded"]) == (1, 1)
    # user 1 candidates {2: 2, 3: 1, 4: 0}: item 3 at position 2, item 4 at 3
    assert out["precision@2"] == pytest.approx(0.5) and out["recall@2"] == pytest.approx(0.5)
    assert out["hit@1"] == 0.0 and out["mrr@2"] == pytest.approx(0.5)


def test_leave_last_out_split() -> None:
    split = leave_last_out(np.array([0, 0, 0, 0, 1, 1, 2]), np.array([5, 6, 7, 8, 1, 2, 3]), n_users=3, n_items=9)
    assert split.test.tolist() == [8, 2, -1] and split.valid.tolist() == [7, -1, -1]
    assert split.train.lengths().tolist() == [2, 1, 1]
    assert split.train.items.tolist() == [5, 6, 1, 3]


def read_amazon(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """0-based (user, item) rows of the SASRec-format Amazon file, in file (= time) order per user."""
    df = pd.read_csv(path, sep=" ", header=None, names=["user", "item"], dtype=np.int64)
    return df["user"].to_numpy() - 1, df["item"].to_numpy() - 1


@pytest.mark.slow
def test_protocol_b_reproduces_the_amazon_calibration(amazon_videogames: Path) -> None:
    """ANCHORS.md: HR@10 random 0.0004, popularity 0.019, item-CF 0.086, co-occurrence 0.088 (validation item)."""
    users, items = read_amazon(amazon_videogames)
    split = leave_last_out(users, items, n_users=int(users.max()) + 1, n_items=int(items.max()) + 1)
    want = {"random": 0.0004, "popularity": 0.019, "itemcf": 0.086, "cooccurrence": 0.088}
    for name, factory in baseline_factories(seed=0).items():
        got = evaluate_leave_last_out(factory(split.train), split, target="valid", ks=(10,))
        assert got["n_evaluated"] > 30_000
        # 3 binomial standard errors at n = 30,901 users (0.0016 at 0.088), at least 0.0004
        tol = max(3 * np.sqrt(want[name] * (1 - want[name]) / got["n_evaluated"]), 0.0004)
        assert got["hit@10"] == pytest.approx(want[name], abs=tol), name


def test_evaluation_is_deterministic_for_a_seeded_random_scorer() -> None:
    split = leave_last_out(np.repeat(np.arange(20), 6), np.arange(120) % 17, n_users=20, n_items=17)
    runs = [evaluate_leave_last_out(RandomScorer(17, seed=3), split, target="test", ks=(5,), block_size=7)
            for _ in range(2)]
    assert runs[0]["hit@5"] == runs[1]["hit@5"] and runs[0]["mrr"] == runs[1]["mrr"]
    assert runs[0]["n_evaluated"] == 20


def test_user_to_item_top_threshold_shortcut_matches_full_counting() -> None:
    """Integer embeddings make many ties; the partition shortcut must give the full-count metrics exactly."""
    rng = np.random.default_rng(5)
    n_users, n_items = 12, 30
    emb = rng.integers(0, 3, size=(n_items, 2)).astype(np.float32)
    hist = Histories.from_arrays(rng.integers(0, n_users, 60), rng.integers(0, n_items, 60),
                                 n_users=n_users, n_items=n_items)
    hold = Histories.from_arrays(rng.integers(0, n_users, 80), rng.integers(0, n_items, 80),
                                 n_users=n_users, n_items=n_items)
    scorer = EmbeddingScorer(emb)
    got = evaluate_user_to_item(scorer, hist, hold, ks=(3, 7), block_size=5)
    users, indptr, items = relevant_items(hist, hold)
    s = scorer.score_users(hist, users)
    r, i = hist.rows(users)
    s[r, i] = -np.inf
    owner = np.repeat(np.arange(users.shape[0]), np.diff(indptr))
    want = multi_target_metrics(owner, *rank_counts(s, owner, items), np.diff(indptr), ks=(3, 7))
    assert got["n_evaluated"] == users.shape[0]
    for name, per_user in want.items():
        assert got[name] == pytest.approx(per_user.mean()), name
