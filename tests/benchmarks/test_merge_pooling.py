"""benchmarks/merge_pooling.py: runs of one setting merged seed by seed, on hand-written bench_pooling results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.merge_pooling import main

SETTING = {"dataset": "generated", "generate": {"rows": 1000, "seed": 0}, "generate_overrides": {},
           "model_overrides": {"embed_dim": 8}, "train_overrides": {"epochs": 2}, "walk_overrides": {},
           "split": {"train": 900}, "items": 50, "users": 10}


def metrics(hit: float, mrr: float) -> dict[str, float]:
    return {"test hit@10": hit, "test mrr": mrr}


def run(rows: list[tuple[int, dict[str, dict[str, float]]]], **extra: Any) -> dict[str, Any]:
    per_seed = [{"seed": s, "training": {m: {"epochs": 2} for m in ms}, "metrics": ms} for s, ms in rows]
    return {**SETTING, "per_seed": per_seed, "command": f"python bench_pooling.py --seeds {rows[0][0]}",
            "seconds": 1.0, "machine": {"nproc": 2}, **extra}


def write(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_merge_unions_models_per_seed_pairs_on_shared_seeds_and_keeps_other_runs(tmp_path: Path) -> None:
    base = {"itemcf": metrics(0.40, 0.20), "cooccurrence": metrics(0.30, 0.10)}
    a = write(tmp_path / "a.json", run([(0, {"pinsage": metrics(0.45, 0.22), "graphsage": metrics(0.44, 0.23)}),
                                        (1, {"pinsage": metrics(0.41, 0.19), "graphsage": metrics(0.39, 0.18)})],
                                       baselines_same_split=base))
    b = write(tmp_path / "b.json", run([(0, {"pinsage_mean": metrics(0.43, 0.22)})]))
    into = write(tmp_path / "pool.json", {"runs": {"older": {"seeds": [5]}}, "note": "kept"})
    note = tmp_path / "note.txt"
    note.write_text("two runs of one setting\n")
    assert main([str(a), str(b), "--name", "merged", "--into", str(into), "--note-file", str(note)]) == 0
    out = json.loads(into.read_text())
    assert out["note"] == "kept" and out["runs"]["older"] == {"seeds": [5]}
    rec = out["runs"]["merged"]
    assert rec["models"] == ["pinsage", "pinsage_mean", "graphsage"] and rec["seeds"] == [0, 1]
    assert sorted(rec["per_seed"][0]["metrics"]) == ["graphsage", "pinsage", "pinsage_mean"]
    vs_graphsage = rec["paired"]["pinsage - graphsage"]
    assert vs_graphsage["seeds"] == [0, 1]
    assert vs_graphsage["test hit@10"]["per_seed"] == [0.01, 0.02]
    assert vs_graphsage["test mrr"]["n_positive"] == 1  # -0.01, +0.01
    # 95 % interval of the mean of (0.01, 0.02): 0.015 ± 12.7062 · 0.00707 / √2
    assert vs_graphsage["test hit@10"]["ci95"] == pytest.approx([0.015 - 0.06353, 0.015 + 0.06353], abs=1e-4)
    vs_mean = rec["paired"]["pinsage - pinsage_mean"]
    assert vs_mean["seeds"] == [0] and vs_mean["test hit@10"]["per_seed"] == [0.02]
    assert vs_mean["test hit@10"]["ci95"] is None
    assert rec["mean"]["pinsage"] == {"test hit@10": 0.43, "test mrr": 0.205}
    assert rec["mean"]["pinsage_mean"] == {"test hit@10": 0.43, "test mrr": 0.22}
    assert rec["vs_baselines"]["pinsage - itemcf"]["test hit@10"]["per_seed"] == [0.05, 0.01]
    assert rec["vs_baselines"]["pinsage_mean - cooccurrence"]["test mrr"]["per_seed"] == [0.12]
    assert rec["baselines_same_split"] == base and rec["note"] == "two runs of one setting"
    assert rec["command"] == ["python bench_pooling.py --seeds 0", "python bench_pooling.py --seeds 0"]


def test_merge_refuses_other_settings_a_model_given_twice_and_foreign_baselines(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", run([(0, {"pinsage": metrics(0.45, 0.22)})]))
    other = write(tmp_path / "o.json", {**run([(1, {"pinsage": metrics(0.4, 0.2)})]),
                                        "train_overrides": {"epochs": 4}})
    into = tmp_path / "pool.json"
    with pytest.raises(SystemExit, match=r"o\.json: train_overrides differs"):
        main([str(a), str(other), "--name", "x", "--into", str(into)])
    again = write(tmp_path / "again.json", run([(0, {"pinsage": metrics(0.45, 0.22)})]))
    with pytest.raises(SystemExit, match=r"seed 0 of \['pinsage'\] is also in an earlier file"):
        main([str(a), str(again), "--name", "x", "--into", str(into)])
    foreign = write(tmp_path / "f.json", {**run([(0, {"pinsage": metrics(0.4, 0.2)})]), "split": {"train": 1},
                                          "baselines_same_split": {}})
    with pytest.raises(SystemExit):
        main([str(a), "--name", "x", "--into", str(into), "--baselines-from", str(foreign)])
    empty = write(tmp_path / "e.json", {**SETTING, "per_seed": []})
    with pytest.raises(SystemExit, match="no finished seed"):
        main([str(empty), "--name", "x", "--into", str(into)])
    assert not into.exists()  # nothing written by a refused merge


def test_walk_free_rows_come_from_another_walk_setting_and_are_checked_where_both_have_them(tmp_path: Path) -> None:
    walks500 = {"walk_overrides": {"n_walks": 500}}
    a = write(tmp_path / "w500.json", run([(0, {"pinsage": metrics(0.47, 0.24), "graphsage": metrics(0.44, 0.23)}),
                                           (1, {"pinsage": metrics(0.42, 0.20), "pinsage_mean": metrics(0.41, 0.2)})],
                                          **walks500))
    old = write(tmp_path / "w50.json", run([(0, {"pinsage": metrics(0.45, 0.22), "graphsage": metrics(0.44, 0.23)}),
                                            (1, {"pinsage": metrics(0.41, 0.19), "graphsage": metrics(0.39, 0.18),
                                                 "graphsage_distinct": metrics(0.38, 0.17)}),
                                            (2, {"graphsage": metrics(0.5, 0.3)})]))
    into = tmp_path / "pool.json"
    assert main([str(a), "--name", "w500", "--into", str(into), "--walk-free-from", str(old)]) == 0
    rec = json.loads(into.read_text())["runs"]["w500"]
    assert rec["seeds"] == [0, 1] and rec["models"] == ["pinsage", "pinsage_mean", "graphsage", "graphsage_distinct"]
    seed1 = rec["per_seed"][1]["metrics"]
    assert seed1["pinsage"] == metrics(0.42, 0.20)  # PinSage reads the walks: never taken from the other setting
    assert seed1["graphsage"] == metrics(0.39, 0.18) and seed1["graphsage_distinct"] == metrics(0.38, 0.17)
    assert rec["walk_free_borrowed"] == ["graphsage seed 1", "graphsage_distinct seed 1"]
    assert rec["paired"]["pinsage - graphsage"]["test hit@10"]["per_seed"] == [0.03, 0.03]
    assert rec["walk_free_commands"] == ["python bench_pooling.py --seeds 0"]

    drifted = write(tmp_path / "drift.json", run([(0, {"graphsage": metrics(0.43, 0.23)})]))
    with pytest.raises(SystemExit, match="seed 0 of 'graphsage' differs between the walk settings"):
        main([str(a), "--name", "x", "--into", str(tmp_path / "n.json"), "--walk-free-from", str(drifted)])
    other = write(tmp_path / "o.json", {**run([(0, {"graphsage": metrics(0.44, 0.23)})]),
                                        "model_overrides": {"embed_dim": 16}})
    with pytest.raises(SystemExit, match=r"o\.json: model_overrides differs .* and the model's n_neighbors may differ"):
        main([str(a), "--name", "x", "--into", str(tmp_path / "n.json"), "--walk-free-from", str(other)])
    t25 = write(tmp_path / "t25.json", {**run([(0, {"pinsage": metrics(0.48, 0.25)})], **walks500),
                                        "model_overrides": {"embed_dim": 8, "n_neighbors": 25}})  # T: PinSage only
    assert main([str(t25), "--name", "t25", "--into", str(into), "--walk-free-from", str(old)]) == 0
    assert json.loads(into.read_text())["runs"]["t25"]["per_seed"][0]["metrics"]["graphsage"] == metrics(0.44, 0.23)
    hard = write(tmp_path / "h.json", run([(0, {"pinsage": metrics(0.47, 0.24)})], **walks500,
                                          train_overrides={"epochs": 2, "hard_cap": 3}))
    with pytest.raises(SystemExit, match="hard_cap=3"):
        main([str(hard), "--name", "x", "--into", str(tmp_path / "n.json"), "--walk-free-from", str(old)])
    assert not (tmp_path / "n.json").exists()


def test_extend_adds_seeds_to_a_stored_record_whose_files_are_gone(tmp_path: Path) -> None:
    base = {"itemcf": metrics(0.40, 0.20), "cooccurrence": metrics(0.30, 0.10)}
    walks500 = {"walk_overrides": {"n_walks": 500}}
    old = write(tmp_path / "w50.json", run([(0, {"graphsage": metrics(0.44, 0.23)}),
                                            (2, {"graphsage": metrics(0.40, 0.21)})], baselines_same_split=base))
    s0 = write(tmp_path / "s0.json", run([(0, {"pinsage": metrics(0.47, 0.24), "pinsage_mean": metrics(0.46, 0.24)})],
                                         **walks500))
    into = tmp_path / "pool.json"
    note = tmp_path / "note.txt"
    note.write_text("seed 0\n")
    assert main([str(s0), "--name", "w500", "--into", str(into), "--walk-free-from", str(old),
                 "--baselines-from", str(old), "--note-file", str(note)]) == 0
    s0.unlink()  # the raw file of the stored seed is gone by the time more seeds are trained
    s1 = write(tmp_path / "s1.json", run([(1, {"pinsage": metrics(0.43, 0.21), "pinsage_mean": metrics(0.41, 0.20)})],
                                         **walks500))
    s2 = write(tmp_path / "s2.json", run([(2, {"pinsage": metrics(0.45, 0.22), "pinsage_mean": metrics(0.45, 0.21)})],
                                         **walks500))
    assert main([str(s1), str(s2), "--name", "w500", "--into", str(into), "--extend",
                 "--walk-free-from", str(old)]) == 0
    rec = json.loads(into.read_text())["runs"]["w500"]
    assert rec["seeds"] == [0, 1, 2] and rec["note"] == "seed 0"  # the stored note stays until restated
    assert rec["per_seed"][0]["metrics"]["pinsage"] == metrics(0.47, 0.24)
    assert rec["paired"]["pinsage - pinsage_mean"]["test hit@10"]["per_seed"] == [0.01, 0.02, 0.0]
    assert rec["paired"]["pinsage - graphsage"]["seeds"] == [0, 2]  # seed 1 has no walk-free row anywhere
    assert rec["walk_free_borrowed"] == ["graphsage seed 0", "graphsage seed 2"]
    assert rec["baselines_same_split"] == base and "python bench_pooling.py --seeds 0" in rec["baselines_note"]
    assert rec["vs_baselines"]["pinsage - itemcf"]["test hit@10"]["per_seed"] == [0.07, 0.03, 0.05]
    assert rec["command"] == [f"python bench_pooling.py --seeds {s}" for s in (0, 1, 2)]
    assert len(rec["machine"]) == 3 and rec["walk_free_commands"] == ["python bench_pooling.py --seeds 0"]

    with pytest.raises(SystemExit, match=r"seed 1 of \['pinsage', 'pinsage_mean'\] is also in an earlier file"):
        main([str(s1), "--name", "w500", "--into", str(into), "--extend"])
    other = write(tmp_path / "o.json", run([(3, {"pinsage": metrics(0.4, 0.2)})]))  # 50 walks: another setting
    with pytest.raises(SystemExit, match=r"o\.json: walk_overrides differs"):
        main([str(other), "--name", "w500", "--into", str(into), "--extend"])
    with pytest.raises(SystemExit, match=r"holds no record runs\.nothing"):
        main([str(other), "--name", "nothing", "--into", str(into), "--extend"])
