"""The train stage on a real 2-worker LocalCluster with real gloo: remote rows, cache, DDP replicas, resume, failure."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

from cache import POLICIES, CacheConfig, LocalOwnerTable, RemoteRowCache
from gnn.checkpoint import load_checkpoint, load_model
from gnn.features import hash_ids
from gnn.sampler import PinSageSampler
from pipeline.config import ConfigError
from pipeline.generate import GenerateConfig, generate
from pipeline.launch import RankFailed, RankInfo, rank_infos, run_ranks, wait_for_workers, worker_pid
from pipeline.remote_rows import BatchScopedSampler, ShardRows, actor_fetcher
from pipeline.run import RunConfig, run_pipeline
from pipeline.train import (
    MAX_AUTO_ID_BUCKETS,
    PROGRESS_TOPIC,
    TrainStageConfig,
    epoch_embeddings_path,
    id_buckets_for,
    resume_path,
    start_row_servers,
    train,
)

N_ITEMS = 40
T = 3

# A small model and few steps: the tests check wiring and invariants, not quality.
Trained = tuple[TrainStageConfig, Any, dict[str, Any]]

SMALL = {"hidden_dim": 16, "embed_dim": 8, "batch_size": 64, "n_negatives": 16, "progress_s": 0.0,
         "producer_threads": 2}


# ------------------------------------------------------------------------------------------------ hand-made shards


def id_rows(items: np.ndarray) -> dict[str, np.ndarray]:
    """Node ids as features: row of item i = [i, i, i], neighbours (i+1, i+7, i+13) mod N with weights i + k/10."""
    items = np.asarray(items, np.int64)
    nbr = (items[:, None] + np.array([1, 7, 13])[None, :]) % N_ITEMS
    return {"items": items, "features": np.repeat(items[:, None], 3, axis=1).astype(np.float32),
            "neighbors": nbr.astype(np.int64),
            "neighbor_weights": (items[:, None] + np.arange(T)[None, :] / 10).astype(np.float32)}


OWNER = (np.arange(N_ITEMS) * 7 % 3 == 0).astype(np.int32)  # an irregular 2-way split


def _id_rows_on_worker(rank: int) -> dict[str, np.ndarray]:
    return id_rows(np.flatnonzero(np.equal(OWNER, rank)))


def _check_rows_rank(info: RankInfo, servers: dict[int, Any], policy: str) -> dict[str, Any]:
    """Through the real actors and cache: every row of every batch equals the owner's row; capacity holds."""
    from distributed import get_worker

    worker = get_worker()
    actors = worker.actors if hasattr(worker, "actors") else worker.state.actors
    own = actors[servers[info.rank].key]
    local = LocalOwnerTable(own.items, own.features, own.neighbors, own.neighbor_weights, owner=info.rank)
    fetcher = actor_fetcher(servers, local_rank=info.rank)
    try:
        cache = RemoteRowCache(CacheConfig(policy, capacity_fraction=0.3), fetcher=fetcher, owner_of=OWNER,
                               local_rank=info.rank, local=local, importance=np.arange(N_ITEMS, dtype=np.float64))
        cache.fill()
        rows = ShardRows(cache)
        sampler = BatchScopedSampler(PinSageSampler(neighbors=rows.neighbors, rows=rows.rows, n_layers=2), rows)
        rng = np.random.default_rng(info.rank)
        bad, over = 0, 0
        for _ in range(25):
            ids = rng.choice(N_ITEMS, 6)
            block = rows.block(ids)
            want = id_rows(ids)
            bad += int(not np.array_equal(block.features, want["features"]))
            bad += int(not np.array_equal(block.neighbors, want["neighbors"]))
            bad += int(not np.array_equal(block.neighbor_weights, want["neighbor_weights"]))
            sub = sampler.sample(np.unique(ids), rng)
            bad += int(not torch.equal(sub.rows[:, 0].long(), sub.node_ids[-1]))  # ids as features
            s = cache.stats
            over += int(s.used_rows > s.capacity_rows or s.used_rows > cache.capacity_rows)
        stats = cache.stats
        remote = int(np.count_nonzero(np.not_equal(OWNER, info.rank)))
        return {"bad": bad, "over": over, "requests": stats.requests, "hits": stats.hits,
                "capacity_rows": cache.capacity_rows, "expected_capacity": int(0.3 * remote)}
    finally:
        fetcher.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_remote_rows_equal_the_owners_rows_with_every_policy(dask_client: Client, policy: str) -> None:
    infos = rank_infos(dask_client, 2)
    workers = [i.worker for i in infos]
    loaded = [dask_client.submit(_id_rows_on_worker, r, workers=[w], pure=False) for r, w in enumerate(workers)]
    servers = start_row_servers(dask_client, workers, loaded)
    out = run_ranks(dask_client, _check_rows_rank, infos, args=[(servers, policy)] * 2)
    for r in out:
        assert r["bad"] == 0 and r["over"] == 0
        assert r["requests"] > 0
        assert r["capacity_rows"] == (0 if policy == "none" else r["expected_capacity"])
        if policy in ("importance", "lru"):
            assert r["hits"] > 0
        if policy == "none":
            assert r["hits"] == 0
    served = [servers[k].stats().result() for k in (0, 1)]
    assert all(s["requests"] > 0 for s in served)


