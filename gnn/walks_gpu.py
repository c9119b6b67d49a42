"""GPU backend of :func:`gnn.walks.compute_neighborhoods`: cuGraph random walks, cuDF group-by counts.

A thin layer: the walks come from ``cugraph.uniform_random_walks`` / ``cugraph.biased_random_walks`` on one
directed graph holding items ``0..n_items-1`` and users ``n_items..`` (edges both ways); the top-T ranking and hard
negatives are cuDF group-bys in :func:`rank_paths`, which is written against a DataFrame module so the CPU tests
run the same code on pandas. Mode ``"stop"``: cuGraph walks have no stop probability, so each walk's number of
traversals is drawn separately (truncated geometric) and the path is cut there: the same distribution, not the
same random numbers as the CPU kernel. Mode ``"restart"`` is not a cuGraph walk: it is personalised PageRank
(``cugraph.pagerank(personalization=...)``), one solve per item (slow: for small graphs and for checking), weights
``n_walks * hops * ppr``. PageRank restarts per edge, the CPU walks per item→user→item traversal: the damping is
``sqrt(1 - restart_prob)`` per edge, so the continuation over a traversal matches, but a restart can happen at a
user; the ranking is close to, not the same as, the CPU one.
For several GPUs use ``cugraph.dask`` with the same calls (not wired yet).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import numpy as np

from gnn.graphstore import GraphStore
from gnn.walks import Neighborhoods, WalkConfig, normalise

log = logging.getLogger(__name__)


def refuse_lift(cfg: WalkConfig) -> None:
    """The GPU backend ranks by visit count only: refuse ``neighbor_score="lift"`` rather than ignore it."""
    if cfg.neighbor_score != "visits":
        raise ValueError(f"walks.neighbor_score={cfg.neighbor_score!r} is implemented on the CPU kernel only: "
                         "use backend='cpu' (or neighbor_score='visits' on the GPU)")


def cut_paths(item_paths: np.ndarray, cfg: WalkConfig, rng: np.random.Generator) -> np.ndarray:
    """Apply mode ``"stop"`` to full-length paths: after each traversal but the last, stop with
    ``cfg.stop_prob``; positions after the stop become -1.

    Shapes: ``item_paths`` (W, hops) int64 items reached by each traversal (-1 padded) -> same shape.
    """
    n_w, hops = item_paths.shape
    stops = rng.random((n_w, max(hops - 1, 0))) < cfg.stop_prob  # (W, hops-1)
    alive = np.ones((n_w, hops), bool)
    if hops > 1:
        alive[:, 1:] = np.cumsum(stops, axis=1) == 0
    return np.where(alive, item_paths, -1)


def rank_paths(xdf: ModuleType, starts: Any, item_paths: Any, cfg: WalkConfig, *, n_items: int,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-T rows, hard negatives and item visit counts from walk paths, by DataFrame group-bys.

    ``xdf`` is ``cudf`` or ``pandas``. Shapes: ``starts`` (W,) start item of each walk; ``item_paths``
    (W, hops) items reached (-1 padded). Returns ``(indptr (n_items+1,), indices, weights float32,
    hard_negatives (n_items, H), item_visits (n_items,) int64)``.
    """
    refuse_lift(cfg)
    hops = item_paths.shape[1]
    df = xdf.DataFrame({"start": np.repeat(np.asarray(starts), hops), "item": np.asarray(item_paths).ravel()})
    df = df[df["item"] >= 0]
    visits = np.bincount(df["item"].to_numpy(), minlength=n_items).astype(np.int64)
    if not cfg.include_self:
        df = df[df["item"] != df["start"]]
    counts = df.groupby(["start", "item"]).size().reset_index()
    counts.columns = ["start", "item", "count"]
    counts = counts.sort_values(["start", "count", "item"], ascending=[True, False, True])
    counts["rank"] = counts.groupby("start").cumcount()
    top = counts[counts["rank"] < cfg.top_t]
    lengths = np.bincount(top["start"].to_numpy(), minlength=n_items)
    indptr = np.zeros(n_items + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    negs = np.full((n_items, cfg.n_hard_negatives), -1, np.int64)
    if cfg.n_hard_negatives:
        lo, hi = (max(int(cfg.hard_negative_ranks[0]), cfg.top_t), int(cfg.hard_negative_ranks[1]))
        win = counts[(counts["rank"] >= lo) & (counts["rank"] < hi)].copy()
        win["key"] = np.random.default_rng(seed).random(len(win))
        win = win.sort_values(["start", "key"])
        win["slot"] = win.groupby("start").cumcount()
        win = win[win["slot"] < cfg.n_hard_negatives]
        negs[win["start"].to_numpy(), win["slot"].to_numpy()] = win["item"].to_numpy()  # cuDF: explicit copies
    return (indptr, top["item"].to_numpy().astype(np.int64), top["count"].to_numpy().astype(np.float32), negs,
            visits)


def _cugraph_graph(store: GraphStore, weighted: bool) -> Any:  # pragma: no cover - needs a GPU
    import cudf
    import cugraph

    iu = store.item_users
    items = np.repeat(np.arange(store.n_items, dtype=np.int64), np.diff(np.asarray(iu.indptr)))
    users = np.asarray(iu.indices, dtype=np.int64) + store.n_items
    w = np.asarray(iu.weights, dtype=np.float32)
    edges = cudf.DataFrame({"src": np.concatenate([items, users]), "dst": np.concatenate([users, items]),
                            "w": np.concatenate([w, w])})
    g = cugraph.Graph(directed=True)
    g.from_cudf_edgelist(edges, source="src", destination="dst", edge_attr="w" if weighted else None,
                         renumber=False)
    return g


def gpu_neighborhoods(store: GraphStore, cfg: WalkConfig) -> Neighborhoods:  # pragma: no cover - needs a GPU
    """:class:`Neighborhoods` on one GPU (see the module docstring for how the modes map to cuGraph)."""
    refuse_lift(cfg)
    import cudf
    import cugraph

    g = _cugraph_graph(store, cfg.bias == "weight")
    n_items, n_users = store.n_items, store.n_users
    if cfg.mode == "restart":
        return _ppr_neighborhoods(g, store, cfg)
    starts = np.repeat(np.arange(n_items, dtype=np.int64), cfg.n_walks)
    walk = cugraph.biased_random_walks if cfg.bias == "weight" else cugraph.uniform_random_walks
    paths, _, max_len = walk(g, start_vertices=cudf.Series(starts), max_depth=2 * cfg.hops,
                             random_state=cfg.seed)
    full = paths.to_numpy().reshape(len(starts), int(max_len))  # (W, 2*hops+1): item, user, item, ...
    user_paths = full[:, 1::2]
    item_paths = cut_paths(full[:, 2::2], cfg, np.random.default_rng(cfg.seed))
    alive_users = np.where(item_paths >= 0, user_paths, -1)  # a cut traversal visits no user
    user_visits = np.bincount(alive_users[alive_users >= 0] - n_items, minlength=n_users)
    indptr, indices, weights, negs, item_visits = rank_paths(cudf, starts, item_paths, cfg, n_items=n_items,
                                                             seed=cfg.seed)
    return Neighborhoods(indptr, indices, weights, normalise(item_visits), normalise(user_visits), negs)


def _ppr_neighborhoods(g: Any, store: GraphStore, cfg: WalkConfig) -> Neighborhoods:  # pragma: no cover - GPU
    import cudf
    import cugraph

    n_items = store.n_items
    rows_i, rows_w, negs = [], [], np.full((n_items, cfg.n_hard_negatives), -1, np.int64)
    total = np.zeros(n_items + store.n_users, np.float64)
    for s in range(n_items):
        pers = cudf.DataFrame({"vertex": [s], "values": [1.0]})
        pr = cugraph.pagerank(g, alpha=float(np.sqrt(1.0 - cfg.restart_prob)), personalization=pers).to_pandas()
        score = np.zeros(n_items + store.n_users)
        score[pr["vertex"].to_numpy()] = pr["pagerank"].to_numpy()
        total += score
        items = score[:n_items].copy()
        if not cfg.include_self:
            items[s] = 0.0
        order = np.lexsort((np.arange(n_items), -items))
        order = order[items[order] > 0]
        rows_i.append(order[: cfg.top_t])
        rows_w.append((items[order[: cfg.top_t]] * cfg.n_walks * cfg.hops).astype(np.float32))
        lo, hi = max(int(cfg.hard_negative_ranks[0]), cfg.top_t), int(cfg.hard_negative_ranks[1])
        pool = order[lo:hi]
        if pool.size and cfg.n_hard_negatives:
            pick = np.random.default_rng([cfg.seed, s]).permutation(pool)[: cfg.n_hard_negatives]
            negs[s, : pick.size] = pick
    indptr = np.zeros(n_items + 1, np.int64)
    np.cumsum([r.size for r in rows_i], out=indptr[1:])
    return Neighborhoods(indptr, np.concatenate(rows_i).astype(np.int64), np.concatenate(rows_w), normalise(
        total[:n_items]), normalise(total[n_items:]), negs)
