"""The graph store: CSR arrays of the user-item graph, saved as ``.npy`` files and memory-mapped on load.

Written once by ``pinsage graph`` (pipeline/graph.py); read by every worker with :func:`load_graph_store`,
which memory-maps the arrays so that the operating system shares one copy between processes.

Layout of a store directory::

    graph.json                    format, version, sizes, array dtypes/shapes, behaviour weights
    user_items.{indptr,indices,weights,times}.npy   user -> item CSR, each row in time order
    item_users.{indptr,indices,weights,times}.npy   item -> user CSR, each row in time order
    item_category.npy  (n_items,) int64             category id of each item
    item_counts.npy    (n_items, 4) int64           interactions per behaviour (pv, fav, cart, buy)
    item_content.npy   (n_items, D) float32          optional dense content features
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

GRAPH_FORMAT = "pinsage-graph"
GRAPH_VERSION = 1
GRAPH_MANIFEST = "graph.json"
BEHAVIORS = ("pv", "fav", "cart", "buy")  # code 0..3, ordered by default weight


class GraphStoreError(ValueError):
    """The store on disk is missing, of another version, or inconsistent."""


@dataclass(frozen=True)
class CSR:
    """Compressed sparse rows with per-edge weight and time.

    Shapes: ``indptr`` (R+1,) int64; ``indices``, ``weights`` (float32), ``times`` (int64): (E,).
    Row ``r``'s edges are ``indices[indptr[r]:indptr[r+1]]``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    times: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def n_edges(self) -> int:
        return int(self.indices.shape[0])

    def degree(self) -> np.ndarray:
        """(R,) int64 number of edges of each row."""
        return np.diff(np.asarray(self.indptr))

    def row(self, r: int) -> np.ndarray:
        return np.asarray(self.indices[self.indptr[r] : self.indptr[r + 1]])

    def validate(self, name: str, n_cols: int) -> None:
        ip = np.asarray(self.indptr)
        if ip.ndim != 1 or ip.shape[0] < 1 or ip[0] != 0 or ip[-1] != self.indices.shape[0]:
            raise GraphStoreError(f"{name}: indptr must start at 0 and end at the number of edges")
        if np.any(np.diff(ip) < 0):
            raise GraphStoreError(f"{name}: indptr must be non-decreasing")
        for arr, what in ((self.weights, "weights"), (self.times, "times")):
            if arr.shape != self.indices.shape:
                raise GraphStoreError(f"{name}: {what} must have one entry per edge")
        if self.indices.shape[0] and (self.indices.min() < 0 or self.indices.max() >= n_cols):
            raise GraphStoreError(f"{name}: indices must lie in [0, {n_cols})")


@dataclass(frozen=True)
class GraphStore:
    """The bipartite user-item training graph and per-item features (see the module docstring)."""

    n_users: int
    n_items: int
    n_categories: int
    user_items: CSR
    item_users: CSR
    item_category: np.ndarray
    item_counts: np.ndarray
    item_content: np.ndarray | None = None
    behavior_weights: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    path: Path | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return self.user_items.n_edges

    def validate(self) -> None:
        self.user_items.validate("user_items", self.n_items)
        self.item_users.validate("item_users", self.n_users)
        if self.user_items.n_rows != self.n_users or self.item_users.n_rows != self.n_items:
            raise GraphStoreError("CSR row counts do not match n_users / n_items")
        if self.user_items.n_edges != self.item_users.n_edges:
            raise GraphStoreError("user_items and item_users hold different numbers of edges")
        if self.item_category.shape != (self.n_items,) or self.item_counts.shape != (self.n_items, 4):
            raise GraphStoreError("item_category must be (n_items,) and item_counts (n_items, 4)")
        if self.item_content is not None and self.item_content.shape[0] != self.n_items:
            raise GraphStoreError("item_content must have one row per item")


def csr_from_edges(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, times: np.ndarray, n_rows: int
) -> CSR:
    """Build a CSR with each row's edges ordered by (time, column): deterministic for any input order."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.lexsort((np.asarray(cols), np.asarray(times), rows))
    counts = np.bincount(rows, minlength=n_rows).astype(np.int64)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return CSR(
        indptr=indptr,
        indices=np.asarray(cols, dtype=np.int64)[order],
        weights=np.asarray(weights, dtype=np.float32)[order],
        times=np.asarray(times, dtype=np.int64)[order],
    )


def _arrays(store: GraphStore) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in ("user_items", "item_users"):
        csr: CSR = getattr(store, name)
        for part in ("indptr", "indices", "weights", "times"):
            arrays[f"{name}.{part}"] = np.asarray(getattr(csr, part))
    arrays["item_category"] = np.asarray(store.item_category, dtype=np.int64)
    arrays["item_counts"] = np.asarray(store.item_counts, dtype=np.int64)
    if store.item_content is not None:
        arrays["item_content"] = np.asarray(store.item_content, dtype=np.float32)
    return arrays


def write_graph_store(path: str | Path, store: GraphStore, *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``store`` into directory ``path`` (created); the manifest is written last."""
    store.validate()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(store)
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    manifest = {
        "format": GRAPH_FORMAT,
        "version": GRAPH_VERSION,
        "n_users": store.n_users,
        "n_items": store.n_items,
        "n_categories": store.n_categories,
        "n_edges": store.n_edges,
        "behavior_weights": list(store.behavior_weights),
        "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in arrays.items()},
        "meta": dict(meta or store.meta),
    }
    tmp = out / f".{GRAPH_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out / GRAPH_MANIFEST)
    return out


def load_graph_store(path: str | Path, *, mmap: bool = True) -> GraphStore:
    """Open a store written by :func:`write_graph_store`; arrays are memory-mapped read-only by default."""
    root = Path(path)
    mpath = root / GRAPH_MANIFEST
    if not mpath.is_file():
        raise GraphStoreError(f"{root}: no {GRAPH_MANIFEST}; build the graph store with `pinsage graph`")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != GRAPH_FORMAT or manifest.get("version") != GRAPH_VERSION:
        raise GraphStoreError(
            f"{root}: graph store format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"this code reads {GRAPH_FORMAT!r} version {GRAPH_VERSION}; rebuild it with `pinsage graph`"
        )
    mode: Literal["r"] | None = "r" if mmap else None

    def arr(name: str) -> np.ndarray:
        a = np.load(root / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
        spec = manifest["arrays"][name]
        if list(a.shape) != spec["shape"] or str(a.dtype) != spec["dtype"]:
            raise GraphStoreError(f"{root}/{name}.npy does not match {GRAPH_MANIFEST}; rebuild the store")
        return a

    def csr(name: str) -> CSR:
        return CSR(*(arr(f"{name}.{p}") for p in ("indptr", "indices", "weights", "times")))

    return GraphStore(
        n_users=int(manifest["n_users"]),
        n_items=int(manifest["n_items"]),
        n_categories=int(manifest["n_categories"]),
        user_items=csr("user_items"),
        item_users=csr("item_users"),
        item_category=arr("item_category"),
        item_counts=arr("item_counts"),
        item_content=arr("item_content") if "item_content" in manifest["arrays"] else None,
        behavior_weights=tuple(manifest["behavior_weights"]),
        path=root,
        meta=manifest.get("meta", {}),
    )