# ------------------------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, dask_client: Client) -> Path:
    """A generated data set through ingest, split, graph and walks (shared by the stage tests)."""
    base = tmp_path_factory.mktemp("train")
    data = base / "data.csv"
    generate(data, GenerateConfig(rows=20_000, seed=1))
    run = base / "run"
    run_pipeline(run, RunConfig(input=str(data), until="walks"), dask_client, "cpu")
    return run


@pytest.fixture(scope="module")
def trained(small_run: Path, dask_client: Client) -> Trained:
    """Plain all-reduce, 2 workers, 5 steps (its report is read now: later tests replace <run>/train)."""
    cfg = TrainStageConfig(workers=2, epochs=1, steps_per_epoch=5, record_weights=True, **SMALL)  # type: ignore[arg-type]
    out = train(small_run, cfg, dask_client)
    return cfg, out, _report(out)


def _report(out: Any) -> dict[str, Any]:
    import json

    return dict(json.loads((out.path / "report.json").read_text()))


def test_two_workers_keep_identical_replicas_after_every_step(trained: Trained) -> None:
    rep = trained[2]
    d0, d1 = rep["weight_digests"]
    assert len(d0) == len(d1) == 5
    assert d0 == d1  # plain all-reduce: same weights on both ranks after each step
    assert len(set(d0)) == 5  # and the weights moved every step
    assert rep["replicas_identical"] is True
    assert rep["grad_bytes_total"] > 0


def test_stage_outputs_report_checkpoint_and_embeddings(small_run: Path, trained: Trained) -> None:
    cfg, out, rep = trained
    n_items = int(np.load(small_run / "partition" / "owner.npy").shape[0])
    emb = np.load(out.path / "embeddings.npy")
    assert emb.shape == (n_items, cfg.embed_dim) and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # every item embedded (L2-normalised)
    model = load_model(out.path / "checkpoint.pt")  # the query side is the checkpoint's head on those vectors
    assert model.input.item_id.num_embeddings == n_items  # id_buckets=0: one id row per item
    with torch.no_grad():
        expected = model.queries(torch.from_numpy(emb)).numpy()
    np.testing.assert_allclose(np.load(out.path / "query_embeddings.npy"), expected, atol=1e-5)
    total = rep["cache_total"]
    per = [w["cache"] for w in rep["per_worker"]]
    assert len(per) == 2 and total["requests"] == sum(p["requests"] for p in per) > 0
    assert total["hits"] + total["misses"] == total["requests"]
    for w in rep["per_worker"]:  # traffic counted at the one interface equals what the cache fetched
        assert w["transport"]["total"]["bytes"] == w["cache"]["bytes_fetched"] + w["cache"]["fill_bytes"]
    received = sum(w["transport"]["total"]["bytes"] + w["embed_remote_bytes"] for w in rep["per_worker"])
    assert sum(s["bytes"] for s in rep["served"]) == received  # what the owners served, training + embedding
    assert rep["partition"]["parts"] == 2 and len(rep["epochs"]) == 1
    epoch = rep["epochs"][0]  # where each rank's time went: waiting for batches, forward, backward, optimizer
    assert len(epoch["per_rank_wait_s"]) == len(epoch["per_rank_build_s"]) == len(epoch["per_rank_phase_s"]) == 2
    for phases in epoch["per_rank_phase_s"]:
        assert set(phases) == {"forward", "backward", "optimizer"} and sum(phases.values()) <= epoch["seconds"]
    ckpt = load_checkpoint(out.path / "checkpoint.pt")
    assert ckpt.extra["comm"]["compression"] == "none" and ckpt.extra["stage_config"]["workers"] == 2
    assert ckpt.step == 5 and ckpt.optimizer_state is not None


