"""``pinsage update PATH``: append new interactions to a run's live graph (ARCHITECTURE.md, decision 7).

The file is parsed and validated exactly as ``pinsage ingest`` does (:func:`pipeline.loaders.parse_block`, the run's
ingest settings: format, window, duplicates); rejected lines are counted by reason and reported (with
``on_bad_rows="error"`` the first one stops the command, naming ``path:line``). Raw ids are mapped with the run's
ingest mappings; unknown users, items and categories get the next free ids, and their raw ids travel in the log
record so that later updates map them the same way. Interactions of a format without timestamps get times after the
latest one in the graph, in line order per user.

The batch is appended to ``<run>/live/updates.log`` (framed, checksummed, fsync'ed: :mod:`gnn.updatelog`) under the
log's writer lock; the command returns once the record is durable — the update is then acknowledged. A serving
process holding a :class:`gnn.evolving.LiveGraph` (``open_live_graph(run)``) publishes it with ``catch_up()``; a
new one replays the log at start. ``<run>/live/last_update.json`` (written atomically) holds the report.

Python: ``append_interactions(run_dir, path, UpdateConfig())`` returns the report; ``open_live_graph(run_dir)``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from gnn.evolving import EdgeWeight, InteractionBatch, LiveGraph
from gnn.graphstore import load_graph_store
from gnn.updatelog import UpdateLog
from gnn.walks import WalkConfig
from pipeline.config import check, from_mapping
from pipeline.ingest import IngestConfig, sorted_unique
from pipeline.loaders import format_spec, parse_block
from pipeline.rundir import read_stage, write_json_atomic

log = logging.getLogger(__name__)

LIVE_DIR = "live"
LOG_NAME = "updates.log"
REPORT_NAME = "last_update.json"


@dataclass(frozen=True)
class UpdateConfig:
    """Settings of ``pinsage update`` (section ``[update]``); the parse rules are the run's ingest settings.

    ``on_bad_rows`` (None = as ingest): ``skip`` (count and report rejected lines) or ``error`` (stop at the first);
    ``window_end`` (None = as ingest): a later end of the timestamp window, for interactions after the ingested
    period; ``check_window`` (None = as ingest): False turns the window check off.
    """

    on_bad_rows: Literal["skip", "error"] | None = None
    window_end: int | None = None
    check_window: bool | None = None

    def __post_init__(self) -> None:
        check(self.on_bad_rows in (None, "skip", "error"), "update.on_bad_rows", self.on_bad_rows,
              "must be skip or error")


def live_log_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LIVE_DIR / LOG_NAME


def _ingest_config(run_dir: str | Path, cfg: UpdateConfig) -> IngestConfig:
    ingest = read_stage(run_dir, "ingest")
    values = dict(ingest.manifest.get("config", {}))
    if "format" not in values:
        values = {}  # an ingest written by other means: the defaults
    overrides = {"on_bad_rows": cfg.on_bad_rows, "window_end": cfg.window_end, "check_window": cfg.check_window}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(IngestConfig, values, section="ingest")


class _IdSpace:
    """Raw → contiguous ids of one kind: the ingest mapping (sorted raw ids) plus the ids added by earlier updates."""

    def __init__(self, base_raw: np.ndarray, added: list[np.ndarray]) -> None:
        self.base = np.asarray(base_raw, np.int64)
        self.added = np.concatenate(added) if added else np.zeros(0, np.int64)
        self.n = self.base.shape[0] + self.added.shape[0]
        self.added_sorted = np.argsort(self.added, kind="stable")

    def _find(self, sorted_vals: np.ndarray, order: np.ndarray | None, raw: np.ndarray) -> np.ndarray:
        if sorted_vals.shape[0] == 0:
            return np.full(raw.shape[0], -1, np.int64)
        pos = np.minimum(np.searchsorted(sorted_vals, raw), sorted_vals.shape[0] - 1)
        found = sorted_vals[pos] == raw
        ids = pos if order is None else order[pos]
        return np.where(found, ids, -1)

    def map(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids of ``raw``, raw ids new to the run in id order); new ids continue from ``self.n``."""
        ids = self._find(self.base, None, raw)
        if self.added.shape[0]:
            extra = self._find(self.added[self.added_sorted], self.added_sorted, raw)
            ids = np.where((ids < 0) & (extra >= 0), extra + self.base.shape[0], ids)
        new_raw = sorted_unique(raw[ids < 0]) if np.any(ids < 0) else np.zeros(0, np.int64)
        if new_raw.shape[0]:
            pos = np.searchsorted(new_raw, raw)
            ids = np.where(ids < 0, self.n + pos, ids)
        return ids.astype(np.int64), new_raw


