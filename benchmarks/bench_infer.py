"""Inference benchmark: map-reduce (``pinsage infer``, each item's layer output once) vs the naive per-item K-hop
forward pass (``gnn.trainer.embed_items``) on the same items; 1 vs 2 Dask workers; fraction of the CPU's matmul peak.

The graph is generated: ``--items`` items with ``--top-t`` neighbours each, drawn from the item's community (a
contiguous id range of ``--community`` items) with probability ``--p-local``, else from all items — a synthetic
neighbourhood table in place of the walks stage (which would take longer than the benchmark at this scale); with
contiguous communities, id-range blocks behave like partition shards whose edge cut is about 1 - p_local. The
naive pass is timed on a random sample of items and extrapolated (items/s), and checked against map-reduce there.

    PYTHONPATH=$PWD nice -n 5 python benchmarks/bench_infer.py                 # 1M items, T=20, 2 layers
    PYTHONPATH=$PWD python benchmarks/bench_infer.py --items 100000 --out results/infer-small.json
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
from typing import Any, cast

import numpy as np
import torch
from distributed import Client, LocalCluster

from gnn.batches import PairBatcher
from gnn.checkpoint import save_checkpoint
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, csr_from_edges, write_graph_store
from gnn.inference import WalkLayerNeighbors, layerwise_embeddings
from gnn.models import ModelConfig, build_model, build_sampler
from gnn.trainer import Trainer, embed_items
from gnn.walks import Neighborhoods, save_neighborhoods
from pipeline.infer import InferConfig, load_embeddings, run_infer
from pipeline.rundir import run_stage, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def synthetic_store(n_items: int, *, seed: int = 0) -> GraphStore:
    """Items with categories and behaviour counts (what the input encoder reads); two interactions per item."""
    rng = np.random.default_rng(seed)
    n_users = max(1, n_items // 2)
    items = np.repeat(np.arange(n_items, dtype=np.int64), 2)
    users = rng.integers(0, n_users, items.shape[0])
    w = np.ones(items.shape[0], np.float32)
    t = np.arange(items.shape[0], dtype=np.int64)
    counts = rng.poisson((20.0, 2.0, 1.0, 0.5), size=(n_items, 4)).astype(np.int64)
    return GraphStore(n_users=n_users, n_items=n_items, n_categories=100,
                      user_items=csr_from_edges(users, items, w, t, n_users),
                      item_users=csr_from_edges(items, users, w, t, n_items),
                      item_category=rng.integers(0, 100, n_items), item_counts=counts)


def synthetic_neighborhoods(n_items: int, top_t: int, *, community: int, p_local: float, seed: int = 0
                            ) -> Neighborhoods:
    """``top_t`` distinct-enough neighbours per item (community-local with probability ``p_local``), visit counts
    descending, like the walks stage's top-T rows."""
    rng = np.random.default_rng(seed + 1)
    ids = np.arange(n_items, dtype=np.int64)
    base = (ids // community) * community
    span = np.minimum(community, n_items - base)
    local = base[:, None] + (rng.random((n_items, top_t)) * span[:, None]).astype(np.int64)
    anywhere = rng.integers(0, n_items, (n_items, top_t))
    nbr = np.where(rng.random((n_items, top_t)) < p_local, local, anywhere)
    visits = np.sort(rng.integers(1, 50, (n_items, top_t)), axis=1)[:, ::-1].astype(np.float32)
    imp = np.bincount(nbr.ravel(), minlength=n_items).astype(np.float32)
    return Neighborhoods(indptr=np.arange(0, n_items * top_t + 1, top_t, dtype=np.int64), indices=nbr.ravel(),
                         weights=visits.ravel().copy(), item_importance=imp / imp.sum(),
                         user_importance=np.zeros(1, np.float32), hard_negatives=np.full((n_items, 0), -1, np.int64))


def matmul_peak(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """Best-of FLOP/s of a float32 (n x n) @ (n x n) on ``threads`` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2.0 * n**3 / best


def flops_per_item(c: ModelConfig, store: GraphStore) -> float:
    """Multiply-add FLOPs of one item's embedding in the layer-wise computation (dense layers + aggregation)."""
    in_raw = c.category_dim + (c.id_dim if c.id_buckets else 0) + c.n_numeric + c.content_dim
    total = 2.0 * in_raw * c.input_dim
    d = c.input_dim
    for _ in range(c.n_layers):
        total += 2.0 * d * c.hidden_dim  # Q, once per item
        total += 2.0 * c.n_neighbors * c.hidden_dim  # weighted sum of T messages
        total += 2.0 * (d + c.hidden_dim) * c.hidden_dim  # W on [h ; agg]
        d = c.hidden_dim
    return total + 2.0 * c.hidden_dim * c.hidden_dim + 2.0 * c.hidden_dim * c.embed_dim


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def workers_cpu(client: Client) -> float:
    """CPU seconds used so far by all worker processes (robust to other load on a shared machine)."""
    return float(sum(client.run(_cpu_seconds).values()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--top-t", type=int, default=20)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--community", type=int, default=2000)
    ap.add_argument("--p-local", type=float, default=0.9)
    ap.add_argument("--block-items", type=int, default=131072)
    ap.add_argument("--naive-sample", type=int, default=2048, help="items timed with embed_items, batch 1024")
    ap.add_argument("--per-item-sample", type=int, default=100, help="items timed with embed_items, batch 1")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--backend", choices=("cpu", "gpu"), default="cpu", help="device of the map-reduce workers")
    ap.add_argument("--no-in-process", action="store_true", help="skip the one-process layer-wise run")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "infer.json")
    args = ap.parse_args()

    result: dict[str, Any] = {
        "command": "PYTHONPATH=$PWD " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": os.getloadavg()},
    }
    tmp = tempfile.TemporaryDirectory(prefix="bench-infer-")
    run_dir = args.run_dir or Path(tmp.name)
    t0 = time.perf_counter()
    store = synthetic_store(args.items)
    nb = synthetic_neighborhoods(args.items, args.top_t, community=args.community, p_local=args.p_local)

    def graph_stage(d: Path) -> dict[str, Any]:
        write_graph_store(d, store)
        return {"n": store.n_items}

    def walks_stage(d: Path) -> dict[str, Any]:
        save_neighborhoods(d, nb)
        return {"n": nb.n_items}

    run_stage(run_dir, "graph", config=InferConfig(), inputs={}, build=graph_stage)
    run_stage(run_dir, "walks", config=InferConfig(), inputs={}, build=walks_stage)
    config = ModelConfig(kind="pinsage", n_layers=args.layers, n_neighbors=args.top_t, n_categories=100)
    model = build_model(config, seed=0).eval()
    save_checkpoint(run_dir / "train" / "checkpoint.pt", Trainer(model, cast(PairBatcher, None)), config)
    result["graph"] = {"n_items": args.items, "top_t": args.top_t, "n_layers": args.layers,
                       "neighbourhoods": f"synthetic (not the walks stage): T neighbours per item, from its community "
                                         f"of {args.community} contiguous ids with p={args.p_local}, else uniform",
                       "model": config.to_dict(), "setup_seconds": round(time.perf_counter() - t0, 1)}
    flops_item = flops_per_item(config, store)
    peaks = {t: matmul_peak(t) for t in (1, 2)}
    result["matmul_peak_gflops"] = {f"{t}_threads": round(p / 1e9, 1) for t, p in peaks.items()}
    result["flops_per_item"] = flops_item

    # naive: the trainer's own K-hop forward pass, per batch of 1024 distinct items and per single item
    torch.set_num_threads(1)
    rows = ItemFeatureTable.from_graph_store(store)
    sampler = build_sampler(config, rows=rows, neighborhoods=nb)
    rng = np.random.default_rng(5)
    sample = np.sort(rng.choice(args.items, args.naive_sample, replace=False))
    t1, c1 = time.perf_counter(), time.process_time()
    naive_emb = embed_items(model, sampler, sample, batch_size=1024)
    naive_s, naive_cpu = time.perf_counter() - t1, time.process_time() - c1
    single = sample[: args.per_item_sample]
    t1, c1 = time.perf_counter(), time.process_time()
    embed_items(model, sampler, single, batch_size=1)
    single_s, single_cpu = time.perf_counter() - t1, time.process_time() - c1
    naive: dict[str, Any] = {
        "batch_1024": {"items": int(sample.shape[0]), "seconds": round(naive_s, 2),
                       "items_per_s": round(sample.shape[0] / naive_s, 1),
                       "items_per_cpu_s": round(sample.shape[0] / naive_cpu, 1)},
        "batch_1": {"items": int(single.shape[0]), "seconds": round(single_s, 2),
                    "items_per_s": round(single.shape[0] / single_s, 1),
                    "items_per_cpu_s": round(single.shape[0] / single_cpu, 1)},
        "threads": 1, "note": "timed on a random sample, extrapolated to all items as items/s"}
    naive["batch_1024"]["gflops_useful"] = round(naive["batch_1024"]["items_per_s"] * flops_item / 1e9, 3)
    result["naive"] = naive

    # layer-wise in one process (no Dask): the algorithm's own cost
    if not args.no_in_process:
        in_process(args, result, model, rows, nb, sample, naive_emb, flops_item, peaks[1])
    runs = []
    for n_workers in [int(w) for w in args.workers.split(",")]:
        runs.append(map_reduce_run(args, run_dir, n_workers, sample, naive_emb, naive, flops_item, peaks))
        print(json.dumps(runs[-1]), file=sys.stderr)
    result["map_reduce"] = runs
    by = {r["workers"]: r for r in runs}
    result["summary"] = {
        "backend": args.backend,
        "items_per_s": {f"{w}_workers": r["items_per_s"] for w, r in by.items()},
        "speedup_vs_naive_batch_1024": {f"{w}_workers": r["speedup_vs_naive_batch_1024"] for w, r in by.items()},
        "speedup_vs_naive_batch_1024_cpu_time": {f"{w}_workers": r["speedup_vs_naive_batch_1024_cpu_time"]
                                                 for w, r in by.items()},
        "items_per_cpu_s": {f"{w}_workers": r["items_per_cpu_s"] for w, r in by.items()},
        "goal_10x_met": any(r["speedup_vs_naive_batch_1024"] >= 10 for r in runs),
        "scaling_2_over_1": round(by[2]["items_per_s"] / by[1]["items_per_s"], 2) if 1 in by and 2 in by else None,
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result, sort_keys=False)
    print(json.dumps(result["summary"], indent=2))
    tmp.cleanup()
    return 0


def in_process(args: argparse.Namespace, result: dict[str, Any], model: torch.nn.Module, rows: ItemFeatureTable,
               nb: Neighborhoods, sample: np.ndarray, naive_emb: torch.Tensor, flops_item: float,
               peak: float) -> None:
    torch.set_num_threads(1)
    t1, c1 = time.perf_counter(), time.process_time()
    inproc = layerwise_embeddings(model, rows, WalkLayerNeighbors(nb, n_neighbors=args.top_t), args.items,
                                  block_items=args.block_items)
    inproc_s, inproc_cpu = time.perf_counter() - t1, time.process_time() - c1
    result["layerwise_in_process"] = {"seconds": round(inproc_s, 2), "items_per_s": round(args.items / inproc_s),
                                      "items_per_cpu_s": round(args.items / inproc_cpu),
                                      "threads": 1, "fraction_of_peak": round(
                                          args.items * flops_item / inproc_s / peak, 4),
                                      "max_abs_diff_vs_naive_sample": float(
                                          (inproc[torch.from_numpy(sample)] - naive_emb).abs().max())}
    del inproc


def map_reduce_run(args: argparse.Namespace, run_dir: Path, n_workers: int, sample: np.ndarray,
                   naive_emb: torch.Tensor, naive: dict[str, Any], flops_item: float,
                   peaks: dict[int, float]) -> dict[str, Any]:
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        client.run(lambda: __import__("torch") and __import__("pipeline.infer"))  # imports are not inference
        cpu0, t1 = workers_cpu(client), time.perf_counter()
        out = run_infer(run_dir, InferConfig(block_items=args.block_items), client, backend=args.backend,
                        force=True, progress=False)
        wall, cpu = time.perf_counter() - t1, workers_cpu(client) - cpu0
        emb = torch.from_numpy(np.array(load_embeddings(run_dir)[sample]))
        rep = out.report
        return {
            "workers": n_workers, "threads_per_worker": 1, "device": rep["device"], "blocks": rep["blocks"],
            "stage_wall_seconds": round(wall, 2), "compute_seconds": rep["seconds"],
            "layer_seconds": rep["layer_seconds"], "fetched_rows_per_layer": rep["fetched_rows_per_layer"],
            "fetched_mb_per_layer": [round(b / 2**20, 1) for b in rep["fetched_bytes_per_layer"]],
            "items_per_s": round(args.items / wall),
            "workers_cpu_seconds": round(cpu, 1), "items_per_cpu_s": round(args.items / cpu),
            "speedup_vs_naive_batch_1024": round(args.items / wall / naive["batch_1024"]["items_per_s"], 1),
            "speedup_vs_naive_batch_1024_cpu_time": round(args.items / cpu / naive["batch_1024"]["items_per_cpu_s"], 1),
            "speedup_vs_naive_batch_1": round(args.items / wall / naive["batch_1"]["items_per_s"], 1),
            "fraction_of_matmul_peak": round(args.items * flops_item / wall / peaks[min(n_workers, 2)], 4)
            if args.backend == "cpu" else None,
            "max_abs_diff_vs_naive_sample": float((emb - naive_emb).abs().max()),
            "worker_rss_mb_after": [round(v / 2**20) for v in client.run(_rss).values()],
            "loadavg_after": os.getloadavg(),
        }

if __name__ == "__main__":
    raise SystemExit(main())
