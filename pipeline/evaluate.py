"""The ``evaluate`` stage: every model (GNN embeddings + baselines) ranked by the same code on the same split.

Reads ``<run>/split/{train,valid,test}.parquet`` (interactions schema, pipeline/schema.py) and, when present,
the item embeddings ``<run>/train/embeddings.npy`` — the file contract: a ``(n_items, D)`` float32 ``.npy``
whose row ``i`` is the embedding of contiguous item id ``i`` (``embeddings_path`` overrides the location).
Writes ``<run>/evaluate/report.json`` (every figure) and prints a table. Run: ``pinsage evaluate --run-dir R``.

Protocols (gnn/evaluation.py): (A) temporal hold-out, item→item and user→item at K in ``ks``, on the
``valid`` split (context = train) and the ``test`` split (context = train + valid); (B) DGL's PinSAGE-example
leave-last-out on the whole table (train + valid + test in time order), HR@10. Baselines are always fitted on
the training rows of the protocol they are scored in; the GNN was trained on the temporal train split, so its
protocol (B) figure can see some (B) targets in training: ``protocol_b.<target>.targets_in_train`` counts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from gnn.baselines import EmbeddingScorer, Histories, Scorer
from gnn.evaluation import (
    baseline_factories,
    evaluate_item_to_item,
    evaluate_leave_last_out,
    evaluate_user_to_item,
    leave_last_out,
)
from gnn.pairs import DEFAULT_WINDOW_S, EvalPairs, holdout_pairs
from pipeline.common import add_arguments, add_common_arguments, from_sources, settings
from pipeline.config import check
from pipeline.rundir import StageOutput, read_stage, run_stage, write_json_atomic
from pipeline.schema import EMBEDDINGS_NPY, INTERACTION_COLUMNS, query_embeddings_beside

log = logging.getLogger(__name__)

STAGE = "evaluate"
REPORT = "report.json"
EMBEDDINGS = Path("train") / EMBEDDINGS_NPY  # default location, relative to the run directory
BASELINES = ("random", "popularity", "itemcf", "cooccurrence")
HOLDOUTS = ("valid", "test")
UserMode = Literal["last", "recent_sum", "recent_mean"]


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the evaluate stage (TOML section ``[evaluate]``)."""

    ks: tuple[int, ...] = field(default=(10, 50, 100), metadata={"help": "cut-offs K of the @K metrics"})
    holdouts: tuple[str, ...] = field(default=HOLDOUTS, metadata={"help": "split files scored in protocol A"})
    window_s: int | None = field(default=DEFAULT_WINDOW_S, metadata={
        "help": "largest gap in seconds between an item→item query and its held-out positive; none = no limit"})
    exclude_seen_item_to_item: bool = field(default=False, metadata={
        "help": "item→item: exclude the user's context items as candidates (and drop pairs re-visiting one)"})
    baselines: tuple[str, ...] = field(default=BASELINES, metadata={"help": "baselines to score"})
    cooc_normalize: Literal["count", "cosine"] = field(default="count", metadata={
        "help": "co-occurrence scores: raw user counts or cosine-normalised"})
    cooc_window: int | None = field(default=None, metadata={
        "help": "co-occurrence within this many sequence positions; none = anywhere in the user's history"})
    popularity_tiebreak: bool = field(default=True, metadata={
        "help": "order equal item-CF / co-occurrence counts by popularity instead of tying them"})
    user_mode: UserMode = field(default="last", metadata={
        "help": "user→item query of every model: the last item, or the sum / mean over the recent items"})
    recent: int = field(default=10, metadata={"help": "recent items used by the recent_* user modes"})
    embeddings_path: str | None = field(default=None, metadata={
        "help": "item embeddings .npy (n_items, D); default <run>/train/embeddings.npy when it exists"})
    protocol_b: bool = field(default=True, metadata={"help": "also run DGL's leave-last-out HR@10 protocol"})
    max_queries: int | None = field(default=200_000, metadata={
        "help": "item→item pairs per holdout (a seeded sample above this); none = all"})
    max_users: int | None = field(default=50_000, metadata={
        "help": "users per holdout and protocol (a seeded sample above this); none = all"})
    seed: int = field(default=0, metadata={"help": "seed of the samples and of the random baseline"})
    block_size: int = field(default=1024, metadata={"help": "queries or users scored per block"})

    def __post_init__(self) -> None:
        check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "evaluate.ks", self.ks,
              "pass positive cut-offs, e.g. 10,50,100")
        check(all(h in HOLDOUTS for h in self.holdouts), "evaluate.holdouts", self.holdouts,
              f"choose among {', '.join(HOLDOUTS)}")
        check(self.window_s is None or self.window_s >= 0, "evaluate.window_s", self.window_s,
              "pass seconds >= 0 or none")
        check(all(b in BASELINES for b in self.baselines), "evaluate.baselines", self.baselines,
              f"choose among {', '.join(BASELINES)}")
        check(self.cooc_window is None or self.cooc_window >= 1, "evaluate.cooc_window", self.cooc_window,
              "pass a number of positions >= 1 or none")
        check(self.recent >= 1, "evaluate.recent", self.recent, "pass 1 or more")
        for name in ("max_queries", "max_users"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"evaluate.{name}", v, "pass a positive count or none")
        check(self.block_size >= 1, "evaluate.block_size", self.block_size, "pass a positive block size")


