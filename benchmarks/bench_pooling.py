"""Importance vs mean pooling (and PinSage vs GraphSAGE-mean), paired over training seeds.

One seed decides nothing here: the three GNNs of results/quality_generated_tuned.json differ by 0.001-0.005 in
hit@10, about the run-to-run spread. This script trains every model of ``--models`` once per seed of ``--seeds``
on the same split, with the same walks (walk seed = training seed, so the walk noise that importance weights
carry is part of the spread) and the same training seed, and reports each metric per seed and the paired
difference of every model against the first one (same seed), with its mean, standard deviation and the number
of seeds on which it is positive, and the 95 % Student-t interval of its mean (``ci95``; a lead that holds
across seeds has an interval above 0). Evaluation: ``pipeline.evaluate.evaluate_tables`` (protocol A, valid and test;
no baselines, no protocol B).

Findings (results/quality_pooling.json, generated 100k rows, 8 epochs, 3-5 seeds): with the default hashed
id table both poolings memorise items and stay within seed noise of each other, at T=10 and at T=50 neighbours
(200 walks per item), although the normalised visit counts are far from uniform (at T=10 the lower half of the
neighbours holds a median 36 % of the weight, 28 % at T=50); a partial table (512 rows) is again within noise.
Without id rows (``--set id_buckets=0``: an item known only by its features and its walk neighbourhood)
importance pooling leads mean pooling on every seed in hit@10 and F1@10 (5 seeds) and PinSage leads
GraphSAGE-mean by far, but those id-free models stay far below item-CF (hit@10 0.28 vs 0.45): that is where
importance pooling matters, not a setting that beats the baselines. Two middle settings (seed 0 each) did not
change that: id dropout 0.5 (``--set id_dropout=0.5``) costs every model ~0.09 hit@10 and leaves mean pooling
level with importance; a 32-wide content vector and no id rows (``--gen-content-dim 32 --set id_buckets=0``) lifts
the id-free models to 0.31-0.33 hit@10, still below item-CF, with the two poolings tied. Noisier generated data
(``--gen-set community_strength=0.5``, runs ``cs05_*``, baselines on the same split with ``--baselines``, 7 seeds
paired in ``cs05_all_seeds``) puts the walk neighbourhood ahead of GraphSAGE-mean (PinSage-mean - GraphSAGE MRR
+0.022 on 7/7 seeds, hit@10 +0.019) but not importance pooling (importance - mean MRR -0.006, 1/7), and every GNN
falls further below item-CF (hit@10 0.31-0.33 vs 0.37); benchmarks/probe_community_purity.py measures how little
purer than GraphSAGE's draws the top-T neighbours are on such data. Ranking and weighting the walk neighbours
by lift instead (``--walk-set neighbor_score=lift``: visits / degree, run ``cs05_lift_t10_3models``, 3 seeds)
puts importance ahead of mean pooling on every seed (test hit@10 +0.029) only because mean pooling over those
rarer neighbours loses 0.047; PinSage itself gains nothing over the visit ranking and item-CF stays ahead. A
milder discount (``lift_alpha=0.25``, ``cs05_lift_a025_t10_3models``: the purest top-10 of the probe) is no better.
On Amazon with id rows (10 epochs, 5 seeds, ``amazon_ids_e10``) every PinSage row leads item-CF and
co-occurrence, and importance pooling leads mean pooling on 4 of 5 seeds in every figure (test hit@10 +0.0012,
valid MRR +0.0010 on 5/5), while PinSage - GraphSAGE-mean is positive on 3 of 5 only: small leads inside the seed
spread. A sparser generated catalogue (``--gen-set items=16000``, 6 rows per item, ``sparse16k_*``) weakens item-CF
more than the GNNs (after 24 epochs they lead it on all figures) but leaves the three GNNs within noise of one
another; query offsets without item id rows (``--set id_buckets=0 --set query_id_buckets=16384``,
``noid_qid_t10``) lift the id-free PinSage to 0.31 test hit@10 with importance ahead of mean pooling on all
figures, still far below item-CF (0.43). Adding a 32-wide content vector to that id-free tower
(``--gen-content-dim 32``) at the tuned size (200k rows, 16 epochs, 3 seeds, ``content32_noid_qid_tuned``) puts
PinSage ahead of GraphSAGE-mean on hit@10 and MRR on every seed (test hit@10 +0.014, MRR +0.010) but leaves it
about 0.01 behind item-CF on hit@10 and MRR, with mean pooling level with importance (also at T=50,
``content32_noid_qid_t50``): item vectors that tell items apart (id rows, or content with item-specific noise)
make the pooling weights irrelevant on this data. Trained for 32 epochs (``content32_noid_qid_e32``, 4 seeds,
about 14 min per model) the id-free PinSage passes item-CF on hit@10, F1@10 and valid MRR on every seed (95 %
intervals of the difference above 0) and on test MRR on two of four (mean 0.260 vs 0.259, interval spanning 0),
still ahead of GraphSAGE-mean on every seed (test hit@10 +0.014, interval [+0.005, +0.023]); importance - mean
pooling spans 0 on every figure. At 48 epochs (``content32_noid_qid_e48``, PinSage and GraphSAGE-mean, 8 seeds,
about 18-26 min per model) the id-free PinSage leads item-CF on all six figures on every seed, every interval
above 0 (test MRR 0.263 vs 0.259, [+0.003, +0.005]), and leads GraphSAGE-mean with every interval above 0
(test hit@10 +0.012 [+0.010, +0.015], MRR +0.006 [+0.005, +0.008], F1@10 +0.002 [+0.001, +0.003]), while
GraphSAGE-mean trails item-CF on test MRR on every seed (-0.002 [-0.003, -0.001]): the walk neighbourhood is
what lifts the id-free tower past item-CF. PinSage-mean there (seeds 0 and 1) is level with PinSage
(importance - mean test hit@10 -0.0015 and -0.0017, F1@10 +0.0013 and +0.0014, MRR and the valid figures split).
With id rows and content together (``content32_ids_qid_tuned``, 16 epochs, 10 seeds) every GNN leads item-CF on
all six figures on every seed (PinSage test hit@10 0.456 vs 0.425, MRR 0.271 vs 0.259), and the three GNNs tie:
PinSage - GraphSAGE-mean and importance - mean both span 0 on every figure. GraphSAGE-mean above draws an item's
neighbours by a two-step walk item -> user -> item (``graphsage``), which weights a neighbour by its shared users
much as visit counts weight PinSage's top-T; ``graphsage_distinct`` draws uniformly over the distinct
co-interaction neighbours (Hamilton et al.'s sampler, ``ModelConfig.sage_neighbors="distinct"``). On Amazon with
id rows (``amazon_ids_e10``, 7 seeds) PinSage leads that baseline on all six figures on every seed, every interval
above 0 (test hit@10 +0.0028 [+0.0013, +0.0043], MRR +0.0014 [+0.0006, +0.0023]), and it leads item-CF the same
way (test hit@10 0.085 vs 0.073), while it is level with the two-step variant (+0.0004 [-0.0020, +0.0027]) and
the uniform GraphSAGE does not pass item-CF on MRR. In the id-free generated content setting at 48 epochs
(``content32_noid_qid_e48``, seeds 0-5) the two draws are level and PinSage leads ``graphsage_distinct`` on all
six figures with every interval above 0 (test hit@10 +0.013 [+0.010, +0.016], MRR +0.0067 [+0.0046, +0.0088]).
The default 50 walks per item leave the top-T noisy (benchmarks/probe_walk_convergence.py: on Amazon half of the
top-10 slots hold items visited at most twice). With 500 walks (``--walk-set n_walks=500``, ``amazon_ids_e10_w500``,
7 seeds, GraphSAGE rows borrowed from ``amazon_ids_e10`` because GraphSAGE reads no walks) PinSage gains on every
seed and figure (test hit@10 +0.0032) and leads the two-step GraphSAGE-mean on all six figures with every interval
above 0 (test hit@10 +0.0036 [+0.0025, +0.0047], MRR +0.0026 [+0.0018, +0.0034]); mean pooling gains as much, so
importance - mean stays small (test MRR +0.0007 [+0.0001, +0.0012], valid figures level). On generated data with
id rows (``t10_w500``, 3 seeds) 500 walks change nothing beyond seed noise. Widening the neighbourhood to T=25 at
500 walks (``--set n_neighbors=25``, ``amazon_ids_e10_t25_w500``, 12 seeds) puts importance ahead of mean pooling on
average on all six figures, with the interval above 0 on test hit@10 (+0.0010 [+0.00004, +0.0019]), test MRR and
valid MRR and just spanning 0 on the other three: mean pooling weighs the weak tail neighbours like the strong ones.

Run (generated data, T=10 vs T=50 neighbours):
``PYTHONPATH=$PWD nice -n 19 python benchmarks/bench_pooling.py --dataset generated --gen-rows 100000
--seeds 0,1,2 --set epochs=8 --set embed_dim=128 --set query_id_buckets=16384 --set n_neighbors=50
--walk-set n_walks=200 --out /tmp/pooling/t50w200.json`` (the other runs: their ``command`` in the JSON; a
setting trained in several runs is merged seed by seed by ``benchmarks/merge_pooling.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch

from benchmarks.bench_quality import MODELS, load, overrides, training_inputs, walk_config
from benchmarks.quality_lib import train_gnn
from gnn.baselines import Scorer
from gnn.models import ModelConfig
from gnn.trainer import TrainConfig
from gnn.walks import WalkConfig
from pipeline.evaluate import BASELINES, EvalConfig, evaluate_tables
from pipeline.generate import GenerateConfig
from pipeline.rundir import write_json_atomic

METRICS = (("item_to_item", "hit@10"), ("item_to_item", "mrr"), ("user_to_item", "f1@10"))


def weight_profile(indptr: np.ndarray, weights: np.ndarray, t: int) -> dict[str, Any]:
    """How far from uniform the importance weights of the top-``t`` neighbours are, over the items that have
    ``t`` neighbours: quantiles (10/50/90 %) of the top neighbour's share, of the lower half's share (uniform:
    0.5 for even ``t``), of the first-to-last visit-count ratio and of the visit counts summed over the ``t``."""
    full = np.flatnonzero(np.diff(indptr) >= t)
    w = np.asarray(weights, np.float64)[indptr[full][:, None] + np.arange(t)]  # (n, t), visit counts desc
    share = w / w.sum(axis=1, keepdims=True)
    q = [0.1, 0.5, 0.9]

    def quant(x: np.ndarray) -> list[float]:
        return [round(float(v), 3) for v in np.quantile(x, q)] if x.size else []

    return {"t": t, "items": int(full.shape[0]), "quantiles": q, "top1_share": quant(share[:, 0]),
            "lower_half_share": quant(share[:, t - t // 2:].sum(axis=1)), "first_over_last": quant(w[:, 0] / w[:, -1]),
            "visits_in_top_t": quant(w.sum(axis=1))}


def metric_rows(report: dict[str, Any], models: list[str]) -> dict[str, dict[str, float]]:
    """``{model: {"valid item_to_item hit@10": value, ...}}`` of one evaluation report."""
    out: dict[str, dict[str, float]] = {m: {} for m in models}
    for holdout, part in report["protocol_a"].items():
        for side, metric in METRICS:
            for m in models:
                out[m][f"{holdout} {side} {metric}"] = float(part[side][m][metric])
    return out


def ci95(d: np.ndarray) -> list[float] | None:
    """Two-sided 95 % Student-t interval ``[lo, hi]`` of the mean of the differences ``d`` (rounded to 5
    places), or ``None`` for fewer than two."""
    if d.size < 2:
        return None
    half = float(scipy.stats.t.ppf(0.975, d.size - 1)) * float(d.std(ddof=1)) / float(np.sqrt(d.size))
    return [round(float(d.mean()) - half, 5), round(float(d.mean()) + half, 5)]


def paired(per_seed: list[dict[str, dict[str, float]]], models: list[str]) -> dict[str, Any]:
    """Every model against the first one, seed by seed: ``{"A - B": {metric: {"per_seed", "mean", "sd",
    "ci95", "n_positive"}}}``; ``sd`` is the sample standard deviation of the differences (0.0 for one seed),
    ``ci95`` the two-sided 95 % Student-t interval of their mean (``None`` for one seed): a lead that holds across
    seeds is one whose interval lies above 0."""
    ref = models[0]
    out: dict[str, Any] = {}
    for other in models[1:]:
        rows: dict[str, Any] = {}
        for metric in per_seed[0][ref]:
            d = np.array([s[ref][metric] - s[other][metric] for s in per_seed])
            rows[metric] = {"per_seed": [round(float(x), 5) for x in d], "mean": round(float(d.mean()), 5),
                            "sd": round(float(d.std(ddof=1)) if d.size > 1 else 0.0, 5), "ci95": ci95(d),
                            "n_positive": int((d > 0).sum())}
        out[f"{ref} - {other}"] = rows
    return out


def model_means(per_seed: list[dict[str, Any]], models: list[str]) -> dict[str, dict[str, float]]:
    """Each model's metrics averaged over the seeds of ``per_seed`` (rows with ``metrics``) that have it."""
    out: dict[str, dict[str, float]] = {}
    for m in models:
        rows = [r["metrics"][m] for r in per_seed if m in r["metrics"]]
        out[m] = {k: round(float(np.mean([row[k] for row in rows])), 5) for k in rows[0]}
    return out


