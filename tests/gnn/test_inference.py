"""Layer-wise inference (gnn.inference) equals the model's own forward pass (embed_items) for every item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnn.features import ItemFeatureTable
from gnn.inference import (
    FrozenCoInteraction,
    LayerNeighborSampler,
    Layerwise,
    WalkLayerNeighbors,
    counter_uniforms,
    fixed_width_mean,
    layer_neighbors_for,
    layerwise_embeddings,
    message_table,
    plan_join,
    reference_sampler,
)
from gnn.layers import weighted_mean
from gnn.models import ModelConfig, build_model
from gnn.sampler import CoInteractionNeighbors, DistinctCoInteractionNeighbors
from gnn.trainer import embed_items
from tests.gnn.model_graphs import co_count_neighborhoods, community_store, tiny_neighborhoods

TOL = 1e-5


def small_config(kind: str, **over: object) -> ModelConfig:
    base = dict(kind=kind, n_categories=4, input_dim=16, hidden_dim=16, embed_dim=8, id_buckets=64, id_dim=8,
                fanouts=(4, 3), n_neighbors=5)
    base.update(over)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "pooling", "n_layers", "sage"), [
    ("pinsage", "importance", 2, "two_step"), ("pinsage", "mean", 2, "two_step"),
    ("pinsage", "importance", 3, "two_step"), ("graphsage", "importance", 2, "two_step"),
    ("graphsage", "importance", 1, "two_step"), ("graphsage", "importance", 2, "distinct")])
def test_layerwise_equals_embed_items_for_every_item(kind: str, pooling: str, n_layers: int, sage: str) -> None:
    store = community_store(n_items=48)
    nb = co_count_neighborhoods(store)
    rows = ItemFeatureTable.from_graph_store(store)
    fanouts = (4, 3, 2)[:n_layers]
    config = small_config(kind, pooling=pooling, n_layers=n_layers, fanouts=fanouts, sage_neighbors=sage)
    model = build_model(config, seed=1)
    table = layer_neighbors_for(config, neighborhoods=nb, store=store, seed=7)
    ref = embed_items(model, reference_sampler(config, rows=rows, neighborhoods=nb, store=store, seed=7),
                      np.arange(store.n_items), batch_size=5)
    got = layerwise_embeddings(model, rows, table, store.n_items, block_items=7)
    assert got.shape == ref.shape == (store.n_items, 8)
    assert float((got - ref).abs().max()) <= TOL
    assert float(ref.norm(dim=1).min()) > 0.5  # not a trivially zero output


def test_items_without_neighbours_and_id_features() -> None:
    nb = tiny_neighborhoods()  # item 4 has no neighbours
    rows = ItemFeatureTable.from_arrays(category=np.array([0, 1, 0, 1, 0]), counts=np.arange(20).reshape(5, 4),
                                        n_categories=2)
    config = small_config("pinsage", n_categories=2, n_neighbors=2)
    model = build_model(config, seed=3)
    ref = embed_items(model, reference_sampler(config, rows=rows, neighborhoods=nb), np.arange(5))
    got = layerwise_embeddings(model, rows, WalkLayerNeighbors(nb, n_neighbors=2), 5, block_items=2)
    assert float((got - ref).abs().max()) <= TOL


def test_frozen_graphsage_sample_is_a_function_of_item_and_layer() -> None:
    store = community_store()
    frozen = FrozenCoInteraction(CoInteractionNeighbors.from_graph_store(store), fanouts=(6, 3), seed=2)
    ids = np.arange(store.n_items)
    a, wa = frozen(0, ids)
    b, _ = frozen(0, ids[::-1].copy())
    assert a.shape == (store.n_items, 6) and np.array_equal(a, b[::-1])  # order / blocking does not matter
    assert frozen(1, ids)[0].shape == (store.n_items, 3)
    assert not np.array_equal(a[:, :3], frozen(1, ids)[0])  # layers draw independently
    assert not np.array_equal(a, FrozenCoInteraction(frozen.neighbors, fanouts=(6, 3), seed=3)(0, ids)[0])
    # every draw is a real co-interaction: i and j share a user
    for i, row in enumerate(a):
        users = set(store.item_users.row(i).tolist())
        for j in row[row >= 0]:
            assert users & set(store.item_users.row(int(j)).tolist())
    assert np.array_equal(wa, (a >= 0).astype(np.float32))


def test_frozen_distinct_sample_draws_distinct_co_interaction_neighbours() -> None:
    store = community_store()
    neighbors = DistinctCoInteractionNeighbors.from_graph_store(store)
    frozen = layer_neighbors_for(small_config("graphsage", sage_neighbors="distinct"), store=store, seed=4)
    assert isinstance(frozen, FrozenCoInteraction) and frozen.neighbors.indices.shape == neighbors.indices.shape
    ids = np.arange(store.n_items)
    a, wa = frozen(0, ids)
    assert np.array_equal(a, frozen(0, ids[::-1].copy())[0][::-1])  # a function of the item, not the block
    for i, row in enumerate(a):
        allowed = set(neighbors.indices[neighbors.indptr[i]:neighbors.indptr[i + 1]].tolist())
        assert set(row[row >= 0].tolist()) <= allowed and (row >= 0).any() == bool(allowed)
    assert np.array_equal(wa, (a >= 0).astype(np.float32))


def test_counter_uniforms_are_uniform_and_deterministic() -> None:
    u = counter_uniforms(0, 1, np.arange(20000), 5, 0)
    assert u.shape == (20000, 5) and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and np.array_equal(u, counter_uniforms(0, 1, np.arange(20000), 5, 0))
    assert not np.array_equal(u, counter_uniforms(0, 1, np.arange(20000), 5, 1))


def test_plan_join_positions_point_at_the_right_messages() -> None:
    # two blocks: block 0 owns items {0, 2, 4}, block 1 owns {1, 3}; messages = item id as a feature
    own_items = {0: np.array([0, 2, 4]), 1: np.array([1, 3])}
    owner_of = np.array([0, 1, 0, 1, 0])
    pos_of = np.array([0, 0, 1, 1, 2])
    nbr = np.array([[1, 2, -1], [3, 3, 0], [4, 1, 3]])  # neighbours of items 0, 2, 4
    weight = np.array([[1.0, 2.0, 0.0], [1.0, 1.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
    plan = plan_join(0, 3, nbr, weight, owner_of[np.maximum(nbr, 0)], pos_of[np.maximum(nbr, 0)])
    assert list(plan.requests) == [1] and plan.requests[1].tolist() == [0, 1] and plan.n_fetched == 2
    msgs = {b: torch.tensor(ids, dtype=torch.float32)[:, None] for b, ids in own_items.items()}
    table = message_table(msgs[0], {1: msgs[1][torch.from_numpy(plan.requests[1])]})
    got = table[torch.from_numpy(plan.nbr_index)][..., 0]
    valid = nbr >= 0
    assert np.array_equal(got.numpy()[valid], nbr[valid])
    assert plan.nbr_weight[0, 2] == 0.0


def test_layer_neighbor_sampler_reads_the_layer_of_each_hop() -> None:
    store = community_store()
    rows = ItemFeatureTable.from_graph_store(store)
    frozen = FrozenCoInteraction(CoInteractionNeighbors.from_graph_store(store), fanouts=(5, 2), seed=0)
    sub = LayerNeighborSampler(neighbors=frozen, rows=rows, n_layers=2).sample(np.array([3, 9]),
                                                                               np.random.default_rng(0))
    assert sub.blocks[0].nbr_index.shape == (2, 2)  # hop 0 feeds the last layer (fanout S_2 = 2)
    assert sub.blocks[1].nbr_index.shape[1] == 5


def test_layerwise_rejects_what_it_cannot_run() -> None:
    with pytest.raises(TypeError, match="ItemEncoder"):
        Layerwise(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="neighborhoods"):
        layer_neighbors_for(small_config("pinsage"))
    with pytest.raises(ValueError, match="store"):
        layer_neighbors_for(small_config("graphsage"))
    with pytest.raises(ValueError, match="block_items"):
        layerwise_embeddings(build_model(small_config("pinsage")), lambda ids: torch.zeros(0), lambda k, i: (i, i),
                             3, block_items=0)


def test_fixed_width_mean_equals_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    messages = torch.randn(30, 6)
    index = torch.from_numpy(rng.integers(0, 30, (12, 4)))
    weight = torch.from_numpy(rng.random((12, 4)).astype(np.float32))
    weight[3] = 0.0  # a row without neighbours gives zeros
    got = fixed_width_mean(messages, index, weight)
    assert float((got - weighted_mean(messages, index, weight)).abs().max()) <= 1e-6
    assert float(got[3].abs().max()) == 0.0


@pytest.mark.cuda  # torch with CUDA only (no RAPIDS)
@pytest.mark.parametrize("kind", ["pinsage", "graphsage"])
def test_layerwise_on_cuda_equals_the_cpu_reference(kind: str) -> None:
    store = community_store(n_items=48)
    nb = co_count_neighborhoods(store)
    rows = ItemFeatureTable.from_graph_store(store)
    config = small_config(kind)
    model = build_model(config, seed=1)
    ref = embed_items(model, reference_sampler(config, rows=rows, neighborhoods=nb, store=store), np.arange(48))
    table = layer_neighbors_for(config, neighborhoods=nb, store=store)
    cuda = build_model(config, seed=1).cuda()

    def cuda_rows(ids: np.ndarray) -> torch.Tensor:
        return rows(ids).cuda()

    lw = Layerwise(cuda)
    h = lw.encode(torch.arange(48, device="cuda"), cuda_rows(np.arange(48)))
    for layer in range(lw.n_layers):
        nbr, w = table(layer, np.arange(48))
        index = torch.from_numpy(np.where(nbr >= 0, nbr, 0)).cuda()
        h = lw.combine(layer, h, lw.message(layer, h), index, torch.from_numpy(w).cuda())
    got = lw.head(h).detach().cpu()
    assert float((got - ref).abs().max()) <= TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_plan_join_over_several_blocks_and_none(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items, n_blocks = 50, 4
    owner_of = rng.integers(0, n_blocks, n_items)
    pos_of = np.zeros(n_items, np.int64)
    for b in range(n_blocks):
        pos_of[owner_of == b] = np.arange((owner_of == b).sum())
    members = {b: np.flatnonzero(owner_of == b) for b in range(n_blocks)}
    nbr = np.where(rng.random((len(members[0]), 6)) < 0.8, rng.integers(0, n_items, (len(members[0]), 6)), -1)
    safe = np.maximum(nbr, 0)
    plan = plan_join(0, len(members[0]), nbr, np.ones(nbr.shape, np.float32), owner_of[safe], pos_of[safe])
    assert sorted(plan.requests) == sorted(set(owner_of[nbr[nbr >= 0]].tolist()) - {0})
    ids = {b: torch.tensor(m, dtype=torch.float32)[:, None] for b, m in members.items()}
    table = message_table(ids[0], {c: ids[c][torch.from_numpy(r)] for c, r in plan.requests.items()})
    got = table[torch.from_numpy(plan.nbr_index)][..., 0].numpy()
    assert np.array_equal(got[nbr >= 0], nbr[nbr >= 0])
    local = plan_join(0, 3, np.array([[0, 2, -1]]), np.ones((1, 3), np.float32), np.zeros((1, 3), np.int64),
                      np.array([[0, 2, 0]]))
    assert local.requests == {} and local.nbr_index.tolist() == [[0, 2, 0]] and local.n_fetched == 0
