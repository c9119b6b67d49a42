"""The synthetic Taobao-format generator (pipeline/generate.py): format, determinism, skew, planted structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.generate import GenerateConfig, generate, items_path
from pipeline.schema import TAOBAO_WINDOW

NAMES = ["user", "item", "category", "behavior", "ts"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pd.DataFrame]:
    path = tmp_path_factory.mktemp("gen") / "ub.csv"
    report = generate(path, GenerateConfig(rows=40_000, seed=7, chunk_rows=5_000, content_dim=8))
    df = pd.read_csv(path, header=None, names=NAMES)
    return path, report, df


def test_exact_taobao_format(sample: tuple[Path, dict, pd.DataFrame]) -> None:
    path, report, df = sample
    first = path.read_text().splitlines()[0].split(",")
    assert len(first) == 5 and first[3] in {"pv", "buy", "cart", "fav"} and first[0].isdigit()
    assert len(df) == report["rows"] == 40_000
    assert df[["user", "item", "category", "ts"]].dtypes.map(lambda d: d.kind).eq("i").all()
    assert df.ts.between(TAOBAO_WINDOW[0], TAOBAO_WINDOW[1] - 1).all()
    assert df.user.nunique() == report["users"]
    assert df.duplicated(["user", "item", "category", "behavior", "ts"]).mean() < 0.01
    # Users and items are separate, overlapping, sparse id spaces: factorisation is needed.
    assert df.user.max() > df.user.nunique() and df.item.max() > df.item.nunique()
    assert len(np.intersect1d(df.user.unique(), df.item.unique())) > 0


def test_rows_grouped_by_user_and_time_ordered(sample: tuple[Path, dict, pd.DataFrame]) -> None:
    _, _, df = sample
    change = df.user.ne(df.user.shift()).cumsum()
    assert change.iloc[-1] == df.user.nunique()             # each user's rows are contiguous
    assert (df.groupby("user", sort=False).ts.diff().dropna() >= 0).all()


def test_behaviour_mix_and_skew(sample: tuple[Path, dict, pd.DataFrame]) -> None:
    _, _, df = sample
    mix = df.behavior.value_counts(normalize=True)
    for name, share in {"pv": 0.896, "cart": 0.055, "fav": 0.029, "buy": 0.020}.items():
        assert abs(mix[name] - share) < 0.01, (name, mix[name])
    counts = df.item.value_counts().to_numpy()               # descending
    top = max(1, len(counts) // 100)
    assert counts[:top].sum() / counts.sum() > 0.08          # top 1 % of items: > 8x their uniform share
    per_user = df.groupby("user").size()
    assert 60 < per_user.mean() < 140 and per_user.max() <= 850 and per_user.max() > 3 * per_user.median()


def test_planted_communities_and_sequences(sample: tuple[Path, dict, pd.DataFrame]) -> None:
    path, report, df = sample
    side = pq.read_table(items_path(path)).to_pandas()
    assert len(side) == report["items"] and side.raw_item.is_unique
    assert np.stack(side.content.to_numpy()).shape == (report["items"], 8)
    comm = df.item.map(side.set_index("raw_item").community)
    assert comm.notna().all()
    # Users stay in their home community: the modal community holds most of a user's rows (strength 0.8).
    modal = comm.groupby(df.user).agg(lambda c: c.value_counts().iloc[0] / len(c))
    assert modal.mean() > 0.6
    # Consecutive rows of a user share a community far more often than chance (1/communities).
    same = (comm.to_numpy()[1:] == comm.to_numpy()[:-1])[df.user.to_numpy()[1:] == df.user.to_numpy()[:-1]]
    assert same.mean() > 0.6
    # Content vectors are closer within a community than across.
    vec = np.stack(side.content.to_numpy())
    centre = np.stack([vec[side.community == c].mean(0) for c in range(report["communities"])])
    own = np.linalg.norm(vec - centre[side.community], axis=1).mean()
    other = np.linalg.norm(vec - centre[(side.community + 1) % report["communities"]], axis=1).mean()
    assert own < 0.6 * other


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    generate(a, GenerateConfig(rows=5_000, seed=3, bad_rows=4))
    generate(b, GenerateConfig(rows=5_000, seed=3, bad_rows=4))
    generate(c, GenerateConfig(rows=5_000, seed=4, bad_rows=4))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert items_path(a).read_bytes() == items_path(b).read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))                  # temp files renamed away


def test_bad_rows_at_reported_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    report = generate(path, GenerateConfig(rows=3_000, seed=1, bad_rows=9, chunk_rows=1_000))
    lines = path.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 3_009 == report["lines"]
    bad = report["bad_lines"]
    assert [b["kind"] for b in bad[:4]] == ["columns", "non-integer", "behavior", "window"]
    for b in bad:
        fields = lines[b["line"] - 1].split(b",")
        if b["kind"] == "columns":
            assert len(fields) == 3
        elif b["kind"] == "non-integer":
            assert not fields[0].isdigit()
        elif b["kind"] == "behavior":
            assert fields[3] == b"click"
        else:
            assert int(fields[4]) < TAOBAO_WINDOW[0]
    bad_lines = {b["line"] for b in bad}
    good = [ln for i, ln in enumerate(lines, 1) if i not in bad_lines]
    assert all(len(g.split(b",")) == 5 and g.split(b",")[3] in (b"pv", b"buy", b"cart", b"fav") for g in good)


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"generate\.community_strength=1\.5: must be a probability"):
        GenerateConfig(community_strength=1.5)
    with pytest.raises(ConfigError, match=r"generate\.behavior_mix"):
        GenerateConfig(behavior_mix=(1.0, 0.0))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.csv"
    assert main(["generate", str(out), "--rows", "2000", "--seed", "5", "--bad-rows", "2"]) == 0
    assert "2,002 lines" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2002
    assert main(["generate", str(out), "--rows", "0"]) == 2
    assert "generate.rows=0: must be at least 1" in capsys.readouterr().err
