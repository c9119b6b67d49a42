"""Remote-vertex cache simulation (no Dask): hit rates and remote bytes of importance / LRU / random vs none.

A generated power-law user-item graph with communities; top-K item neighbourhoods from vectorised random walks
(item→user→item, 2 hops, stop 0.5, the way DGL's PinSAGE sampler walks); a 4-way METIS (and hash) partition of the
neighbourhood graph; then, per shard, PinSage-style minibatches of 512 query items from the shard, T neighbours
per layer drawn by visit count from each node's top-K, 2 layers, each batch's rows requested through the real
``cache.RemoteRowCache`` over in-process owner tables. Run::

    python benchmarks/bench_cache.py                      # full scale (200k items), writes results/cache_sim.json
    python benchmarks/bench_cache.py --items 20000 --users 40000 --out /tmp/small.json   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import CacheConfig, LocalOwnerTable, RemoteRowCache, TableFetcher, count_accesses  # noqa: E402
from pipeline.partition import (  # noqa: E402
    PartitionConfig,
    partition_items,
    partition_report,
    shard_halos,
    symmetrize,
)

# ------------------------------------------------------------------------------------------- graph generator


def csr_of(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, cols[order].astype(np.int64)


def generate_graph(n_items: int, n_users: int, n_comm: int, p_inside: float, seed: int
                   ) -> dict[str, Any]:
    """Users and items in communities; item popularity and user activity power-law (Pareto)."""
    rng = np.random.default_rng(seed)
    item_comm = rng.integers(0, n_comm, n_items)
    pop = rng.pareto(1.2, n_items) + 1.0
    user_comm = rng.integers(0, n_comm, n_users)
    deg = np.minimum((rng.pareto(1.5, n_users) + 1.0) * 6, 2000).astype(np.int64)
    users = np.repeat(np.arange(n_users), deg)
    m = users.shape[0]
    # items sorted by community; the cumulative popularity locates a draw inside a community's range
    by_comm = np.argsort(item_comm, kind="stable")
    cum = np.cumsum(pop[by_comm])
    comm_lo = np.concatenate([[0.0], cum])[np.searchsorted(item_comm[by_comm], np.arange(n_comm))]
    comm_hi = np.concatenate([[0.0], cum])[np.searchsorted(item_comm[by_comm], np.arange(n_comm), side="right")]
    inside = rng.random(m) < p_inside
    c = user_comm[users]
    r = np.where(inside, comm_lo[c] + rng.random(m) * (comm_hi[c] - comm_lo[c]), rng.random(m) * cum[-1])
    items = by_comm[np.minimum(np.searchsorted(cum, r, side="right"), n_items - 1)]
    key = np.unique(users * n_items + items)  # one edge per (user, item)
    users, items = key // n_items, key % n_items
    iu_ptr, iu_idx = csr_of(items, users, n_items)
    ui_ptr, ui_idx = csr_of(users, items, n_users)
    return {"iu": (iu_ptr, iu_idx), "ui": (ui_ptr, ui_idx), "n_edges": int(key.shape[0]),
            "item_comm": item_comm}


def random_neighbor(ptr: np.ndarray, idx: np.ndarray, cur: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    deg = ptr[cur + 1] - ptr[cur]
    pick = ptr[cur] + np.floor(rng.random(cur.shape[0]) * np.maximum(deg, 1)).astype(np.int64)
    return np.where(deg > 0, idx[np.minimum(pick, idx.shape[0] - 1)], -1)


def walk_neighborhoods(g: dict[str, Any], n_items: int, *, n_walks: int, top_k: int, seed: int
                       ) -> dict[str, np.ndarray]:
    """Top-K neighbours of each item by visit count of n_walks walks (2 item→user→item hops, stop 0.5)."""
    rng = np.random.default_rng(seed)
    (iu_ptr, iu_idx), (ui_ptr, ui_idx) = g["iu"], g["ui"]
    starts = np.repeat(np.arange(n_items, dtype=np.int64), n_walks)
    cur, alive = starts.copy(), np.ones(starts.shape[0], bool)
    visits_src, visits_dst = [], []
    for hop in range(2):
        u = random_neighbor(iu_ptr, iu_idx, np.where(alive, cur, 0), rng)
        alive &= u >= 0
        nxt = random_neighbor(ui_ptr, ui_idx, np.where(alive, u, 0), rng)
        alive &= nxt >= 0
        cur = np.where(alive, nxt, cur)
        visits_src.append(starts[alive])
        visits_dst.append(cur[alive])
        if hop == 0:
            alive &= rng.random(alive.shape[0]) >= 0.5
    src, dst = np.concatenate(visits_src), np.concatenate(visits_dst)
    importance = np.bincount(dst, minlength=n_items).astype(np.float64)
    keep = src != dst
    key, counts = np.unique(src[keep] * n_items + dst[keep], return_counts=True)
    s, d = key // n_items, key % n_items
    order = np.lexsort((d, -counts, s))
    s, d, counts = s[order], d[order], counts[order]
    first = np.searchsorted(s, s)  # start of each item's group
    rank = np.arange(s.shape[0]) - first
    top = rank < top_k
    s, d, counts = s[top], d[top], counts[top]
    indptr = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(s, minlength=n_items), out=indptr[1:])
    # padded (n_items, K) tables for the sampler: -1 / 0 where a row is shorter
    nbr = np.full((n_items, top_k), -1, np.int64)
    wts = np.zeros((n_items, top_k), np.float32)
    nbr[s, rank[top]] = d
    wts[s, rank[top]] = counts
    return {"indptr": indptr, "indices": d, "weights": counts.astype(np.float32), "importance": importance,
            "nbr": nbr, "wts": wts}


# ------------------------------------------------------------------------------------------- sampler


def sample_layer(nodes: np.ndarray, nbr: np.ndarray, wts: np.ndarray, t: int, rng: np.random.Generator
                 ) -> np.ndarray:
    """T neighbours of each node drawn without replacement with probability ∝ visit count (Gumbel top-T)."""
    w = wts[nodes]  # (m, K)
    keys = np.where(w > 0, np.log(np.maximum(w, 1e-30)) + rng.gumbel(size=w.shape), -np.inf)
    top = np.argpartition(-keys, t - 1, axis=1)[:, :t] if w.shape[1] > t else np.arange(w.shape[1])[None, :]
    picked = np.take_along_axis(nbr[nodes], np.broadcast_to(top, (w.shape[0], top.shape[1])), axis=1)
    ok = np.take_along_axis(keys, np.broadcast_to(top, (w.shape[0], top.shape[1])), axis=1) > -np.inf
    return picked[ok]


def batch_requests(items: np.ndarray, nbr: np.ndarray, wts: np.ndarray, *, batch: int, t: int, layers: int,
                   seed: int) -> list[np.ndarray]:
    """One epoch over a shard's query items: per minibatch, every node of its computation graph (distinct)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(items)
    out = []
    for b in range(0, order.shape[0], batch):
        frontier = order[b: b + batch]
        nodes = [frontier]
        for _ in range(layers):
            frontier = np.unique(sample_layer(frontier, nbr, wts, t, rng))
            nodes.append(frontier)
        out.append(np.unique(np.concatenate(nodes)))
    return out


