"""``pinsage update`` on a real run (ingest, split, graph on a 2-worker LocalCluster): validation as ingest, id
mapping of new users / items / categories, the log, and the live graph equal to a rebuild from all interactions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client

from gnn.evolving import build_store
from gnn.graphstore import GraphStore
from gnn.walks import WalkConfig
from pipeline.cli import main
from pipeline.graph import GraphConfig, build_graph
from pipeline.ingest import IngestConfig, ingest
from pipeline.schema import TAOBAO_WINDOW
from pipeline.split import SplitConfig, read_part, split
from pipeline.update import UpdateConfig, append_interactions, open_live_graph
from tests.gnn.test_evolving import assert_same_graph

T0 = TAOBAO_WINDOW[0]
BEHAVIOR = ("pv", "fav", "cart", "buy")
CFG = WalkConfig(n_walks=6, hops=2, top_t=4, n_hard_negatives=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, dask_client: Client) -> Path:
    """A run with ingest, split (last day held out) and graph of 400 rows: raw users 1000.., items 500.., cats 7-9."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(400):
        item = 500 + int(rng.integers(0, 40))
        lines.append(f"{1000 + int(rng.integers(0, 30))},{item},{7 + item % 3},{BEHAVIOR[int(rng.integers(0, 4))]},"
                     f"{T0 + int(rng.integers(0, 5 * 86_400))}")
    root = tmp_path_factory.mktemp("update")
    (root / "base.csv").write_text("\n".join(lines) + "\n")
    ingest(root / "run", root / "base.csv", IngestConfig(), dask_client)
    split(root / "run", SplitConfig(mode="last_day"), dask_client)
    build_graph(root / "run", GraphConfig(), dask_client)
    return root / "run"


def expected_store(run: Path, new_rows: list[tuple[int, int, int, int, int]]) -> GraphStore:
    """Rebuild from the train split plus ``new_rows`` (raw user, raw item, raw category, behaviour, ts)."""
    train = read_part(split_output(run), "train")
    users = pd.read_parquet(run / "ingest" / "users.parquet")
    items = pd.read_parquet(run / "ingest" / "items.parquet")
    cats = pd.read_parquet(run / "ingest" / "categories.parquet")
    umap = dict(zip(users.raw_user, users.user, strict=True))
    imap = dict(zip(items.raw_item, items.item, strict=True))
    cmap = dict(zip(cats.raw_category, cats.category, strict=True))
    item_category = list(items.sort_values("item").category)
    for ru, ri, rc, _, _ in new_rows:  # new ids in order of the raw ids (one new of each kind here)
        umap.setdefault(ru, len(umap))
        cmap.setdefault(rc, len(cmap))
        if ri not in imap:
            imap[ri] = len(imap)
            item_category.append(cmap[rc])
    new = np.array([(umap[u], imap[i], b, t) for u, i, _, b, t in new_rows], np.int64).reshape(-1, 4)
    return build_store(n_users=len(umap), n_items=len(imap), n_categories=len(cmap),
                       user=np.concatenate([train.user, new[:, 0]]), item=np.concatenate([train.item, new[:, 1]]),
                       behavior=np.concatenate([train.behavior, new[:, 2]]), ts=np.concatenate([train.ts, new[:, 3]]),
                       item_category=np.array(item_category))


def split_output(run: Path):  # type: ignore[no-untyped-def]
    from pipeline.rundir import read_stage

    return read_stage(run, "split")


def test_update_validates_maps_ids_logs_and_the_live_graph_equals_a_rebuild(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = T0 + 6 * 86_400
    good = [(1003, 505, 7 + 505 % 3, 3, t), (1004, 510, 7 + 510 % 3, 0, t + 1), (5000, 505, 7 + 505 % 3, 1, t + 2),
            (1003, 9000, 77, 2, t + 3)]
    text = [f"{u},{i},{c},{BEHAVIOR[b]},{ts}" for u, i, c, b, ts in good]
    text += [text[0], "abc,505,7,pv,1511600000", "1003,505,7,click,1511600000", "1003,505,7,pv,100", "1003,505"]
    (tmp_path / "new.csv").write_text("\n".join(text) + "\n")
    assert main(["update", str(tmp_path / "new.csv"), "--run-dir", str(run)]) == 0
    assert "4 interactions appended of 9 lines, 4 rejected" in capsys.readouterr().out
    r = json.loads((run / "live" / "last_update.json").read_text())
    assert r["rejected_by_reason"] == {"behavior": 1, "columns": 1, "non-integer": 1, "window": 1}
    assert [x["line"] for x in r["first_rejects"]] == [6, 7, 8, 9]
    assert (r["duplicates"], r["new_users"], r["new_items"], r["new_categories"], r["version"]) == (1, 1, 1, 1, 1)

    live = open_live_graph(run, CFG)
    assert live.current.number == 1
    assert_same_graph(live.current.store, expected_store(run, good))

    # a second update: the new user of the first is known now (same id), and the serving graph catches up
    more = [(5000, 510, 7 + 510 % 3, 0, t + 10), (1004, 9000, 77, 3, t + 11)]
    (tmp_path / "more.csv").write_text("".join(f"{u},{i},{c},{BEHAVIOR[b]},{ts}\n" for u, i, c, b, ts in more))
    r2 = append_interactions(run, tmp_path / "more.csv")
    assert (r2["new_users"], r2["new_items"], r2["version"]) == (0, 0, 2)
    assert live.catch_up().number == 2
    assert_same_graph(live.current.store, expected_store(run, good + more))
    assert live.current.store.n_users == expected_store(run, good).n_users


def test_update_errors_are_one_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.csv").write_text("1003,505,7,pv,1511600000\nxyz,505,7,pv,1511600000\n")
    assert main(["update", str(tmp_path / "bad.csv"), "--run-dir", str(run), "--on-bad-rows", "error"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path / 'bad.csv'}:2: non-integer" in err
    assert main(["update", str(tmp_path / "absent.csv"), "--run-dir", str(run)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="on_bad_rows"):
        UpdateConfig(on_bad_rows="drop")  # type: ignore[arg-type]
