"""The ingest stage (pipeline/ingest.py) on real 1- and 2-worker LocalClusters and real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed import Client

from pipeline.cli import main
from pipeline.generate import GenerateConfig, generate
from pipeline.ingest import IngestConfig, ingest, read_interactions
from pipeline.schema import INTERACTION_COLUMNS, TAOBAO_COLUMNS, TAOBAO_WINDOW

T = TAOBAO_WINDOW[0] + 1000
GOOD = [f"{u},{i},{c},{b},{T + k}" for k, (u, i, c, b) in enumerate(
    [(50, 7, 3, "pv"), (50, 9, 3, "buy"), (12, 7, 3, "cart"), (12, 50, 4, "fav"), (99, 9, 3, "pv")])]


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _outputs(out) -> dict[str, pd.DataFrame]:
    frames = {"interactions": read_interactions(out).to_pandas()}
    for name in ("users", "items", "categories", "rejects"):
        frames[name] = pq.read_table(out.path / f"{name}.parquet").to_pandas()
    return frames


def test_real_taobao_sample(tmp_path: Path, taobao_head: Path, dask_client: Client) -> None:
    out = ingest(tmp_path / "run", taobao_head, IngestConfig(blocksize="16 KiB"), dask_client)
    r = out.report
    assert r["lines_read"] == 4321 and r["rows_kept"] == 4320
    assert r["rejected"] == 1 and r["rejected_by_reason"] == {"window": 1}
    rejects = pq.read_table(out.path / "rejects.parquet").to_pylist()
    assert rejects == [{"line": 4171, "reason": "window", "raw": "1000169,1328010,959452,pv,1505117799"}]
    # An independent pandas count of the same file.
    df = pd.read_csv(taobao_head, header=None, names=list(TAOBAO_COLUMNS))
    df = df[df.timestamp.between(TAOBAO_WINDOW[0], TAOBAO_WINDOW[1] - 1)].drop_duplicates()
    assert (r["users"], r["items"], r["categories"]) == (df.user_id.nunique(), df.item_id.nunique(),
                                                         df.category_id.nunique())
    assert r["behavior_counts"] == {b: int((df.behavior_type == b).sum()) for b in ("pv", "fav", "cart", "buy")}
    assert (r["ts_min"], r["ts_max"]) == (df.timestamp.min(), df.timestamp.max())
    t = read_interactions(out)
    assert t.column_names == list(INTERACTION_COLUMNS)
    assert [str(t.schema.field(c).type) for c in INTERACTION_COLUMNS] == ["int64"] * 3 + ["int8", "int64", "int64"]
    f = _outputs(out)
    inter = f["interactions"]
    assert inter.equals(inter.sort_values(["user", "ts", "line"], kind="stable").reset_index(drop=True))
    # Mappings: contiguous ids in sorted raw order; they reproduce every raw value of every kept line.
    assert f["users"].raw_user.is_monotonic_increasing and f["users"].user.tolist() == list(range(r["users"]))
    raw = pd.read_csv(taobao_head, header=None, names=list(TAOBAO_COLUMNS))
    src = raw.iloc[inter.line.to_numpy() - 1]
    assert (f["users"].raw_user.to_numpy()[inter.user] == src.user_id.to_numpy()).all()
    assert (f["items"].raw_item.to_numpy()[inter.item] == src.item_id.to_numpy()).all()
    assert (f["categories"].raw_category.to_numpy()[inter.category] == src.category_id.to_numpy()).all()
    assert ((out.path / "report.json").is_file() and (out.path / "manifest.json").is_file()
            and not (out.path / "_work").exists())


def test_rerun_is_a_no_op(tmp_path: Path, taobao_head: Path, dask_client: Client) -> None:
    first = ingest(tmp_path / "run", taobao_head, IngestConfig(), dask_client)
    again = ingest(tmp_path / "run", taobao_head, IngestConfig(), dask_client)
    assert not first.reused and again.reused and again.key == first.key
    changed = ingest(tmp_path / "run", taobao_head, IngestConfig(check_window=False), dask_client)
    assert not changed.reused and changed.report["rows_kept"] == 4321
    url = ingest(tmp_path / "url", f"file://{taobao_head}", IngestConfig(), dask_client)   # any fsspec URL
    assert url.report["rows_kept"] == 4320 and url.report["rejected_by_reason"] == {"window": 1}


BAD_CASES = {
    "columns": b"1,2,3",
    "non-integer": b"1,abc,3,pv,%d" % T,
    "behavior": b"1,2,3,click,%d" % T,
    "window": b"1,2,3,pv,1400000000",
    "non-utf8": b"1,2,3,\xff\xfe,%d" % T,
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_malformed_line_both_policies(tmp_path: Path, reason: str, dask_client: Client) -> None:
    path = _write(tmp_path / "in.csv", [*GOOD[:3], BAD_CASES[reason], *GOOD[3:]])
    out = ingest(tmp_path / "run", path, IngestConfig(), dask_client)
    assert out.report["rows_kept"] == 5 and out.report["rejected_by_reason"] == {reason: 1}
    rej = pq.read_table(out.path / "rejects.parquet").to_pylist()
    assert [(x["line"], x["reason"]) for x in rej] == [(4, reason)]
    assert 4 not in read_interactions(out)["line"].to_pylist()
    with pytest.raises(ValueError, match=rf"^{path}:4: {reason}: .*on_bad_rows=error"):
        ingest(tmp_path / "run2", path, IngestConfig(on_bad_rows="error"), dask_client)
    assert not (tmp_path / "run2" / "ingest").exists()


def test_header_line(tmp_path: Path, dask_client: Client) -> None:
    path = _write(tmp_path / "h.csv", [",".join(TAOBAO_COLUMNS), *GOOD])
    out = ingest(tmp_path / "run", path, IngestConfig(), dask_client)
    assert out.report["rejected_by_reason"] == {"header": 1} and out.report["rows_kept"] == 5
    with pytest.raises(ValueError, match=rf"^{path}:1: header: 'user_id,item_id"):
        ingest(tmp_path / "run", path, IngestConfig(on_bad_rows="error"), dask_client)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_empty_missing_and_all_bad_files(tmp_path: Path, policy: str, dask_client: Client) -> None:
    cfg = IngestConfig(on_bad_rows=policy)  # type: ignore[arg-type]
    empty = _write(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match=r"empty.csv: no rows: the file is empty"):
        ingest(tmp_path / "run", empty, cfg, dask_client)
    with pytest.raises(FileNotFoundError, match=r"nope.csv: no such file"):
        ingest(tmp_path / "run", tmp_path / "nope.csv", cfg, dask_client)
    junk = _write(tmp_path / "junk.csv", ["a b c", "d e f"])
    match = "no rows: all 2 lines were rejected" if policy == "skip" else "junk.csv:1: header"
    with pytest.raises(ValueError, match=match):
        ingest(tmp_path / "run", junk, cfg, dask_client)


def test_duplicates_removed_keeping_first_line(tmp_path: Path, dask_client: Client) -> None:
    filler = [f"{7000 + k},1,1,pv,{T + k}" for k in range(300)]      # spreads the copies over blocks
    path = _write(tmp_path / "d.csv", [GOOD[0], GOOD[1], *filler, GOOD[0], GOOD[2], GOOD[0]])
    out = ingest(tmp_path / "run", path, IngestConfig(blocksize="1 KiB"), dask_client)
    assert out.report["blocks"] > 3
    assert out.report["duplicates"] == 2 and out.report["rows_kept"] == 303
    lines = read_interactions(out)["line"].to_pylist()
    assert 1 in lines and 303 not in lines and 305 not in lines and 304 in lines
    kept = ingest(tmp_path / "run", path, IngestConfig(blocksize="1 KiB", dedupe=False), dask_client)
    assert kept.report["rows_kept"] == 305


def test_same_result_for_workers_and_block_sizes(tmp_path: Path, dask_client: Client,
                                                 dask_client_1: Client) -> None:
    path = tmp_path / "gen.csv"
    gen = generate(path, GenerateConfig(rows=20_000, seed=11, bad_rows=12, chunk_rows=4_000))
    with path.open("ab") as f:                                 # an exact duplicate of line 1 at the end
        f.write(path.read_bytes().split(b"\n", 1)[0] + b"\n")
    runs = [
        ingest(tmp_path / "a", path, IngestConfig(blocksize="64 KiB", partition_rows=5_000), dask_client),
        ingest(tmp_path / "b", path, IngestConfig(blocksize="200 KiB", partition_rows=5_000), dask_client),
        ingest(tmp_path / "c", path, IngestConfig(blocksize="64 KiB", partition_rows=5_000), dask_client_1),
    ]
    assert runs[0].report["blocks"] != runs[1].report["blocks"]
    ref = _outputs(runs[0])
    for other in runs[1:]:
        got = _outputs(other)
        for name, frame in ref.items():
            pd.testing.assert_frame_equal(got[name], frame, check_exact=True)
    assert sorted(p.name for p in (runs[0].path / "interactions").iterdir()) == \
        sorted(p.name for p in (runs[2].path / "interactions").iterdir())
    r = runs[0].report
    # Every malformed line of the generator is caught, at its line number, with its kind as the reason.
    rej = ref["rejects"]
    assert list(zip(rej.line, rej.reason, strict=True)) == [(b["line"], b["kind"]) for b in gen["bad_lines"]]
    assert r["duplicates"] >= 1 and gen["lines"] + 1 not in set(ref["interactions"].line)
    assert r["rows_kept"] + r["duplicates"] == gen["rows"] + 1
    assert r["users"] == gen["users"] and r["partitions"] == 5  # ceil(20,001 valid rows / 5,000)
    assert abs(r["behavior_mix"]["pv"] - 0.896) < 0.02


def test_sequence_format_real_amazon(tmp_path: Path, amazon_videogames: Path, dask_client: Client) -> None:
    out = ingest(tmp_path / "run", amazon_videogames, IngestConfig(format="sequence", blocksize="1 MiB"),
                 dask_client)
    r = out.report
    assert (r["lines_read"], r["rows_kept"], r["rejected"]) == (287_107, 287_107, 0)
    assert (r["users"], r["items"], r["categories"]) == (31_013, 23_715, 1) and r["ts_synthesised"]
    t = read_interactions(out).to_pandas()
    # ts is each row's index among its user's lines, which are in file order.
    assert (t.groupby("user").ts.transform(lambda s: np.arange(len(s))) == t.ts).all()
    assert t.groupby("user").line.apply(lambda s: s.is_monotonic_increasing).all()
    raw = pd.read_csv(amazon_videogames, sep=" ", header=None, names=["u", "i"])
    users = pq.read_table(out.path / "users.parquet").to_pandas()
    assert (users.raw_user.to_numpy()[t.user] == raw.u.to_numpy()[t.line - 1]).all()


def test_movielens_and_edgelist(tmp_path: Path, dask_client: Client) -> None:
    ml = _write(tmp_path / "u.data", ["196\t242\t3\t881250949", "186\t302\t3.5\t891717742",
                                      "196\t377\t1\t878887116", "22\tx\t1\t878887116"])
    out = ingest(tmp_path / "ml", ml, IngestConfig(format="movielens"), dask_client)
    t = read_interactions(out).to_pandas()
    assert out.report["rejected_by_reason"] == {"non-integer": 1}
    assert t.line.tolist() == [2, 3, 1] and t.ts.tolist() == [891717742, 878887116, 881250949]
    el = _write(tmp_path / "e.csv", ["5,6", "5,7", "6,5", "5,6"])
    out = ingest(tmp_path / "el", el, IngestConfig(format="edgelist"), dask_client)
    t = read_interactions(out).to_pandas()
    assert t.ts.tolist() == [0, 1, 2, 0] and out.report["duplicates"] == 0 and out.report["rows_kept"] == 4


def test_cli_ingest(tmp_path: Path, taobao_head: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", str(tmp_path / "missing.csv"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pinsage ingest: error: ") and "missing.csv: no such file" in err and "\n" not in err
    args = ["ingest", str(taobao_head), "--run-dir", str(tmp_path / "r"), "--workers", "1",
            "--dashboard-address", "127.0.0.1:0", "--backend", "cpu"]
    assert main(args) == 0
    assert "4,320 rows kept of 4,321 lines" in capsys.readouterr().out
    assert main(args) == 0
    assert "up to date (reused)" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_backend_gives_the_cpu_result(tmp_path: Path, dask_client: Client) -> None:
    import dask

    path = tmp_path / "gen.csv"
    generate(path, GenerateConfig(rows=20_000, seed=2, bad_rows=4))
    with path.open("ab") as f:
        f.write(path.read_bytes().split(b"\n", 1)[0] + b"\n")
    cpu = ingest(tmp_path / "cpu", path, IngestConfig(partition_rows=5_000), dask_client)
    with dask.config.set({"dataframe.backend": "cudf"}):
        gpu = ingest(tmp_path / "gpu", path, IngestConfig(partition_rows=5_000), dask_client)
    assert gpu.report["backend"] == "gpu" and gpu.report["duplicates"] == cpu.report["duplicates"] >= 1
    for name, frame in _outputs(cpu).items():
        pd.testing.assert_frame_equal(_outputs(gpu)[name], frame, check_exact=True)
