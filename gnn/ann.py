"""Approximate top-K by inner product with a faiss index (optional: ``pip install -e ".[ann]"``); no Dask here.

Index kinds: ``flat`` (exact brute force inside faiss, the reference for the approximate ones), ``ivf``
(inverted lists over ``nlist`` k-means cells, ``nprobe`` of them searched per query) and ``hnsw`` (a graph of
``hnsw_m`` links per vertex, ``ef_search`` candidates per query). Results follow the tie rule of
:mod:`gnn.topk` among the candidates the index returned; excluded items are filtered out after the search,
which asks for K plus the most exclusions of any query of the block.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gnn.topk import NO_ITEM, TopK, check_k, order_by_rule

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is in the test extra
        raise ImportError("an approximate index needs faiss: pip install -e \".[ann]\" (faiss-cpu), "
                          "or use index='exact'") from e
    return faiss


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index and its search settings. ``nlist=None``: ``round(sqrt(N))`` cells."""

    kind: IndexKind = "ivf"
    nlist: int | None = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r}: pass one of {', '.join(INDEX_KINDS)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist={self.nlist}: pass a positive number of IVF cells or None")
        for name in ("nprobe", "hnsw_m", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: pass 1 or more")

    def cells(self, n_items: int) -> int:
        return max(1, min(n_items, self.nlist or round(math.sqrt(n_items))))


def build_index(item_matrix: np.ndarray, spec: IndexSpec, *, seed: int = 0) -> Any:
    """A faiss inner-product index over the rows of ``item_matrix`` (N, D); row i is item id i."""
    faiss = import_faiss()
    x = np.ascontiguousarray(item_matrix, dtype=np.float32)
    n, dim = x.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, spec.cells(n), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(spec.nprobe, spec.cells(n))
    else:
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = spec.ef_search
    index.add(x)
    return index


def serialize(index: Any) -> np.ndarray:
    """The index as a uint8 array (to ship to Dask workers)."""
    return np.asarray(import_faiss().serialize_index(index))


def deserialize(blob: np.ndarray) -> Any:
    return import_faiss().deserialize_index(np.asarray(blob, dtype=np.uint8))


def ann_block_topk(index: Any, queries: np.ndarray, k: int, *,
                   exclude: tuple[np.ndarray, np.ndarray] | None = None) -> TopK:
    """Approximate top-K for a block of query vectors; excluded (row, item) pairs never returned.

    Shapes: ``queries`` (B, D) -> ``TopK`` with (B, K) arrays (``NO_ITEM`` / ``-inf`` where the index found
    fewer than K candidates).
    """
    n_items = int(index.ntotal)
    k = check_k(k, n_items)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries have shape {queries.shape}; the index has D={index.d}: "
                         "query and item vectors must have the same dimension")
    n_rows = queries.shape[0]
    ex_rows, ex_items = exclude if exclude is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ex_rows, ex_items = np.asarray(ex_rows, np.int64), np.asarray(ex_items, np.int64)
    extra = int(np.bincount(ex_rows, minlength=n_rows).max()) if ex_rows.size else 0
    scores, items = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(n_items, k + extra))
    items = items.astype(np.int64)
    scores = scores.astype(np.float32)
    found = items >= 0
    if ex_rows.size:
        keys = np.arange(n_rows, dtype=np.int64)[:, None] * n_items + np.where(found, items, 0)
        found &= ~np.isin(keys, ex_rows * n_items + ex_items)
    items = np.where(found, items, NO_ITEM)
    scores = np.where(found, scores, np.float32(-np.inf)).astype(np.float32)
    items, scores = order_by_rule(items, scores)
    if items.shape[1] < k:
        pad = k - items.shape[1]
        items = np.concatenate([items, np.full((n_rows, pad), NO_ITEM, np.int64)], axis=1)
        scores = np.concatenate([scores, np.full((n_rows, pad), -np.inf, np.float32)], axis=1)
    return TopK(items[:, :k], scores[:, :k])


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (``NO_ITEM`` ignored); queries with no exact result skip.

    Shapes: ``approx`` (Q, K), ``exact`` (Q, K) item ids.
    """
    hits, sizes = [], []
    for a, e in zip(approx, exact, strict=True):
        e = e[e != NO_ITEM]
        if e.size:
            hits.append(np.isin(e, a[a != NO_ITEM]).sum())
            sizes.append(e.size)
    if not sizes:
        return float("nan")
    return float(np.mean(np.asarray(hits, np.float64) / np.asarray(sizes, np.float64)))
