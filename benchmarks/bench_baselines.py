"""Baseline recommenders under protocols (A) and (B) on the real samples, side by side with the reference figures.

Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/bench_baselines.py [--data ../shared/data] [--out results/baselines.json]

Amazon video games (SASRec format, no timestamps; order = time): protocol (B) HR@10 for each baseline, by our
exact tie-aware ranking and by a DGL-style ``topk`` over the masked scores (arbitrary tie order), next to the
ANCHORS.md calibration; then protocol (A) with a leave-last-out temporal split (valid = second-last item,
test = last). Taobao head (43 users): protocol (A) with the last day as test and the day before as valid, and (B).
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

import numpy as np
import pandas as pd
import torch

from gnn.baselines import Scorer, cooccurrence, item_cf
from gnn.evaluation import LeaveLastOut, baseline_factories, evaluate_leave_last_out, leave_last_out
from pipeline.evaluate import EvalConfig, evaluate_tables, format_table
from pipeline.schema import BEHAVIOR_CODES, INTERACTION_COLUMNS, TAOBAO_WINDOW

REFERENCE_B_VALID = {"random": 0.0004, "popularity": 0.019, "itemcf": 0.086, "cooccurrence": 0.088}
DAY = 86_400
BEIJING = 8 * 3600


def read_amazon(path: Path) -> pd.DataFrame:
    """Interactions table of the SASRec-format file: 0-based ids, ts = position in the user's sequence."""
    df = pd.read_csv(path, sep=" ", header=None, names=["user", "item"], dtype=np.int64)
    df["user"] -= 1
    df["item"] -= 1
    df["category"] = 0
    df["behavior"] = 0
    df["ts"] = df.groupby("user").cumcount().astype(np.int64)
    df["line"] = np.arange(1, len(df) + 1, dtype=np.int64)
    return df[list(INTERACTION_COLUMNS)]


def read_taobao(path: Path) -> pd.DataFrame:
    """Interactions table of a Taobao-format CSV (ids factorised in sorted raw order, rows in the valid window)."""
    raw = pd.read_csv(path, header=None, names=["u", "i", "c", "b", "t"],
                      dtype={"u": np.int64, "i": np.int64, "c": np.int64, "b": str, "t": np.int64})
    raw["line"] = np.arange(1, len(raw) + 1, dtype=np.int64)
    raw = raw[(raw["t"] >= TAOBAO_WINDOW[0]) & (raw["t"] < TAOBAO_WINDOW[1])]
    out = pd.DataFrame({
        "user": pd.factorize(raw["u"], sort=True)[0].astype(np.int64),
        "item": pd.factorize(raw["i"], sort=True)[0].astype(np.int64),
        "category": pd.factorize(raw["c"], sort=True)[0].astype(np.int64),
        "behavior": raw["b"].map(BEHAVIOR_CODES).astype(np.int8),
        "ts": raw["t"].astype(np.int64),
        "line": raw["line"],
    })
    return out


