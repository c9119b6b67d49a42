"""The ``recommend`` stage: top-K items for every item (item→item) and every user (user→item), on Dask.

Exact by default: one Dask task per block of ``query_block`` queries multiplies the block with the item matrix
``item_chunk`` items at a time and keeps a running top-K (:mod:`gnn.topk`); the client merges the blocks in query
order into the output. **Ties**: higher score first, equal scores by lower item id. **Excluded**: the query item
itself (item→item) and every item of the user's history (user→item) are never recommended. **User query**: the
vector of the user's latest history item (``user_mode="last"``, as the evaluate stage scores users), or the sum /
mean of their latest ``recent`` items; the history is the split files in ``history`` (default the training split).
**Users without history** get no recommendations (no rows) and are counted in the report. Scores are dot products
of the embeddings as stored (cosine when the model wrote unit vectors).

``index="ivf" | "hnsw" | "flat"`` uses a faiss index instead (``pip install -e ".[ann]"``); its recall@K against
the exact result on a seeded sample of ``recall_queries`` queries of each target is in the report.

Embeddings: ``embeddings_path`` (``.npy`` of shape (n_items, D), row i = item id i, or a parquet of the infer
stage with an ``item`` column and one vector column), else ``<run>/infer/embeddings.npy``, else
``<run>/train/embeddings.npy``. Writes ``<run>/recommend/{items,users}.parquet`` (query, rank, item, score; rank
1 = best) and ``report.json``. Run: ``pinsage recommend --run-dir R --k 10``. From Python:
:func:`top_k_items`, :func:`top_k_users` (DataFrames, with or without a Dask client), :func:`recommend` (the
stage) and :func:`read_recommendations`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from gnn.ann import IndexSpec, ann_block_topk, build_index, deserialize, recall_at_k, serialize
from gnn.baselines import Histories
from gnn.topk import DEFAULT_CHUNK, NO_ITEM, TopK, UserMode, block_topk, check_k, item_queries, user_queries
from pipeline.cluster import cluster_client
from pipeline.common import add_arguments, add_common_arguments, cluster_config, from_sources, settings
from pipeline.config import check
from pipeline.progress import stage_span, track
from pipeline.rundir import StageOutput, read_stage, run_stage, write_json_atomic
from pipeline.schema import EMBEDDINGS_NPY, query_embeddings_beside

log = logging.getLogger(__name__)

STAGE = "recommend"
REPORT = "report.json"
TARGETS = ("items", "users")
SPLITS = ("train", "valid", "test")
EMBEDDING_CANDIDATES = (Path("infer") / EMBEDDINGS_NPY, Path("train") / EMBEDDINGS_NPY)  # in this order
COLUMNS = ("query", "rank", "item", "score")
Index = Literal["exact", "flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class RecommendConfig:
    """Settings of the recommend stage (TOML section ``[recommend]``)."""

    k: int = field(default=10, metadata={"help": "recommendations per item and per user"})
    targets: tuple[str, ...] = field(default=TARGETS, metadata={
        "help": "what to recommend for: items (item→item), users (user→item)"})
    user_mode: UserMode = field(default="last", metadata={
        "help": "user query: latest history item, or sum / mean of the latest `recent` items"})
    recent: int = field(default=10, metadata={"help": "history items used by the recent_* user modes"})
    history: tuple[str, ...] = field(default=("train",), metadata={
        "help": "split files forming each user's history (their query and the excluded seen items)"})
    embeddings_path: str | None = field(default=None, metadata={
        "help": "item embeddings (.npy (n_items, D) or the infer stage's parquet); default "
                "<run>/infer/embeddings.npy, else <run>/train/embeddings.npy"})
    query_block: int = field(default=1024, metadata={"help": "queries per Dask task"})
    item_chunk: int = field(default=DEFAULT_CHUNK, metadata={
        "help": "items scored at once inside a task (a cache-sized (query_block, item_chunk) score block)"})
    index: Index = field(default="exact", metadata={
        "help": "exact (blockwise matrix product) or a faiss index: flat, ivf, hnsw"})
    nlist: int | None = field(default=None, metadata={"help": "IVF cells; none = round(sqrt(n_items))"})
    nprobe: int = field(default=32, metadata={"help": "IVF cells searched per query"})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW links per item"})
    ef_search: int = field(default=128, metadata={"help": "HNSW candidates per query"})
    recall_queries: int = field(default=2000, metadata={
        "help": "queries per target (seeded sample) on which an approximate index is checked against exact"})
    seed: int = field(default=0, metadata={"help": "seed of the recall sample and of the IVF training"})

    def __post_init__(self) -> None:
        check(self.k >= 1, "recommend.k", self.k, "pass a positive number of recommendations, e.g. 10")
        check(len(self.targets) > 0 and all(t in TARGETS for t in self.targets), "recommend.targets", self.targets,
              f"choose among {', '.join(TARGETS)}")
        check(self.recent >= 1, "recommend.recent", self.recent, "pass 1 or more")
        check(len(self.history) > 0 and all(h in SPLITS for h in self.history), "recommend.history",
              self.history, f"choose among {', '.join(SPLITS)}")
        check(self.query_block >= 1, "recommend.query_block", self.query_block, "pass a positive block size")
        check(self.item_chunk >= 1, "recommend.item_chunk", self.item_chunk, "pass a positive chunk size")
        check(self.nlist is None or self.nlist >= 1, "recommend.nlist", self.nlist, "pass a positive count or none")
        for name in ("nprobe", "hnsw_m", "ef_search"):
            check(getattr(self, name) >= 1, f"recommend.{name}", getattr(self, name), "pass 1 or more")
        check(self.recall_queries >= 1, "recommend.recall_queries", self.recall_queries, "pass 1 or more")

    def index_spec(self) -> IndexSpec:
        if self.index == "exact":
            raise ValueError("index='exact' has no faiss index")
        return IndexSpec(kind=self.index, nlist=self.nlist, nprobe=self.nprobe, hnsw_m=self.hnsw_m,
                         ef_search=self.ef_search)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


def _check_matrix(matrix: np.ndarray, where: str) -> np.ndarray:
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"{where}: embeddings have shape {matrix.shape}; expected (n_items, D) with one row per "
                         "contiguous item id")
    if not np.issubdtype(matrix.dtype, np.floating):
        raise ValueError(f"{where}: embeddings have dtype {matrix.dtype}; write float32 vectors")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where}: embeddings contain NaN or inf; check the stage that wrote them")
    return matrix


def _parquet_matrix(path: Path) -> np.ndarray:
    table = pq.read_table(path)
    if "item" not in table.column_names:
        raise ValueError(f"{path}: no 'item' column; the infer stage writes (item, vector) rows")
    items = table.column("item").to_numpy().astype(np.int64)
    rest = [c for c in table.column_names if c != "item"]
    lists = [c for c in rest if pa.types.is_list(table.schema.field(c).type)
             or pa.types.is_fixed_size_list(table.schema.field(c).type)
             or pa.types.is_large_list(table.schema.field(c).type)]
    if len(lists) == 1:
        column = table.column(lists[0]).combine_chunks()
        lengths = column.value_lengths().to_numpy(zero_copy_only=False) if len(column) else np.zeros(0)
        if len(column) and (lengths.min() != lengths.max()):
            raise ValueError(f"{path}: vectors in column {lists[0]!r} have different lengths "
                             f"({lengths.min()}..{lengths.max()}); every item needs a D-long vector")
        dim = int(lengths[0]) if len(column) else 0
        vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)
    elif not lists and rest:
        vectors = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in rest], axis=1)
    else:
        raise ValueError(f"{path}: expected an 'item' column and one vector (list) column, found {table.column_names}")
    n = items.shape[0]
    if n == 0 or items.min() != 0 or items.max() != n - 1 or np.unique(items).shape[0] != n:
        raise ValueError(f"{path}: item ids must be 0..n-1 exactly once each (found {n} rows, ids "
                         f"{items.min() if n else '-'}..{items.max() if n else '-'}); write one row per item")
    matrix = np.empty_like(vectors, dtype=np.float32)
    matrix[items] = vectors
    return matrix


def load_item_embeddings(path: str | Path) -> np.ndarray:
    """The (n_items, D) float32 matrix at ``path`` (``.npy`` memory-mapped, or parquet with item + vector)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"embeddings {p}: no such file; run `pinsage infer` (or train), or pass "
                                "--embeddings PATH (.npy or parquet)")
    if p.suffix == ".npy":
        matrix = np.load(p, mmap_mode="c", allow_pickle=False)
    elif p.suffix == ".parquet" or p.is_dir():
        matrix = _parquet_matrix(p)
    else:
        raise ValueError(f"embeddings {p}: unknown format {p.suffix!r}; pass a .npy or .parquet file")
    return _check_matrix(matrix, str(p))


