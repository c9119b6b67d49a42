"""Quick quality probe before integration: HR@10 of PinSage / GraphSAGE on the Amazon video-games sample.

DGL's protocol (ANCHORS.md): each user's last item = test, second-last = validation (unused here), query = the
latest training item, HR@10 over all items minus the user's training items. Stand-in neighbourhoods (top-10 by
visit count of 100 two-step walks per item) replace gnn.walks until it lands; uniform negatives, no hard ones.
Anchors on this data: popularity 0.019, item-CF 0.086, DGL PinSAGE 0.005-0.009.
Run: ``PYTHONPATH=$PWD python benchmarks/probe_amazon_hr.py --kind pinsage --epochs 3``
-> results/amazon_probe_<kind>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_train_speed import walk_neighborhoods
from gnn.batches import PairBatcher, TrainingPairs
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, csr_from_edges
from gnn.models import ModelConfig, build_model, build_sampler
from gnn.trainer import TrainConfig, Trainer, embed_items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", default="pinsage", choices=["pinsage", "graphsage"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[1].parent / "shared/data/amazon-videogames/Video.txt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    raw = np.loadtxt(args.data, dtype=np.int64)
    u, i = raw[:, 0] - 1, raw[:, 1] - 1
    n_users, n_items = int(u.max()) + 1, int(i.max()) + 1
    pos = np.arange(u.shape[0]) - np.searchsorted(u, u)  # position in the user's time-ordered lines
    length = np.bincount(u)[u]
    test_item, query = np.full(n_users, -1), np.full(n_users, -1)
    test_item[u[pos == length - 1]] = i[pos == length - 1]
    query[u[pos == length - 3]] = i[pos == length - 3]
    users_eval = np.flatnonzero((query >= 0) & (test_item >= 0))
    train = pos < length - 2
    tu, ti, tt = u[train], i[train], pos[train]
    w = np.ones(tu.shape[0], np.float32)
    counts = np.zeros((n_items, 4), np.int64)
    np.add.at(counts[:, 0], ti, 1)
    store = GraphStore(n_users=n_users, n_items=n_items, n_categories=1,
                       user_items=csr_from_edges(tu, ti, w, tt, n_users),
                       item_users=csr_from_edges(ti, tu, w, tt, n_items),
                       item_category=np.zeros(n_items, np.int64), item_counts=counts)
    nb = walk_neighborhoods(store, top=10, walks=100, seed=0)
    same = tu[:-1] == tu[1:]
    pairs = TrainingPairs.from_arrays(ti[:-1][same], ti[1:][same])
    cfg = ModelConfig(kind=args.kind, n_categories=1, id_buckets=1 << 15)
    sampler = build_sampler(cfg, rows=ItemFeatureTable.from_graph_store(store), neighborhoods=nb, store=store)
    batcher = PairBatcher(pairs, sampler, n_items=n_items, batch_size=512, n_negatives=256)
    model = build_model(cfg, seed=0)
    trainer = Trainer(model, batcher, config=TrainConfig(lr=args.lr, margin=args.margin))

    def hit_rate() -> float:
        emb = embed_items(model, sampler, np.arange(n_items), batch_size=2048)
        seen, hits = store.user_items, 0
        for s in range(0, users_eval.shape[0], 4096):
            users = users_eval[s:s + 4096]
            scores = emb[torch.from_numpy(query[users])] @ emb.T  # (U, n_items)
            rows = np.repeat(np.arange(users.shape[0]), np.diff(seen.indptr)[users])
            scores[rows, np.concatenate([seen.row(x) for x in users])] = -9.0
            top = scores.topk(10, dim=1).indices.numpy()
            hits += int((top == test_item[users][:, None]).any(axis=1).sum())
        return hits / users_eval.shape[0]

    epochs = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        rep = trainer.train_epoch()
        epochs.append({"epoch": rep.epoch, "loss": rep.mean_loss, "pairs_per_s": rep.pairs_per_s,
                       "train_s": time.perf_counter() - start, "hr_at_10": hit_rate()})
        print(epochs[-1], flush=True)
    out = Path(f"results/amazon_probe_{args.kind}.json")
    out.parent.mkdir(exist_ok=True)
    report = {"command": " ".join([sys.executable, *sys.argv]), "nproc": os.cpu_count(), "loadavg": os.getloadavg(),
              "users_evaluated": int(users_eval.shape[0]), "model": cfg.to_dict(), "epochs": epochs}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
