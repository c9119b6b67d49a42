"""Evolving-graph benchmark (issue 8): writes results/evolve.json.

(a) PinSage sampler throughput (batches of 512 targets, 2 layers, one version snapshot per batch) with no writer vs
    with a stream of updates into an ``UpdateWriter`` vs a naive writer appending back to back, interleaved rounds;
(b) time from ``append`` to visible for a polling reader, split into log fsync and build + publish;
(c) one update whose touched set is ~1 % of the items: the incremental neighbourhood refresh vs
    ``compute_neighborhoods`` on the new graph (1 thread), and the whole update (graph splice + refresh) vs a graph
    rebuild from all edges + ``compute_neighborhoods``; plus the touched share of a random batch of the same size.

    PYTHONPATH=$PWD nice -n 5 python benchmarks/bench_evolve.py
    PYTHONPATH=$PWD python benchmarks/bench_evolve.py --users 20000 --items 5000 --edges 200000 --seconds 1 \
        --out /tmp/e.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_walks import power_law_graph
from gnn.evolving import (
    GraphVersion,
    InteractionBatch,
    LiveGraph,
    UpdateWriter,
    VersionedPinSageSampler,
    aggregate_pairs,
    apply_batch,
    refresh,
    refresh_neighborhoods,
    touched_items,
)
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, csr_from_edges
from gnn.walks import WalkConfig, compute_neighborhoods

REPO = Path(__file__).resolve().parents[1]
T_NEW = 1_512_400_000


def random_batch(store: GraphStore, rng: np.random.Generator, n: int, *, tail: float = 1.0) -> InteractionBatch:
    """n interactions; ``tail`` < 1 draws only from the least popular share of items and least active users."""
    if tail >= 1.0:
        return InteractionBatch(rng.integers(0, store.n_users, n), rng.integers(0, store.n_items, n),
                                rng.integers(0, 4, n).astype(np.int8), T_NEW + rng.integers(0, 1000, n),
                                np.zeros(n, np.int64), store.n_users, store.n_items, store.n_categories)
    iu, ui = store.item_users.degree(), store.user_items.degree()
    items = np.argsort(iu, kind="stable")[: max(1, int(tail * store.n_items))]
    users = np.argsort(ui, kind="stable")[: max(1, int(tail * store.n_users))]
    users = users[ui[users] > 0]
    return InteractionBatch(rng.choice(users, n), rng.choice(items, n), rng.integers(0, 4, n).astype(np.int8),
                            T_NEW + rng.integers(0, 1000, n), np.zeros(n, np.int64), store.n_users, store.n_items,
                            store.n_categories)


def touched_share(live: LiveGraph, b: InteractionBatch) -> float:
    st = live.current.store
    t = touched_items(live._traces, live.cfg.hops, np.unique(b.item), np.unique(b.user), st.n_items, st.n_users)
    return t.shape[0] / st.n_items


def one_percent_batch(live: LiveGraph, rng: np.random.Generator, target: float = 0.01) -> InteractionBatch:
    """A tail batch whose touched set is the closest to ``target`` of the items (doubling, then bisection)."""
    lo, hi = 1, 1
    while touched_share(live, random_batch(live.current.store, np.random.default_rng(1), hi, tail=0.5)) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        share = touched_share(live, random_batch(live.current.store, np.random.default_rng(1), mid, tail=0.5))
        lo, hi = (mid, hi) if share < target else (lo, mid)
    return random_batch(live.current.store, np.random.default_rng(1), hi, tail=0.5)


def rebuild_graph(store: GraphStore) -> GraphStore:
    """The graph rebuilt from all its edges at once, one edge per (user, item) pair as ``pinsage graph`` writes it
    (what a full recomputation would have to do first)."""
    ui = store.user_items
    users = np.repeat(np.arange(store.n_users, dtype=np.int64), ui.degree())
    users, items, w, t = aggregate_pairs(users, np.asarray(ui.indices), np.asarray(ui.weights),
                                         np.asarray(ui.times), "sum")
    return dataclasses.replace(store, user_items=csr_from_edges(users, items, w, t, store.n_users),
                               item_users=csr_from_edges(items, users, w, t, store.n_items))


def refresh_vs_full(live: LiveGraph, reps: int) -> dict[str, Any]:
    """The update as the writer does it (graph splice, then the touched neighbourhoods) vs from scratch (graph
    rebuilt from all edges, then ``compute_neighborhoods``, 1 thread); both halves timed separately."""
    rng = np.random.default_rng(5)
    b = one_percent_batch(live, rng)
    v0, cfg = live.current, live.cfg
    refresh(v0, live._traces.copy(), b, cfg)  # compile
    compute_neighborhoods(v0.store, cfg)
    t: dict[str, list[float]] = {"graph_splice_s": [], "neighborhood_refresh_s": [], "graph_rebuild_s": [],
                                 "full_neighborhoods_s": []}
    for _ in range(reps):
        traces = live._traces.copy()  # refresh updates them
        t0 = time.perf_counter()
        store = apply_batch(v0.store, b, edge_weight=live.edge_weight)
        t1 = time.perf_counter()
        v1, _ = refresh_neighborhoods(v0, traces, b, store, cfg)
        t2 = time.perf_counter()
        rebuilt = rebuild_graph(store)
        t3 = time.perf_counter()
        nb = compute_neighborhoods(rebuilt, cfg)
        t4 = time.perf_counter()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            t[key].append(dt)
    same = all(np.array_equal(getattr(v1.neighborhoods, k), getattr(nb, k))
               for k in ("indptr", "indices", "weights", "item_importance", "user_importance", "hard_negatives"))
    med = {k: statistics.median(v) for k, v in t.items()}
    rand = random_batch(v0.store, rng, b.n_rows)
    return {"batch_interactions": b.n_rows, "touched_items": v1.touched, "touched_share": v1.touched / v1.n_items,
            "random_batch_same_size_touched_share": touched_share(live, rand), **t,
            "medians_s": med,
            "speedup_neighborhoods": med["full_neighborhoods_s"] / med["neighborhood_refresh_s"],
            "speedup_whole_update": (med["graph_rebuild_s"] + med["full_neighborhoods_s"])
            / (med["graph_splice_s"] + med["neighborhood_refresh_s"]),
            "identical_to_full": same}


def sampler_rounds(live: LiveGraph, seconds: float, rounds: int, batch: int, arrival_ms: float,
                   arrival_rows: int) -> dict[str, Any]:
    """Per round: sampling alone; with a stream of batches (``arrival_rows`` interactions every ``arrival_ms``) into
    an ``UpdateWriter`` (background thread, nice +10, group commit); with a naive writer appending 64-interaction
    batches back to back at normal priority."""
    st = live.current.store
    table = ItemFeatureTable.from_arrays(category=np.asarray(st.item_category), counts=np.asarray(st.item_counts),
                                         n_categories=st.n_categories)
    sampler = VersionedPinSageSampler(live, rows=table, n_layers=2)
    n_items = st.n_items

    cpu_ms: list[float] = []  # the sampler thread's CPU time per batch of the last sample_for call

    def sample_for(duration: float) -> tuple[int, set[int]]:
        rng = np.random.default_rng(0)
        n, seen = 0, set()
        end = time.perf_counter() + duration
        c0 = time.thread_time()
        while time.perf_counter() < end:
            _, number = sampler.sample_versioned(rng.choice(n_items, batch, replace=False), rng)
            seen.add(number)
            n += 1
        cpu_ms[:] = [1e3 * (time.thread_time() - c0) / max(n, 1)]
        return n, seen

    def with_stream(rng: np.random.Generator) -> dict[str, float]:
        writer = UpdateWriter(live)
        stop = threading.Event()
        futures: list[tuple[float, Future[GraphVersion]]] = []
        v0 = live.current.number

        def feed() -> None:
            while not stop.wait(arrival_ms / 1e3):
                futures.append((time.perf_counter(),
                                writer.submit(random_batch(live.current.store, rng, arrival_rows))))

        feeder = threading.Thread(target=feed)
        feeder.start()
        n, seen = sample_for(seconds)
        stop.set()
        feeder.join()
        writer.close()
        lat = [1e3 * (f.result().created - t) for t, f in futures]
        return {"batches_per_s": n / seconds, "sampler_cpu_ms_per_batch": cpu_ms[0],
                "arrived_interactions": arrival_rows * len(futures),
                "versions_published": live.current.number - v0, "versions_seen": len(seen),
                "ack_latency_ms_median": statistics.median(lat) if lat else float("nan")}

    def with_naive(rng: np.random.Generator) -> dict[str, float]:
        stop = threading.Event()
        applied = [0]

        def writer() -> None:
            while not stop.is_set():
                live.append(random_batch(live.current.store, rng, 64))
                applied[0] += 1

        th = threading.Thread(target=writer)
        th.start()
        n, _ = sample_for(seconds)
        stop.set()
        th.join()
        return {"batches_per_s": n / seconds, "sampler_cpu_ms_per_batch": cpu_ms[0], "versions_published": applied[0]}

    sample_for(0.5)  # warm-up (numba kernels)
    rng = np.random.default_rng(7)
    runs: dict[str, list[Any]] = {"no_writer": [], "update_writer": [], "naive_writer": []}
    for _ in range(rounds):  # the modes alternate, so that a change of the machine's load hits all of them
        n, _ = sample_for(seconds)
        runs["no_writer"].append({"batches_per_s": n / seconds, "sampler_cpu_ms_per_batch": cpu_ms[0],
                                  "loadavg_1min": os.getloadavg()[0]})
        runs["update_writer"].append(with_stream(rng))
        runs["naive_writer"].append(with_naive(rng))

    def slowdown(mode: str, key: str, lower_is_better: bool) -> float:
        ratios = [w[key] / a[key] for a, w in zip(runs["no_writer"], runs[mode], strict=True)]
        r = statistics.median(ratios)  # the median of per-round ratios: robust to load drifting between rounds
        return r - 1 if lower_is_better else 1 - r

    return {"runs": runs, "batch_targets": batch, "n_layers": 2, "seconds_per_mode": seconds, "rounds": rounds,
            "arrival": f"{arrival_rows} interactions every {arrival_ms} ms",
            "throughput_slowdown_update_writer": slowdown("update_writer", "batches_per_s", False),
            "throughput_slowdown_naive_writer": slowdown("naive_writer", "batches_per_s", False),
            "cpu_per_batch_increase_update_writer": slowdown("update_writer", "sampler_cpu_ms_per_batch", True),
            "cpu_per_batch_increase_naive_writer": slowdown("naive_writer", "sampler_cpu_ms_per_batch", True)}


def append_to_visible(live: LiveGraph, n: int) -> dict[str, Any]:
    """A reader polls ``live.current`` (0.2 ms sleeps); latency = reader's sighting - the writer's append call."""
    seen: dict[int, float] = {}
    stop = threading.Event()

    def reader() -> None:
        last = live.current.number
        while not stop.is_set():
            v = live.current.number
            if v != last:
                seen[v] = time.perf_counter()
                last = v
            time.sleep(0.0002)

    logged: dict[int, float] = {}
    live.on_logged = lambda number: logged.__setitem__(number, time.perf_counter())
    th = threading.Thread(target=reader)
    th.start()
    rng = np.random.default_rng(3)
    started: dict[int, float] = {}
    touched = []
    for _ in range(n):
        b = random_batch(live.current.store, rng, 64)
        number = live.current.number + 1
        started[number] = time.perf_counter()
        touched.append(live.append(b).touched / live.current.n_items)
        time.sleep(0.01)  # let the reader see it before the next one
    stop.set()
    th.join()
    live.on_logged = None
    vis = [1e3 * (seen[k] - started[k]) for k in started if k in seen]
    fs = [1e3 * (logged[k] - started[k]) for k in started]
    return {"updates": n, "batch_interactions": 64, "append_to_visible_ms_median": statistics.median(vis),
            "append_to_visible_ms_p95": float(np.percentile(vis, 95)),
            "log_write_fsync_ms_median": statistics.median(fs),
            "build_and_publish_ms_median": statistics.median(vis) - statistics.median(fs), "sightings": len(vis),
            "touched_share_median": statistics.median(touched)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=400_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--edges", type=int, default=4_000_000)
    ap.add_argument("--n-walks", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=3.0, help="sampling time per mode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arrival-ms", type=float, default=10.0, help="a batch of new interactions arrives every ... ms")
    ap.add_argument("--arrival-rows", type=int, default=64, help="interactions per arriving batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "evolve.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
                              "machine": {"nproc": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    t0 = time.perf_counter()
    store = rebuild_graph(power_law_graph(a.users, a.items, a.edges))  # the generator repeats some pairs
    cfg = WalkConfig(n_walks=a.n_walks, hops=3, top_t=20)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        live = LiveGraph(store, cfg, log_path=Path(tmp) / "updates.log")
        result["graph"] = {"n_users": a.users, "n_items": a.items, "n_edges": store.n_edges,
                           "generator": "benchmarks/bench_walks.py power_law_graph, repeated pairs merged",
                           "walks": {"n_walks": cfg.n_walks, "hops": cfg.hops, "top_t": cfg.top_t},
                           "setup_s": round(time.perf_counter() - t0, 2),
                           "trace_bytes": live._traces.items.nbytes + live._traces.users.nbytes}
        print(json.dumps(result, indent=1), file=sys.stderr)
        result["refresh_vs_full"] = refresh_vs_full(live, a.reps)
        print(json.dumps(result["refresh_vs_full"], indent=1), file=sys.stderr)
        result["append_to_visible"] = append_to_visible(live, 30)
        print(json.dumps(result["append_to_visible"], indent=1), file=sys.stderr)
        result["sampler"] = sampler_rounds(live, a.seconds, a.rounds, 512, a.arrival_ms, a.arrival_rows)
        print(json.dumps(result["sampler"], indent=1), file=sys.stderr)
    result["goals"] = {"sampler_slowdown_at_most_20pct":
                       result["sampler"]["throughput_slowdown_update_writer"] <= 0.2,
                       "incremental_at_least_10x": result["refresh_vs_full"]["speedup_neighborhoods"] >= 10}
    result["machine"]["loadavg_end"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
