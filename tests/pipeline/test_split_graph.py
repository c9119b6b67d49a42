from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from gnn.graphstore import load_graph_store
from pipeline.graph import GraphConfig, build_graph
from pipeline.split import SplitConfig, read_part, split
from tests.pipeline.stagefixtures import DAY, T0, hand_interactions, write_hand_ingest


def test_last_day_split_has_no_future_in_train(tmp_path: Path, dask_client: Client) -> None:
    write_hand_ingest(tmp_path)
    out = split(tmp_path, SplitConfig(mode="last_day"), dask_client)
    train, valid, test = (read_part(out, p) for p in ("train", "valid", "test"))
    assert out.report["rows"] == {"train": 5, "valid": 5, "test": 3}
    assert train["ts"].max() < valid["ts"].min()
    assert valid["ts"].max() < test["ts"].min()
    assert (test["ts"] >= T0 + 2 * DAY).all()
    assert sorted(pd.concat([train, valid, test])["line"]) == list(range(1, 14))


def test_last_n_split_is_per_user(tmp_path: Path, dask_client: Client) -> None:
    write_hand_ingest(tmp_path)
    out = split(tmp_path, SplitConfig(mode="last_n", last_n=1), dask_client)
    train, valid, test = (read_part(out, p) for p in ("train", "valid", "test"))
    # users 0 and 2 have >= 3 rows: last -> test, second-last -> valid; users 1 (3 rows) too; user 3 (1 row) all train.
    assert test.groupby("user")["line"].max().to_dict() == {0: 4, 1: 7, 2: 12}
    assert valid.groupby("user")["line"].max().to_dict() == {0: 3, 1: 6, 2: 11}
    assert 3 in set(train["user"])
    for u, g in train.groupby("user"):
        held = test[test["user"] == u]
        if len(held):
            assert g["ts"].max() <= held["ts"].min()


def test_bad_split_settings() -> None:
    with pytest.raises(ValueError, match=r"split\.last_n=0"):
        SplitConfig(last_n=0)


def test_graph_store_matches_direct_count(tmp_path: Path, dask_client: Client) -> None:
    write_hand_ingest(tmp_path)
    split(tmp_path, SplitConfig(mode="last_day"), dask_client)
    out = build_graph(tmp_path, GraphConfig(), dask_client)
    g = load_graph_store(out.path)
    g.validate()
    train = hand_interactions().query(f"ts < {T0 + DAY}")
    assert (g.n_users, g.n_items, g.n_categories) == (4, 5, 2)
    pairs = train.groupby(["user", "item"])
    assert g.n_edges == pairs.ngroups
    bw = np.array([1, 2, 3, 4], dtype=np.float32)
    expected_w = pairs["behavior"].apply(lambda b: bw[b.to_numpy()].sum()).to_dict()
    for u in range(g.n_users):
        items = g.user_items.row(u).tolist()
        weights = np.asarray(g.user_items.weights[g.user_items.indptr[u]:g.user_items.indptr[u + 1]]).tolist()
        last_ts = train[train["user"] == u].groupby("item")["ts"].max()
        assert items == sorted(items, key=lambda i: last_ts[i])
        assert {i: w for i, w in zip(items, weights, strict=True)} == {
            i: expected_w[(u, i)] for (uu, i) in expected_w if uu == u}
    # item -> user CSR is the transpose
    for i in range(g.n_items):
        assert sorted(g.item_users.row(i).tolist()) == sorted(train[train["item"] == i]["user"].unique().tolist())
    counts = train.groupby(["item", "behavior"]).size()
    for (i, b), c in counts.items():
        assert g.item_counts[i, b] == c
    assert int(g.item_counts.sum()) == len(train)
    assert g.item_category.tolist() == [0, 0, 1, 1, 1]
    # re-running is a no-op
    assert build_graph(tmp_path, GraphConfig(), dask_client).reused


def test_max_edge_weight(tmp_path: Path, dask_client: Client) -> None:
    df = hand_interactions()
    extra = df.iloc[[1]].assign(behavior=np.int8(3), ts=T0 + 30, line=14)  # user 0 buys item 1 on day 0
    write_hand_ingest(tmp_path, pd.concat([df, extra], ignore_index=True))
    split(tmp_path, SplitConfig(mode="last_day"), dask_client)
    g = load_graph_store(build_graph(tmp_path, GraphConfig(edge_weight="max"), dask_client).path)
    # user 0 viewed then bought item 1 on day 0: max weight = buy = 4
    row = g.user_items.row(0).tolist()
    assert g.user_items.weights[g.user_items.indptr[0] + row.index(1)] == 4.0
