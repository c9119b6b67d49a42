"""The fetch interface the cache sits in front of: ``RowFetcher`` (trainer side), ``LocalOwnerTable`` (owner side).

A trainer asks an owner for the rows of some of its items with ``fetch(owner, ids)`` or, to prefetch while it
computes, ``fetch_async(owner, ids) -> Future[RowBlock]``. :class:`CountedFetcher` wraps any transport and counts
requests, rows and bytes per owner in :class:`TransportStats`: this is the one place where remote traffic is
counted. In tests and in one process the transport is :class:`TableFetcher` over :class:`LocalOwnerTable` s; on a
Dask cluster it is a fetcher over the owners' ``ShardServer`` actors (pipeline/), with the same interface.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cache.rows import RowBlock

log = logging.getLogger(__name__)


@runtime_checkable
class RowFetcher(Protocol):
    """Transport of rows from their owner. ``ids`` (n,) int64, all owned by ``owner``; the block's rows are in the
    order of ``ids``. ``fetch_async`` must not block on the transfer; its future raises what ``fetch`` would."""

    def fetch(self, owner: int, ids: np.ndarray) -> RowBlock: ...

    def fetch_async(self, owner: int, ids: np.ndarray) -> Future[RowBlock]: ...


# ------------------------------------------------------------------------------------------------ owner side


class LocalOwnerTable:
    """The rows of the items one shard owns, served by ``take(ids)``.

    Shapes: ``items`` (n,) int64 sorted unique global ids (``shard-<k>/items.npy`` of the partition stage);
    ``features`` (n, F) float32; ``neighbors`` (n, T) int64; ``neighbor_weights`` (n, T) float32.
    Read-only after construction, so any number of threads may call :meth:`take` at once.
    """

    def __init__(self, items: np.ndarray, features: np.ndarray, neighbors: np.ndarray,
                 neighbor_weights: np.ndarray, *, owner: int = 0) -> None:
        items = np.asarray(items, dtype=np.int64)
        if items.ndim != 1 or (items.size and np.any(np.diff(items) <= 0)):
            raise ValueError("items must be a sorted 1-d array of unique ids: pass the shard's items.npy")
        self.owner = int(owner)
        self.items = items
        # RowBlock validates shapes and dtypes once; rows are then served by fancy indexing (a copy).
        self._rows = RowBlock(items, features, neighbors, neighbor_weights)

    @property
    def n_items(self) -> int:
        return int(self.items.shape[0])

    @property
    def n_features(self) -> int:
        return self._rows.n_features

    @property
    def n_neighbors(self) -> int:
        return self._rows.n_neighbors

    def local_index(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` (n,) in this table; KeyError naming the first foreign ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.items.size == 0:
            if ids.size:
                raise KeyError(f"shard {self.owner} owns no items, asked for {ids[:3].tolist()}")
            return np.empty(0, np.int64)
        pos = np.searchsorted(self.items, ids)
        ok = (pos < self.items.shape[0]) & (self.items[np.minimum(pos, self.items.shape[0] - 1)] == ids)
        if not np.all(ok):
            raise KeyError(f"shard {self.owner} does not own items {ids[~ok][:3].tolist()}: the owner map is stale")
        return pos

    def take(self, ids: np.ndarray) -> RowBlock:
        """The rows of the owned ``ids`` (n,), in that order, duplicates allowed."""
        return self._rows.take(self.local_index(ids))

    def __repr__(self) -> str:
        return f"LocalOwnerTable(owner={self.owner}, n_items={self.n_items}, F={self.n_features}, T={self.n_neighbors})"


class RowSource(Protocol):
    """An owner: ``take(ids)`` answers the rows of ``ids`` as a :class:`RowBlock`, a ``(features, neighbors,
    neighbor_weights)`` tuple (``pipeline.rowserver.ShardServer``), or a future-like with ``result()`` giving
    either (a Dask ``ActorFuture`` of a ShardServer actor)."""

    def take(self, ids: np.ndarray) -> Any: ...


def as_row_block(ids: np.ndarray, answer: Any) -> RowBlock:
    """The :class:`RowBlock` of an owner's answer for ``ids`` (see :class:`RowSource`)."""
    if hasattr(answer, "result") and not isinstance(answer, RowBlock | tuple):
        answer = answer.result()
    if isinstance(answer, RowBlock):
        return answer
    if isinstance(answer, tuple | list):
        return RowBlock.from_arrays(ids, answer)
    raise TypeError(f"an owner answered {type(answer).__name__}: take(ids) must give a RowBlock or a "
                    "(features, neighbors, neighbor_weights) tuple")


