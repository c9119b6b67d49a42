"""Remote rows through Dask (ARCHITECTURE.md, decision 4): one ``ShardServer`` actor per shard owner.

A trainer asks each owner for the rows of its remote vertices once per minibatch with one actor call
(an ``ActorFuture``, so producers can prefetch while the trainer computes). Why an actor and not a task
pinned to the owner: a pinned task pays a scheduler round trip per request (44–47 ms measured here) while
an actor call goes worker to worker (2–5 ms for 64 KB–1 MB); ``all_to_all`` on gloo would force every
rank to fetch in lockstep. Actors are not recovered when their worker dies and do not show on the
dashboard: the launcher ends the job when a worker leaves, and the traffic is counted by the caller
(cache/ ``TransportStats``) and by the server itself (:meth:`ShardServer.stats`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class ShardServer:
    """Serves the rows of the items one shard owns.

    Shapes: ``items`` (n,) int64 sorted global ids; ``features`` (n, F) float32; ``neighbors`` (n, T) int64;
    ``neighbor_weights`` (n, T) float32. ``take(ids)`` returns the rows of ``ids`` (all owned) in order.
    """

    def __init__(self, items: np.ndarray, features: np.ndarray, neighbors: np.ndarray,
                 neighbor_weights: np.ndarray, *, rank: int = 0) -> None:
        items = np.asarray(items, dtype=np.int64)
        if items.size and np.any(np.diff(items) <= 0):
            raise ValueError("items must be sorted and unique: pass the shard's items.npy as written by partition")
        n = items.shape[0]
        for name, arr in (("features", features), ("neighbors", neighbors), ("neighbor_weights", neighbor_weights)):
            if arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} rows for {n} items: one row per owned item")
        self.rank = rank
        self.items = items
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self.neighbors = np.ascontiguousarray(neighbors, dtype=np.int64)
        self.neighbor_weights = np.ascontiguousarray(neighbor_weights, dtype=np.float32)
        self._lock = threading.Lock()
        self._requests = 0
        self._rows = 0
        self._bytes = 0

    def local_index(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.items, ids)
        ok = (pos < self.items.shape[0]) & (self.items[np.minimum(pos, self.items.shape[0] - 1)] == ids)
        if not np.all(ok):
            bad = ids[~ok][:3].tolist()
            raise KeyError(f"shard {self.rank} does not own items {bad}: the caller's owner map is stale")
        return pos

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features (n, F), neighbors (n, T), neighbor_weights (n, T)) of the owned ``ids``."""
        pos = self.local_index(ids)
        out = (self.features[pos], self.neighbors[pos], self.neighbor_weights[pos])
        with self._lock:
            self._requests += 1
            self._rows += int(pos.shape[0])
            self._bytes += sum(int(a.nbytes) for a in out)
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"rank": self.rank, "requests": self._requests, "rows": self._rows, "bytes": self._bytes}