def test_rerun_is_a_noop_and_a_killed_run_resumes(small_run: Path, dask_client: Client,
                                                  trained: Trained) -> None:
    cfg, out, _ = trained
    assert train(small_run, cfg, dask_client).reused
    longer = TrainStageConfig(**{**cfg.__dict__, "epochs": 2})
    ckpt = resume_path(small_run, longer)  # what a run killed after its first epoch leaves behind
    ckpt.parent.mkdir(parents=True)
    shutil.copy(out.path / "checkpoint.pt", ckpt)
    second = train(small_run, longer, dask_client)
    rep = _report(second)
    assert [w["resumed_from_epoch"] for w in rep["per_worker"]] == [1, 1]
    assert [e["epoch"] for e in rep["epochs"]] == [1]
    assert load_checkpoint(second.path / "checkpoint.pt").step == 10
    assert not ckpt.parent.exists()


@pytest.mark.parametrize(("compression", "sync", "optimizer", "correction", "ostate", "rows", "ids"), [
    ("dgc", "allreduce", "auto", "momentum", False, "", True),
    ("dgc", "allreduce", "adam", "momentum", False, "", True),
    ("dgc", "allreduce", "adam", "adam", False, "", True),
    ("dgc", "allreduce", "adam", "adam", False, "input.item_id.*", True),
    ("dgc", "allreduce", "adam", "adam", False, "", False),  # no id table: the GNN layers only
    ("none", "local:2", "auto", "momentum", False, "", True), ("none", "local:2", "auto", "momentum", True, "", True)])
def test_compression_and_sync_run_end_to_end(small_run: Path, dask_client: Client, compression: str,
                                             sync: str, optimizer: str, correction: str, ostate: bool, rows: str,
                                             ids: bool, trained: Trained) -> None:
    dense = trained[2]["grad_bytes_total"]
    sgd = compression == "dgc" and optimizer == "auto"
    cfg = TrainStageConfig(workers=2, epochs=1, steps_per_epoch=4, compression=compression, sync=sync,  # type: ignore[arg-type]
                           optimizer=optimizer, dgc_correction=correction, dgc_rows=rows,  # type: ignore[arg-type]
                           item_ids=ids, sync_optimizer_state=ostate, lr=0.05 if sgd else 3e-3,
                           **SMALL)  # type: ignore[arg-type]
    out = train(small_run, cfg, dask_client)
    rep = _report(out)
    comm = rep["per_worker"][0]["comm"]
    assert comm["config"]["compression"] == compression and comm["config"]["sync_spec"] == sync
    # the optimizer that applies the momentum, and the hook's momentum (0 under Adam: error-feedback top-k), are
    # recorded in the report and the checkpoint
    assert rep["optimizer"] == ("sgd" if sgd else "adam")
    extra = load_checkpoint(out.path / "checkpoint.pt").extra
    assert extra["optimizer"] == rep["optimizer"]
    assert extra["comm"]["dgc"]["momentum"] == comm["config"]["dgc"]["momentum"] == (0.9 if sgd else 0.0)
    assert extra["comm"]["dgc"]["correction"] == correction
    assert list(extra["comm"]["dgc"]["row_tensors"]) == ([rows] if rows else [])  # the id table by whole rows
    checkpoint = load_checkpoint(out.path / "checkpoint.pt")
    assert (checkpoint.model_config.id_buckets > 0) is ids
    assert any(k.startswith("input.item_id") for k in checkpoint.model_state) is ids
    assert extra["comm"]["sync_optimizer_state"] is comm["config"]["sync_optimizer_state"] is ostate
    assert rep["replicas_identical"] is True  # local: after the final average
    assert [w["comm_state_restored"] for w in rep["per_worker"]] == [False, False]  # a fresh run
    # dgc at 75 % sparsity (first warm-up stage) sends 1/4 of the entries at 8 B each; local:2 averages the
    # model (dense-sized) every 2nd step: both about half the dense bytes per step
    per_step = rep["grad_bytes_total"] / 4
    if ostate:  # the rounds carry Adam's two moments beside the model: three times the bytes
        assert 1.4 * dense / 5 < per_step < 1.6 * dense / 5
    else:
        assert per_step < 0.6 * dense / 5
    assert np.isfinite(rep["epochs"][0]["mean_loss"])


