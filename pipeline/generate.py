"""Synthetic Taobao-format interaction logs with planted structure, for tests, benchmarks and demos.

``pinsage generate OUT.csv --rows 10000000 --seed 0`` writes the exact ``UserBehavior.csv`` format
(headerless ``user_id,item_id,category_id,behavior_type,timestamp``), streaming chunk by chunk (memory does
not grow with ``--rows``), deterministic by seed, atomically (temp name + ``os.replace``). The side file
``OUT.csv.items.parquet`` holds the ground truth: ``raw_item``, ``raw_category``, ``community`` and, with
``--content-dim D``, a dense ``content`` vector per item (fixed-size list of float32) near its
community's centre.

Model: items are grouped into ``communities`` (contiguous blocks of internal item indices), categories are
contiguous runs of items with power-law sizes (so a category mostly lies inside one community), item
popularity is Zipf-like (weight ``1/rank**item_zipf`` over a random rank order). Users have power-law
activity (lognormal, mean ``mean_rows_per_user``, capped at ``max_rows_per_user``) and a home community.
Each row is either *fresh* — an item from the home community with probability ``community_strength``, else
from the global popularity — or, with probability ``sequence_strength``, *sequential*: the previous item
itself (probability ``repeat_share``) or one of the next few items of the same community, so that
item-to-item transitions carry signal. Timestamps are uniform in the window and sorted per user; rows are
grouped by user. ``bad_rows`` malformed lines (kinds in turn: columns, non-integer, behavior, window) go to
seeded positions reported with their 1-based line numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from gnn.graphstore import BEHAVIORS
from pipeline.config import add_arguments, check, from_sources, load_toml, to_dict
from pipeline.schema import TAOBAO_WINDOW

log = logging.getLogger(__name__)

BAD_KINDS = ("columns", "non-integer", "behavior", "window")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of the synthetic generator (see the module docstring for the model).

    ``items`` / ``categories`` 0 mean "scale with rows like the real file" (rows/24 items, rows/10600
    categories, at least 50 and 10). ``behavior_mix`` is in BEHAVIORS order (pv, fav, cart, buy).
    """

    rows: int = 1_000_000
    seed: int = 0
    items: int = 0
    categories: int = 0
    communities: int = 50
    community_strength: float = 0.8
    sequence_strength: float = 0.5
    repeat_share: float = 0.3
    item_zipf: float = 0.85
    mean_rows_per_user: float = 100.0
    max_rows_per_user: int = 850
    behavior_mix: tuple[float, ...] = (0.896, 0.029, 0.055, 0.020)
    window_start: int = TAOBAO_WINDOW[0]
    window_end: int = TAOBAO_WINDOW[1]
    bad_rows: int = 0
    content_dim: int = 0
    content_noise: float = 0.5
    chunk_rows: int = 2_000_000

    def __post_init__(self) -> None:
        check(self.rows >= 1, "generate.rows", self.rows, "must be at least 1")
        check(self.seed >= 0, "generate.seed", self.seed, "must be a non-negative integer")
        check(self.items >= 0, "generate.items", self.items, "must be 0 (automatic) or positive")
        check(self.categories >= 0, "generate.categories", self.categories, "must be 0 (automatic) or positive")
        check(self.communities >= 1, "generate.communities", self.communities, "must be at least 1")
        for name in ("community_strength", "sequence_strength", "repeat_share"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"generate.{name}", v, "must be a probability in [0, 1]")
        check(self.item_zipf >= 0, "generate.item_zipf", self.item_zipf, "must be >= 0")
        check(self.mean_rows_per_user >= 1, "generate.mean_rows_per_user", self.mean_rows_per_user, "must be >= 1")
        check(self.max_rows_per_user >= self.mean_rows_per_user, "generate.max_rows_per_user",
              self.max_rows_per_user, "must be >= mean_rows_per_user")
        check(len(self.behavior_mix) == len(BEHAVIORS) and all(p >= 0 for p in self.behavior_mix)
              and sum(self.behavior_mix) > 0, "generate.behavior_mix", self.behavior_mix,
              f"must be {len(BEHAVIORS)} non-negative weights in the order {', '.join(BEHAVIORS)}")
        check(self.window_end > self.window_start, "generate.window_end", self.window_end,
              "must be greater than window_start")
        check(self.bad_rows >= 0, "generate.bad_rows", self.bad_rows, "must be >= 0")
        check(self.content_dim >= 0, "generate.content_dim", self.content_dim, "must be >= 0")
        check(self.chunk_rows >= 1000, "generate.chunk_rows", self.chunk_rows, "must be at least 1000")

    @property
    def n_items(self) -> int:
        return self.items or max(50, self.rows // 24)

    @property
    def n_categories(self) -> int:
        return min(self.categories or max(10, self.rows // 10_600), self.n_items)

    @property
    def n_communities(self) -> int:
        return min(self.communities, self.n_items)


@dataclass(frozen=True)
class _World:
    """Everything drawn once: item popularity, communities, categories, raw ids, user activity."""

    cum_weight: np.ndarray     # (n_items,) cumulative popularity, items in community order
    comm_start: np.ndarray     # (C+1,) first internal item of each community
    item_comm: np.ndarray      # (n_items,)
    item_cat: np.ndarray       # (n_items,) internal category
    raw_item: np.ndarray       # (n_items,)
    raw_cat: np.ndarray        # (n_categories,)
    raw_user: np.ndarray       # (n_users,)
    user_rows: np.ndarray      # (n_users,) rows per user, summing to cfg.rows
    user_home: np.ndarray      # (n_users,)


def _distinct_ids(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """``n`` distinct positive ids drawn from ``[1, n * spread]`` in random order (sparse, Taobao-like)."""
    high = int(n * spread) + 10
    return (rng.choice(high, size=n, replace=False) + 1).astype(np.int64)


def _user_rows(rng: np.random.Generator, cfg: GenerateConfig) -> np.ndarray:
    sigma = 1.0
    mu = np.log(cfg.mean_rows_per_user) - sigma**2 / 2
    parts: list[np.ndarray] = []
    total = 0
    while total < cfg.rows:
        n = max(16, int((cfg.rows - total) / cfg.mean_rows_per_user * 1.1))
        draw = np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), 1, cfg.max_rows_per_user).astype(np.int64)
        parts.append(draw)
        total += int(draw.sum())
    counts = np.concatenate(parts)
    cum = np.cumsum(counts)
    last = int(np.searchsorted(cum, cfg.rows))  # the user who reaches cfg.rows
    counts = counts[: last + 1].copy()
    counts[-1] -= int(cum[last]) - cfg.rows
    return counts


def _world(cfg: GenerateConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 0])
    n_items, n_cat, n_comm = cfg.n_items, cfg.n_categories, cfg.n_communities
    # Community sizes: mildly skewed; every community gets at least one item.
    csize = 1 + rng.multinomial(n_items - n_comm, _normalise(1.0 / np.arange(1, n_comm + 1) ** 0.5))
    comm_start = np.concatenate([[0], np.cumsum(csize)]).astype(np.int64)
    item_comm = np.repeat(np.arange(n_comm, dtype=np.int64), csize)
    # Category sizes: power law, shuffled; categories are contiguous runs of items.
    cat_p = _normalise(1.0 / np.arange(1, n_cat + 1) ** 1.1)
    cat_size = 1 + rng.multinomial(n_items - n_cat, cat_p[rng.permutation(n_cat)])
    item_cat = np.repeat(np.arange(n_cat, dtype=np.int64), cat_size)
    rank = rng.permutation(n_items) + 1
    weight = 1.0 / rank.astype(np.float64) ** cfg.item_zipf
    cum_weight = np.cumsum(weight)
    raw_item = _distinct_ids(rng, n_items, 1.25)
    raw_cat = _distinct_ids(rng, n_cat, max(1.25, n_items * 1.25 / n_cat))  # overlaps the item range
    user_rows = _user_rows(rng, cfg)
    n_users = len(user_rows)
    raw_user = _distinct_ids(rng, n_users, 1.05)
    user_home = rng.integers(0, n_comm, size=n_users)
    return _World(cum_weight, comm_start, item_comm, item_cat, raw_item, raw_cat, raw_user, user_rows, user_home)


def _normalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum()


def _chunk_rows(world: _World, cfg: GenerateConfig, users: slice, index: int) -> dict[str, np.ndarray]:
    """All rows of users ``users`` (vectorised). Shapes: every output array is (m,), m = their rows."""
    rng = np.random.default_rng([cfg.seed, 1, index])
    counts = world.user_rows[users]
    m = int(counts.sum())
    seg = np.repeat(np.arange(len(counts)), counts)                     # (m,) user within chunk
    first = np.zeros(m, dtype=bool)
    first[np.concatenate([[0], np.cumsum(counts)[:-1]])] = True
    home = world.user_home[users][seg]
    # Fresh draws: home community with probability community_strength, else global popularity.
    cw = world.cum_weight
    total = cw[-1]
    from_home = rng.random(m) < cfg.community_strength
    start_w = np.where(home > 0, cw[world.comm_start[home] - 1], 0.0)
    end_w = cw[world.comm_start[home + 1] - 1]
    lo = np.where(from_home, start_w, 0.0)
    hi = np.where(from_home, end_w, total)
    fresh = np.searchsorted(cw, lo + rng.random(m) * (hi - lo), side="right")
    fresh = np.minimum(fresh, len(cw) - 1)
    # Sequential draws: previous item (offset 0) or one of the next items of its community.
    follow = (rng.random(m) < cfg.sequence_strength) & ~first
    offset = np.where(rng.random(m) < cfg.repeat_share, 0, rng.geometric(0.5, size=m))
    offset = np.where(follow, offset, 0)
    anchor = np.maximum.accumulate(np.where(follow, 0, np.arange(m)))   # last fresh row at or before
    steps = np.cumsum(offset)
    steps -= steps[anchor]
    base = fresh[anchor]
    comm = world.item_comm[base]
    cstart = world.comm_start[comm]
    csize = world.comm_start[comm + 1] - cstart
    item = cstart + (base - cstart + steps) % csize
    behavior = rng.choice(len(BEHAVIORS), size=m, p=_normalise(np.asarray(cfg.behavior_mix, dtype=np.float64)))
    # Timestamps: uniform in the window, sorted within each user.
    frac = np.sort(seg + rng.random(m)) - seg
    width = cfg.window_end - cfg.window_start
    ts = cfg.window_start + np.minimum((frac * width).astype(np.int64), width - 1)
    return {
        "user": world.raw_user[users][seg],
        "item": world.raw_item[item],
        "category": world.raw_cat[world.item_cat[item]],
        "behavior": behavior.astype(np.int8),
        "ts": ts,
    }


def _bad_line(kind: str, k: int, cfg: GenerateConfig) -> bytes:
    ts = cfg.window_start + 1000 + k
    if kind == "columns":
        return f"{k + 1},{k + 2},{k + 3}".encode()
    if kind == "non-integer":
        return f"{k + 1}x,{k + 2},{k + 3},pv,{ts}".encode()
    if kind == "behavior":
        return f"{k + 1},{k + 2},{k + 3},click,{ts}".encode()
    return f"{k + 1},{k + 2},{k + 3},pv,{cfg.window_start - 86400 - k}".encode()


def _bad_plan(cfg: GenerateConfig) -> tuple[np.ndarray, list[str]]:
    """0-based final line index of each bad line (sorted) and its kind."""
    if cfg.bad_rows == 0:
        return np.zeros(0, dtype=np.int64), []
    rng = np.random.default_rng([cfg.seed, 3])
    pos = np.sort(rng.choice(cfg.rows + cfg.bad_rows, size=cfg.bad_rows, replace=False)).astype(np.int64)
    return pos, [BAD_KINDS[i % len(BAD_KINDS)] for i in range(cfg.bad_rows)]


_BEHAVIOR_NAMES = pa.array(list(BEHAVIORS))


def _csv_bytes(rows: dict[str, np.ndarray]) -> bytes:
    table = pa.table({
        "user_id": rows["user"], "item_id": rows["item"], "category_id": rows["category"],
        "behavior_type": _BEHAVIOR_NAMES.take(pa.array(rows["behavior"])), "timestamp": rows["ts"],
    })
    sink = pa.BufferOutputStream()
    pcsv.write_csv(table, sink, write_options=pcsv.WriteOptions(include_header=False, quoting_style="none"))
    return sink.getvalue().to_pybytes()


def _splice(text: bytes, at_rows: np.ndarray, lines: list[bytes]) -> bytes:
    """Insert ``lines`` before the 0-based rows ``at_rows`` of ``text`` (``len(rows)`` = append)."""
    ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], ends + 1])
    out, prev = [], 0
    for row, line in zip(at_rows, lines, strict=True):
        cut = int(starts[row]) if row < len(starts) else len(text)
        out += [text[prev:cut], line, b"\n"]
        prev = cut
    out.append(text[prev:])
    return b"".join(out)


