"""Stage ``infer`` on real local Dask clusters: map-reduce embeddings equal the model's own forward pass
(``embed_items``) for every item, with 1 and 2 workers, id-range blocks and partition shards, both model kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from distributed import Client

from gnn.batches import PairBatcher, TrainingPairs
from gnn.checkpoint import load_model, save_checkpoint
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, write_graph_store
from gnn.inference import reference_sampler
from gnn.models import ModelConfig, build_model, build_sampler
from gnn.trainer import TrainConfig, Trainer, embed_items
from gnn.walks import Neighborhoods, save_neighborhoods
from pipeline.cli import main
from pipeline.infer import (
    EMBEDDINGS_NPY,
    InferConfig,
    load_embeddings,
    load_encoder,
    load_model_config,
    resolve_checkpoint,
    run_infer,
)
from pipeline.partition import PartitionConfig, run_partition
from pipeline.rundir import read_stage, run_stage
from tests.gnn.model_graphs import co_count_neighborhoods, community_store, pairs_of

TOL = 1e-5


def model_config(kind: str, store: GraphStore, **over: object) -> ModelConfig:
    values = dict(kind=kind, n_categories=store.n_categories, input_dim=16, hidden_dim=16, embed_dim=8,
                  id_buckets=64, id_dim=8, fanouts=(4, 3), n_neighbors=5)
    values.update(over)
    return ModelConfig(**values)  # type: ignore[arg-type]


def make_run(run_dir: Path, kind: str, *, partition_parts: int = 0, **over: object) -> tuple[GraphStore, Neighborhoods]:
    """A run directory with graph and walks stages, a checkpoint of a briefly trained model in <run>/train/, and
    optionally a partition stage."""
    store = community_store(n_users=80, n_items=60)
    stand_in = co_count_neighborhoods(store)
    nb = Neighborhoods(**{k: np.asarray(getattr(stand_in, k)) for k in (
        "indptr", "indices", "weights", "item_importance", "user_importance", "hard_negatives")})
    run_stage(run_dir, "graph", config=InferConfig(), inputs={},
              build=lambda tmp: {"n_edges": write_graph_store(tmp, store) and store.n_edges})
    run_stage(run_dir, "walks", config=InferConfig(), inputs={},
              build=lambda tmp: save_neighborhoods(tmp, nb) or {"n_items": nb.n_items})
    if partition_parts:
        run_partition(run_dir, PartitionConfig(parts=partition_parts))
    config = model_config(kind, store, **over)
    rows = ItemFeatureTable.from_graph_store(store)
    sampler = build_sampler(config, rows=rows, neighborhoods=nb, store=store)
    batcher = PairBatcher(TrainingPairs.from_arrays(*pairs_of(store)), sampler, n_items=store.n_items,
                          batch_size=64, n_negatives=10, hard_negatives=nb.hard_negatives, hard_cap=2, seed=0)
    trainer = Trainer(build_model(config, seed=0), batcher, config=TrainConfig(epochs=1, mode="sync", log_every=0))
    trainer.fit()
    save_checkpoint(run_dir / "train" / "checkpoint.pt", trainer, config)
    return store, nb


def reference(run_dir: Path, store: GraphStore, nb: Neighborhoods, seed: int = 0) -> torch.Tensor:
    model = load_model(run_dir / "train" / "checkpoint.pt")
    sampler = reference_sampler(model.config, rows=ItemFeatureTable.from_graph_store(store), neighborhoods=nb,
                                store=store, seed=seed)
    return embed_items(model, sampler, np.arange(store.n_items), batch_size=7)


def assert_equal_to_reference(run_dir: Path, ref: torch.Tensor) -> None:
    got = torch.from_numpy(np.array(load_embeddings(run_dir)))
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= TOL
    parts = pq.read_table(run_dir / "infer" / "embeddings").to_pandas()
    assert sorted(parts["item"].tolist()) == list(range(ref.shape[0]))
    from_parquet = np.stack(parts.sort_values("item")["embedding"].to_numpy())
    assert np.array_equal(from_parquet, got.numpy())
    encoder, _ = load_encoder(run_dir / "train" / "checkpoint.pt")  # the query side: the head on every item
    assert encoder.query_proj is not None
    with torch.no_grad():
        expected = encoder.queries(ref)
    queries = torch.from_numpy(np.load(run_dir / "infer" / "query_embeddings.npy"))
    assert float((queries - expected).abs().max()) <= TOL


@pytest.mark.parametrize(("kind", "sage"), [("pinsage", "two_step"), ("graphsage", "two_step"),
                                          ("graphsage", "distinct")])
def test_map_reduce_equals_embed_items_on_1_and_2_workers(tmp_path: Path, kind: str, sage: str,
                                                         dask_client: Client, dask_client_1: Client) -> None:
    store, nb = make_run(tmp_path, kind, sage_neighbors=sage)
    ref = reference(tmp_path, store, nb, seed=3)
    cfg = InferConfig(block_items=13, sample_seed=3)
    two = run_infer(tmp_path, cfg, dask_client, progress=False)
    assert not two.reused and two.report["blocks"] == 5 and two.report["layout"] == "ranges"
    assert two.report["workers"] == 2 and all(r > 0 for r in two.report["fetched_rows_per_layer"])
    assert_equal_to_reference(tmp_path, ref)
    assert load_model_config(tmp_path) == load_model(tmp_path / "train" / "checkpoint.pt").config
    again = run_infer(tmp_path, cfg, dask_client, progress=False)
    assert again.reused  # same checkpoint, inputs and settings: a no-op
    one = run_infer(tmp_path, InferConfig(block_items=60, sample_seed=3), dask_client_1, progress=False)
    assert one.report["blocks"] == 1 and one.report["fetched_rows_per_layer"] == [0, 0]
    assert_equal_to_reference(tmp_path, ref)


@pytest.mark.parametrize("kind", ["pinsage", "graphsage"])
def test_partition_shards_are_the_blocks(tmp_path: Path, kind: str, dask_client: Client) -> None:
    store, nb = make_run(tmp_path, kind, partition_parts=3, pooling="mean", n_layers=3, fanouts=(3, 2, 2))
    out = run_infer(tmp_path, InferConfig(), dask_client, progress=False)
    assert out.report["layout"] == "partition" and out.report["blocks"] == 3
    if kind == "pinsage":  # T covers every row: a shard fetches exactly its halo, once per layer
        halos = read_stage(tmp_path, "partition").report["halo_sizes"]
        assert out.report["fetched_rows_per_layer"] == [sum(halos)] * 3
    assert_equal_to_reference(tmp_path, reference(tmp_path, store, nb))
    ranges = run_infer(tmp_path, InferConfig(use_partition=False, block_items=25), dask_client, progress=False)
    assert ranges.report["layout"] == "ranges" and ranges.report["blocks"] == 3


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, dask_client_1: Client,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="pinsage train"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt: no checkpoint there"):
        run_infer(tmp_path, InferConfig(checkpoint=str(tmp_path / "nothing.pt")), dask_client_1)
    assert main(["infer", "--run-dir", str(tmp_path), "--workers", "1", "--dashboard-address", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pinsage infer: error: ") and "pinsage train" in err[0]
    assert not (tmp_path / "infer").exists()


def test_mismatched_checkpoint_is_a_clear_error(tmp_path: Path, dask_client_1: Client) -> None:
    store, _ = make_run(tmp_path, "pinsage")
    ckpt = tmp_path / "train" / "checkpoint.pt"
    payload = torch.load(ckpt, weights_only=False)
    other = dict(payload, model_config=model_config("pinsage", store, content_dim=3).to_dict())
    torch.save(other, tmp_path / "content.pt")
    with pytest.raises(ValueError, match="weights do not match"):  # weights of one config, another config
        run_infer(tmp_path, InferConfig(checkpoint=str(tmp_path / "content.pt")), dask_client_1)
    wider = build_model(model_config("pinsage", store, content_dim=3))
    torch.save(dict(other, model_state=wider.state_dict()), tmp_path / "wider.pt")
    with pytest.raises(ValueError, match="graph store has 4; was it trained on another run"):
        run_infer(tmp_path, InferConfig(checkpoint=str(tmp_path / "wider.pt")), dask_client_1)
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="this code reads 'pinsage-checkpoint'"):
        run_infer(tmp_path, InferConfig(checkpoint=str(tmp_path / "foreign.pt")), dask_client_1)
    assert not (tmp_path / "infer").exists() and not (tmp_path / "infer" / EMBEDDINGS_NPY).exists()


@pytest.mark.cuda  # workers computing on torch's CUDA device; a plain LocalCluster, no RAPIDS
def test_gpu_workers_equal_the_cpu_reference(tmp_path: Path, dask_client: Client) -> None:
    store, nb = make_run(tmp_path, "pinsage")
    out = run_infer(tmp_path, InferConfig(block_items=16), dask_client, backend="gpu", progress=False)
    assert out.report["device"] == "cuda"
    assert_equal_to_reference(tmp_path, reference(tmp_path, store, nb))


def test_cli_writes_the_stage_and_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, nb = make_run(tmp_path, "pinsage")
    argv = ["infer", "--run-dir", str(tmp_path), "--workers", "1", "--dashboard-address", "127.0.0.1:0",
            "--block-items", "20", "--backend", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pinsage infer: done: 60 items x 8 (pinsage, 3 blocks by ranges" in out
    assert_equal_to_reference(tmp_path, reference(tmp_path, store, nb))
    assert main(argv) == 0 and "pinsage infer: up to date" in capsys.readouterr().out
