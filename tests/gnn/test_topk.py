"""Exact blockwise top-K (gnn/topk.py) against a full sort, ties included, and the faiss helpers (gnn/ann.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnn.ann import IndexSpec, ann_block_topk, build_index, deserialize, recall_at_k, serialize
from gnn.baselines import Histories
from gnn.topk import NO_ITEM, block_topk, chunk_topk, item_queries, user_queries


def brute_force(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full sort of every row by (score descending, item id ascending); -inf = excluded, padded with NO_ITEM."""
    n = scores.shape[1]
    order = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=1)[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    return np.where(top == -np.inf, NO_ITEM, order), top


def tie_matrix(n: int = 60, dim: int = 3, seed: int = 0) -> np.ndarray:
    """Small integer vectors: dot products are exact in float32 and many of them are equal."""
    return np.random.default_rng(seed).integers(-1, 2, size=(n, dim)).astype(np.float32)


def test_chunk_topk_breaks_a_tie_across_the_cut_by_lower_id() -> None:
    scores = torch.tensor([[1.0, 5.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    top = chunk_topk(scores, 3, offset=10)
    assert top.items.tolist() == [[11, 12, 13], [10, 11, 12]]
    assert top.scores.tolist() == [[5.0, 3.0, 3.0], [2.0, 2.0, 2.0]]


def test_chunk_topk_never_returns_excluded_and_pads() -> None:
    scores = torch.tensor([[-np.inf, 1.0, -np.inf, 0.5]])
    top = chunk_topk(scores, 3)
    assert top.items.tolist() == [[1, 3, NO_ITEM]]
    assert top.counts().tolist() == [2]


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("k", [1, 5, 59])
def test_item_to_item_equals_full_sort_with_ties(chunk: int, k: int) -> None:
    emb = tie_matrix()
    queries, exclude = item_queries(emb, np.arange(emb.shape[0]))
    top = block_topk(queries, emb, k, exclude=exclude, chunk=chunk)
    full = emb @ emb.T
    np.fill_diagonal(full, -np.inf)
    want_items, want_scores = brute_force(full, k)
    np.testing.assert_array_equal(top.items, want_items)
    np.testing.assert_array_equal(top.scores, want_scores)
    assert not np.any(top.items == np.arange(emb.shape[0])[:, None])  # never the query itself


@pytest.mark.parametrize("mode", ["last", "recent_sum", "recent_mean"])
def test_user_queries_exclude_every_seen_item(mode: str) -> None:
    emb = tie_matrix(n=20)
    # user 0: 3 items; user 1: none; user 2: all but two items (fewer than K candidates left)
    hist = Histories.from_arrays(np.array([0, 0, 0, *([2] * 18)]), np.array([4, 9, 4, *range(18)]),
                                 n_users=3, n_items=20)
    queries, exclude = user_queries(emb, hist, user_mode=mode, recent=2)  # type: ignore[arg-type]
    top = block_topk(queries, emb, 5, exclude=exclude, chunk=6)
    expected_q0 = {"last": emb[4], "recent_sum": emb[9] + emb[4], "recent_mean": (emb[9] + emb[4]) / 2}[mode]
    np.testing.assert_array_equal(queries[0], expected_q0)
    np.testing.assert_array_equal(queries[1], 0.0)
    full = queries @ emb.T
    full[exclude] = -np.inf
    want, _ = brute_force(full, 5)
    np.testing.assert_array_equal(top.items, want)
    assert not set(top.items[0]) & {4, 9}
    assert set(top.items[2][:2]) == {18, 19} and np.all(top.items[2][2:] == NO_ITEM)


def test_bad_k_and_dimension_mismatch_are_named() -> None:
    emb = tie_matrix(n=8)
    with pytest.raises(ValueError, match="k=0"):
        block_topk(emb[:2], emb, 0)
    with pytest.raises(ValueError, match="k=9: larger than the catalogue of 8"):
        block_topk(emb[:2], emb, 9)
    with pytest.raises(ValueError, match="same dimension"):
        block_topk(np.zeros((2, 4), np.float32), emb, 2)


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_matches_exact_and_recall_is_one() -> None:
    emb = unit_vectors(300, 8)
    queries, exclude = item_queries(emb, np.arange(300))
    exact = block_topk(queries, emb, 10, exclude=exclude, chunk=64)
    index = deserialize(serialize(build_index(emb, IndexSpec(kind="flat"))))
    approx = ann_block_topk(index, queries, 10, exclude=exclude)
    np.testing.assert_array_equal(approx.items, exact.items)
    assert recall_at_k(approx.items, exact.items) == 1.0
    assert not np.any(approx.items == np.arange(300)[:, None])


def test_ivf_recall_is_measured_between_zero_and_one() -> None:
    emb = unit_vectors(2000, 8, seed=1)
    queries, exclude = item_queries(emb, np.arange(200))
    exact = block_topk(queries, emb, 10, exclude=exclude)
    one_cell = ann_block_topk(build_index(emb, IndexSpec(kind="ivf", nlist=40, nprobe=1)), queries, 10,
                              exclude=exclude)
    all_cells = ann_block_topk(build_index(emb, IndexSpec(kind="ivf", nlist=40, nprobe=40)), queries, 10,
                               exclude=exclude)
    low, full = recall_at_k(one_cell.items, exact.items), recall_at_k(all_cells.items, exact.items)
    assert 0.0 < low < 1.0
    assert full == 1.0  # every cell probed: exhaustive


def test_recall_counts_overlap_per_query() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, NO_ITEM, NO_ITEM]])
    approx = np.array([[4, 3, 9, 8], [6, 7, NO_ITEM, NO_ITEM]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 1 / 2) / 2)


def test_index_spec_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="index kind 'lsh'"):
        IndexSpec(kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nprobe=0"):
        IndexSpec(nprobe=0)