def interval(ci95: list[float] | None) -> str:
    """``ci95`` of :func:`paired` for a terminal table: ``[lo, hi]`` to four places, or ``n/a`` for one seed."""
    return "[n/a]" if ci95 is None else f"[{ci95[0]:+.4f}, {ci95[1]:+.4f}]"


def save(out: Path, name: str | None, result: dict[str, Any]) -> None:
    """Write ``result`` as the whole of ``out``, or under key ``name`` of the runs already in it."""
    if name is None:
        write_json_atomic(out, result)
        return
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged[name] = result
    write_json_atomic(out, merged)


def run_seed(tables: dict[str, pd.DataFrame], models: list[str], model_over: dict[str, Any],
             train_over: dict[str, Any], walk_over: dict[str, Any], seed: int, budget_s: float,
             eval_cfg: EvalConfig, content: np.ndarray | None = None) -> dict[str, Any]:
    train, store, n_categories = training_inputs(tables, content)
    model_over = {**model_over, "content_dim": 0 if content is None else int(content.shape[1])}
    scorers: dict[str, Scorer] = {}
    training: dict[str, Any] = {}
    for name in models:
        mc = ModelConfig(**{"n_categories": n_categories, **model_over, **MODELS[name]})
        tc = TrainConfig(**{"mode": "sync", "log_every": 0, **train_over, "seed": seed})
        wc = walk_config(walk_over, mc.n_neighbors, seed)
        res = train_gnn(train, mc, tc, walk_cfg=wc, store=store, time_budget_s=budget_s, name=name)
        scorers[name] = res.scorer
        training[name] = {"epochs": len(res.epochs), "budget_hit": res.budget_hit,
                          "last_loss": res.epochs[-1]["loss"], "seconds_incl_walks": round(res.seconds, 1)}
    report = evaluate_tables(tables, eval_cfg, extra_scorers=scorers)
    return {"seed": seed, "training": training, "metrics": metric_rows(report, models)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["generated", "amazon", "taobao"], required=True)
    ap.add_argument("--data", type=Path, default=Path("..") / "shared" / "data")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default=None,
                    help="store the result under this key of --out, beside the runs already there (default: the "
                         "whole file is this run)")
    ap.add_argument("--gen-rows", type=int, default=200_000)
    ap.add_argument("--gen-content-dim", type=int, default=0,
                    help="generated data: a dense content vector of this width per item, read by the models")
    ap.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock training budget per model and seed")
    ap.add_argument("--models", default="pinsage,pinsage_mean", help="the first is the reference of the differences")
    ap.add_argument("--seeds", default="0,1,2", help="training (and walk) seeds, comma-separated")
    ap.add_argument("--set", action="append", default=[], help="field=value override of ModelConfig/TrainConfig")
    ap.add_argument("--walk-set", action="append", default=[], help="field=value override of WalkConfig")
    ap.add_argument("--gen-set", action="append", default=[],
                    help="generated data: field=value override of GenerateConfig (e.g. community_strength=0.5)")
    ap.add_argument("--baselines", action="store_true",
                    help="also score the baselines (item-CF, co-occurrence, popularity, random) once on the split, "
                         "under baselines_same_split")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    model_over, train_over = overrides(args.set)
    walk_over = overrides(args.walk_set, (WalkConfig,), "--walk-set")[0]
    gen_over = overrides(args.gen_set, (GenerateConfig,), "--gen-set")[0]
    started, load_start = time.perf_counter(), os.getloadavg()
    tables, info = load(args.dataset, args.data, args.gen_rows, args.gen_content_dim, gen_over)
    content = info.pop("item_content", None)
    eval_cfg = EvalConfig(window_s=None if args.dataset == "amazon" else 1800, max_users=None, max_queries=None,
                          baselines=(), protocol_b=False)
    result: dict[str, Any] = {"dataset": args.dataset, **info, "models": models, "seeds": seeds,
                              "model_overrides": model_over, "train_overrides": train_over,
                              "walk_overrides": walk_over, "generate_overrides": gen_over, "per_seed": []}
    if args.baselines:  # seed-independent: scored once, on the same split and by the same evaluation
        report = evaluate_tables(tables, dataclasses.replace(eval_cfg, baselines=BASELINES))
        result["baselines_same_split"] = metric_rows(report, list(BASELINES))
        print(json.dumps({"baselines_same_split": result["baselines_same_split"]}), flush=True)
    for seed in seeds:
        row = run_seed(tables, models, model_over, train_over, walk_over, seed, args.budget_s, eval_cfg, content)
        result["per_seed"].append(row)
        print(json.dumps(row), flush=True)
        result["paired"] = paired([r["metrics"] for r in result["per_seed"]], models)
        save(args.out, args.name, result)  # after every seed, so a cut-short run keeps its seeds
    result["mean"] = model_means(result["per_seed"], models)
    result["machine"] = {"nproc": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                         "platform": platform.platform(), "torch": torch.__version__, "torch_threads": 1}
    result["command"] = " ".join(["python", *sys.argv])
    result["seconds"] = round(time.perf_counter() - started, 1)
    save(args.out, args.name, result)
    for pair, rows in result["paired"].items():
        print(f"\n{pair} (per seed; mean ± sd; 95 % interval of the mean; seeds > 0)")
        for metric, r in rows.items():
            print(f"  {metric:32s} {r['per_seed']}  {r['mean']:+.4f} ± {r['sd']:.4f}  {interval(r['ci95'])}  "
                  f"{r['n_positive']}/{len(seeds)}")
    print(f"wrote {args.out} in {result['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
