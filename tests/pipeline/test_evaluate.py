"""The evaluate stage end to end: a split written through run_stage, embeddings on disk, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.evaluate import EMBEDDINGS, REPORT, EvalConfig, evaluate, evaluate_tables, format_table, read_report
from pipeline.rundir import StageError, run_stage
from pipeline.schema import INTERACTION_COLUMNS

N_USERS, N_ITEMS, STEPS = 30, 40, 12
DAY = 86_400


def chain_interactions() -> pd.DataFrame:
    """Every user walks the item ring i, i+1, i+2, ... one step a minute, four steps a day."""
    rows = []
    line = 0
    for u in range(N_USERS):
        start = (7 * u) % N_ITEMS
        for s in range(STEPS):
            line += 1
            rows.append((u, (start + s) % N_ITEMS, 0, 0 if s % 5 else 3, (s // 4) * DAY + 60 * s + u, line))
    df = pd.DataFrame(rows, columns=["user", "item", "category", "behavior", "ts", "line"])
    df["category"] = df["item"] % 3
    return df[list(INTERACTION_COLUMNS)]


def write_split(run: Path) -> None:
    df = chain_interactions()
    day = df["ts"] // DAY

    def build(tmp: Path) -> dict[str, int]:
        for name, mask in (("train", day == 0), ("valid", day == 1), ("test", day == 2)):
            df[mask].to_parquet(tmp / f"{name}.parquet", index=False)
        return {"rows": len(df)}

    run_stage(run, "split", config=EvalConfig(), inputs={}, build=build)


def ring_embeddings() -> np.ndarray:
    """Item i on the unit circle: its nearest items are i - 1 and i + 1, so the next item ranks near the top."""
    angle = 2 * np.pi * np.arange(N_ITEMS) / N_ITEMS
    return np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


def test_stage_scores_gnn_and_baselines_by_the_same_code(tmp_path: Path) -> None:
    write_split(tmp_path)
    (tmp_path / "train").mkdir()
    np.save(tmp_path / EMBEDDINGS, ring_embeddings())
    cfg = EvalConfig(ks=(1, 10), window_s=None)
    out = evaluate(tmp_path, cfg)
    report = json.loads((out.path / REPORT).read_text())
    assert report["embeddings"] == str(tmp_path / EMBEDDINGS)
    a_test = report["protocol_a"]["test"]
    # each user has 4 test rows: 4 pairs (the first from the last valid item), no self-pairs
    assert a_test["n_pairs"] == 4 * N_USERS
    i2i = a_test["item_to_item"]
    assert set(i2i) == {"random", "popularity", "itemcf", "cooccurrence", "gnn"}
    # the ring embedding puts the next item at position 1 or 2 (tied with the previous one): hit@1 = 1/2
    assert i2i["gnn"]["hit@1"] == pytest.approx(0.5)
    assert i2i["gnn"]["hit@10"] == pytest.approx(1.0)
    assert i2i["random"]["hit@10"] < 0.6
    u2i = a_test["user_to_item"]
    assert u2i["gnn"]["n_evaluated"] == N_USERS and u2i["gnn"]["n_excluded"] == 0
    # user→item from the last seen item: the next item is the only unseen neighbour: rank 1
    assert u2i["gnn"]["hit@1"] == pytest.approx(1.0)
    assert u2i["gnn"]["precision@1"] == pytest.approx(1.0) and u2i["gnn"]["recall@10"] == pytest.approx(1.0)
    b = report["protocol_b"]["test"]
    assert b["models"]["gnn"]["hit@10"] == pytest.approx(1.0) and b["n_users"] == N_USERS
    table = format_table(report)
    assert table.splitlines()[1].startswith("model") and "gnn" in table and "HR@10 test" in table
    # same inputs and config: a no-op
    assert evaluate(tmp_path, cfg).reused


def test_in_memory_embeddings_and_missing_split(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="pinsage split"):
        evaluate(tmp_path / "nothing", EvalConfig())
    write_split(tmp_path)
    out = evaluate(tmp_path, EvalConfig(ks=(5,), holdouts=("valid",), protocol_b=False, baselines=("popularity",)),
                   embeddings=ring_embeddings())
    report = read_report(tmp_path)
    assert report["embeddings"] == "in-memory" and not out.reused
    assert set(report["protocol_a"]) == {"valid"} and "protocol_b" not in report
    assert set(report["protocol_a"]["valid"]["item_to_item"]) == {"popularity", "gnn"}
    with pytest.raises(ValueError, match="rows"):
        evaluate(tmp_path, EvalConfig(), embeddings=ring_embeddings()[:5])


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.ks"):
        EvalConfig(ks=(0,))
    with pytest.raises(ConfigError, match=r"evaluate\.baselines"):
        EvalConfig(baselines=("knn",))


def test_cli_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_split(tmp_path)
    assert main(["evaluate", "--run-dir", str(tmp_path), "--ks", "5,10", "--max-users", "20"]) == 0
    printed = capsys.readouterr().out
    assert "i2i hit@5" in printed and "itemcf" in printed and "report:" in printed
    assert main(["evaluate", "--run-dir", str(tmp_path), "--ks", "0"]) == 2
    assert "evaluate.ks" in capsys.readouterr().err


def test_an_empty_holdout_is_reported_without_averages() -> None:
    df = chain_interactions()
    day = df["ts"] // DAY
    report = evaluate_tables({"train": df[day <= 1], "valid": df[day > 5], "test": df[day == 2]},
                             EvalConfig(ks=(5,), protocol_b=False))
    valid = report["protocol_a"]["valid"]
    assert valid["n_pairs"] == 0 and valid["item_to_item"]["itemcf"] == {"n_evaluated": 0, "n_excluded": 0,
                                                                         "seconds": pytest.approx(0.0, abs=1.0)}
    assert "hit@5" in report["protocol_a"]["test"]["item_to_item"]["itemcf"]
    lines = format_table(report).splitlines()
    assert any(line.startswith("itemcf") and line.split()[1:] == ["-"] * 6 for line in lines)
