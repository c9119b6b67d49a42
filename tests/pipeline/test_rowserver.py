"""ShardServer actors on a real 2-worker cluster, called from tasks on the other worker."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from distributed import Client

from pipeline.launch import worker_addresses
from pipeline.rowserver import ShardServer


def shard(rank: int, n_items: int = 10, f: int = 3, t: int = 2) -> dict[str, np.ndarray]:
    items = np.arange(rank, n_items, 2, dtype=np.int64)  # rank 0 owns even items, rank 1 odd ones
    return {
        "items": items,
        "features": np.repeat(items[:, None], f, axis=1).astype(np.float32),  # node ids as features
        "neighbors": np.stack([items + 1, items + 2], axis=1) % n_items,
        "neighbor_weights": np.ones((items.shape[0], t), dtype=np.float32) * items[:, None],
    }


def _fetch_from(actor: Any, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return actor.take(np.asarray(ids)).result()


def test_rows_fetched_from_the_owner_equal_its_rows(dask_client: Client) -> None:
    workers = worker_addresses(dask_client, 2)
    actors = [
        dask_client.submit(ShardServer, rank=r, **shard(r), workers=[w], actor=True, pure=False).result()
        for r, w in enumerate(workers)
    ]
    # rank 0's task asks rank 1's actor for odd items, in any order, with duplicates
    ids = [7, 1, 7, 3]
    feats, nbrs, wts = dask_client.submit(_fetch_from, actors[1], ids, workers=[workers[0]], pure=False).result()
    assert feats[:, 0].tolist() == [7.0, 1.0, 7.0, 3.0]
    assert nbrs.tolist() == [[8, 9], [2, 3], [8, 9], [4, 5]]
    assert wts[:, 0].tolist() == [7.0, 1.0, 7.0, 3.0]
    stats = actors[1].stats().result()
    assert stats["requests"] == 1
    assert stats["rows"] == 4
    assert stats["bytes"] == feats.nbytes + nbrs.nbytes + wts.nbytes
    with pytest.raises(KeyError, match=r"does not own items \[2\]"):
        dask_client.submit(_fetch_from, actors[1], [2], workers=[workers[0]], pure=False).result()
