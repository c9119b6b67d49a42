"""Recommend benchmark: exact blockwise top-K on Dask (1 vs 2 workers) vs faiss; writes results/recommend.json.

Items are random unit vectors (``--data uniform``, the hardest case for an inverted-file index: no cluster
structure) or a mixture of ``--clusters`` Gaussian clusters (``--data clustered``, closer to learned embeddings).
Item→item top-K of a seeded sample of ``--queries`` items (the item itself excluded), measured side by side:

* ours, exact: ``pipeline.recommend.top_k_items`` on a LocalCluster of 1 and of 2 workers (1 thread each), the
  item matrix memory-mapped from a .npy by every worker;
* the naive kernel it replaced: a full ``torch.topk`` of every item chunk (in process, 1 thread, fewer queries);
* faiss ``IndexFlatIP`` (exact brute force, the peer), in process with 1 and 2 threads;
* faiss IVF (approximate): build time, and for each ``--nprobe`` the queries/s (in process, 2 threads) and
  recall@K against our exact result; the default setting also through our Dask path (2 workers).

    PYTHONPATH=$PWD nice -n 5 python benchmarks/bench_recommend.py                  # 1M items, D=64
    PYTHONPATH=$PWD python benchmarks/bench_recommend.py --items 100000 --queries 1024 --out /tmp/recommend.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from distributed import Client, LocalCluster

from gnn.ann import IndexSpec, ann_block_topk, build_index, recall_at_k
from gnn.topk import TopK, chunk_topk, item_queries, merge
from pipeline.recommend import RecommendConfig, top_k_items
from pipeline.rundir import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def item_vectors(n: int, dim: int, data: str, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if data == "clustered":
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        x = centres[rng.integers(0, clusters, n)] + 0.35 * x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def as_topk(frame: Any, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, K) item ids of a long-format result, in query order."""
    ranked = frame.sort_values(["query", "rank"])
    out = ranked["item"].to_numpy().reshape(-1, k)
    if not np.array_equal(ranked["query"].to_numpy()[::k], np.sort(queries)):
        raise RuntimeError("result queries differ from the requested ones")
    return out


def naive_topk(emb: np.ndarray, queries: np.ndarray, k: int, chunk: int) -> TopK:
    """The first kernel: torch.topk of every item chunk, merged (no running-threshold filter)."""
    q, (rows, items) = item_queries(emb, queries)
    best: TopK | None = None
    qt = torch.from_numpy(q)
    for lo in range(0, emb.shape[0], chunk):
        scores = qt @ torch.from_numpy(emb[lo:lo + chunk]).T
        hit = (items >= lo) & (items < lo + chunk)
        scores[torch.from_numpy(rows[hit]), torch.from_numpy(items[hit] - lo)] = -torch.inf
        part = chunk_topk(scores, k, offset=lo)
        best = part if best is None else merge(best, part, k)
    assert best is not None
    return best


def worker_cpu(client: Client) -> float:
    """CPU seconds used so far by all worker processes (robust to other load on a shared machine)."""
    return float(sum(client.run(time.process_time).values()))


def dask_exact(path: Path, queries: np.ndarray, cfg: RecommendConfig, workers: int) -> tuple[float, float, Any]:
    """Wall seconds, worker CPU seconds and the result of the exact search on a fresh cluster of ``workers``."""
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as client:
        top_k_items(path, cfg, client=client, items=queries[: 2 * workers])  # warm: workers map the file
        cpu = worker_cpu(client)
        t0 = time.perf_counter()
        frame = top_k_items(path, cfg, client=client, items=queries)
        return time.perf_counter() - t0, worker_cpu(client) - cpu, frame