def embeddings_path(run_dir: str | Path, cfg: RecommendConfig) -> Path:
    """Where the stage reads embeddings: the setting, else the infer output, else the train output (it exists)."""
    run = Path(run_dir)
    if cfg.embeddings_path:
        if not Path(cfg.embeddings_path).exists():
            raise FileNotFoundError(f"embeddings_path={cfg.embeddings_path}: no such file; pass an (n_items, D) .npy "
                                    "or the infer stage's parquet")
        return Path(cfg.embeddings_path)
    for rel in EMBEDDING_CANDIDATES:
        if (run / rel).is_file():
            return run / rel
    looked = " and ".join(str(run / r) for r in EMBEDDING_CANDIDATES)
    raise FileNotFoundError(f"no embeddings in {run}: looked for {looked}; run `pinsage infer` or pass "
                            "--embeddings PATH")


# A worker process memory-maps a .npy once per (path, size, mtime) and shares it across tasks.
_MATRICES: dict[tuple[str, int, int], np.ndarray] = {}
_INDEXES: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()

Source = str | np.ndarray  # a .npy path (memory-mapped where the task runs) or the matrix itself


def _matrix(source: Source) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    st = os.stat(source)
    key = (source, st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        if key not in _MATRICES:
            _MATRICES.clear()
            _MATRICES[key] = np.load(source, mmap_mode="c", allow_pickle=False)
        return _MATRICES[key]


def _index(token: str, blob: np.ndarray) -> Any:
    with _CACHE_LOCK:
        if token not in _INDEXES:
            _INDEXES.clear()
            _INDEXES[token] = deserialize(blob)
        return _INDEXES[token]


# ---------------------------------------------------------------------------------------------------------------
# Query blocks and the per-block task


@dataclass(frozen=True)
class QueryBlock:
    """One task's queries: item ids (``history`` None) or user ids with their histories (CSR of B users)."""

    ids: np.ndarray  # (B,) int64
    history: Histories | None = None


@dataclass(frozen=True)
class Search:
    """How a block is searched: exact (``index_token`` None) or with the faiss index shipped as ``index_blob``."""

    k: int
    item_chunk: int = DEFAULT_CHUNK
    user_mode: UserMode = "last"
    recent: int = 10
    index_token: str | None = None
    threads: int | None = None


def _block_task(source: Source, block: QueryBlock, search: Search, index_blob: np.ndarray | None = None,
                query_source: Source | None = None) -> tuple[np.ndarray, TopK]:
    """Top-K of one query block on a worker. Returns the block's query ids and (B, K) results.

    ``query_source``: the query side of a model with a query head (same shape as ``source``); queries are read
    from it, candidates from ``source``. Default: both from ``source``."""
    import torch

    if search.threads:
        torch.set_num_threads(search.threads)
    matrix = _matrix(source)
    query_matrix = matrix if query_source is None else _matrix(query_source)
    if block.history is None:
        queries, exclude = item_queries(query_matrix, block.ids)
    else:
        queries, exclude = user_queries(query_matrix, block.history, user_mode=search.user_mode,
                                        recent=search.recent)
    if search.index_token is None:
        return block.ids, block_topk(queries, matrix, search.k, exclude=exclude, chunk=search.item_chunk)
    if index_blob is None:
        raise ValueError(f"search {search.index_token}: the faiss index was not shipped with the task")
    index = _index(search.index_token, index_blob)
    if search.threads:
        from gnn.ann import import_faiss

        import_faiss().omp_set_num_threads(search.threads)
    return block.ids, ann_block_topk(index, queries, search.k, exclude=exclude)


def item_blocks(items: np.ndarray, size: int) -> list[QueryBlock]:
    return [QueryBlock(items[lo:lo + size]) for lo in range(0, items.shape[0], size)]


def user_blocks(history: Histories, users: np.ndarray, size: int) -> list[QueryBlock]:
    """Blocks of users that have history; each carries only its users' history rows."""
    blocks = []
    for lo in range(0, users.shape[0], size):
        ids = users[lo:lo + size]
        row, item = history.rows(ids)
        indptr = np.zeros(ids.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=ids.shape[0]), out=indptr[1:])
        blocks.append(QueryBlock(ids, Histories(indptr, item, history.n_items)))
    return blocks


