"""The walk-convergence probe (benchmarks/probe_walk_convergence.py), checked by hand on tiny neighbourhoods."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.probe_walk_convergence import convergence, top_t_rows


def test_top_t_rows_keeps_items_with_t_neighbours() -> None:
    indptr = np.array([0, 3, 4, 6])  # item 1 has one neighbour only
    indices = np.array([5, 6, 7, 5, 8, 9])
    weights = np.array([4.0, 2.0, 1.0, 3.0, 2.0, 2.0], np.float32)
    full, ids, counts = top_t_rows(indptr, indices, weights, 2)
    assert full.tolist() == [0, 2] and ids.tolist() == [[5, 6], [8, 9]]
    assert counts.tolist() == [[4.0, 2.0], [2.0, 2.0]]


def test_convergence_by_hand() -> None:
    # item 0: sample [5 (3), 6 (1)] vs reference [5 (10), 7 (10)]: overlap 1/2;
    #   weights (0.75, 0.25) vs (0.5, 0.5): |0.75 - 0.5| + 0.25 (6 only in the sample) + 0.5 (7 only in reference) = 1.0
    # item 1: sample [8 (2), 9 (2)] vs reference [9 (30), 8 (10)]: overlap 1; |0.5 - 0.25| + |0.5 - 0.75| = 0.5
    # item 2: in the sample only, not compared; its counts still count for the low-count share.
    sample = (np.array([0, 1, 2]), np.array([[5, 6], [8, 9], [3, 4]]),
              np.array([[3.0, 1.0], [2.0, 2.0], [9.0, 8.0]]))
    reference = (np.array([0, 1, 3]), np.array([[5, 7], [9, 8], [1, 2]]),
                 np.array([[10.0, 10.0], [30.0, 10.0], [5.0, 5.0]]))
    out = convergence(sample, reference, 2)
    assert out["items_compared"] == 2
    assert out["overlap_with_reference"] == pytest.approx(0.75)
    assert out["weight_l1_to_reference"] == pytest.approx(0.75)  # (1.0 + 0.5) / 2
    assert out["low_count_slot_share"] == pytest.approx(3 / 6)  # 1, 2, 2 of the six slots


def test_identical_neighbourhoods_converge_exactly() -> None:
    rows = (np.array([0, 1]), np.array([[1, 2], [0, 2]]), np.array([[5.0, 3.0], [4.0, 4.0]]))
    out = convergence(rows, rows, 2)
    assert out["overlap_with_reference"] == 1.0 and out["weight_l1_to_reference"] == 0.0
