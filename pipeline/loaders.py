"""Input formats of ``pinsage ingest``: parse one newline-aligned block of a file into validated columns.

Every format goes through :func:`parse_block`, which returns the same raw columns (user, item, category,
behaviour code, timestamp, block-local line number) plus the rejected lines with a reason, so all formats
share the validation rules, the rejects file and the writer in :mod:`pipeline.ingest`.

Formats (``--format``):

* ``taobao`` (default): headerless ``user_id,item_id,category_id,behavior_type,timestamp``; behaviour in
  {pv, buy, cart, fav}; the timestamp must lie in the window (default ``TAOBAO_WINDOW``).
* ``sequence``: ``user item`` separated by one space, each user's lines in time order, no timestamps
  (the SASRec files such as ../shared/data/amazon-videogames/Video.txt). The timestamp is *synthesised* as
  the 0-based index of the line among its user's lines; behaviour is pv; category 0 for every item.
* ``movielens``: ``user item rating ts`` separated by tabs (MovieLens ``u.data``). The rating is validated
  as a number and dropped (the interactions table has no rating column); behaviour pv; category 0.
* ``edgelist``: ``src,dst[,weight][,ts]`` (2, 3 or 4 columns, fixed for the file, detected from its first
  line). src is the user, dst the item; weight validated as a number and dropped; without ts the
  timestamp is synthesised as for ``sequence``.

Validation (identical for every block, whatever its size): an id or timestamp is a non-negative decimal
integer below 10**18 (digits only, leading zeros allowed); a behaviour is one of the four names, exactly;
a number is a decimal float. Rejected lines carry one reason: ``columns`` (wrong column count, including an
empty line), ``non-utf8`` (the line is not valid UTF-8), ``header`` (line 1 of the file whose first field is
not an integer: a header such as ``user_id,item_id,...`` is rejected, never silently taken as data),
``non-integer``, ``non-number``, ``behavior`` (unknown behaviour) and ``window`` (timestamp outside the
window).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipeline.schema import BEHAVIOR_CODES

FormatName = Literal["taobao", "sequence", "movielens", "edgelist"]
FORMATS: tuple[str, ...] = ("taobao", "sequence", "movielens", "edgelist")
FieldKind = Literal["user", "item", "category", "behavior", "ts", "number"]

ID_LIMIT = 10**18
_ID_REGEX = r"^0*[0-9]{1,18}$"  # non-negative decimal integer below 10**18
_NUMBER_REGEX = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
REJECT_REASONS = ("columns", "non-utf8", "header", "non-integer", "non-number", "behavior", "window")


@dataclass(frozen=True)
class FormatSpec:
    """Column layout of one input format."""

    name: str
    delimiter: str
    fields: tuple[FieldKind, ...]

    @property
    def has_ts(self) -> bool:
        return "ts" in self.fields

    @property
    def has_category(self) -> bool:
        return "category" in self.fields

    @property
    def names(self) -> list[str]:
        return [f"f{i}_{kind}" for i, kind in enumerate(self.fields)]


def format_spec(name: str, *, first_line: bytes = b"") -> FormatSpec:
    """The :class:`FormatSpec` of format ``name``; ``edgelist`` counts the columns of ``first_line``."""
    if name == "taobao":
        return FormatSpec("taobao", ",", ("user", "item", "category", "behavior", "ts"))
    if name == "sequence":
        return FormatSpec("sequence", " ", ("user", "item"))
    if name == "movielens":
        return FormatSpec("movielens", "\t", ("user", "item", "number", "ts"))
    if name == "edgelist":
        n = first_line.rstrip(b"\r\n").count(b",") + 1 if first_line.strip() else 2
        layouts: dict[int, tuple[FieldKind, ...]] = {
            2: ("user", "item"), 3: ("user", "item", "number"), 4: ("user", "item", "number", "ts")}
        if n not in layouts:
            raise ValueError(f"edgelist: the first line has {n} columns: expected src,dst[,weight][,ts] "
                             "(2, 3 or 4 comma-separated columns)")
        return FormatSpec("edgelist", ",", layouts[n])
    raise ValueError(f"format={name!r}: must be one of {', '.join(FORMATS)}")


@dataclass
class ParsedBlock:
    """Validated rows of one block (raw ids, not yet factorised) and its rejected lines.

    Shapes: every array in ``columns`` is (n_kept,). ``line`` is the 1-based line number inside the block.
    """

    n_lines: int
    columns: dict[str, np.ndarray]
    rejects: list[tuple[int, str, str]] = field(default_factory=list)  # (block line, reason, raw text)

    @property
    def n_kept(self) -> int:
        return len(self.columns["line"])


def count_lines(data: bytes) -> int:
    """Lines in ``data``: newlines, plus one for a last line without a trailing newline."""
    if not data:
        return 0
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def raw_lines(data: bytes, numbers: np.ndarray, *, limit: int = 200) -> list[str]:
    """Text of the 1-based block lines ``numbers`` (undecodable bytes backslash-escaped, cut at ``limit``)."""
    if len(numbers) == 0:
        return []
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(data)]])
    out = []
    for n in numbers:
        chunk = data[starts[n - 1]:ends[n - 1]].rstrip(b"\r")
        out.append(chunk[:limit].decode("utf-8", errors="backslashreplace"))
    return out


def _is_utf8(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _raw_bytes_of(data: bytes, number: int, ends: np.ndarray) -> bytes:
    start = 0 if number == 1 else int(ends[number - 2]) + 1
    stop = int(ends[number - 1]) if number - 1 < len(ends) else len(data)
    return data[start:stop].rstrip(b"\r")


class _Handler:
    """``invalid_row_handler``: remembers (row number, text) of rows with a wrong column count, skips them."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, row: object) -> str:
        self.rows.append(int(row.number))  # type: ignore[attr-defined]
        return "skip"