def _search_blocks(blocks: list[QueryBlock], source: Source, search: Search, *, client: Client | None,
                   index_blob: np.ndarray | None = None, label: str = STAGE, progress: bool = True,
                   query_source: Source | None = None) -> Iterator[tuple[np.ndarray, TopK]]:
    """Results of every block, yielded in block order (on Dask when ``client`` is given, else in process)."""
    if client is None:
        for block in blocks:
            yield _block_task(source, block, search, index_blob, query_source)
        return
    threads = search.threads or min(client.nthreads().values(), default=1)
    search = dataclasses.replace(search, threads=threads)
    shared: dict[str, Any] = {}
    if isinstance(source, np.ndarray):  # in-memory matrix: one copy per worker, not one per task
        shared["source"] = client.scatter(source, broadcast=True, hash=False)
    if index_blob is not None:
        shared["index_blob"] = client.scatter(index_blob, broadcast=True, hash=False)
    if isinstance(query_source, np.ndarray):
        shared["query_source"] = client.scatter(query_source, broadcast=True, hash=False)
    with stage_span(STAGE):  # tags the tasks on the dashboard; annotations are read when they are submitted
        futures = [client.submit(_block_task, shared.get("source", source), block, search,
                                 shared.get("index_blob"), shared.get("query_source", query_source), pure=False)
                   for block in blocks]
    position = {f.key: i for i, f in enumerate(futures)}
    ready: dict[int, tuple[np.ndarray, TopK]] = {}
    next_out = 0
    try:
        done = track(futures, label, loop=client.loop) if progress else iter(futures)
        for fut in done:
            ready[position[fut.key]] = fut.result()
            fut.release()
            while next_out in ready:
                yield ready.pop(next_out)
                next_out += 1
    finally:
        for fut in futures:
            fut.release()