def faiss_search(index: Any, emb: np.ndarray, queries: np.ndarray, k: int, threads: int
                 ) -> tuple[float, float, TopK]:
    """Wall seconds, CPU seconds of this process and the result of one faiss search of every query."""
    faiss.omp_set_num_threads(threads)
    q, exclude = item_queries(emb, queries)
    t0, c0 = time.perf_counter(), time.process_time()
    top = ann_block_topk(index, q, k, exclude=exclude)
    return time.perf_counter() - t0, time.process_time() - c0, top


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=4096, help="item queries timed (a seeded sample)")
    p.add_argument("--naive-queries", type=int, default=1024)
    p.add_argument("--data", choices=("uniform", "clustered"), default="uniform")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default sqrt(items))")
    p.add_argument("--nprobe", default="8,32,128",
                   help="IVF cells probed, comma-separated; the middle one also on Dask")
    p.add_argument("--query-block", type=int, default=512, help="queries per Dask task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "results" / "recommend.json")
    a = p.parse_args()
    report: dict[str, Any] = {
        "command": "PYTHONPATH=$PWD nice -n 5 " + " ".join(shlex.quote(x) for x in ["python", *sys.argv]),
        "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "loadavg_start": os.getloadavg(), "torch": torch.__version__, "faiss": faiss.__version__},
        "data": {"items": a.items, "dim": a.dim, "kind": a.data, "k": a.k, "queries": a.queries,
                 "note": "item→item top-K of a seeded sample of items, the item itself excluded; queries/s is wall "
                         "clock on a shared 2-core machine (load averages recorded)"},
    }
    emb = item_vectors(a.items, a.dim, a.data, a.clusters, a.seed)
    queries = np.sort(np.random.default_rng(a.seed + 1).choice(a.items, a.queries, replace=False))
    cfg = RecommendConfig(k=a.k, query_block=a.query_block)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.npy"
        np.save(path, emb)
        exact: dict[str, Any] = {"query_block": cfg.query_block, "item_chunk": cfg.item_chunk}
        frames = {}
        for workers in (1, 2):
            seconds, cpu, frames[workers] = dask_exact(path, queries, cfg, workers)
            exact[f"workers_{workers}"] = {"seconds": round(seconds, 3), "queries_per_s": round(a.queries / seconds, 1),
                                           "worker_cpu_seconds": round(cpu, 3),
                                           "queries_per_cpu_s": round(a.queries / cpu, 1), "loadavg": os.getloadavg()}
            print(f"exact, {workers} worker(s): {a.queries / seconds:.1f} queries/s", flush=True)
    truth = as_topk(frames[2], queries, a.k)
    exact["same_result_1_and_2_workers"] = bool(np.array_equal(as_topk(frames[1], queries, a.k), truth))
    exact["speedup_2_vs_1"] = round(exact["workers_2"]["queries_per_s"] / exact["workers_1"]["queries_per_s"], 3)
    report["exact_dask"] = exact

    torch.set_num_threads(1)
    few = queries[: a.naive_queries]
    t0, c0 = time.perf_counter(), time.process_time()
    naive = naive_topk(emb, few, a.k, 32_768)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    report["naive_kernel_1_thread"] = {"queries": int(few.shape[0]), "queries_per_s": round(few.shape[0] / seconds, 1),
                                       "queries_per_cpu_s": round(few.shape[0] / cpu, 1),
                                       "chunk": 32_768, "same_result": bool(np.array_equal(naive.items,
                                                                                          truth[: few.shape[0]]))}
    print(f"naive kernel, 1 thread: {few.shape[0] / seconds:.1f} queries/s", flush=True)

    flat = build_index(emb, IndexSpec(kind="flat"))
    peer: dict[str, Any] = {}
    for threads in (1, 2):
        seconds, cpu, top = faiss_search(flat, emb, queries, a.k, threads)
        peer[f"threads_{threads}"] = {"queries_per_s": round(a.queries / seconds, 1),
                                      "queries_per_cpu_s": round(a.queries / cpu, 1),
                                      "recall_vs_ours": recall_at_k(top.items, truth)}
        print(f"faiss flat, {threads} thread(s): {a.queries / seconds:.1f} queries/s", flush=True)
    report["faiss_flat_peer"] = peer
    del flat

    spec = IndexSpec(kind="ivf", nlist=a.nlist)
    faiss.omp_set_num_threads(2)
    t0 = time.perf_counter()
    ivf = build_index(emb, spec, seed=a.seed)
    ivf_report: dict[str, Any] = {"nlist": spec.cells(a.items), "build_seconds": round(time.perf_counter() - t0, 2),
                                  "in_process_2_threads": {}}
    base = exact["workers_2"]["queries_per_s"]
    probes = [int(x) for x in a.nprobe.split(",")]
    for nprobe in probes:
        ivf.nprobe = nprobe
        seconds, cpu, top = faiss_search(ivf, emb, queries, a.k, 2)
        qps = a.queries / seconds
        ivf_report["in_process_2_threads"][str(nprobe)] = {
            "queries_per_s": round(qps, 1), "queries_per_cpu_s": round(a.queries / cpu, 1),
            f"recall@{a.k}": recall_at_k(top.items, truth),
            "speedup_vs_exact_2_workers": round(qps / base, 2),
            "speedup_per_cpu_s_vs_exact": round(a.queries / cpu / exact["workers_2"]["queries_per_cpu_s"], 2)}
        print(f"ivf nprobe={nprobe}: {qps:.1f} queries/s, recall {recall_at_k(top.items, truth):.4f}", flush=True)
    middle = probes[len(probes) // 2]
    ivf.nprobe = middle
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as client, \
            tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.npy"
        np.save(path, emb)
        t0 = time.perf_counter()
        frame = top_k_items(path, RecommendConfig(k=a.k, index="ivf", query_block=a.query_block), client=client,
                            items=queries, index=ivf)
        seconds = time.perf_counter() - t0
    qps = a.queries / seconds
    ivf_report["dask_2_workers"] = {"nprobe": middle, "queries_per_s": round(qps, 1),
                                    f"recall@{a.k}": recall_at_k(as_topk(frame, queries, a.k), truth),
                                    "speedup_vs_exact_2_workers": round(qps / base, 2),
                                    "note": "includes serialising the index and shipping it to both workers"}
    print(f"ivf on Dask (2 workers, nprobe={middle}): {qps:.1f} queries/s", flush=True)
    report["faiss_ivf"] = ivf_report
    report["machine"]["loadavg_end"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out, report, sort_keys=False)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
