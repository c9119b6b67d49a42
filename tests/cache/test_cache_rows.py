"""RowBlock, LocalOwnerTable and the counted transport on tiny hand-made shards (node ids as features)."""

from __future__ import annotations

import numpy as np
import pytest

from cache import (
    CountedFetcher,
    LocalOwnerTable,
    RowBlock,
    TableFetcher,
    TransportStats,
    as_row_block,
    row_nbytes,
)


def table(owner: int, items: list[int], n_items: int = 10) -> LocalOwnerTable:
    ids = np.asarray(items, dtype=np.int64)
    return LocalOwnerTable(
        ids,
        features=np.stack([ids, -ids], axis=1).astype(np.float32),  # (n, 2): id, -id
        neighbors=np.stack([(ids + 1) % n_items, (ids + 2) % n_items], axis=1),
        neighbor_weights=np.stack([ids, ids + 0.5], axis=1).astype(np.float32),
        owner=owner,
    )


def test_rowblock_validates_and_counts_bytes() -> None:
    b = RowBlock(np.array([3, 1]), np.zeros((2, 4)), np.zeros((2, 5), np.int32), np.zeros((2, 5)))
    assert b.features.dtype == np.float32 and b.neighbors.dtype == np.int64
    assert b.row_nbytes == 4 * 4 + 12 * 5 == row_nbytes(4, 5)
    assert b.nbytes == 2 * b.row_nbytes
    assert repr(b) == "RowBlock(n=2, F=4, T=5, versioned=False, nbytes=152)"
    with pytest.raises(ValueError, match="features has 3 rows for 2 ids"):
        RowBlock(np.array([3, 1]), np.zeros((3, 4)), np.zeros((2, 5)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="neighbor_weights"):
        RowBlock(np.array([3, 1]), np.zeros((2, 4)), np.zeros((2, 5)), np.zeros((2, 4)))
    v = RowBlock(np.array([3]), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), version=np.array([7]))
    assert v.row_nbytes == 4 + 12 + 8


def test_concat_and_take_keep_rows_together() -> None:
    t = table(0, [0, 2, 4, 6])
    a, b = t.take(np.array([4, 0])), t.take(np.array([6]))
    c = RowBlock.concat([a, b])
    assert c.ids.tolist() == [4, 0, 6]
    assert c.features[:, 0].tolist() == [4, 0, 6]
    back = c.take(np.array([2, 2, 0]))
    assert back.ids.tolist() == [6, 6, 4]
    assert back.neighbors.tolist() == [[7, 8], [7, 8], [5, 6]]
    assert back.neighbor_weights[:, 1].tolist() == [6.5, 6.5, 4.5]
    with pytest.raises(ValueError, match="blocks is empty"):
        RowBlock.concat([])


def test_owner_table_serves_owned_rows_in_order_and_rejects_others() -> None:
    t = table(1, [1, 3, 5])
    got = t.take(np.array([5, 1, 5]))
    assert got.ids.tolist() == [5, 1, 5]
    assert got.features.tolist() == [[5, -5], [1, -1], [5, -5]]
    with pytest.raises(KeyError, match=r"shard 1 does not own items \[2\]"):
        t.take(np.array([1, 2]))
    with pytest.raises(ValueError, match="sorted"):
        LocalOwnerTable(np.array([3, 1]), np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)))


@pytest.mark.parametrize("max_workers", [0, 2])
def test_counted_fetcher_counts_every_request_row_and_byte(max_workers: int) -> None:
    tables = {0: table(0, [0, 2, 4]), 1: table(1, [1, 3, 5])}
    transport = TableFetcher(tables, max_workers=max_workers)
    fetcher = CountedFetcher(transport)
    try:
        sync = fetcher.fetch(1, np.array([3, 5]))
        futs = [fetcher.fetch_async(0, np.array([4, 2, 4])), fetcher.fetch_async(1, np.array([1]))]
        blocks = [f.result() for f in futs]
        failed = fetcher.fetch_async(1, np.array([2]))
        with pytest.raises(KeyError):
            failed.result()
    finally:
        transport.close()
    assert sync.features[:, 0].tolist() == [3, 5]
    assert blocks[0].ids.tolist() == [4, 2, 4]
    s = fetcher.stats
    assert s.per_owner[0].requests == 1 and s.per_owner[0].rows == 3
    assert s.per_owner[1].requests == 3 and s.per_owner[1].rows == 3 and s.per_owner[1].failures == 1
    assert s.bytes == (2 + 3 + 1) * row_nbytes(2, 2)
    assert s.total().request_bytes == 8 * (2 + 3 + 1 + 1)
    merged = s.merge(s)
    assert merged.rows == 12 and merged.per_owner[1].failures == 2
    assert isinstance(merged, TransportStats)
    assert "requests=4" in repr(s)


class TupleServer:
    """An owner answering like pipeline.rowserver.ShardServer (a tuple), optionally through a future."""

    def __init__(self, t: LocalOwnerTable, *, as_future: bool) -> None:
        self.t, self.as_future = t, as_future

    def take(self, ids: np.ndarray) -> object:
        b = self.t.take(ids)
        answer = (b.features, b.neighbors, b.neighbor_weights)
        if not self.as_future:
            return answer
        from concurrent.futures import Future

        fut: Future[object] = Future()
        fut.set_result(answer)
        return fut


@pytest.mark.parametrize("as_future", [False, True])
def test_fetcher_accepts_shard_server_style_owners(as_future: bool) -> None:
    fetcher = TableFetcher({1: TupleServer(table(1, [1, 3, 5]), as_future=as_future)})
    got = fetcher.fetch(1, np.array([5, 3]))
    assert got.ids.tolist() == [5, 3] and got.features[:, 0].tolist() == [5, 3]
    assert got.neighbors.tolist() == [[6, 7], [4, 5]]
    with pytest.raises(TypeError, match="an owner answered int"):
        as_row_block(np.array([1]), 7)