def _read_split(split: StageOutput) -> dict[str, pd.DataFrame]:
    tables = {}
    for name in ("train", "valid", "test"):
        path = split.path / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: re-run `pinsage split` for this run directory")
        df = pd.read_parquet(path)
        missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path} lacks column {missing[0]!r}: the split must write the interactions schema "
                             "(pipeline/schema.py)")
        tables[name] = df
    return tables


def load_embeddings(path: Path, n_items: int) -> np.ndarray:
    """The ``(n_items, D)`` float32 embedding matrix at ``path``, validated against the item count."""
    emb = np.load(path, allow_pickle=False)
    if emb.ndim != 2 or emb.shape[0] < n_items:
        raise ValueError(f"{path}: embeddings have shape {emb.shape}; expected ({n_items} or more items, D), "
                         "one row per contiguous item id")
    return np.ascontiguousarray(emb, dtype=np.float32)


def _sample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``limit`` out of ``n`` (all when ``limit`` is None or >= n)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _scorers(cfg: EvalConfig, train: Histories, embeddings: np.ndarray | None,
             extra: Mapping[str, Scorer] | None = None, queries: np.ndarray | None = None) -> dict[str, Scorer]:
    factories = baseline_factories(seed=cfg.seed, cooc_normalize=cfg.cooc_normalize, cooc_window=cfg.cooc_window,
                                   popularity_tiebreak=cfg.popularity_tiebreak, user_mode=cfg.user_mode,
                                   recent=cfg.recent)
    out: dict[str, Scorer] = {name: factories[name](train) for name in cfg.baselines}
    if embeddings is not None:
        out["gnn"] = EmbeddingScorer(embeddings[: train.n_items], user_mode=cfg.user_mode, recent=cfg.recent,
                                     query_embeddings=None if queries is None else queries[: train.n_items])
    return {**out, **(extra or {})}


def _subset(pairs: EvalPairs, keep: np.ndarray) -> EvalPairs:
    return EvalPairs(pairs.user[keep], pairs.query[keep], pairs.positive[keep], pairs.query_from_holdout[keep])


