"""Stage ``walks`` on real local Dask clusters: identical results for 1 and 2 workers and any chunking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from gnn.graphstore import GraphStore, csr_from_edges, write_graph_store
from gnn.walks import (
    Neighborhoods,
    WalkConfig,
    chunk_bounds,
    compute_neighborhoods,
    load_neighborhoods,
    store_token,
    walk_chunk,
)
from pipeline.cli import main
from pipeline.rundir import StageError, run_stage
from pipeline.walks import (
    WalkStats,
    _collect_visits,
    _pop_accumulator,
    _walk_task,
    distributed_neighborhoods,
    run_walks,
)


def random_store(n_users: int = 60, n_items: int = 150, n_edges: int = 700, seed: int = 3) -> GraphStore:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n_edges)
    i = rng.integers(0, n_items - 1, n_edges)  # the last item has no interactions
    w = rng.integers(1, 5, n_edges).astype(np.float32)
    t = np.arange(n_edges)
    return GraphStore(n_users=n_users, n_items=n_items, n_categories=1,
                      user_items=csr_from_edges(u, i, w, t, n_users), item_users=csr_from_edges(i, u, w, t, n_items),
                      item_category=np.zeros(n_items, np.int64), item_counts=np.zeros((n_items, 4), np.int64))


def graph_run(run_dir: Path, store: GraphStore) -> Path:
    """A run directory whose finished ``graph`` stage holds ``store``."""
    run_stage(run_dir, "graph", config=WalkConfig(), inputs={},
              build=lambda tmp: {"n_edges": write_graph_store(tmp, store) and store.n_edges})
    return run_dir


def assert_same(a: Neighborhoods, b: Neighborhoods) -> None:
    for name in ("indptr", "indices", "weights", "item_importance", "user_importance", "hard_negatives"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and np.array_equal(x, y), name


CFG = WalkConfig(n_walks=20, hops=3, top_t=4, n_hard_negatives=3, hard_negative_ranks=(8, 40), bias="weight",
                 chunk_items=16)


def test_same_result_on_1_and_2_workers_and_any_chunks(tmp_path: Path, dask_client: Client,
                                                       dask_client_1: Client) -> None:
    store = random_store()
    write_graph_store(tmp_path / "g", store)
    ref = compute_neighborhoods(store, CFG)
    stats = WalkStats()
    two = distributed_neighborhoods(dask_client, tmp_path / "g", CFG, progress=False, stats=stats)
    assert stats.chunks == 10 and stats.steps > 0
    one = distributed_neighborhoods(dask_client_1, tmp_path / "g", WalkConfig(**{**CFG.__dict__, "chunk_items": 7}),
                                    progress=False)
    assert_same(ref, two)
    assert_same(ref, one)
    assert two.neighbors(store.n_items - 1).size == 0
    # both workers took part, each holding the store memory-mapped once (the per-process cache)
    cached = dask_client.run(lambda: [k[0] for k in __import__("gnn.walks").walks._CACHE])
    assert sorted(map(len, cached.values())) == [1, 1]
    assert all(v == [str((tmp_path / "g").resolve())] for v in cached.values())


def test_stage_writes_and_reuses(tmp_path: Path, dask_client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    store = random_store(seed=5)
    run = graph_run(tmp_path / "run", store)
    out = run_walks(run, CFG, dask_client)
    assert not out.reused and out.report["n_items"] == store.n_items and out.report["empty_rows"] >= 1
    nb = load_neighborhoods(out.path)
    assert_same(nb, compute_neighborhoods(store, CFG))
    manifest = json.loads((out.path / "neighborhoods.json").read_text())
    assert manifest["format"] == "pinsage-walks" and manifest["version"] == 1
    assert run_walks(run, CFG, dask_client).reused
    assert run_walks(run, WalkConfig(**{**CFG.__dict__, "top_t": 2}), dask_client).report["nnz"] < out.report["nnz"]


def test_missing_graph_stage(tmp_path: Path, dask_client: Client) -> None:
    with pytest.raises(StageError, match="pinsage graph"):
        run_walks(tmp_path / "empty", CFG, dask_client)


def test_graph_store_of_another_version(tmp_path: Path, dask_client: Client) -> None:
    run = graph_run(tmp_path / "run", random_store())
    mpath = run / "graph" / "graph.json"
    manifest = json.loads(mpath.read_text())
    manifest["version"] = 99
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"version 99.*rebuild it with `pinsage graph`"):
        run_walks(run, CFG, dask_client)
    assert not (run / "walks").exists()


def test_cli_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["walks", "--run-dir", str(tmp_path), "--n-walks", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "pinsage walks: error: walks.n_walks=0: must be a positive integer"


def test_cli_runs_the_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = graph_run(tmp_path / "run", random_store(seed=7))
    args = ["walks", "--run-dir", str(run), "--workers", "1", "--backend", "cpu", "--dashboard-address",
            "127.0.0.1:0", "--n-walks", "5", "--top-t", "3", "--chunk-items", "50"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pinsage walks: done" in out and "dashboard" in out
    assert load_neighborhoods(run / "walks").hard_negatives.shape == (150, 8)


def test_lost_or_repeated_counts_are_recomputed(tmp_path: Path, dask_client: Client) -> None:
    store = random_store(seed=11)
    write_graph_store(tmp_path / "g", store)
    path, token = str((tmp_path / "g").resolve()), store_token(tmp_path / "g")
    bounds = chunk_bounds(store.n_items, CFG.chunk_items)
    addrs = sorted(dask_client.nthreads())
    futs = [dask_client.submit(_walk_task, path, token, CFG, lo, hi, "run-x", workers=[addrs[k % 2]],
                               allow_other_workers=False, pure=False) for k, (lo, hi) in enumerate(bounds)]
    dask_client.gather(futs)
    dask_client.submit(_walk_task, path, token, CFG, *bounds[1], "run-x", pure=False).result()  # counted twice
    dask_client.run(_pop_accumulator, "run-x", workers=[addrs[0]])  # a worker's counts lost
    items, users = _collect_visits(dask_client, "run-x", path, token, CFG, bounds, store.n_items, store.n_users)
    whole = walk_chunk(store, CFG, 0, store.n_items)
    assert np.array_equal(items, whole.item_visits) and np.array_equal(users, whole.user_visits)
    assert all(v is None for v in dask_client.run(_pop_accumulator, "run-x").values())
