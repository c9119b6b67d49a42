"""Random-walk neighbourhoods against the exact walk distribution on small hand-made bipartite graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gnn.graphstore import GraphStore, csr_from_edges, write_graph_store
from gnn.walks import (
    Neighborhoods,
    WalkConfig,
    WalkGraph,
    _rank_scored,
    _walk_batch,
    cached_walk_graph,
    compute_neighborhoods,
    degree_discount,
    load_neighborhoods,
    no_user_trace,
    save_neighborhoods,
    store_token,
    walk_chunk,
    walk_visits,
)
from gnn.walks_gpu import cut_paths, rank_paths


def make_store(edges: list[tuple[int, int, float]], n_users: int, n_items: int) -> GraphStore:
    u = np.array([e[0] for e in edges], np.int64)
    i = np.array([e[1] for e in edges], np.int64)
    w = np.array([e[2] for e in edges], np.float32)
    t = np.arange(len(edges), dtype=np.int64)
    return GraphStore(
        n_users=n_users, n_items=n_items, n_categories=1,
        user_items=csr_from_edges(u, i, w, t, n_users), item_users=csr_from_edges(i, u, w, t, n_items),
        item_category=np.zeros(n_items, np.int64), item_counts=np.zeros((n_items, 4), np.int64),
    )


# users 0..3, items 0..5; item 5 has no interactions. Weights distinct so biased walks differ from uniform.
EDGES = [(0, 0, 1.0), (0, 1, 4.0), (0, 2, 1.0), (1, 1, 1.0), (1, 2, 2.0), (1, 3, 1.0), (2, 3, 3.0), (2, 4, 1.0),
         (3, 0, 2.0), (3, 4, 1.0)]
STORE = make_store(EDGES, n_users=4, n_items=6)


def transitions(weighted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact item→user (n_items, n_users) and user→item (n_users, n_items) transition matrices of EDGES."""
    a = np.zeros((STORE.n_items, STORE.n_users))
    for u, i, w in EDGES:
        a[i, u] += w if weighted else 1.0
    p_iu = a / np.maximum(a.sum(1, keepdims=True), 1e-300)
    p_ui = a.T / np.maximum(a.T.sum(1, keepdims=True), 1e-300)
    return p_iu, p_ui