def _read(data: bytes, spec: FormatSpec, types: dict[str, pa.DataType]) -> tuple[pa.Table, list[int]]:
    handler = _Handler()
    table = pcsv.read_csv(
        io.BytesIO(data),
        read_options=pcsv.ReadOptions(column_names=spec.names, use_threads=False, block_size=1 << 26),
        parse_options=pcsv.ParseOptions(delimiter=spec.delimiter, quote_char=False, double_quote=False,
                                        escape_char=False, ignore_empty_lines=False,
                                        invalid_row_handler=handler),
        convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                            quoted_strings_can_be_null=False),
    )
    return table, handler.rows


def _forbidden_bytes(spec: FormatSpec) -> tuple[bytes, ...]:
    # Bytes the typed (fast) parser would accept but the strict rule rejects: surrounding blanks, hex,
    # signs; inf/nan for numbers. A block that holds any of them takes the strict (slow) path.
    bad = [b" ", b"\t", b"x", b"X", b"-", b"+"]
    if "number" in spec.fields:
        bad = [b" ", b"\t", b"x", b"X", b"n", b"N", b"i", b"I"]
    return tuple(b for b in bad if b != spec.delimiter.encode())


def _kept_lines(n_lines: int, skipped: list[int], n_rows: int, where: str) -> np.ndarray:
    if n_lines < 0:
        n_lines = n_rows + len(skipped)
    lines = np.arange(1, n_lines + 1, dtype=np.int64)
    if skipped:
        lines = np.delete(lines, np.asarray(skipped, dtype=np.int64) - 1)
    if len(lines) != n_rows:
        raise ValueError(f"{where}: parsed {n_rows} rows from {n_lines} lines; the file has carriage returns "
                         "without newlines or quoted newlines: convert it to one record per '\\n' line")
    return lines


def _fast(data: bytes, spec: FormatSpec, n_lines: int, where: str) -> tuple[pa.Table, np.ndarray, list[int]] | None:
    """Typed parse; None when anything but a wrong column count needs the strict path."""
    if any(b in data for b in _forbidden_bytes(spec)):
        return None
    types: dict[str, pa.DataType] = {}
    for name, kind in zip(spec.names, spec.fields, strict=True):
        types[name] = (pa.dictionary(pa.int32(), pa.string()) if kind == "behavior"
                       else pa.float64() if kind == "number" else pa.int64())
    try:
        table, skipped = _read(data, spec, types)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    for name, kind in zip(spec.names, spec.fields, strict=True):
        col = table[name]
        if col.null_count:
            return None
        if kind == "behavior":
            if any(v not in BEHAVIOR_CODES for chunk in col.chunks for v in chunk.dictionary.to_pylist()):
                return None
        elif kind != "number" and len(col) and (pc.min(col).as_py() < 0 or pc.max(col).as_py() >= ID_LIMIT):
            return None
    return table, _kept_lines(n_lines, skipped, table.num_rows, where), skipped


def _strict(data: bytes, spec: FormatSpec, n_lines: int, where: str
            ) -> tuple[pa.Table, np.ndarray, list[int], dict[int, str]]:
    """Binary parse with per-field validation; returns the valid rows and reasons of the others."""
    table, skipped = _read(data, spec, dict.fromkeys(spec.names, pa.binary()))
    lines = _kept_lines(n_lines, skipped, table.num_rows, where)
    bad_int = np.zeros(table.num_rows, dtype=bool)
    bad_num = np.zeros(table.num_rows, dtype=bool)
    bad_beh = np.zeros(table.num_rows, dtype=bool)
    out: dict[str, pa.Array] = {}
    for name, kind in zip(spec.names, spec.fields, strict=True):
        col = table[name].combine_chunks()
        if kind == "behavior":
            ok = pc.is_in(col, value_set=pa.array([k.encode() for k in BEHAVIOR_CODES], pa.binary()))
            bad_beh |= ~np.asarray(ok.fill_null(False))
            out[name] = col
        elif kind == "number":
            ok = pc.match_substring_regex(col, _NUMBER_REGEX).fill_null(False)
            bad_num |= ~np.asarray(ok)
            out[name] = col
        else:
            ok = pc.match_substring_regex(col, _ID_REGEX).fill_null(False)
            bad_int |= ~np.asarray(ok)
            out[name] = col
    bad = bad_int | bad_num | bad_beh
    reasons: dict[int, str] = {}
    if bad.any():
        # Line-level reasons for the (few) rejected lines; the order says which reason wins.
        newline_ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        for idx in np.flatnonzero(bad):
            line = int(lines[idx])
            raw = _raw_bytes_of(data, line, newline_ends)
            if not raw.strip():
                reasons[line] = "columns"  # an empty line has one (empty) column
            elif not _is_utf8(raw):
                reasons[line] = "non-utf8"
            elif bad_int[idx]:
                reasons[line] = "non-integer"
            elif bad_num[idx]:
                reasons[line] = "non-number"
            else:
                reasons[line] = "behavior"
    keep = pa.array(~bad)
    good = pa.table(out).filter(keep)
    typed = {}
    for name, kind in zip(spec.names, spec.fields, strict=True):
        col = good[name]
        if kind == "behavior":
            typed[name] = col.cast(pa.string())
        elif kind == "number":
            typed[name] = col.cast(pa.float64())
        else:
            typed[name] = col.cast(pa.int64())
    return pa.table(typed), lines[~bad], skipped, reasons