def _write_items(path: Path, world: _World, cfg: GenerateConfig) -> None:
    columns: dict[str, Any] = {
        "raw_item": world.raw_item,
        "raw_category": world.raw_cat[world.item_cat],
        "community": world.item_comm,
    }
    if cfg.content_dim:
        rng = np.random.default_rng([cfg.seed, 4])
        centres = rng.standard_normal((cfg.n_communities, cfg.content_dim)).astype(np.float32)
        vec = centres[world.item_comm] + cfg.content_noise * rng.standard_normal(
            (cfg.n_items, cfg.content_dim)).astype(np.float32)                 # (n_items, D)
        columns["content"] = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), cfg.content_dim)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


def items_path(out: str | Path) -> Path:
    """The side file of a generated CSV: ``<out>.items.parquet``."""
    return Path(f"{out}.items.parquet")


def generate(path: str | Path, cfg: GenerateConfig | None = None) -> dict[str, Any]:
    """Write a synthetic Taobao-format CSV to ``path`` (and its ``.items.parquet`` side file).

    Args:
        path: output CSV; its folder is created. Written to a temporary name, then renamed.
        cfg: generator settings (default ``GenerateConfig()``).

    Returns a report: rows, lines (rows + bad_rows), users, items, categories, communities, bytes, seconds,
    ``bad_lines`` (list of ``{"line": 1-based line, "kind": ...}``), the paths and the config.
    """
    cfg = cfg or GenerateConfig()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = _world(cfg)
    bad_pos, bad_kinds = _bad_plan(cfg)
    insert_before = bad_pos - np.arange(len(bad_pos))          # good rows before each bad line
    bad_text = [_bad_line(kind, k, cfg) for k, kind in enumerate(bad_kinds)]
    cum_rows = np.concatenate([[0], np.cumsum(world.user_rows)])
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    n_bytes = 0
    try:
        with tmp.open("wb") as f:
            first_user, index = 0, 0
            n_users = len(world.user_rows)
            while first_user < n_users:
                last_user = int(np.searchsorted(cum_rows, cum_rows[first_user] + cfg.chunk_rows, side="right")) - 1
                last_user = min(max(last_user, first_user + 1), n_users)
                g0, g1 = int(cum_rows[first_user]), int(cum_rows[last_user])
                text = _csv_bytes(_chunk_rows(world, cfg, slice(first_user, last_user), index))
                end = g1 if last_user < n_users else g1 + 1   # the last chunk also takes bad lines at the end
                sel = np.flatnonzero((insert_before >= g0) & (insert_before < end))
                if len(sel):
                    text = _splice(text, insert_before[sel] - g0, [bad_text[i] for i in sel])
                f.write(text)
                n_bytes += len(text)
                first_user, index = last_user, index + 1
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    side = items_path(out)
    _write_items(side, world, cfg)
    report = {
        "path": str(out),
        "items_path": str(side),
        "rows": cfg.rows,
        "lines": cfg.rows + cfg.bad_rows,
        "users": len(world.user_rows),
        "items": cfg.n_items,
        "categories": cfg.n_categories,
        "communities": cfg.n_communities,
        "bytes": n_bytes,
        "seconds": round(time.perf_counter() - started, 3),
        "bad_lines": [{"line": int(p) + 1, "kind": k} for p, k in zip(bad_pos, bad_kinds, strict=True)],
        "config": to_dict(cfg),
    }
    log.info("generated %d rows (%d users, %d items) into %s in %.1fs", cfg.rows, report["users"],
             cfg.n_items, out, report["seconds"])
    return report


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="write a synthetic Taobao-format CSV with planted structure",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output CSV path (side file OUT.items.parquet beside it)")
    p.add_argument("--config", type=Path, default=None, help="TOML settings file with a [generate] section")
    add_arguments(p, GenerateConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    toml = load_toml(args.config) if args.config else {}
    cfg = from_sources(GenerateConfig, toml=toml, section="generate", args=args)
    report = generate(args.out, cfg)
    print(f"wrote {report['lines']:,} lines ({report['rows']:,} rows, {report['users']:,} users, "
          f"{report['items']:,} items, {len(report['bad_lines'])} bad) to {report['path']} "
          f"in {report['seconds']:.1f}s")
    return 0
