"""RemoteRowCache over an evolving graph: rows carry their version and are refreshed within ``max_staleness``."""

from __future__ import annotations

import numpy as np
import pytest

from cache import CacheConfig, RemoteRowCache, RowBlock, TableFetcher

N_ITEMS = 24
N_SHARDS = 2
OWNER = (np.arange(N_ITEMS) % N_SHARDS).astype(np.int32)


class VersionedOwner:
    """An owner whose rows change with the graph version: feature = id + 1000 * version (so a row tells its age)."""

    def __init__(self, clock: list[int], owner: int) -> None:
        self.clock = clock
        self.owner = owner

    def take(self, ids: np.ndarray) -> RowBlock:
        ids = np.asarray(ids, np.int64)
        if np.any(OWNER[ids] != self.owner):
            raise KeyError(f"shard {self.owner} does not own {ids[OWNER[ids] != self.owner][:3]}")
        v = self.clock[0]
        return RowBlock(ids, (ids + 1000 * v)[:, None].astype(np.float32), ((ids + v) % N_ITEMS)[:, None],
                        np.full((ids.shape[0], 1), v, np.float32), np.full(ids.shape[0], v, np.int64))


def make(policy: str, max_staleness: int | None, clock: list[int]) -> RemoteRowCache:
    tables = {k: VersionedOwner(clock, k) for k in range(N_SHARDS)}
    cache = RemoteRowCache(CacheConfig(policy, capacity_fraction=1.0, max_staleness=max_staleness),  # type: ignore[arg-type]
                           fetcher=TableFetcher(tables), owner_of=OWNER, local_rank=0,
                           importance=np.arange(N_ITEMS, dtype=np.float64), row_nbytes=None,
                           current_version=lambda: clock[0])
    cache.fill()
    return cache


REMOTE = np.flatnonzero(OWNER == 1).astype(np.int64)


@pytest.mark.parametrize("policy", ["importance", "lru", "random"])
@pytest.mark.parametrize("bound", [0, 1, 3])
def test_rows_served_are_never_older_than_the_bound(policy: str, bound: int) -> None:
    clock = [0]
    cache = make(policy, bound, clock)
    rng = np.random.default_rng(7)
    for step in range(60):
        if rng.random() < 0.4:
            clock[0] += 1  # a new version is published
        ids = rng.choice(REMOTE, size=6, replace=True)
        block = cache.get(ids)
        assert block.version is not None
        assert np.all(block.version >= clock[0] - bound), (step, block.version, clock[0])
        # the content is the content of the version the row says it has
        np.testing.assert_array_equal(block.features[:, 0], ids + 1000 * block.version)
        np.testing.assert_array_equal(block.neighbors[:, 0], (ids + block.version) % N_ITEMS)
    s = cache.stats
    assert s.hits + s.misses == s.requests
    assert s.refreshes > 0 and s.hits > 0  # both paths ran
    if bound == 0:
        assert s.hits > 0  # rows of the current version are still served from the cache


def test_default_keeps_rows_forever() -> None:
    clock = [0]
    cache = make("importance", None, clock)
    clock[0] = 5
    block = cache.get(REMOTE)
    assert block.version is not None and np.all(block.version == 0)  # static graph behaviour: never refreshed
    assert cache.stats.refreshes == 0 and cache.stats.misses == 0


def test_bound_needs_a_clock_and_versioned_rows() -> None:
    with pytest.raises(ValueError, match="max_staleness"):
        CacheConfig("lru", max_staleness=-1)
    with pytest.raises(ValueError, match="current_version"):
        RemoteRowCache(CacheConfig("lru", max_staleness=1), fetcher=TableFetcher({}), owner_of=OWNER, local_rank=0)

    class Unversioned(VersionedOwner):
        def take(self, ids: np.ndarray) -> RowBlock:
            b = super().take(ids)
            return RowBlock(b.ids, b.features, b.neighbors, b.neighbor_weights)

    clock = [0]
    cache = RemoteRowCache(CacheConfig("lru", capacity_fraction=1.0, max_staleness=0),
                           fetcher=TableFetcher({1: Unversioned(clock, 1)}), owner_of=OWNER, local_rank=0,
                           current_version=lambda: clock[0])
    with pytest.raises(ValueError, match="without version"):
        cache.get(REMOTE[:2])