@pytest.mark.parametrize("sage", ["two_step", "distinct"])
def test_graphsage_trains_on_two_workers_with_either_neighbour_draw(small_run: Path, dask_client: Client,
                                                                   sage: str) -> None:
    cfg = TrainStageConfig(workers=2, epochs=1, steps_per_epoch=3, model="graphsage", sage_neighbors=sage,  # type: ignore[arg-type]
                           record_weights=True, **SMALL)  # type: ignore[arg-type]
    rep = _report(train(small_run, cfg, dask_client))
    assert rep["replicas_identical"] is True and np.isfinite(rep["epochs"][0]["mean_loss"])
    config = load_checkpoint(small_run / "train" / "checkpoint.pt").model_config
    assert (config.kind, config.sage_neighbors) == ("graphsage", sage)


def test_gathered_candidates_keep_identical_replicas_and_change_the_steps(small_run: Path, dask_client: Client,
                                                                         trained: Trained) -> None:
    cfg = TrainStageConfig(workers=2, epochs=1, steps_per_epoch=4, gather_candidates=True, record_weights=True,
                           **SMALL)  # type: ignore[arg-type]
    rep = _report(train(small_run, cfg, dask_client))
    d0, d1 = rep["weight_digests"]
    assert d0 == d1 and len(set(d0)) == 4  # plain all-reduce: same weights on both ranks after each step
    assert d0[0] != trained[2]["weight_digests"][0][0]  # the other rank's items entered the first step's softmax
    assert all(w["gathered_candidates"] > 0 for w in rep["per_worker"])
    assert rep["config"]["gather_candidates"] is True and np.isfinite(rep["epochs"][0]["mean_loss"])
    assert trained[2]["per_worker"][0]["gathered_candidates"] is None


def _embeddings_and_digests(out: Any) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    rep = _report(out)  # read now: the next run replaces <run>/train
    return np.load(out.path / "embeddings.npy"), np.load(out.path / "query_embeddings.npy"), rep["weight_digests"]


@pytest.mark.parametrize("sync", ["allreduce", "local:2"])
def test_epoch_embeddings_equal_separate_runs_of_that_many_epochs(small_run: Path, dask_client: Client,
                                                                  sync: str) -> None:
    """One 2-epoch run with epoch_embeddings: the vectors after epoch 1 are those of a separate 1-epoch run, the
    vectors after epoch 2 its own final ones, and the snapshots leave training alone (every step's weights equal
    a plain 2-epoch run's). local:2: the snapshot averages a copy of the replicas, as the final embedding does."""
    base = {"workers": 2, "steps_per_epoch": 3, "sync": sync, "record_weights": True, **SMALL}
    emb1, query1, digests1 = _embeddings_and_digests(train(small_run, TrainStageConfig(epochs=1, **base),  # type: ignore[arg-type]
                                                           dask_client))
    emb2, _, digests2 = _embeddings_and_digests(train(small_run, TrainStageConfig(epochs=2, **base),  # type: ignore[arg-type]
                                                      dask_client))
    snap = train(small_run, TrainStageConfig(epochs=2, epoch_embeddings=True, **base), dask_client)  # type: ignore[arg-type]
    rep = _report(snap)
    assert rep["weight_digests"] == digests2  # the per-epoch embedding changed no weight of any step
    assert [d[:3] for d in digests2] == digests1  # and a 1-epoch run is the first epoch of a 2-epoch one
    assert sorted(p.name for p in (snap.path / "epochs").iterdir()) == ["1", "2"]
    np.testing.assert_array_equal(np.load(epoch_embeddings_path(snap.path, 1)), emb1)
    np.testing.assert_array_equal(np.load(snap.path / "epochs" / "1" / "query_embeddings.npy"), query1)
    np.testing.assert_array_equal(np.load(epoch_embeddings_path(snap.path, 2)), np.load(snap.path / "embeddings.npy"))
    np.testing.assert_array_equal(np.load(epoch_embeddings_path(snap.path, 2)), emb2)
    assert not np.array_equal(emb1, emb2)  # the epochs differ (the comparison above can fail)
    assert [e["steps"] for e in rep["epochs"]] == [3, 3]
    assert all(w["snapshot_remote_bytes"] > 0 for w in rep["per_worker"])  # remote rows of the 2 snapshots