def split_last_n(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per user: last row = test, second-last = valid (users with >= 3 rows), the rest train."""
    df = df.sort_values(["user", "ts", "line"], kind="stable")
    from_end = df.groupby("user").cumcount(ascending=False).to_numpy()
    length = df.groupby("user")["item"].transform("size").to_numpy()
    test = (from_end == 0) & (length > 1)
    valid = (from_end == 1) & (length > 2)
    return {"train": df[~test & ~valid], "valid": df[valid], "test": df[test]}


def split_last_days(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The last (Beijing) day = test, the day before = valid, the rest train."""
    day = (df["ts"] + BEIJING) // DAY
    last = int(day.max())
    return {"train": df[day < last - 1], "valid": df[day == last - 1], "test": df[day == last]}


def topk_hr(scorer: Scorer, split: LeaveLastOut, target: str, k: int = 10, block: int = 1024) -> dict[str, float]:
    """Reference: DGL-style HR@k — mask the training items, ``torch.topk``, hit if the target is among them."""
    started = time.perf_counter()
    goal = split.valid if target == "valid" else split.test
    users = np.flatnonzero((goal >= 0) & (split.train.lengths() > 0))
    hits = 0
    for lo in range(0, users.shape[0], block):
        u = users[lo : lo + block]
        s = torch.from_numpy(np.array(scorer.score_items(split.train.last_items(u)), dtype=np.float32))
        r, i = split.train.rows(u)
        s[torch.from_numpy(r), torch.from_numpy(i)] = -torch.inf
        top = s.topk(k, dim=1).indices.numpy()
        hits += int((top == goal[u][:, None]).any(1).sum())
    return {"hit@10": hits / max(users.shape[0], 1), "seconds": round(time.perf_counter() - started, 3)}


def amazon_protocol_b(df: pd.DataFrame) -> dict[str, Any]:
    n_users, n_items = int(df["user"].max()) + 1, int(df["item"].max()) + 1
    split = leave_last_out(df["user"].to_numpy(), df["item"].to_numpy(), n_users=n_users, n_items=n_items,
                           order=(df["line"].to_numpy(),))
    factories = dict(baseline_factories(seed=0))
    variants = {
        "itemcf_no_tiebreak": lambda h: item_cf(h, popularity_tiebreak=False),
        "cooccurrence_no_tiebreak": lambda h: cooccurrence(h, popularity_tiebreak=False),
        "cooccurrence_cosine": lambda h: cooccurrence(h, normalize="cosine"),
        "cooccurrence_window3": lambda h: cooccurrence(h, window=3),
    }
    out: dict[str, Any] = {}
    for name, factory in {**factories, **variants}.items():
        t = time.perf_counter()
        scorer = factory(split.train)
        row: dict[str, Any] = {"build_seconds": round(time.perf_counter() - t, 3),
                               "reference_valid_hr@10": REFERENCE_B_VALID.get(name)}
        for target in ("valid", "test"):
            ours = evaluate_leave_last_out(scorer, split, target=target, ks=(10,))
            row[target] = {"ours_expected_ties": ours, "dgl_style_topk": topk_hr(scorer, split, target)}
        out[name] = row
        print(f"amazon B {name:26s} valid {row['valid']['ours_expected_ties']['hit@10']:.4f} "
              f"(topk {row['valid']['dgl_style_topk']['hit@10']:.4f}, ref {row['reference_valid_hr@10']}) "
              f"test {row['test']['ours_expected_ties']['hit@10']:.4f}  "
              f"eval {row['valid']['ours_expected_ties']['seconds']:.1f}s", flush=True)
    return out


def protocol_a(tables: dict[str, pd.DataFrame], cfg: EvalConfig, label: str) -> dict[str, Any]:
    t = time.perf_counter()
    report = evaluate_tables(tables, cfg)
    report["wall_seconds"] = round(time.perf_counter() - t, 3)
    print(f"\n== {label} ({report['wall_seconds']:.1f}s)\n{format_table(report)}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("..") / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("results") / "baselines.json")
    ap.add_argument("--max-users", type=int, default=None, help="sample users per protocol (default all)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"nproc": os.cpu_count(), "loadavg_start": os.getloadavg(), "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "ties": "ours: expected value under random tie-breaking; dgl_style_topk: torch.topk's arbitrary order",
    }
    amazon_path = args.data / "amazon-videogames" / "Video.txt"
    taobao_path = args.data / "taobao" / "UserBehavior-head.csv"
    if amazon_path.is_file():
        amazon = read_amazon(amazon_path)
        result["amazon"] = {"rows": len(amazon), "protocol_b": amazon_protocol_b(amazon)}
        cfg = EvalConfig(window_s=None, protocol_b=False, max_users=args.max_users, max_queries=args.max_users)
        result["amazon"]["protocol_a_leave_last_out"] = protocol_a(split_last_n(amazon), cfg, "amazon, protocol A")
    if taobao_path.is_file():
        taobao = read_taobao(taobao_path)
        cfg = EvalConfig(max_users=args.max_users, max_queries=args.max_users)
        result["taobao_head"] = {"rows": len(taobao), "users": int(taobao["user"].nunique()),
                                 "items": int(taobao["item"].nunique()),
                                 "protocol_a_last_day": protocol_a(split_last_days(taobao), cfg,
                                                                   "taobao head, protocol A (last day) + B")}
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - started, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out} in {result['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
