"""The seed and override options of the quality benchmarks (benchmarks/bench_quality.py, bench_pooling.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_pooling import interval, main, paired, save, walk_config, weight_profile
from benchmarks.bench_quality import load, overrides, training_inputs
from benchmarks.quality_lib import train_gnn
from gnn.models import ModelConfig, ModelKind
from gnn.trainer import TrainConfig
from gnn.walks import WalkConfig


def test_overrides_route_each_field_to_its_config_and_reject_unknown_fields() -> None:
    model, train = overrides(["n_neighbors=30", "epochs=3", "seed=7", "pooling=mean"])
    assert model == {"n_neighbors": 30, "pooling": "mean"}
    assert train == {"epochs": 3, "seed": 7}
    (walk,) = overrides(["n_walks=200", "hard_negative_ranks=[60, 400]"], (WalkConfig,))
    assert walk == {"n_walks": 200, "hard_negative_ranks": [60, 400]}
    with pytest.raises(SystemExit, match="top_t"):  # a walk field is not a model/training field
        overrides(["top_t=50"])
    with pytest.raises(SystemExit, match="field=value"):
        overrides(["epochs"])


def test_walk_config_keeps_at_least_t_neighbours_and_takes_the_seed() -> None:
    assert walk_config({}, 10, 3) == WalkConfig(top_t=20, seed=3)
    assert walk_config({"n_walks": 200}, 50, 1) == WalkConfig(n_walks=200, top_t=50, seed=1)
    assert walk_config({"top_t": 60}, 50, 0).top_t == 60


def test_paired_differences_against_the_first_model() -> None:
    per_seed = [{"a": {"m": 0.50}, "b": {"m": 0.40}, "c": {"m": 0.55}},
                {"a": {"m": 0.30}, "b": {"m": 0.35}, "c": {"m": 0.30}}]
    out = paired(per_seed, ["a", "b", "c"])
    assert out["a - b"]["m"]["per_seed"] == [0.1, -0.05]
    assert out["a - b"]["m"]["mean"] == 0.025
    assert out["a - b"]["m"]["sd"] == pytest.approx(np.std([0.1, -0.05], ddof=1), abs=1e-5)
    assert out["a - b"]["m"]["n_positive"] == 1
    assert out["a - c"]["m"]["per_seed"] == [-0.05, 0.0] and out["a - c"]["m"]["n_positive"] == 0
    # 95 % interval: mean ± t(0.975, 1 dof) · sd / √2, t = 12.7062 (tables)
    half = 12.7062 * np.std([0.1, -0.05], ddof=1) / np.sqrt(2)
    assert out["a - b"]["m"]["ci95"] == pytest.approx([0.025 - half, 0.025 + half], abs=1e-4)
    assert paired(per_seed[:1], ["a", "b"])["a - b"]["m"]["sd"] == 0.0
    assert paired(per_seed[:1], ["a", "b"])["a - b"]["m"]["ci95"] is None
    assert interval(None) == "[n/a]" and interval([-0.0012, 0.0034]) == "[-0.0012, +0.0034]"


@pytest.mark.slow
def test_a_training_seed_fixes_the_trained_embeddings_and_another_seed_changes_them() -> None:
    tables, _ = load("generated", Path("unused"), 6000)
    train, store, n_categories = training_inputs(tables)
    mc = ModelConfig(n_categories=n_categories, hidden_dim=16, input_dim=16, embed_dim=8, id_buckets=512)

    def embeddings(seed: int) -> np.ndarray:
        tc = TrainConfig(mode="sync", log_every=0, epochs=1, batch_size=128, seed=seed)
        res = train_gnn(train, mc, tc, walk_cfg=walk_config({"n_walks": 10}, mc.n_neighbors, seed), store=store)
        return res.scorer.emb.numpy()

    first, again, other = embeddings(3), embeddings(3), embeddings(4)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.slow
def test_graphsage_reads_neither_the_walks_nor_pinsages_t_but_pinsage_reads_both() -> None:
    """What ``merge_pooling --walk-free-from`` relies on: with the hard-negative curriculum off (``hard_cap`` 0,
    the default) GraphSAGE's trained embeddings do not depend on the walk settings or on ``n_neighbors``."""
    tables, _ = load("generated", Path("unused"), 6000)
    train, store, n_categories = training_inputs(tables)

    def embeddings(kind: ModelKind, n_neighbors: int, n_walks: int) -> np.ndarray:
        mc = ModelConfig(kind=kind, n_categories=n_categories, hidden_dim=16, input_dim=16, embed_dim=8,
                         id_buckets=512, n_neighbors=n_neighbors, fanouts=(5, 3))
        tc = TrainConfig(mode="sync", log_every=0, epochs=1, batch_size=128, seed=2)
        res = train_gnn(train, mc, tc, walk_cfg=walk_config({"n_walks": n_walks}, n_neighbors, 2), store=store)
        return res.scorer.emb.numpy()

    assert TrainConfig().hard_cap == 0
    np.testing.assert_array_equal(embeddings("graphsage", 10, 10), embeddings("graphsage", 25, 40))
    pinsage = embeddings("pinsage", 10, 10)
    assert not np.allclose(pinsage, embeddings("pinsage", 25, 10))
    assert not np.allclose(pinsage, embeddings("pinsage", 10, 40))


