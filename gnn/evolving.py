"""An evolving graph: new interactions enter the graph, the neighbourhoods and the importance while samplers read.

:class:`LiveGraph` holds the *current* :class:`GraphVersion` — an immutable bundle of the CSR graph store, the
PinSage neighbourhoods, the importance and the raw visit counts. Readers take ``live.current`` once per unit of
work (a minibatch) and use that snapshot; they never lock. One writer at a time (:meth:`LiveGraph.append`) logs
the update batch durably (:mod:`gnn.updatelog`), builds the next version next to the current one and publishes it
with a single reference assignment ``self._current = new``.

Why this is safe:

* **Publication is one reference store, a read is one reference load.** In CPython with the GIL a bytecode that
  stores or loads an object attribute runs without interruption, so a reader gets either the old or the new
  pointer, never a mixture. In free-threaded CPython (3.13t, PEP 703) attribute loads and stores of an instance
  are still atomic with respect to each other (the object's dict/inline values are updated under the object's
  per-object lock, and readers use the lock-free "optimistic" path that retries on a concurrent change), and
  the new object's reference count is made valid before the store, so the loaded pointer is a live object.
* **Published objects are immutable.** A version is a frozen dataclass whose numpy arrays are marked read-only and
  are completely written *before* the version object is created; nothing writes to them afterwards. So a reader
  that loaded the pointer sees complete arrays (in free-threaded builds the per-object lock release/acquire pair
  of the store and load orders the writes before the publication).
* **Readers keep a local reference.** A reader that holds ``v = live.current`` keeps ``v`` (and thus every array
  of it) alive for as long as it uses it, even after newer versions are published: no torn neighbour list, no index
  into an array of another version. An old version is reclaimed by reference counting when the last reader drops
  it (``weakref`` in the tests shows it); the writer keeps no list of old versions.

Incremental refresh (:func:`refresh`): walks use counter-based randomness (``gnn.walks``), so the walks from an item
are a function of the seed, the item and the rows the walks read. An update changes only the rows of its endpoint
users and items. The *touched* start items are therefore exactly those whose recorded walks leave (read the row of)
a changed vertex: a changed user anywhere on a walk, a changed item before a walk's last traversal, or the start
item itself; plus new items. The writer keeps every start's walk trace (items and users, int32) and an inverted
:class:`DepartureIndex` (vertex → starts whose walks leave it) to find them without scanning all walks, reruns the
walks of only those starts on the new graph, and replaces their neighbourhood rows and hard negatives. Raw visit
counts are updated by subtracting the touched starts' old traces and adding their new ones. Cost of an update: the
touched walks, plus copying the CSR arrays into the new version (memcpy of the unchanged runs: versions share
nothing, so that nothing a reader holds is ever written). With ``bias="uniform"``
the result is *identical* to a full recomputation (``compute_neighborhoods`` on the new graph), for touched and
untouched items and the importance alike; with ``bias="weight"`` an untouched walk can differ only where a
cumulative-weight comparison falls within float64 rounding of the row's offset (tests bound the rows that differ).

The writer's CPU: :class:`UpdateWriter` runs the refreshes on a background thread at a lower thread priority (nice,
Linux) and applies the batches that queued up meanwhile as one version (group commit), so samplers keep their cores
when the machine is busy and the writer keeps up with any arrival rate (at the price of fewer, larger versions).

Run: ``live = LiveGraph(store, WalkConfig(), log_path=run / "live" / "updates.log")``; ``live.append(batch)`` (or
``UpdateWriter(live).submit(batch)``); ``sampler = VersionedPinSageSampler(live, rows=table)``. ``pinsage update``
(pipeline/update.py) appends from the CLI; a serving process publishes those with ``live.catch_up()``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numba
import numpy as np

from cache.rows import RowBlock
from gnn.graphstore import CSR, GraphStore, csr_from_edges
from gnn.sampler import PinSageSampler, RowSource, Subgraph, WalkNeighbors
from gnn.updatelog import UpdateLog
from gnn.walks import Neighborhoods, WalkConfig, WalkGraph, _rank_batch, _walk_batch, normalise

log = logging.getLogger(__name__)

EdgeWeight = Literal["sum", "max"]
MAX_INDEX_DELTAS = 32  # refreshes between compactions of the departure index (or when its deltas reach 1/4 of it)


# ------------------------------------------------------------------------------------------------ update batches


@dataclass(frozen=True)
class InteractionBatch:
    """New interactions in contiguous ids, as logged and applied.

    Shapes: ``user``, ``item``, ``ts``, ``category`` (n,) int64; ``behavior`` (n,) int8 (0 pv .. 3 buy).
    ``n_users`` / ``n_items`` / ``n_categories``: sizes after the batch — ids from the previous sizes up are new
    (a new item gets the smallest ``category`` of its rows; an existing item keeps its category).
    ``raw``: optional arrays logged with the batch (e.g. the raw ids of new users and items, ``pinsage update``).
    """

    user: np.ndarray
    item: np.ndarray
    behavior: np.ndarray
    ts: np.ndarray
    category: np.ndarray
    n_users: int
    n_items: int
    n_categories: int
    raw: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, dtype in (("user", np.int64), ("item", np.int64), ("behavior", np.int8), ("ts", np.int64),
                            ("category", np.int64)):
            arr = np.asarray(getattr(self, name))
            if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
                raise ValueError(f"batch.{name} has shape {arr.shape}, dtype {arr.dtype}: pass a 1-d integer array")
            object.__setattr__(self, name, arr.astype(dtype, copy=False))
        n = self.user.shape[0]
        for name in ("item", "behavior", "ts", "category"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"batch.{name} has {getattr(self, name).shape[0]} entries for {n} users: one per row")
        for name, arr, bound in (("user", self.user, self.n_users), ("item", self.item, self.n_items),
                                 ("category", self.category, self.n_categories)):
            if n and (arr.min() < 0 or arr.max() >= bound):
                raise ValueError(f"batch.{name} ids must lie in [0, n_{name}s={bound}): got {arr.min()}..{arr.max()}")
        if n and (self.behavior.min() < 0 or self.behavior.max() > 3):
            raise ValueError("batch.behavior codes must lie in 0..3 (pv, fav, cart, buy)")

    @property
    def n_rows(self) -> int:
        return int(self.user.shape[0])

    def to_bytes(self) -> bytes:
        """The batch as an ``.npz`` payload (no pickles)."""
        arrays = {k: getattr(self, k) for k in ("user", "item", "behavior", "ts", "category")}
        arrays["sizes"] = np.array([self.n_users, self.n_items, self.n_categories], np.int64)
        arrays.update({f"raw.{k}": np.asarray(v) for k, v in self.raw.items()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, payload: bytes) -> InteractionBatch:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            sizes = z["sizes"]
            return cls(z["user"], z["item"], z["behavior"], z["ts"], z["category"], int(sizes[0]), int(sizes[1]),
                       int(sizes[2]), raw={k[4:]: z[k] for k in z.files if k.startswith("raw.")})


def aggregate_pairs(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, times: np.ndarray,
                    how: EdgeWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One edge per distinct (row, col): weight ``how`` (sum or max), latest time. Shapes (n,) x4 -> (m,) x4."""
    if rows.shape[0] == 0:
        return rows, cols, weights.astype(np.float32), times
    order = np.lexsort((cols, rows))
    r, c, w, t = rows[order], cols[order], weights[order].astype(np.float32), times[order]
    first = np.ones(r.shape[0], bool)
    first[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    starts = np.flatnonzero(first)
    agg = np.add.reduceat(w, starts) if how == "sum" else np.maximum.reduceat(w, starts)
    return r[starts], c[starts], agg.astype(np.float32), np.maximum.reduceat(t, starts)


def build_store(*, n_users: int, n_items: int, n_categories: int, user: np.ndarray, item: np.ndarray,
                behavior: np.ndarray, ts: np.ndarray, item_category: np.ndarray,
                behavior_weights: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0), edge_weight: EdgeWeight = "sum",
                item_content: np.ndarray | None = None) -> GraphStore:
    """The graph store of all ``(user, item, behavior, ts)`` interactions at once (the batch rebuild, in one process,
    with the rules of ``pinsage graph``: one edge per pair, weight = sum or max of behaviour weights, latest time)."""
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    w = np.asarray(behavior_weights, np.float32)[np.asarray(behavior, np.int64)]
    u, i, pw, pt = aggregate_pairs(user, item, w, np.asarray(ts, np.int64), edge_weight)
    counts = np.zeros((n_items, 4), np.int64)
    np.add.at(counts, (item, np.asarray(behavior, np.int64)), 1)
    return GraphStore(n_users=n_users, n_items=n_items, n_categories=n_categories,
                      user_items=csr_from_edges(u, i, pw, pt, n_users),
                      item_users=csr_from_edges(i, u, pw, pt, n_items),
                      item_category=np.asarray(item_category, np.int64), item_counts=counts,
                      item_content=item_content, behavior_weights=tuple(behavior_weights))


