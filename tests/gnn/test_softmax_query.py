"""Sampled-softmax loss, its logQ correction and the query head: hand-computed values, gradients, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gnn.loss import SampledSoftmaxLoss, log_frequency
from gnn.models import ModelConfig, build_model
from gnn.trainer import TrainConfig, Trainer, compute_loss, embed_items, make_loss, query_side
from tests.gnn.test_training import group_purity, setup

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
QUERY_POS = torch.tensor([0, 1])
POSITIVE_POS = torch.tensor([2, 0])
W = torch.tensor([1.0, 3.0])


def test_sampled_softmax_by_hand() -> None:
    # tau 0.5: row 0 logits [2, 0, 1.2], the query itself (0) masked, target 2; row 1 [0, 2, 1.6], 1 masked, target 0
    loss0 = math.log(math.exp(0.0) + math.exp(1.2)) - 1.2
    loss1 = math.log(math.exp(0.0) + math.exp(1.6)) - 0.0
    got = SampledSoftmaxLoss(0.5)(Q, C, QUERY_POS, POSITIVE_POS, W)
    assert got.item() == pytest.approx((loss0 + 3 * loss1) / 4, rel=1e-6)


def test_logq_correction_by_hand() -> None:
    log_q = torch.log(torch.tensor([0.1, 0.5, 0.4]))
    loss = SampledSoftmaxLoss(0.5, log_q=log_q, logq_alpha=1.0)
    ids = torch.tensor([0, 1, 2])
    row0 = [0.0 - math.log(0.5), 1.2 - math.log(0.4)]  # candidates 1, 2; target 2
    row1 = [0.0 - math.log(0.1), 1.6 - math.log(0.4)]  # candidates 0, 2; target 0
    loss0 = math.log(sum(math.exp(x) for x in row0)) - row0[1]
    loss1 = math.log(sum(math.exp(x) for x in row1)) - row1[0]
    got = loss(Q, C, QUERY_POS, POSITIVE_POS, W, ids)
    assert got.item() == pytest.approx((loss0 + 3 * loss1) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="candidate_ids"):
        loss(Q, C, QUERY_POS, POSITIVE_POS, W)


def test_query_equal_to_positive_is_not_masked() -> None:
    got = SampledSoftmaxLoss(1.0)(Q[:1], C, torch.tensor([0]), torch.tensor([0]), W[:1])
    assert got.item() == pytest.approx(math.log(math.e + 1 + math.exp(0.6)) - 1.0, rel=1e-6)


def test_log_frequency_and_validation() -> None:
    got = log_frequency(np.array([0, 0, 2]), 4, smoothing=1.0)  # counts + 1: 3, 1, 2, 1 of 7
    assert torch.allclose(got, torch.log(torch.tensor([3, 1, 2, 1]) / 7.0))
    with pytest.raises(ValueError, match="temperature"):
        SampledSoftmaxLoss(0.0)
    with pytest.raises(ValueError, match=r"TrainConfig\.loss"):
        TrainConfig(loss="hinge")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["pinsage", "graphsage"])
def test_softmax_and_query_head_gradients_reach_every_parameter(kind: str) -> None:
    config, _, batcher = setup(kind)
    model = build_model(ModelConfig(**{**config.to_dict(), "query_head": True}), seed=0)
    loss = make_loss(TrainConfig(loss="softmax", logq_alpha=1.0), batcher)
    assert isinstance(loss, SampledSoftmaxLoss) and loss.log_q is not None
    compute_loss(model, loss, batcher(1, 0)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_query_head_leaves_item_embeddings_alone() -> None:
    config, sampler, _ = setup("pinsage")
    plain = build_model(ModelConfig(**{**config.to_dict(), "query_head": False}), seed=0)
    headed = build_model(ModelConfig(**{**config.to_dict(), "query_head": True}), seed=0)
    ids = np.arange(40)
    emb = embed_items(plain, sampler, ids)
    assert torch.equal(emb, embed_items(headed, sampler, ids))  # the head sits outside the item encoder
    assert torch.allclose(query_side(headed, emb), emb, atol=1e-6)  # identity at the start
    assert query_side(plain, emb) is emb
    with torch.no_grad():
        headed.query_proj.weight.mul_(2.0).add_(0.1)  # type: ignore[union-attr]
    assert not torch.allclose(query_side(headed, emb), emb, atol=1e-3)


def test_softmax_training_learns_the_communities() -> None:
    config, sampler, batcher = setup("pinsage")
    model = build_model(ModelConfig(**{**config.to_dict(), "query_head": True}), seed=0)
    before = group_purity(model, sampler)
    trainer = Trainer(model, batcher, config=TrainConfig(epochs=15, lr=3e-3, loss="softmax", temperature=0.2,
                                                         mode="sync", hard_cap=0))
    reports = trainer.fit()
    assert reports[-1].mean_loss < 0.9 * reports[0].mean_loss
    after = group_purity(model, sampler)
    assert after > 0.85 and after > before + 0.2


def test_embedding_scorer_scores_the_query_side_against_the_items() -> None:
    from gnn.baselines import EmbeddingScorer, Histories

    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    queries = np.array([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]], np.float32)  # a "query head" swapping the axes
    scorer = EmbeddingScorer(items, query_embeddings=queries)
    assert np.allclose(scorer.score_items(np.array([0, 2])), [[0.0, 1.0, 0.8], [0.8, 0.6, 0.96]])
    hist = Histories.from_arrays(np.array([0, 0]), np.array([2, 1]), n_users=1, n_items=3)
    assert np.allclose(scorer.score_users(hist, np.array([0])), [[1.0, 0.0, 0.6]])  # query side of item 1
    assert np.allclose(EmbeddingScorer(items).score_items(np.array([0])), [[1.0, 0.0, 0.6]])
    with pytest.raises(ValueError, match="query_embeddings"):
        EmbeddingScorer(items, query_embeddings=queries[:, :1])


def test_configs_from_before_the_query_head_build_without_one() -> None:
    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "query_head"}
    assert ModelConfig.from_dict(old).query_head is False
    assert ModelConfig.from_dict(ModelConfig().to_dict()).query_head is True