def test_resume_after_an_epoch_continues_bit_identically(small_run: Path, dask_client: Client) -> None:
    """Plain all-reduce: a 2-epoch run resumed from a 1-epoch run's checkpoint takes the very steps (weights after
    each) and ends with the very embeddings of a 2-epoch run without a break. (Under local averaging the replicas
    differ mid-run and only rank 0's weights are saved, so there a resume is not bit-identical.)"""
    base = {"workers": 2, "steps_per_epoch": 3, "record_weights": True, **SMALL}
    first = train(small_run, TrainStageConfig(epochs=1, **base), dask_client)  # type: ignore[arg-type]
    longer = TrainStageConfig(epochs=2, **base)  # type: ignore[arg-type]
    ckpt = resume_path(small_run, longer)
    ckpt.parent.mkdir(parents=True)
    shutil.copy(first.path / "checkpoint.pt", ckpt)
    resumed = train(small_run, longer, dask_client)
    emb_resumed, _, digests_resumed = _embeddings_and_digests(resumed)
    assert [w["resumed_from_epoch"] for w in _report(resumed)["per_worker"]] == [1, 1]
    straight = train(small_run, longer, dask_client, force=True)
    emb, _, digests = _embeddings_and_digests(straight)
    assert [w["resumed_from_epoch"] for w in _report(straight)["per_worker"]] == [0, 0]
    assert [d[3:] for d in digests] == digests_resumed
    np.testing.assert_array_equal(emb_resumed, emb)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning two ranks to one core each needs 2 CPUs and Linux affinity calls")
def test_ranks_pinned_to_their_own_cores(small_run: Path, dask_client: Client, trained: Trained) -> None:
    cfg = TrainStageConfig(workers=2, epochs=1, steps_per_epoch=3, cpus_per_rank=1, **SMALL)  # type: ignore[arg-type]
    rep = _report(train(small_run, cfg, dask_client))
    cpus = [w["cpus"] for w in rep["per_worker"]]
    assert [len(c) for c in cpus] == [1, 1] and cpus[0] != cpus[1]  # one core each, different cores
    assert [w["torch_threads"] for w in rep["per_worker"]] == [1, 1]
    assert rep["replicas_identical"] is True
    everything = sorted(os.sched_getaffinity(0))  # the workers got their whole CPU set back afterwards
    assert set(map(tuple, dask_client.run(lambda: sorted(os.sched_getaffinity(0))).values())) == {
        tuple(everything)}


def test_auto_id_table_gives_each_item_its_own_row() -> None:
    assert id_buckets_for(1000) == 1000 and id_buckets_for(10**7) == MAX_AUTO_ID_BUCKETS
    assert id_buckets_for(1000, 77) == 77  # an explicit size wins
    for n in (1000, 4096, 16_384):  # the prime-multiplier hash is a permutation of 0..n-1 with n buckets
        assert torch.unique(hash_ids(torch.arange(n), n)).numel() == n