def _frame(ids: np.ndarray, top: TopK) -> pd.DataFrame:
    """Long format: one row per (query, rank) with a real item; rank 1 = best."""
    valid = top.items != NO_ITEM  # (B, K)
    rank = np.broadcast_to(np.arange(1, top.k + 1, dtype=np.int32), top.items.shape)
    query = np.broadcast_to(ids[:, None], top.items.shape)
    return pd.DataFrame({"query": query[valid].astype(np.int64), "rank": rank[valid],
                         "item": top.items[valid], "score": top.scores[valid].astype(np.float32)})


# ---------------------------------------------------------------------------------------------------------------
# Python API


def _prepare(embeddings: np.ndarray | str | Path) -> tuple[Source, np.ndarray]:
    if isinstance(embeddings, np.ndarray):
        matrix = _check_matrix(np.ascontiguousarray(embeddings, dtype=np.float32), "embeddings")
        return matrix, matrix
    path = Path(embeddings)
    matrix = load_item_embeddings(path)
    return (str(path.resolve()), matrix) if path.suffix == ".npy" else (matrix, matrix)


def _search(cfg: RecommendConfig, matrix: np.ndarray, index_blob: np.ndarray | None) -> Search:
    k = check_k(cfg.k, matrix.shape[0])
    token = None if index_blob is None else f"{cfg.index}-{time.time_ns()}-{id(index_blob)}"
    return Search(k=k, item_chunk=cfg.item_chunk, user_mode=cfg.user_mode, recent=cfg.recent, index_token=token)


def _index_blob(cfg: RecommendConfig, matrix: np.ndarray, index: Any = None) -> np.ndarray | None:
    if index is not None:
        if int(index.ntotal) != matrix.shape[0] or int(index.d) != matrix.shape[1]:
            raise ValueError(f"index holds {index.ntotal} vectors of D={index.d} but the embeddings are "
                             f"{matrix.shape}: build the index from the same embeddings")
        return serialize(index)
    if cfg.index == "exact":
        return None
    started = time.perf_counter()
    blob = serialize(build_index(matrix, cfg.index_spec(), seed=cfg.seed))
    log.info("recommend: %s index of %d items built in %.1fs", cfg.index, matrix.shape[0],
             time.perf_counter() - started)
    return blob


def _collect(results: Iterator[tuple[np.ndarray, TopK]]) -> pd.DataFrame:
    frames = [_frame(ids, top) for ids, top in results]
    if not frames:
        return pd.DataFrame({"query": np.zeros(0, np.int64), "rank": np.zeros(0, np.int32),
                             "item": np.zeros(0, np.int64), "score": np.zeros(0, np.float32)})
    return pd.concat(frames, ignore_index=True)


