"""Training throughput on one worker: synchronous (sample, then train) vs producer threads + bounded queue.

Generates a power-law user-item graph (default 200k items), stand-in PinSage neighbourhoods (top-T items by visit
count of 2-step walks item -> user -> item, 40 per item; the walks engineer's real ones replace them after
integration), consecutive-item training pairs, then trains the default PinSage and GraphSAGE models for
``--batches`` batches per setting and reports pairs/s (and, for PinSage, again with a row source that waits
``--latency-ms`` per batch, standing in for rows fetched from remote owners), the share of a synchronous step
spent sampling, and the fraction of the CPU's matrix-multiply peak (a large ``torch.mm`` measured in the same
run) that a training step reaches (FLOPs of every ``nn.Linear`` in forward and backward: 3 x 2·rows·in·out;
gathers and aggregations are not counted).
Run: ``PYTHONPATH=$PWD python benchmarks/bench_train_speed.py [--items 200000] [--batches 40]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gnn.batches import PairBatcher, TrainingPairs
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, csr_from_edges
from gnn.models import ModelConfig, build_model
from gnn.sampler import CoInteractionNeighbors, GraphSageSampler, PinSageSampler, WalkNeighbors
from gnn.trainer import TrainConfig, Trainer


class DelayedRows:
    """Row source that waits ``delay_s`` per call before answering (no CPU used, GIL released): stands in for a
    batch whose rows come from remote owners, the case the producer threads exist for."""

    def __init__(self, rows: ItemFeatureTable, delay_s: float) -> None:
        self.rows, self.delay_s = rows, delay_s

    def __call__(self, item_ids: np.ndarray) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.rows(item_ids)


class Neighborhoods:
    """Stand-in with the attributes of gnn.walks.Neighborhoods."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, n_users: int,
                 hard: np.ndarray) -> None:
        self.indptr, self.indices, self.weights = indptr, indices, weights
        self.item_importance = np.bincount(indices, weights=weights, minlength=indptr.shape[0] - 1).astype(np.float32)
        self.user_importance = np.zeros(n_users, np.float32)
        self.hard_negatives = hard


