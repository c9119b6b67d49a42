"""One tuning run on the Amazon sample: train with overrides, report protocol-B HR@10 / MRR on the validation
item after every epoch, append a line to results/quality_tuning.jsonl.

Run: ``PYTHONPATH=$PWD python benchmarks/tune_amazon.py --set loss=softmax --set epochs=3``
(runs stopped early are not logged: lr 1e-2 gave 0.022 after one epoch; batch 4096 0.035 after one epoch;
embed_dim 128 gave 0.0472 / 0.0701 / 0.0746 / 0.0766 after epochs 1-4, no better than 64.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_baselines import read_amazon
from benchmarks.quality_lib import train_gnn
from gnn.baselines import EmbeddingScorer
from gnn.evaluation import evaluate_leave_last_out, leave_last_out
from gnn.models import ModelConfig
from gnn.trainer import TrainConfig
from gnn.walks import WalkConfig


def parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], help="field=value of ModelConfig/TrainConfig/WalkConfig")
    ap.add_argument("--one-direction", action="store_true", help="(the default now; kept for the logged commands)")
    ap.add_argument("--both-directions", action="store_true")
    ap.add_argument("--data", type=Path, default=Path("..") / "shared/data/amazon-videogames/Video.txt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    over = dict(kv.split("=", 1) for kv in args.set)
    over = {k: parse(v) for k, v in over.items()}
    pick = {c: {k: v for k, v in over.items() if k in {f.name for f in dataclasses.fields(c)}}
            for c in (ModelConfig, TrainConfig, WalkConfig)}
    df = read_amazon(args.data)
    n_users, n_items = int(df["user"].max()) + 1, int(df["item"].max()) + 1
    split = leave_last_out(df["user"].to_numpy(), df["item"].to_numpy(), n_users=n_users, n_items=n_items,
                           order=(df["line"].to_numpy(),))
    mc = ModelConfig(**{"n_categories": 1, "id_buckets": 32768, **pick[ModelConfig]})
    tc = TrainConfig(**{"epochs": 3, "mode": "sync", "log_every": 0, **pick[TrainConfig]})
    wc = WalkConfig(**pick[WalkConfig])

    def evaluate(scorer: Any) -> dict[str, float]:
        r = evaluate_leave_last_out(scorer, split, target="valid", ks=(10,))
        out = {"hr@10": round(r["hit@10"], 4), "mrr": round(r["mrr"], 4)}
        if scorer.query_emb is not scorer.emb:  # the item embeddings alone, without the query head
            sym = EmbeddingScorer(scorer.emb.numpy(), name="symmetric")
            out["hr@10_item_only"] = round(evaluate_leave_last_out(sym, split, target="valid", ks=(10,))["hit@10"], 4)
        return out

    res = train_gnn(split.train, mc, tc, walk_cfg=wc, both_directions=args.both_directions, evaluate=evaluate)
    line = {"command": " ".join([sys.executable, *sys.argv]), "loadavg": os.getloadavg(), "overrides": over,
            "both_directions": args.both_directions, "epochs": res.epochs, "seconds": round(res.seconds, 1)}
    with open("results/quality_tuning.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
