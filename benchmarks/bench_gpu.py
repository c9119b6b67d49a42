"""The models on a CUDA device vs the CPU of the same machine, side by side in one run (the GPU check of README).

On the lent GPU machine (``scripts/device_check.sh``) and on any machine with CUDA: builds the power-law graph of
``bench_train_speed`` (default 200k items), its 2-step-walk neighbourhoods and consecutive-item pairs, then for
PinSage and GraphSAGE measures training pairs/s (producer threads + bounded queue; the batch is built on the CPU and
moved) on the CPU with all its cores and on the GPU, at batch 512 and at a larger GPU batch; and forward-only
embedding of all items (``embed_items``) items/s on both. Each against the matrix-multiply peak measured in the same
run on the same device (fp32; TF32 off unless ``--tf32``). Without CUDA it runs the CPU half only (a smoke run).
Run: ``PYTHONPATH=$PWD python benchmarks/bench_gpu.py [--items 200000] [--batches 30] [--out results/gpu.json]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_train_speed import generate, linear_flops, pairs_of, walk_neighborhoods
from gnn.batches import PairBatcher, TrainingPairs
from gnn.features import ItemFeatureTable
from gnn.models import ModelConfig, build_model
from gnn.sampler import CoInteractionNeighbors, GraphSageSampler, PinSageSampler, WalkNeighbors
from gnn.trainer import TrainConfig, Trainer, embed_items
from pipeline.rundir import write_json_atomic


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mm_peak(device: str, n: int = 4096, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


def train_rate(model_cfg: ModelConfig, batcher: PairBatcher, device: str, threads: int, producers: int) -> dict:
    model = build_model(model_cfg, seed=0).to(device)
    cfg = TrainConfig(mode="producer", num_threads=threads, producer_threads=producers, queue_size=8,
                      batch_size=batcher.batch_size, n_negatives=batcher.n_negatives, log_every=0, device=device)
    trainer = Trainer(model, batcher, config=cfg)
    trainer.epoch = 1
    trainer.train_epoch()  # warm-up (CUDA context, kernels, allocator)
    sync(device)
    report = trainer.train_epoch()
    sync(device)
    return {"pairs_per_s": report.pairs_per_s, "steps": report.steps, "seconds": report.seconds,
            "consumer_wait_s": report.consumer_wait_s, "mean_loss": report.mean_loss}


def embed_rate(model_cfg: ModelConfig, sampler: PinSageSampler | GraphSageSampler, n_items: int, device: str,
               batch_size: int) -> dict:
    model = build_model(model_cfg, seed=0).to(device)
    ids = np.arange(n_items)
    embed_items(model, sampler, ids[:batch_size], batch_size=batch_size)
    sync(device)
    start = time.perf_counter()
    out = embed_items(model, sampler, ids, batch_size=batch_size)
    sync(device)
    seconds = time.perf_counter() - start
    return {"items_per_s": n_items / seconds, "seconds": seconds, "batch_size": batch_size,
            "checksum": float(out.double().abs().sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--per-user", type=int, default=20)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--gpu-batch", type=int, default=4096)
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/gpu.json"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    nproc = os.cpu_count() or 1
    torch.set_num_threads(nproc)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, object] = {
        "command": " ".join([sys.executable, *sys.argv]), "nproc": nproc, "loadavg_before": os.getloadavg(),
        "platform": platform.platform(), "torch": torch.__version__, "tf32": args.tf32,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    t0 = time.perf_counter()
    store = generate(args.items, args.users, args.per_user, 0)
    nb = walk_neighborhoods(store, top=10, walks=40, seed=0)
    pairs = pairs_of(store)
    table = ItemFeatureTable.from_graph_store(store)
    report["graph"] = {"n_items": store.n_items, "n_users": store.n_users, "n_edges": store.n_edges,
                       "build_s": time.perf_counter() - t0}
    peaks = {d: mm_peak(d) for d in devices}
    report["mm_peak_flops"] = peaks
    results: dict[str, dict] = {}
    for kind in ("pinsage", "graphsage"):
        model_cfg = ModelConfig(kind=kind, n_categories=store.n_categories)
        sampler: PinSageSampler | GraphSageSampler
        if kind == "pinsage":
            sampler = PinSageSampler(neighbors=WalkNeighbors(nb, n_neighbors=model_cfg.n_neighbors), rows=table)
        else:
            sampler = GraphSageSampler(neighbors=CoInteractionNeighbors.from_graph_store(store), rows=table,
                                       fanouts=model_cfg.fanouts)
        out: dict[str, Any] = {}
        for device in devices:
            for batch in sorted({512, args.gpu_batch if device == "cuda" else 512}):
                sub = TrainingPairs.from_arrays(*(a[: args.batches * batch] for a in
                                                  (pairs.query, pairs.positive, pairs.weight)))
                batcher = PairBatcher(sub, sampler, n_items=store.n_items, batch_size=batch, n_negatives=256,
                                      hard_negatives=nb.hard_negatives, seed=0)
                flops = linear_flops(build_model(model_cfg, seed=0), [batcher(1, i) for i in range(2)])
                r = train_rate(model_cfg, batcher, device, threads=nproc if device == "cpu" else 1,
                               producers=min(8, max(nproc - 2, 1)))
                r["fraction_of_mm_peak"] = flops * r["steps"] / r["seconds"] / peaks[device]
                out[f"train_{device}_b{batch}"] = r
                print(f"{kind} train {device} batch {batch}: {r['pairs_per_s']:.0f} pairs/s, "
                      f"{r['fraction_of_mm_peak']:.3f} of mm peak", flush=True)
            e = embed_rate(model_cfg, sampler, store.n_items, device, 4096)
            out[f"embed_{device}"] = e
            print(f"{kind} embed {device}: {e['items_per_s']:.0f} items/s", flush=True)
        if "cuda" in devices:
            out["train_speedup_gpu_vs_cpu"] = max(v["pairs_per_s"] for k, v in out.items()
                                                  if k.startswith("train_cuda")) / out["train_cpu_b512"]["pairs_per_s"]
            out["embed_speedup_gpu_vs_cpu"] = out["embed_cuda"]["items_per_s"] / out["embed_cpu"]["items_per_s"]
        results[kind] = out
    report["results"] = results
    report["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