def generate(n_items: int, n_users: int, per_user: int, seed: int) -> GraphStore:
    rng = np.random.default_rng(seed)
    n_cat = max(n_items // 200, 1)
    users = np.repeat(np.arange(n_users), per_user)
    # power-law popularity, with users mostly inside a few categories (so that neighbourhoods mean something)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items_by_cat = np.argsort(rng.integers(0, n_cat, n_items), kind="stable")
    home = rng.integers(0, n_items, n_users)
    near = (np.searchsorted(items_by_cat, items_by_cat[home[users]]) + rng.integers(-100, 100, users.shape[0]))
    items = np.where(rng.random(users.shape[0]) < 0.5, items_by_cat[np.clip(near, 0, n_items - 1)],
                     rng.choice(n_items, users.shape[0], p=pop / pop.sum()))
    times = np.tile(np.arange(per_user), n_users)
    beh = rng.choice(4, users.shape[0], p=[0.9, 0.03, 0.05, 0.02])
    counts = np.zeros((n_items, 4), np.int64)
    np.add.at(counts, (items, beh), 1)
    w = np.ones(users.shape[0], np.float32)
    cat = np.empty(n_items, np.int64)
    cat[items_by_cat] = np.arange(n_items) * n_cat // n_items
    return GraphStore(n_users=n_users, n_items=n_items, n_categories=n_cat,
                      user_items=csr_from_edges(users, items, w, times, n_users),
                      item_users=csr_from_edges(items, users, w, times, n_items),
                      item_category=cat, item_counts=counts)


def walk_neighborhoods(store: GraphStore, top: int, walks: int, seed: int) -> Neighborhoods:
    draws, _ = CoInteractionNeighbors.from_graph_store(store)(np.arange(store.n_items), walks,
                                                              np.random.default_rng(seed))
    src = np.repeat(np.arange(store.n_items), walks)
    keep = (draws.ravel() >= 0) & (draws.ravel() != src)
    key, count = np.unique(src[keep] * store.n_items + draws.ravel()[keep], return_counts=True)
    item, nbr = key // store.n_items, key % store.n_items
    order = np.lexsort((nbr, -count, item))
    item, nbr, count = item[order], nbr[order], count[order]
    start = np.searchsorted(item, item, side="left")
    rank = np.arange(item.shape[0]) - start
    sel = rank < top
    indptr = np.zeros(store.n_items + 1, np.int64)
    np.cumsum(np.bincount(item[sel], minlength=store.n_items), out=indptr[1:])
    hard = np.random.default_rng(seed + 1).integers(0, store.n_items, (store.n_items, 10))
    return Neighborhoods(indptr, nbr[sel].astype(np.int64), count[sel].astype(np.float32), store.n_users, hard)


def pairs_of(store: GraphStore) -> TrainingPairs:
    ui = store.user_items
    src = np.arange(ui.n_edges - 1)
    same_user = np.repeat(np.arange(store.n_users), ui.degree())
    keep = same_user[:-1] == same_user[1:]
    return TrainingPairs.from_arrays(ui.indices[src[keep]], ui.indices[src[keep] + 1])


def linear_flops(model: nn.Module, batches: list) -> float:
    """Forward + backward FLOPs of every nn.Linear per batch (3 x 2·rows·in·out), averaged."""
    total = [0.0]

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        lin: nn.Linear = mod  # type: ignore[assignment]
        total[0] += 3 * 2.0 * inputs[0].numel() / lin.in_features * lin.in_features * lin.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for b in batches:
                model(b.subgraph)
    finally:
        for h in handles:
            h.remove()
    return total[0] / len(batches)


def mm_peak(threads: int, n: int = 2048, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


def run_setting(model_cfg: ModelConfig, batcher: PairBatcher, *, mode: str, torch_threads: int,
                producer_threads: int, seed: int) -> dict[str, float]:
    model = build_model(model_cfg, seed=seed)
    cfg = TrainConfig(mode=mode, num_threads=torch_threads, producer_threads=producer_threads,  # type: ignore[arg-type]
                      queue_size=4, batch_size=batcher.batch_size, n_negatives=batcher.n_negatives, log_every=0)
    trainer = Trainer(model, batcher, config=cfg)
    trainer.epoch = 1  # epoch 0 of a fresh run is a warm-up: 1 hard negative per query from epoch 1 on
    report = trainer.train_epoch()
    return {"pairs_per_s": report.pairs_per_s, "seconds": report.seconds, "steps": report.steps,
            "consumer_wait_s": report.consumer_wait_s, "build_s": report.build_s, "mean_loss": report.mean_loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--per-user", type=int, default=20)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--kinds", default="pinsage,graphsage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=60.0,
                        help="simulated remote-row wait per batch for the extra PinSage 'remote rows' comparison")
    parser.add_argument("--out", type=Path, default=Path("results/train_speed.json"))
    args = parser.parse_args()
    nproc = os.cpu_count() or 1
    report: dict[str, object] = {"command": " ".join([sys.executable, *sys.argv]), "nproc": nproc,
                                 "loadavg_before": os.getloadavg(), "platform": platform.platform(),
                                 "torch": torch.__version__}
    t0 = time.perf_counter()
    store = generate(args.items, args.users, args.per_user, args.seed)
    nb = walk_neighborhoods(store, top=10, walks=40, seed=args.seed)
    pairs = pairs_of(store)
    table = ItemFeatureTable.from_graph_store(store)
    report["graph"] = {"n_items": store.n_items, "n_users": store.n_users, "n_edges": store.n_edges,
                       "n_pairs": len(pairs), "build_s": time.perf_counter() - t0}
    report["peak_mm_flops"] = {str(t): mm_peak(t) for t in sorted({1, min(2, nproc)})}
    sub = TrainingPairs.from_arrays(*(a[: args.batches * args.batch_size] for a in
                                      (pairs.query, pairs.positive, pairs.weight)))
    results: dict[str, object] = {}
    for kind in args.kinds.split(","):
        model_cfg = ModelConfig(kind=kind, n_categories=store.n_categories)
        if kind == "pinsage":
            sampler: PinSageSampler | GraphSageSampler = PinSageSampler(
                neighbors=WalkNeighbors(nb, n_neighbors=model_cfg.n_neighbors), rows=table)
        else:
            sampler = GraphSageSampler(neighbors=CoInteractionNeighbors.from_graph_store(store), rows=table,
                                       fanouts=model_cfg.fanouts)
        batcher = PairBatcher(sub, sampler, n_items=store.n_items, batch_size=args.batch_size, n_negatives=256,
                              hard_negatives=nb.hard_negatives, seed=args.seed)
        probe = [batcher(1, i) for i in range(3)]
        flops = linear_flops(build_model(model_cfg, seed=0), probe)
        run_setting(model_cfg, PairBatcher(TrainingPairs.from_arrays(*(a[:3 * args.batch_size] for a in (
            sub.query, sub.positive, sub.weight))), sampler, n_items=store.n_items, batch_size=args.batch_size),
            mode="sync", torch_threads=1, producer_threads=1, seed=0)  # warm-up
        settings = {
            "sync_torch1": dict(mode="sync", torch_threads=1, producer_threads=1),
            "sync_torch2": dict(mode="sync", torch_threads=min(2, nproc), producer_threads=1),
            "producer1_torch1": dict(mode="producer", torch_threads=1, producer_threads=1),
            "producer2_torch1": dict(mode="producer", torch_threads=1, producer_threads=2),
        }
        out: dict[str, object] = {"model": model_cfg.to_dict(), "flops_per_step": flops,
                                  "nodes_per_hop": [int(n.shape[0]) for n in probe[0].subgraph.node_ids]}
        for name, s in settings.items():
            r = run_setting(model_cfg, batcher, seed=args.seed, **s)  # type: ignore[arg-type]
            step_s = r["seconds"] / r["steps"]
            threads = int(s["torch_threads"])  # type: ignore[call-overload]
            r["flops_per_s"] = flops / step_s
            r["fraction_of_mm_peak"] = r["flops_per_s"] / report["peak_mm_flops"][str(threads)]  # type: ignore[index]
            if s["mode"] == "sync":
                r["sampling_fraction"] = r["build_s"] / r["seconds"]
            out[name] = r
            print(f"{kind} {name}: {r['pairs_per_s']:.0f} pairs/s, {step_s * 1e3:.0f} ms/step, "
                  f"{r['fraction_of_mm_peak']:.3f} of mm peak"
                  + (f", sampling {r['sampling_fraction']:.2f} of the step" if "sampling_fraction" in r else ""),
                  flush=True)
        sync = out["sync_torch1"]["pairs_per_s"]  # type: ignore[index]
        best_producer = max(out["producer1_torch1"]["pairs_per_s"], out["producer2_torch1"]["pairs_per_s"])  # type: ignore[index]
        out["speedup_producer_vs_sync_torch1"] = best_producer / sync
        out["speedup_producer_vs_best_sync"] = best_producer / max(sync, out["sync_torch2"]["pairs_per_s"])  # type: ignore[index]
        results[kind] = out
        if kind == "pinsage" and args.latency_ms > 0:
            remote = PairBatcher(sub, PinSageSampler(neighbors=WalkNeighbors(nb, n_neighbors=model_cfg.n_neighbors),
                                                     rows=DelayedRows(table, args.latency_ms / 1e3)),
                                 n_items=store.n_items, batch_size=args.batch_size, n_negatives=256,
                                 hard_negatives=nb.hard_negatives, seed=args.seed)
            lat: dict[str, object] = {"latency_ms_per_batch": args.latency_ms}
            for name, s in list(settings.items())[:1] + list(settings.items())[2:]:
                r = run_setting(model_cfg, remote, seed=args.seed, **s)  # type: ignore[arg-type]
                if s["mode"] == "sync":
                    r["sampling_fraction"] = r["build_s"] / r["seconds"]
                lat[name] = r
                print(f"pinsage+remote-rows {name}: {r['pairs_per_s']:.0f} pairs/s"
                      + (f", sampling {r['sampling_fraction']:.2f} of the step" if "sampling_fraction" in r else ""),
                      flush=True)
            speeds = {k: v["pairs_per_s"] for k, v in lat.items() if isinstance(v, dict)}
            lat["speedup_producer_vs_sync"] = max(speeds["producer1_torch1"], speeds["producer2_torch1"]) / speeds[
                "sync_torch1"]
            results["pinsage_remote_rows"] = lat
    report["results"] = results
    report["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