def test_dgc_local_table_is_merged_by_rows_end_to_end(small_run: Path, dask_client: Client,
                                                      trained: Trained) -> None:
    """The id table sends no gradient (--dgc-local): rounds every 3 steps and one after the last step leave the
    replicas identical, the rounds' bytes are counted, and the choice is in the checkpoint."""
    cfg = TrainStageConfig(workers=2, epochs=1, steps_per_epoch=4, compression="dgc", optimizer="adam",
                           dgc_correction="adam", dgc_local="input.item_id.weight", dgc_local_period=3,
                           **SMALL)  # type: ignore[arg-type]
    out = train(small_run, cfg, dask_client)
    rep = _report(out)
    comm = rep["per_worker"][0]["comm"]
    assert comm["sync_rounds"] == {"local_rows": 2} and comm["dgc"]["local_rounds"] == 2  # after step 3, and the end
    assert comm["sync_bytes"]["local_rows"] > 0
    assert comm["total_bytes"] == comm["total_sent_bytes"] + comm["sync_bytes"]["local_rows"]
    assert rep["replicas_identical"] is True
    extra = load_checkpoint(out.path / "checkpoint.pt").extra
    assert list(extra["comm"]["dgc"]["local_tensors"]) == ["input.item_id.weight"]
    assert extra["comm"]["dgc"]["local_period"] == 3


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"train\.workers=0"):
        TrainStageConfig(workers=0)
    with pytest.raises(ConfigError, match=r"train\.sage_neighbors='walk'.*two_step or distinct"):
        TrainStageConfig(sage_neighbors="walk")  # type: ignore[arg-type]
    assert TrainStageConfig(compression="dgc", optimizer="adam").comm_config().dgc.momentum == 0.0
    with pytest.raises(ConfigError, match=r"train\.dgc_correction='adam'.*--optimizer adam"):
        TrainStageConfig(compression="dgc", dgc_correction="adam")
    assert TrainStageConfig(compression="dgc", optimizer="sgd", momentum=0.8).comm_config().dgc.momentum == 0.8
    rows = TrainStageConfig(compression="dgc", dgc_rows="input.item_id.weight", dgc_dense="g1.*, g2.*")
    assert rows.comm_config().dgc.row_tensors == ("input.item_id.weight",)
    assert rows.comm_config().dgc.dense_tensors == ("g1.*", "g2.*")
    with pytest.raises(ValueError, match=r"train: DGCConfig: 'g1\.\*' is in both"):
        TrainStageConfig(compression="dgc", dgc_rows="g1.*", dgc_dense="g1.*")
    local = TrainStageConfig(compression="dgc", dgc_local="input.item_id.weight", dgc_local_period=50,
                             dgc_local_merge="mean").comm_config().dgc
    assert (local.local_tensors, local.local_period, local.local_merge) == (("input.item_id.weight",), 50, "mean")
    with pytest.raises(ConfigError, match=r"train\.dgc_local='input\.item_id\.weight'.*--compression dgc"):
        TrainStageConfig(dgc_local="input.item_id.weight")
    with pytest.raises(ValueError, match=r"train: DGCConfig\.local_period=0 \(--dgc-local-period\)"):
        TrainStageConfig(compression="dgc", dgc_local="x", dgc_local_period=0)
    owner = TrainStageConfig(compression="dgc", optimizer="adam", dgc_correction="adam",
                             dgc_owner_scale="input.item_id.weight").comm_config().dgc
    assert owner.owner_tensors == ("input.item_id.weight",)
    with pytest.raises(ConfigError, match=r"train\.dgc_owner_scale='x'.*--compression dgc"):
        TrainStageConfig(dgc_owner_scale="x")
    with pytest.raises(ValueError, match=r"train: DGCConfig\.owner_tensors \(--dgc-owner-scale\).*adam"):
        TrainStageConfig(compression="dgc", dgc_owner_scale="x")
    moment = TrainStageConfig(compression="dgc", optimizer="adam", dgc_correction="adam", dgc_shared_moment="i.*",
                              dgc_shared_moment_by="rows-log8", dgc_shared_moment_estimate="owners").comm_config().dgc
    assert (moment.shared_moment_tensors, moment.shared_moment_by, moment.shared_moment_estimate) == (
        ("i.*",), "rows-log8", "owners")
    with pytest.raises(ConfigError, match=r"train\.dgc_shared_moment='x'.*--compression dgc"):
        TrainStageConfig(dgc_shared_moment="x")
    with pytest.raises(ValueError, match=r"train: DGCConfig\.shared_moment_tensors \(--dgc-shared-moment\).*adam"):
        TrainStageConfig(compression="dgc", dgc_shared_moment="x")
    with pytest.raises(ValueError, match=r"shared_moment_estimate='owners'.*--dgc-shared-moment-by rows-log8"):
        TrainStageConfig(compression="dgc", optimizer="adam", dgc_correction="adam", dgc_shared_moment="x",
                         dgc_shared_moment_estimate="owners")
    with pytest.raises(ValueError, match=r"train: --sync 'local:x'"):
        TrainStageConfig(sync="local:x")
    with pytest.raises(ValueError, match=r"capacity_fraction=1\.5"):
        TrainStageConfig(cache_fraction=1.5)
    with pytest.raises(ConfigError, match=r"train\.gather_candidates=True.*--loss softmax"):
        TrainStageConfig(gather_candidates=True, loss="max_margin")