def evaluate_tables(tables: dict[str, pd.DataFrame], cfg: EvalConfig, embeddings: np.ndarray | None = None,
                    extra_scorers: Mapping[str, Scorer] | None = None,
                    query_embeddings: np.ndarray | None = None) -> dict[str, Any]:
    """All protocols for all models on in-memory split tables (``train``, ``valid``, ``test``); the report.
    ``extra_scorers``: further models by name, scored like the rest; ``query_embeddings``: the query side of
    ``embeddings`` (a model with a query head, ``gnn.trainer.query_side``), default the embeddings."""
    started = time.perf_counter()
    everything = pd.concat([tables[n] for n in ("train", "valid", "test")], ignore_index=True)
    n_users = int(everything["user"].max()) + 1 if len(everything) else 0
    n_items = int(everything["item"].max()) + 1 if len(everything) else 0
    if embeddings is not None and embeddings.shape[0] < n_items:
        raise ValueError(f"embeddings have {embeddings.shape[0]} rows but the split holds {n_items} items: "
                         "write one row per contiguous item id")
    hist = {n: Histories.from_interactions(tables[n], n_users=n_users, n_items=n_items) for n in tables}
    report: dict[str, Any] = {
        "data": {"n_users": n_users, "n_items": n_items, **{f"n_{n}": len(t) for n, t in tables.items()}},
        "ties": "expected value under uniformly random tie-breaking (gnn/metrics.py)",
        "config": dataclasses.asdict(cfg),
        "protocol_a": {},
    }
    scorers = _scorers(cfg, hist["train"], embeddings, extra_scorers, query_embeddings)
    for h in cfg.holdouts:
        context_df = tables["train"] if h == "valid" else pd.concat([tables["train"], tables["valid"]])
        context = hist["train"] if h == "valid" else Histories.from_interactions(
            context_df, n_users=n_users, n_items=n_items)
        pairs = holdout_pairs(context_df, tables[h], window_s=cfg.window_s)
        pairs = _subset(pairs, _sample(len(pairs), cfg.max_queries, cfg.seed))
        users = np.flatnonzero(hist[h].lengths() > 0)
        users = users[_sample(users.shape[0], cfg.max_users, cfg.seed)]
        part: dict[str, Any] = {"n_pairs": len(pairs), "n_users": int(users.shape[0]),
                                "item_to_item": {}, "user_to_item": {}}
        for name, scorer in scorers.items():
            part["item_to_item"][name] = evaluate_item_to_item(
                scorer, pairs, ks=cfg.ks, block_size=cfg.block_size,
                exclude_seen=context if cfg.exclude_seen_item_to_item else None)
            part["user_to_item"][name] = evaluate_user_to_item(
                scorer, context, hist[h], ks=cfg.ks, block_size=cfg.block_size, users=users)
            log.info("protocol A %s %s: %s", h, name, part["item_to_item"][name])
        report["protocol_a"][h] = part
    if cfg.protocol_b:
        report["protocol_b"] = _protocol_b(everything, cfg, n_users, n_items, hist["train"], embeddings,
                                           extra_scorers, query_embeddings)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _protocol_b(everything: pd.DataFrame, cfg: EvalConfig, n_users: int, n_items: int, temporal_train: Histories,
                embeddings: np.ndarray | None, extra: Mapping[str, Scorer] | None = None,
                queries: np.ndarray | None = None) -> dict[str, Any]:
    split = leave_last_out(everything["user"].to_numpy(), everything["item"].to_numpy(), n_users=n_users,
                           n_items=n_items, order=(everything["line"].to_numpy(), everything["ts"].to_numpy()))
    scorers = _scorers(cfg, split.train, embeddings, extra, queries)
    out: dict[str, Any] = {}
    for target in ("valid", "test"):
        goal = split.valid if target == "valid" else split.test
        with_goal = np.flatnonzero(goal >= 0)
        users = with_goal[_sample(with_goal.shape[0], cfg.max_users, cfg.seed)]
        # how many (B) targets the temporal train split (the GNN's training data) already holds for the user
        row, item = temporal_train.rows(users)
        in_train = int(np.unique(row[item == goal[users][row]]).shape[0])
        out[target] = {"targets_in_train": in_train, "n_users": int(users.shape[0]), "models": {
            name: evaluate_leave_last_out(s, split, target=target, ks=(10,), block_size=cfg.block_size, users=users)
            for name, s in scorers.items()}}
    return out


def _table(title: str, rows: dict[str, dict[str, float]], columns: list[str]) -> list[str]:
    width = max([len("model"), *map(len, rows)])
    head = "model".ljust(width) + "".join(f"  {c:>9}" for c in columns)
    lines = [title, head, "-" * len(head)]
    for model, values in rows.items():
        cells = "".join(f"  {values[c]:>9.4f}" if c in values else f"  {'-':>9}" for c in columns)
        lines.append(model.ljust(width) + cells)
    return lines


def _model_order(names: list[str]) -> list[str]:
    return [n for n in BASELINES if n in names] + sorted(n for n in names if n not in BASELINES)


def format_table(report: dict[str, Any]) -> str:
    """Plain-text tables of the headline figures: per holdout of protocol A, and protocol B; a row per model."""
    ks = list(report["config"]["ks"])
    k = min(ks)
    lines: list[str] = []
    for h, part in report.get("protocol_a", {}).items():
        i2i, u2i = part["item_to_item"], part["user_to_item"]
        names = {**{f"i2i hit@{kk}": ("i2i", f"hit@{kk}") for kk in ks}, "i2i mrr": ("i2i", "mrr"),
                 f"P@{k}": ("u2i", f"precision@{k}"), f"R@{k}": ("u2i", f"recall@{k}"),
                 f"NDCG@{k}": ("u2i", f"ndcg@{k}"), f"u2i hit@{k}": ("u2i", f"hit@{k}")}
        source = {"i2i": i2i, "u2i": u2i}
        # a holdout without pairs or users has no averages: those cells print "-"
        rows = {m: {col: source[kind][m][metric] for col, (kind, metric) in names.items()
                    if metric in source[kind].get(m, {})} for m in _model_order(list(i2i))}
        cols = [*(f"i2i hit@{kk}" for kk in ks), "i2i mrr", f"P@{k}", f"R@{k}", f"NDCG@{k}", f"u2i hit@{k}"]
        title = (f"protocol A, holdout {h}: {part['n_pairs']} item→item pairs, "
                 f"{next(iter(u2i.values()))['n_evaluated'] if u2i else 0} users")
        lines += [*_table(title, rows, cols), ""]
    if "protocol_b" in report:
        b = report["protocol_b"]
        models = _model_order(sorted({m for part in b.values() for m in part["models"]}))
        rows = {m: {f"HR@10 {t}": part["models"][m]["hit@10"] for t, part in b.items()
                    if "hit@10" in part["models"].get(m, {})}
                for m in models}
        lines += _table("protocol B (DGL leave-last-out, query = last training item)", rows,
                        [f"HR@10 {t}" for t in b])
    return "\n".join(lines).rstrip()