def _dedupe(cols: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Exact duplicate rows of the file dropped (lowest line kept), as ingest does."""
    df = pd.DataFrame({k: cols[k] for k in ("user", "item", "category", "behavior", "ts", "line")})
    dup = df.sort_values("line").duplicated(subset=["user", "item", "category", "behavior", "ts"])
    keep = ~dup.reindex(df.index).to_numpy(dtype=bool)
    return {k: v[keep] for k, v in cols.items()}, int((~keep).sum())


def _build_batch(run_dir: Path, cols: dict[str, np.ndarray], records: list[InteractionBatch],
                 has_ts: bool) -> tuple[InteractionBatch, dict[str, int]]:
    ingest = read_stage(run_dir, "ingest")
    graph = read_stage(run_dir, "graph")
    users = pd.read_parquet(ingest.path / "users.parquet").sort_values("user")
    items = pd.read_parquet(ingest.path / "items.parquet").sort_values("item")
    cats = pd.read_parquet(ingest.path / "categories.parquet").sort_values("category")

    def added(key: str) -> list[np.ndarray]:
        return [np.asarray(r.raw[key], np.int64) for r in records if key in r.raw]

    spaces = {"users": _IdSpace(users["raw_user"].to_numpy(), added("users")),
              "items": _IdSpace(items["raw_item"].to_numpy(), added("items")),
              "categories": _IdSpace(cats["raw_category"].to_numpy(), added("categories"))}
    g = graph.report
    sizes = (records[-1].n_users, records[-1].n_items, records[-1].n_categories) if records else \
        (int(g["n_users"]), int(g["n_items"]), int(g["n_categories"]))
    if (spaces["users"].n, spaces["items"].n, spaces["categories"].n) != sizes:
        raise ValueError(f"{run_dir}: the live log's id counts {sizes} do not match the ingest mappings plus the "
                         "logged new ids; the log belongs to another ingest: move live/ away and re-apply the updates")
    user, new_users = spaces["users"].map(cols["user"])
    item, new_items = spaces["items"].map(cols["item"])
    category, new_cats = spaces["categories"].map(cols["category"])
    ts = cols["ts"]
    if not has_ts:  # after everything in the graph, in line order per user (ingest's sequence rule, shifted)
        latest = int(np.asarray(load_graph_store(graph.path).user_items.times).max(initial=0))
        latest = max([latest] + [int(r.ts.max()) for r in records if r.n_rows])
        order = np.lexsort((cols["line"], user))
        rank = np.empty(user.shape[0], np.int64)
        first = np.r_[True, user[order][1:] != user[order][:-1]]
        starts = np.maximum.accumulate(np.where(first, np.arange(user.shape[0]), 0))
        rank[order] = np.arange(user.shape[0]) - starts
        ts = latest + 1 + rank
    batch = InteractionBatch(user, item, cols["behavior"], ts, category, sizes[0] + new_users.shape[0],
                             sizes[1] + new_items.shape[0], sizes[2] + new_cats.shape[0],
                             raw={"users": new_users, "items": new_items, "categories": new_cats,
                                  "lines": cols["line"]})
    return batch, {"new_users": int(new_users.shape[0]), "new_items": int(new_items.shape[0]),
                   "new_categories": int(new_cats.shape[0])}


def append_interactions(run_dir: str | Path, source: str | Path, cfg: UpdateConfig | None = None) -> dict[str, Any]:
    """Validate ``source`` and append its interactions to the run's live graph log (see the module docstring).

    Returns the report: lines read, rows appended, rejected (by reason, first 20 with line and text), duplicates,
    new users / items / categories, and ``version`` — the live-graph version this batch becomes.
    """
    cfg = cfg or UpdateConfig()
    run = Path(run_dir)
    src = Path(source)
    if not src.is_file():
        raise FileNotFoundError(f"{source}: no such file: pass the path of a file of new interactions")
    icfg = _ingest_config(run, cfg)
    data = src.read_bytes()
    first_line = data.split(b"\n", 1)[0] if icfg.format == "edgelist" else b""
    spec = format_spec(icfg.format, first_line=first_line)
    parsed = parse_block(data, spec, window=icfg.window, first_block=True, where=str(src), raw_limit=icfg.raw_limit)
    if parsed.rejects and icfg.on_bad_rows == "error":
        line, reason, raw = parsed.rejects[0]
        raise ValueError(f"{src}:{line}: {reason}: {raw!r} (on_bad_rows=error; fix the line or use "
                         "--on-bad-rows skip to count and report it)")
    cols, n_dup = _dedupe(parsed.columns) if icfg.dedupe else (parsed.columns, 0)
    if parsed.n_lines == 0 or cols["user"].shape[0] == 0:
        raise ValueError(f"{src}: no rows to append: {parsed.n_lines} lines, {len(parsed.rejects)} rejected "
                         f"(check the format, now {icfg.format}, and the window)")
    ulog = UpdateLog(live_log_path(run))
    with ulog.locked():  # one appender at a time: new ids depend on the records before ours
        ulog.recover()
        records = [InteractionBatch.from_bytes(p) for p, _ in ulog.records()]
        batch, new = _build_batch(run, cols, records, spec.has_ts)
        ulog.append(batch.to_bytes())
    by_reason: dict[str, int] = {}
    for _, reason, _ in parsed.rejects:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    report = {"source": str(src), "format": icfg.format, "lines_read": parsed.n_lines, "rows_appended": batch.n_rows,
              "rejected": len(parsed.rejects), "rejected_by_reason": dict(sorted(by_reason.items())),
              "first_rejects": [{"line": ln, "reason": r, "raw": t} for ln, r, t in parsed.rejects[:20]],
              "duplicates": n_dup, **new, "version": len(records) + 1, "log": str(ulog.path)}
    write_json_atomic(run / LIVE_DIR / REPORT_NAME, report)
    return report


def open_live_graph(run_dir: str | Path, walk_cfg: WalkConfig | None = None) -> LiveGraph:
    """The run's live graph: ``<run>/graph`` plus the log replayed, with the walk settings of ``<run>/walks``
    (default: that stage's config, else ``WalkConfig()``) and the graph stage's ``edge_weight``."""
    run = Path(run_dir)
    graph = read_stage(run, "graph")
    if walk_cfg is None:
        walks = run / "walks" / "manifest.json"
        walk_cfg = from_mapping(WalkConfig, json.loads(walks.read_text())["config"], section="walks") \
            if walks.is_file() else WalkConfig()
    edge_weight: EdgeWeight = graph.manifest.get("config", {}).get("edge_weight", "sum")
    return LiveGraph(load_graph_store(graph.path), walk_cfg, log_path=live_log_path(run), edge_weight=edge_weight)


def _main(args: argparse.Namespace) -> int:
    from pipeline.common import from_sources, settings

    cfg = from_sources(UpdateConfig, toml=settings(args), section="update", args=args)
    r = append_interactions(args.run_dir, args.source, cfg)
    print(f"update: {r['rows_appended']:,} interactions appended of {r['lines_read']:,} lines, {r['rejected']:,} "
          f"rejected {r['rejected_by_reason']}, {r['duplicates']:,} duplicates, {r['new_users']} new users, "
          f"{r['new_items']} new items -> live graph version {r['version']} ({r['log']})")
    return 0


def register(subparsers: Any) -> None:
    from pipeline.common import add_arguments, add_common_arguments

    p = subparsers.add_parser("update", help="append validated new interactions to the run's live graph",
                              description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("source", help="file of new interactions, in the run's ingest format")
    add_common_arguments(p, cluster=False)
    add_arguments(p, UpdateConfig)
    p.set_defaults(func=_main)
