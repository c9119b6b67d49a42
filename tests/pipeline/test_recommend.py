"""The recommend stage on a real 2-worker LocalCluster: exact top-K against a brute-force ranking (ties included),
seen items never recommended, users without history, the faiss index's recall, the errors, the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster

from gnn.ann import IndexSpec, build_index
from gnn.baselines import Histories
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.recommend import (
    REPORT,
    RecommendConfig,
    read_histories,
    read_recommendations,
    read_report,
    recommend,
    top_k_items,
    top_k_users,
)
from pipeline.rundir import run_stage
from pipeline.schema import INTERACTION_COLUMNS

N_ITEMS, DIM = 50, 3
# user 0: three items; user 1: only in the test split (no training history); user 2: every item but three;
# user 3: one item; user 4: four items, two of them twice
TRAIN = [(0, 7), (0, 3), (0, 7), (0, 12), (2, *range(N_ITEMS - 3)), (3, 0), (4, 5), (4, 6), (4, 5), (4, 9), (4, 6),
         (4, 1)]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A real 2-worker LocalCluster; not the default client (a default client has hung other tests)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as c:
        yield c


def tie_embeddings(n: int = N_ITEMS, dim: int = DIM, seed: int = 3) -> np.ndarray:
    """Integer vectors: dot products exact in float32, many of them equal (ties everywhere)."""
    return np.random.default_rng(seed).integers(-1, 2, size=(n, dim)).astype(np.float32)


def brute_force(scores: np.ndarray, k: int) -> list[list[int]]:
    """Every row fully sorted by (score descending, item id ascending), excluded (-inf) items dropped."""
    out = []
    for row in scores:
        order = np.lexsort((np.arange(row.shape[0]), -row))
        out.append([int(i) for i in order[:k] if row[i] > -np.inf])
    return out


def as_lists(frame: pd.DataFrame, queries: np.ndarray) -> list[list[int]]:
    ranked = frame.sort_values(["query", "rank"])
    groups = {int(q): g["item"].tolist() for q, g in ranked.groupby("query")}
    return [groups.get(int(q), []) for q in queries]


def interactions() -> pd.DataFrame:
    rows = []
    line = 0
    for user, *items in TRAIN:
        for item in items:
            line += 1
            rows.append((user, item, 0, 0, 1000 + line, line))
    rows.append((1, 4, 0, 0, 999_999, line + 1))  # user 1's only interaction is in the test split
    df = pd.DataFrame(rows, columns=["user", "item", "category", "behavior", "ts", "line"])
    return df[list(INTERACTION_COLUMNS)]


def write_run(run: Path, embeddings: np.ndarray | None = None, where: str = "train") -> None:
    df = interactions()

    def build(tmp: Path) -> dict[str, int]:
        df[df["ts"] < 999_999].to_parquet(tmp / "train.parquet", index=False)
        df.iloc[:0].to_parquet(tmp / "valid.parquet", index=False)
        df[df["ts"] >= 999_999].to_parquet(tmp / "test.parquet", index=False)
        return {"rows": len(df)}

    run_stage(run, "split", config=RecommendConfig(), inputs={}, build=build)
    (run / where).mkdir(exist_ok=True)
    np.save(run / where / "embeddings.npy", tie_embeddings() if embeddings is None else embeddings)


def expected_users(emb: np.ndarray, hist: Histories, k: int, mode: str = "last", recent: int = 10) -> list[list[int]]:
    users = np.arange(hist.n_users)
    row, item = hist.rows(users, recent=1 if mode == "last" else recent)
    q = np.zeros((hist.n_users, emb.shape[1]), np.float32)
    np.add.at(q, row, emb[item])
    if mode == "recent_mean":
        q /= np.maximum(np.bincount(row, minlength=hist.n_users), 1)[:, None].astype(np.float32)
    scores = q @ emb.T
    seen_row, seen_item = hist.rows(users)
    scores[seen_row, seen_item] = -np.inf
    return brute_force(scores, k)


@pytest.mark.parametrize("on_dask", [False, True], ids=["in-process", "dask"])
@pytest.mark.parametrize("k", [1, 4, 49])
def test_item_to_item_equals_brute_force_with_ties(client: Client, on_dask: bool, k: int) -> None:
    emb = tie_embeddings()
    scores = emb @ emb.T
    np.fill_diagonal(scores, -np.inf)
    cfg = RecommendConfig(k=k, query_block=7, item_chunk=6)  # many blocks, ties straddling chunk edges
    frame = top_k_items(emb, cfg, client=client if on_dask else None)
    assert as_lists(frame, np.arange(N_ITEMS)) == brute_force(scores, k)
    assert (frame["query"] != frame["item"]).all()
    assert list(frame.columns) == ["query", "rank", "item", "score"]
    first = frame[frame["query"] == 0]
    assert first["rank"].tolist() == list(range(1, k + 1))
    np.testing.assert_array_equal(first["score"].to_numpy(), scores[0, first["item"].to_numpy()])


@pytest.mark.parametrize("on_dask", [False, True], ids=["in-process", "dask"])
def test_a_query_side_scores_queries_against_item_vectors(client: Client, on_dask: bool) -> None:
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((40, 6)).astype(np.float32)
    queries = rng.standard_normal((40, 6)).astype(np.float32)  # a model's query head: a different map
    scores = queries @ emb.T
    np.fill_diagonal(scores, -np.inf)
    frame = top_k_items(emb, RecommendConfig(k=5, query_block=9, item_chunk=7), client=client if on_dask else None,
                        query_embeddings=queries)
    assert as_lists(frame, np.arange(40)) == brute_force(scores, 5)
    with pytest.raises(ValueError, match="differ in shape"):
        top_k_items(emb, RecommendConfig(k=5), query_embeddings=queries[:, :3])


def test_same_result_on_one_and_two_workers_and_in_process(client: Client, tmp_path: Path) -> None:
    emb = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)  # from a file: each worker memory-maps it
    cfg = RecommendConfig(k=10, query_block=64, item_chunk=100)
    local = top_k_items(emb, cfg)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as one:
        pd.testing.assert_frame_equal(top_k_items(tmp_path / "e.npy", cfg, client=one), local)
    pd.testing.assert_frame_equal(top_k_items(tmp_path / "e.npy", cfg, client=client), local)


@pytest.mark.parametrize("mode", ["last", "recent_sum", "recent_mean"])
def test_user_to_item_equals_brute_force_and_never_recommends_seen(client: Client, tmp_path: Path, mode: str) -> None:
    write_run(tmp_path)
    hist = read_histories(tmp_path, ("train",))
    emb = tie_embeddings()
    cfg = RecommendConfig(k=5, user_mode=mode, recent=2, query_block=2, item_chunk=8)  # type: ignore[arg-type]
    frame = top_k_users(emb, hist, cfg, client=client)
    want = expected_users(emb, hist, 5, mode, recent=2)
    want[1] = []  # no training history: no recommendations
    assert as_lists(frame, np.arange(hist.n_users)) == want
    seen = set(zip(*hist.rows(np.arange(hist.n_users)), strict=True))
    assert not any((u, i) in seen for u, i in zip(frame["query"], frame["item"], strict=True))
    assert len(want[2]) == 3  # user 2 saw all but three items: three recommendations, not five


def test_stage_writes_parquet_and_report_and_is_resumable(client: Client, tmp_path: Path) -> None:
    write_run(tmp_path)
    cfg = RecommendConfig(k=4, query_block=8, item_chunk=16)
    out = recommend(tmp_path, cfg, client)
    spans = client.cluster.scheduler.extensions["spans"].spans.values()  # type: ignore[union-attr]
    assert any(span.name == ("recommend",) for span in spans)  # the tasks are tagged on the dashboard
    report = read_report(tmp_path)
    assert report["n_items"] == N_ITEMS and report["dim"] == DIM
    assert report["embeddings"] == str(tmp_path / "train" / "embeddings.npy")
    assert report["items"]["queries"] == N_ITEMS and report["items"]["rows"] == 4 * N_ITEMS
    assert report["users"]["users_without_history"] == 1 and report["users"]["n_users"] == 5
    assert report["users"]["queries"] == 4 and report["users"]["queries_with_fewer_than_k"] == 1
    items = read_recommendations(tmp_path, "items")
    emb = tie_embeddings()
    scores = emb @ emb.T
    np.fill_diagonal(scores, -np.inf)
    assert as_lists(items, np.arange(N_ITEMS)) == brute_force(scores, 4)
    users = read_recommendations(tmp_path, "users")
    assert 1 not in set(users["query"])
    assert str(users["item"].dtype) == "int64" and str(users["score"].dtype) == "float32"
    again = recommend(tmp_path, cfg, client)
    assert again.reused and again.key == out.key


def test_infer_embeddings_are_preferred_and_parquet_is_read(client: Client, tmp_path: Path) -> None:
    write_run(tmp_path)
    infer = tie_embeddings(seed=11)
    (tmp_path / "infer").mkdir()
    np.save(tmp_path / "infer" / "embeddings.npy", infer)
    recommend(tmp_path, RecommendConfig(k=3, targets=("items",)), client)
    assert read_report(tmp_path)["embeddings"] == str(tmp_path / "infer" / "embeddings.npy")
    from_npy = read_recommendations(tmp_path, "items")
    order = np.random.default_rng(0).permutation(N_ITEMS)  # rows in any order, matched by item id
    pd.DataFrame({"item": order, "embedding": list(infer[order])}).to_parquet(tmp_path / "emb.parquet")
    recommend(tmp_path, RecommendConfig(k=3, targets=("items",), embeddings_path=str(tmp_path / "emb.parquet")),
              client)
    pd.testing.assert_frame_equal(read_recommendations(tmp_path, "items"), from_npy)
    parts = tmp_path / "infer_parts"  # the infer stage's layout: a folder of parts, fixed-size vector lists
    parts.mkdir()
    for b, chunk in enumerate(np.array_split(order, 3)):
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(infer[chunk].reshape(-1)), DIM)
        pq.write_table(pa.table({"item": pa.array(chunk, pa.int64()), "embedding": vectors}),
                       parts / f"part-{b:05d}.parquet")
    pd.testing.assert_frame_equal(top_k_items(parts, RecommendConfig(k=3)), from_npy)


def test_flat_index_recall_is_one_and_ivf_recall_reported(client: Client, tmp_path: Path) -> None:
    emb = np.random.default_rng(5).standard_normal((N_ITEMS, 8)).astype(np.float32)  # no ties
    write_run(tmp_path, emb)
    out = recommend(tmp_path, RecommendConfig(k=5, index="flat", recall_queries=1000), client)
    report = read_report(tmp_path)
    assert report["items"]["recall"]["recall@5"] == 1.0 and report["items"]["recall"]["sample_queries"] == N_ITEMS
    assert report["users"]["recall"]["recall@5"] == 1.0 and report["users"]["recall"]["sample_queries"] == 4
    assert out.report["items"]["recall"] == 1.0
    exact = top_k_items(emb, RecommendConfig(k=5))
    pd.testing.assert_frame_equal(read_recommendations(tmp_path, "items")[["query", "rank", "item"]],
                                  exact[["query", "rank", "item"]])
    recommend(tmp_path, RecommendConfig(k=5, index="ivf", nlist=8, nprobe=1, recall_queries=20, targets=("items",)),
              client)
    recall = read_report(tmp_path)["items"]["recall"]
    assert recall["sample_queries"] == 20 and 0.0 < recall["recall@5"] <= 1.0


def test_errors_name_the_problem(client: Client, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recommend\.k=0"):
        RecommendConfig(k=0)
    emb = tie_embeddings()
    with pytest.raises(ValueError, match="k=50: larger than the catalogue of 49"):
        top_k_items(emb, RecommendConfig(k=50))
    with pytest.raises(FileNotFoundError, match=r"no embeddings in .*: looked for .*infer/embeddings\.npy"):
        recommend(tmp_path, RecommendConfig(targets=("items",)), client)
    with pytest.raises(FileNotFoundError, match=r"missing\.npy: no such file"):
        recommend(tmp_path, RecommendConfig(embeddings_path=str(tmp_path / "missing.npy")), client)
    write_run(tmp_path, tie_embeddings(n=20))  # the training histories hold item ids up to 46
    with pytest.raises(ValueError, match="item id 46 but the embeddings have only 20 rows"):
        recommend(tmp_path, RecommendConfig(), client)
    np.save(tmp_path / "flat.npy", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match=r"shape \(10,\); expected \(n_items, D\)"):
        top_k_items(tmp_path / "flat.npy")
    pd.DataFrame({"item": [0, 1], "embedding": [[1.0, 2.0], [1.0]]}).to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="different lengths"):
        top_k_items(tmp_path / "ragged.parquet")
    other = build_index(np.ones((N_ITEMS, DIM + 1), np.float32), IndexSpec(kind="flat"))
    with pytest.raises(ValueError, match=r"index holds 50 vectors of D=4 but the embeddings are \(50, 3\)"):
        top_k_items(emb, index=other)
    nan = tie_embeddings()
    nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        top_k_items(nan)


def test_cli_writes_recommendations_and_reports_errors_in_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path)
    args = ["recommend", "--run-dir", str(tmp_path), "--workers", "1", "--dashboard-address", "127.0.0.1:0"]
    assert main([*args, "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "pinsage recommend: done" in out and "items: 50 queries" in out
    assert json.loads((tmp_path / "recommend" / REPORT).read_text())["config"]["k"] == 3
    assert main([*args, "--k", "3", "--embeddings", str(tmp_path / "nope.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.npy: no such file" in err[0]
