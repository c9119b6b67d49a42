"""A trainer's row sources over its shard and the remote-row cache: what the samplers call on a Dask worker.

:class:`ShardRows` answers the two seams of ``gnn.sampler`` — ``rows(ids)`` (input features) and
``neighbors(ids)`` (top-T neighbour ids and weights) — from one ``cache.RemoteRowCache.get`` per call: local items
from the shard's own table, remote ones from the cache or, for misses, from their owners' ``ShardServer`` actors
(one call per owner, all owners at once). Within one minibatch a row is asked for once: the PinSage sampler calls
``neighbors`` per hop and ``rows`` for the last hop, and every hop's node list extends the previous one, so the
rows already received in this batch are kept in a per-thread memo (:meth:`ShardRows.batch`). Producer threads
each build their own batch, so the fetches of the next batches run while the trainer computes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from cache import RemoteRowCache, RowBlock, TableFetcher
from gnn.sampler import Sampler, Subgraph


class ShardRows:
    """Row and neighbour source of one trainer, through ``cache``.

    Shapes: ``rows(ids (n,)) -> (n, F) float32 tensor``; ``neighbors(ids (n,)) -> (ids (n, T) int64 (-1 = none),
    weights (n, T) float32)``.
    """

    def __init__(self, cache: RemoteRowCache) -> None:
        self.cache = cache
        self._tls = threading.local()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Rows received inside the block are reused by later calls of the same thread in the block."""
        self._tls.memo = None
        self._tls.active = True
        try:
            yield
        finally:
            self._tls.memo = None
            self._tls.active = False

    def block(self, ids: np.ndarray) -> RowBlock:
        """The rows of ``ids`` (n,) in that order (duplicates allowed)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not getattr(self._tls, "active", False):
            return self.cache.get(ids)
        memo: RowBlock | None = self._tls.memo
        uniq = np.unique(ids)
        if memo is None:
            memo = self.cache.get(uniq)  # sorted ids, as uniq
        else:
            pos = np.searchsorted(memo.ids, uniq)
            known = (pos < memo.n_rows) & (memo.ids[np.minimum(pos, memo.n_rows - 1)] == uniq)
            new = uniq[~known]
            if new.size:
                merged = RowBlock.concat([memo, self.cache.get(new)])
                memo = merged.take(np.argsort(merged.ids, kind="stable"))
        self._tls.memo = memo
        return memo.take(np.searchsorted(memo.ids, ids))

    def rows(self, item_ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.block(item_ids).features))

    def neighbors(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b = self.block(item_ids)
        return np.asarray(b.neighbors, dtype=np.int64), np.asarray(b.neighbor_weights, dtype=np.float32)

    def __repr__(self) -> str:
        return f"ShardRows(rank={self.cache.local_rank}, policy={self.cache.config.policy})"


class BatchScopedSampler:
    """Wraps a sampler so that each ``sample`` call is one :meth:`ShardRows.batch` (rows fetched once per batch)."""

    def __init__(self, inner: Sampler, rows: ShardRows) -> None:
        self.inner, self.shard_rows = inner, rows
        self.n_layers = inner.n_layers

    def sample(self, targets: np.ndarray, rng: np.random.Generator) -> Subgraph:
        with self.shard_rows.batch():
            return self.inner.sample(targets, rng)

    def __repr__(self) -> str:
        return f"BatchScopedSampler({self.inner!r})"


def actor_fetcher(servers: Mapping[int, Any], *, local_rank: int, max_workers: int = 2) -> TableFetcher:
    """A :class:`cache.TableFetcher` over the ``ShardServer`` actor handles of the other shards.

    Call it from the task thread: an actor handle binds to the worker on its first call from a task thread,
    and the fetch threads then reuse that binding (a first call from a plain thread finds no worker).
    """
    remote = {int(k): v for k, v in servers.items() if int(k) != int(local_rank)}
    for handle in remote.values():
        handle.stats().result()
    return TableFetcher(remote, max_workers=max_workers)