def exact_visits(cfg: WalkConfig, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected item and user visits of ``cfg.n_walks`` walks from item ``s`` (matrix powers)."""
    p_iu, p_ui = transitions(cfg.bias == "weight")
    p = p_iu @ p_ui
    e = np.zeros(STORE.n_items)
    e[s] = 1.0
    x = e.copy()  # distribution over items before traversal t (sub-stochastic in "stop" mode)
    items, users = np.zeros(STORE.n_items), np.zeros(STORE.n_users)
    for t in range(cfg.hops):
        if t > 0:
            x = (1 - cfg.restart_prob) * x + cfg.restart_prob * x.sum() * e if cfg.mode == "restart" \
                else (1 - cfg.stop_prob) * x
        users += x @ p_iu
        x = x @ p
        items += x
    return cfg.n_walks * items, cfg.n_walks * users


def within(observed: np.ndarray, expected: np.ndarray, hops: int) -> bool:
    # A walk adds at most `hops` visits to one vertex, so Var(count) <= n_walks*E[c^2] <= hops*E[count];
    # 5 standard deviations (+1 for rounding) is a per-entry bound a correct walker fails with p < 1e-5.
    return bool(np.all(np.abs(observed - expected) <= 5 * np.sqrt(hops * expected) + 1))


def visits_from(cfg: WalkConfig, s: int) -> tuple[np.ndarray, np.ndarray]:
    chunk = walk_chunk(STORE, cfg, s, s + 1)
    return chunk.item_visits, chunk.user_visits


@pytest.mark.parametrize("mode", ["stop", "restart"])
@pytest.mark.parametrize("bias", ["uniform", "weight"])
def test_visit_counts_match_exact_distribution(mode: str, bias: str) -> None:
    cfg = WalkConfig(n_walks=40_000, hops=3, mode=mode, bias=bias, stop_prob=0.4, restart_prob=0.3)  # type: ignore[arg-type]
    for s in range(5):
        items, users = visits_from(cfg, s)
        exp_items, exp_users = exact_visits(cfg, s)
        assert within(items, exp_items, cfg.hops), (s, items, exp_items.round())
        assert within(users, exp_users, cfg.hops), (s, users, exp_users.round())


def test_uniform_and_weighted_differ() -> None:
    # the check above can only tell the biases apart if their exact distributions differ beyond the tolerance
    u, _ = exact_visits(WalkConfig(n_walks=40_000, hops=3), 0)
    w, _ = exact_visits(WalkConfig(n_walks=40_000, hops=3, bias="weight"), 0)
    assert not within(w, u, 3)


def test_long_restart_walks_converge_to_personalised_pagerank() -> None:
    a = 0.3
    cfg = WalkConfig(n_walks=2000, hops=300, mode="restart", restart_prob=a)
    p_iu, p_ui = transitions(False)
    p = p_iu @ p_ui
    for s in (0, 3):
        e = np.zeros(STORE.n_items)
        e[s] = 1.0
        ppr = np.linalg.solve((np.eye(STORE.n_items) - (1 - a) * p).T, a * (e @ p))  # x = a e P (I-(1-a)P)^-1
        items, _ = visits_from(cfg, s)
        freq = items / items.sum()
        # statistical error (~1e-3 here) plus the first traversals' transient, at most 1/(a*hops) in total
        assert np.abs(freq - ppr).sum() < 0.02 + 1 / (a * cfg.hops), (freq, ppr)


def test_top_t_matches_exact_ranking() -> None:
    cfg = WalkConfig(n_walks=40_000, hops=3, top_t=3, bias="weight")
    nb = compute_neighborhoods(STORE, cfg)
    checked = 0
    for s in range(5):
        exp, _ = exact_visits(cfg, s)
        exp[s] = -1  # self excluded
        order = [int(j) for j in np.lexsort((np.arange(6), -exp)) if exp[j] > 0][:3]
        vals = np.sort(exp[exp > 0])[::-1][: cfg.top_t + 1]
        noise = np.sqrt(3 * (vals[:-1] + vals[1:]))  # sd of the difference of two neighbouring counts, at most
        if np.all(vals[:-1] - vals[1:] > 6 * noise):  # ranking decided well beyond noise
            assert nb.neighbors(s).tolist() == order
            checked += 1
        assert set(nb.neighbors(s).tolist()) <= {j for j in range(6) if exp[j] > 0}
        w = nb.neighbor_weights(s)
        assert np.all(np.diff(w) <= 0)
    assert checked == 5


def test_ties_broken_by_smaller_id() -> None:
    # star: one user, items 0..3; from item 0, items 1..3 are equally likely; with many walks the counts differ,
    # so check the order rule on the counts actually produced: count desc, then smaller id
    store = make_store([(0, i, 1.0) for i in range(4)], n_users=1, n_items=4)
    nb = compute_neighborhoods(store, WalkConfig(n_walks=7, hops=1, top_t=3))
    for s in range(4):
        idx, w = nb.neighbors(s), nb.neighbor_weights(s)
        keys = list(zip((-w).tolist(), idx.tolist(), strict=True))
        assert keys == sorted(keys)


def test_walks_stay_bipartite() -> None:
    # every item a traversal reaches shares a user with the item the traversal left
    g = WalkGraph.build(STORE, weighted=False)
    starts = np.arange(5, dtype=np.int64)
    n_walks, hops = 200, 4
    trace = np.empty((5 * n_walks, hops), np.int64)
    users = np.zeros(STORE.n_users, np.int64)
    iu, ui = STORE.item_users, STORE.user_items
    _walk_batch(iu.indptr, iu.indices, g.iu_cum, ui.indptr, ui.indices, g.ui_cum, False, starts, n_walks, hops,
                False, 0.0, 3, trace, users, True, no_user_trace(hops))
    nbrs = {i: set(iu.row(i).tolist()) for i in range(6)}
    prev = np.repeat(starts, n_walks)
    for h in range(hops):
        for a, b in zip(prev.tolist(), trace[:, h].tolist(), strict=True):
            assert b >= 0 and nbrs[a] & nbrs[b], (a, b)
        prev = trace[:, h]
    assert users.sum() == 5 * n_walks * hops


def test_identical_for_any_chunking_and_threads() -> None:
    cfg = WalkConfig(n_walks=30, hops=3, top_t=2, n_hard_negatives=2, hard_negative_ranks=(2, 5))
    ref = compute_neighborhoods(STORE, cfg)
    for chunk, threads in ((1, 1), (2, 2), (4, 3)):
        other = compute_neighborhoods(STORE, WalkConfig(**{**cfg.__dict__, "chunk_items": chunk}), n_threads=threads)
        assert_same(ref, other)


def assert_same(a: Neighborhoods, b: Neighborhoods) -> None:
    for name in ("indptr", "indices", "weights", "item_importance", "user_importance", "hard_negatives"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def random_store(n_users: int, n_items: int, n_edges: int, seed: int) -> GraphStore:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n_edges)
    i = rng.integers(0, n_items, n_edges)
    w = rng.integers(1, 5, n_edges).astype(np.float32)
    t = np.arange(n_edges)
    return GraphStore(n_users=n_users, n_items=n_items, n_categories=1,
                      user_items=csr_from_edges(u, i, w, t, n_users), item_users=csr_from_edges(i, u, w, t, n_items),
                      item_category=np.zeros(n_items, np.int64), item_counts=np.zeros((n_items, 4), np.int64))


@pytest.mark.parametrize("score", ["visits", "lift"])
def test_hard_negatives_outside_top_t(score: str) -> None:
    store = random_store(40, 120, 500, seed=1)
    cfg = WalkConfig(n_walks=60, hops=3, top_t=5, n_hard_negatives=6, hard_negative_ranks=(10, 60),
                     neighbor_score=score)  # type: ignore[arg-type]
    nb = compute_neighborhoods(store, cfg)
    filled = 0
    for s in range(store.n_items):
        neg = nb.hard_negatives[s]
        real = neg[neg >= 0]
        assert np.all(neg[: real.size] >= 0) and np.all(neg[real.size :] == -1)  # padding at the end
        assert not set(real.tolist()) & set(nb.neighbors(s).tolist())
        assert s not in real and len(set(real.tolist())) == real.size
        filled += real.size
    assert filled > store.n_items  # most items got hard negatives


def test_isolated_item_and_short_rows() -> None:
    nb = compute_neighborhoods(STORE, WalkConfig(n_walks=50, hops=2, top_t=50))
    assert nb.neighbors(5).size == 0 and nb.item_importance[5] == 0  # no interactions: empty row
    assert 0 < nb.neighbors(0).size <= 4  # T larger than the reachable items: the row is shorter
    assert np.isclose(nb.item_importance.sum(), 1, atol=1e-5) and np.isclose(nb.user_importance.sum(), 1, atol=1e-5)
    assert nb.indptr.dtype == np.int64 and nb.weights.dtype == np.float32
    assert nb.item_importance.dtype == np.float32 and nb.hard_negatives.shape == (6, 8)


@pytest.mark.parametrize(("field", "value"), [("n_walks", 0), ("hops", -1), ("top_t", 0), ("chunk_items", 0),
                                              ("stop_prob", 1.5), ("restart_prob", 1.0), ("n_hard_negatives", -2),
                                              ("hard_negative_ranks", (5, 5)), ("mode", "bfs"),
                                              ("neighbor_score", "pop"), ("lift_alpha", -1.0),
                                              ("lift_alpha", float("nan")), ("lift_alpha", "1")])
def test_bad_parameters(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"walks.{field}"):
        WalkConfig(**{field: value})  # type: ignore[arg-type]


def test_save_load_roundtrip(tmp_path: Path) -> None:
    nb = compute_neighborhoods(STORE, WalkConfig(n_walks=20, hops=2, top_t=3))
    save_neighborhoods(tmp_path / "w", nb)
    back = load_neighborhoods(tmp_path / "w")
    assert isinstance(back.indices, np.memmap)
    assert_same(nb, back)
    (tmp_path / "w" / "neighborhoods.json").write_text('{"format": "pinsage-walks", "version": 99}')
    with pytest.raises(ValueError, match="version 99"):
        load_neighborhoods(tmp_path / "w")


def test_cached_graph_rejects_changed_store(tmp_path: Path) -> None:
    write_graph_store(tmp_path / "g", STORE)
    tok = store_token(tmp_path / "g")
    assert cached_walk_graph(tmp_path / "g", tok, weighted=False) is cached_walk_graph(tmp_path / "g", tok,
                                                                                          weighted=False)
    with pytest.raises(ValueError, match="changed"):
        cached_walk_graph(tmp_path / "g", "0" * 16, weighted=False)


def test_walk_visits_counts_steps() -> None:
    items, users, steps = walk_visits(STORE, np.arange(5), WalkConfig(hops=2, stop_prob=0.0))
    assert steps == 5 * 2 * 2 and items.sum() == 10 and users.sum() == 10


def test_gpu_ranking_logic_on_pandas() -> None:
    # the cuDF group-by code of the GPU backend, run on pandas with walks from the CPU kernel
    cfg = WalkConfig(n_walks=30, hops=3, top_t=2, n_hard_negatives=2, hard_negative_ranks=(2, 5))
    g = WalkGraph.build(STORE, weighted=False)
    starts = np.repeat(np.arange(6, dtype=np.int64), cfg.n_walks)
    trace = np.empty((starts.size, cfg.hops), np.int64)
    iu, ui = STORE.item_users, STORE.user_items
    _walk_batch(iu.indptr, iu.indices, g.iu_cum, ui.indptr, ui.indices, g.ui_cum, False, np.arange(6), cfg.n_walks,
                cfg.hops, False, 0.5, cfg.seed, trace, np.zeros(4, np.int64), False,
                no_user_trace(cfg.hops))
    indptr, idx, w, negs, visits = rank_paths(pd, starts, trace, cfg, n_items=6)
    ref = compute_neighborhoods(STORE, cfg)  # same walks (same seed), ranked by the numba code
    assert np.array_equal(indptr, ref.indptr) and np.array_equal(idx, ref.indices)
    assert np.array_equal(w, ref.weights)
    for s in range(6):
        assert not set(negs[s][negs[s] >= 0].tolist()) & set(idx[indptr[s] : indptr[s + 1]].tolist())
    cut = cut_paths(np.tile(np.arange(1, 4), (1000, 1)), WalkConfig(hops=3, stop_prob=0.5), np.random.default_rng(0))
    assert np.all((cut[:, 1] >= 0) | (cut[:, 2] < 0))  # once stopped, stays stopped
    assert abs((cut[:, 1] >= 0).mean() - 0.5) < 0.06 and cut[:, 0].min() == 1
    assert visits.sum() == (trace >= 0).sum()


# Lift ranking. Users 0..5, items 0..5; item 5 is a hub every user bought, items 1 and 2 were bought only with
# item 0 (by users 0 and 1). Degrees: item 0: 2, 1: 1, 2: 1, 3: 3, 4: 3, hub 5: 6. One traversal from item 0
# (user 0 or 1, then one of that user's 3 items) reaches 1 and 2 with probability 1/6 each, the hub with 1/3.
HUB_EDGES = [(0, 0, 1.0), (0, 1, 1.0), (0, 5, 1.0), (1, 0, 1.0), (1, 2, 1.0), (1, 5, 1.0), (2, 3, 1.0), (2, 5, 1.0),
             (3, 4, 1.0), (3, 5, 1.0), (4, 3, 1.0), (4, 4, 1.0), (4, 5, 1.0), (5, 3, 1.0), (5, 4, 1.0), (5, 5, 1.0)]
HUB_STORE = make_store(HUB_EDGES, n_users=6, n_items=6)


def rank_trace(trace: list[int], alpha: float | None) -> tuple[list[int], list[float]]:
    """Rank the one-traversal walks ``trace`` from item 0 with the kernel: by visits (``alpha`` None) or lift."""
    tr = np.array(trace, np.int64)[:, None]  # (n_walks, hops=1)
    pop = np.empty(0, np.float64) if alpha is None else degree_discount(HUB_STORE, alpha)
    row_len, top_idx, top_cnt = np.zeros(1, np.int64), np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64)
    score = np.zeros((1, 3) if alpha is not None else (0, 0), np.float64)
    _rank_scored(np.array([0]), len(trace), tr, np.zeros(6, np.int32), np.zeros(6, np.int32), 3, False, 50, 500, 0,
                 row_len, top_idx, top_cnt, np.zeros((1, 0), np.int64), pop, score)
    m = int(row_len[0])
    w = top_cnt[0, :m] if alpha is None else score[0, :m]
    return top_idx[0, :m].tolist(), [float(x) for x in w]


def test_lift_puts_related_items_before_the_hub() -> None:
    # six walks from item 0 (each valid on HUB_STORE): 0→u0→1, 0→u1→2, 0→u0→5, 0→u1→5, 0→u0→0, 0→u1→5
    trace = [1, 2, 5, 5, 0, 5]
    assert rank_trace(trace, None) == ([5, 1, 2], [3.0, 1.0, 1.0])  # visits: the hub first
    # lift, alpha 1: 1/1, 1/1, 3/6 -> sum 2.5 -> 0.4, 0.4, 0.2 (ties by smaller id)
    idx, w = rank_trace(trace, 1.0)
    assert idx == [1, 2, 5] and np.allclose(w, [0.4, 0.4, 0.2], rtol=0, atol=1e-12)
    # alpha 0.5: the hub's 3/sqrt(6) = 1.2247 beats 1/1: a weaker discount keeps it first
    idx, w = rank_trace(trace, 0.5)
    total = 2 + 3 / np.sqrt(6)
    assert idx == [5, 1, 2] and np.allclose(w, [3 / np.sqrt(6) / total, 1 / total, 1 / total], rtol=0, atol=1e-12)
    # alpha 0: the visit ranking, weights = visit shares
    idx, w = rank_trace(trace, 0.0)
    assert idx == [5, 1, 2] and np.allclose(w, [0.6, 0.2, 0.2], rtol=0, atol=1e-12)


def test_lift_through_compute_neighborhoods() -> None:
    # the same walks (same seed) ranked both ways: lift weights are the visit counts over degrees, normalised
    base = {"n_walks": 3000, "hops": 1, "top_t": 5, "n_hard_negatives": 0}  # T=5 keeps every reachable item
    vis = compute_neighborhoods(HUB_STORE, WalkConfig(**base))  # type: ignore[arg-type]
    lift = compute_neighborhoods(HUB_STORE, WalkConfig(**base, neighbor_score="lift"))  # type: ignore[arg-type]
    assert vis.neighbors(0)[0] == 5 and sorted(vis.neighbors(0).tolist()) == [1, 2, 5]  # the hub most visited
    assert lift.neighbors(0)[-1] == 5  # ~500/1 for items 1 and 2 against ~1000/6 for the hub
    deg = np.diff(HUB_STORE.item_users.indptr)
    for s in range(6):
        counts = dict(zip(vis.neighbors(s).tolist(), vis.neighbor_weights(s).tolist(), strict=True))
        score = {j: counts[j] / deg[j] for j in counts}
        total = sum(score.values())
        order = sorted(score, key=lambda j: (-score[j], j))
        assert lift.neighbors(s).tolist() == order
        assert np.allclose(lift.neighbor_weights(s), [score[j] / total for j in order], rtol=1e-6, atol=0)
    # everything else of the result does not depend on the ranking
    for name in ("indptr", "item_importance", "user_importance"):
        assert np.array_equal(getattr(vis, name), getattr(lift, name)), name
    other = compute_neighborhoods(HUB_STORE, WalkConfig(**base, neighbor_score="lift", chunk_items=2), n_threads=2)  # type: ignore[arg-type]
    assert_same(lift, other)


def test_default_ranks_by_visits() -> None:
    assert WalkConfig().neighbor_score == "visits"
    cfg = WalkConfig(n_walks=30, hops=3, top_t=2, n_hard_negatives=2, hard_negative_ranks=(2, 5))
    assert_same(compute_neighborhoods(STORE, cfg), compute_neighborhoods(STORE, WalkConfig(**{
        **cfg.__dict__, "neighbor_score": "visits", "lift_alpha": 0.25})))  # alpha unused by visits


def test_lift_refused_where_not_implemented() -> None:
    from gnn.evolving import walk_starts

    cfg = WalkConfig(n_walks=2, hops=1, neighbor_score="lift")
    trace = np.zeros((12, 1), np.int64)
    with pytest.raises(ValueError, match=r"walks\.neighbor_score=.lift. is implemented on the CPU kernel only"):
        rank_paths(pd, np.repeat(np.arange(6), 2), trace, cfg, n_items=6)
    with pytest.raises(ValueError, match=r"walks\.neighbor_score=.lift.: evolving graphs rank by visits only"):
        walk_starts(STORE, cfg, np.arange(2, dtype=np.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("bias", ["uniform", "weight"])
def test_gpu_backend_matches_exact_distribution(bias: str) -> None:
    # cuGraph walks (other random numbers than the CPU kernel): the same distribution, so the same ranking
    cfg = WalkConfig(n_walks=20_000, hops=3, top_t=3, bias=bias, n_hard_negatives=0)  # type: ignore[arg-type]
    nb = compute_neighborhoods(STORE, cfg, backend="gpu")
    assert nb.neighbors(5).size == 0 and np.isclose(nb.user_importance.sum(), 1, atol=1e-5)
    for s in range(5):
        exp, _ = exact_visits(cfg, s)
        got = np.zeros(6)
        got[nb.neighbors(s)] = nb.neighbor_weights(s)
        top = nb.neighbors(s)
        assert top.size == 3 and s not in top and np.all(np.diff(nb.neighbor_weights(s)) <= 0)
        assert within(got[top], exp[top], cfg.hops)