class TableFetcher:
    """Transport over owner objects: ``tables[owner].take(ids)`` (:class:`LocalOwnerTable` in one process, or
    ``ShardServer`` actors on a Dask cluster — anything matching :class:`RowSource`).

    ``max_workers`` (default 0): 0 answers ``fetch_async`` at once with a finished future; > 0 runs the takes on a
    thread pool of that size, so that the calls to several owners overlap (use it with actors, whose ``take``
    returns a future to wait on). Call :meth:`close` to stop the pool.
    """

    def __init__(self, tables: Mapping[int, RowSource], *, max_workers: int = 0) -> None:
        if max_workers < 0:
            raise ValueError(f"max_workers={max_workers}: must be >= 0 (0 = synchronous)")
        self.tables = dict(tables)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="row-fetch") if max_workers else None

    def fetch(self, owner: int, ids: np.ndarray) -> RowBlock:
        table = self.tables.get(int(owner))
        if table is None:
            raise KeyError(f"no owner table for shard {owner}: known shards are {sorted(self.tables)}")
        ids = np.asarray(ids, dtype=np.int64)
        return as_row_block(ids, table.take(ids))

    def fetch_async(self, owner: int, ids: np.ndarray) -> Future[RowBlock]:
        if self._pool is not None:
            return self._pool.submit(self.fetch, owner, ids)
        fut: Future[RowBlock] = Future()
        try:
            fut.set_result(self.fetch(owner, ids))
        except Exception as e:
            fut.set_exception(e)
        return fut

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------ accounting


@dataclass
class OwnerTraffic:
    """Traffic to one owner: requests (calls), rows received, payload bytes received, request bytes sent (ids)."""

    requests: int = 0
    rows: int = 0
    bytes: int = 0
    request_bytes: int = 0
    failures: int = 0

    def add(self, other: OwnerTraffic) -> None:
        self.requests += other.requests
        self.rows += other.rows
        self.bytes += other.bytes
        self.request_bytes += other.request_bytes
        self.failures += other.failures


@dataclass
class TransportStats:
    """Requests, rows and bytes per owner at the fetch interface (thread-safe; mergeable across workers)."""

    per_owner: dict[int, OwnerTraffic] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_request(self, owner: int, n_ids: int) -> None:
        with self._lock:
            t = self.per_owner.setdefault(int(owner), OwnerTraffic())
            t.requests += 1
            t.request_bytes += 8 * n_ids

    def record_reply(self, owner: int, block: RowBlock) -> None:
        with self._lock:
            t = self.per_owner.setdefault(int(owner), OwnerTraffic())
            t.rows += block.n_rows
            t.bytes += block.nbytes

    def record_failure(self, owner: int) -> None:
        with self._lock:
            self.per_owner.setdefault(int(owner), OwnerTraffic()).failures += 1

    def total(self) -> OwnerTraffic:
        out = OwnerTraffic()
        with self._lock:
            for t in self.per_owner.values():
                out.add(t)
        return out

    @property
    def requests(self) -> int:
        return self.total().requests

    @property
    def rows(self) -> int:
        return self.total().rows

    @property
    def bytes(self) -> int:
        return self.total().bytes

    def merge(self, other: TransportStats) -> TransportStats:
        """A new TransportStats with the sum of both (per owner)."""
        out = TransportStats()
        for src in (self, other):
            with src._lock:
                for owner, t in src.per_owner.items():
                    out.per_owner.setdefault(owner, OwnerTraffic()).add(t)
        return out

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            owners = {str(o): vars(t).copy() for o, t in sorted(self.per_owner.items())}
        return {"total": vars(self.total()).copy(), "per_owner": owners}

    def __repr__(self) -> str:
        t = self.total()
        return (f"TransportStats(owners={len(self.per_owner)}, requests={t.requests}, rows={t.rows}, "
                f"bytes={t.bytes}, request_bytes={t.request_bytes}, failures={t.failures})")


class CountedFetcher:
    """Wraps a transport and counts every request and reply in :attr:`stats` (the one counting interface)."""

    def __init__(self, inner: RowFetcher, stats: TransportStats | None = None) -> None:
        if not isinstance(inner, RowFetcher):
            raise TypeError(f"inner={inner!r}: must have fetch(owner, ids) and fetch_async(owner, ids)")
        self.inner = inner
        self.stats = stats if stats is not None else TransportStats()

    def fetch(self, owner: int, ids: np.ndarray) -> RowBlock:
        ids = np.asarray(ids, dtype=np.int64)
        self.stats.record_request(owner, ids.shape[0])
        try:
            block = self.inner.fetch(owner, ids)
        except Exception:
            self.stats.record_failure(owner)
            raise
        self.stats.record_reply(owner, block)
        return block

    def fetch_async(self, owner: int, ids: np.ndarray) -> Future[RowBlock]:
        ids = np.asarray(ids, dtype=np.int64)
        self.stats.record_request(owner, ids.shape[0])
        inner = self.inner.fetch_async(owner, ids)
        # The caller gets a second future, finished only after the reply is counted: a waiter on the inner one
        # could otherwise read the stats before the callback ran.
        outer: Future[RowBlock] = Future()

        def count(f: Future[RowBlock]) -> None:
            err = BaseException("fetch cancelled") if f.cancelled() else f.exception()
            if err is not None:
                self.stats.record_failure(owner)
                outer.set_exception(err)
            else:
                block = f.result()
                self.stats.record_reply(owner, block)
                outer.set_result(block)

        inner.add_done_callback(count)
        return outer
