"""Writes notebooks/02_train_infer_recommend.ipynb (cells kept here so that diffs stay readable)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS: list[tuple[str, str]] = [
    ("md", """# PinSage++: train, infer, evaluate and recommend

Runs the whole pipeline through the Python API on a local Dask cluster of two workers: generate → ingest → split →
graph → walks → partition → distributed training (one rank per worker, remote rows through the importance cache)
→ map-reduce inference → evaluation against the baselines → top-K recommendations. Then it looks inside: loss and
cache statistics per worker, map-reduce vs the trainer's embeddings, the evaluation tables, and recommendations.
Open the dashboard link to watch the stages. Set `PINSAGE_RUN_DIR` to choose where outputs go."""),
    ("code", """import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cluster import ClusterConfig, make_client
from pipeline.recommend import RecommendConfig, read_recommendations, top_k_items
from pipeline.run import RunConfig, run_pipeline

SMALL = os.environ.get("PINSAGE_NOTEBOOK_SMALL") == "1"   # the test suite runs this notebook on tiny data
ROWS = 20_000 if SMALL else 400_000
RUN = Path(os.environ.get("PINSAGE_RUN_DIR", "runs/notebook-02"))
# [train] settings as a TOML section would give them; the tiny run trains a few steps only
TOML = {"train": {"epochs": 1, "steps_per_epoch": 6, "batch_size": 128}} if SMALL else {}
client, backend = make_client(ClusterConfig(n_workers=2, dashboard_address="127.0.0.1:0"))
print("backend:", backend, "| dashboard:", client.dashboard_link)"""),
    ("md", "## 1. The whole pipeline"),
    ("code", """report = run_pipeline(RUN, RunConfig(rows=ROWS, seed=3), client, backend, toml=TOML)
pd.DataFrame({name: {"reused": s["reused"], "path": s["path"]} for name, s in report["stages"].items()}).T"""),
    ("md", "## 2. Training: loss, throughput and the remote-row cache per worker"),
    ("code", """train = json.loads((RUN / "train" / "report.json").read_text())
per_worker = pd.DataFrame([{"rank": w["rank"], "items": w["n_items"], "pairs": w["n_pairs"],
                            "hit rate": w["cache"]["hit_rate"], "remote MB": w["transport"]["total"]["bytes"] / 1e6}
                           for w in train["per_worker"]]).set_index("rank")
print("epochs:", [(e["epoch"], round(e["mean_loss"], 4)) for e in train["epochs"]])
per_worker"""),
    ("md", "## 3. Map-reduce inference equals the trainer's forward pass"),
    ("code", """trained = np.load(RUN / "train" / "embeddings.npy")
inferred = np.load(RUN / "infer" / "embeddings.npy")
gap = np.abs(inferred - trained).max()
print(f"{inferred.shape[0]} items x {inferred.shape[1]}; max |map-reduce - trainer| = {gap:.2e}")"""),
    ("md", "## 4. Evaluation: the GNN beside popularity, item-CF and co-occurrence"),
    ("code", """ev = json.loads((RUN / "evaluate" / "report.json").read_text())
i2i = pd.DataFrame(ev["protocol_a"]["test"]["item_to_item"]).T[["hit@10", "hit@50", "mrr"]]
i2i["hit@10"].sort_values().plot.barh(title="item→item hit@10 (test)")
i2i"""),
    ("md", "## 5. Recommendations: the stage's output, and the same from Python for a few items"),
    ("code", """items = read_recommendations(RUN, "items")
users = read_recommendations(RUN, "users")
print(len(items), "item→item rows,", len(users), "user→item rows")
items.head(10)"""),
    ("code", """few = top_k_items(inferred, RecommendConfig(k=5), items=np.arange(3))
few"""),
    ("code", """client.close()
if client.cluster is not None:
    client.cluster.close()"""),
]


def main() -> None:
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = Path(__file__).resolve().parents[1] / "notebooks" / "02_train_infer_recommend.ipynb"
    nbformat.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