# ------------------------------------------------------------------------------------------- simulation


def owner_tables(owner: np.ndarray, parts: int, nb: dict[str, np.ndarray], n_features: int
                 ) -> dict[int, LocalOwnerTable]:
    tables = {}
    for k in range(parts):
        ids = np.flatnonzero(owner == k).astype(np.int64)
        feats = np.repeat(ids[:, None].astype(np.float32), n_features, axis=1)  # node ids as features
        tables[k] = LocalOwnerTable(ids, feats, nb["nbr"][ids], nb["wts"][ids], owner=k)
    return tables


def simulate(owner: np.ndarray, parts: int, nb: dict[str, np.ndarray], args: argparse.Namespace
             ) -> dict[str, Any]:
    tables = owner_tables(owner, parts, nb, args.features)
    n_items = owner.shape[0]
    streams, presampled = {}, {}
    for k in range(parts):
        items = tables[k].items
        streams[k] = [batch_requests(items, nb["nbr"], nb["wts"], batch=args.batch, t=args.fanout,
                                     layers=args.layers, seed=1000 * (e + 1) + k) for e in range(args.epochs)]
        # GNNLab-style pre-sampling: one epoch of the shard's own sampler with another seed, counted per item
        pre = batch_requests(items, nb["nbr"], nb["wts"], batch=args.batch, t=args.fanout, layers=args.layers,
                             seed=7 + k)
        presampled[k] = count_accesses(pre, n_items)
    configs: list[tuple[str, str, float | None]] = [("none", "none", None)]
    for frac in args.capacities:
        configs += [("importance", "importance-presampled", frac), ("importance", "importance-global", frac),
                    ("lru", "lru", frac), ("random", "random", frac)]
    results = []
    for policy, label, frac in configs:
        started = time.perf_counter()
        total = None
        last_epoch_hits = last_epoch_req = 0
        fill_bytes = fetched = 0
        for k in range(parts):
            imp = presampled[k] if label == "importance-presampled" else nb["importance"]
            cache = RemoteRowCache(CacheConfig(policy, capacity_fraction=frac, seed=k),  # type: ignore[arg-type]
                                   fetcher=TableFetcher(tables), owner_of=owner, local_rank=k, local=tables[k],
                                   importance=imp if policy == "importance" else None)
            cache.fill()
            for e, epoch in enumerate(streams[k]):
                before = cache.stats
                for ids in epoch:
                    cache.get(ids)
                if e == args.epochs - 1:
                    s = cache.stats
                    last_epoch_hits += s.hits - before.hits
                    last_epoch_req += s.requests - before.requests
            s = cache.stats
            total = s if total is None else total + s
            fill_bytes += s.fill_bytes
            fetched += s.bytes_fetched
        assert total is not None
        results.append({
            "policy": label, "capacity_fraction": frac, "hit_rate": round(100 * total.hit_rate, 2),
            "hit_rate_last_epoch": round(100 * last_epoch_hits / max(last_epoch_req, 1), 2),
            "requests": total.requests, "remote_bytes_per_epoch": (fill_bytes + fetched) / args.epochs,
            "fetched_bytes_per_epoch": fetched / args.epochs, "fill_bytes": fill_bytes,
            "capacity_rows": total.capacity_rows, "seconds": round(time.perf_counter() - started, 2),
        })
        print(f"  {label:22s} cap {frac!s:5s} hit {results[-1]['hit_rate']:5.1f} % "
              f"(last epoch {results[-1]['hit_rate_last_epoch']:5.1f} %) remote/epoch "
              f"{results[-1]['remote_bytes_per_epoch'] / 1e6:8.1f} MB  {results[-1]['seconds']} s", flush=True)
    none_bytes = results[0]["remote_bytes_per_epoch"]
    for r in results:
        r["bytes_reduction_vs_none"] = round(none_bytes / max(r["remote_bytes_per_epoch"], 1), 3)
    remote_share = float(np.mean([np.mean([np.mean(owner[ids] != k) for ids in streams[k][0]])
                                  for k in range(parts)]))
    return {"results": results, "remote_share_of_rows": round(remote_share, 4),
            "mean_rows_per_batch": float(np.mean([len(ids) for k in range(parts) for ids in streams[k][0]]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=400_000)
    ap.add_argument("--communities", type=int, default=64)
    ap.add_argument("--p-inside", type=float, default=0.9, help="share of a user's interactions in its community")
    ap.add_argument("--walks", type=int, default=20, help="walks per item for the neighbourhoods")
    ap.add_argument("--top-k", type=int, default=20, help="neighbourhood size kept per item (sampling pool)")
    ap.add_argument("--fanout", type=int, default=10, help="neighbours sampled per node per layer (T)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    ap.add_argument("--methods", nargs="+", default=["metis", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cache_sim.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    g = generate_graph(args.items, args.users, args.communities, args.p_inside, args.seed)
    t_graph = time.perf_counter() - t0
    print(f"graph: {args.items} items, {args.users} users, {g['n_edges']} edges ({t_graph:.1f} s)", flush=True)
    t0 = time.perf_counter()
    nb = walk_neighborhoods(g, args.items, n_walks=args.walks, top_k=args.top_k, seed=args.seed + 1)
    t_walks = time.perf_counter() - t0
    print(f"neighbourhoods: {nb['indices'].shape[0]} entries ({t_walks:.1f} s)", flush=True)
    pairs = np.diff(g["iu"][0])
    sym = symmetrize(nb["indptr"], nb["indices"], nb["weights"], args.items)
    report: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"nproc": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "graph": {"n_items": args.items, "n_users": args.users, "n_edges": g["n_edges"],
                  "neighbourhood_entries": int(nb["indices"].shape[0]), "seconds_graph": round(t_graph, 2),
                  "seconds_walks": round(t_walks, 2)},
        "row_bytes": 4 * args.features + 12 * args.top_k,
        "anchors": {"importance": [28.5, 44.2, 66.2], "lru": [15.4, 31.6, 54.4], "random": [6.6, 13.2, 26.7],
                    "capacities": [0.05, 0.10, 0.20],
                    "source": "ANCHORS.md: 4-way METIS simulation, fan-out [10,10], batch 512"},
        "partitions": {},
    }
    for method in args.methods:
        cfg = PartitionConfig(parts=args.parts, method=method, seed=args.seed)
        part = partition_items(nb["indptr"], nb["indices"], nb["weights"], args.items, cfg, pairs=pairs, graph=sym)
        halos = shard_halos(nb["indptr"], nb["indices"], part.owner, args.parts)
        prep = partition_report(sym, part, halos, indptr=nb["indptr"], indices=nb["indices"], pairs=pairs)
        print(f"{method}: edge cut {100 * prep['edge_cut_fraction']:.1f} % (weight "
              f"{100 * prep['weight_cut_fraction']:.1f} %), halos {prep['halo_sizes']}, {part.seconds:.1f} s",
              flush=True)
        sim = simulate(part.owner, args.parts, nb, args)
        report["partitions"][method] = {"partition": prep, **sim}
    report["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
