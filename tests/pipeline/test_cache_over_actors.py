"""RemoteRowCache inside a task on one worker, fetching through ShardServer actors on the other (real cluster)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from distributed import Client

from cache import CacheConfig, LocalOwnerTable, RemoteRowCache, TableFetcher

rowserver = pytest.importorskip("pipeline.rowserver", reason="pipeline/rowserver.py (the lead's) is not merged yet")

N_ITEMS = 12


def shard(rank: int) -> dict[str, np.ndarray]:
    items = np.arange(rank, N_ITEMS, 2, dtype=np.int64)  # rank 0 owns even ids, rank 1 odd ones
    return {"items": items, "features": np.repeat(items[:, None], 3, axis=1).astype(np.float32),
            "neighbors": np.stack([(items + 1) % N_ITEMS, (items + 3) % N_ITEMS], axis=1),
            "neighbor_weights": np.stack([items, items + 0.5], axis=1).astype(np.float32)}


def _train_side(remote_actor: Any, batches: list[list[int]]) -> dict[str, Any]:
    owner = (np.arange(N_ITEMS) % 2).astype(np.int32)
    local = LocalOwnerTable(**shard(0), owner=0)
    # An actor handle binds to this worker on its first method call from a task thread; the fetch threads then
    # reuse that binding (called first from a plain thread, the handle finds no worker and fails).
    remote_actor.stats().result()
    fetcher = TableFetcher({1: remote_actor}, max_workers=2)
    try:
        cache = RemoteRowCache(CacheConfig("lru", capacity_fraction=0.5), fetcher=fetcher, owner_of=owner,
                               local_rank=0, local=local)
        blocks = [cache.get(np.asarray(b)) for b in batches]
    finally:
        fetcher.close()
    return {"features": [b.features[:, 0].tolist() for b in blocks],
            "neighbors": [b.neighbors.tolist() for b in blocks], "stats": cache.stats.to_dict(),
            "transport": cache.transport_stats.to_dict()}


def test_cache_fetches_from_shard_server_actors(dask_client: Client) -> None:
    workers = sorted(dask_client.nthreads())[:2]
    actor = dask_client.submit(rowserver.ShardServer, rank=1, **shard(1), workers=[workers[1]], actor=True,
                               pure=False).result()
    batches = [[3, 0, 5, 3], [5, 7, 2], [9, 3]]
    out = dask_client.submit(_train_side, actor, batches, workers=[workers[0]], pure=False).result()
    assert out["features"] == [[3, 0, 5, 3], [5, 7, 2], [9, 3]]
    assert out["neighbors"][1] == [[6, 8], [8, 10], [3, 5]]
    s = out["stats"]
    assert (s["requests"], s["hits"], s["misses"]) == (2 + 2 + 2, 2, 4)  # capacity 3 of 6 odd ids
    served = actor.stats().result()
    assert served["requests"] == out["transport"]["total"]["requests"] == 3  # stats() is not a take
    assert served["rows"] == s["rows_fetched"] == 4
    assert served["bytes"] == s["bytes_fetched"] == out["transport"]["total"]["bytes"]
