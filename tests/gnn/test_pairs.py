"""Training pairs (window, weights, self-pairs, user boundaries) and held-out evaluation pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gnn.pairs import holdout_pairs, training_pairs

PV, FAV, CART, BUY = 0, 1, 2, 3


def table(rows: list[tuple[int, int, int, int, int]]) -> pd.DataFrame:
    """(user, item, behavior, ts, line) rows -> an interactions table (category = item, unused here)."""
    df = pd.DataFrame(rows, columns=["user", "item", "behavior", "ts", "line"])
    df["category"] = df["item"]
    return df[["user", "item", "category", "behavior", "ts", "line"]]


TRAIN = table([
    (0, 1, PV, 0, 1),
    (0, 2, CART, 10, 2),      # 1 -> 2 after 10 s, weight of cart
    (0, 3, BUY, 4010, 3),     # 2 -> 3 after 4000 s: outside a 30-min window
    (0, 3, PV, 4020, 4),      # repeated item: self-pair dropped
    (0, 1, FAV, 4030, 5),     # 3 -> 1 after 10 s, weight of fav
    (1, 4, PV, 4031, 6),      # another user: no pair across the boundary
    (1, 5, BUY, 4031, 7),     # same second: ordered by line
])


def pairs_set(p: object) -> list[tuple[int, int, float]]:
    return sorted(zip(p.query.tolist(), p.positive.tolist(), p.weight.tolist(), strict=True))  # type: ignore[attr-defined]


def test_window_weights_self_pairs_and_user_boundaries() -> None:
    shuffled = TRAIN.sample(frac=1.0, random_state=0)  # order must come from (user, ts, line)
    got = training_pairs(shuffled, window_s=1800)
    assert pairs_set(got) == [(1, 2, 3.0), (3, 1, 2.0), (4, 5, 4.0)]
    assert got.query.dtype == np.int64 and got.weight.dtype == np.float32


def test_no_window_and_custom_weights() -> None:
    got = training_pairs(TRAIN, window_s=None, behavior_weights=(1, 1, 5, 10))
    assert pairs_set(got) == [(1, 2, 5.0), (2, 3, 10.0), (3, 1, 1.0), (4, 5, 10.0)]


def test_max_lag_pairs_rows_further_apart() -> None:
    got = training_pairs(TRAIN, window_s=1800, max_lag=2)
    # lag 2: (1 -> 3) is 4010 s apart; (3@4010 -> 1@4030) is within the window
    assert pairs_set(got) == [(1, 2, 3.0), (3, 1, 2.0), (3, 1, 2.0), (4, 5, 4.0)]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"window_s": -1}, "window_s"),
    ({"max_lag": 0}, "max_lag"),
    ({"behavior_weights": (1, 2, 3)}, "behavior_weights"),
    ({"behavior_weights": (1, 0, 3, 4)}, "behavior_weights"),
])
def test_bad_arguments_are_named(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        training_pairs(TRAIN, **kwargs)  # type: ignore[arg-type]


def test_missing_column_is_named() -> None:
    with pytest.raises(ValueError, match="'line'"):
        training_pairs(TRAIN.drop(columns=["line"]))


def test_no_test_item_in_training_pairs() -> None:
    rng = np.random.default_rng(0)
    n = 400
    df = table([(int(u), int(i), int(b), int(t), k + 1) for k, (u, i, b, t) in enumerate(zip(
        rng.integers(0, 20, n), rng.integers(0, 50, n), rng.integers(0, 4, n), np.sort(rng.integers(0, 10_000, n)),
        strict=True))])
    # temporal split: the last 20 % of time is test; test-only items get ids >= 1000
    test = df[df.ts >= 8000].copy()
    test["item"] += 1000
    train = df[df.ts < 8000]
    pairs = training_pairs(train, window_s=None)
    assert len(pairs) > 0
    used = set(pairs.query.tolist()) | set(pairs.positive.tolist())
    assert used.isdisjoint(set(test.item.tolist()))
    assert used <= set(train.item.tolist())


def test_holdout_pairs_from_context_and_holdout() -> None:
    context = table([(0, 1, PV, 0, 1), (0, 2, PV, 100, 2), (1, 7, PV, 0, 3)])
    holdout = table([
        (0, 3, PV, 200, 4),   # query = last context item 2
        (0, 3, PV, 210, 5),   # self-pair: dropped
        (0, 4, BUY, 220, 6),  # query = held-out item 3
        (1, 8, PV, 99_999, 7),  # more than 30 min after the user's last context row: dropped with a window
        (2, 9, PV, 0, 8),     # a new user's first row: no query
    ])
    got = holdout_pairs(context, holdout, window_s=1800)
    assert got.user.tolist() == [0, 0]
    assert got.query.tolist() == [2, 3]
    assert got.positive.tolist() == [3, 4]
    assert got.query_from_holdout.tolist() == [False, True]
    everything = holdout_pairs(context, holdout, window_s=None)
    assert list(zip(everything.query.tolist(), everything.positive.tolist(), strict=True)) == [(2, 3), (3, 4), (7, 8)]
    assert "from_context=2" in repr(everything)
