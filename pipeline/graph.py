"""Build the graph store from the training split (``pinsage graph``).

Edges: one per (user, item) pair of the training split; its weight aggregates the behaviour weights of the
pair's interactions (``sum`` or ``max``; pv < fav < cart < buy by default 1, 2, 3, 4) and its time is the
pair's latest interaction. Per-item features: category id, interaction counts per behaviour and, when
``content_path`` names a parquet file of ``item_id`` (raw) plus ``c0..c{D-1}`` columns (as ``pinsage
generate --content-dim`` writes), dense content features. Items and users of the whole catalogue are kept
(ids from ingest), so an item without training interactions has an empty row.

Output: ``<run>/graph/`` is a graph store (gnn/graphstore.py), memory-mapped by every reader.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from gnn.graphstore import GraphStore, csr_from_edges, write_graph_store
from pipeline.cluster import cluster_client
from pipeline.common import add_arguments, add_common_arguments, cluster_config, from_sources, settings
from pipeline.config import check
from pipeline.progress import stage_span
from pipeline.rundir import StageOutput, read_stage, run_stage


@dataclass(frozen=True)
class GraphConfig:
    """How the training interactions become weighted edges; see the module docstring."""

    behavior_weights: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    edge_weight: Literal["sum", "max"] = "sum"
    content_path: str | None = None

    def __post_init__(self) -> None:
        w = self.behavior_weights
        check(len(w) == 4, "graph.behavior_weights", w, "needs 4 weights, for pv, fav, cart, buy")
        check(all(x > 0 for x in w), "graph.behavior_weights", w, "weights must be positive")
        if self.content_path is not None:
            check(Path(self.content_path).is_file(), "graph.content_path", self.content_path,
                  "file does not exist; give the .items.parquet that `pinsage generate` wrote")


def _edges(train: dd.DataFrame, cfg: GraphConfig) -> pd.DataFrame:
    """(user, item) pairs with aggregated weight and latest time, computed on the cluster."""
    bw = np.asarray(cfg.behavior_weights, dtype=np.float32)

    def weigh(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"user": df["user"], "item": df["item"],
                             "w": bw[df["behavior"].to_numpy()], "ts": df["ts"]})

    meta = pd.DataFrame({"user": pd.Series(dtype="int64"), "item": pd.Series(dtype="int64"),
                         "w": pd.Series(dtype="float32"), "ts": pd.Series(dtype="int64")})
    weighed = train.map_partitions(weigh, meta=meta)
    n_out = max(1, train.npartitions // 4)
    agg = weighed.groupby(["user", "item"]).agg({"w": cfg.edge_weight, "ts": "max"}, split_out=n_out)
    return agg.compute().reset_index()


def _item_counts(train: dd.DataFrame, n_items: int) -> np.ndarray:
    counts = train.groupby(["item", "behavior"])["user"].count().compute()
    out = np.zeros((n_items, 4), dtype=np.int64)
    idx = counts.index.to_frame(index=False)
    out[idx["item"].to_numpy(), idx["behavior"].to_numpy()] = counts.to_numpy()
    return out


def _content(path: str, items: pd.DataFrame) -> np.ndarray:
    side = pd.read_parquet(path)
    cols = [c for c in side.columns if c.startswith("c") and c[1:].isdigit()]
    if "item_id" not in side.columns or not cols:
        raise ValueError(f"{path}: needs an item_id column and content columns c0, c1, ...")
    cols.sort(key=lambda c: int(c[1:]))
    table = side.set_index("item_id")[cols]
    missing = ~items["raw_item"].isin(table.index)
    if missing.any():
        raise ValueError(f"{path}: no content row for {int(missing.sum())} items (e.g. raw id "
                         f"{items['raw_item'][missing].iloc[0]}); regenerate the side file with the data")
    return table.loc[items["raw_item"].to_numpy()].to_numpy(dtype=np.float32)


def build_graph_store(train: dd.DataFrame, users: pd.DataFrame, items: pd.DataFrame,
                      n_categories: int, cfg: GraphConfig) -> GraphStore:
    """The graph store of ``train`` (interactions schema) over the catalogue ``users`` / ``items``."""
    n_users, n_items = len(users), len(items)
    e = _edges(train, cfg)
    u, i = e["user"].to_numpy(), e["item"].to_numpy()
    w, t = e["w"].to_numpy(np.float32), e["ts"].to_numpy(np.int64)
    category = items.sort_values("item")["category"].to_numpy(np.int64)
    return GraphStore(
        n_users=n_users,
        n_items=n_items,
        n_categories=n_categories,
        user_items=csr_from_edges(u, i, w, t, n_users),
        item_users=csr_from_edges(i, u, w, t, n_items),
        item_category=category,
        item_counts=_item_counts(train, n_items),
        item_content=_content(cfg.content_path, items.sort_values("item")) if cfg.content_path else None,
        behavior_weights=tuple(float(x) for x in cfg.behavior_weights),
    )


def build_graph(run_dir: str | Path, cfg: GraphConfig, client: Client, *, force: bool = False) -> StageOutput:
    """Build ``<run>/graph`` from ``<run>/split/train.parquet`` and the ingest mappings."""
    ingest = read_stage(run_dir, "ingest")
    split_out = read_stage(run_dir, "split")
    inputs: dict[str, Any] = {"ingest": ingest, "split": split_out}
    if cfg.content_path:
        inputs["content"] = cfg.content_path

    def build(out: Path) -> dict[str, Any]:
        with stage_span("graph"):
            train = dd.read_parquet(split_out.path / "train.parquet", columns=["user", "item", "behavior", "ts"])
            users = pd.read_parquet(ingest.path / "users.parquet")
            items = pd.read_parquet(ingest.path / "items.parquet")
            n_categories = len(pd.read_parquet(ingest.path / "categories.parquet"))
            store = build_graph_store(train, users, items, n_categories, cfg)
            write_graph_store(out, store)
            deg_i, deg_u = store.item_users.degree(), store.user_items.degree()
            return {
                "n_users": store.n_users,
                "n_items": store.n_items,
                "n_categories": store.n_categories,
                "n_edges": store.n_edges,
                "items_without_edges": int((deg_i == 0).sum()),
                "users_without_edges": int((deg_u == 0).sum()),
                "max_item_degree": int(deg_i.max(initial=0)),
                "max_user_degree": int(deg_u.max(initial=0)),
                "content_dim": 0 if store.item_content is None else int(store.item_content.shape[1]),
            }

    return run_stage(run_dir, "graph", config=cfg, inputs=inputs, build=build, force=force)


def _cmd(args: argparse.Namespace) -> int:
    toml = settings(args)
    cfg = from_sources(GraphConfig, toml=toml, section="graph", args=args)
    with cluster_client(cluster_config(args, toml)) as (client, _):
        out = build_graph(args.run_dir, cfg, client, force=args.force)
    r = out.report
    print(f"graph: {r['n_users']} users, {r['n_items']} items, {r['n_edges']} edges -> {out.path}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("graph", help="build the memory-mapped CSR graph store from the training split")
    add_common_arguments(p)
    add_arguments(p, GraphConfig)
    p.set_defaults(func=_cmd)
