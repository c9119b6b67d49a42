"""Node classification with supervised GraphSAGE-mean (S1=25, S2=10) on Cora and CiteSeer -> results/cora.json.

Split: 20 labelled nodes per class for training, 500 validation, 1000 test, drawn at random per seed (the
protocol of Shchur et al. 2018, where GraphSAGE-mean reaches 0.79-0.82 on Cora). Side by side: a features-only
logistic regression on the same splits (what the graph adds). Run from the repository root:
``PYTHONPATH=$PWD python benchmarks/bench_cora.py [--seeds 5] [--data ../shared/data]``.
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
import torch
import torch.nn.functional as F

from gnn.nodeclf import NodeClfConfig, NodeDataset, Split, f1_scores, load_npz, random_split, train_node_classifier


def logistic_regression(data: NodeDataset, split: Split, seed: int) -> tuple[float, float]:
    """Features-only baseline: softmax regression on row-normalised features, best validation epoch."""
    feats = data.features / np.maximum(data.features.sum(axis=1, keepdims=True), 1e-12)
    x, y = torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(data.labels)
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], data.n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    tr, va, te = (torch.from_numpy(s) for s in (split.train, split.val, split.test))
    best = (-1.0, (0.0, 0.0))
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(F.dropout(x[tr], 0.5)), y[tr]).backward()
        opt.step()
        with torch.no_grad():
            pred = model(x).argmax(dim=1).numpy()
        val = f1_scores(data.labels[va.numpy()], pred[va.numpy()], data.n_classes)[0]
        if val > best[0]:
            best = (val, f1_scores(data.labels[te.numpy()], pred[te.numpy()], data.n_classes))
    return best[1]


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(np.min(values)),
            "max": float(np.max(values))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("results/cora.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    load_before = os.getloadavg()
    config = NodeClfConfig(num_threads=args.threads)
    report: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]), "nproc": os.cpu_count(), "torch_threads": args.threads,
        "loadavg_before": load_before, "platform": platform.platform(), "torch": torch.__version__,
        "split": "random per seed: 20 per class train / 500 val / 1000 test; best validation epoch kept",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
        "published": {"cora_graphsage_mean_accuracy": "0.79-0.82 (Shchur et al. 2018, random splits)"},
        "datasets": {},
    }
    for name in ("cora", "citeseer"):
        path = args.data / "cora" / f"{name}.npz"  # both files live in the cora folder
        if not path.is_file():
            print(f"skip {name}: {path} is absent")
            continue
        data = load_npz(path)
        runs, lr_runs = [], []
        for seed in range(args.seeds):
            split = random_split(data.labels, seed=seed)
            start = time.perf_counter()
            res = train_node_classifier(data, split, NodeClfConfig(**{**config.__dict__, "seed": seed}))
            runs.append({"seed": seed, "test_micro_f1": res.test_micro_f1, "test_macro_f1": res.test_macro_f1,
                         "val_micro_f1": res.val_micro_f1, "best_epoch": res.best_epoch,
                         "seconds": time.perf_counter() - start})
            lr_runs.append(logistic_regression(data, split, seed))
            print(f"{name} seed {seed}: GraphSAGE-mean micro-F1 {res.test_micro_f1:.3f} macro-F1 "
                  f"{res.test_macro_f1:.3f} | features-only LR micro-F1 {lr_runs[-1][0]:.3f}", flush=True)
        report["datasets"][name] = {
            "n_nodes": data.n_nodes, "n_edges_undirected": int(data.indices.shape[0] // 2),
            "graphsage_mean": {"test_micro_f1": summary([r["test_micro_f1"] for r in runs]),
                               "test_macro_f1": summary([r["test_macro_f1"] for r in runs]),
                               "runs": runs},
            "features_only_logreg": {"test_micro_f1": summary([r[0] for r in lr_runs]),
                                     "test_macro_f1": summary([r[1] for r in lr_runs])},
        }
    report["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
