from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gnn.nodeclf import (
    NodeClfConfig,
    NodeDataset,
    Split,
    f1_scores,
    load_graphsage,
    load_npz,
    random_split,
    train_node_classifier,
    write_graphsage,
)


def small_dataset(multilabel: bool = False) -> tuple[NodeDataset, Split]:
    indptr = np.array([0, 2, 4, 5, 6, 6])  # 0-1, 0-2, 1-3 ; node 4 isolated
    indices = np.array([1, 2, 0, 3, 0, 1])
    feats = np.arange(15, dtype=np.float32).reshape(5, 3)  # row i = (3i, 3i+1, 3i+2): checkable
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]]) if multilabel else np.array([0, 1, 2, 1, 0])
    return NodeDataset(indptr, indices, feats, labels), Split(np.array([0, 1, 4]), np.array([2]), np.array([3]))


@pytest.mark.parametrize("multilabel", [False, True])
def test_graphsage_format_round_trip(tmp_path: Path, multilabel: bool) -> None:
    data, split = small_dataset(multilabel)
    write_graphsage(tmp_path / "toy", data, split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-G.json", "toy-class_map.json", "toy-feats.npy",
                                                          "toy-id_map.json"]
    back, back_split = load_graphsage(tmp_path / "toy")
    np.testing.assert_array_equal(back.indptr, data.indptr)
    np.testing.assert_array_equal(back.indices, data.indices)
    np.testing.assert_array_equal(back.features, data.features)
    np.testing.assert_array_equal(back.labels, data.labels)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(back_split, part), getattr(split, part))
    assert back.multilabel == multilabel


def test_graphsage_format_with_string_ids_and_permuted_rows(tmp_path: Path) -> None:
    # networkx-2 style: link ends are node ids; feature rows in another order than the nodes
    graph = {"directed": False, "multigraph": False, "graph": {},
             "nodes": [{"id": "a", "val": False, "test": False}, {"id": "b", "val": True, "test": False},
                       {"id": "c", "test": True, "val": False}],
             "links": [{"source": "a", "target": "c"}]}
    (tmp_path / "x-G.json").write_text(json.dumps(graph))
    (tmp_path / "x-id_map.json").write_text(json.dumps({"a": 2, "b": 0, "c": 1}))
    (tmp_path / "x-class_map.json").write_text(json.dumps({"a": 1, "b": 0, "c": 1}))
    np.save(tmp_path / "x-feats.npy", np.array([[0.0], [1.0], [2.0]]))
    data, split = load_graphsage(tmp_path / "x")
    assert data.labels.tolist() == [0, 1, 1]
    assert (split.train.tolist(), split.val.tolist(), split.test.tolist()) == ([2], [0], [1])
    assert data.indices[data.indptr[2]:data.indptr[3]].tolist() == [1]  # a (row 2) - c (row 1)
    (tmp_path / "x-class_map.json").unlink()
    with pytest.raises(FileNotFoundError, match="class_map"):
        load_graphsage(tmp_path / "x")


def test_f1_scores_by_hand() -> None:
    micro, macro = f1_scores(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert micro == pytest.approx(0.5)
    assert macro == pytest.approx((2 / 3 + 2 / 4 + 0) / 3)  # class 1: tp 1, fp 2, fn 0


def test_random_split_is_the_standard_one(cora_npz: Path) -> None:
    data = load_npz(cora_npz)
    assert (data.n_nodes, data.n_classes, data.features.shape[1]) == (2708, 7, 1433)
    np.testing.assert_array_equal(data.indices[data.indptr[0]:data.indptr[1]],
                                  np.unique(data.indices[data.indptr[0]:data.indptr[1]]))
    split = random_split(data.labels, seed=3)
    assert (split.train.shape[0], split.val.shape[0], split.test.shape[0]) == (140, 500, 1000)
    assert np.bincount(data.labels[split.train]).tolist() == [20] * 7
    assert np.intersect1d(split.train, np.concatenate([split.val, split.test])).shape[0] == 0


def test_cora_micro_f1_above_floor(cora_npz: Path) -> None:
    """Quick training (15 epochs, about 5 s); the benchmark reaches about 0.78 (results/cora.json)."""
    data = load_npz(cora_npz)
    result = train_node_classifier(data, random_split(data.labels, seed=0), NodeClfConfig(epochs=15, seed=0))
    assert result.test_micro_f1 > 0.70
    assert 0 < result.test_macro_f1 <= 1
