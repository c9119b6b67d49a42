"""PinSage random-walk neighbourhoods, vertex importance and hard negatives over the memory-mapped graph store.

From every item, ``n_walks`` walks of up to ``hops`` item→user→item traversals; the items they reach, ranked by
visit count, give each item its top-T neighbourhood (importance pooling), the total visit counts give the vertex
importance used by the cache, and a rank window of the same ranking gives hard negatives. CPU kernel in numba;
``pipeline/walks.py`` spreads the starts over Dask workers, ``gnn/walks_gpu.py`` runs them on cuGraph.

Walk semantics (``WalkConfig.mode``):

* ``"stop"`` (DGL's PinSAGE sampler): a walk makes up to ``hops`` traversals; after each traversal but the last it
  stops with probability ``stop_prob``. Expected visits of item j from start s:
  ``n_walks * sum_t (1-p)^(t-1) (P^t)[s, j]`` with ``P`` the item→item two-step transition matrix.
* ``"restart"`` (random walk with restart, PinSage's personalised PageRank): a walk makes exactly ``hops``
  traversals; before each traversal it jumps back to its start with probability ``restart_prob``. Visits:
  ``x_t = ((1-a) x_(t-1) + a e_s) P``, ``x_0 = e_s``; for long walks ``x_t`` converges to personalised PageRank.

A visit is counted at every vertex a step arrives at (users in the middle of a traversal, items at its end); the
start itself is not counted unless a walk comes back to it. Transitions are uniform or proportional to the edge
weight (``bias="weight"``; behaviour weights from the graph store). Only a start item without interactions is a
dead end (its walks end at once and its row is empty); every reached vertex has an edge back.

Randomness is counter-based (splitmix64 of (seed, start item, walk, step)), so results are identical for any
chunking, number of threads or Dask workers.

Run ``compute_neighborhoods(load_graph_store(path), WalkConfig())`` for one process; ``pinsage walks`` for Dask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np

from gnn.graphstore import GRAPH_MANIFEST, GraphStore, load_graph_store

log = logging.getLogger(__name__)

WALKS_FORMAT = "pinsage-walks"
WALKS_VERSION = 1
WALKS_MANIFEST = "neighborhoods.json"
_ARRAYS = ("indptr", "indices", "weights", "item_importance", "user_importance", "hard_negatives")


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class WalkConfig:
    """Settings of the walks (section ``[walks]``); the defaults are PinSage-like, DGL's example is
    ``n_walks=10, hops=2, stop_prob=0.5, top_t=3``.

    * ``n_walks`` (50): walks from every item; ``hops`` (3): item→user→item traversals per walk (at most, in
      ``"stop"`` mode); ``mode`` (``"stop"``): ``"stop"`` or ``"restart"`` (see the module docstring);
      ``stop_prob`` (0.5) / ``restart_prob`` (0.3): used by the respective mode. 50 walks give a noisy top-T: on
      Amazon half of the top-10 slots hold items visited at most twice (results/walk_convergence.json), and 500
      walks train a better PinSage there (results/quality_pooling.json ``amazon_ids_e10_w500``) for 10x the walk
      time (1.75 s against 0.16 s on Amazon's 22k items). The default stays 50 because the evolving graph
      (gnn/evolving.py) keeps every walk's trace, ``n_items * n_walks * hops * 8`` bytes, and an index of it of
      about the same size (``gnn.evolving.writer_bytes``: up to 9.9 GB at 4M items and 50 walks, ten times that at
      500; a live graph whose bound exceeds half of the free memory is refused before it walks); set
      ``walks.n_walks = 500`` for static training where the memory allows.
    * ``bias`` (``"uniform"``): ``"uniform"`` or ``"weight"`` (transition probability proportional to the edge's
      behaviour weight).
    * ``top_t`` (20): neighbours kept per item; ``include_self`` (False): may an item be its own neighbour.
    * ``n_hard_negatives`` (8) items sampled per item from ranks ``hard_negative_ranks`` (50, 500) (0-based,
      half-open, self excluded) of its visit ranking; ranks below ``top_t`` are never used. When an item's walks
      reach fewer items than the window starts at, the least-visited half of its items beyond the top-T is used
      instead; rows are padded with -1.
    * ``neighbor_score`` (``"visits"``): how the top-T neighbours are ranked and weighted. ``"visits"``: by the
      visit count (weights: raw counts). ``"lift"``: by ``visits(i→j) / degree(j)**lift_alpha`` (``lift_alpha``
      1.0), ``degree(j)`` = j's number of interactions in the graph store, so that globally popular items, which
      every walk reaches, do not fill the top-T; weights: these scores normalised to sum 1 over the kept
      neighbours; the hard-negative window is taken from the same lift ranking. The degree, not the total visit
      count, because it is known before any walk (a chunk ranks its rows without the other chunks' counts) and a
      uniform walk's stationary visit share is proportional to it. CPU kernel only (the GPU backend and
      gnn/evolving.py refuse it).
    * ``seed`` (0); ``chunk_items`` (16384): start items per task / thread chunk (never changes the result).
    """

    n_walks: int = field(default=50, metadata={"help": "walks from every item"})
    hops: int = field(default=3, metadata={"help": "item→user→item traversals per walk (at most, in mode stop)"})
    mode: Literal["stop", "restart"] = field(
        default="stop", metadata={"help": "stop: end with stop_prob after a traversal; restart: jump back home"})
    stop_prob: float = field(default=0.5, metadata={"help": "mode stop: probability to end after a traversal"})
    restart_prob: float = field(default=0.3, metadata={"help": "mode restart: probability to jump back home"})
    bias: Literal["uniform", "weight"] = field(
        default="uniform", metadata={"help": "weight: transitions proportional to the behaviour weight"})
    top_t: int = field(default=20, metadata={"help": "neighbours kept per item (by visit count)"})
    include_self: bool = field(default=False, metadata={"help": "may an item be its own neighbour"})
    n_hard_negatives: int = field(default=8, metadata={"help": "hard negatives sampled per item"})
    hard_negative_ranks: tuple[int, ...] = field(
        default=(50, 500), metadata={"help": "visit-rank window lo,hi of the hard negatives"})
    seed: int = field(default=0, metadata={"help": "random seed (results do not depend on chunks or workers)"})
    neighbor_score: Literal["visits", "lift"] = field(
        default="visits", metadata={"help": "rank/weight neighbours by visits, or lift: visits / degree**lift_alpha"})
    lift_alpha: float = field(default=1.0, metadata={"help": "neighbor_score lift: exponent of the degree discount"})
    chunk_items: int = field(default=16384, metadata={"help": "start items per Dask task / thread chunk"})

    def __post_init__(self) -> None:
        for name in ("n_walks", "hops", "top_t", "chunk_items"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"walks.{name}={v!r}: must be a positive integer")
        if self.n_hard_negatives < 0:
            raise ValueError(f"walks.n_hard_negatives={self.n_hard_negatives!r}: must be 0 or more")
        if self.mode not in ("stop", "restart"):
            raise ValueError(f"walks.mode={self.mode!r}: must be 'stop' or 'restart'")
        if self.neighbor_score not in ("visits", "lift"):
            raise ValueError(f"walks.neighbor_score={self.neighbor_score!r}: must be 'visits' or 'lift'")
        if isinstance(self.lift_alpha, bool) or not isinstance(self.lift_alpha, int | float) \
                or not 0.0 <= self.lift_alpha < float("inf"):
            raise ValueError(f"walks.lift_alpha={self.lift_alpha!r}: must be a finite number >= 0, e.g. 1.0")
        if self.bias not in ("uniform", "weight"):
            raise ValueError(f"walks.bias={self.bias!r}: must be 'uniform' or 'weight'")
        if not 0.0 <= self.stop_prob <= 1.0:
            raise ValueError(f"walks.stop_prob={self.stop_prob!r}: must lie in [0, 1]")
        if not 0.0 <= self.restart_prob < 1.0:
            raise ValueError(f"walks.restart_prob={self.restart_prob!r}: must lie in [0, 1)")
        r = tuple(self.hard_negative_ranks)
        if len(r) != 2 or not 0 <= r[0] < r[1]:
            raise ValueError(f"walks.hard_negative_ranks={r!r}: must be two ranks lo < hi, e.g. (50, 500)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"walks.seed={self.seed!r}: must lie in [0, 2**63)")
        if self.n_walks * self.hops > 2**30:
            raise ValueError(f"walks.n_walks*hops={self.n_walks * self.hops}: must stay below 2**30")

    @property
    def walk_prob(self) -> float:
        return self.restart_prob if self.mode == "restart" else self.stop_prob


# ----------------------------------------------------------------------------------------------- the results


@dataclass(frozen=True)
class Neighborhoods:
    """Top-T random-walk neighbourhoods of every item, vertex importance and hard negatives.

    Shapes: ``indptr`` (n_items+1,) int64; ``indices`` (nnz,) int64 neighbour items of each item by visit count
    desc, ties by smaller id (``neighbor_score="lift"``: by lift); ``weights`` (nnz,) float32 raw visit counts
    (lift: the lift scores normalised to sum 1 per row); ``item_importance`` (n_items,) and
    ``user_importance`` (n_users,) float32 total visit counts normalised to sum 1 (all zeros when no walk moved);
    ``hard_negatives`` (n_items, H) int64, -1 padded. An item without interactions has an empty row.
    """

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    item_importance: np.ndarray
    user_importance: np.ndarray
    hard_negatives: np.ndarray

    @property
    def n_items(self) -> int:
        return int(self.indptr.shape[0] - 1)

    def neighbors(self, item: int) -> np.ndarray:
        return np.asarray(self.indices[self.indptr[item] : self.indptr[item + 1]])

    def neighbor_weights(self, item: int) -> np.ndarray:
        return np.asarray(self.weights[self.indptr[item] : self.indptr[item + 1]])


@dataclass(frozen=True)
class NeighborhoodChunk:
    """The result for start items ``[lo, hi)``: row lengths, rows, hard negatives, and raw visit counts of every
    item / user by these starts' walks (int32: a chunk makes fewer than 2**31 visits; summed over chunks into
    int64 they give the importance exactly, whatever the chunking)."""

    lo: int
    hi: int
    row_lengths: np.ndarray  # (hi-lo,) int64
    indices: np.ndarray  # (sum row_lengths,) int64
    weights: np.ndarray  # (sum row_lengths,) float32
    hard_negatives: np.ndarray  # (hi-lo, H) int64
    item_visits: np.ndarray  # (n_items,) int32
    user_visits: np.ndarray  # (n_users,) int32
    n_steps: int


def save_neighborhoods(path: str | Path, nb: Neighborhoods) -> None:
    """Write ``nb`` into directory ``path`` (``.npy`` per array, ``neighborhoods.json`` last, atomically)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    specs: dict[str, Any] = {}
    for name in _ARRAYS:
        arr = np.asarray(getattr(nb, name))
        tmp = out / f".{name}.tmp-{uuid.uuid4().hex[:8]}.npy"
        np.save(tmp, arr)
        os.replace(tmp, out / f"{name}.npy")
        specs[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    manifest = {
        "format": WALKS_FORMAT,
        "version": WALKS_VERSION,
        "n_items": nb.n_items,
        "n_users": int(nb.user_importance.shape[0]),
        "nnz": int(nb.indices.shape[0]),
        "arrays": specs,
    }
    tmp = out / f".{WALKS_MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out / WALKS_MANIFEST)


def load_neighborhoods(path: str | Path, *, mmap: bool = True) -> Neighborhoods:
    """Open neighbourhoods written by :func:`save_neighborhoods`; memory-mapped read-only by default."""
    root = Path(path)
    mpath = root / WALKS_MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{root}: no {WALKS_MANIFEST}; compute the neighbourhoods with `pinsage walks`")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != WALKS_FORMAT or manifest.get("version") != WALKS_VERSION:
        raise ValueError(
            f"{mpath}: format {manifest.get('format')!r} version {manifest.get('version')!r}, this code reads "
            f"{WALKS_FORMAT!r} version {WALKS_VERSION}; re-run `pinsage walks --force`"
        )
    arrays = {}
    for name in _ARRAYS:
        a = np.load(root / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        spec = manifest["arrays"][name]
        if list(a.shape) != spec["shape"] or str(a.dtype) != spec["dtype"]:
            raise ValueError(f"{root}/{name}.npy does not match {WALKS_MANIFEST}; re-run `pinsage walks --force`")
        arrays[name] = a
    return Neighborhoods(**arrays)


# ------------------------------------------------------------------------------------------ the numba kernel

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_NEG_SALT = np.uint64(0x6A09E667F3BCC909)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_S11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0


@numba.njit(inline="always", cache=True)
def _mix(z: np.uint64) -> np.uint64:  # splitmix64 finaliser
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(inline="always", cache=True)
def _draw(key: np.uint64, counter: int) -> np.uint64:
    return _mix(key + np.uint64(counter + 1) * _GOLD)


@numba.njit(inline="always", cache=True)
def _row_offsets(ptr, cur, off, deg):  # type: ignore[no-untyped-def]
    """Pass 1 of a half-step: every live walk's row start and degree (independent loads, many in flight)."""
    for w in range(cur.shape[0]):
        c = cur[w]
        if c >= 0:
            a = ptr[c]
            off[w] = a
            deg[w] = ptr[c + 1] - a


@numba.njit(inline="always", cache=True)
def _step_uniform(idx, cur, key, off, deg, counter):  # type: ignore[no-untyped-def]
    """Pass 2 and 3, uniform: compute every walk's edge position (arithmetic only, into ``off``), then gather
    the neighbours in a loop that does nothing else, so the out-of-order core keeps many loads in flight.
    -1 at a dead end. No scatter writes here: a store to a random address would hold the loads back."""
    for w in range(cur.shape[0]):
        d = deg[w]
        if cur[w] >= 0 and d > 0:
            off[w] += np.int64(((_draw(key[w], counter) >> _S32) * np.uint64(d)) >> _S32)
        else:
            off[w] = -1
    steps = 0
    for w in range(cur.shape[0]):
        p = off[w]
        v = idx[p] if p >= 0 else -1
        cur[w] = v
        steps += v >= 0
    return steps


@numba.njit(inline="always", cache=True)
def _step_weighted(idx, cum, cur, key, off, deg, counter):  # type: ignore[no-untyped-def]
    """Pass 2, by weight: binary search in the global inclusive cumulative weights ``cum`` of the row
    (-1 at a dead end: no edge, or all weights 0)."""
    steps = 0
    for w in range(cur.shape[0]):
        if cur[w] < 0:
            continue
        a = off[w]
        d = deg[w]
        v = -1
        if d > 0:
            base = cum[a - 1] if a > 0 else 0.0
            total = cum[a + d - 1] - base
            if total > 0.0:
                target = base + np.float64(_draw(key[w], counter) >> _S11) * _INV53 * total
                lo = a
                hi = a + d - 1
                while lo < hi:  # first edge whose cumulative weight exceeds the target
                    mid = (lo + hi) >> 1
                    if cum[mid] > target:
                        hi = mid
                    else:
                        lo = mid + 1
                v = idx[lo]
        cur[w] = v
        steps += v >= 0
    return steps


@numba.njit(nogil=True, cache=True)
def _walk_batch(iu_ptr, iu_idx, iu_cum, ui_ptr, ui_idx, ui_cum, weighted, starts, n_walks, hops, restart,  # type: ignore[no-untyped-def]
                prob, seed, trace, user_visits, count_users, user_trace):
    """Advance all ``len(starts) * n_walks`` walks together, one half-step (item→user or user→item) at a time
    and each half-step in two passes (row offsets, then the neighbour), so that the loads of different walks are
    independent and many cache misses are in flight. Fills ``trace`` (W, hops) with the item reached by each
    traversal (-1 once a walk has ended); adds user visits into ``user_visits``; when ``user_trace`` has rows
    (W, hops), also records the user each traversal passed through there (gnn/evolving.py needs it to know which
    walks an update can change; pass an empty (0, hops) array otherwise). Returns the steps made."""
    n_w = starts.shape[0] * n_walks
    seed_u = np.uint64(seed)
    cur = np.empty(n_w, np.int64)
    home = np.empty(n_w, np.int64)
    key = np.empty(n_w, np.uint64)
    off = np.empty(n_w, np.int64)
    deg = np.empty(n_w, np.int64)
    users = np.empty(n_w, np.int64)
    w = 0
    for b in range(starts.shape[0]):
        s = starts[b]
        k0 = _mix(seed_u ^ (np.uint64(s) * _GOLD))
        for j in range(n_walks):
            cur[w] = s
            home[w] = s
            key[w] = _mix(k0 + np.uint64(j))
            w += 1
    steps = 0
    for h in range(hops):
        if h > 0 and prob > 0.0:
            for w in range(n_w):
                if cur[w] >= 0:
                    u = np.float64(_draw(key[w], 3 * h + 2) >> _S11) * _INV53
                    if u < prob:
                        cur[w] = home[w] if restart else -1
        _row_offsets(iu_ptr, cur, off, deg)  # item -> user
        if weighted:
            steps += _step_weighted(iu_idx, iu_cum, cur, key, off, deg, 3 * h)
        else:
            steps += _step_uniform(iu_idx, cur, key, off, deg, 3 * h)
        if count_users:
            users[:] = cur
        if user_trace.shape[0] > 0:
            for w in range(n_w):
                user_trace[w, h] = cur[w]
        _row_offsets(ui_ptr, cur, off, deg)  # user -> item
        if weighted:
            steps += _step_weighted(ui_idx, ui_cum, cur, key, off, deg, 3 * h + 1)
        else:
            steps += _step_uniform(ui_idx, cur, key, off, deg, 3 * h + 1)
        for w in range(n_w):
            trace[w, h] = cur[w]
        if count_users:  # a separate pass of scatter increments (see _step_uniform)
            for w in range(n_w):
                u = users[w]
                if u >= 0:
                    user_visits[u] += 1
    return steps


@numba.njit(nogil=True, cache=True)
def _count_items(trace, counts):  # type: ignore[no-untyped-def]
    """Add every item of ``trace`` (W, hops), -1 skipped, into ``counts``."""
    for w in range(trace.shape[0]):
        for h in range(trace.shape[1]):
            it = trace[w, h]
            if it >= 0:
                counts[it] += 1


@numba.njit(nogil=True, cache=True)
def _rank_batch(starts, n_walks, trace, scratch, item_visits, top_t, include_self, neg_lo, neg_hi, seed,  # type: ignore[no-untyped-def]
                row_len, top_idx, top_cnt, negs):
    """Per start: count the items its walks reached (dense ``scratch``, reset afterwards), rank them by count
    desc then id, keep the top-T and sample hard negatives from the rank window. Outputs are per start row."""
    _rank_scored(starts, n_walks, trace, scratch, item_visits, top_t, include_self, neg_lo, neg_hi, seed,
                 row_len, top_idx, top_cnt, negs, np.empty(0, np.float64), np.empty((0, 0), np.float64))


@numba.njit(inline="always", cache=True)
def _lift_order(keys, nk, per, pop_scale):  # type: ignore[no-untyped-def]
    """Reorder ``keys[:nk]`` (packed count, id) by lift ``count * pop_scale[id]`` desc, then smaller id."""
    sub = keys[:nk].copy()
    sub = sub[np.argsort(sub & 0xFFFFFFFF)]  # ids ascending (distinct): the stable sort below keeps that on ties
    neg_score = np.empty(nk, np.float64)
    for k in range(nk):
        neg_score[k] = -np.float64(per - (sub[k] >> 32)) * pop_scale[sub[k] & 0xFFFFFFFF]
    keys[:nk] = sub[np.argsort(neg_score, kind="mergesort")]


@numba.njit(nogil=True, cache=True)
def _rank_scored(starts, n_walks, trace, scratch, item_visits, top_t, include_self, neg_lo, neg_hi, seed,  # type: ignore[no-untyped-def]
                 row_len, top_idx, top_cnt, negs, pop_scale, top_score):
    """:func:`_rank_batch`, and with a non-empty ``pop_scale`` (n_items,) ``degree**-alpha`` the lift ranking:
    count * pop_scale desc, then id; ``top_score`` (B, T) then gets the kept scores normalised to sum 1 per row."""
    lift = pop_scale.shape[0] > 0
    per = n_walks * trace.shape[1]
    touched = np.empty(per, np.int64)
    keys = np.empty(per, np.int64)  # reused for every start: no allocation per start
    pool = np.empty(per, np.int64)
    n_neg = negs.shape[1]
    for b in range(starts.shape[0]):
        s = starts[b]
        nt = 0
        for w in range(b * n_walks, (b + 1) * n_walks):
            for h in range(trace.shape[1]):
                it = trace[w, h]
                if it < 0:
                    break
                if scratch[it] == 0:
                    touched[nt] = it
                    nt += 1
                scratch[it] += 1
        nk = 0
        for k in range(nt):
            it = touched[k]
            c = scratch[it]
            item_visits[it] += c
            if include_self or it != s:
                keys[nk] = (np.int64(per - c) << 32) | it  # count desc, then smaller id (ids < 2**32)
                nk += 1
            scratch[it] = 0
        if lift:
            _lift_order(keys, nk, per, pop_scale)
        elif nk <= 48:  # few distinct items (DGL's settings): insertion sort beats a library sort call
            for k in range(1, nk):
                x = keys[k]
                j = k - 1
                while j >= 0 and keys[j] > x:
                    keys[j + 1] = keys[j]
                    j -= 1
                keys[j + 1] = x
        else:
            keys[:nk].sort()
        m = min(top_t, nk)
        row_len[b] = m
        total = 0.0
        for k in range(m):
            top_idx[b, k] = keys[k] & 0xFFFFFFFF
            top_cnt[b, k] = per - (keys[k] >> 32)
            if lift:
                top_score[b, k] = np.float64(top_cnt[b, k]) * pop_scale[top_idx[b, k]]
                total += top_score[b, k]
        if lift and total > 0.0:
            for k in range(m):
                top_score[b, k] /= total
        if n_neg == 0 or nk <= top_t:
            continue
        lo = max(neg_lo, top_t)
        hi = min(neg_hi, nk)
        if lo >= hi:  # walks reached too few items: least-visited half beyond the top-T
            lo = top_t + (nk - top_t) // 2
            hi = nk
        n_pool = hi - lo
        pool[:n_pool] = keys[lo:hi]
        rk = _mix(np.uint64(seed) ^ _NEG_SALT ^ (np.uint64(s) * _GOLD))
        for k in range(min(n_neg, n_pool)):  # partial Fisher-Yates
            pick = k + np.int64(((_draw(rk, k) >> _S32) * np.uint64(n_pool - k)) >> _S32)
            x = pool[pick]
            pool[pick] = pool[k]
            pool[k] = x
            negs[b, k] = x & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------ Python wrappers


@dataclass(frozen=True)
class WalkGraph:
    """The arrays a walk needs, memory-mapped from the store, plus (only for ``bias="weight"``) each CSR's
    inclusive cumulative edge weights (float64, built once per process)."""

    store: GraphStore
    iu_cum: np.ndarray
    ui_cum: np.ndarray

    @classmethod
    def build(cls, store: GraphStore, *, weighted: bool) -> WalkGraph:
        if not weighted:
            empty = np.zeros(0, np.float64)
            return cls(store, empty, empty)
        cums = []
        for name in ("item_users", "user_items"):
            w = np.asarray(getattr(store, name).weights)
            if w.shape[0] and float(w.min()) < 0:
                raise ValueError(f"graph store {name}.weights has negative weights: bias='weight' needs weights >= 0")
            cums.append(np.cumsum(w, dtype=np.float64))
        return cls(store, cums[0], cums[1])


_CACHE: dict[tuple[str, str, bool], WalkGraph] = {}
_CACHE_LOCK = threading.Lock()


def store_token(path: str | Path) -> str:
    """Digest of a store's manifest: identifies one written version of the store."""
    return hashlib.sha256((Path(path) / GRAPH_MANIFEST).read_bytes()).hexdigest()[:16]


def cached_walk_graph(path: str | Path, token: str, *, weighted: bool) -> WalkGraph:
    """The store at ``path`` memory-mapped once per process (keyed by path, manifest digest, bias)."""
    key = (str(Path(path).resolve()), token, weighted)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            now = store_token(path)
            if now != token:
                raise ValueError(f"graph store {path} changed while the walks ran (manifest {now} != {token})")
            hit = WalkGraph.build(load_graph_store(path), weighted=weighted)
            _CACHE.clear()  # one store per process at a time
            _CACHE[key] = hit
        return hit


def no_user_trace(hops: int) -> np.ndarray:
    """The empty ``user_trace`` argument of the walk kernel: do not record the users."""
    return np.empty((0, hops), np.int64)


def _batch_starts(cfg: WalkConfig) -> int:
    return max(1, 8192 // cfg.n_walks)  # ~8k walks in flight: their state stays in L2


def walk_chunk(graph: WalkGraph | GraphStore, cfg: WalkConfig, lo: int, hi: int) -> NeighborhoodChunk:
    """Neighbourhoods of start items ``[lo, hi)`` (see :class:`NeighborhoodChunk`)."""
    g = graph if isinstance(graph, WalkGraph) else WalkGraph.build(graph, weighted=cfg.bias == "weight")
    st = g.store
    if not 0 <= lo <= hi <= st.n_items:
        raise ValueError(f"start items [{lo}, {hi}) must lie within [0, {st.n_items})")
    if st.n_items >= 2**32:
        raise ValueError(f"n_items={st.n_items}: the ranking packs item ids into 32 bits; split the item space")
    iu, ui = st.item_users, st.user_items
    n = hi - lo
    t, n_neg = cfg.top_t, cfg.n_hard_negatives
    row_len = np.zeros(n, np.int64)
    top_idx = np.zeros((n, t), np.int64)
    top_cnt = np.zeros((n, t), np.int64)
    negs = np.full((n, n_neg), -1, np.int64)
    lift = cfg.neighbor_score == "lift"
    pop_scale = degree_discount(st, cfg.lift_alpha) if lift else np.empty(0, np.float64)
    top_score = np.zeros((n, t) if lift else (0, 0), np.float64)
    if n * cfg.n_walks * cfg.hops >= 2**31:
        raise ValueError(f"walks.chunk_items={cfg.chunk_items}: chunk_items*n_walks*hops must stay below 2**31 "
                         "(per-chunk visit counts are int32, which keeps them in the L2 cache); lower it")
    item_visits = np.zeros(st.n_items, np.int32)  # int32: half the cache footprint of the scatter increments
    user_visits = np.zeros(st.n_users, np.int32)
    scratch = np.zeros(st.n_items, np.int32)
    bs = _batch_starts(cfg)
    trace = np.empty((bs * cfg.n_walks, cfg.hops), np.int64)
    steps = 0
    weighted = cfg.bias == "weight"
    neg_lo, neg_hi = (int(x) for x in cfg.hard_negative_ranks)
    for b0 in range(lo, hi, bs):
        b1 = min(b0 + bs, hi)
        starts = np.arange(b0, b1, dtype=np.int64)
        tr = trace[: (b1 - b0) * cfg.n_walks]
        steps += _walk_batch(iu.indptr, iu.indices, g.iu_cum, ui.indptr, ui.indices, g.ui_cum, weighted, starts,
                             cfg.n_walks, cfg.hops, cfg.mode == "restart", float(cfg.walk_prob), cfg.seed, tr,
                             user_visits, True, no_user_trace(cfg.hops))
        r0, r1 = b0 - lo, b1 - lo
        _rank_scored(starts, cfg.n_walks, tr, scratch, item_visits, t, cfg.include_self, neg_lo, neg_hi, cfg.seed,
                     row_len[r0:r1], top_idx[r0:r1], top_cnt[r0:r1], negs[r0:r1], pop_scale,
                     top_score[r0:r1] if lift else top_score)
    mask = np.arange(t)[None, :] < row_len[:, None]  # (n, T)
    weights = (top_score if lift else top_cnt)[mask].astype(np.float32)
    return NeighborhoodChunk(lo, hi, row_len, top_idx[mask], weights, negs, item_visits, user_visits, int(steps))


def degree_discount(store: GraphStore, alpha: float) -> np.ndarray:
    """``degree(j) ** -alpha`` of every item (degree: interactions in the store; 0 for an item without any, which
    no walk reaches). Shapes: (n_items,) float64."""
    deg = np.diff(np.asarray(store.item_users.indptr)).astype(np.float64)
    out = np.zeros(deg.shape, np.float64)
    np.power(deg, -float(alpha), out=out, where=deg > 0)
    return out


def walk_visits(graph: WalkGraph | GraphStore, starts: np.ndarray, cfg: WalkConfig, *,
                count_users: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """One walk per entry of ``starts`` (item ids; repeat an id for more walks, each repeat is walk 0 of that
    item, so pass distinct ``cfg.seed`` s or use :func:`walk_chunk` for independent walks of one item).

    Returns ``(item_visits (n_items,) int64, user_visits (n_users,) int64, steps)``; ``cfg.n_walks`` is ignored.
    ``count_users`` (True): count the visits; False only walks (both count vectors stay zero), for timing.
    """
    g = graph if isinstance(graph, WalkGraph) else WalkGraph.build(graph, weighted=cfg.bias == "weight")
    st = g.store
    starts = np.asarray(starts, dtype=np.int64)
    if starts.size and (starts.min() < 0 or starts.max() >= st.n_items):
        raise ValueError(f"starts must be item ids in [0, {st.n_items})")
    iu, ui = st.item_users, st.user_items
    if starts.shape[0] * cfg.hops >= 2**31:
        raise ValueError(f"{starts.shape[0]} starts * hops={cfg.hops} must stay below 2**31; split the starts")
    item_visits = np.zeros(st.n_items, np.int64)
    user_visits = np.zeros(st.n_users, np.int32)
    bs = 8192
    trace = np.empty((bs, cfg.hops), np.int64)
    steps = 0
    for b0 in range(0, starts.shape[0], bs):
        s = starts[b0 : b0 + bs]
        tr = trace[: s.shape[0]]
        steps += _walk_batch(iu.indptr, iu.indices, g.iu_cum, ui.indptr, ui.indices, g.ui_cum,
                             cfg.bias == "weight", s, 1, cfg.hops, cfg.mode == "restart", float(cfg.walk_prob),
                             cfg.seed, tr, user_visits, count_users, no_user_trace(cfg.hops))
        if count_users:
            _count_items(tr, item_visits)
    return item_visits, user_visits.astype(np.int64), int(steps)


def chunk_bounds(n_items: int, chunk_items: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk_items, n_items)) for lo in range(0, n_items, chunk_items)]


def merge_chunks(chunks: list[NeighborhoodChunk], *, n_items: int, n_users: int,
                 n_hard_negatives: int) -> Neighborhoods:
    """Stitch chunks (any order, covering ``[0, n_items)`` once) into :class:`Neighborhoods`."""
    chunks = sorted(chunks, key=lambda c: c.lo)
    pos = 0
    for c in chunks:
        if c.lo != pos:
            raise ValueError(f"chunks do not tile the items: expected a chunk starting at {pos}, got {c.lo}")
        pos = c.hi
    if pos != n_items:
        raise ValueError(f"chunks cover items [0, {pos}) but the graph has {n_items}")
    item_visits = np.zeros(n_items, np.int64)
    user_visits = np.zeros(n_users, np.int64)
    for c in chunks:
        item_visits += c.item_visits
        user_visits += c.user_visits
    return assemble(chunks, item_visits, user_visits, n_hard_negatives=n_hard_negatives)


def assemble(chunks: list[NeighborhoodChunk], item_visits: np.ndarray, user_visits: np.ndarray, *,
             n_hard_negatives: int) -> Neighborhoods:
    """Neighbourhoods from tiled chunks (sorted by ``lo``) and total visit counts."""
    lengths = np.concatenate([c.row_lengths for c in chunks]) if chunks else np.zeros(0, np.int64)
    indptr = np.zeros(lengths.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    cat = np.concatenate
    return Neighborhoods(
        indptr=indptr,
        indices=cat([c.indices for c in chunks]) if chunks else np.zeros(0, np.int64),
        weights=cat([c.weights for c in chunks]) if chunks else np.zeros(0, np.float32),
        item_importance=normalise(item_visits),
        user_importance=normalise(user_visits),
        hard_negatives=(cat([c.hard_negatives for c in chunks]) if chunks
                        else np.zeros((0, n_hard_negatives), np.int64)),
    )


def normalise(counts: np.ndarray) -> np.ndarray:
    """Counts as float32 shares summing to 1 (all zeros when there is no count)."""
    total = float(counts.sum())
    if total == 0:
        return np.zeros(counts.shape, np.float32)
    return (counts / total).astype(np.float32)


def compute_neighborhoods(store: GraphStore, cfg: WalkConfig, *, n_threads: int = 1,
                          backend: Literal["cpu", "gpu"] = "cpu") -> Neighborhoods:
    """Neighbourhoods of every item in this process.

    ``n_threads`` (1): chunks of ``cfg.chunk_items`` starts run on that many threads (the kernel releases the
    GIL); ``backend`` (``"cpu"``): ``"gpu"`` runs cuGraph (``gnn/walks_gpu.py``). The result does not depend on
    ``n_threads`` or ``chunk_items``.
    """
    if n_threads < 1:
        raise ValueError(f"n_threads={n_threads!r}: must be at least 1")
    if backend == "gpu":
        from gnn.walks_gpu import gpu_neighborhoods

        return gpu_neighborhoods(store, cfg)
    if store.n_items == 0:
        raise ValueError("the graph store has no items: nothing to walk from; check the graph stage's input")
    g = WalkGraph.build(store, weighted=cfg.bias == "weight")
    bounds = chunk_bounds(store.n_items, cfg.chunk_items)
    item_visits = np.zeros(store.n_items, np.int64)
    user_visits = np.zeros(store.n_users, np.int64)
    rows: list[NeighborhoodChunk] = []
    empty = np.zeros(0, np.int32)

    def keep(chunk: NeighborhoodChunk) -> None:  # fold the dense counts in at once: memory O(items + users)
        np.add(item_visits, chunk.item_visits, out=item_visits)
        np.add(user_visits, chunk.user_visits, out=user_visits)
        rows.append(dataclasses.replace(chunk, item_visits=empty, user_visits=empty))

    if n_threads == 1:
        for lo, hi in bounds:
            keep(walk_chunk(g, cfg, lo, hi))
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            for w0 in range(0, len(bounds), 2 * n_threads):  # a bounded window of chunks in flight
                window = [pool.submit(walk_chunk, g, cfg, lo, hi) for lo, hi in bounds[w0 : w0 + 2 * n_threads]]
                for fut in window:
                    keep(fut.result())
    return assemble(rows, item_visits, user_visits, n_hard_negatives=cfg.n_hard_negatives)