@pytest.mark.slow
def test_a_spent_time_budget_ends_training_early_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # A model cut short by --budget-s must not sit in a table of full runs unnoticed (an Amazon PinSage row once
    # had 9 of its 10 epochs): the result says so, and a warning names the model and the epochs it got.
    tables, _ = load("generated", Path("unused"), 6000)
    train, store, n_categories = training_inputs(tables)
    mc = ModelConfig(n_categories=n_categories, hidden_dim=16, input_dim=16, embed_dim=8, id_buckets=512)
    tc = TrainConfig(mode="sync", log_every=0, epochs=2, batch_size=128, seed=0)
    wc = walk_config({"n_walks": 10}, mc.n_neighbors, 0)
    with caplog.at_level("WARNING", logger="benchmarks.quality_lib"):
        cut = train_gnn(train, mc, tc, walk_cfg=wc, store=store, time_budget_s=0.0, name="cut")
    assert len(cut.epochs) == 1 and cut.budget_hit
    assert "cut: the time budget of 0 s is spent after 1 of 2 epochs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="benchmarks.quality_lib"):
        full = train_gnn(train, mc, tc, walk_cfg=wc, store=store, time_budget_s=1e9, name="full")
    assert len(full.epochs) == 2 and not full.budget_hit
    assert caplog.text == ""


def test_save_keeps_the_other_named_runs(tmp_path: Path) -> None:
    out = tmp_path / "pooling.json"
    save(out, "t10", {"seeds": [0]})
    save(out, "t50", {"seeds": [1]})
    save(out, "t10", {"seeds": [0, 1]})
    assert json.loads(out.read_text()) == {"t10": {"seeds": [0, 1]}, "t50": {"seeds": [1]}}
    save(out, None, {"seeds": [2]})
    assert json.loads(out.read_text()) == {"seeds": [2]}


def test_weight_profile_by_hand() -> None:
    # item 0: counts 6,2 (shares .75/.25); item 1: 3,3 (uniform); item 2: one neighbour only (left out at t=2)
    indptr = np.array([0, 2, 4, 5])
    weights = np.array([6.0, 2.0, 3.0, 3.0, 9.0], np.float32)
    prof = weight_profile(indptr, weights, 2)
    assert prof["items"] == 2
    assert prof["top1_share"][1] == pytest.approx(0.625)  # median of .75 and .5
    assert prof["lower_half_share"][1] == pytest.approx(0.375)
    assert prof["first_over_last"][1] == pytest.approx(2.0)  # median of 3 and 1
    assert prof["visits_in_top_t"][1] == pytest.approx(7.0)
    assert weight_profile(indptr, weights, 3)["items"] == 0


def test_generated_content_rows_follow_the_tables_item_order() -> None:
    """Each item's content row is its community's centre plus its own noise (generate --content-dim), in the
    order of the tables' item ids: rows of items sharing a community lie closer than rows of other items."""
    tables, info = load("generated", Path("unused"), 6000, content_dim=16)
    content = info.pop("item_content")
    _, store, _ = training_inputs(tables, content)
    assert store.item_content is not None and store.item_content.shape == (store.n_items, 16)
    # a user's consecutive rows mostly stay in one community (planted sequences, home community), so their
    # content rows are close; rows in a wrong item order would be as far apart as random pairs
    items = tables["train"].sort_values(["user", "ts"], kind="stable")
    a, b = items["item"].to_numpy()[:-1], items["item"].to_numpy()[1:]
    same_user = items["user"].to_numpy()[:-1] == items["user"].to_numpy()[1:]
    a, b = a[same_user & (a != b)], b[same_user & (a != b)]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, store.n_items, (2, a.shape[0]))
    consecutive = np.linalg.norm(content[a] - content[b], axis=1)
    random = np.linalg.norm(content[x] - content[y], axis=1)
    assert np.median(consecutive) < 0.75 * np.median(random)  # 0.5-noise rows: sqrt(2*.25*16)=2.8 vs ~6.3
    with pytest.raises(SystemExit, match="generated only"):
        load("amazon", Path("unused"), 0, content_dim=16)
    with pytest.raises(ValueError, match="rows for"):
        training_inputs(tables, content[:-1])


def test_gen_set_reaches_the_generator_and_refuses_bad_fields_and_values(tmp_path: Path) -> None:
    default, _ = load("generated", Path("unused"), 6000)
    noisy, info = load("generated", Path("unused"), 6000, gen_over={"community_strength": 0.5})
    assert info["generate"]["community_strength"] == 0.5 and info["generate"]["rows"] == 6000
    assert not np.array_equal(default["train"]["item"].to_numpy()[:500], noisy["train"]["item"].to_numpy()[:500])
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit, match=re.escape("--gen-set 'strength=0.5': expected field=value")):
        main(["--dataset", "generated", "--gen-set", "strength=0.5", "--out", str(out)])
    with pytest.raises(SystemExit, match=re.escape("--gen-set: generate.community_strength=1.5: must be")):
        load("generated", Path("unused"), 6000, gen_over={"community_strength": 1.5})
    with pytest.raises(SystemExit, match="--gen-rows instead"):
        load("generated", Path("unused"), 6000, gen_over={"rows": 10})
    with pytest.raises(SystemExit, match="generated only"):
        load("amazon", Path("unused"), 0, gen_over={"community_strength": 0.5})
    assert not out.exists()