def _ids(ids: np.ndarray | None, n: int, what: str) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    out = np.asarray(ids, dtype=np.int64)
    if out.ndim != 1 or (out.size and (out.min() < 0 or out.max() >= n)):
        raise ValueError(f"{what} must be a 1-d array of ids in [0, {n})")
    return out


def top_k_items(embeddings: np.ndarray | str | Path, cfg: RecommendConfig | None = None, *,
                client: Client | None = None, items: np.ndarray | None = None, progress: bool = False,
                index: Any = None, query_embeddings: np.ndarray | str | Path | None = None) -> pd.DataFrame:
    """Item→item: the K nearest items of every item (or of ``items``), the item itself excluded.

    ``client`` None runs in this process; otherwise one task per query block. ``index``: a faiss index built
    with :func:`gnn.ann.build_index` from the same embeddings, used instead of ``cfg.index`` (build once, query
    many times). Columns: query, rank, item, score.
    """
    cfg = cfg or RecommendConfig()
    source, matrix = _prepare(embeddings)
    blob = _index_blob(cfg, matrix, index)
    search = _search(cfg, matrix, blob)
    if matrix.shape[0] < 2:
        raise ValueError(f"item→item needs at least 2 items; the embeddings hold {matrix.shape[0]}")
    search = dataclasses.replace(search, k=check_k(search.k, matrix.shape[0] - 1))
    blocks = item_blocks(_ids(items, matrix.shape[0], "items"), cfg.query_block)
    return _collect(_search_blocks(blocks, source, search, client=client, index_blob=blob, progress=progress,
                                   query_source=_query_side(query_embeddings, matrix)))


def top_k_users(embeddings: np.ndarray | str | Path, history: Histories, cfg: RecommendConfig | None = None, *,
                client: Client | None = None, users: np.ndarray | None = None, progress: bool = False,
                index: Any = None, query_embeddings: np.ndarray | str | Path | None = None) -> pd.DataFrame:
    """User→item: the K best unseen items of every user with history (or of ``users``); see the module doc.

    Users without history get no rows. Columns: query (the user id), rank, item, score.
    """
    cfg = cfg or RecommendConfig()
    source, matrix = _prepare(embeddings)
    _check_history(history, matrix)
    blob = _index_blob(cfg, matrix, index)
    search = _search(cfg, matrix, blob)
    chosen = _ids(users, history.n_users, "users")
    blocks = user_blocks(history, chosen[history.lengths(chosen) > 0], cfg.query_block)
    return _collect(_search_blocks(blocks, source, search, client=client, index_blob=blob, progress=progress,
                                   query_source=_query_side(query_embeddings, matrix)))


def _query_side(query_embeddings: np.ndarray | str | Path | None, matrix: np.ndarray) -> Source | None:
    """The query side as a task source (None: the embeddings themselves); its shape must equal the matrix's."""
    if query_embeddings is None:
        return None
    source, queries = _prepare(query_embeddings)
    if queries.shape != matrix.shape:
        raise ValueError(f"query embeddings {queries.shape} and item embeddings {matrix.shape} differ in shape: "
                         "pass the query side written with the same embeddings (query_embeddings.npy)")
    return source


def _check_history(history: Histories, matrix: np.ndarray) -> None:
    if history.items.size and int(history.items.max()) >= matrix.shape[0]:
        raise ValueError(f"the user histories hold item id {int(history.items.max())} but the embeddings have only "
                         f"{matrix.shape[0]} rows: use embeddings of the same run (one row per item id)")


# ---------------------------------------------------------------------------------------------------------------
# The stage


def read_histories(run_dir: str | Path, splits: tuple[str, ...]) -> Histories:
    """Users' histories from the split files ``splits`` of the run; user ids span every split file."""
    split = read_stage(run_dir, "split")
    tables = {}
    for name in SPLITS:
        path = split.path / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: re-run `pinsage split` for this run directory")
        cols = ["user", "item", "ts", "line"] if name in splits else ["user", "item"]
        tables[name] = pd.read_parquet(path, columns=cols)
    n_users = max((int(t["user"].max()) + 1 for t in tables.values() if len(t)), default=0)
    n_items = max((int(t["item"].max()) + 1 for t in tables.values() if len(t)), default=0)
    seen = pd.concat([tables[s] for s in splits], ignore_index=True)
    return Histories.from_interactions(seen, n_users=n_users, n_items=n_items)


