from __future__ import annotations

import numpy as np
import pytest
import torch

from gnn.features import TensorRows
from gnn.models import ModelConfig, build_sampler
from gnn.sampler import (
    CoInteractionGraphTooLarge,
    CoInteractionNeighbors,
    DistinctCoInteractionNeighbors,
    GraphSageSampler,
    NeighborhoodsLike,
    PinSageSampler,
    UniformNeighbors,
    WalkNeighbors,
    co_interaction_graph,
    expand_hop,
)
from tests.gnn.model_graphs import community_store, tiny_neighborhoods


def id_rows(n: int) -> TensorRows:
    """Node ids as features: row i is (i, 10 i), so every gathered row can be checked."""
    ids = torch.arange(n, dtype=torch.float32)
    return TensorRows(torch.stack([ids, 10 * ids], dim=1))


def test_standin_fits_protocol() -> None:
    nb = tiny_neighborhoods()
    assert isinstance(nb, NeighborhoodsLike)


def test_walk_neighbors_top_t_padded() -> None:
    nb = tiny_neighborhoods()
    ids, w = WalkNeighbors(nb, n_neighbors=2)(np.array([1, 4, 2]))
    assert ids.tolist() == [[0, 3], [-1, -1], [3, -1]]
    assert w.tolist() == [[3.0, 2.0], [0.0, 0.0], [4.0, 0.0]]
    assert WalkNeighbors(nb).n_neighbors == 3