def evaluate(run_dir: str | Path, cfg: EvalConfig | None = None, embeddings: np.ndarray | None = None, *,
             force: bool = False) -> StageOutput:
    """Run the evaluate stage in ``run_dir`` (atomic, resumable).

    ``embeddings`` (n_items, D): score these instead of the file (the stage then always re-runs, since an
    in-memory array has no fingerprint). Otherwise ``cfg.embeddings_path`` or ``<run>/train/embeddings.npy``
    is used when it exists; without embeddings only the baselines are scored. A ``query_embeddings.npy``
    beside the embeddings file (the query head's side, ``gnn.trainer.query_side``) is used for the queries.
    """
    cfg = cfg or EvalConfig()
    run = Path(run_dir)
    split = read_stage(run, "split")
    inputs: dict[str, StageOutput | str | Path] = {"split": split}
    emb_path = Path(cfg.embeddings_path) if cfg.embeddings_path else run / EMBEDDINGS
    if cfg.embeddings_path and not emb_path.is_file():
        raise FileNotFoundError(f"embeddings_path={cfg.embeddings_path}: no such file; pass an (n_items, D) .npy")
    query_path = None
    if embeddings is None and emb_path.is_file():
        inputs["embeddings"] = emb_path
        query_path = query_embeddings_beside(emb_path)
        if query_path is not None:
            inputs["query_embeddings"] = query_path

    def build(tmp: Path) -> dict[str, Any]:
        tables = _read_split(split)
        emb = embeddings
        queries: np.ndarray | None = None
        if emb is None and "embeddings" in inputs:
            n_items = max(int(t["item"].max()) + 1 if len(t) else 0 for t in tables.values())
            emb = load_embeddings(emb_path, n_items)
            if "query_embeddings" in inputs:
                assert query_path is not None  # "query_embeddings" is an input only when it was found
                queries = load_embeddings(query_path, n_items)
        report = evaluate_tables(tables, cfg, None if emb is None else np.asarray(emb, dtype=np.float32),
                                 query_embeddings=queries)
        report["embeddings"] = None if emb is None else ("in-memory" if embeddings is not None else str(emb_path))
        write_json_atomic(tmp / REPORT, report)
        return _headline(report)

    return run_stage(run, STAGE, config=cfg, inputs=inputs, build=build, force=force or embeddings is not None)


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The small summary kept in the manifest: test (or last holdout) hit@10/recall@10 and protocol B."""
    out: dict[str, Any] = {"seconds": report["seconds"], "embeddings": report.get("embeddings")}
    k = min(report["config"]["ks"])
    for h, part in report.get("protocol_a", {}).items():
        out[f"a_{h}_i2i_hit@{k}"] = {m: round(v[f"hit@{k}"], 5) for m, v in part["item_to_item"].items()}
        out[f"a_{h}_u2i_recall@{k}"] = {m: round(v[f"recall@{k}"], 5) for m, v in part["user_to_item"].items()}
    for target, part in report.get("protocol_b", {}).items():
        out[f"b_{target}_hr@10"] = {m: round(v["hit@10"], 5) for m, v in part["models"].items()}
    return out


def read_report(run_dir: str | Path) -> dict[str, Any]:
    """The full JSON report of a finished evaluate stage."""
    import json

    return dict(json.loads((read_stage(run_dir, STAGE).path / REPORT).read_text()))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(STAGE, help="rank items with every model and baseline; report hit@K, MRR, "
                                               "precision/recall/F1/NDCG@K", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, cluster=False)
    add_arguments(parser, EvalConfig)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = from_sources(EvalConfig, toml=settings(args), section=STAGE, args=args)
    out = evaluate(args.run_dir, cfg, force=args.force)
    print(format_table(read_report(args.run_dir)))
    print(f"report: {out.path / REPORT}" + (" (up to date, not recomputed)" if out.reused else ""))
    return 0
