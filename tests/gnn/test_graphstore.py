from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gnn.graphstore import GraphStore, GraphStoreError, csr_from_edges, load_graph_store, write_graph_store


def tiny_store() -> GraphStore:
    # users 0,1,2; items 0,1,2,3; edges (u, i, w, t)
    u = np.array([0, 0, 1, 1, 2])
    i = np.array([1, 0, 1, 2, 3])
    w = np.array([1, 4, 1, 2, 3], dtype=np.float32)
    t = np.array([20, 10, 5, 6, 7])
    return GraphStore(
        n_users=3, n_items=4, n_categories=2,
        user_items=csr_from_edges(u, i, w, t, 3),
        item_users=csr_from_edges(i, u, w, t, 4),
        item_category=np.array([0, 0, 1, 1]),
        item_counts=np.array([[0, 0, 0, 1], [2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
    )


def test_csr_rows_in_time_order() -> None:
    s = tiny_store()
    assert s.user_items.row(0).tolist() == [0, 1]  # item 0 at t=10 before item 1 at t=20
    assert s.item_users.row(1).tolist() == [1, 0]
    assert s.item_users.degree().tolist() == [1, 2, 1, 1]


def test_roundtrip_memory_mapped(tmp_path: Path) -> None:
    write_graph_store(tmp_path / "g", tiny_store())
    g = load_graph_store(tmp_path / "g")
    assert isinstance(g.user_items.indices, np.memmap)
    assert g.user_items.indices.tolist() == tiny_store().user_items.indices.tolist()
    assert g.n_edges == 5 and g.item_content is None


def test_other_version_is_refused(tmp_path: Path) -> None:
    write_graph_store(tmp_path / "g", tiny_store())
    m = json.loads((tmp_path / "g" / "graph.json").read_text())
    m["version"] = 99
    (tmp_path / "g" / "graph.json").write_text(json.dumps(m))
    with pytest.raises(GraphStoreError, match="version 99"):
        load_graph_store(tmp_path / "g")
    with pytest.raises(GraphStoreError, match="pinsage graph"):
        load_graph_store(tmp_path / "nothing")
