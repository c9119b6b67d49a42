"""Distributed training on Dask workers: cache policy x capacity, METIS vs random shards, 1 vs 2 workers.

Generates Taobao-format data (``--rows``), runs ingest/split/graph/walks once into ``--run-dir`` (kept between
invocations), then runs the real ``train`` stage (pipeline/train.py) on one 2-worker LocalCluster per setting:

* ``--part cache [--negatives local|global]``: policies importance / lru / random at 5 / 10 / 20 % of each shard's
  remote vertices, and none;
  ``--steps`` steps each (METIS, 2 workers): hit rate, remote bytes (fill + misses) measured and per epoch
  (fill + misses per step x steps per epoch), step time and the epoch time it implies;
* ``--part partition``: METIS vs random (hash) shards, cache none and importance 10 %: remote bytes;
* ``--part scaling``: 1 vs 2 workers, ``--epochs`` full epochs each: pairs/s, then hit@10 and MRR of the
  embeddings (the evaluate stage's protocol A, test split) after every epoch of the one run (``epoch_embeddings``);
* ``--part limit``: what this machine allows, timed side by side in turn (``--timing-steps`` steps, ``--timing-repeats``
  rounds, medians): one worker with one compute thread (the scaling part's 1-worker run), one worker with a compute
  thread per core (``cpus_per_rank=2``: the strongest 1-worker setting), one worker pinned to one core (what a rank
  of a 2-worker run has), and 2 workers with the scaling settings. Twice the single-core rate is the most 2 workers
  can reach here; the section reports each speed-up against both 1-worker settings and the 2-worker efficiency
  against that ceiling. ``--slot-cores C`` (a host with 2C cores or more): a slot is C pinned cores; one worker on
  one slot, one worker on both slots' cores (with both workers' producer threads), and 2 workers on a slot each;
* ``--part baseline``: GraphSAGE (uniform neighbours, cache none) and PinSage++ (walk neighbourhoods, importance
  cache 10 %), 2 workers, one run of ``--epochs`` epochs per model and seed: hit@10, MRR, optimizer steps, pairs and
  training seconds after every epoch, then the steps and time each needs to reach a target hit@10 fixed
  beforehand (``--target-fraction`` of GraphSAGE's mean hit@10 after the last epoch); ``--timing-steps N`` times
  N steps of each model only (for a quiet machine), and the time to target is then recomputed with those step
  times (steps to target are deterministic, so only the seconds per step need the quiet machine).

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
from collections.abc import Callable
from pathlib import Path
from statistics import median_low
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed import Client, LocalCluster  # noqa: E402

from pipeline.rundir import write_json_atomic  # noqa: E402
from pipeline.train import LR_SCALING, TrainStageConfig, train  # noqa: E402


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
        "wait_s": e.get("per_rank_wait_s"), "build_s": e.get("per_rank_build_s"), "epoch_s": e["seconds"],
        "phase_s": e.get("per_rank_phase_s"),
        "presample_s": [w.get("presample_s") for w in rep["per_worker"]],
        "partition": rep["partition"], "cpus": [w.get("cpus") for w in rep["per_worker"]],
    }


def quality(run: Path, embeddings: Path | None = None) -> dict[str, float]:
    """hit@10 and MRR of ``embeddings`` (default ``<run>/train/embeddings.npy``; its query side beside it)."""
    from pipeline.evaluate import EvalConfig, evaluate, read_report

    evaluate(run, EvalConfig(protocol_b=False, baselines=("popularity",),
                             embeddings_path=None if embeddings is None else str(embeddings)), force=True)
    rep = read_report(run)
    gnn = rep["protocol_a"]["test"]["item_to_item"]["gnn"]
    return {"hit@10": round(gnn["hit@10"], 5), "mrr": round(gnn["mrr"], 5)}


def curve(run: Path, client: Client, **settings: Any) -> dict[str, Any]:
    """One run of ``settings["epochs"]`` epochs writing the embeddings after each (``epoch_embeddings``), each
    evaluated: per epoch hit@10, MRR, optimizer steps per rank (that epoch and in total), pairs (all ranks) and
    the epoch's training seconds (slowest rank; sampling wait included, snapshot and evaluation excluded)."""
    from pipeline.train import epoch_embeddings_path

    r = one(run, client, embed=True, epoch_embeddings=True, **settings)
    train_dir = run / "train"
    rep = json.loads((train_dir / "report.json").read_text())
    per_epoch, steps, train_s = [], 0, 0.0
    for e in rep["epochs"]:
        n = e["epoch"] + 1
        steps += e["steps"]
        train_s += e["seconds"]
        per_epoch.append({"epoch": n, **quality(run, epoch_embeddings_path(train_dir, n)),
                          "epoch_steps": e["steps"], "steps": steps, "pairs": e["pairs"],
                          "train_s": e["seconds"], "cum_train_s": round(train_s, 3),
                          "mean_loss": round(e["mean_loss"], 5)})
    r["quality"] = {k: per_epoch[-1][k] for k in ("hit@10", "mrr")}
    r["per_epoch"] = per_epoch
    r["step_s_loaded"] = round(train_s / max(steps, 1), 4)  # under whatever load the machine had
    r["cache_fill_s"] = [w["cache_fill_s"] for w in rep["per_worker"]]
    print(json.dumps({"curve": settings, "per_epoch": per_epoch}), file=sys.stderr, flush=True)  # kept if killed
    return r


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
                 same_global_batch: bool, timing_steps: int, seeds: list[int],
                 save: Callable[[dict[str, Any]], None] | None = None, *, workers_list: tuple[int, ...] = (1, 2),
                 settings: dict[str, Any] | None = None, reference: dict[str, Any] | None = None,
                 timing_repeats: int = 1) -> dict[str, Any]:
    """1 vs 2 workers, each rank pinned to ``cpus_per_rank`` cores (0: unpinned; the 1-worker run then spreads
    its producer threads over the whole machine). ``same_global_batch``: 2 ranks of ``batch // 2`` pairs, so
    that both runs take the same optimizer steps on batches of the same size. ``timing_steps`` > 0: time that
    many steps per rank only (no embeddings, no quality: a short run for a quiet machine); 0: ``epochs`` full
    epochs, then hit@10 and MRR (the batches and weights do not depend on timing, so quality does not either).
    ``save``: called with the section so far after each seed (several seeds), so that a cut-short run keeps them.
    ``workers_list``: the worker counts to run; ``settings``: more stage settings for every run (lr_scaling,
    lr_warmup_steps, negatives, partition: none of them changes a 1-worker run); ``reference``: a stored scaling section
    whose 1-worker runs stand in for the ones ``workers_list`` leaves out (quality is deterministic per seed).
    ``timing_repeats``: with ``timing_steps``, time the worker counts this many times in turn and report each
    repeat's speed-up with the median, min and max (the last repeat's rows in full)."""
    extra = dict(settings or {})
    if timing_steps:
        repeats: list[dict[str, Any]] = []
        for _ in range(timing_repeats):  # alternate the worker counts, so that drift in the machine hits both
            rows = [one(run, client, workers=w, epochs=1, steps_per_epoch=timing_steps, cpus_per_rank=cpus_per_rank,
                        batch_size=batch // w if same_global_batch else batch, **extra) for w in workers_list]
            if len(rows) == 2:
                rows[1]["speedup_pairs_per_s"] = round(rows[1]["pairs_per_s"] / rows[0]["pairs_per_s"], 3)
            repeats.append({"pairs_per_s": [r["pairs_per_s"] for r in rows], "step_s": [r["step_s"] for r in rows],
                            "speedup_pairs_per_s": rows[-1].get("speedup_pairs_per_s")})
        section: dict[str, Any] = {"rows": rows}  # the last repeat in full
        if timing_repeats > 1:
            speedups = sorted(r["speedup_pairs_per_s"] for r in repeats if r["speedup_pairs_per_s"] is not None)
            section.update({"repeats": repeats, "speedup_median": median_low(speedups) if speedups else None,
                            "speedup_min": speedups[0] if speedups else None,
                            "speedup_max": speedups[-1] if speedups else None})
        return section
    if len(seeds) == 1 and tuple(workers_list) == (1, 2):  # one seed of both: the plain rows, as before
        rows = [scaling_curve(run, client, w, epochs, cpus_per_rank, batch, same_global_batch, seeds[0], extra)
                for w in workers_list]
        rows[1]["speedup_pairs_per_s"] = round(rows[1]["pairs_per_s"] / rows[0]["pairs_per_s"], 3)
        return {"rows": rows}
    stored = {} if 1 in workers_list else {seed: reference_run(reference, seed, epochs) for seed in seeds}
    per_seed: list[dict[int, dict[str, Any]]] = []  # quality over seeds (the timing of each run is not the point)
    for seed in seeds:
        runs = {w: scaling_curve(run, client, w, epochs, cpus_per_rank, batch, same_global_batch, seed, extra)
                for w in workers_list}
        per_seed.append({1: stored[seed], **runs} if stored else runs)
        section = scaling_summary(seeds[:len(per_seed)], [[r[1], r[2]] for r in per_seed])
        if save is not None and len(per_seed) < len(seeds):
            save({**section, "partial": True})
    return section


def scaling_curve(run: Path, client: Client, workers: int, epochs: int, cpus_per_rank: int, batch: int,
                  same_global_batch: bool, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """:func:`curve` of one row of the scaling part (per-rank batch: ``batch``, or ``batch // workers``)."""
    return curve(run, client, workers=workers, epochs=epochs, cpus_per_rank=cpus_per_rank,
                 batch_size=batch // workers if same_global_batch else batch, seed=seed, **settings)


LIMIT_RUNS = {"one_worker_1_thread": {"workers": 1},
              "one_worker_2_threads": {"workers": 1, "cpus_per_rank": 2},
              "one_worker_1_core": {"workers": 1, "cpus_per_rank": 1}}


def slot_runs(cores: int) -> dict[str, dict[str, Any]]:
    """The 1-worker settings of ``--part limit --slot-cores C`` (a host with cores to spare): one worker pinned to
    one slot of C cores, and one worker pinned to the 2C cores that the two workers' slots hold together, with as
    many producer threads as the two workers have between them (the strongest 1-worker use of that hardware)."""
    producers = TrainStageConfig.producer_threads
    return {f"one_worker_{cores}_cores": {"workers": 1, "cpus_per_rank": cores},
            f"one_worker_{2 * cores}_cores": {"workers": 1, "cpus_per_rank": 2 * cores,
                                               "producer_threads": 2 * producers}}


def part_limit(run: Path, client: Client, steps: int, repeats: int, batch: int,
               settings: dict[str, Any], slot_cores: int = 0, warmup_steps: int = 0) -> dict[str, Any]:
    """The ``--part limit`` section: each 1-worker setting and the 2-worker run (``settings``) timed for ``steps``
    steps, in turn, ``repeats`` times; medians of pairs/s, the speed-ups of 2 workers over each 1-worker setting,
    and 2 workers' share of the ceiling, twice the rate of one worker on one slot's cores.

    ``slot_cores`` 0: the settings of :data:`LIMIT_RUNS` (a 2-core host: a slot is one core, the 2 workers are not
    pinned); C > 0: :func:`slot_runs` and 2 workers pinned to C cores each (a host with at least 2C cores).
    ``warmup_steps`` > 0: first one untimed 2-worker run of that many steps (both worker processes then have
    their compiled kernels and thread pools; the first run of a fresh cluster is otherwise the slowest)."""
    one_worker = slot_runs(slot_cores) if slot_cores else LIMIT_RUNS
    two = {"workers": 2, **({"cpus_per_rank": slot_cores} if slot_cores else {}), **settings}
    slot = next(iter(one_worker)) if slot_cores else "one_worker_1_core"
    names = [*one_worker, "two_workers"]
    rates: dict[str, list[float]] = {n: [] for n in names}
    warmup = None
    if warmup_steps > 0:
        warmup = one(run, client, epochs=1, steps_per_epoch=warmup_steps, batch_size=batch, **two)["pairs_per_s"]
        print(json.dumps({"limit": "warmup", "pairs_per_s": warmup}), file=sys.stderr, flush=True)
    for _ in range(repeats):
        for name in names:
            kw = one_worker.get(name, two)
            r = one(run, client, epochs=1, steps_per_epoch=steps, batch_size=batch, **kw)
            rates[name].append(r["pairs_per_s"])
            print(json.dumps({"limit": name, **{k: r[k] for k in ("pairs_per_s", "epoch_s", "wait_s", "phase_s")}}),
                  file=sys.stderr, flush=True)
    med = {n: median_low(v) for n, v in rates.items()}
    ceiling = 2 * med[slot]
    return {
        "settings": {n: one_worker.get(n, two) for n in names}, "pairs_per_s": rates, "slot_cores": slot_cores or 1,
        "warmup_steps": warmup_steps, "warmup_pairs_per_s": warmup,
        "median_pairs_per_s": med, "ceiling_two_slots": ceiling,
        "speedup_two_workers_vs": {n: round(med["two_workers"] / med[n], 3) for n in one_worker},
        "ceiling_speedup_vs": {n: round(ceiling / med[n], 3) for n in one_worker},
        "two_workers_share_of_ceiling": round(med["two_workers"] / ceiling, 3),
    }


def reference_run(reference: dict[str, Any] | None, seed: int, epochs: int) -> dict[str, Any]:
    """The 1-worker run of ``seed`` in a stored scaling section, cut to its first ``epochs`` epochs."""
    runs = [] if reference is None else [r for r in reference["per_seed"]["1"] if r["settings"]["seed"] == seed]
    if not runs or len(runs[0]["per_epoch"]) < epochs:
        raise SystemExit(f"--reference: no stored 1-worker run of seed {seed} with {epochs} epochs; run "
                         f"--workers-list 1,2 or pick a --reference section that has one")
    r = runs[0]
    return {**r, "per_epoch": r["per_epoch"][:epochs], "reference": True}


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per epoch, the mean over ``runs`` (seeds) of hit@10 and MRR, with the (equal) steps per rank."""
    out = []
    for rows in zip(*(r["per_epoch"] for r in runs), strict=True):
        out.append({"epoch": rows[0]["epoch"], "steps": rows[0]["steps"],
                    **{m: round(sum(x[m] for x in rows) / len(rows), 5) for m in ("hit@10", "mrr")}})
    return out


BASELINE_MODELS = {"graphsage": {"model": "graphsage", "cache": "none"},
                   "pinsage": {"model": "pinsage", "cache": "importance"}}
TARGET_FRACTIONS = (0.9, 0.95, 1.0)  # of GraphSAGE's mean final hit@10; the headline one is --target-fraction


def steps_to(curve_rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Optimizer steps per rank until hit@10 first reaches ``target``: at the end of that epoch (what was
    measured), and linearly interpolated from the epoch before (None before epoch 1: nothing measured there)."""
    prev = None
    for row in curve_rows:
        if row["hit@10"] >= target:
            interp = None
            if prev is not None:
                frac = (target - prev["hit@10"]) / (row["hit@10"] - prev["hit@10"])
                interp = round(prev["steps"] + frac * (row["steps"] - prev["steps"]), 1)
            return {"epoch": row["epoch"], "steps": row["steps"], "steps_interpolated": interp}
        prev = row
    return {"epoch": None, "steps": None, "steps_interpolated": None}  # not reached within the run


def time_to_target(section: dict[str, Any], step_s: dict[str, float], source: str) -> dict[str, Any]:
    """Steps and seconds (steps x ``step_s[model]``) to each target hit@10, per seed and as means, and the
    PinSage++ speed-up over GraphSAGE (ratio of the mean times); a seed that never reaches it counts as None."""
    runs = section["models"]
    final = mean_curve(runs["graphsage"])[-1]["hit@10"]
    out: dict[str, Any] = {"step_s": step_s, "step_s_source": source,
                           "graphsage_final_mean_hit@10": final, "targets": {}}
    for frac in sorted({*TARGET_FRACTIONS, section["target_fraction"]}):
        target = round(frac * final, 5)
        per_model: dict[str, Any] = {}
        for model, rs in runs.items():
            seeds = [steps_to(r["per_epoch"], target) for r in rs]
            reached = [x for x in seeds if x["steps"] is not None]
            row: dict[str, Any] = {"per_seed": [{**x, "seconds": None if x["steps"] is None else
                                                 round(x["steps"] * step_s[model], 2)} for x in seeds],
                                   "seeds_reached": len(reached),
                                   "mean_curve": steps_to(mean_curve(rs), target)}
            if len(reached) == len(seeds):
                row["mean_steps"] = round(sum(x["steps"] for x in seeds) / len(seeds), 1)
                row["mean_seconds"] = round(row["mean_steps"] * step_s[model], 2)
            per_model[model] = row
        speedup = None
        if all("mean_seconds" in per_model[m] for m in ("graphsage", "pinsage")):
            speedup = round(per_model["graphsage"]["mean_seconds"] / per_model["pinsage"]["mean_seconds"], 3)
        out["targets"][f"{frac:g}"] = {"hit@10": target, **per_model, "speedup_pinsage_over_graphsage": speedup}
    return out


def scaling_summary(seeds: list[int], per_seed: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """1 vs 2 workers over ``seeds``: the runs, the mean hit@10 / MRR per epoch and their ratio 2 to 1."""
    runs = {w: [rows[i] for rows in per_seed] for i, w in enumerate((1, 2))}
    means = {w: mean_curve(rs) for w, rs in runs.items()}
    return {"seeds": seeds, "per_seed": runs, "mean_quality": {w: m[-1] for w, m in means.items()},
            "mean_per_epoch": means,
            "ratio_2_to_1_per_epoch": ratios(means[1], means[2]),
            "ratio_2_to_1_per_seed": {s: ratios(r1["per_epoch"], r2["per_epoch"])
                                      for s, r1, r2 in zip(seeds, runs[1], runs[2], strict=True)}}


def ratios(one_worker: list[dict[str, Any]], two_workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per epoch, 2 workers' hit@10 and MRR over 1 worker's."""
    return [{"epoch": m1["epoch"], "hit@10": round(m2["hit@10"] / m1["hit@10"], 4),
             "mrr": round(m2["mrr"] / m1["mrr"], 4)} for m1, m2 in zip(one_worker, two_workers, strict=True)]


def part_baseline(run: Path, client: Client, models: list[str], epochs: int, seeds: list[int],
                  target_fraction: float) -> dict[str, Any]:
    """Quality against training steps and time: GraphSAGE (uniform co-interaction neighbours, no cache) and
    PinSage++ (walk neighbourhoods, importance cache 10 %), 2 workers, one run of ``epochs`` epochs per model and
    seed with the quality after every epoch; the time to the target hit@10 when both models ran."""
    runs = {m: [curve(run, client, workers=2, epochs=epochs, seed=seed, **BASELINE_MODELS[m]) for seed in seeds]
            for m in models}
    section: dict[str, Any] = {"seeds": seeds, "epochs": epochs, "target_fraction": target_fraction,
                               "target_rule": f"hit@10 >= {target_fraction:g} x GraphSAGE's mean hit@10 after "
                                              f"epoch {epochs} (fixed before the runs)",
                               "models": runs, "mean_per_epoch": {m: mean_curve(rs) for m, rs in runs.items()}}
    if set(runs) == set(BASELINE_MODELS):
        loaded = {m: round(sum(r["step_s_loaded"] for r in rs) / len(rs), 4) for m, rs in runs.items()}
        section["time_to_target"] = time_to_target(section, loaded, "these runs' own epochs (under load)")
    return section


def part_baseline_timing(run: Path, client: Client, steps: int) -> dict[str, Any]:
    """``steps`` steps per rank of each model with the baseline's settings (2 workers, no embeddings): the
    seconds per step to multiply the deterministic steps to target by, on a quiet machine."""
    rows = {m: one(run, client, workers=2, epochs=1, steps_per_epoch=steps, **BASELINE_MODELS[m])
            for m in BASELINE_MODELS}
    return {"rows": rows, "step_s": {m: r["step_s"] for m, r in rows.items()}}


# the niceness the script ran at (os.nice(0) reads it), so that the recorded command is the one that ran
NICE_NOTE = f" (under nice -n {os.nice(0)})" if os.nice(0) else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("cache", "partition", "scaling", "limit", "baseline"), required=True)
    parser.add_argument("--model", choices=("pinsage", "graphsage", "both"), default="both",
                        help="baseline part: which models")
    parser.add_argument("--target-fraction", type=float, default=0.95,
                        help="baseline: the target hit@10 as this fraction of GraphSAGE's mean after the last epoch")
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/bench_dtrain"))
    parser.add_argument("--steps", type=int, default=20, help="steps per setting (cache, partition)")
    parser.add_argument("--negatives", choices=("local", "global"), default="local",
                        help="shared negatives from the rank's shard or from all items (cache, scaling parts)")
    parser.add_argument("--lr-scaling", choices=LR_SCALING, default="none",
                        help="scaling: the stage's lr_scaling (lr x workers^0.5 or x workers; 1 worker: lr)")
    parser.add_argument("--lr-warmup-steps", type=int, default=0,
                        help="scaling: the stage's lr_warmup_steps (ramp from lr to the scaled lr)")
    parser.add_argument("--partition", choices=("metis", "random"), default="metis",
                        help="scaling: the shards of the 2-worker runs (random: hash, unbiased batches per rank)")
    parser.add_argument("--cache-fraction", type=float, default=TrainStageConfig.cache_fraction,
                        help="scaling: the importance cache's capacity as a share of the remote vertices (1.0: "
                             "every remote row cached; the rows do not change, only where they come from)")
    parser.add_argument("--gather-candidates", action="store_true",
                        help="scaling: the stage's gather_candidates (each rank's softmax also scores the other "
                             "ranks' batch items, as one worker's batch would)")
    parser.add_argument("--workers-list", default="1,2",
                        help="scaling: worker counts to run; without 1, the 1-worker curves of the same seeds "
                             "come from --reference")
    parser.add_argument("--reference", default="scaling_quality_6epochs_3seeds",
                        help="scaling: the section of --out holding the 1-worker curves --workers-list omits")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per setting (scaling)")
    parser.add_argument("--cpus-per-rank", type=int, default=0, help="scaling: pin each rank to this many cores")
    parser.add_argument("--slot-cores", type=int, default=0,
                        help="limit: each worker's slot is this many pinned cores (0: the 2-core host's settings)")
    parser.add_argument("--batch", type=int, default=512, help="scaling: pairs per step (per rank, or global)")
    parser.add_argument("--timing-steps", type=int, default=0,
                        help="scaling, baseline: time this many steps per rank only (no quality)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="limit: one untimed 2-worker run of this many steps before the timed rounds")
    parser.add_argument("--timing-repeats", type=int, default=1,
                        help="scaling: with --timing-steps, time 1 and 2 workers this many times in turn")
    parser.add_argument("--seeds", default="0", help="scaling, baseline: comma-separated seeds")
    parser.add_argument("--same-global-batch", action="store_true",
                        help="scaling: 2 ranks of batch/2 pairs (same steps and batch as 1 rank)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "dtrain.json")
    parser.add_argument("--note", default="", help="conditions of the run, recorded with it")
    args = parser.parse_args()
    if args.part == "limit" and not args.timing_steps:
        parser.error("--part limit times steps only: give --timing-steps (e.g. 100) and --timing-repeats (e.g. 3)")
    run = args.run_dir / f"rows-{args.rows}"
    seeds = [int(x) for x in args.seeds.split(",")]
    workers_list = tuple(int(x) for x in args.workers_list.split(","))
    chosen = {"lr_scaling": args.lr_scaling, "lr_warmup_steps": args.lr_warmup_steps, "negatives": args.negatives,
              "partition": args.partition, "cache_fraction": args.cache_fraction,
              "gather_candidates": args.gather_candidates}
    defaults = {k: getattr(TrainStageConfig, k) for k in chosen}  # the stage's
    scaling_settings = {k: v for k, v in chosen.items() if v != defaults[k]}  # also in the section's name
    load_before = os.getloadavg()
    started = time.perf_counter()

    def save(section: dict[str, Any]) -> None:
        """Merge ``section`` (with the command and conditions) into ``--out``, re-read first."""
        section.update({"command": "PYTHONPATH=$PWD python " + " ".join(sys.argv) + NICE_NOTE,
                        "data_rows": args.rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "seconds": round(time.perf_counter() - started, 1), "note": args.note})
        out = json.loads(args.out.read_text()) if args.out.is_file() else {}
        baseline = (f"baseline_timing{args.timing_steps}" if args.timing_steps else
                    f"baseline_curves_{args.model}_{args.epochs}epochs_seeds{'-'.join(map(str, seeds))}")
        limit = f"limit_timing{args.timing_steps}x{args.timing_repeats}" + (
            f"_slots{args.slot_cores}" if args.slot_cores else "") + "".join(
            f"_{k}-{v}" for k, v in scaling_settings.items())
        name = {"cache": f"cache_{args.negatives}_negatives", "baseline": baseline, "limit": limit,
                "scaling": "scaling" + (f"_pinned{args.cpus_per_rank}" if args.cpus_per_rank else "")
                + ("_same_global_batch" if args.same_global_batch else "")
                + (f"_timing{args.timing_steps}" if args.timing_steps else "")
                + (f"x{args.timing_repeats}" if args.timing_steps and args.timing_repeats > 1 else "")
                + "".join(f"_{k}-{v}" for k, v in scaling_settings.items())
                + ("" if workers_list == (1, 2) else f"_workers{'-'.join(map(str, workers_list))}")
                + (f"_quality_{args.epochs}epochs_{len(seeds)}seeds" if len(seeds) > 1 else
                   f"_quality_{args.epochs}epochs_seed{seeds[0]}" if workers_list != (1, 2) else "")
                }.get(args.part, args.part)
        out.update({"machine": {"nproc": os.cpu_count(), "platform": platform.platform()}, name: section})
        quiet = out.get(f"baseline_timing{args.timing_steps}") if args.timing_steps else None
        for key, sec in out.items():  # curves of both models: time to target with the step times of a timing run
            if args.part == "baseline" and key.startswith("baseline_curves_") and "time_to_target" in sec:
                timing = quiet or next((out[k] for k in sorted(out) if k.startswith("baseline_timing")), None)
                if timing is not None:
                    sec["time_to_target_quiet"] = time_to_target(sec, timing["step_s"], timing["command"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, out, sort_keys=False)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        prepare(run, args.rows, client)
        if args.part == "cache":
            section = part_cache(run, client, args.steps, args.negatives)
        elif args.part == "partition":
            section = part_partition(run, client, args.steps)
        elif args.part == "scaling":
            stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
            reference = stored.get(args.reference) if 1 not in workers_list else None
            section = part_scaling(run, client, args.epochs, args.cpus_per_rank, args.batch,
                                   args.same_global_batch, args.timing_steps, seeds, save,
                                   workers_list=workers_list, settings=scaling_settings, reference=reference,
                                   timing_repeats=args.timing_repeats)
            if reference is not None:
                section["reference_1_worker"] = {"section": args.reference, "command": reference.get("command")}
        elif args.part == "limit":
            section = part_limit(run, client, args.timing_steps, args.timing_repeats, args.batch, scaling_settings,
                                 args.slot_cores, args.warmup_steps)
        elif args.timing_steps:
            section = part_baseline_timing(run, client, args.timing_steps)
        else:
            models = list(BASELINE_MODELS) if args.model == "both" else [args.model]
            section = part_baseline(run, client, models, args.epochs, seeds, args.target_fraction)
    save(section)
    print(json.dumps(section, indent=1, default=str)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
