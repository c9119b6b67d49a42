"""Block parsing and validation of every input format (pipeline/loaders.py), one process, no Dask."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.loaders import count_lines, format_spec, parse_block
from pipeline.schema import TAOBAO_WINDOW

W = TAOBAO_WINDOW
T = W[0] + 100
TAOBAO = format_spec("taobao")


def _reasons(block):
    return [(line, reason) for line, reason, _ in block.rejects]


def test_clean_block_keeps_every_line_with_its_number() -> None:
    data = f"5,7,9,pv,{T}\n3,8,9,buy,{T + 1}\n5,7,9,fav,{T + 2}\n".encode()
    b = parse_block(data, TAOBAO, window=W)
    assert b.n_lines == 3 and b.rejects == []
    assert b.columns["line"].tolist() == [1, 2, 3]
    assert b.columns["user"].tolist() == [5, 3, 5]
    assert b.columns["behavior"].tolist() == [0, 3, 1]          # pv, buy, fav in BEHAVIORS order
    assert b.columns["ts"].tolist() == [T, T + 1, T + 2]


@pytest.mark.parametrize(("line", "reason"), [
    (b"1,2,3", "columns"),
    (b"1,2,3,pv,5,6", "columns"),
    (b"", "columns"),
    (b"1,2x,3,pv,%d" % T, "non-integer"),
    (b"-1,2,3,pv,%d" % T, "non-integer"),
    (b" 1,2,3,pv,%d" % T, "non-integer"),
    (b"0x10,2,3,pv,%d" % T, "non-integer"),
    (b"1,2,3,pv,", "non-integer"),
    (b"1,2,3,click,%d" % T, "behavior"),
    (b"1,2,3,PV,%d" % T, "behavior"),
    (b"1,2,3,pv,%d" % (W[0] - 1), "window"),
    (b"1,2,3,pv,%d" % W[1], "window"),
    (b"1,\xff\xfe,3,pv,%d" % T, "non-utf8"),
    (b"1,2,3,p\xe9,%d" % T, "non-utf8"),
])
def test_each_bad_line_is_rejected_with_its_reason_and_text(line: bytes, reason: str) -> None:
    data = b"7,8,9,pv,%d\n%s\n7,8,9,cart,%d\n" % (T, line, T + 5)
    b = parse_block(data, TAOBAO, window=W)
    assert _reasons(b) == [(2, reason)]
    assert b.columns["line"].tolist() == [1, 3]
    assert b.rejects[0][2] == line.decode("utf-8", errors="backslashreplace")


def test_header_on_line_one_is_reported_as_header_only_in_the_first_block() -> None:
    data = f"user_id,item_id,category_id,behavior_type,timestamp\n1,2,3,pv,{T}\n".encode()
    assert _reasons(parse_block(data, TAOBAO, window=W, first_block=True)) == [(1, "header")]
    assert _reasons(parse_block(data, TAOBAO, window=W, first_block=False)) == [(1, "non-integer")]


def test_fast_and_strict_paths_agree() -> None:
    # The same good lines, once in a clean block (typed parse) and once beside a bad line (strict parse).
    good = f"0007,2,3,pv,{T}\n1,2,3,cart,{T + 9}\n".encode()
    fast = parse_block(good, TAOBAO, window=W)
    strict = parse_block(good + b"bad\n", TAOBAO, window=W)
    for k in fast.columns:
        np.testing.assert_array_equal(fast.columns[k], strict.columns[k])
    assert fast.columns["user"].tolist() == [7, 1]


def test_ids_of_19_digits_are_rejected() -> None:
    data = f"{10**18},2,3,pv,{T}\n{10**18 - 1},2,3,pv,{T}\n".encode()
    b = parse_block(data, TAOBAO, window=W)
    assert _reasons(b) == [(1, "non-integer")]
    assert b.columns["user"].tolist() == [10**18 - 1]


def test_crlf_and_missing_final_newline() -> None:
    data = f"1,2,3,pv,{T}\r\n4,5,6,buy,{T}".encode()
    b = parse_block(data, TAOBAO, window=W)
    assert count_lines(data) == 2 and b.columns["user"].tolist() == [1, 4] and b.rejects == []


def test_sequence_movielens_and_edgelist_layouts() -> None:
    seq = parse_block(b"1 10\n1 11\n2 10\n2\n", format_spec("sequence"))
    assert seq.columns["item"].tolist() == [10, 11, 10] and _reasons(seq) == [(4, "columns")]
    ml = parse_block(b"1\t10\t4.5\t100\n2\t11\tx\t5\n", format_spec("movielens"))
    assert ml.columns["ts"].tolist() == [100] and _reasons(ml) == [(2, "non-number")]
    spec = format_spec("edgelist", first_line=b"1,2,0.5")
    assert spec.fields == ("user", "item", "number") and not spec.has_ts
    el = parse_block(b"1,2,0.5\n3,4,1e3\n5,6,nan\n", spec)
    assert el.columns["user"].tolist() == [1, 3] and _reasons(el) == [(3, "non-number")]
    with pytest.raises(ValueError, match="edgelist: the first line has 5 columns"):
        format_spec("edgelist", first_line=b"1,2,3,4,5")


def test_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="format='csv': must be one of taobao"):
        format_spec("csv")


@pytest.mark.parametrize("data", [
    f"1,2,3,pv,{T}\n\n".encode(),
    f"\n1,2,3,pv,{T}".encode(),
    f"1,2,3,pv,{T}\n\n\n4,5,6,buy,{T}\n".encode(),
    f"1,2,3,pv,{T}\r\n\r\n4,5,6,buy,{T}\r\n".encode(),
])
def test_line_count_from_the_parse_matches_the_newlines(data: bytes) -> None:
    b = parse_block(data, TAOBAO, window=W)
    assert b.n_lines == count_lines(data)
    assert b.n_kept + len(b.rejects) == b.n_lines
    assert all(reason == "columns" for _, reason, _ in b.rejects)


def test_lone_carriage_returns_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"carriage returns without newlines"):
        parse_block(f"1,2,3,pv,{T}\r4,5,6,pv,{T}\n".encode(), TAOBAO, window=W, where="f.csv block 0")