def test_expand_hop_dedupes_with_targets_first() -> None:
    src, index, weight = expand_hop(np.array([5, 2]), np.array([[7, 2, -1], [5, 9, 7]]),
                                    np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    assert src.tolist() == [5, 2, 7, 9]
    assert index.tolist() == [[2, 1, 0], [0, 3, 2]]
    assert weight.tolist() == [[1, 2, 0], [4, 5, 6]]


def test_pinsage_blocks_are_exactly_the_expected_ids() -> None:
    nb = tiny_neighborhoods()
    sampler = PinSageSampler(neighbors=WalkNeighbors(nb, n_neighbors=2), rows=id_rows(5))
    sub = sampler.sample(np.array([2, 4]), np.random.default_rng(0))
    # hop 1: 2 -> [3], 4 -> []; hop 2: 3 -> [2, 1]
    assert [n.tolist() for n in sub.node_ids] == [[2, 4], [2, 4, 3], [2, 4, 3, 1]]
    assert sub.blocks[0].nbr_index.tolist() == [[2, 0], [1, 1]]
    assert sub.blocks[0].nbr_weight.tolist() == [[4.0, 0.0], [0.0, 0.0]]
    assert sub.blocks[1].nbr_index.tolist() == [[2, 0], [1, 1], [0, 3]]
    assert sub.blocks[1].nbr_weight.tolist() == [[4.0, 0.0], [0.0, 0.0], [2.0, 2.0]]
    # rows are those of the last hop's node ids, in order
    assert sub.rows[:, 0].tolist() == [2.0, 4.0, 3.0, 1.0]
    assert sub.rows[:, 1].tolist() == [20.0, 40.0, 30.0, 10.0]


def test_blocks_map_back_to_true_neighbours() -> None:
    community = community_store()
    nbrs = CoInteractionNeighbors.from_graph_store(community)
    sampler = GraphSageSampler(neighbors=nbrs, rows=id_rows(community.n_items), fanouts=(4, 3))
    sub = sampler.sample(np.array([0, 5, 7]), np.random.default_rng(3))
    assert [b.nbr_index.shape[1] for b in sub.blocks] == [3, 4]  # targets get S_2, the next hop S_1
    ui, iu = community.user_items, community.item_users
    for hop, block in enumerate(sub.blocks):
        dst, src = sub.node_ids[hop], sub.node_ids[hop + 1]
        assert torch.equal(src[: dst.shape[0]], dst)
        for v, row, w in zip(dst.tolist(), block.nbr_index.tolist(), block.nbr_weight.tolist(), strict=True):
            co = {int(j) for u in iu.row(v) for j in ui.row(int(u))}
            assert all(src[r].item() in co for r, x in zip(row, w, strict=True) if x > 0)
    assert sub.rows[:, 0].tolist() == sub.node_ids[-1].float().tolist()


def test_sampling_is_a_function_of_the_rng() -> None:
    community = community_store()
    sampler = GraphSageSampler(neighbors=CoInteractionNeighbors.from_graph_store(community),
                               rows=id_rows(community.n_items))
    a = sampler.sample(np.arange(6), np.random.default_rng([1, 2]))
    b = sampler.sample(np.arange(6), np.random.default_rng([1, 2]))
    c = sampler.sample(np.arange(6), np.random.default_rng([1, 3]))
    assert all(torch.equal(x, y) for x, y in zip(a.node_ids, b.node_ids, strict=True))
    assert not all(torch.equal(x.blocks[0].nbr_index, c.blocks[0].nbr_index) for x in (a,))


def test_co_interaction_draws_follow_the_two_step_walk() -> None:
    # item 0's users: u0 (items 0, 1) and u1 (items 0, 2, 3, 3): P(1)=1/4, P(2)=1/8, P(3)=1/4, P(0)=1/4+1/8
    ui_indptr, ui_indices = np.array([0, 2, 6]), np.array([0, 1, 0, 2, 3, 3])
    iu_indptr, iu_indices = np.array([0, 2, 3, 4, 6]), np.array([0, 1, 0, 1, 1, 1])
    nbrs = CoInteractionNeighbors(item_users_indptr=iu_indptr, item_users_indices=iu_indices,
                                  user_items_indptr=ui_indptr, user_items_indices=ui_indices)
    ids, w = nbrs(np.array([0]), 40000, np.random.default_rng(0))
    freq = np.bincount(ids.ravel(), minlength=4) / 40000
    np.testing.assert_allclose(freq, [0.375, 0.25, 0.125, 0.25], atol=0.01)
    assert w.min() == 1.0


# users: u0 (items 0, 1), u1 (items 0, 2, 3, 3), u2 (items 0, 1), u3 (item 4 only)
UI_INDPTR, UI_INDICES = np.array([0, 2, 6, 8, 9]), np.array([0, 1, 0, 2, 3, 3, 0, 1, 4])


def test_co_interaction_graph_holds_each_distinct_neighbour_once() -> None:
    indptr, indices = co_interaction_graph(user_items_indptr=UI_INDPTR, user_items_indices=UI_INDICES, n_items=6)
    rows = [indices[indptr[i]:indptr[i + 1]].tolist() for i in range(6)]
    # item 1 shares two users with item 0 and item 3 is repeated by u1: each still appears once; no self loops;
    # item 4 (a one-item user) and item 5 (no user) have no neighbours
    assert rows == [[1, 2, 3], [0], [0, 3], [0, 2], [], []]


def test_co_interaction_graph_refuses_what_would_not_fit() -> None:
    # sum of squared distinct degrees: 4 + 9 + 4 + 1 = 18 triples
    co_interaction_graph(user_items_indptr=UI_INDPTR, user_items_indices=UI_INDICES, n_items=5, max_pairs=18)
    with pytest.raises(CoInteractionGraphTooLarge, match=r"18 user-item-item triples exceed max_pairs=17 .*two_step"):
        co_interaction_graph(user_items_indptr=UI_INDPTR, user_items_indices=UI_INDICES, n_items=5, max_pairs=17)


def test_distinct_draws_are_uniform_over_neighbours_not_walk_weighted() -> None:
    indptr, indices = co_interaction_graph(user_items_indptr=UI_INDPTR, user_items_indices=UI_INDICES, n_items=5)
    ids, w = DistinctCoInteractionNeighbors(indptr, indices)(np.array([0, 4]), 30000, np.random.default_rng(0))
    freq = np.bincount(ids[0], minlength=4) / 30000
    # uniform over {1, 2, 3}; the two-step walk would give item 1 (two shared users) 1/3 and item 2 1/12
    np.testing.assert_allclose(freq, [0.0, 1 / 3, 1 / 3, 1 / 3], atol=0.01)
    assert (ids[1] == -1).all() and w[1].max() == 0.0 and w[0].min() == 1.0


def test_model_config_picks_the_graphsage_neighbour_draw() -> None:
    store = community_store()
    rows = id_rows(store.n_items)
    base = dict(kind="graphsage", n_categories=4, fanouts=(3, 2))
    distinct = build_sampler(ModelConfig(**base, sage_neighbors="distinct"), rows=rows, store=store)  # type: ignore[arg-type]
    two_step = build_sampler(ModelConfig(**base), rows=rows, store=store)  # type: ignore[arg-type]
    assert isinstance(distinct.neighbors, DistinctCoInteractionNeighbors)
    assert type(two_step.neighbors) is CoInteractionNeighbors
    sub = distinct.sample(np.arange(6), np.random.default_rng(0))
    ui = store.user_items
    indptr, indices = co_interaction_graph(user_items_indptr=ui.indptr, user_items_indices=ui.indices,
                                           n_items=store.n_items)
    block = sub.blocks[0]
    for d in range(block.n_dst):  # every drawn source of every target is one of its distinct neighbours
        item = int(sub.node_ids[0][d])
        drawn = sub.node_ids[1][block.nbr_index[d][block.nbr_weight[d] > 0]].tolist()
        assert drawn and set(drawn) <= set(indices[indptr[item]:indptr[item + 1]].tolist())
    with pytest.raises(ValueError, match="sage_neighbors='walk'"):
        ModelConfig(sage_neighbors="walk")  # type: ignore[arg-type]


def test_uniform_neighbors_pad_isolated_nodes() -> None:
    nbrs = UniformNeighbors(np.array([0, 2, 2]), np.array([1, 1]))
    ids, w = nbrs(np.array([0, 1]), 3, np.random.default_rng(0))
    assert ids.tolist() == [[1, 1, 1], [-1, -1, -1]]
    assert w.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_bad_input_is_refused() -> None:
    nb = tiny_neighborhoods()
    sampler = PinSageSampler(neighbors=WalkNeighbors(nb), rows=id_rows(5))
    with pytest.raises(ValueError, match="distinct"):
        sampler.sample(np.array([1, 1]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="fanouts"):
        GraphSageSampler(neighbors=UniformNeighbors(np.array([0]), np.array([], np.int64)), rows=id_rows(1),
                         fanouts=())