class _ParquetSink:
    """Appends result blocks to ``path`` as they arrive (in query order); counts rows and queries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.schema = pa.schema([("query", pa.int64()), ("rank", pa.int32()), ("item", pa.int64()),
                                 ("score", pa.float32())])
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows = 0
        self.queries = 0
        self.short = 0  # queries with fewer than K results

    def add(self, ids: np.ndarray, top: TopK) -> None:
        frame = _frame(ids, top)
        self.writer.write_table(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
        self.rows += len(frame)
        self.queries += ids.shape[0]
        self.short += int((top.counts() < top.k).sum())

    def close(self) -> None:
        self.writer.close()


def _write_target(out: Path, blocks: list[QueryBlock], source: Source, search: Search, client: Client | None,
                  blob: np.ndarray | None, label: str, query_source: Source | None = None) -> dict[str, Any]:
    sink = _ParquetSink(out)
    started = time.perf_counter()
    try:
        for ids, top in _search_blocks(blocks, source, search, client=client, index_blob=blob, label=label,
                                       query_source=query_source):
            sink.add(ids, top)
    finally:
        sink.close()
    seconds = time.perf_counter() - started
    return {"queries": sink.queries, "rows": sink.rows, "queries_with_fewer_than_k": sink.short,
            "seconds": round(seconds, 3), "queries_per_s": round(sink.queries / seconds, 1) if seconds > 0 else None}


def _recall(make_blocks: Callable[[np.ndarray], list[QueryBlock]], ids: np.ndarray, source: Source,
            search: Search, client: Client | None, blob: np.ndarray, n: int, seed: int, label: str,
            query_source: Source | None = None) -> dict[str, Any]:
    """Recall@K of the index against the exact search on a seeded sample of ``n`` of the query ``ids``."""
    pick = np.sort(np.random.default_rng(seed).choice(ids.shape[0], size=min(n, ids.shape[0]), replace=False))
    sample = make_blocks(ids[pick])
    t0 = time.perf_counter()
    exact = [top.items for _, top in _search_blocks(sample, source, dataclasses.replace(search, index_token=None),
                                                     client=client, label=f"{label} exact",
                                                     query_source=query_source)]
    t1 = time.perf_counter()
    approx = [top.items for _, top in _search_blocks(sample, source, search, client=client, index_blob=blob,
                                                      label=f"{label} ann", query_source=query_source)]
    t2 = time.perf_counter()
    e = np.concatenate(exact) if exact else np.zeros((0, search.k), np.int64)
    a = np.concatenate(approx) if approx else np.zeros((0, search.k), np.int64)
    return {f"recall@{search.k}": recall_at_k(a, e), "sample_queries": int(e.shape[0]),
            "exact_seconds": round(t1 - t0, 3), "approx_seconds": round(t2 - t1, 3)}


def run_recommend(run_dir: str | Path, cfg: RecommendConfig, client: Client | None, out_dir: Path,
                  embeddings_file: Path) -> dict[str, Any]:
    """Compute every target of ``cfg`` into ``out_dir`` (parquet per target + report.json); the report."""
    started = time.perf_counter()
    source, matrix = _prepare(embeddings_file)
    n_items, dim = matrix.shape
    query_file = query_embeddings_beside(embeddings_file)
    query_source = _query_side(query_file, matrix)
    report: dict[str, Any] = {"embeddings": str(embeddings_file), "n_items": n_items, "dim": dim,
                              "query_embeddings": None if query_source is None else str(query_file),
                              "config": dataclasses.asdict(cfg), "index": cfg.index,
                              "ties": "higher score first, equal scores by lower item id",
                              "workers": len(client.nthreads()) if client is not None else 0}
    history = read_histories(run_dir, cfg.history) if "users" in cfg.targets else None
    if history is not None:
        _check_history(history, matrix)
    blob = None
    if cfg.index != "exact":
        t0 = time.perf_counter()
        blob = _index_blob(cfg, matrix)
        report["index_build_seconds"] = round(time.perf_counter() - t0, 3)
    search = _search(cfg, matrix, blob)
    if "items" in cfg.targets:
        if n_items < 2:
            raise ValueError(f"item→item needs at least 2 items; the embeddings hold {n_items}")
        s = dataclasses.replace(search, k=check_k(cfg.k, n_items - 1))
        blocks = item_blocks(np.arange(n_items, dtype=np.int64), cfg.query_block)
        report["items"] = _write_target(out_dir / "items.parquet", blocks, source, s, client, blob,
                                        "recommend items", query_source)
        if blob is not None:
            report["items"]["recall"] = _recall(
                lambda ids: item_blocks(ids, cfg.query_block), np.arange(n_items, dtype=np.int64), source, s,
                client, blob, cfg.recall_queries, cfg.seed, "recall items", query_source)
    if history is not None:
        lengths = history.lengths()
        users = np.flatnonzero(lengths > 0)
        blocks = user_blocks(history, users, cfg.query_block)
        part = _write_target(out_dir / "users.parquet", blocks, source, search, client, blob, "recommend users",
                             query_source)
        part["users_without_history"] = int((lengths == 0).sum())
        part["n_users"] = history.n_users
        if blob is not None and users.size:
            part["recall"] = _recall(lambda ids: user_blocks(history, ids, cfg.query_block), users, source,
                                     search, client, blob, cfg.recall_queries, cfg.seed, "recall users",
                                     query_source)
        report["users"] = part
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(out_dir / REPORT, report)
    return report


def recommend(run_dir: str | Path, cfg: RecommendConfig | None = None, client: Client | None = None, *,
              force: bool = False) -> StageOutput:
    """Run the recommend stage in ``run_dir`` (atomic, a no-op when current). ``client`` None: in process."""
    cfg = cfg or RecommendConfig()
    run = Path(run_dir)
    emb = embeddings_path(run, cfg)
    inputs: dict[str, StageOutput | str | Path] = {"embeddings": emb}
    query_file = query_embeddings_beside(emb)
    if query_file is not None:
        inputs["query_embeddings"] = query_file
    if "users" in cfg.targets:
        inputs["split"] = read_stage(run, "split")

    def build(tmp: Path) -> dict[str, Any]:
        report = run_recommend(run, cfg, client, tmp, emb)
        return _headline(report)

    return run_stage(run, STAGE, config=cfg, inputs=inputs, build=build, force=force)


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: report[k] for k in ("n_items", "dim", "index", "seconds", "embeddings")}
    for target in TARGETS:
        if target in report:
            part = report[target]
            out[target] = {k: part[k] for k in ("queries", "rows", "queries_per_s") if k in part}
            if "recall" in part:
                out[target]["recall"] = part["recall"][f"recall@{report['config']['k']}"]
    return out


def read_recommendations(run_dir: str | Path, target: str = "items") -> pd.DataFrame:
    """The recommendations of a finished stage: ``target`` "items" (item→item) or "users" (user→item)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: pass 'items' or 'users'")
    path = read_stage(run_dir, STAGE).path / f"{target}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the stage ran without target {target!r}; re-run with --targets {target}")
    return pd.read_parquet(path)


