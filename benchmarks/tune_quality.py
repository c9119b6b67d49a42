"""One tuning run on a quality-benchmark dataset, scored on the VALIDATION holdout only: train PinSage with
overrides as ``bench_quality.py`` does (same data, split and store), and after every epoch record protocol A
(valid) item→item hit@10 / MRR and user→item F1@10 / MRR@10 and protocol B valid HR@10 / MRR; append a line
to results/quality_tuning.jsonl.

Run: ``PYTHONPATH=$PWD nice -n 19 python benchmarks/tune_quality.py --dataset generated --set epochs=10``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_quality import MODELS, load, parse, training_inputs
from benchmarks.quality_lib import train_gnn
from gnn.baselines import Scorer
from gnn.models import ModelConfig
from gnn.trainer import TrainConfig
from gnn.walks import WalkConfig
from pipeline.evaluate import EvalConfig, evaluate_tables

BENCH_DEFAULTS: dict[str, dict[str, Any]] = {  # the overrides results/quality.json was produced with
    "amazon": {"id_buckets": 32768, "epochs": 6, "n_negatives": 4096},
    "generated": {},
}


def valid_figures(report: dict[str, Any], name: str) -> dict[str, float]:
    a = report["protocol_a"]["valid"]
    i2i, u2i = a["item_to_item"][name], a["user_to_item"][name]
    out = {"i2i_hit@10": i2i["hit@10"], "i2i_mrr": i2i["mrr"], "u2i_f1@10": u2i["f1@10"],
           "u2i_hit@10": u2i["hit@10"], "u2i_mrr@10": u2i["mrr@10"]}
    if "protocol_b" in report:
        b = report["protocol_b"]["valid"]["models"][name]
        out.update({"b_hr@10": b["hit@10"], "b_mrr": b["mrr"]})
    return {k: round(float(v), 4) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["generated", "amazon"], required=True)
    ap.add_argument("--model", choices=list(MODELS), default="pinsage")
    ap.add_argument("--data", type=Path, default=Path("..") / "shared" / "data")
    ap.add_argument("--gen-rows", type=int, default=200_000)
    ap.add_argument("--save", type=Path, help="write the final item and query embeddings here (.npz)")
    ap.add_argument("--set", action="append", default=[], help="field=value of ModelConfig/TrainConfig/WalkConfig")
    args = ap.parse_args()
    torch.set_num_threads(1)
    over = {**BENCH_DEFAULTS[args.dataset], **{k: parse(v) for k, v in (kv.split("=", 1) for kv in args.set)}}
    pick = {c: {k: v for k, v in over.items() if k in {f.name for f in dataclasses.fields(c)}}
            for c in (ModelConfig, TrainConfig, WalkConfig)}
    tables, _ = load(args.dataset, args.data, args.gen_rows)
    train, store, n_categories = training_inputs(tables)
    mc = ModelConfig(**{"n_categories": n_categories, **pick[ModelConfig], **MODELS[args.model]})
    tc = TrainConfig(**{"mode": "sync", "log_every": 0, **pick[TrainConfig]})
    cfg = EvalConfig(window_s=None if args.dataset == "amazon" else 1800, max_users=None, max_queries=None,
                     holdouts=("valid",), baselines=())

    def evaluate(scorer: Scorer) -> dict[str, float]:
        return valid_figures(evaluate_tables(tables, cfg, extra_scorers={args.model: scorer}), args.model)

    res = train_gnn(train, mc, tc, walk_cfg=WalkConfig(**pick[WalkConfig]), store=store, evaluate=evaluate,
                    time_budget_s=float("inf"), name=args.model)
    if args.save is not None:
        np.savez(args.save, items=res.scorer.emb.numpy(), queries=res.scorer.query_emb.numpy())
    line = {"command": " ".join(["python", *sys.argv]), "dataset": args.dataset, "model": args.model,
            "loadavg": os.getloadavg(), "overrides": over, "holdout": "valid", "epochs": res.epochs,
            "seconds": round(res.seconds, 1)}
    with open("results/quality_tuning.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