def _behavior_codes(col: pa.ChunkedArray) -> np.ndarray:
    """int8 codes (schema.BEHAVIOR_CODES) of a validated behaviour column (dictionary or string)."""
    parts = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            lut = np.array([BEHAVIOR_CODES[v] for v in chunk.dictionary.to_pylist()] or [0], dtype=np.int8)
            parts.append(lut[chunk.indices.to_numpy(zero_copy_only=False)])
        else:
            idx = pc.index_in(chunk, value_set=pa.array(list(BEHAVIOR_CODES)))
            parts.append(np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int8))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int8)


def parse_block(
    data: bytes,
    spec: FormatSpec,
    *,
    window: tuple[int, int] | None = None,
    first_block: bool = False,
    where: str = "block",
    raw_limit: int = 200,
) -> ParsedBlock:
    """Parse and validate one newline-aligned block of an input file.

    Args:
        data: the block's bytes (whole lines; the last may lack its newline).
        spec: the input format (:func:`format_spec`).
        window: ``(start, end)``: timestamps must satisfy ``start <= ts < end``; None: no window check
            (default None).
        first_block: the block starts at line 1 of the file (a bad line 1 is reported as ``header``)
            (default False).
        where: names the block in errors (default ``"block"``).
        raw_limit: rejected lines' text is cut to this many bytes (default 200).

    A block whose bytes are all plain (digits, delimiters, known behaviour names) is parsed with typed
    columns; any other block is parsed as bytes and validated field by field. Both paths give the same
    result for every line, so the output does not depend on how the file was split into blocks.
    """
    # Every line is a parsed row or a skipped one (ignore_empty_lines=False), so the line count comes from
    # the parse; only a block with carriage returns (which pyarrow also takes as line ends) is counted.
    n_lines = count_lines(data) if (b"\r" in data or not data) else -1
    empty = {k: np.zeros(0, dtype=np.int8 if k == "behavior" else np.int64)
             for k in ("user", "item", "category", "behavior", "ts", "line")}
    if n_lines == 0:
        return ParsedBlock(0, empty)
    fast = _fast(data, spec, n_lines, where)
    if fast is not None:
        table, lines, skipped = fast
        reasons: dict[int, str] = {}
        n_lines = table.num_rows + len(skipped)
    else:
        table, lines, skipped, reasons = _strict(data, spec, n_lines, where)
        n_lines = table.num_rows + len(skipped) + len(reasons)
    for line in skipped:
        reasons[line] = "columns"
    cols: dict[str, np.ndarray] = {}
    n = table.num_rows
    for name, kind in zip(spec.names, spec.fields, strict=True):
        if kind == "behavior":
            cols["behavior"] = _behavior_codes(table[name])
        elif kind != "number":
            cols[kind] = table[name].to_numpy().astype(np.int64, copy=False)
    cols.setdefault("category", np.zeros(n, dtype=np.int64))
    cols.setdefault("behavior", np.zeros(n, dtype=np.int8))
    cols.setdefault("ts", np.zeros(n, dtype=np.int64))
    cols["line"] = lines
    if window is not None and spec.has_ts and n:
        ts = cols["ts"]
        outside = (ts < window[0]) | (ts >= window[1])
        if outside.any():
            for line in lines[outside]:
                reasons[int(line)] = "window"
            cols = {k: v[~outside] for k, v in cols.items()}
    if first_block and 1 in reasons and reasons[1] in ("non-integer", "columns", "non-number", "behavior"):
        first = data.split(b"\n", 1)[0].rstrip(b"\r").split(spec.delimiter.encode(), 1)[0]
        if not re.fullmatch(rb"0*[0-9]{1,18}", first):
            reasons[1] = "header"
    order = np.asarray(sorted(reasons), dtype=np.int64)
    texts = raw_lines(data, order, limit=raw_limit)
    rejects = [(int(n_), reasons[int(n_)], t) for n_, t in zip(order, texts, strict=True)]
    return ParsedBlock(n_lines, cols, rejects)
