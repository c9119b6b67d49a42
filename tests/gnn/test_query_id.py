"""The per-item query offsets of the query head (``ModelConfig.query_id_buckets``): silent at the start, learnt
only for the batch's query items, required ids, validation, and the default that keeps the old head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnn.features import hash_ids
from gnn.models import ModelConfig, build_model
from gnn.trainer import TrainConfig, Trainer, compute_loss, embed_items, make_loss, query_side
from pipeline.infer import write_query_side
from tests.gnn.test_training import setup


def headed_config(buckets: int) -> tuple[ModelConfig, object, object]:
    config, sampler, batcher = setup("pinsage")
    return ModelConfig(**{**config.to_dict(), "query_head": True, "query_id_buckets": buckets}), sampler, batcher


def test_default_head_has_no_offsets_and_ignores_ids() -> None:
    config, sampler, _ = setup("pinsage")
    assert config.query_id_buckets == 0
    model = build_model(config, seed=0)
    assert model.query_id is None
    emb = embed_items(model, sampler, np.arange(40))
    assert torch.equal(query_side(model, emb), query_side(model, emb, torch.arange(40)))


def test_offsets_start_at_zero_and_need_ids() -> None:
    config, sampler, _ = headed_config(64)
    model = build_model(config, seed=0)
    assert model.query_id is not None and tuple(model.query_id.weight.shape) == (64, config.embed_dim)
    emb = embed_items(model, sampler, np.arange(40))
    assert torch.allclose(query_side(model, emb, torch.arange(40)), emb, atol=1e-6)  # identity at the start
    with pytest.raises(ValueError, match=r"query_id_buckets=64 needs the item id"):
        query_side(model, emb)
    with pytest.raises(ValueError, match=r"query_id_buckets=64 needs the item id"):
        query_side(model, emb, torch.arange(39))


def test_only_the_query_items_rows_get_gradients_and_they_make_queries_differ() -> None:
    config, sampler, batcher = headed_config(64)
    model = build_model(config, seed=0)
    batch = batcher(0, 0)
    compute_loss(model, make_loss(TrainConfig(), batcher), batch).backward()
    assert model.query_id is not None and model.query_id.weight.grad is not None
    touched = torch.nonzero(model.query_id.weight.grad.abs().sum(1) > 0).flatten()
    queried = torch.unique(hash_ids(batch.subgraph.node_ids[0][batch.query], 64))
    assert torch.equal(touched, queried)  # rows of the batch's query items, and only those
    Trainer(model, batcher, config=TrainConfig(epochs=2, mode="sync", log_every=0)).fit()
    emb = embed_items(model, sampler, np.arange(40))
    shared = model.queries(emb, torch.zeros(40, dtype=torch.int64))  # every row given item 0's offset
    own = query_side(model, emb, torch.arange(40))
    assert not torch.allclose(own, shared, atol=1e-4)  # the offsets moved and differ per item


def test_write_query_side_hands_row_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config, sampler, batcher = headed_config(64)
    model = build_model(config, seed=0)
    Trainer(model, batcher, config=TrainConfig(epochs=1, mode="sync", log_every=0)).fit()
    emb = embed_items(model, sampler, np.arange(40))
    np.save(tmp_path / "emb.npy", emb.numpy())
    write_query_side(model, tmp_path / "emb.npy", tmp_path / "q.npy", chunk=16)  # rows 16.. need offset ids
    with torch.no_grad():
        expected = query_side(model, emb, torch.arange(40)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), expected, atol=1e-6)


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"query_id_buckets"):
        ModelConfig(query_id_buckets=-1)
    with pytest.raises(ValueError, match=r"query_id_buckets"):
        ModelConfig(query_head=False, query_id_buckets=8)
    assert ModelConfig.from_dict(ModelConfig(query_id_buckets=8).to_dict()).query_id_buckets == 8