def test_more_neighbours_than_the_walks_kept_is_refused(small_run: Path, dask_client: Client) -> None:
    """T above the walks' top_t would silently pad every row to the walks' length; the stage says so instead."""
    with pytest.raises(ValueError, match=r"train\.n_neighbors=21 is above the walks stage's top_t=20 .*--top-t 21"):
        train(small_run, TrainStageConfig(epochs=1, steps_per_epoch=1, n_neighbors=21, **SMALL), dask_client)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "scale"), [("none", 1.0), ("sqrt", 2 ** 0.5), ("linear", 2.0),
                                             ("adam-sqrt", 2 ** 0.5)])
def test_lr_scaling_multiplies_lr_for_two_workers_only(mode: str, scale: float) -> None:
    cfg = TrainStageConfig(workers=2, lr=2e-3, lr_scaling=mode)  # type: ignore[arg-type]
    assert cfg.effective_lr(1) == 2e-3  # one worker: the batch is not larger, the lr stays
    assert cfg.effective_lr(2) == pytest.approx(2e-3 * scale) == cfg.effective_lr()
    assert cfg.lr_info()["effective_lr"] == pytest.approx(2e-3 * scale)
    assert cfg.adam_betas(1) == ((0.9, 0.999), 1e-8)  # and Adam's settings stay too
    betas, eps = cfg.adam_betas(2)
    if mode == "adam-sqrt":  # the momenta average over as many pairs as one worker's: 1 - beta doubles
        assert betas == pytest.approx((0.8, 0.998)) and eps == pytest.approx(1e-8 / 2 ** 0.5)
    else:
        assert (betas, eps) == ((0.9, 0.999), 1e-8)


def test_lr_scaling_config_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"^train\.lr_scaling='cube': must be one of none, sqrt, linear, adam-sqrt$"):
        TrainStageConfig(lr_scaling="cube")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^train\.lr_scaling='adam-sqrt': scales Adam's betas: use it with Adam"):
        TrainStageConfig(lr_scaling="adam-sqrt", optimizer="sgd")
    with pytest.raises(ConfigError, match=r"^train\.lr_warmup_steps=-1: must be an integer >= 0"):
        TrainStageConfig(lr_scaling="sqrt", lr_warmup_steps=-1)
    with pytest.raises(ConfigError, match=r"^train\.lr_warmup_steps=5: .*add --lr-scaling sqrt or linear"):
        TrainStageConfig(lr_warmup_steps=5)


def test_lr_scaling_flags_reach_the_config() -> None:
    import argparse

    from pipeline.train import register, train_config

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--run-dir", "r", "--workers", "2", "--lr-scaling", "linear",
                              "--lr-warmup-steps", "20"])
    cfg = train_config(args, {})
    assert (cfg.lr_scaling, cfg.lr_warmup_steps, cfg.effective_lr()) == ("linear", 20, pytest.approx(2 * cfg.lr))
    with pytest.raises(SystemExit):  # argparse names the flag and the choices
        parser.parse_args(["train", "--run-dir", "r", "--lr-scaling", "cube"])


def test_report_and_checkpoint_record_the_effective_lr(small_run: Path, dask_client: Client,
                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("train", ".train-resume"))
    cfg = TrainStageConfig(workers=2, epochs=1, steps_per_epoch=4, lr=1e-3, lr_scaling="linear", lr_warmup_steps=2,
                           **SMALL)  # type: ignore[arg-type]
    out = train(run, cfg, dask_client)
    want = {"lr": 1e-3, "lr_scaling": "linear", "world": 2, "effective_lr": 2e-3, "warmup_steps": 2,
            "schedule": "constant", "lr_final": 0.05, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8}
    assert _report(out)["lr"] == want
    ckpt = load_checkpoint(out.path / "checkpoint.pt")
    assert ckpt.extra["lr"] == want
    assert (ckpt.train_config["lr"], ckpt.train_config["warmup_steps"], ckpt.train_config["warmup_start"]) == (
        2e-3, 2, 0.5)  # the ramp starts at the unscaled lr
    assert ckpt.optimizer_state is not None
    assert [g["lr"] for g in ckpt.optimizer_state["param_groups"]] == [2e-3]  # past the ramp: the scaled lr