def read_report(run_dir: str | Path) -> dict[str, Any]:
    import json

    return dict(json.loads((read_stage(run_dir, STAGE).path / REPORT).read_text()))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(STAGE, help="top-K items for every item and every user (exact or faiss)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_arguments(parser, RecommendConfig)
    parser.add_argument("--embeddings", dest="RecommendConfig.embeddings_path", default=None, metavar="PATH",
                        help="short for --embeddings-path")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    toml = settings(args)
    cfg = from_sources(RecommendConfig, toml=toml, section=STAGE, args=args)
    embeddings_path(args.run_dir, cfg)  # before a cluster starts: missing embeddings are a one-line error
    with cluster_client(cluster_config(args, toml)) as (client, _backend):
        print(f"pinsage recommend: dashboard {client.dashboard_link}")
        try:
            out = recommend(args.run_dir, cfg, client, force=args.force)
        except ImportError as e:  # faiss missing for an approximate index: one line, with the fix
            raise ValueError(str(e)) from None
    rep = out.report
    state = "up to date" if out.reused else "done"
    parts = [f"{t}: {rep[t]['queries']} queries, {rep[t].get('queries_per_s')} /s"
             + (f", recall@{cfg.k} {rep[t]['recall']:.4f}" if "recall" in rep[t] else "")
             for t in TARGETS if t in rep]
    print(f"pinsage recommend: {state}: {out.path} ({'; '.join(parts)})")
    return 0

