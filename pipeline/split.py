"""Temporal train / validation / test split of the ingested interactions (``pinsage split``).

Two modes (``SplitConfig.mode``):

* ``last_day`` (default): a global time cut at calendar-day boundaries (in the time zone ``tz_offset_hours``,
  Beijing time for Taobao). Test = the last ``holdout_days`` calendar days of the data (the day holding the
  latest interaction and the days before it), validation = the ``holdout_days`` before those, train =
  everything earlier. No training interaction is later than any held-out one, for any user.
* ``last_n``: per user (leave-last-out). Each user's last ``last_n`` interactions (by time, then line) are
  test, the ``last_n`` before them validation, the rest train; users with fewer than ``2 * last_n + 1``
  interactions keep all of them in train. No user's training interaction is later than their held-out ones.

Output: ``<run>/split/{train,valid,test}.parquet`` (parquet datasets, schema of pipeline/schema.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.dataframe as dd
import pandas as pd
from distributed import Client

from pipeline.cluster import cluster_client
from pipeline.common import add_arguments, add_common_arguments, cluster_config, from_sources, settings
from pipeline.config import check
from pipeline.progress import stage_span
from pipeline.rundir import StageOutput, read_stage, run_stage

PARTS = ("train", "valid", "test")
DAY = 86_400


@dataclass(frozen=True)
class SplitConfig:
    """How interactions are held out; see the module docstring."""

    mode: Literal["last_day", "last_n"] = "last_day"
    holdout_days: int = 1
    last_n: int = 1
    tz_offset_hours: float = 8.0

    def __post_init__(self) -> None:
        check(self.holdout_days >= 1, "split.holdout_days", self.holdout_days, "must be at least 1")
        check(-14 <= self.tz_offset_hours <= 14, "split.tz_offset_hours", self.tz_offset_hours,
              "must be a UTC offset in hours between -14 and 14")
        check(self.last_n >= 1, "split.last_n", self.last_n, "must be at least 1")


def interactions_path(ingest: StageOutput) -> Path:
    return ingest.path / "interactions"


def _label_last_n(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """Label each row train/valid/test by its position from the end of its user's history."""
    df = df.sort_values(["user", "ts", "line"], kind="stable")
    from_end = df.groupby("user", sort=False).cumcount(ascending=False)
    size = df.groupby("user", sort=False)["user"].transform("size")
    eligible = size >= 2 * n + 1
    part = pd.Series(0, index=df.index, dtype="int8")
    part[eligible & (from_end < n)] = 2
    part[eligible & (from_end >= n) & (from_end < 2 * n)] = 1
    return df.assign(part=part)


def split_interactions(ddf: dd.DataFrame, cfg: SplitConfig) -> tuple[dd.DataFrame, dict[str, Any]]:
    """Add a ``part`` column (0 train, 1 valid, 2 test) to ``ddf``; return it and facts for the report."""
    facts: dict[str, Any] = {"mode": cfg.mode}
    if cfg.mode == "last_day":
        t_max = int(ddf["ts"].max().compute())
        tz = int(cfg.tz_offset_hours * 3600)
        last_day_start = ((t_max + tz) // DAY) * DAY - tz
        test_from = last_day_start - (cfg.holdout_days - 1) * DAY
        valid_from = test_from - cfg.holdout_days * DAY
        facts.update(valid_from=valid_from, test_from=test_from, t_max=t_max)

        def label(df: pd.DataFrame) -> pd.DataFrame:
            part = (df["ts"] >= valid_from).astype("int8") + (df["ts"] >= test_from).astype("int8")
            return df.assign(part=part)

        meta = ddf._meta.assign(part=pd.Series(dtype="int8"))
        return ddf.map_partitions(label, meta=meta), facts
    # last_n: every user's rows must be in one partition: shuffle by user, then label per partition.
    shuffled = ddf.shuffle(on="user")
    meta = ddf._meta.assign(part=pd.Series(dtype="int8"))
    return shuffled.map_partitions(_label_last_n, cfg.last_n, meta=meta), facts


def _write(ddf: dd.DataFrame, out: Path, cfg: SplitConfig) -> dict[str, Any]:
    labelled, facts = split_interactions(ddf, cfg)
    labelled = labelled.persist()
    for code, name in enumerate(PARTS):
        part = labelled[labelled["part"] == code].drop(columns="part")
        part.to_parquet(out / f"{name}.parquet", write_index=False)
    counts = labelled.groupby("part")["user"].count().compute()
    users = labelled.groupby("part")["user"].nunique().compute()
    facts["rows"] = {name: int(counts.get(code, 0)) for code, name in enumerate(PARTS)}
    facts["users"] = {name: int(users.get(code, 0)) for code, name in enumerate(PARTS)}
    return facts


def split(run_dir: str | Path, cfg: SplitConfig, client: Client, *, force: bool = False) -> StageOutput:
    """Split ``<run>/ingest`` into ``<run>/split/{train,valid,test}.parquet``."""
    ingest = read_stage(run_dir, "ingest")

    def build(out: Path) -> dict[str, Any]:
        with stage_span("split"):
            ddf = dd.read_parquet(interactions_path(ingest))
            return _write(ddf, out, cfg)

    return run_stage(run_dir, "split", config=cfg, inputs={"ingest": ingest}, build=build, force=force)


def read_part(split_out: StageOutput, part: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One split part as a pandas DataFrame sorted by (user, ts, line)."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}: must be one of {', '.join(PARTS)}")
    df = pd.read_parquet(split_out.path / f"{part}.parquet", columns=columns)
    keys = [c for c in ("user", "ts", "line") if columns is None or c in columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True) if keys else df


def _cmd(args: argparse.Namespace) -> int:
    toml = settings(args)
    cfg = from_sources(SplitConfig, toml=toml, section="split", args=args)
    with cluster_client(cluster_config(args, toml)) as (client, _):
        out = split(args.run_dir, cfg, client, force=args.force)
    print(f"split: {out.report.get('rows')} -> {out.path}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("split", help="temporal train/validation/test split of the ingested interactions")
    add_common_arguments(p)
    add_arguments(p, SplitConfig)
    p.set_defaults(func=_cmd)
