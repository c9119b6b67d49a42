"""The evolving graph: exact incremental refresh, lock-free readers during updates, the durable log and crashes."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

from cache import CacheConfig, RemoteRowCache, TableFetcher
from gnn.evolving import (
    GraphVersion,
    InteractionBatch,
    LiveGraph,
    LiveOwnerTable,
    UpdateWriter,
    VersionedPinSageSampler,
    WalkTraces,
    build_store,
    merge_batches,
    touched_items,
    writer_bytes,
)
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, load_graph_store, write_graph_store
from gnn.updatelog import UpdateLog, UpdateLogError
from gnn.walks import WalkConfig, compute_neighborhoods

N_USERS, N_ITEMS, N_CATS, N_ROWS = 600, 300, 4, 4000
CFG = WalkConfig(n_walks=8, hops=3, top_t=5, n_hard_negatives=3, hard_negative_ranks=(5, 30))
NB_FIELDS = ("indptr", "indices", "weights", "item_importance", "user_importance", "hard_negatives")


class History:
    """All interactions so far (base + batches), to rebuild the graph from scratch."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.user = rng.integers(0, N_USERS, N_ROWS)
        self.item = (rng.pareto(1.1, N_ROWS) * 15).astype(np.int64) % N_ITEMS  # a popular head, a long tail
        self.behavior = rng.integers(0, 4, N_ROWS).astype(np.int8)
        self.ts = rng.integers(0, 10_000, N_ROWS)
        self.item_category = rng.integers(0, N_CATS, N_ITEMS)
        self.n_users, self.n_items, self.n_cats = N_USERS, N_ITEMS, N_CATS

    def store(self) -> GraphStore:
        return build_store(n_users=self.n_users, n_items=self.n_items, n_categories=self.n_cats, user=self.user,
                           item=self.item, behavior=self.behavior, ts=self.ts, item_category=self.item_category)

    def batch(self, rng: np.random.Generator, n: int, *, grow: bool = True, tail: bool = False) -> InteractionBatch:
        """n interactions of known users/items (tail: only the 1/3 least popular items), sometimes a new user and a
        new item (grow)."""
        hi = self.n_items
        item = rng.integers(2 * hi // 3 if tail else 0, hi, n)
        user = rng.integers(0, self.n_users, n)
        n_users, n_items, n_cats = self.n_users, self.n_items, self.n_cats
        if grow and rng.random() < 0.5:
            user[0], n_users = n_users, n_users + 1
        if grow and rng.random() < 0.5:
            item[-1], n_items = n_items, n_items + 1
        cats = np.concatenate([self.item_category, [n_cats]])[np.minimum(item, self.n_items)]
        if n_items > self.n_items:
            n_cats += 1
        b = InteractionBatch(user, item, rng.integers(0, 4, n).astype(np.int8), rng.integers(10_000, 20_000, n), cats,
                             n_users, n_items, n_cats)
        self.add(b)
        return b

    def add(self, b: InteractionBatch) -> None:
        if b.n_items > self.n_items:
            self.item_category = np.concatenate([self.item_category, [b.category[b.item >= self.n_items].min()]])
        self.user, self.item = np.concatenate([self.user, b.user]), np.concatenate([self.item, b.item])
        self.behavior, self.ts = np.concatenate([self.behavior, b.behavior]), np.concatenate([self.ts, b.ts])
        self.n_users, self.n_items, self.n_cats = b.n_users, b.n_items, b.n_categories


def assert_same_graph(a: GraphStore, b: GraphStore) -> None:
    assert (a.n_users, a.n_items, a.n_categories) == (b.n_users, b.n_items, b.n_categories)
    for name in ("user_items", "item_users"):
        for part in ("indptr", "indices", "weights", "times"):
            np.testing.assert_array_equal(getattr(getattr(a, name), part), getattr(getattr(b, name), part),
                                          err_msg=f"{name}.{part}")
    np.testing.assert_array_equal(a.item_category, b.item_category)
    np.testing.assert_array_equal(a.item_counts, b.item_counts)


def assert_equals_full_recomputation(v: GraphVersion, cfg: WalkConfig = CFG) -> None:
    full = compute_neighborhoods(v.store, cfg)
    for name in NB_FIELDS:
        np.testing.assert_array_equal(getattr(v.neighborhoods, name), getattr(full, name), err_msg=name)


# ------------------------------------------------------------------------------------------- incremental refresh


@pytest.mark.parametrize("cfg", [CFG, WalkConfig(n_walks=6, hops=2, mode="restart", restart_prob=0.3, top_t=4,
                                                 n_hard_negatives=2, hard_negative_ranks=(4, 20), seed=5)],
                         ids=["stop", "restart"])
def test_incremental_refresh_equals_full_recomputation(cfg: WalkConfig) -> None:
    hist = History()
    live = LiveGraph(hist.store(), cfg)
    assert_equals_full_recomputation(live.current, cfg)  # the base walker gives compute_neighborhoods' rows
    rng = np.random.default_rng(1)
    touched = []
    for _ in range(6):
        before = live.current
        v = live.append(hist.batch(rng, 5, tail=True))
        assert v.number == before.number + 1
        assert_same_graph(v.store, hist.store())  # the graph equals a rebuild from all interactions
        assert_equals_full_recomputation(v, cfg)  # touched and untouched rows, importance, hard negatives
        touched.append(v.touched)
    assert min(touched) > 0 and max(touched) < N_ITEMS  # a real subset was recomputed, not everything


def test_departure_index_finds_every_start_the_exact_scan_finds() -> None:
    hist = History()
    live = LiveGraph(hist.store(), CFG)
    rng = np.random.default_rng(21)
    compactions = 0
    for _ in range(40):
        b = hist.batch(rng, 3, tail=True)
        tr = live._traces
        st = live.current.store
        n_items, n_users = max(b.n_items, st.n_items), max(b.n_users, st.n_users)
        items, users = np.unique(b.item), np.unique(b.user)
        exact = touched_items(WalkTraces(tr.items, tr.users), CFG.hops, items, users, n_items, n_users)
        indexed = touched_items(tr, CFG.hops, items, users, n_items, n_users)
        assert np.isin(exact, indexed).all()  # a superset: never a missed start
        assert tr.index is not None
        deltas = len(tr.index.deltas)
        live.append(b)
        compactions += live._traces.index is not None and len(live._traces.index.deltas) < deltas
    assert compactions > 0  # the index was rebuilt from the traces on the way ...
    assert_equals_full_recomputation(live.current)  # ... and the result is still exact


def test_untouched_rows_are_reused_not_recomputed() -> None:
    hist = History()
    live = LiveGraph(hist.store(), CFG)
    v0 = live.current
    v1 = live.append(hist.batch(np.random.default_rng(2), 3, grow=False, tail=True))
    changed = [i for i in range(N_ITEMS)
               if not np.array_equal(v0.neighborhoods.neighbors(i), v1.neighborhoods.neighbors(i))]
    assert 0 < len(changed) <= v1.touched < N_ITEMS // 2  # rows that moved are within the (small) touched set


def test_weighted_bias_agrees_within_tolerance() -> None:
    # bias="weight": untouched walks may differ only through float64 rounding of cumulative weights, so at most a
    # tiny share of rows (tolerance: 1 % of items) and of the importance mass (1e-3 total variation) may differ.
    cfg = WalkConfig(n_walks=8, hops=3, top_t=5, bias="weight", n_hard_negatives=0)
    hist = History(seed=3)
    live = LiveGraph(hist.store(), cfg)
    rng = np.random.default_rng(4)
    for _ in range(4):
        v = live.append(hist.batch(rng, 5))
    full = compute_neighborhoods(v.store, cfg)
    differ = sum(not np.array_equal(v.neighborhoods.neighbors(i), full.neighbors(i)) for i in range(v.n_items))
    assert differ <= 0.01 * v.n_items
    assert 0.5 * np.abs(v.neighborhoods.item_importance - full.item_importance).sum() <= 1e-3


# ------------------------------------------------------------------------------------------- readers and writer


def check_complete(v: GraphVersion) -> int:
    """Invariants of one complete version; returns a fingerprint of it."""
    nb, st = v.neighborhoods, v.store
    assert nb.indptr.shape[0] == st.n_items + 1 and nb.indptr[-1] == nb.indices.shape[0]
    assert nb.item_importance.shape[0] == st.n_items and nb.user_importance.shape[0] == st.n_users
    assert st.user_items.n_edges == st.item_users.n_edges
    assert st.user_items.indptr.shape[0] == st.n_users + 1 and st.item_users.indptr.shape[0] == st.n_items + 1
    if nb.indices.size:
        assert nb.indices.min() >= 0 and nb.indices.max() < st.n_items
    return hash((v.number, st.n_edges, int(nb.indices.sum()), float(nb.weights.sum())))


def test_concurrent_readers_see_complete_versions_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    hist = History()
    log_path = tmp_path / "updates.log"
    live = LiveGraph(hist.store(), CFG, log_path=log_path)
    table = ItemFeatureTable.from_arrays(category=np.zeros(N_ITEMS + 64), counts=np.zeros((N_ITEMS + 64, 4)),
                                         n_categories=1)
    sampler = VersionedPinSageSampler(live, rows=table)
    published: dict[int, int] = {0: check_complete(live.current)}
    seen: list[list[tuple[int, int]]] = [[] for _ in range(3)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        last = -1
        try:
            while not stop.is_set():
                v = live.current
                assert v.number >= last  # versions only move forward
                last = v.number
                seen[k].append((v.number, check_complete(v)))
                targets = np.unique(rng.integers(0, v.n_items, 16))
                sub, number = sampler.sample_versioned(targets, rng)
                assert number >= v.number
                nodes = sub.node_ids[-1].numpy()
                assert nodes.min() >= 0 and nodes.max() < live.current.n_items
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def readers_reached(number: int) -> None:  # bounded polling: the readers really run between updates
        for _ in range(20_000):
            if errors or all(per and per[-1][0] >= number for per in seen):
                return
            stop.wait(0.001)
        raise TimeoutError(f"readers did not reach version {number}")

    sampler.sample(np.arange(4), np.random.default_rng(0))  # compile the sampler's kernels before the race
    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(9)
    acked = []
    try:
        for i in range(25):
            b = hist.batch(rng, int(rng.integers(1, 12)))
            v = live.append(b)
            acked.append(b)
            published[v.number] = check_complete(v)
            if i % 3 == 0:
                readers_reached(v.number)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    reads = [x for per in seen for x in per]
    assert len({n for n, _ in reads}) > 3  # the readers really ran during the updates
    for number, fp in reads:
        assert published[number] == fp  # each read saw exactly one published version, complete
    final = live.current
    assert final.number == len(acked) == 25
    assert_same_graph(final.store, hist.store())
    assert_equals_full_recomputation(final)
    reopened = LiveGraph(History().store(), CFG, log_path=log_path)  # the base store plus a replay of the log
    assert reopened.current.number == 25
    assert_same_graph(reopened.current.store, hist.store())


def test_old_versions_are_reclaimed_when_no_reader_holds_them() -> None:
    hist = History()
    live = LiveGraph(hist.store(), CFG)
    rng = np.random.default_rng(5)
    held = live.current  # a reader in the middle of a minibatch
    ref = weakref.ref(held)
    indices = weakref.ref(held.neighbors)
    live.append(hist.batch(rng, 4))
    live.append(hist.batch(rng, 4))
    gc.collect()
    assert ref() is held and held.number == 0  # still usable while held
    check_complete(held)
    del held
    gc.collect()
    assert ref() is None and indices() is None  # reclaimed once the last reader let go
    assert live.current.number == 2


def test_background_writer_group_commits_in_order() -> None:
    hist = History()
    live = LiveGraph(hist.store(), CFG)
    writer = UpdateWriter(live, nice=5)
    rng = np.random.default_rng(12)
    futures = [writer.submit(hist.batch(rng, 4)) for _ in range(15)]
    writer.close()
    numbers = [f.result(timeout=60).number for f in futures]
    assert numbers == sorted(numbers) and numbers[-1] == live.current.number == writer.groups <= 15
    assert_same_graph(live.current.store, hist.store())
    assert_equals_full_recomputation(live.current)


def test_merged_batches_give_the_same_version_as_one_by_one() -> None:
    hist = History()
    one, merged = LiveGraph(hist.store(), CFG), LiveGraph(hist.store(), CFG)
    rng = np.random.default_rng(13)
    batches = [hist.batch(rng, 5) for _ in range(4)]
    for b in batches:
        one.append(b)
    v = merged.append(merge_batches(batches))
    assert_same_graph(v.store, one.current.store)
    for name in NB_FIELDS:
        np.testing.assert_array_equal(getattr(v.neighborhoods, name), getattr(one.current.neighborhoods, name))


# ------------------------------------------------------------------------------------------- durability


def test_torn_tail_is_dropped_and_replay_stops_at_the_last_complete_record(tmp_path: Path) -> None:
    hist = History()
    base = hist.store()
    log_path = tmp_path / "updates.log"
    live = LiveGraph(base, CFG, log_path=log_path)
    rng = np.random.default_rng(6)
    states = [hist.store()]
    for _ in range(4):
        live.append(hist.batch(rng, 6))
        states.append(hist.store())
    full = log_path.read_bytes()
    last_start = list(UpdateLog(log_path).records())[-2][1]  # where the last record begins
    for cut in (last_start + 3, last_start + 16, len(full) - 1):  # header torn, payload torn, one byte short
        log_path.write_bytes(full[:cut])
        again = LiveGraph(base, CFG, log_path=log_path)
        assert again.current.number == 3
        assert_same_graph(again.current.store, states[3])
        assert log_path.stat().st_size == last_start  # the torn bytes are gone
    # appending after a recovery continues on a record boundary
    log_path.write_bytes(full[: len(full) - 5])
    again = LiveGraph(base, CFG, log_path=log_path)
    again.append(next_batch(states[3], rng))
    assert LiveGraph(base, CFG, log_path=log_path).current.number == 4


def next_batch(store: GraphStore, rng: np.random.Generator) -> InteractionBatch:
    n = 3
    return InteractionBatch(rng.integers(0, store.n_users, n), rng.integers(0, store.n_items, n),
                            np.zeros(n, np.int8), np.full(n, 30_000), np.zeros(n, np.int64), store.n_users,
                            store.n_items, store.n_categories)


def test_damage_before_the_last_record_is_an_error(tmp_path: Path) -> None:
    hist = History()
    log_path = tmp_path / "updates.log"
    live = LiveGraph(hist.store(), CFG, log_path=log_path)
    rng = np.random.default_rng(7)
    for _ in range(3):
        live.append(hist.batch(rng, 4))
    data = bytearray(log_path.read_bytes())
    data[40] ^= 0xFF  # inside the first record's payload
    log_path.write_bytes(bytes(data))
    with pytest.raises(UpdateLogError, match="not the last"):
        LiveGraph(History().store(), CFG, log_path=log_path)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from gnn.evolving import InteractionBatch, LiveGraph
    from gnn.graphstore import load_graph_store
    from gnn.walks import WalkConfig
    store_dir, log_path, crash_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = WalkConfig(n_walks=8, hops=3, top_t=5, n_hard_negatives=3, hard_negative_ranks=(5, 30))

    def crash(number):
        if number == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # after the record is durable, before the version is published

    live = LiveGraph(load_graph_store(store_dir), cfg, log_path=log_path, on_logged=crash)
    rng = np.random.default_rng(11)
    for _ in range(10_000):
        st = live.current.store
        n = 4
        b = InteractionBatch(rng.integers(0, st.n_users, n), rng.integers(0, st.n_items, n),
                             rng.integers(0, 4, n).astype(np.int8), rng.integers(20_000, 30_000, n),
                             np.zeros(n, np.int64), st.n_users + 1, st.n_items, st.n_categories)
        b = InteractionBatch(np.concatenate([b.user, [st.n_users]]), np.concatenate([b.item, [0]]),
                             np.concatenate([b.behavior, [np.int8(3)]]), np.concatenate([b.ts, [25_000]]),
                             np.zeros(n + 1, np.int64), st.n_users + 1, st.n_items, st.n_categories)
        v = live.append(b)
        print(v.number, flush=True)  # acknowledged
""")


def run_child(tmp_path: Path, crash_at: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "g"), str(tmp_path / "updates.log"),
                             str(crash_at)], stdout=subprocess.PIPE, text=True, env=env)


def replayed(tmp_path: Path) -> tuple[GraphVersion, list[InteractionBatch]]:
    batches = [InteractionBatch.from_bytes(p) for p, _ in UpdateLog(tmp_path / "updates.log").records()]
    live = LiveGraph(load_graph_store(tmp_path / "g"), CFG, log_path=tmp_path / "updates.log")
    return live.current, batches


def rebuild(batches: list[InteractionBatch]) -> GraphStore:
    hist = History()
    for b in batches:
        hist.add(b)
    return hist.store()


def test_crash_between_log_write_and_publish_recovers_the_logged_batch(tmp_path: Path) -> None:
    write_graph_store(tmp_path / "g", History().store())
    child = run_child(tmp_path, crash_at=4)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert out.split() == ["1", "2", "3"]  # version 4 was logged but never acknowledged nor published
    v, batches = replayed(tmp_path)
    assert v.number == 4 == len(batches)  # ... and the restart publishes it: a logged batch is never lost
    assert_same_graph(v.store, rebuild(batches))
    assert_equals_full_recomputation(v)


def test_sigkill_at_any_moment_loses_nothing_acknowledged(tmp_path: Path) -> None:
    write_graph_store(tmp_path / "g", History().store())
    child = run_child(tmp_path, crash_at=-1)
    assert child.stdout is not None
    acked = [int(child.stdout.readline()) for _ in range(6)]  # wait for six acknowledgements, then kill mid-run
    child.send_signal(signal.SIGKILL)
    rest = child.stdout.read().split()
    child.stdout.close()
    child.wait(timeout=60)
    acked += [int(x) for x in rest]
    v, batches = replayed(tmp_path)
    assert v.number >= acked[-1] and v.number == len(batches)
    assert_same_graph(v.store, rebuild(batches))


def test_another_process_appends_and_the_live_graph_catches_up(tmp_path: Path) -> None:
    hist = History()
    log_path = tmp_path / "updates.log"
    serving = LiveGraph(hist.store(), CFG, log_path=log_path)
    cli = LiveGraph(History().store(), CFG, log_path=log_path)  # stands for `pinsage update` in another process
    rng = np.random.default_rng(8)
    cli.append(hist.batch(rng, 5))
    cli.append(hist.batch(rng, 5))
    assert serving.current.number == 0
    v = serving.catch_up()
    assert v.number == 2
    assert_same_graph(v.store, hist.store())
    v3 = serving.append(hist.batch(rng, 5))  # the serving writer appends after the other process's records
    assert v3.number == 3 and cli.catch_up().number == 3
    assert_same_graph(cli.current.store, hist.store())


# ------------------------------------------------------------------------------------------- samplers and the cache


def test_sampler_reads_one_version_per_batch() -> None:
    hist = History()
    live = LiveGraph(hist.store(), CFG)
    table = ItemFeatureTable.from_arrays(category=np.zeros(N_ITEMS + 8), counts=np.zeros((N_ITEMS + 8, 4)),
                                         n_categories=1)
    sampler = VersionedPinSageSampler(live, rows=table, n_layers=1)
    rng = np.random.default_rng(0)
    targets = np.arange(0, 40, dtype=np.int64)
    for _ in range(3):
        sub, number = sampler.sample_versioned(targets, rng)
        v = live.current
        assert number == v.number
        nbr, _ = v.neighbors(targets)  # the batch's neighbours are exactly this version's rows
        src = sub.node_ids[1].numpy()
        idx = sub.blocks[0].nbr_index.numpy()
        w = sub.blocks[0].nbr_weight.numpy()
        np.testing.assert_array_equal(np.where(w > 0, src[idx], -1), nbr)
        live.append(hist.batch(rng, 8, tail=True))


def test_cached_rows_are_refreshed_within_the_staleness_bound() -> None:
    hist = History()
    live = LiveGraph(hist.store(), CFG)
    owner = (np.arange(N_ITEMS) % 2).astype(np.int32)  # shard 1 (the other trainer) owns the odd items
    versions: dict[int, GraphVersion] = {0: live.current}
    cache = RemoteRowCache(CacheConfig("importance", capacity_fraction=0.5, max_staleness=2),
                           fetcher=TableFetcher({1: LiveOwnerTable(live)}), owner_of=owner, local_rank=0,
                           importance=np.arange(N_ITEMS, dtype=np.float64),
                           current_version=lambda: live.current.number)
    cache.fill()
    rng = np.random.default_rng(3)
    remote = np.flatnonzero(owner == 1)
    for _ in range(12):
        v = live.append(hist.batch(rng, 6, grow=False))
        versions[v.number] = v
        ids = rng.choice(remote, 40)
        block = cache.get(ids)
        assert block.version is not None
        assert block.version.min() >= v.number - 2
        for i, ver, nbr in zip(ids.tolist(), block.version.tolist(), block.neighbors, strict=True):
            want, _ = versions[ver].neighbors(np.array([i]))
            np.testing.assert_array_equal(nbr, want[0])  # the row is that version's row
    assert cache.stats.refreshes > 0 and cache.stats.hits > 0


def test_writer_memory_is_bounded_before_walking_and_too_much_is_refused() -> None:
    store = History().store()
    need = writer_bytes(store, CFG)
    live = LiveGraph(store, CFG, max_writer_bytes=need)  # exactly the bound is allowed
    traces = live._traces
    assert traces.index is not None
    trace_bytes = traces.items.nbytes + traces.users.nbytes
    assert trace_bytes == 2 * N_ITEMS * CFG.n_walks * CFG.hops * 4
    index_bytes = sum(a.nbytes for a in traces.index.base)
    assert index_bytes > 0 and trace_bytes + index_bytes <= need
    with pytest.raises(ValueError, match=r"walks.n_walks=8 x hops=3\) but max_writer_bytes is .*lower n_walks"):
        LiveGraph(store, CFG, max_writer_bytes=need - 1)
    huge = WalkConfig(n_walks=2**28, hops=3, top_t=5)  # > 2 TiB for 300 items: refused before any walk runs
    with pytest.raises(ValueError, match="but half of the memory available now is"):
        LiveGraph(store, huge)
