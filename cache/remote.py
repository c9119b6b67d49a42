"""``RemoteRowCache``: a trainer's rows of other shards' items, in front of the fetch interface.

``get(ids)`` answers the rows of any items (local ones from the trainer's own shard table, remote ones from the
cache or their owners) in the order asked, with one fetch per owner per call for the misses, issued to all owners
at once through ``fetch_async``. Usage::

    cache = RemoteRowCache(CacheConfig("importance", capacity_fraction=0.1), fetcher=transport,
                           owner_of=owner, local_rank=rank, local=own_table, importance=visit_counts)
    cache.fill()                       # static policies: one bulk fetch per owner before training
    block = cache.get(batch_ids)       # RowBlock in the order of batch_ids

Evolving graph: with ``CacheConfig(max_staleness=k)`` and ``current_version`` (a callable giving the graph's
current version number), rows carry the version they were read from (``RowBlock.version``); a cached row more than
``k`` versions behind is treated as a miss, fetched again and replaced in its slot (any policy, static ones too).

Locking: one lock guards the id → slot map, the slot arrays, the LRU order and the counters. A ``get`` holds it
twice, briefly: to look up and copy the hits, and to insert the fetched misses (LRU) and count. The fetches run
outside the lock, so several producer threads fetch at once. Two threads missing the same row both fetch it; the
second insertion is skipped. Evicting a row that another thread just read is safe: hits are copied under the lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from cache.config import CacheConfig
from cache.policies import remote_items, select_by_importance, select_random
from cache.rows import RowBlock, row_nbytes
from cache.stats import CacheStats
from cache.transport import CountedFetcher, LocalOwnerTable, RowFetcher, TransportStats

log = logging.getLogger(__name__)


class RemoteRowCache:
    """Rows of remote vertices for one trainer (shard ``local_rank``).

    Args:
        config: policy and capacity (:class:`CacheConfig`).
        fetcher: the transport to the owners (:class:`RowFetcher`); wrapped in a :class:`CountedFetcher` unless it
            is one already, so :attr:`transport_stats` counts every byte this trainer receives.
        owner_of: (n_items,) integer owner shard of each item (``owner.npy`` of the partition stage).
        local_rank: this trainer's shard.
        local: this shard's own :class:`LocalOwnerTable` (default None: ``get`` of a local id raises). Also gives
            the row shape for ``capacity_bytes``.
        importance: (n_items,) importance for the ``importance`` policy (visit counts or pre-sampled access counts).
        row_nbytes: payload bytes of one row (default None: from ``local``), needed with ``capacity_bytes``.
        current_version: ``() -> int``, the current graph version (default None); needed with
            ``config.max_staleness``.

    Shapes: ``get(ids)``: ids (n,) int64 → RowBlock of n rows.
    """

    def __init__(self, config: CacheConfig, *, fetcher: RowFetcher, owner_of: np.ndarray, local_rank: int,
                 local: LocalOwnerTable | None = None, importance: np.ndarray | None = None,
                 row_nbytes: int | None = None, current_version: Callable[[], int] | None = None) -> None:
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config={config!r}: pass a cache.CacheConfig")
        owner_of = np.asarray(owner_of)
        if owner_of.ndim != 1 or not np.issubdtype(owner_of.dtype, np.integer):
            raise ValueError(f"owner_of has shape {owner_of.shape}, dtype {owner_of.dtype}: pass (n_items,) ints")
        if importance is not None and np.asarray(importance).shape != owner_of.shape:
            raise ValueError(f"importance has shape {np.asarray(importance).shape}: one value per item "
                             f"({owner_of.shape[0]})")
        if config.policy == "importance" and importance is None:
            raise ValueError("importance=None with policy='importance': pass the (n_items,) visit counts "
                             "(or count_accesses of a pre-sampling pass)")
        if config.max_staleness is not None and current_version is None:
            raise ValueError(f"max_staleness={config.max_staleness} needs current_version=<callable giving the "
                             "graph's version number> (e.g. lambda: live.current.number)")
        self.config = config
        self.current_version = current_version
        self.owner_of = owner_of
        self.local_rank = int(local_rank)
        self.local = local
        self.importance = None if importance is None else np.asarray(importance)
        self.fetcher = fetcher if isinstance(fetcher, CountedFetcher) else CountedFetcher(fetcher)
        self.n_remote = int(np.count_nonzero(owner_of != self.local_rank))
        if row_nbytes is None and local is not None:
            row_nbytes = _row_bytes_of(local)
        self.row_nbytes = row_nbytes
        self.capacity_rows = self._capacity_rows()

        self._lock = threading.Lock()
        self._slot_of = np.full(owner_of.shape[0], -1, np.int64)  # item id -> slot, -1 = not cached
        self._slot_ids = np.full(self.capacity_rows, -1, np.int64)  # slot -> item id
        self._free: list[int] = list(range(self.capacity_rows - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # recency order (lru policy only), oldest first
        self._store: RowBlock | None = None  # slot arrays, allocated on the first insertion
        self._filled = False
        self._c = dict.fromkeys(("requests", "hits", "misses", "local_rows", "fetches", "rows_fetched",
                                 "bytes_fetched", "bytes_saved", "fill_rows", "fill_bytes", "insertions",
                                 "evictions", "refreshes"), 0)

    # ---------------------------------------------------------------------------------------------- capacity

    def _capacity_rows(self) -> int:
        cfg = self.config
        if cfg.policy == "none":
            return 0
        if cfg.capacity_bytes is not None:
            if not self.row_nbytes:
                raise ValueError("capacity_bytes needs the row size: pass local=<own LocalOwnerTable> or "
                                 "row_nbytes=<bytes of one row>, or use capacity_fraction")
            return min(cfg.capacity_bytes // self.row_nbytes, self.n_remote)
        return int(np.floor(float(cfg.capacity_fraction or 0.0) * self.n_remote + 1e-9))

    @property
    def transport_stats(self) -> TransportStats:
        return self.fetcher.stats

    # ---------------------------------------------------------------------------------------------- filling

    def fill(self) -> int:
        """Load a static policy's rows: one bulk fetch per owner. Returns the rows loaded (0 for lru / none)."""
        if not self.config.static or self.capacity_rows == 0:
            self._filled = True
            return 0
        cand = remote_items(self.owner_of, self.local_rank)
        if self.config.policy == "importance":
            importance = self.importance if self.importance is not None else np.zeros(self.owner_of.shape[0])
            chosen = select_by_importance(cand, importance, self.capacity_rows)
        else:
            chosen = select_random(cand, self.capacity_rows, seed=self.config.seed)
        blocks = self._fetch_grouped(chosen)
        with self._lock:
            for block in blocks:
                self._c["fill_rows"] += block.n_rows
                self._c["fill_bytes"] += block.nbytes
                self._insert(block)
            self._filled = True
            self._check()
        log.info("cache %s shard %d: filled %d of %d remote rows (%d B)", self.config.policy, self.local_rank,
                 chosen.shape[0], self.n_remote, self._c["fill_bytes"])
        return int(chosen.shape[0])

    # ---------------------------------------------------------------------------------------------- lookups

    def get(self, ids: np.ndarray) -> RowBlock:
        """Rows of ``ids`` (n,) int64 in that order (duplicates allowed); remote misses fetched, one call per owner."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"ids has shape {ids.shape}, dtype {ids.dtype}: pass a 1-d array of item ids")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= self.owner_of.shape[0]):
            raise ValueError(f"ids must lie in [0, {self.owner_of.shape[0]}): got {ids.min()}..{ids.max()}")
        if self.config.static and not self._filled:
            raise RuntimeError(f"policy {self.config.policy!r}: call fill() once before get()")
        uniq, inverse = np.unique(ids, return_inverse=True)
        is_local = self.owner_of[uniq] == self.local_rank
        remote = uniq[~is_local]

        floor = self._version_floor()
        # 1. hits: look up and copy under the lock (rows older than the staleness bound count as misses)
        with self._lock:
            slots = self._slot_of[remote]
            hit = slots >= 0
            if floor is not None and self._store is not None and self._store.version is not None and hit.any():
                hit[hit] = self._store.version[slots[hit]] >= floor
            hit_block = self._store.take(slots[hit]) if self._store is not None and hit.any() else None
            if self.config.policy == "lru":
                for i in remote[hit].tolist():
                    self._lru.move_to_end(i)
        misses = remote[~hit]

        # 2. misses from their owners (all owners at once) and local rows, outside the lock
        pending = self._submit_grouped(misses)
        local_block = None
        if is_local.any():
            if self.local is None:
                raise ValueError(f"ids {uniq[is_local][:3].tolist()} are owned by this shard ({self.local_rank}) "
                                 "but the cache has no local table: pass local=<LocalOwnerTable>")
            local_block = self.local.take(uniq[is_local])
        fetched = [f.result() for f in pending]

        # 3. insert (lru) and count
        with self._lock:
            c = self._c
            c["requests"] += int(remote.shape[0])
            c["hits"] += int(hit.sum())
            c["misses"] += int(misses.shape[0])
            c["local_rows"] += int(is_local.sum())
            c["fetches"] += len(fetched)
            for block in fetched:
                c["rows_fetched"] += block.n_rows
                c["bytes_fetched"] += block.nbytes
            if hit_block is not None:
                c["bytes_saved"] += hit_block.nbytes
            if floor is not None:
                for block in fetched:
                    self._replace(block)
            if self.config.policy == "lru":
                for block in fetched:
                    self._insert(block)
            self._check()

        parts = [b for b in (hit_block, local_block, *fetched) if b is not None]
        if not parts:
            return self._empty()
        block = RowBlock.concat(parts)
        # block holds each distinct id once, in some order; put it in the order of uniq, then of ids
        order = np.argsort(block.ids, kind="stable")
        return block.take(order[inverse])

    def _version_floor(self) -> int | None:
        """The oldest version a served row may have, or None when rows are never refreshed."""
        if self.config.max_staleness is None or self.current_version is None:
            return None
        return int(self.current_version()) - self.config.max_staleness

    def _replace(self, block: RowBlock) -> None:
        """Overwrite the cached rows among ``block``'s with the fetched ones (caller holds the lock)."""
        if block.version is None:
            raise ValueError("rows without version arrived at a cache with max_staleness: the owners must stamp "
                             "each row with its graph version (RowBlock.version)")
        store = self._store
        if store is None or block.n_rows == 0:
            return
        slots = self._slot_of[block.ids]
        cached = slots >= 0
        if store.version is not None:  # never overwrite a fresher row another thread cached meanwhile
            cached[cached] = block.version[cached] >= store.version[slots[cached]]
        if not cached.any():
            return
        s, rows = slots[cached], np.flatnonzero(cached)
        store.features[s] = block.features[rows]
        store.neighbors[s] = block.neighbors[rows]
        store.neighbor_weights[s] = block.neighbor_weights[rows]
        if store.version is not None:
            store.version[s] = block.version[rows]
        self._c["refreshes"] += int(rows.shape[0])

    def _submit_grouped(self, ids: np.ndarray) -> list[Future[RowBlock]]:
        if ids.size == 0:
            return []
        owners = self.owner_of[ids]
        futures = []
        for owner in np.unique(owners).tolist():
            futures.append(self.fetcher.fetch_async(int(owner), ids[owners == owner]))
        return futures

    def _fetch_grouped(self, ids: np.ndarray) -> list[RowBlock]:
        return [f.result() for f in self._submit_grouped(ids)]

    # ---------------------------------------------------------------------------------------------- storage

    def _insert(self, block: RowBlock) -> None:
        """Insert ``block``'s rows not yet cached (caller holds the lock); lru evicts the oldest rows."""
        if self.capacity_rows == 0 or block.n_rows == 0:
            return
        new = self._slot_of[block.ids] < 0
        if not new.any():
            return
        block = block.take(np.flatnonzero(new)) if not new.all() else block
        if block.n_rows > self.capacity_rows:  # they would only evict each other: keep the last ones
            block = block.take(np.arange(block.n_rows - self.capacity_rows, block.n_rows))
        if self._store is None:
            self._allocate(block)
        need = block.n_rows - len(self._free)
        if need > 0:
            if self.config.policy != "lru":
                raise RuntimeError(f"static cache is full: {need} rows more than capacity {self.capacity_rows}")
            for _ in range(need):
                old, _ = self._lru.popitem(last=False)
                slot = int(self._slot_of[old])
                self._slot_of[old] = -1
                self._slot_ids[slot] = -1
                self._free.append(slot)
            self._c["evictions"] += need
        slots = np.array([self._free.pop() for _ in range(block.n_rows)], dtype=np.int64)
        store = self._store
        if store is None:  # pragma: no cover - allocated above
            raise RuntimeError("cache storage missing")
        store.features[slots] = block.features
        store.neighbors[slots] = block.neighbors
        store.neighbor_weights[slots] = block.neighbor_weights
        if store.version is not None:
            if block.version is None:
                raise ValueError("rows without version inserted into a versioned cache: version all rows or none")
            store.version[slots] = block.version
        store.ids[slots] = block.ids
        self._slot_of[block.ids] = slots
        self._slot_ids[slots] = block.ids
        if self.config.policy == "lru":
            self._lru.update(dict.fromkeys(block.ids.tolist()))
        self._c["insertions"] += block.n_rows

    def _allocate(self, block: RowBlock) -> None:
        cap = self.capacity_rows
        if self.row_nbytes is not None and self.row_nbytes != block.row_nbytes:
            raise ValueError(f"rows of {block.row_nbytes} B arrived, the cache was sized for row_nbytes="
                             f"{self.row_nbytes}: pass the row size of the owners' tables")
        self.row_nbytes = block.row_nbytes
        self._store = RowBlock(
            ids=np.full(cap, -1, np.int64),
            features=np.zeros((cap, block.n_features), np.float32),
            neighbors=np.zeros((cap, block.n_neighbors), np.int64),
            neighbor_weights=np.zeros((cap, block.n_neighbors), np.float32),
            version=None if block.version is None else np.zeros(cap, np.int64),
        )

    def _empty(self) -> RowBlock:
        if self._store is not None:
            return RowBlock.empty(self._store.n_features, self._store.n_neighbors)
        if self.local is not None:
            return RowBlock.empty(self.local.n_features, self.local.n_neighbors)
        return RowBlock.empty(0, 0)

    # ---------------------------------------------------------------------------------------------- state

    @property
    def used_rows(self) -> int:
        return self.capacity_rows - len(self._free)

    def _check(self) -> None:
        used = self.used_rows
        if used > self.capacity_rows or (self.config.policy == "lru" and len(self._lru) != used):
            raise RuntimeError(f"cache invariant broken: {used} rows used, capacity {self.capacity_rows}, "
                               f"lru order {len(self._lru)}")

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which ``ids`` are cached now."""
        with self._lock:
            return self._slot_of[np.asarray(ids, dtype=np.int64)] >= 0

    def cached_ids(self) -> np.ndarray:
        """Sorted ids of the cached rows."""
        with self._lock:
            return np.sort(self._slot_ids[self._slot_ids >= 0])

    @property
    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters (raises if an invariant is broken)."""
        with self._lock:
            rb = self.row_nbytes or 0
            return CacheStats(policy=self.config.policy, **self._c, used_rows=self.used_rows,
                              used_bytes=self.used_rows * rb, capacity_rows=self.capacity_rows,
                              capacity_bytes=self.capacity_rows * rb)

    def __repr__(self) -> str:
        s = self.stats
        return (f"RemoteRowCache(policy={self.config.policy}, shard={self.local_rank}, "
                f"rows={s.used_rows}/{s.capacity_rows} of {self.n_remote} remote, hit_rate={s.hit_rate:.1%})")


def _row_bytes_of(table: LocalOwnerTable) -> int:
    return row_nbytes(table.n_features, table.n_neighbors)