def test_cosine_schedule_reaches_the_last_step(small_run: Path, dask_client: Client, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("train", ".train-resume"))
    cfg = TrainStageConfig(workers=2, epochs=2, steps_per_epoch=3, lr=1e-3, lr_schedule="cosine", lr_final=0.1,
                           sync="local:2", **SMALL)  # type: ignore[arg-type]
    out = train(run, cfg, dask_client)
    assert (_report(out)["lr"]["schedule"], _report(out)["lr"]["lr_final"]) == ("cosine", 0.1)
    ckpt = load_checkpoint(out.path / "checkpoint.pt")
    assert (ckpt.train_config["lr_schedule"], ckpt.train_config["lr_final"]) == ("cosine", 0.1)
    assert ckpt.optimizer_state is not None  # the 6th of 6 steps ran at lr x lr_final
    groups = ckpt.optimizer_state.get("optimizer", ckpt.optimizer_state)["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4)]
    with pytest.raises(ConfigError, match=r"^train\.lr_schedule='step': must be constant or cosine"):
        TrainStageConfig(lr_schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^train\.lr_final=2: must lie in \[0, 1\]"):
        TrainStageConfig(lr_final=2)


def test_local_negatives_come_from_the_pool_only() -> None:
    from gnn.batches import PairBatcher, TrainingPairs
    from gnn.features import TensorRows

    def no_neighbors(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full((len(ids), 1), -1, np.int64), np.zeros((len(ids), 1), np.float32)

    ids_as_rows = TensorRows(torch.arange(N_ITEMS).float()[:, None])
    sampler = PinSageSampler(neighbors=no_neighbors, rows=ids_as_rows, n_layers=1)
    pool = np.array([3, 17, 29])
    pairs = TrainingPairs.from_arrays(np.arange(10), np.arange(10) + 1)
    batch = PairBatcher(pairs, sampler, n_items=N_ITEMS, batch_size=4, n_negatives=50, negative_pool=pool)(0, 0)
    negatives = batch.subgraph.node_ids[0][batch.negatives].numpy()
    assert set(negatives.tolist()) == set(pool.tolist())
    with pytest.raises(ValueError, match="negative_pool is empty"):
        PairBatcher(pairs, sampler, n_items=N_ITEMS, negative_pool=np.array([], np.int64))


# ------------------------------------------------------------------------------------------------ failure


@pytest.fixture
def own_cluster() -> Iterator[Client]:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


@pytest.mark.timeout(90)
def test_killing_a_worker_mid_run_ends_the_job(small_run: Path, own_cluster: Client, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("train", ".train-resume"))
    cfg = TrainStageConfig(workers=2, epochs=50, timeout_s=20, **SMALL)  # type: ignore[arg-type]
    victim = sorted(own_cluster.nthreads())[1]
    pid = own_cluster.submit(worker_pid, workers=[victim], pure=False).result()

    def kill_when_training() -> None:
        for _ in range(600):
            if own_cluster.get_events(PROGRESS_TOPIC):
                break
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_training)
    killer.start()
    # whichever the launcher sees first: rank 1's worker leaving, or rank 0 losing the row server on it
    with pytest.raises(RankFailed, match=r"rank 1: its worker .* left the cluster|rank 0 .* Actor was lost"):
        train(run, cfg, own_cluster)
    killer.join()
    assert not (run / "train").exists()  # nothing a later stage could read
    wait_for_workers(own_cluster, 2)


@pytest.mark.gpu
def test_gpu_backend_trains_on_cuda_with_nccl(small_run: Path, tmp_path: Path) -> None:
    """One rank per GPU on a LocalCUDACluster: the model on the GPU, NCCL between ranks, the CPU-built batches moved."""
    from dask_cuda import LocalCUDACluster

    n_gpus = torch.cuda.device_count()
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    with LocalCUDACluster(n_workers=n_gpus, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        cfg = TrainStageConfig(workers=n_gpus, epochs=1, steps_per_epoch=3, **SMALL)  # type: ignore[arg-type]
        rep = _report(train(run, cfg, client, backend="gpu", force=True))
    assert rep["workers"] == n_gpus and np.isfinite(rep["epochs"][0]["mean_loss"])
    assert np.isfinite(np.load(run / "train" / "embeddings.npy")).all()
