"""Recommendation quality: PinSage (importance and mean pooling) and GraphSAGE-mean against the baselines.

Datasets: generated data with planted communities (``pipeline/generate.py``, last-day split as ``pinsage split``
does by default), the Amazon video-games sample (leave-last-out: protocol A on valid/test, and DGL's protocol B)
and the real Taobao head sample (last-day split). Every model is ranked by the same code
(``pipeline.evaluate.evaluate_tables``): item→item hit@K / MRR, user→item precision/recall/F1/NDCG@K, and
protocol B HR@10 / MRR. GNNs train on the training split's consecutive-item pairs, directed (previous item ->
next item, as item-CF counts them), with the settings of ``gnn`` defaults plus the overrides recorded in the
JSON, each under a wall-clock budget.

Run: ``PYTHONPATH=$PWD python benchmarks/bench_quality.py --dataset amazon`` (one dataset per run; the results
of all runs are merged into results/quality.json). Generated data: ``--dataset generated --gen-rows 200000
--budget-s 900 --set epochs=12 --set embed_dim=128`` (epochs and width chosen on the validation holdout with
``benchmarks/tune_quality.py``, see results/quality_tuning.jsonl); with per-item query offsets, chosen on valid
(``--set query_id_buckets=16384``, 16 epochs): the ``command`` in results/quality_generated_tuned.json;
Amazon: the ``command`` in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from benchmarks.bench_baselines import read_amazon, read_taobao, split_last_days, split_last_n
from benchmarks.quality_lib import store_from_histories, train_gnn
from gnn.baselines import Histories, Scorer
from gnn.graphstore import GraphStore
from gnn.models import ModelConfig
from gnn.trainer import TrainConfig
from gnn.walks import WalkConfig
from pipeline.config import ConfigError
from pipeline.evaluate import EvalConfig, evaluate_tables, format_table
from pipeline.generate import GenerateConfig, generate, items_path
from pipeline.rundir import write_json_atomic

MODELS: dict[str, dict[str, Any]] = {
    "pinsage": {"kind": "pinsage", "pooling": "importance"},
    "pinsage_mean": {"kind": "pinsage", "pooling": "mean"},
    "graphsage": {"kind": "graphsage"},
    "graphsage_distinct": {"kind": "graphsage", "sage_neighbors": "distinct"},
}


def load(dataset: str, data: Path, gen_rows: int, content_dim: int = 0, gen_over: dict[str, Any] | None = None,
         with_community: bool = False) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Split tables of a dataset and facts about it. ``content_dim`` > 0 (generated data only) also generates a
    dense content vector per item (its community's centre plus item-specific noise, ``pinsage generate
    --content-dim``), returned as ``info["item_content"]`` (n_items, D) float32 in the tables' item order; pop it
    before writing ``info`` anywhere. ``gen_over``: GenerateConfig fields set on top of the defaults here
    (generated data only; the data is generated afresh on every call, nothing is cached). ``with_community``
    (generated data): also ``info["item_community"]`` (n_items,) int64, each item's planted community."""
    if content_dim and dataset != "generated":
        raise SystemExit(f"--gen-content-dim {content_dim}: content features exist for --dataset generated only")
    if gen_over and dataset != "generated":
        raise SystemExit(f"--gen-set {', '.join(gen_over)}: generator settings apply to --dataset generated only")
    own = sorted({"rows", "content_dim"} & set(gen_over or {}))
    if own:
        raise SystemExit(f"--gen-set {own[0]}=...: set it with --gen-{own[0].replace('_', '-')} instead")
    if dataset == "amazon":
        return split_last_n(read_amazon(data / "amazon-videogames" / "Video.txt")), {"split": "leave-last-out"}
    if dataset == "taobao":
        return split_last_days(read_taobao(data / "taobao" / "UserBehavior-head.csv")), {"split": "last day"}
    try:
        cfg = GenerateConfig(**{"rows": gen_rows, "seed": 0, "communities": 50, "content_dim": content_dim,
                                **(gen_over or {})})
    except ConfigError as e:
        raise SystemExit(f"--gen-set: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "gen.csv"
        info = generate(csv, cfg)
        df = read_taobao(csv)
        content = np.stack(list(_item_side(csv, df, "content"))).astype(np.float32) if content_dim else None  # (n, D)
        community = _item_side(csv, df, "community").astype(np.int64) if with_community else None
    out: dict[str, Any] = {"split": "last day", "generate": dataclasses.asdict(cfg), "users": info["users"],
                           "items": info["items"]}
    if content is not None:
        out["item_content"] = content
    if community is not None:
        out["item_community"] = community
    return split_last_days(df), out


def _item_side(csv: Path, df: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` of the generated items' side file (``content``, ``community``, ...) in ``read_taobao``'s item
    order (its ids factorise the sorted raw ids of the rows it keeps)."""
    raw = pd.read_csv(csv, header=None, usecols=[1], names=["i"], dtype={"i": np.int64})["i"].to_numpy()
    kept = np.unique(raw[df["line"].to_numpy() - 1])  # sorted raw ids: position = item index
    side = pq.read_table(items_path(csv)).to_pandas()
    where = pd.Index(side["raw_item"].to_numpy()).get_indexer(kept)
    if (where < 0).any():
        raise ValueError(f"{items_path(csv)}: no row for raw item {int(kept[where < 0][0])}")
    return side[column].to_numpy()[where]


def training_inputs(tables: dict[str, pd.DataFrame], content: np.ndarray | None = None
                    ) -> tuple[Histories, GraphStore, int]:
    """The training histories, their graph store (with every item's category, and ``content`` rows when given)
    and the number of categories."""
    everything = pd.concat(list(tables.values()))
    n_users, n_items = int(everything["user"].max()) + 1, int(everything["item"].max()) + 1
    train = Histories.from_interactions(tables["train"], n_users=n_users, n_items=n_items)
    category = np.zeros(n_items, np.int64)
    category[everything["item"].to_numpy()] = everything["category"].to_numpy()
    n_categories = int(category.max()) + 1
    if content is not None and content.shape[0] != n_items:
        raise ValueError(f"content has {content.shape[0]} rows for {n_items} items")
    store = store_from_histories(train, category=category, n_categories=n_categories, content=content)
    return train, store, n_categories


def run(dataset: str, tables: dict[str, pd.DataFrame], model_over: dict[str, Any], train_over: dict[str, Any],
        budget_s: float, models: list[str], walk_cfg: WalkConfig | None = None,
        content: np.ndarray | None = None) -> dict[str, Any]:
    train, store, n_categories = training_inputs(tables, content)
    model_over = {**model_over, "content_dim": 0 if content is None else int(content.shape[1])}
    scorers: dict[str, Scorer] = {}
    training: dict[str, Any] = {}
    for name in models:
        mc = ModelConfig(**{"n_categories": n_categories, **model_over, **MODELS[name]})
        tc = TrainConfig(**{"mode": "sync", "log_every": 0, **train_over})
        res = train_gnn(train, mc, tc, walk_cfg=walk_cfg or WalkConfig(), store=store, time_budget_s=budget_s,
                        name=name)
        scorers[name] = res.scorer
        training[name] = {"model": mc.to_dict(), "train": tc.to_dict(), "epochs": res.epochs,
                          "budget_hit": res.budget_hit, "seconds_incl_walks": round(res.seconds, 1)}
    cfg = EvalConfig(window_s=None if dataset == "amazon" else 1800, max_users=None, max_queries=None)
    report = evaluate_tables(tables, cfg, extra_scorers=scorers)
    print(f"\n== {dataset}\n{format_table(report)}", flush=True)
    return {"training": training, "evaluation": report}


def parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def overrides(pairs: list[str], configs: tuple[type, ...] = (ModelConfig, TrainConfig), option: str = "--set"
              ) -> list[dict[str, Any]]:
    """``field=value`` strings split by the config dataclass that has the field (one dict per class of
    ``configs``, in order); a field none of them has is an error naming ``option``, rather than silently
    ignored."""
    out: list[dict[str, Any]] = [{} for _ in configs]
    for kv in pairs:
        key, sep, value = kv.partition("=")
        owners = [i for i, c in enumerate(configs) if key in {f.name for f in dataclasses.fields(c)}]
        if not sep or not owners:
            names = "/".join(c.__name__ for c in configs)
            raise SystemExit(f"{option} {kv!r}: expected field=value with a field of {names}")
        for i in owners:
            out[i][key] = parse(value)
    return out


def walk_config(walk_over: dict[str, Any], n_neighbors: int, seed: int | None = None) -> WalkConfig:
    """``walk_over`` on the walk defaults, keeping at least ``n_neighbors`` neighbours per item (``top_t`` raised
    to T when T is larger), seeded with ``seed`` when given (the training seed)."""
    top_t = max(int(walk_over.get("top_t", WalkConfig.top_t)), n_neighbors)
    return WalkConfig(**{**walk_over, "top_t": top_t, **({} if seed is None else {"seed": seed})})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["generated", "amazon", "taobao"], required=True)
    ap.add_argument("--data", type=Path, default=Path("..") / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("results") / "quality.json")
    ap.add_argument("--gen-rows", type=int, default=200_000)
    ap.add_argument("--gen-content-dim", type=int, default=0,
                    help="generated data: a dense content vector of this width per item, read by the models")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock training budget per model")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--set", action="append", default=[], help="field=value override of ModelConfig/TrainConfig")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the training (TrainConfig.seed: initial weights, batches) and of the walks")
    ap.add_argument("--walk-set", action="append", default=[], help="field=value override of WalkConfig")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model_over, train_over = overrides(args.set)
    walk_over = overrides(args.walk_set, (WalkConfig,), "--walk-set")[0]
    if args.seed is not None:
        train_over["seed"] = args.seed
    walks = walk_config(walk_over, int(model_over.get("n_neighbors", ModelConfig.n_neighbors)), args.seed)
    started = time.perf_counter()
    load_start = os.getloadavg()
    tables, info = load(args.dataset, args.data, args.gen_rows, args.gen_content_dim)
    content = info.pop("item_content", None)
    result = run(args.dataset, tables, model_over, train_over, args.budget_s, args.models.split(","), walks,
                 content)
    result["walks"] = dataclasses.asdict(walks)
    result.update(info)
    result["machine"] = {"nproc": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                         "platform": platform.platform(), "torch": torch.__version__, "torch_threads": 1}
    result["command"] = " ".join(["python", *sys.argv])
    result["seconds"] = round(time.perf_counter() - started, 1)
    merged = json.loads(args.out.read_text()) if args.out.is_file() else {}
    merged[args.dataset] = result
    write_json_atomic(args.out, merged)
    print(f"wrote {args.out} [{args.dataset}] in {result['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