# ------------------------------------------------------------------------------------------------ CSR splicing


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def splice_rows(indptr: np.ndarray, arrays: tuple[np.ndarray, ...], n_rows: int, rows: np.ndarray,
                lengths: np.ndarray, values: tuple[np.ndarray, ...]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """A new CSR with rows ``rows`` (sorted, distinct) replaced by segments of ``lengths`` taken in order from
    ``values``; the others copied. ``n_rows`` may exceed the old row count (new rows are empty unless replaced).

    Shapes: ``indptr`` (R+1,); ``arrays[k]`` (E,); ``rows``, ``lengths`` (m,); ``values[k]`` (sum lengths,).
    Returns ``(indptr (n_rows+1,), arrays)``, all new and read-only.
    """
    old_ptr = np.asarray(indptr, np.int64)
    n_old = old_ptr.shape[0] - 1
    if n_rows > n_old:
        old_ptr = np.concatenate([old_ptr, np.full(n_rows - n_old, old_ptr[-1], np.int64)])
    deg = np.diff(old_ptr)
    deg[rows] = lengths
    new_ptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(deg, out=new_ptr[1:])
    seg_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Unchanged rows between two replaced ones are one contiguous run in the old and in the new arrays: copy each
    # run with one slice assignment (a memcpy), so the cost is the bytes moved plus one step per replaced row.
    run_lo = np.concatenate([[0], rows + 1])  # first row of each unchanged run
    run_hi = np.concatenate([rows, [n_rows]])  # one past its last row
    bounds = list(zip(old_ptr[run_lo].tolist(), old_ptr[run_hi].tolist(), new_ptr[run_lo].tolist(),
                      new_ptr[run_hi].tolist(), strict=True))
    seg = list(zip(new_ptr[rows].tolist(), seg_ptr[:-1].tolist(), seg_ptr[1:].tolist(), strict=True))
    out = []
    for old, values_k in zip(arrays, values, strict=True):
        src = np.asarray(old)
        new_vals = np.asarray(values_k, src.dtype)
        dst = np.empty(int(new_ptr[-1]), src.dtype)
        for o0, o1, d0, _d1 in bounds:
            if o1 > o0:
                dst[d0 : d0 + (o1 - o0)] = src[o0:o1]
        for d0, v0, v1 in seg:
            dst[d0 : d0 + (v1 - v0)] = new_vals[v0:v1]
        out.append(_frozen(dst))
    return _frozen(new_ptr), tuple(out)


def _row_positions(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Edge positions of CSR rows ``rows``, concatenated in order. Shapes: (m,) -> (sum of their degrees,)."""
    start = np.asarray(indptr[rows], np.int64)
    count = np.asarray(indptr[rows + 1], np.int64) - start
    offsets = np.repeat(start - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
    return offsets + np.arange(int(count.sum()), dtype=np.int64)


def add_edges(csr: CSR, n_rows: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, times: np.ndarray,
              how: EdgeWeight) -> CSR:
    """``csr`` with the edges ``(rows, cols, weights, times)`` merged in: a pair already present combines its weight
    (``how``) and keeps the latest time; each changed row is re-sorted by (time, column) as ``csr_from_edges`` does,
    so the result equals a rebuild from all edges. Only the changed rows are sorted; the rest is copied.
    ``csr`` must hold each (row, column) pair once, as ``pinsage graph`` writes it (repeats in a changed row are
    merged, elsewhere kept)."""
    if rows.shape[0] == 0 and n_rows == csr.n_rows:
        return csr
    changed = np.unique(rows)
    existing = changed[changed < csr.n_rows]
    pos = _row_positions(csr.indptr, existing)
    old_r = np.repeat(existing, np.diff(np.asarray(csr.indptr))[existing])
    r = np.concatenate([old_r, rows])
    c = np.concatenate([np.asarray(csr.indices)[pos], cols])
    w = np.concatenate([np.asarray(csr.weights)[pos], weights]).astype(np.float32)
    t = np.concatenate([np.asarray(csr.times)[pos], times])
    r, c, w, t = aggregate_pairs(r, c, w, t, how)
    order = np.lexsort((c, t, r))
    r, c, w, t = r[order], c[order], w[order], t[order]
    lengths = np.bincount(r, minlength=n_rows)[changed]
    ptr, (idx, wts, tms) = splice_rows(csr.indptr, (csr.indices, csr.weights, csr.times), n_rows, changed, lengths,
                                       (c, w, t))
    return CSR(ptr, idx, wts, tms)


# ------------------------------------------------------------------------------------------------ walks with traces


@dataclass
class WalkTraces:
    """Every start item's walks (writer-private, never published): ``items`` / ``users`` (n_items, n_walks*hops)
    int32, entry ``j*hops + h`` = the item reached / user passed by traversal h of walk j, -1 after the walk ended;
    ``index``: the :class:`DepartureIndex` of these walks (None: :func:`touched_items` scans the traces)."""

    items: np.ndarray
    users: np.ndarray
    index: DepartureIndex | None = None

    def copy(self) -> WalkTraces:
        """An independent copy (the index's CSRs are never modified, so they are shared)."""
        index = None if self.index is None else DepartureIndex(self.index.hops, self.index.base,
                                                               list(self.index.deltas))
        return WalkTraces(self.items.copy(), self.users.copy(), index)


@dataclass(frozen=True)
class StartRows:
    """Neighbourhood rows of some start items: ``row_lengths`` (m,), ``indices`` / ``weights`` (sum lengths,),
    ``hard_negatives`` (m, H), and their walks' ``items`` / ``users`` traces (m, n_walks*hops) int32."""

    row_lengths: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    hard_negatives: np.ndarray
    items: np.ndarray
    users: np.ndarray


def walk_starts(store: GraphStore, cfg: WalkConfig, starts: np.ndarray) -> StartRows:
    """Neighbourhood rows and walk traces of ``starts`` (sorted item ids) — the same rows ``compute_neighborhoods``
    gives these items (same kernels, same counter-based randomness)."""
    if cfg.neighbor_score != "visits":  # a lift row depends on every neighbour's degree, not only on its walks
        raise ValueError(f"walks.neighbor_score={cfg.neighbor_score!r}: evolving graphs rank by visits only; "
                         "use neighbor_score='visits'")
    g = WalkGraph.build(store, weighted=cfg.bias == "weight")
    iu, ui = store.item_users, store.user_items
    n, t, n_neg, per = starts.shape[0], cfg.top_t, cfg.n_hard_negatives, cfg.n_walks * cfg.hops
    row_len = np.zeros(n, np.int64)
    top_idx = np.zeros((n, t), np.int64)
    top_cnt = np.zeros((n, t), np.int64)
    negs = np.full((n, n_neg), -1, np.int64)
    items = np.empty((n, per), np.int32)
    users = np.empty((n, per), np.int32)
    bs = max(1, 8192 // cfg.n_walks)
    trace = np.empty((bs * cfg.n_walks, cfg.hops), np.int64)
    user_trace = np.empty((bs * cfg.n_walks, cfg.hops), np.int64)
    scratch = np.zeros(store.n_items, np.int32)
    visits = np.zeros(store.n_items, np.int32)  # _rank_batch adds into it; the counts come from the traces instead
    no_users = np.zeros(0, np.int32)
    neg_lo, neg_hi = (int(x) for x in cfg.hard_negative_ranks)
    for b0 in range(0, n, bs):
        b1 = min(b0 + bs, n)
        s = np.ascontiguousarray(starts[b0:b1], np.int64)
        m = (b1 - b0) * cfg.n_walks
        tr, ut = trace[:m], user_trace[:m]
        _walk_batch(iu.indptr, iu.indices, g.iu_cum, ui.indptr, ui.indices, g.ui_cum, cfg.bias == "weight", s,
                    cfg.n_walks, cfg.hops, cfg.mode == "restart", float(cfg.walk_prob), cfg.seed, tr, no_users, False,
                    ut)
        _rank_batch(s, cfg.n_walks, tr, scratch, visits, t, cfg.include_self, neg_lo, neg_hi, cfg.seed,
                    row_len[b0:b1], top_idx[b0:b1], top_cnt[b0:b1], negs[b0:b1])
        items[b0:b1] = tr.reshape(b1 - b0, per)
        users[b0:b1] = ut.reshape(b1 - b0, per)
    mask = np.arange(t)[None, :] < row_len[:, None]  # (n, T)
    return StartRows(row_len, top_idx[mask], top_cnt[mask].astype(np.float32), negs, items, users)


def _counts(trace: np.ndarray, n: int) -> np.ndarray:
    flat = trace.ravel()
    return np.bincount(flat[flat >= 0], minlength=n).astype(np.int64)


@numba.njit(nogil=True, cache=True)
def _touched_kernel(items, users, n_walks, hops, item_changed, user_changed, out):  # type: ignore[no-untyped-def]
    """``out[s]`` = True when start s's walks read the row of a changed vertex (see the module docstring).
    A walk's entries after its end are -1, so the scan of a walk stops there."""
    for s in range(items.shape[0]):
        if item_changed[s]:
            out[s] = True
            continue
        hit = False
        for j in range(n_walks):
            base = j * hops
            for h in range(hops):
                u = users[s, base + h]
                if u < 0:
                    break
                if user_changed[u]:
                    hit = True
                    break
                it = items[s, base + h]
                if it >= 0 and h < hops - 1 and item_changed[it]:
                    hit = True
                    break
            if hit:
                break
        out[s] = hit


@numba.njit(nogil=True, cache=True)
def _bucket(trace, row_start, n_walks, hops, limit_h, n_keys):  # type: ignore[no-untyped-def]
    """Counting sort of the (vertex, start) departures in ``trace`` (rows = starts ``row_start``; per walk the first
    ``limit_h`` traversals): a CSR vertex -> starts, ``(indptr (n_keys+1,) int64, starts int32)``."""
    indptr = np.zeros(n_keys + 1, np.int64)
    for r in range(trace.shape[0]):
        for j in range(n_walks):
            for h in range(limit_h):
                v = trace[r, j * hops + h]
                if v < 0:
                    break
                indptr[v + 1] += 1
    for k in range(n_keys):
        indptr[k + 1] += indptr[k]
    fill = indptr[:-1].copy()
    out = np.empty(indptr[n_keys], np.int32)
    for r in range(trace.shape[0]):
        s = row_start[r]
        for j in range(n_walks):
            for h in range(limit_h):
                v = trace[r, j * hops + h]
                if v < 0:
                    break
                out[fill[v]] = s
                fill[v] += 1
    return indptr, out


@dataclass
class DepartureIndex:
    """Which start items' walks leave each vertex (writer-private): CSRs item -> starts and user -> starts, one
    built from all traces (``base``) plus one per refresh since (``deltas``, the refreshed starts' new walks).

    Entries are only ever added between compactions, so a lookup may return a start whose refreshed walks no longer
    leave the vertex: a superset of the exact touched set, which costs a needless recomputation but never a wrong
    row (walks are deterministic). :meth:`compact` rebuilds ``base`` from the traces and drops the deltas.
    """

    hops: int
    base: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    deltas: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @staticmethod
    def _csrs(items: np.ndarray, users: np.ndarray, starts: np.ndarray, hops: int, n_items: int,
              n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n_walks = items.shape[1] // hops
        ip, ist = _bucket(items, starts, n_walks, hops, hops - 1, n_items)  # an item is left before the last hop
        up, ust = _bucket(users, starts, n_walks, hops, hops, n_users)
        return ip, ist, up, ust

    @classmethod
    def build(cls, traces: WalkTraces, hops: int, n_users: int) -> DepartureIndex:
        n = traces.items.shape[0]
        return cls(hops, cls._csrs(traces.items, traces.users, np.arange(n, dtype=np.int64), hops, n, n_users))

    def add(self, items: np.ndarray, users: np.ndarray, starts: np.ndarray, n_items: int, n_users: int) -> None:
        self.deltas.append(self._csrs(items, users, starts, self.hops, n_items, n_users))

    @property
    def base_entries(self) -> int:
        return int(self.base[1].shape[0] + self.base[3].shape[0])

    @property
    def delta_entries(self) -> int:
        return sum(int(d[1].shape[0] + d[3].shape[0]) for d in self.deltas)

    def lookup(self, items: np.ndarray, users: np.ndarray) -> np.ndarray:
        """Sorted distinct starts whose walks may leave one of ``items`` / ``users``."""
        found = []
        for ip, ist, up, ust in (self.base, *self.deltas):
            for ptr, starts, keys in ((ip, ist, items), (up, ust, users)):
                keys = keys[keys < ptr.shape[0] - 1]
                found.append(starts[_row_positions(ptr, keys)])
        return np.unique(np.concatenate(found)).astype(np.int64) if found else np.zeros(0, np.int64)


def touched_items(traces: WalkTraces, hops: int, changed_items: np.ndarray, changed_users: np.ndarray,
                  n_items: int, n_users: int) -> np.ndarray:
    """Sorted start items whose walks an update of ``changed_items`` / ``changed_users`` can change: the old starts
    whose recorded walks read a changed row, plus every new item (ids from ``traces.items.shape[0]`` up). With
    ``traces.index`` a lookup (a superset: see :class:`DepartureIndex`), else an exact scan of all traces."""
    n_old = traces.items.shape[0]
    if traces.index is not None:
        found = traces.index.lookup(changed_items, changed_users)
        starts = np.concatenate([found[found < n_old], changed_items[changed_items < n_old], np.arange(n_old, n_items)])
        return np.unique(starts).astype(np.int64)
    item_changed = np.zeros(max(n_items, n_old), bool)
    item_changed[changed_items] = True
    user_changed = np.zeros(n_users, bool)
    user_changed[changed_users] = True
    out = np.zeros(n_old, bool)
    _touched_kernel(traces.items, traces.users, traces.items.shape[1] // hops, hops, item_changed, user_changed, out)
    return np.concatenate([np.flatnonzero(out), np.arange(n_old, n_items)]).astype(np.int64)


# ------------------------------------------------------------------------------------------------ versions


@dataclass(frozen=True)
class GraphVersion:
    """One immutable state of the evolving graph (see the module docstring). Arrays are read-only.

    ``number``: 0 for the base, +1 per applied batch; ``store``: the graph; ``neighborhoods``: PinSage
    neighbourhoods, importance and hard negatives of this graph; ``item_visits`` (n_items,) / ``user_visits``
    (n_users,) int64 raw visit counts; ``neighbors``: the sampler's view of ``neighborhoods``; ``touched``: start
    items refreshed by the batch that made this version; ``n_interactions``: interactions applied since the base.
    """

    number: int
    store: GraphStore
    neighborhoods: Neighborhoods
    item_visits: np.ndarray
    user_visits: np.ndarray
    neighbors: WalkNeighbors
    touched: int = 0
    n_interactions: int = 0
    created: float = field(default_factory=time.perf_counter, compare=False)

    @property
    def n_items(self) -> int:
        return self.store.n_items

    def __repr__(self) -> str:
        return (f"GraphVersion(number={self.number}, users={self.store.n_users}, items={self.store.n_items}, "
                f"edges={self.store.n_edges}, touched={self.touched})")


def _version(number: int, store: GraphStore, nb: Neighborhoods, item_visits: np.ndarray, user_visits: np.ndarray,
             cfg: WalkConfig, *, touched: int, n_interactions: int) -> GraphVersion:
    for arr in (item_visits, user_visits):
        _frozen(arr)
    return GraphVersion(number, store, nb, item_visits, user_visits, WalkNeighbors(nb, n_neighbors=cfg.top_t),
                        touched, n_interactions)


def writer_bytes(store: GraphStore, cfg: WalkConfig) -> int:
    """Upper bound on the bytes the live graph's writer keeps beside the published versions: the walk traces (items
    and users, int32, ``n_items * n_walks * hops`` entries each) and their :class:`DepartureIndex` (one int32 entry
    per item left before a walk's last traversal and per user passed, plus int64 row pointers; the deltas between
    compactions add at most a quarter of it). Walks that stop early take less."""
    walks = store.n_items * cfg.n_walks
    index = walks * (2 * cfg.hops - 1) * 4 + (store.n_items + store.n_users + 2) * 8
    return 2 * walks * cfg.hops * 4 + index + index // 4


def check_writer_bytes(store: GraphStore, cfg: WalkConfig, limit: int | None = None) -> None:
    """Raise a one-line ``ValueError`` before the walks when :func:`writer_bytes` exceeds ``limit`` (default: half
    of the memory available now, ``psutil.virtual_memory().available // 2``, leaving the rest to the versions that
    readers hold and the one being built)."""
    need = writer_bytes(store, cfg)
    if limit is None:
        import psutil  # a dependency of distributed; imported here so that the module stays light

        limit, what = int(psutil.virtual_memory().available) // 2, "half of the memory available now"
    else:
        what = "max_writer_bytes"
    if need > limit:
        raise ValueError(f"live graph: the walk traces and their index need up to {need / 2**30:.2f} GiB "
                         f"({store.n_items} items x walks.n_walks={cfg.n_walks} x hops={cfg.hops}) but {what} is "
                         f"{limit / 2**30:.2f} GiB: lower n_walks in the [walks] section (the memory is linear in it) "
                         f"or run where more memory is free")


def base_version(store: GraphStore, cfg: WalkConfig, *,
                 max_writer_bytes: int | None = None) -> tuple[GraphVersion, WalkTraces]:
    """Version 0 of ``store`` (every item walked) and the walk traces the writer keeps; refuses (``ValueError``)
    before walking when those would exceed ``max_writer_bytes`` (see :func:`check_writer_bytes`)."""
    if store.n_items == 0:
        raise ValueError("the graph store has no items: nothing to walk from; build the graph first")
    check_writer_bytes(store, cfg, max_writer_bytes)
    rows = walk_starts(store, cfg, np.arange(store.n_items, dtype=np.int64))
    item_visits, user_visits = _counts(rows.items, store.n_items), _counts(rows.users, store.n_users)
    indptr = np.zeros(store.n_items + 1, np.int64)
    np.cumsum(rows.row_lengths, out=indptr[1:])
    nb = Neighborhoods(_frozen(indptr), _frozen(rows.indices), _frozen(rows.weights),
                       _frozen(normalise(item_visits)), _frozen(normalise(user_visits)), _frozen(rows.hard_negatives))
    return (_version(0, store, nb, item_visits, user_visits, cfg, touched=store.n_items, n_interactions=0),
            _indexed(WalkTraces(rows.items, rows.users), cfg.hops, store.n_users))


def _indexed(traces: WalkTraces, hops: int, n_users: int) -> WalkTraces:
    traces.index = DepartureIndex.build(traces, hops, n_users)
    return traces


def apply_batch(store: GraphStore, batch: InteractionBatch, *, edge_weight: EdgeWeight = "sum") -> GraphStore:
    """The graph store with ``batch`` applied (new users / items appended; see :class:`InteractionBatch`)."""
    if batch.n_users < store.n_users or batch.n_items < store.n_items or batch.n_categories < store.n_categories:
        raise ValueError(f"batch sizes ({batch.n_users} users, {batch.n_items} items, {batch.n_categories} "
                         f"categories) are below the graph's ({store.n_users}, {store.n_items}, "
                         f"{store.n_categories}): the batch was made for another graph")
    w = np.asarray(store.behavior_weights, np.float32)[batch.behavior.astype(np.int64)]
    u, i, pw, pt = aggregate_pairs(batch.user, batch.item, w, batch.ts, edge_weight)
    ui = add_edges(store.user_items, batch.n_users, u, i, pw, pt, edge_weight)
    iu = add_edges(store.item_users, batch.n_items, i, u, pw, pt, edge_weight)
    n_new = batch.n_items - store.n_items
    category = np.asarray(store.item_category)
    counts = np.asarray(store.item_counts)
    content = store.item_content
    if n_new:
        new_cat = np.full(n_new, np.iinfo(np.int64).max, np.int64)
        fresh = batch.item >= store.n_items
        np.minimum.at(new_cat, batch.item[fresh] - store.n_items, batch.category[fresh])
        if np.any(new_cat == np.iinfo(np.int64).max):
            raise ValueError(f"batch.n_items={batch.n_items}: new item ids without any interaction in the batch")
        category = np.concatenate([category, new_cat])
        counts = np.concatenate([counts, np.zeros((n_new, 4), np.int64)])
        if content is not None:  # content of a new item is unknown: zeros
            content = _frozen(np.concatenate([np.asarray(content), np.zeros((n_new, content.shape[1]), np.float32)]))
    counts = counts.copy()
    np.add.at(counts, (batch.item, batch.behavior.astype(np.int64)), 1)
    return dataclasses.replace(store, n_users=batch.n_users, n_items=batch.n_items, n_categories=batch.n_categories,
                               user_items=ui, item_users=iu, item_category=_frozen(category),
                               item_counts=_frozen(counts), item_content=content, path=None)


def refresh(version: GraphVersion, traces: WalkTraces, batch: InteractionBatch, cfg: WalkConfig, *,
            edge_weight: EdgeWeight = "sum") -> tuple[GraphVersion, WalkTraces]:
    """The next version after ``batch``: the new graph plus the neighbourhoods / importance of only the touched
    start items recomputed (see the module docstring). Returns the version and the traces: ``traces`` itself,
    updated in place as the very last step (so an error leaves it matching ``version``), or a grown copy."""
    store = apply_batch(version.store, batch, edge_weight=edge_weight)
    return refresh_neighborhoods(version, traces, batch, store, cfg)


def refresh_neighborhoods(version: GraphVersion, traces: WalkTraces, batch: InteractionBatch, store: GraphStore,
                          cfg: WalkConfig) -> tuple[GraphVersion, WalkTraces]:
    """The neighbourhood half of :func:`refresh`: ``store`` is ``apply_batch(version.store, batch)``."""
    old = version.store
    touched = touched_items(traces, cfg.hops, np.unique(batch.item), np.unique(batch.user), store.n_items,
                            store.n_users)
    rows = walk_starts(store, cfg, touched)
    old_touched = touched[touched < old.n_items]
    item_visits = np.zeros(store.n_items, np.int64)
    item_visits[: old.n_items] = version.item_visits
    item_visits -= _counts(traces.items[old_touched], store.n_items)
    item_visits += _counts(rows.items, store.n_items)
    user_visits = np.zeros(store.n_users, np.int64)
    user_visits[: old.n_users] = version.user_visits
    user_visits -= _counts(traces.users[old_touched], store.n_users)
    user_visits += _counts(rows.users, store.n_users)
    nb0 = version.neighborhoods
    ptr, (idx, wts) = splice_rows(nb0.indptr, (nb0.indices, nb0.weights), store.n_items, touched, rows.row_lengths,
                                  (rows.indices, rows.weights))
    negs = np.full((store.n_items, cfg.n_hard_negatives), -1, np.int64)
    negs[: old.n_items] = nb0.hard_negatives
    negs[touched] = rows.hard_negatives
    nb = Neighborhoods(ptr, idx, wts, _frozen(normalise(item_visits)), _frozen(normalise(user_visits)),
                       _frozen(negs))
    nxt = _version(version.number + 1, store, nb, item_visits, user_visits, cfg, touched=int(touched.shape[0]),
                   n_interactions=version.n_interactions + batch.n_rows)
    # Last, when nothing can fail any more: the touched starts' traces, in place (a copy of all traces per update
    # would cost more than the refresh; only the writer reads them).
    if store.n_items > traces.items.shape[0]:
        traces = WalkTraces(_grow(traces.items, store.n_items), _grow(traces.users, store.n_items), traces.index)
    traces.items[touched] = rows.items
    traces.users[touched] = rows.users
    index = traces.index
    if index is not None:
        index.add(rows.items, rows.users, touched, store.n_items, store.n_users)
        if len(index.deltas) >= MAX_INDEX_DELTAS or index.delta_entries > index.base_entries // 4:
            traces.index = DepartureIndex.build(traces, cfg.hops, store.n_users)  # compaction
    return nxt, traces


def _grow(trace: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([trace, np.full((n - trace.shape[0], trace.shape[1]), -1, trace.dtype)])


# ------------------------------------------------------------------------------------------------ the live graph


class LiveGraph:
    """The current version of an evolving graph, published lock-free (see the module docstring).

    Args:
        base: the graph store at version 0 (e.g. ``load_graph_store(run / "graph")``).
        cfg: walk settings of the neighbourhoods (``WalkConfig``).
        log_path: the append log (default None: updates are not durable). An existing log is replayed onto
            ``base`` up to its last complete record (a torn tail is cut off), so the live graph starts at the last
            logged version.
        edge_weight: ``sum`` (default) or ``max``: how a pair's interactions combine (``[graph] edge_weight``).
        on_logged: called with the record's version number after the record is durable and before the version is
            published (default None; tests use it to crash exactly there).
        max_writer_bytes: the most memory the writer's walk traces and their index may take (default None: half of
            the memory available at start; :func:`writer_bytes` gives the need). A larger need is refused with a
            ``ValueError`` before any walk runs, instead of the process dying of memory half-way.

    Readers: ``v = live.current`` (one attribute load; keep ``v`` for the whole minibatch). Writer: :meth:`append`,
    serialised by a writer-only lock (and an ``flock`` on the log against other processes).
    """

    def __init__(self, base: GraphStore, cfg: WalkConfig, *, log_path: str | Path | None = None,
                 edge_weight: EdgeWeight = "sum", on_logged: Callable[[int], None] | None = None,
                 max_writer_bytes: int | None = None) -> None:
        if edge_weight not in ("sum", "max"):
            raise ValueError(f"edge_weight={edge_weight!r}: must be 'sum' or 'max' (as [graph] edge_weight)")
        self.cfg = cfg
        self.edge_weight: EdgeWeight = edge_weight
        self.on_logged = on_logged
        self.log = UpdateLog(log_path) if log_path is not None else None
        self._writer = threading.Lock()
        self._log_offset = 0
        self._current, self._traces = base_version(base, cfg, max_writer_bytes=max_writer_bytes)
        if self.log is not None:
            with self._writer, self.log.locked():
                self.log.recover()
                self._catch_up()

    @property
    def current(self) -> GraphVersion:
        """The latest published version (a single reference load: no lock)."""
        return self._current

    def _publish(self, batch: InteractionBatch) -> GraphVersion:
        nxt, traces = refresh(self._current, self._traces, batch, self.cfg, edge_weight=self.edge_weight)
        self._traces = traces  # writer-private, replaced before the publication: readers never see it
        self._current = nxt  # the publication: one reference store
        return nxt

    def _catch_up(self) -> int:
        """Apply log records written after ours (by another process); returns how many. Writer lock held."""
        if self.log is None:
            return 0
        n = 0
        for payload, end in self.log.records(self._log_offset):
            self._publish(InteractionBatch.from_bytes(payload))
            self._log_offset = end
            n += 1
        return n

    def catch_up(self) -> GraphVersion:
        """Publish the batches other processes (``pinsage update``) appended to the log since the last call."""
        if self.log is not None:
            with self._writer, self.log.locked():
                self._catch_up()
        return self._current

    def append(self, batch: InteractionBatch) -> GraphVersion:
        """Log ``batch`` durably (fsync), then build and publish the next version; returns it. When this returns the
        batch is acknowledged: a crash after the log write replays it on restart."""
        with self._writer:
            if self.log is None:
                return self._publish(batch)
            with self.log.locked():
                self._catch_up()
                _check_sizes(self._current.store, batch)
                self._log_offset = self.log.append(batch.to_bytes())
                if self.on_logged is not None:
                    self.on_logged(self._current.number + 1)
                return self._publish(batch)

    def __repr__(self) -> str:
        return f"LiveGraph(current={self._current!r}, log={self.log!r})"


def _check_sizes(store: GraphStore, batch: InteractionBatch) -> None:
    if batch.n_users < store.n_users or batch.n_items < store.n_items or batch.n_categories < store.n_categories:
        raise ValueError(f"batch sizes ({batch.n_users} users, {batch.n_items} items) are below the live graph's "
                         f"({store.n_users}, {store.n_items}): build the batch against the current version")


# ------------------------------------------------------------------------------------------------ background writer


def merge_batches(batches: list[InteractionBatch]) -> InteractionBatch:
    """Consecutive batches (in log order) as one: rows concatenated, the last sizes, ``raw`` arrays concatenated."""
    if not batches:
        raise ValueError("batches is empty: pass at least one InteractionBatch")
    if len(batches) == 1:
        return batches[0]
    cat = np.concatenate
    keys = sorted({k for b in batches for k in b.raw})
    return InteractionBatch(cat([b.user for b in batches]), cat([b.item for b in batches]),
                            cat([b.behavior for b in batches]), cat([b.ts for b in batches]),
                            cat([b.category for b in batches]), max(b.n_users for b in batches),
                            max(b.n_items for b in batches), max(b.n_categories for b in batches),
                            raw={k: cat([np.asarray(b.raw[k]) for b in batches if k in b.raw]) for k in keys})


def lower_thread_priority(nice: int) -> bool:
    """Raise the calling thread's nice value by ``nice`` (Linux: threads have their own). False where unsupported."""
    if nice <= 0 or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:  # e.g. a sandbox that forbids it: the writer still works, at normal priority
        log.warning("could not lower the writer thread's priority: %s", e)
        return False
    return True


class UpdateWriter:
    """The one writer of a :class:`LiveGraph` as a background thread: :meth:`submit` queues a batch and returns a
    future of the version that contains it (resolved once it is logged and published). Batches waiting while a
    refresh runs are applied together as one version (group commit: one refresh, one fsync), so the writer keeps up
    with the arrivals however busy the machine is.

    Args:
        live: the live graph. nice: the writer thread's nice increment (default 10; Linux): under CPU contention the
            samplers keep their share and the writer gets what is left. max_rows: most interactions per group
            (default 100 000).
    """

    def __init__(self, live: LiveGraph, *, nice: int = 10, max_rows: int = 100_000) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: must be at least 1")
        self.live = live
        self.nice = nice
        self.max_rows = max_rows
        self.groups = 0
        self._queue: queue.Queue[tuple[InteractionBatch, Future[GraphVersion]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="live-graph-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: InteractionBatch) -> Future[GraphVersion]:
        fut: Future[GraphVersion] = Future()
        self._queue.put((batch, fut))
        return fut

    def close(self) -> None:
        """Apply what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        lower_thread_priority(self.nice)
        done = False
        while not done:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            rows = item[0].n_rows
            while rows < self.max_rows:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    done = True
                    break
                group.append(nxt)
                rows += nxt[0].n_rows
            try:
                version = self.live.append(merge_batches([b for b, _ in group]))
            except Exception as e:
                for _, fut in group:
                    fut.set_exception(e)
                continue
            self.groups += 1
            for _, fut in group:
                fut.set_result(version)

    def __repr__(self) -> str:
        return f"UpdateWriter(groups={self.groups}, queued={self._queue.qsize()}, nice={self.nice})"


# ------------------------------------------------------------------------------------------------ readers


class VersionedPinSageSampler:
    """A PinSage sampler over a :class:`LiveGraph`: each batch reads one version snapshot, taken when it starts.

    Args:
        live: the live graph. rows: the input-row source (``gnn.features.ItemFeatureTable`` or a cache).
        n_layers: K (default 2).

    :meth:`sample` has the ``gnn.sampler.Sampler`` signature; :meth:`sample_versioned` also says which version.
    """

    def __init__(self, live: LiveGraph, *, rows: RowSource, n_layers: int = 2) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers={n_layers}: need at least one layer")
        self.live = live
        self.rows = rows
        self.n_layers = n_layers

    def sample_versioned(self, targets: np.ndarray, rng: np.random.Generator) -> tuple[Subgraph, int]:
        version = self.live.current  # one snapshot for the whole batch
        sampler = PinSageSampler(neighbors=version.neighbors, rows=self.rows, n_layers=self.n_layers)
        return sampler.sample(targets, rng), version.number

    def sample(self, targets: np.ndarray, rng: np.random.Generator) -> Subgraph:
        return self.sample_versioned(targets, rng)[0]

    def __repr__(self) -> str:
        return f"VersionedPinSageSampler(n_layers={self.n_layers}, live={self.live!r})"


class LiveOwnerTable:
    """Owner side of the remote-row cache over a live graph: ``take(ids)`` answers rows of the current version,
    each stamped with that version's number (``RowBlock.version``), so a ``RemoteRowCache`` with
    ``CacheConfig(max_staleness=k)`` refreshes rows older than k versions.

    Args:
        live: the live graph; features: ``features(version, ids) -> (n, F) float32`` (default: the item's
            category and log-counts of that version, as ``gnn.features``' table).
    """

    def __init__(self, live: LiveGraph, *,
                 features: Callable[[GraphVersion, np.ndarray], np.ndarray] | None = None) -> None:
        self.live = live
        self.features = features or _count_features

    def take(self, ids: np.ndarray) -> RowBlock:
        v = self.live.current
        ids = np.asarray(ids, np.int64)
        nbr, w = v.neighbors(ids)
        return RowBlock(ids, self.features(v, ids), nbr, w, np.full(ids.shape[0], v.number, np.int64))


def _count_features(version: GraphVersion, ids: np.ndarray) -> np.ndarray:
    st = version.store
    cat = np.asarray(st.item_category)[ids].astype(np.float32)[:, None]
    return np.concatenate([cat, np.log1p(np.asarray(st.item_counts)[ids]).astype(np.float32)], axis=1)
