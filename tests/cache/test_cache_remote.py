"""RemoteRowCache on a hand-made 3-shard world: node ids as features, so every row can be checked exactly."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cache import (
    CacheConfig,
    CacheStats,
    CountedFetcher,
    LocalOwnerTable,
    RemoteRowCache,
    RowBlock,
    TableFetcher,
    count_accesses,
    row_nbytes,
    select_by_importance,
)

N_ITEMS = 30
N_SHARDS = 3
OWNER = (np.arange(N_ITEMS) % N_SHARDS).astype(np.int32)  # shard k owns ids k, k+3, ...
ROW = row_nbytes(2, 2)


def owner_tables() -> dict[int, LocalOwnerTable]:
    out = {}
    for k in range(N_SHARDS):
        ids = np.flatnonzero(np.equal(OWNER, k)).astype(np.int64)
        out[k] = LocalOwnerTable(
            ids,
            features=np.stack([ids, 10 * ids], axis=1).astype(np.float32),
            neighbors=np.stack([(ids + 1) % N_ITEMS, (ids * 7) % N_ITEMS], axis=1),
            neighbor_weights=np.stack([ids + 0.25, ids + 0.5], axis=1).astype(np.float32),
            owner=k,
        )
    return out


def expected(ids: np.ndarray) -> RowBlock:
    ids = np.asarray(ids, dtype=np.int64)
    return RowBlock(ids, np.stack([ids, 10 * ids], axis=1), np.stack([(ids + 1) % N_ITEMS, (ids * 7) % N_ITEMS], 1),
                    np.stack([ids + 0.25, ids + 0.5], axis=1))


def assert_rows(got: RowBlock, ids: np.ndarray) -> None:
    want = expected(ids)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.features, want.features)
    np.testing.assert_array_equal(got.neighbors, want.neighbors)
    np.testing.assert_array_equal(got.neighbor_weights, want.neighbor_weights)


IMPORTANCE = np.arange(N_ITEMS, dtype=np.float64)  # higher id = more important


def make_cache(policy: str, *, fraction: float = 0.3, rank: int = 0, max_workers: int = 0,
               **kw: object) -> RemoteRowCache:
    tables = owner_tables()
    cache = RemoteRowCache(CacheConfig(policy, capacity_fraction=fraction, seed=3),  # type: ignore[arg-type]
                           fetcher=TableFetcher(tables, max_workers=max_workers), owner_of=OWNER,
                           local_rank=rank, local=tables[rank], importance=IMPORTANCE, **kw)  # type: ignore[arg-type]
    cache.fill()
    return cache


POLICIES = ["importance", "lru", "random", "none"]


@pytest.mark.parametrize("policy", POLICIES)
def test_rows_equal_the_owners_rows_hit_or_miss(policy: str) -> None:
    cache = make_cache(policy)
    ids = np.array([29, 1, 0, 29, 4, 14, 3, 28, 2, 1])  # local (0, 3), remote, duplicates
    first = cache.get(ids)
    assert_rows(first, ids)
    second = cache.get(ids[::-1].copy())  # now lru has them too: a hit returns what a miss returned
    assert_rows(second, ids[::-1])
    s = cache.stats
    assert s.hits + s.misses == s.requests == 2 * 6  # distinct remote ids per call
    assert s.local_rows == 2 * 2
    if policy == "none":
        assert s.hits == 0 and s.used_rows == 0
    else:
        assert s.hits > 0
    assert_rows(cache.get(np.array([], dtype=np.int64)), np.array([], dtype=np.int64))


def test_importance_fill_takes_the_top_remote_items_in_one_fetch_per_owner() -> None:
    cache = make_cache("importance", fraction=0.3)  # 20 remote items -> 6 rows
    assert cache.capacity_rows == 6
    remote = np.flatnonzero(OWNER != 0)
    top = remote[np.argsort(-IMPORTANCE[remote], kind="stable")][:6]
    assert cache.cached_ids().tolist() == sorted(top.tolist()) == [22, 23, 25, 26, 28, 29]
    t = cache.transport_stats
    assert t.per_owner[1].requests == 1 and t.per_owner[2].requests == 1
    s = cache.stats
    assert s.fill_rows == 6 and s.fill_bytes == 6 * ROW and s.used_bytes == 6 * ROW == s.capacity_bytes


def test_random_fill_is_seeded_and_remote_only() -> None:
    a, b = make_cache("random"), make_cache("random")
    assert a.cached_ids().tolist() == b.cached_ids().tolist()
    assert len(a.cached_ids()) == 6 and np.all(OWNER[a.cached_ids()] != 0)


def test_lru_evicts_the_least_recently_used() -> None:
    tables = owner_tables()
    cache = RemoteRowCache(CacheConfig("lru", capacity_bytes=3 * ROW), fetcher=TableFetcher(tables),
                           owner_of=OWNER, local_rank=0, local=tables[0])
    assert cache.capacity_rows == 3
    cache.get(np.array([1, 2]))  # miss 1, 2
    cache.get(np.array([4]))  # miss 4 -> [1, 2, 4]
    cache.get(np.array([1]))  # hit 1 -> order 2, 4, 1
    cache.get(np.array([5]))  # miss 5 evicts 2
    assert cache.cached_ids().tolist() == [1, 4, 5]
    s = cache.stats
    assert (s.requests, s.hits, s.misses, s.evictions, s.insertions) == (5, 1, 4, 1, 4)
    assert s.bytes_fetched == 4 * ROW and s.bytes_saved == ROW
    # first call: ids 1 and 2 have different owners -> 2 fetches; the hit fetches nothing: 2 + 1 + 0 + 1
    assert s.fetches == cache.transport_stats.requests == 4


def test_one_fetch_per_owner_per_call_for_the_misses() -> None:
    cache = make_cache("none")
    cache.get(np.array([1, 4, 7, 2, 5, 1]))
    t = cache.transport_stats
    assert t.per_owner[1].requests == 1 and t.per_owner[1].rows == 3
    assert t.per_owner[2].requests == 1 and t.per_owner[2].rows == 2
    assert 0 not in t.per_owner


@pytest.mark.parametrize("policy", ["importance", "lru", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacity_is_never_exceeded_and_stats_add_up(policy: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fraction = float(rng.choice([0.0, 0.05, 0.2, 0.5, 1.0]))
    rank = int(rng.integers(N_SHARDS))
    cache = make_cache(policy, fraction=fraction, rank=rank)
    fetched_bytes = 0
    for _ in range(40):
        ids = rng.integers(0, N_ITEMS, size=int(rng.integers(0, 25)))
        before = cache.transport_stats.bytes
        assert_rows(cache.get(ids), ids)
        fetched_bytes += cache.transport_stats.bytes - before
        s = cache.stats
        assert s.used_rows <= s.capacity_rows == int(np.floor(fraction * 20 + 1e-9))
        assert s.used_bytes <= s.capacity_bytes
        assert np.all(OWNER[cache.cached_ids()] != rank)
    s = cache.stats
    assert s.hits + s.misses == s.requests
    assert s.rows_fetched == s.misses  # distinct ids per call: each miss fetched once
    assert s.bytes_fetched == fetched_bytes == s.misses * ROW
    assert s.bytes_saved == s.hits * ROW
    assert s.remote_bytes == cache.transport_stats.bytes


def test_several_producer_threads_get_exact_rows_and_consistent_stats() -> None:
    cache = make_cache("lru", fraction=0.25, max_workers=3)
    errors: list[BaseException] = []
    requests = [0] * 4

    def producer(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        try:
            for _ in range(150):
                ids = rng.integers(0, N_ITEMS, size=12)
                assert_rows(cache.get(ids), ids)
                requests[k] += int(np.count_nonzero(OWNER[np.unique(ids)] != 0))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    s = cache.stats
    assert s.requests == sum(requests)
    assert s.hits + s.misses == s.requests and s.hits > 0
    assert s.used_rows == s.capacity_rows == 5
    assert s.bytes_fetched == cache.transport_stats.bytes == s.rows_fetched * ROW
    assert len(cache.cached_ids()) == 5


def test_static_policy_needs_fill_and_importance() -> None:
    tables = owner_tables()
    cache = RemoteRowCache(CacheConfig("random"), fetcher=TableFetcher(tables), owner_of=OWNER, local_rank=0,
                           local=tables[0])
    with pytest.raises(RuntimeError, match=r"call fill\(\)"):
        cache.get(np.array([1]))
    with pytest.raises(ValueError, match="importance=None"):
        RemoteRowCache(CacheConfig("importance"), fetcher=TableFetcher(tables), owner_of=OWNER, local_rank=0)
    with pytest.raises(ValueError, match="capacity_bytes needs the row size"):
        RemoteRowCache(CacheConfig("lru", capacity_bytes=100), fetcher=TableFetcher(tables), owner_of=OWNER,
                       local_rank=0)
    lonely = RemoteRowCache(CacheConfig("none"), fetcher=TableFetcher(tables), owner_of=OWNER, local_rank=0)
    with pytest.raises(ValueError, match="no local table"):
        lonely.get(np.array([0]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 30\)"):
        lonely.get(np.array([30]))


def test_config_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match="policy='fifo'"):
        CacheConfig("fifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"capacity_fraction=1\.5"):
        CacheConfig("lru", capacity_fraction=1.5)
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        CacheConfig("lru", capacity_bytes=-1)
    assert CacheConfig("none", capacity_fraction=None).static is False
    assert CacheConfig("importance").static is True


def test_stats_merge_across_workers_and_guard_invariants() -> None:
    a = make_cache("lru")
    b = make_cache("lru", rank=1)
    a.get(np.array([1, 2, 1]))
    b.get(np.array([0, 2, 0]))
    a.get(np.array([1]))
    total = CacheStats.merge([a.stats, b.stats])
    assert total.requests == a.stats.requests + b.stats.requests == 5
    assert total.hits == 1 and total.capacity_rows == 12
    assert total.hit_rate == pytest.approx(0.2)
    assert "hit_rate=20.0%" in repr(total)
    assert total.to_dict()["hit_rate"] == pytest.approx(0.2)
    assert CacheStats.merge([]) == CacheStats()
    with pytest.raises(ValueError, match="hits 2 \\+ misses 0 != requests 1"):
        CacheStats(requests=1, hits=2)
    with pytest.raises(ValueError, match="exceeds capacity"):
        CacheStats(used_rows=3, capacity_rows=2)
    assert "policy=lru" in repr(a) and "rows=" in repr(a)


def test_presampled_access_counts_and_selection() -> None:
    counts = count_accesses([np.array([1, 1, 4]), np.array([4, 7])], 10)
    assert counts.tolist() == [0, 1, 0, 0, 2, 0, 0, 1, 0, 0]
    assert select_by_importance(np.array([1, 4, 7, 8]), counts, 2).tolist() == [1, 4]  # tie 1 vs 7: smaller id
    assert select_by_importance(np.array([1, 4, 7, 8]), counts, 10).tolist() == [1, 4, 7]  # zero never cached


def test_counted_fetcher_is_not_wrapped_twice() -> None:
    tables = owner_tables()
    counted = CountedFetcher(TableFetcher(tables))
    cache = RemoteRowCache(CacheConfig("none"), fetcher=counted, owner_of=OWNER, local_rank=0, local=tables[0])
    cache.get(np.array([1, 2]))
    assert cache.transport_stats is counted.stats and counted.stats.rows == 2
