"""The neighbour-purity probe (benchmarks/probe_community_purity.py), checked by hand on a tiny neighbourhood."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.probe_community_purity import purity


def test_purity_by_hand() -> None:
    # communities: items 0,1 -> 0; items 2,3 -> 1. Walk rows (visit counts desc): 0: [1 (3), 2 (1)];
    # 1: [0 (2), 3 (2)]; 2: [3 (5)]; 3: empty. Top t=1 keeps 0->1, 1->0, 2->3: all same-community.
    indptr = np.array([0, 2, 4, 5, 5])
    indices = np.array([1, 2, 0, 3, 3])
    weights = np.array([3.0, 1.0, 2.0, 2.0, 5.0], np.float32)
    community = np.array([0, 0, 1, 1])
    popular = np.array([False, False, False, True])
    draws = np.array([[0, 2], [0, -1], [3, 3], [1, 3]])  # self draws (0->0, 3->3) and -1 are left out
    t2 = purity(indptr, indices, weights, 2, draws, community, popular)
    assert t2["walk_top_t_same"] == pytest.approx(3 / 5)  # 0->1, 2->3, 1->0 same; 0->2, 1->3 not
    assert t2["walk_top_t_same_visit_weighted"] == pytest.approx(round((3 + 2 + 5) / 13, 4))
    assert t2["graphsage_draws_same"] == pytest.approx(3 / 5)  # 0->2 no, 1->0, 2->3, 2->3 yes, 3->1 no
    assert t2["random_pair_same"] == pytest.approx(0.5)
    assert t2["walk_top_t_popular"] == pytest.approx(2 / 5)
    assert t2["graphsage_draws_popular"] == pytest.approx(2 / 5)
    t1 = purity(indptr, indices, weights, 1, draws, community, popular)
    assert t1["walk_top_t_same"] == 1.0 and t1["walk_top_t_popular"] == pytest.approx(1 / 3, abs=1e-4)
