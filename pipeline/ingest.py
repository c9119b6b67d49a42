"""Stage ``ingest``: a raw interaction log (Taobao CSV and other formats) → validated, factorised parquet.

``pinsage ingest UserBehavior.csv --run-dir runs/x`` (or :func:`ingest` from Python) writes
``<run-dir>/ingest/``:

* ``interactions/part-NNNNN.parquet`` — the columns of :mod:`pipeline.schema` (user, item, category int64,
  behavior int8, ts int64, line int64), sorted by (user, ts, line) across the parts in order;
* ``users.parquet`` (user, raw_user), ``items.parquet`` (item, raw_item, category),
  ``categories.parquet`` (category, raw_category) — contiguous int64 ids assigned in sorted order of the raw
  ids; an item seen under several categories gets the smallest raw one in ``items.parquet`` (the rows keep
  their own; ``report["items_with_several_categories"]`` counts them);
* ``rejects.parquet`` (line int64, reason string, raw string) — every rejected line of the input;
* ``report.json`` (also the manifest's ``report``): lines read, rows kept, rejected by reason, duplicates,
  users, items, categories, time range, behaviour mix.

How (two passes over the data, each a Dask task per unit, memory bounded by the block / partition size):

1. *parse*: ``dask.bytes.read_bytes(path, delimiter=b"\\n")`` gives newline-aligned blocks (local path or
   any fsspec URL); each task parses and validates its block (:func:`pipeline.loaders.parse_block`), counts
   its lines, sorts the kept rows by raw user and spills them to an Arrow IPC file in the stage's work
   folder, and returns the block's sorted unique users and (item, category) pairs. The driver turns the
   per-block line counts into global line numbers (no second read of the file) and merges the uniques
   (tree reduction on the cluster) into the id mappings.
2. *write*: the users are cut into ranges of about ``partition_rows`` rows; each task gathers its range
   from every block file (zero-copy memory maps), factorises, synthesises timestamps where the format has
   none, drops exact duplicates (keeping the lowest line number), sorts by (user, ts, line) and writes
   one parquet part.

The result does not depend on the number of workers or the block size. Bad lines never vanish: with
``on_bad_rows="skip"`` they go to ``rejects.parquet`` and are counted by reason (reasons in
:data:`pipeline.loaders.REJECT_REASONS`); with ``"error"`` the stage stops at the first one (lowest line)
with ``path:line: reason: 'raw text'`` and leaves no output. Exact duplicate rows (same user, item,
category, behaviour, ts) are dropped, the lowest line kept, and counted in ``report["duplicates"]``.
A header line is rejected with reason ``header``; an empty or missing file is a one-line error ("no rows",
"no such file"); a line that is not UTF-8 is rejected with reason ``non-utf8``.
The work folder must be visible to every worker (true for a LocalCluster; use a shared file system for a
multi-machine cluster).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
from dask.utils import parse_bytes

from gnn.graphstore import BEHAVIORS
from pipeline.config import check, to_dict
from pipeline.loaders import FORMATS, FormatSpec, format_spec, parse_block
from pipeline.progress import track
from pipeline.rundir import StageOutput, run_stage, write_json_atomic
from pipeline.schema import TAOBAO_WINDOW

log = logging.getLogger(__name__)

STAGE = "ingest"
MERGE_FAN_IN = 8  # blocks (then partial results) merged per task when collecting the distinct ids
INTERACTIONS_SCHEMA = pa.schema([
    ("user", pa.int64()), ("item", pa.int64()), ("category", pa.int64()),
    ("behavior", pa.int8()), ("ts", pa.int64()), ("line", pa.int64()),
])
REJECTS_SCHEMA = pa.schema([("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())])


@dataclass(frozen=True)
class IngestConfig:
    """Settings of the ingest stage.

    ``window_start`` / ``window_end`` None mean the format's default: ``TAOBAO_WINDOW`` for taobao, no
    window for the others; ``check_window=False`` turns the check off. ``blocksize`` is the parse unit
    ("16 MiB"); ``partition_rows`` the rows per output part (and the write pass's memory unit).
    """

    format: Literal["taobao", "sequence", "movielens", "edgelist"] = "taobao"
    on_bad_rows: Literal["skip", "error"] = "skip"
    blocksize: str = "16 MiB"
    check_window: bool = True
    window_start: int | None = None
    window_end: int | None = None
    dedupe: bool = True
    partition_rows: int = 4_000_000
    compression: str = "snappy"
    raw_limit: int = 200

    def __post_init__(self) -> None:
        check(self.format in FORMATS, "ingest.format", self.format, f"must be one of {', '.join(FORMATS)}")
        check(self.on_bad_rows in ("skip", "error"), "ingest.on_bad_rows", self.on_bad_rows,
              "must be skip or error")
        try:
            size = parse_bytes(self.blocksize)
        except (ValueError, TypeError):
            size = -1
        check(size >= 1024, "ingest.blocksize", self.blocksize, "must be a size of at least 1 KiB, e.g. '16 MiB'")
        if self.window is not None:
            check(self.window[1] > self.window[0], "ingest.window_end", self.window_end,
                  "must be greater than window_start")
        check(self.partition_rows >= 1000, "ingest.partition_rows", self.partition_rows, "must be at least 1000")
        check(self.compression in ("snappy", "zstd", "lz4", "gzip", "none"), "ingest.compression",
              self.compression, "must be one of snappy, zstd, lz4, gzip, none")
        check(self.raw_limit >= 16, "ingest.raw_limit", self.raw_limit, "must be at least 16")

    @property
    def window(self) -> tuple[int, int] | None:
        """The timestamp window ``[start, end)`` that applies, or None."""
        if not self.check_window:
            return None
        default: tuple[int | None, int | None] = TAOBAO_WINDOW if self.format == "taobao" else (None, None)
        start = self.window_start if self.window_start is not None else default[0]
        end = self.window_end if self.window_end is not None else default[1]
        if start is None and end is None:
            return None
        return (start if start is not None else -(2**62), end if end is not None else 2**62)


# ---------------------------------------------------------------- pass 1: parse, validate, spill


def _block_file(work: Path, index: int) -> Path:
    return work / f"block-{index:06d}.arrow"


def _runs_file(work: Path, index: int) -> Path:
    return work / f"block-{index:06d}.runs.npy"


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a sort and a compare: much faster than ``np.unique`` here). (n,) -> (k,)."""
    v = np.sort(values)
    keep = np.ones(len(v), dtype=bool)
    keep[1:] = v[1:] != v[:-1]
    return v[keep]


def _unique_pairs(item: np.ndarray, category: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique (item, category) pairs. Shapes: (n,), (n,) -> (k,), (k,)."""
    if len(item) and item.min() >= 0 and item.max() < 2**31 and category.min() >= 0 and category.max() < 2**32:
        key = sorted_unique((item << 32) | category)
        return key >> 32, key & 0xFFFFFFFF
    order = np.lexsort((category, item))
    i, c = item[order], category[order]
    keep = np.ones(len(i), dtype=bool)
    keep[1:] = (i[1:] != i[:-1]) | (c[1:] != c[:-1])
    return i[keep], c[keep]


def _user_runs(user: np.ndarray) -> np.ndarray:
    """Runs of equal raw users in file order, sorted by (user, start): rows (user, start, length).

    Shapes: (n,) -> (r, 3). The write pass gathers a user range through these runs, so the block's rows
    never need reordering (a file grouped by user has few runs; any order works).
    """
    n = len(user)
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    change = np.flatnonzero(user[1:] != user[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    lengths = np.diff(np.concatenate([starts, [n]]))
    run_user = user[starts]
    order = np.argsort(run_user, kind="stable")
    return np.stack([run_user[order], starts[order], lengths[order]], axis=1)


def _parse_task(data: bytes, index: int, spec: FormatSpec, window: tuple[int, int] | None, work: str,
                where: str, raw_limit: int) -> dict[str, Any]:
    block = parse_block(data, spec, window=window, first_block=index == 0, where=where, raw_limit=raw_limit)
    cols = block.columns
    del data
    wdir = Path(work)
    table = pa.table({k: cols[k] for k in ("user", "item", "category", "behavior", "ts")}
                     | {"line": cols["line"].astype(np.int32)})  # block-local line: int32 is plenty
    feather.write_feather(table, _block_file(wdir, index), compression="uncompressed")
    runs = _user_runs(cols["user"])
    np.save(_runs_file(wdir, index), runs)
    items, cats = _unique_pairs(cols["item"], cols["category"])
    # The block's distinct ids go to disk too, so that nothing proportional to the file stays in memory.
    np.save(wdir / f"block-{index:06d}.users.npy", sorted_unique(runs[:, 0]))
    np.save(wdir / f"block-{index:06d}.pairs.npy", np.stack([items, cats]))
    return {"index": index, "n_lines": block.n_lines, "n_kept": block.n_kept, "rejects": block.rejects}


def _merge_blocks(work: str, indices: list[int]) -> dict[str, Any]:
    wdir = Path(work)
    parts = []
    for i in indices:
        pairs = np.load(wdir / f"block-{i:06d}.pairs.npy")
        parts.append({"users": np.load(wdir / f"block-{i:06d}.users.npy"), "items": pairs[0], "cats": pairs[1]})
    return _merge_uniques(*parts)


def _merge_uniques(*parts: dict[str, Any]) -> dict[str, Any]:
    items, cats = _unique_pairs(np.concatenate([p["items"] for p in parts]),
                                np.concatenate([p["cats"] for p in parts]))
    return {"users": sorted_unique(np.concatenate([p["users"] for p in parts])), "items": items, "cats": cats}


# ---------------------------------------------------------------- pass 2: factorise, dedupe, sort, write


def _factorise(values: np.ndarray, uniques: np.ndarray) -> np.ndarray:
    """Index of each value in the sorted ``uniques`` (all values are present). Shapes: (n,), (k,) -> (n,)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = int(uniques[0]), int(uniques[-1])
    if hi - lo < max(8 * len(uniques), 1 << 22):
        lut = np.empty(hi - lo + 1, dtype=np.int64)   # dense lookup: one gather instead of a binary search
        lut[uniques - lo] = np.arange(len(uniques), dtype=np.int64)
        return lut[values - lo]
    return np.searchsorted(uniques, values).astype(np.int64)


def _sequence_ts(user: np.ndarray) -> np.ndarray:
    """0-based index of each row among its user's rows, rows in line order. Shapes: (n,) -> (n,)."""
    order = np.argsort(user, kind="stable")
    u = user[order]
    start = np.ones(len(u), dtype=bool)
    start[1:] = u[1:] != u[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(len(u)), 0))
    ts = np.empty(len(u), dtype=np.int64)
    ts[order] = np.arange(len(u)) - first
    return ts


def _order_user_ts(user: np.ndarray, ts: np.ndarray) -> np.ndarray | None:
    """Stable order by (user, ts), or None when already in it. Rows arrive grouped by user (ascending) and
    in line order within a user, so a stable order by (user, ts) is the order by (user, ts, line)."""
    if len(user) < 2:
        return None
    same_user = user[1:] == user[:-1]
    if not np.any(same_user & (ts[1:] < ts[:-1])):
        return None                          # time-ordered within each user already (the Taobao file)
    u0, t0 = int(user.min()), int(ts.min())
    ubits = max(1, (int(user.max()) - u0).bit_length())
    tbits = max(1, (int(ts.max()) - t0).bit_length())
    if ubits + tbits <= 62:
        key = ((user - u0) << tbits) | (ts - t0)
        return np.argsort(key, kind="stable")
    return np.lexsort((ts, user))


def _duplicates(cols: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mask of exact duplicates (same user, item, category, behavior, ts) other than the lowest line.

    ``cols`` are sorted by (user, ts, line); duplicates share (user, ts), so only rows of a (user, ts) group
    of two or more rows are compared. Shapes: columns (n,) -> (n,) bool.
    """
    user, ts = cols["user"], cols["ts"]
    n = len(user)
    dup = np.zeros(n, dtype=bool)
    if n < 2:
        return dup
    same = (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])
    cand = np.zeros(n, dtype=bool)
    cand[1:] |= same
    cand[:-1] |= same
    idx = np.flatnonzero(cand)
    if len(idx) == 0:
        return dup
    keys = [cols[k][idx] for k in ("line", "behavior", "category", "item", "ts", "user")]
    order = np.lexsort(keys)
    s = [k[order] for k in keys]
    eq = np.ones(len(idx) - 1, dtype=bool)
    for k in s[1:]:
        eq &= k[1:] == k[:-1]
    dup[idx[order[1:][eq]]] = True
    return dup


def _table(cols: Mapping[str, np.ndarray]) -> pa.Table:
    return pa.table({k: pa.array(cols[k], type=INTERACTIONS_SCHEMA.field(k).type)
                     for k in INTERACTIONS_SCHEMA.names}, schema=INTERACTIONS_SCHEMA)


def _sort_dedupe(cols: dict[str, np.ndarray], *, dedupe: bool) -> pa.Table:
    """Rows sorted by (user, ts, line), exact duplicates dropped (lowest line kept). Columns (n,) -> (m,)."""
    by_user_ts = _order_user_ts(cols["user"], cols["ts"])
    if by_user_ts is not None:
        cols = {k: v[by_user_ts] for k, v in cols.items()}
    table = _table(cols)
    if dedupe:
        dup = np.flatnonzero(_duplicates(cols))
        if len(dup):
            # Duplicates are rare: keep the rows between them as zero-copy slices instead of copying all.
            starts = np.concatenate([[0], dup + 1])
            stops = np.concatenate([dup, [table.num_rows]])
            table = pa.concat_tables([table.slice(a, b - a) for a, b in zip(starts, stops, strict=True) if b > a])
    return table


def _sort_dedupe_gpu(cols: dict[str, np.ndarray], *, dedupe: bool) -> pa.Table:  # pragma: no cover
    """:func:`_sort_dedupe` with cuDF (``dataframe.backend="cudf"``): the same rows in the same order."""
    import cudf

    df = cudf.DataFrame(cols)
    if dedupe:
        df = df.sort_values("line").drop_duplicates(subset=["user", "item", "category", "behavior", "ts"],
                                                    keep="first")
    df = df.sort_values(["user", "ts", "line"])
    return _table({k: df[k].to_numpy() for k in INTERACTIONS_SCHEMA.names})


@numba.njit(cache=True, nogil=True)
def _copy_runs(out: np.ndarray, values: np.ndarray, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray,
               add: int) -> None:  # pragma: no cover - compiled
    """``out[dst[r]:dst[r]+lengths[r]] = values[src[r]:...] + add`` for every run r (one pass, no index arrays)."""
    for r in range(len(lengths)):
        s, d = src[r], dst[r]
        for i in range(lengths[r]):
            out[d + i] = values[s + i] + add


def warm_up() -> None:
    """Compile (or load from numba's cache) the write pass's kernel; ``client.run(warm_up)`` on new workers."""
    one = np.ones(1, dtype=np.int64)
    for out_dtype, in_dtype in ((np.int64, np.int64), (np.int8, np.int8), (np.int64, np.int32)):  # ids, behavior, line
        _copy_runs(np.zeros(2, dtype=out_dtype), np.ones(2, dtype=in_dtype), one * 0, one * 0, one, 0)


def _write_partition(part: int, lo_raw: int, hi_raw: int, n_blocks: int, line_offsets: list[int],
                     work: str, has_ts: bool, dedupe: bool, out: str, compression: str,
                     gpu: bool = False) -> dict[str, Any]:
    """Gather raw users ``[lo_raw, hi_raw]`` from every block file and write one sorted parquet part."""
    wdir = Path(work)
    # Runs of the user range from every block, ordered by (user, block, start): rows then come out grouped
    # by user and in line order within a user, with one gather per column.
    sel_runs, sel_blocks = [], []
    for b in range(n_blocks):
        runs = np.load(_runs_file(wdir, b), mmap_mode="r")
        r0 = int(np.searchsorted(runs[:, 0], lo_raw, side="left"))
        r1 = int(np.searchsorted(runs[:, 0], hi_raw, side="right"))
        if r1 > r0:
            sel_runs.append(np.asarray(runs[r0:r1]))
            sel_blocks.append(np.full(r1 - r0, b, dtype=np.int64))
    runs = np.concatenate(sel_runs) if sel_runs else np.zeros((0, 3), dtype=np.int64)
    run_block = np.concatenate(sel_blocks) if sel_blocks else np.zeros(0, dtype=np.int64)
    order = np.lexsort((run_block, runs[:, 0]))            # stable: start order kept within (user, block)
    runs, run_block = runs[order], run_block[order]
    lengths = np.ascontiguousarray(runs[:, 2])
    dest_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = int(lengths.sum())
    cols = {k: np.empty(n, dtype=INTERACTIONS_SCHEMA.field(k).type.to_pandas_dtype())
            for k in INTERACTIONS_SCHEMA.names}
    for b in np.unique(run_block):
        mine = run_block == b
        src, dst, ln = np.ascontiguousarray(runs[mine, 1]), dest_start[mine], lengths[mine]
        table = feather.read_table(_block_file(wdir, int(b)), memory_map=True)
        for k in INTERACTIONS_SCHEMA.names:
            add = line_offsets[int(b)] if k == "line" else 0
            _copy_runs(cols[k], table[k].to_numpy(), src, dst, ln, add)
        del table
    cols["user"] = _factorise(cols["user"], np.load(wdir / "users.npy", mmap_mode="r"))
    cols["item"] = _factorise(cols["item"], np.load(wdir / "items.npy", mmap_mode="r"))
    cols["category"] = _factorise(cols["category"], np.load(wdir / "categories.npy", mmap_mode="r"))
    if not has_ts:
        cols["ts"] = _sequence_ts(cols["user"])
    n_before = len(cols["user"])
    table = _sort_dedupe_gpu(cols, dedupe=dedupe) if gpu else _sort_dedupe(cols, dedupe=dedupe)
    n_dup = n_before - table.num_rows
    # Delta encoding suits the sorted / slowly varying columns; no dictionary for the id columns (slow and
    # large for millions of distinct ids).
    pq.write_table(table, out, compression=None if compression == "none" else compression,
                   use_dictionary=["behavior"],
                   column_encoding={"user": "DELTA_BINARY_PACKED", "ts": "DELTA_BINARY_PACKED",
                                    "line": "DELTA_BINARY_PACKED"})
    ts = table["ts"]
    return {
        "part": part,
        "rows": table.num_rows,
        "duplicates": n_dup,
        "behavior": np.bincount(table["behavior"].to_numpy(), minlength=len(BEHAVIORS)).tolist(),
        "ts_min": pc.min(ts).as_py(),
        "ts_max": pc.max(ts).as_py(),
    }


# ---------------------------------------------------------------- driver


def _effective_blocksize(cfg: IngestConfig, size: int, threads: int) -> int:
    """``cfg.blocksize``, made smaller for a small file so that every worker thread gets about 3 blocks.

    The output does not depend on the block size (only ``report["blocks"]`` does).
    """
    return int(min(parse_bytes(cfg.blocksize), max(1 << 20, math.ceil(size / (3 * threads)))))


def _n_partitions(rows: int, partition_rows: int) -> int:
    """Output parts: ``rows / partition_rows`` rounded up, but at least 4 from 400k rows on (parallel
    writes); it depends on the row count and the setting only, never on the cluster."""
    return max(1, math.ceil(rows / partition_rows), min(4, rows // 100_000))


def _source_info(source: str) -> tuple[Any, str, int]:
    """(fsspec filesystem, path in it, size); a missing source is a one-line FileNotFoundError."""
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"{source}: no such file: pass the path (or fsspec URL) of an existing input file")
    if fs.isdir(path):
        raise ValueError(f"{source}: is a directory: pass one input file")
    return fs, path, int(fs.size(path))


def _first_line(fs: Any, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return bytes(f.read(1 << 16).split(b"\n", 1)[0])


def _first_error(stats: dict[int, dict[str, Any]], n_blocks: int) -> tuple[int, dict[str, Any]] | None:
    """(global line, reject) of the first rejected line, once every block before it has been parsed."""
    offset = 0
    for b in range(n_blocks):
        if b not in stats:
            return None
        if stats[b]["rejects"]:
            line, reason, raw = stats[b]["rejects"][0]
            return offset + line, {"reason": reason, "raw": raw}
        offset += stats[b]["n_lines"]
    return None


def _tree_merge(client: Any, first_level: list[Any], fan_in: int = 8) -> Any:
    """Future of the merged distinct ids of all blocks: a tree of merges over the first-level merges."""
    level = first_level
    while len(level) > 1:
        level = [client.submit(_merge_uniques, *level[i:i + fan_in], pure=False)
                 for i in range(0, len(level), fan_in)]
    return level[0]


def _write_mappings(tmp: Path, work: Path, uniq: dict[str, Any]) -> dict[str, int]:
    users, items_all, cats_all = uniq["users"], uniq["items"], uniq["cats"]
    categories = sorted_unique(cats_all)
    first = np.ones(len(items_all), dtype=bool)
    first[1:] = items_all[1:] != items_all[:-1]
    items = items_all[first]
    item_cat = _factorise(cats_all[first], categories)   # smallest raw category of each item
    np.save(work / "users.npy", users)
    np.save(work / "items.npy", items)
    np.save(work / "categories.npy", categories)
    pq.write_table(pa.table({"user": np.arange(len(users), dtype=np.int64), "raw_user": users}),
                   tmp / "users.parquet")
    pq.write_table(pa.table({"item": np.arange(len(items), dtype=np.int64), "raw_item": items,
                             "category": item_cat}), tmp / "items.parquet")
    pq.write_table(pa.table({"category": np.arange(len(categories), dtype=np.int64), "raw_category": categories}),
                   tmp / "categories.parquet")
    return {"users": len(users), "items": len(items), "categories": len(categories),
            "items_with_several_categories": int(len(items_all) - len(items))}


def _build(tmp: Path, source: str, cfg: IngestConfig, client: Any) -> dict[str, Any]:
    import dask
    from dask import delayed
    from dask.bytes import read_bytes
    from distributed import span

    started = time.perf_counter()
    gpu = dask.config.get("dataframe.backend", default="pandas") == "cudf"
    fs, path, size = _source_info(source)
    if size == 0:
        raise ValueError(f"{source}: no rows: the file is empty; pass a file with at least one line")
    spec = format_spec(cfg.format, first_line=_first_line(fs, path) if cfg.format == "edgelist" else b"")
    work = tmp / "_work"
    work.mkdir()
    with span(STAGE):
        threads = max(1, sum(client.nthreads().values()))
        _, nested = read_bytes(source, delimiter=b"\n", blocksize=_effective_blocksize(cfg, size, threads),
                               sample=False)
        blocks = [b for per_file in nested for b in per_file]
        parse_task = delayed(_parse_task, pure=True)
        parsed = client.compute([
            parse_task(blk, i, spec, cfg.window, str(work), f"{source} block {i}", cfg.raw_limit)
            for i, blk in enumerate(blocks)])
        stats: dict[int, dict[str, Any]] = {}
        merges: dict[int, Any] = {}   # first-level merges, started as soon as their blocks are parsed
        for fut in track(parsed, "ingest parse"):
            result = fut.result()
            stats[result["index"]] = result
            group = result["index"] // MERGE_FAN_IN
            members = range(group * MERGE_FAN_IN, min((group + 1) * MERGE_FAN_IN, len(blocks)))
            if all(m in stats for m in members):
                merges[group] = client.submit(_merge_blocks, str(work), list(members), pure=False)
            if cfg.on_bad_rows == "error":
                first = _first_error(stats, len(blocks))
                if first is not None:
                    client.cancel(parsed + list(merges.values()))
                    line, rej = first
                    raise ValueError(f"{source}:{line}: {rej['reason']}: {rej['raw']!r} (on_bad_rows=error; "
                                     "fix the line or use --on-bad-rows skip to write it to rejects.parquet)")
        n_blocks = len(blocks)
        log.info("ingest: parsed %d blocks in %.2fs", n_blocks, time.perf_counter() - started)
        n_lines = [stats[b]["n_lines"] for b in range(n_blocks)]
        offsets = np.concatenate([[0], np.cumsum(n_lines)]).astype(np.int64).tolist()
        rejects = [(offsets[b] + line, reason, raw) for b in range(n_blocks)
                   for line, reason, raw in stats[b]["rejects"]]
        n_read = int(offsets[-1])
        n_valid = sum(stats[b]["n_kept"] for b in range(n_blocks))
        if n_read == 0:
            raise ValueError(f"{source}: no rows: the file has no lines")
        if n_valid == 0:
            line, reason, _ = rejects[0]
            raise ValueError(f"{source}: no rows: all {n_read} lines were rejected (first: line {line}, {reason}); "
                             f"check --format (now {cfg.format}) and the window")
        del parsed
        uniq = _tree_merge(client, [merges[g] for g in sorted(merges)], MERGE_FAN_IN).result()
        counts = _write_mappings(tmp, work, uniq)
        log.info("ingest: merged the id mappings at %.2fs", time.perf_counter() - started)
        users = uniq["users"]
        del uniq
        n_parts = _n_partitions(n_valid, cfg.partition_rows)
        cuts = np.linspace(0, len(users), n_parts + 1).astype(np.int64)
        (tmp / "interactions").mkdir()
        part_futs = [
            client.submit(_write_partition, p, int(users[cuts[p]]), int(users[cuts[p + 1] - 1]), n_blocks, offsets,
                          str(work), spec.has_ts, cfg.dedupe, str(tmp / "interactions" / f"part-{p:05d}.parquet"),
                          cfg.compression, gpu, pure=False)
            for p in range(n_parts) if cuts[p + 1] > cuts[p]]
        parts = [f.result() for f in track(part_futs, "ingest write")]
    log.info("ingest: wrote %d parts at %.2fs", len(parts), time.perf_counter() - started)
    shutil.rmtree(work)
    pq.write_table(pa.Table.from_pylist([{"line": ln, "reason": r, "raw": t} for ln, r, t in rejects],
                                        schema=REJECTS_SCHEMA), tmp / "rejects.parquet")
    parts.sort(key=lambda s: s["part"])
    kept = sum(s["rows"] for s in parts)
    beh = np.sum([s["behavior"] for s in parts], axis=0).astype(int).tolist()
    by_reason: dict[str, int] = {}
    for _, reason, _ in rejects:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    ts_min = [s["ts_min"] for s in parts if s["ts_min"] is not None]
    ts_max = [s["ts_max"] for s in parts if s["ts_max"] is not None]
    report = {
        "source": source,
        "format": cfg.format,
        "lines_read": n_read,
        "rows_kept": kept,
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "first_rejects": [{"line": ln, "reason": r, "raw": t} for ln, r, t in rejects[:20]],
        "duplicates": sum(s["duplicates"] for s in parts),
        **counts,
        "ts_min": min(ts_min),
        "ts_max": max(ts_max),
        "ts_synthesised": not spec.has_ts,
        "behavior_counts": dict(zip(BEHAVIORS, beh, strict=True)),
        "behavior_mix": {b: round(c / max(kept, 1), 6) for b, c in zip(BEHAVIORS, beh, strict=True)},
        "backend": "gpu" if gpu else "cpu",
        "blocks": n_blocks,
        "partitions": len(parts),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(tmp / "report.json", report)
    return report


@dataclass(frozen=True)
class _RemoteKey:
    """Stage key of a non-local source: the settings plus the source's URL and fsspec identity."""

    config: dict[str, Any]
    source: str
    size: int
    modified: str


def ingest(run_dir: str | Path, source: str | Path, cfg: IngestConfig | None = None, client: Any = None, *,
           force: bool = False) -> StageOutput:
    """Run the ingest stage (see the module docstring) into ``<run_dir>/ingest/``.

    Args:
        run_dir: the run directory.
        source: input file, a local path or an fsspec URL.
        cfg: settings (default ``IngestConfig()``).
        client: the ``distributed.Client`` to run on (default: the current client, ``get_client()``).
        force: run even if a finished output with the same settings and input exists (default False).

    Returns the :class:`~pipeline.rundir.StageOutput`; ``.report`` is the report described above.
    """
    cfg = cfg or IngestConfig()
    if client is None:
        from distributed import get_client

        client = get_client()
    src = str(source)
    fs, path, size = _source_info(src)
    local = "://" not in src or src.startswith("file://")
    inputs: dict[str, Any] = {"source": path} if local else {}
    key_config: object = cfg if local else _RemoteKey(to_dict(cfg), src, size, str(fs.info(path).get("mtime", "")))
    return run_stage(run_dir, STAGE, config=key_config, inputs=inputs,
                     build=lambda tmp: _build(tmp, src, cfg, client), force=force)


def read_interactions(stage: StageOutput | str | Path) -> pa.Table:
    """The ingested interactions table (all parts, in order) of a finished stage or its directory."""
    path = stage.path if isinstance(stage, StageOutput) else Path(stage)
    parts = sorted((path / "interactions").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else INTERACTIONS_SCHEMA.empty_table()


def register(subparsers: Any) -> None:
    from pipeline.common import add_arguments, add_common_arguments

    p = subparsers.add_parser("ingest", help="validate and factorise a raw interaction log into parquet",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="input file (local path or fsspec URL)")
    add_common_arguments(p)
    add_arguments(p, IngestConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipeline.cluster import cluster_client
    from pipeline.common import cluster_config, from_sources, settings

    toml = settings(args)
    cfg = from_sources(IngestConfig, toml=toml, section=STAGE, args=args)
    _source_info(str(args.source))  # a missing input is reported before a cluster starts
    with cluster_client(cluster_config(args, toml)) as (client, _backend):
        print(f"dask dashboard: {client.dashboard_link}")
        out = ingest(args.run_dir, args.source, cfg, client, force=args.force)
    r = out.report
    state = "up to date (reused)" if out.reused else f"done in {r.get('seconds', 0):.1f}s"
    print(f"ingest {state}: {r['rows_kept']:,} rows kept of {r['lines_read']:,} lines, {r['rejected']:,} rejected "
          f"{r['rejected_by_reason']}, {r['duplicates']:,} duplicates, {r['users']:,} users, {r['items']:,} items, "
          f"{r['categories']:,} categories -> {out.path}")
    return 0
