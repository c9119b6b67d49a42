"""Random-walk benchmark: our numba walker vs a vectorised numpy walker, 1 vs 2 Dask workers; writes results/walks.json.

(a) walk steps/s of item→user→item→user→item walks, with a random-gather microbenchmark as the memory bound;
(b) PinSage neighbourhoods (seeds/s) at DGL's PinSAGE-example settings and at ours; peak memory of the workers.

    PYTHONPATH=$PWD python benchmarks/bench_walks.py                       # 10M edges (full scale)
    PYTHONPATH=$PWD python benchmarks/bench_walks.py --edges 1000000 --walks 200000 --out results/walks-small.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np
from distributed import Client, LocalCluster

from gnn.graphstore import GraphStore, csr_from_edges, load_graph_store, write_graph_store
from gnn.walks import WalkConfig, cached_walk_graph, compute_neighborhoods, store_token, walk_chunk, walk_visits
from pipeline.walks import WalkStats, distributed_neighborhoods

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ graph generator


def power_law_graph(n_users: int, n_items: int, n_edges: int, *, n_communities: int = 200, p_local: float = 0.8,
                    seed: int = 0) -> GraphStore:
    """A user-item graph with power-law user activity and item popularity and ``n_communities`` communities:
    an edge's item is, with probability ``p_local``, drawn from its user's community, else from all items."""
    rng = np.random.default_rng(seed)
    users = (n_users * rng.random(n_edges) ** 2.0).astype(np.int64)  # activity ~ power law
    users = rng.permutation(n_users)[users]
    block = n_items // n_communities
    local = rng.random(n_edges) < p_local
    comm = users % n_communities
    rank_in = (block * rng.random(n_edges) ** 3.0).astype(np.int64)  # popularity within a community
    rank_all = (n_items * rng.random(n_edges) ** 3.0).astype(np.int64)
    items = np.where(local, comm * block + rank_in, rank_all)
    items = rng.permutation(n_items)[np.minimum(items, n_items - 1)]
    behaviour = rng.choice(4, n_edges, p=[0.896, 0.029, 0.055, 0.020])
    weights = (1.0 + behaviour).astype(np.float32)
    times = rng.integers(1_511_539_200, 1_512_316_800, n_edges)
    cats = (np.arange(n_items) % 1000).astype(np.int64)
    counts = np.zeros((n_items, 4), np.int64)
    np.add.at(counts, (items, behaviour), 1)
    return GraphStore(
        n_users=n_users, n_items=n_items, n_categories=1000,
        user_items=csr_from_edges(users, items, weights, times, n_users),
        item_users=csr_from_edges(items, users, weights, times, n_items),
        item_category=cats, item_counts=counts,
    )


def ensure_store(path: Path, n_users: int, n_items: int, n_edges: int) -> Path:
    want = {"n_users": n_users, "n_items": n_items, "n_edges": n_edges, "generator": 1}
    mpath = path / "graph.json"
    if mpath.is_file() and json.loads(mpath.read_text()).get("meta") == want:
        return path
    t0 = time.perf_counter()
    write_graph_store(path, power_law_graph(n_users, n_items, n_edges), meta=want)
    print(f"generated {n_edges:,} edges in {time.perf_counter() - t0:.1f}s -> {path}", file=sys.stderr)
    return path


# --------------------------------------------------------------------------------- tasks run on the workers


def starts_of(lo: int, hi: int, n_items: int) -> np.ndarray:
    return (np.arange(lo, hi, dtype=np.int64) * 2654435761) % n_items  # scattered start items, cheap to make


def numpy_walk_task(path: str, token: str, lo: int, hi: int, hops: int, seed: int) -> int:
    """The simple reference: all walks advanced together one step at a time with numpy fancy indexing."""
    st = cached_walk_graph(path, token, weighted=False).store
    iu, ui = st.item_users, st.user_items
    rng = np.random.default_rng([seed, lo])
    cur = starts_of(lo, hi, st.n_items)
    steps = 0
    for _ in range(hops):
        for csr in (iu, ui):
            off = csr.indptr[cur]
            deg = csr.indptr[cur + 1] - off
            cur = csr.indices[off + (rng.random(cur.shape[0]) * deg).astype(np.int64)]
            steps += cur.shape[0]
    return steps


def numba_walk_task(path: str, token: str, lo: int, hi: int, hops: int, seed: int, count_users: bool) -> int:
    g = cached_walk_graph(path, token, weighted=False)
    cfg = WalkConfig(hops=hops, stop_prob=0.0, seed=seed)
    return walk_visits(g, starts_of(lo, hi, g.store.n_items), cfg, count_users=count_users)[2]


@numba.njit(nogil=True, cache=True)
def _gather(arr: np.ndarray, n: int, seed: int) -> int:  # independent random loads: throughput bound
    m = np.uint64(arr.shape[0])
    s = 0
    x = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    for _ in range(n):
        x = x * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
        s += arr[np.int64((x >> np.uint64(33)) % m)]
    return s


@numba.njit(nogil=True, cache=True)
def _chase(arr: np.ndarray, n: int, seed: int) -> np.int64:  # each load's address depends on the last: latency bound
    m = np.uint64(arr.shape[0])
    i = np.uint64(seed) % m
    for _ in range(n):
        i = (np.uint64(arr[np.int64(i)]) * np.uint64(0x9E3779B97F4A7C15) + i) % m
    return np.int64(i)


def gather_task(path: str, token: str, n: int, seed: int, dependent: bool, array: str) -> float:
    csr, part = array.split(".")
    arr = np.asarray(getattr(getattr(cached_walk_graph(path, token, weighted=False).store, csr), part))
    fn = _chase if dependent else _gather
    fn(arr, 1000, seed)
    t0 = time.perf_counter()
    fn(arr, n, seed)
    return time.perf_counter() - t0


def numpy_neighborhood_task(path: str, token: str, lo: int, hi: int, cfg: WalkConfig) -> int:
    """Reference neighbourhoods: numpy walks with stop, then np.unique counts and a lexsort ranking."""
    st = cached_walk_graph(path, token, weighted=False).store
    iu, ui = st.item_users, st.user_items
    rng = np.random.default_rng([cfg.seed, lo])
    seeds = np.repeat(np.arange(lo, hi, dtype=np.int64), cfg.n_walks)
    cur, keys = seeds.copy(), []
    for h in range(cfg.hops):
        if h > 0:
            keep = rng.random(cur.shape[0]) >= cfg.stop_prob
            cur, seeds = cur[keep], seeds[keep]
        for csr in (iu, ui):
            off = csr.indptr[cur]
            deg = csr.indptr[cur + 1] - off
            ok = deg > 0
            cur, seeds, off, deg = cur[ok], seeds[ok], off[ok], deg[ok]
            cur = csr.indices[off + (rng.random(cur.shape[0]) * deg).astype(np.int64)]
        keys.append((seeds - lo) * st.n_items + cur)
    k = np.concatenate(keys)
    k = k[k % st.n_items != k // st.n_items + lo]  # self excluded
    uniq, cnt = np.unique(k, return_counts=True)
    seed_of = uniq // st.n_items
    order = np.lexsort((uniq % st.n_items, -cnt, seed_of))
    seed_sorted = seed_of[order]
    first = np.searchsorted(seed_sorted, seed_sorted, side="left")
    rank = np.arange(order.shape[0]) - first
    return int((rank < cfg.top_t).sum())


def rss_peak_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's RSS inherited across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -------------------------------------------------------------------------------------------- measurements

CONFIGS = {  # DGL's PinSAGE example (2 traversals, stop 0.5, 10 walks, top 3) and ours
    "dgl_settings": WalkConfig(n_walks=10, hops=2, stop_prob=0.5, top_t=3, n_hard_negatives=0),
    "ours": WalkConfig(n_walks=50, hops=3, stop_prob=0.5, top_t=20, n_hard_negatives=8),
}


def in_process(path: str, reps: int) -> dict[str, Any]:
    """Neighbourhoods of every item in this process (no Dask): 1 thread and 2 threads (the kernel is nogil)."""
    st = load_graph_store(path)
    out: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    for label, cfg in CONFIGS.items():
        walk_chunk(st, cfg, 0, 100)  # numba's cached code loaded
        for threads in (1, 2):
            best = min(_seconds(compute_neighborhoods, st, cfg, n_threads=threads) for _ in range(reps))
            out[f"{label}_seeds_per_s_{threads}_threads"] = st.n_items / best
    out["loadavg_after"] = os.getloadavg()
    return out


def _seconds(fn: Any, *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0



def cpu_timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the CPU seconds this worker spent on it (what a loaded, shared machine cannot steal)."""
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def timed_wall(client: Client, calls: list[tuple[Any, ...]], reps: int) -> tuple[float, list[Any]]:
    """Median wall time of submitting ``calls`` (fn, *args) to the cluster and gathering their results."""
    times, out = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        futs = [client.submit(c[0], *c[1:], pure=False) for c in calls]
        out = client.gather(futs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(client: Client, path: str, token: str, a: argparse.Namespace, n_items: int) -> dict[str, Any]:
    workers = len(client.nthreads())
    res: dict[str, Any] = {"workers": workers, "loadavg_before": os.getloadavg()}
    client.run(lambda: cached_walk_graph(path, token, weighted=False) and None)  # map the store once per worker
    n_chunks = 8
    bounds = [(a.walks * k // n_chunks, a.walks * (k + 1) // n_chunks) for k in range(n_chunks)]
    hops = 2  # item→user→item→user→item: 4 steps per walk
    # warm-up (numba compilation / cache load, page cache)
    client.gather([client.submit(numba_walk_task, path, token, 0, 1000, hops, 1, c, pure=False)
                   for c in (True, False) for _ in range(workers)])
    client.gather([client.submit(numpy_walk_task, path, token, 0, 1000, hops, 1, pure=False)
                   for _ in range(workers)])
    # after imports, numba's cached code and the store's mapping: what the walks add comes on top of this
    res["worker_baseline_rss_mb"] = list(client.run(rss_now_mb).values())
    t, out = timed_wall(client, [(cpu_timed, numpy_walk_task, path, token, lo, hi, hops, 7) for lo, hi in bounds],
                        a.reps)
    res["numpy_walker_steps_per_s"] = sum(o[0] for o in out) / t
    res["numpy_walker_steps_per_cpu_s"] = sum(o[0] for o in out) / sum(o[1] for o in out)
    t, out = timed_wall(client, [(cpu_timed, numba_walk_task, path, token, lo, hi, hops, 7, False)
                                 for lo, hi in bounds], a.reps)
    res["numba_walker_steps_per_s"] = sum(o[0] for o in out) / t
    res["numba_walker_steps_per_cpu_s"] = sum(o[0] for o in out) / sum(o[1] for o in out)
    t, steps = timed_wall(client, [(numba_walk_task, path, token, lo, hi, hops, 7, True) for lo, hi in bounds],
                          a.reps)
    res["numba_walker_with_user_counts_steps_per_s"] = sum(steps) / t
    res["walk_steps_per_run"] = int(sum(steps))
    # memory system: random gathers from the big user->item index array and the small user row-pointer array,
    # on every worker at once. A step loads one row pointer and one index: bound = 1 / (1/g_indices + 1/g_indptr)
    n_g = 16_000_000
    for array in ("user_items.indices", "user_items.indptr"):
        for dependent, name in ((False, "random_gathers_per_s"), (True, "dependent_loads_per_s")):
            secs = client.gather([client.submit(gather_task, path, token, n_g, 11 + k, dependent, array, pure=False)
                                  for k in range(workers)])
            res[f"{name}[{array}]"] = workers * n_g / statistics.mean(secs)
    res["step_bound_from_gathers_per_s"] = 1 / (1 / res["random_gathers_per_s[user_items.indices]"]
                                                + 1 / res["random_gathers_per_s[user_items.indptr]"])
    # (b) neighbourhoods of every item
    for label, cfg in CONFIGS.items():
        best = None
        for _ in range(a.reps):
            stats = WalkStats()
            t0 = time.perf_counter()
            nb = distributed_neighborhoods(client, path, cfg, progress=False, stats=stats)
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, stats, nb)
        assert best is not None
        dt, stats, nb = best
        out_bytes = sum(np.asarray(getattr(nb, f)).nbytes for f in ("indptr", "indices", "weights", "item_importance",
                                                                   "user_importance", "hard_negatives"))
        res[label] = {"config": cfg.__dict__ | {"hard_negative_ranks": list(cfg.hard_negative_ranks)},
                      "seeds_per_s": n_items / dt, "seconds": dt, "walk_steps_per_s": stats.steps / dt,
                      "mean_row_length": float(np.diff(nb.indptr).mean()), "output_bytes": out_bytes}
        nchunk = 16
        nb_bounds = [(n_items * k // nchunk, n_items * (k + 1) // nchunk) for k in range(nchunk)]
        t, _ = timed_wall(client, [(numpy_neighborhood_task, path, token, lo, hi, cfg) for lo, hi in nb_bounds], 1)
        res[label]["numpy_reference_seeds_per_s"] = n_items / t
    res["worker_peak_rss_mb"] = list(client.run(rss_peak_mb).values())
    res["worker_rss_now_mb"] = list(client.run(rss_now_mb).values())
    res["loadavg_after"] = os.getloadavg()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=500_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--edges", type=int, default=10_000_000)
    ap.add_argument("--walks", type=int, default=20_000_000,
                    help="walks for the steps/s figure (long enough runs that task overhead does not hide scaling)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--store", type=Path, default=Path("/tmp/pinsage-bench-walks"))
    ap.add_argument("--out", type=Path, default=REPO / "results" / "walks.json")
    a = ap.parse_args()
    store_path = ensure_store(a.store / f"g-{a.users}-{a.items}-{a.edges}", a.users, a.items, a.edges)
    path, token = str(store_path.resolve()), store_token(store_path)
    st = load_graph_store(path)
    walk_bytes = sum(np.asarray(c).nbytes for c in (st.user_items.indptr, st.user_items.indices,
                                                    st.item_users.indptr, st.item_users.indices))
    result: dict[str, Any] = {
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "machine": {"nproc": os.cpu_count(), "loadavg_start": os.getloadavg(), "numba": numba.__version__,
                    "numpy": np.__version__},
        "graph": {"n_users": st.n_users, "n_items": st.n_items, "n_edges": st.n_edges,
                  "walked_arrays_bytes": walk_bytes, "store": path},
        "reference_figures_same_machine_type": {
            "source": "ANCHORS.md (10M-edge user-item graph, 2M item→user→item→user→item walks); not re-run here",
            "numpy_walker_steps_per_s": [21.9e6, 38e6], "numba_step_by_step_steps_per_s": [19e6, 44e6],
            "dgl_random_walk_steps_per_s": [1.9e6, 4.3e6], "dgl_pinsage_sampler_seeds_per_s": [64e3, 122e3],
            "plain_numba_sampler_seeds_per_s": [228e3, 494e3]},
        "runs": [],
    }
    result["in_process"] = r0 = in_process(path, a.reps)
    print(json.dumps(r0, indent=1, default=str), file=sys.stderr)
    for n_workers in (1, 2):
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0", memory_limit="8GiB") as cluster, Client(cluster) as client:
            r = measure(client, path, token, a, st.n_items)
            result["runs"].append(r)
            print(json.dumps(r, indent=1, default=str), file=sys.stderr)
    one, two = result["runs"]
    result["summary"] = {
        "steps_vs_numpy_1w": one["numba_walker_steps_per_s"] / one["numpy_walker_steps_per_s"],
        "steps_vs_numpy_2w": two["numba_walker_steps_per_s"] / two["numpy_walker_steps_per_s"],
        "steps_scaling_1_to_2": two["numba_walker_steps_per_s"] / one["numba_walker_steps_per_s"],
        "numba_steps_per_cpu_s_1w_2w": [one["numba_walker_steps_per_cpu_s"], two["numba_walker_steps_per_cpu_s"]],
        "numpy_steps_per_cpu_s_1w_2w": [one["numpy_walker_steps_per_cpu_s"], two["numpy_walker_steps_per_cpu_s"]],
        "steps_vs_numpy_per_cpu_s_1w": one["numba_walker_steps_per_cpu_s"] / one["numpy_walker_steps_per_cpu_s"],
        "steps_share_of_gather_bound_1w": one["numba_walker_steps_per_s"] / one["step_bound_from_gathers_per_s"],
        "steps_share_of_gather_bound_2w": two["numba_walker_steps_per_s"] / two["step_bound_from_gathers_per_s"],
        "numpy_walker_scaling_1_to_2": two["numpy_walker_steps_per_s"] / one["numpy_walker_steps_per_s"],
        "worker_peak_rss_minus_baseline_mb": [max(p - b for p, b in zip(r["worker_peak_rss_mb"],
                                                                           r["worker_baseline_rss_mb"], strict=True))
                                              for r in result["runs"]],
        "walked_arrays_plus_outputs_mb": (walk_bytes + one["ours"]["output_bytes"]) / 2**20,
        "dgl_settings_seeds_per_s": [one["dgl_settings"]["seeds_per_s"], two["dgl_settings"]["seeds_per_s"]],
        "dgl_settings_vs_dgl_sampler_1w": one["dgl_settings"]["seeds_per_s"] / 64e3,
        "ours_seeds_per_s": [one["ours"]["seeds_per_s"], two["ours"]["seeds_per_s"]],
        "seeds_scaling_1_to_2": two["dgl_settings"]["seeds_per_s"] / one["dgl_settings"]["seeds_per_s"],
        "in_process_dgl_settings_seeds_per_s_1_2_threads": [r0["dgl_settings_seeds_per_s_1_threads"],
                                                            r0["dgl_settings_seeds_per_s_2_threads"]],
        "in_process_ours_seeds_per_s_1_2_threads": [r0["ours_seeds_per_s_1_threads"], r0["ours_seeds_per_s_2_threads"]],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, a.out)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    # run as the importable module so that the workers unpickle the tasks by reference (numba cache works)
    from benchmarks.bench_walks import main as module_main

    raise SystemExit(module_main())
