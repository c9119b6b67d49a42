"""Distributed training on Dask workers: cache policy x capacity, METIS vs random shards, 1 vs 2 workers.

Generates Taobao-format data (``--rows``), runs ingest/split/graph/walks once into ``--run-dir`` (kept between
invocations), then runs the real ``train`` stage (pipeline/train.py) on one 2-worker LocalCluster per setting:

* ``--part cache [--negatives local|global]``: policies importance / lru / random at 5 / 10 / 20 % of each shard's
  remote vertices, and none;
  ``--steps`` steps each (METIS, 2 workers): hit rate, remote bytes (fill + misses) measured and per epoch
  (fill + misses per step x steps per epoch), step time and the epoch time it implies;
* ``--part partition``: METIS vs random (hash) shards, cache none and importance 10 %: remote bytes;
* ``--part scaling``: 1 vs 2 workers, ``--epochs`` full epochs each: pairs/s, then hit@10 and MRR of the
  embeddings (the evaluate stage's protocol A, test split).

Each part merges its section into ``results/dtrain.json`` with the command, machine and load average.
Run: ``PYTHONPATH=$PWD nice -n 5 python benchmarks/bench_dtrain.py --part cache``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed import Client, LocalCluster  # noqa: E402

from pipeline.train import TrainStageConfig, train  # noqa: E402


def prepare(run: Path, rows: int, client: Client) -> None:
    from pipeline.run import RunConfig, run_pipeline

    run_pipeline(run, RunConfig(rows=rows, seed=0, until="walks"), client, "cpu")


def one(run: Path, client: Client, **settings: Any) -> dict[str, Any]:
    settings.setdefault("embed", False)  # the cache / partition parts time the training loop only
    cfg = TrainStageConfig(progress_s=0.0, **settings)
    started = time.perf_counter()
    out = train(run, cfg, client, force=True)
    wall = time.perf_counter() - started
    rep = json.loads((out.path / "report.json").read_text())
    c = rep["cache_total"]
    e = rep["epochs"][-1]
    steps = sum(w["steps"] for w in rep["per_worker"]) / len(rep["per_worker"])  # per rank
    n_pairs = rep["per_worker"][0]["n_pairs"]
    steps_per_epoch = -(-n_pairs // cfg.batch_size)
    miss_bytes_per_step = c["bytes_fetched"] / max(steps, 1)  # all workers
    return {
        "settings": settings, "wall_s": round(wall, 1), "steps_per_rank": steps,
        "steps_per_epoch": steps_per_epoch, "hit_rate": round(c["hit_rate"], 4), "requests": c["requests"],
        "capacity_rows": c["capacity_rows"], "fill_bytes": c["fill_bytes"], "miss_bytes": c["bytes_fetched"],
        "bytes_saved": c["bytes_saved"], "evictions": c["evictions"],
        "remote_bytes_measured": c["fill_bytes"] + c["bytes_fetched"],
        "remote_bytes_per_epoch": round(c["fill_bytes"] + miss_bytes_per_step * steps_per_epoch),
        "step_s": round(e["seconds"] / max(steps, 1), 4),
        "epoch_s_implied": round(e["seconds"] / max(steps, 1) * steps_per_epoch, 1),
        "pairs_per_s": e["pairs_per_s"], "loss": e["mean_loss"],
        "presample_s": [w.get("presample_s") for w in rep["per_worker"]],
        "partition": rep["partition"], "cpus": [w.get("cpus") for w in rep["per_worker"]],
    }


def quality(run: Path) -> dict[str, float]:
    from pipeline.evaluate import EvalConfig, evaluate, read_report

    evaluate(run, EvalConfig(protocol_b=False, baselines=("popularity",)), force=True)
    rep = read_report(run)
    gnn = rep["protocol_a"]["test"]["item_to_item"]["gnn"]
    return {"hit@10": round(gnn["hit@10"], 5), "mrr": round(gnn["mrr"], 5)}


def part_cache(run: Path, client: Client, steps: int, negatives: str) -> dict[str, Any]:
    rows = [one(run, client, workers=2, cache="none", steps_per_epoch=steps, epochs=1, negatives=negatives)]
    for frac in (0.05, 0.1, 0.2):
        for policy in ("importance", "lru", "random"):
            rows.append(one(run, client, workers=2, cache=policy, cache_fraction=frac, steps_per_epoch=steps,
                            epochs=1, negatives=negatives))
            print(json.dumps({k: rows[-1][k] for k in ("settings", "hit_rate", "remote_bytes_per_epoch",
                                                        "epoch_s_implied")}), file=sys.stderr)
    rows.append(one(run, client, workers=2, cache="importance", importance="visits", cache_fraction=0.1,
                    steps_per_epoch=steps, epochs=1, negatives=negatives))
    return {"rows": rows}


def part_partition(run: Path, client: Client, steps: int) -> dict[str, Any]:
    rows = []
    for method in ("metis", "random"):
        for cache in ("none", "importance"):
            rows.append(one(run, client, workers=2, partition=method, cache=cache, cache_fraction=0.1,
                            steps_per_epoch=steps, epochs=1))
    return {"rows": rows}


def part_scaling(run: Path, client: Client, epochs: int, cpus_per_rank: int, batch: int,
                 same_global_batch: bool, timing_steps: int, seeds: list[int]) -> dict[str, Any]:
    """1 vs 2 workers, each rank pinned to ``cpus_per_rank`` cores (0: unpinned; the 1-worker run then spreads
    its producer threads over the whole machine). ``same_global_batch``: 2 ranks of ``batch // 2`` pairs, so
    that both runs take the same optimizer steps on batches of the same size. ``timing_steps`` > 0: time that
    many steps per rank only (no embeddings, no quality: a short run for a quiet machine); 0: ``epochs`` full
    epochs, then hit@10 and MRR (the batches and weights do not depend on timing, so quality does not either)."""
    if not timing_steps and len(seeds) > 1:  # quality over seeds (the timing of each run is not the point)
        per_seed = [part_scaling(run, client, epochs, cpus_per_rank, batch, same_global_batch, 0, [s])["rows"]
                    for s in seeds]
        runs = {w: [rows[i] for rows in per_seed] for i, w in enumerate((1, 2))}
        return {"seeds": seeds, "per_seed": runs, "mean_quality": {
            w: {m: round(sum(r["quality"][m] for r in rs) / len(rs), 5) for m in ("hit@10", "mrr")}
            for w, rs in runs.items()}}
    rows = []
    for workers in (1, 2):
        per_rank = batch // workers if same_global_batch else batch
        if timing_steps:
            r = one(run, client, workers=workers, epochs=1, steps_per_epoch=timing_steps,
                    cpus_per_rank=cpus_per_rank, batch_size=per_rank)
        else:
            r = one(run, client, workers=workers, epochs=epochs, embed=True, cpus_per_rank=cpus_per_rank,
                    batch_size=per_rank, seed=seeds[0])
            r["quality"] = quality(run)
        rows.append(r)
    rows[1]["speedup_pairs_per_s"] = round(rows[1]["pairs_per_s"] / rows[0]["pairs_per_s"], 3)
    return {"rows": rows}


def part_baseline(run: Path, client: Client, model: str, max_epochs: int) -> dict[str, Any]:
    """Quality against training time: GraphSAGE (uniform co-interaction neighbours, no cache) or PinSage++
    (walk neighbourhoods, importance cache 10 %), 2 workers, one run per epoch count (each from scratch)."""
    settings: dict[str, Any] = {"model": model, "cache": "none" if model == "graphsage" else "importance"}
    rows = []
    for epochs in range(1, max_epochs + 1):
        r = one(run, client, workers=2, epochs=epochs, embed=True, **settings)
        r["quality"] = quality(run)
        rows.append(r)
    return {"rows": rows}


# the niceness the script ran at (os.nice(0) reads it), so that the recorded command is the one that ran
NICE_NOTE = f" (under nice -n {os.nice(0)})" if os.nice(0) else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("cache", "partition", "scaling", "baseline"), required=True)
    parser.add_argument("--model", choices=("pinsage", "graphsage"), default="pinsage", help="baseline part")
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/bench_dtrain"))
    parser.add_argument("--steps", type=int, default=20, help="steps per setting (cache, partition)")
    parser.add_argument("--negatives", choices=("local", "global"), default="local",
                        help="shared negatives from the rank's shard or from all items (cache part)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per setting (scaling)")
    parser.add_argument("--cpus-per-rank", type=int, default=0, help="scaling: pin each rank to this many cores")
    parser.add_argument("--batch", type=int, default=512, help="scaling: pairs per step (per rank, or global)")
    parser.add_argument("--timing-steps", type=int, default=0,
                        help="scaling: time this many steps per rank only (no quality)")
    parser.add_argument("--seeds", default="0", help="scaling: comma-separated seeds (quality over several)")
    parser.add_argument("--same-global-batch", action="store_true",
                        help="scaling: 2 ranks of batch/2 pairs (same steps and batch as 1 rank)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "dtrain.json")
    parser.add_argument("--note", default="", help="conditions of the run, recorded with it")
    args = parser.parse_args()
    run = args.run_dir / f"rows-{args.rows}"
    load_before = os.getloadavg()
    started = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        prepare(run, args.rows, client)
        if args.part == "cache":
            section = part_cache(run, client, args.steps, args.negatives)
        elif args.part == "partition":
            section = part_partition(run, client, args.steps)
        elif args.part == "scaling":
            section = part_scaling(run, client, args.epochs, args.cpus_per_rank, args.batch,
                                   args.same_global_batch, args.timing_steps,
                                   [int(x) for x in args.seeds.split(",")])
        else:
            section = part_baseline(run, client, args.model, args.epochs)
    section.update({"command": "PYTHONPATH=$PWD python " + " ".join(sys.argv) + NICE_NOTE, "data_rows": args.rows,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "seconds": round(time.perf_counter() - started, 1), "note": args.note})
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    name = {"cache": f"cache_{args.negatives}_negatives", "baseline": f"baseline_{args.model}",
            "scaling": "scaling" + (f"_pinned{args.cpus_per_rank}" if args.cpus_per_rank else "")
            + ("_same_global_batch" if args.same_global_batch else "")
            + (f"_timing{args.timing_steps}" if args.timing_steps else "")
            + (f"_quality_{args.epochs}epochs_{len(args.seeds.split(','))}seeds" if "," in args.seeds else "")
            }.get(args.part, args.part)
    out.update({"machine": {"nproc": os.cpu_count(), "platform": platform.platform()}, name: section})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(section, indent=1, default=str)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
