from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gnn.batches import PairBatcher, TrainBatch, TrainingPairs, pick_hard_negatives
from gnn.checkpoint import load_model, restore_checkpoint, save_checkpoint
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore
from gnn.loss import MaxMarginLoss, hard_negatives_for_epoch
from gnn.models import ModelConfig, build_model, build_sampler
from gnn.producer import ProducerError, QueueStats, iterate_batches
from gnn.sampler import GraphSageSampler, PinSageSampler
from gnn.trainer import StepInfo, TrainConfig, Trainer, compute_loss, embed_items
from tests.gnn.model_graphs import co_count_neighborhoods, community_store, pairs_of


def setup(kind: str = "pinsage", *, seed: int = 0, batch_size: int = 32,
          store: GraphStore | None = None) -> tuple[ModelConfig, PinSageSampler | GraphSageSampler, PairBatcher]:
    store = community_store() if store is None else store
    nb = co_count_neighborhoods(store)
    table = ItemFeatureTable.from_graph_store(store)
    config = ModelConfig(kind=kind, n_categories=store.n_categories, input_dim=16, hidden_dim=16,  # type: ignore[arg-type]
                         embed_dim=8, id_buckets=64, id_dim=8, fanouts=(4, 3))
    sampler = build_sampler(config, rows=table, neighborhoods=nb, store=store)
    batcher = PairBatcher(TrainingPairs.from_arrays(*pairs_of(store)), sampler, n_items=store.n_items,
                          batch_size=batch_size, n_negatives=10, hard_negatives=nb.hard_negatives, hard_cap=2,
                          seed=seed)
    return config, sampler, batcher


def batches_equal(a: TrainBatch, b: TrainBatch) -> bool:
    tensors = ("query", "positive", "weight", "negatives", "hard", "hard_mask")
    same = all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors)
    same &= all(torch.equal(x, y) for x, y in zip(a.subgraph.node_ids, b.subgraph.node_ids, strict=True))
    same &= all(torch.equal(x.nbr_index, y.nbr_index) and torch.equal(x.nbr_weight, y.nbr_weight)
                for x, y in zip(a.subgraph.blocks, b.subgraph.blocks, strict=True))
    return same and torch.equal(a.subgraph.rows, b.subgraph.rows)


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pinsage-producer")]


def test_batch_positions_point_at_the_right_items() -> None:
    _, _, batcher = setup()
    batch = batcher(2, 1)
    targets = batch.subgraph.node_ids[0]
    take = batcher.epoch_order(2)[32:64]
    assert targets[batch.query].tolist() == batcher.pairs.query[take].tolist()
    assert targets[batch.positive].tolist() == batcher.pairs.positive[take].tolist()
    assert batch.hard.shape == (32, 2)  # epoch 2 (0-based) -> 2 hard negatives, cap 2
    hard_ids = targets[batch.hard][batch.hard_mask]
    cand = batcher.hard_negatives[batcher.pairs.query[take]]  # type: ignore[index]
    assert all(h in row for h, row in zip(hard_ids.tolist(), np.repeat(cand, 2, axis=0).tolist(), strict=True))


def test_max_candidates_bounds_every_batch_with_hard_negatives() -> None:
    """The bound the packed candidate gather pads to holds in every epoch of the curriculum, the last short batch
    included, and does not exceed the catalogue."""
    store = community_store(n_users=120, n_items=400, per_user=8)
    _, _, batcher = setup(store=store, batch_size=11)
    assert batcher.max_candidates == 11 * (2 + 2) + 10 < store.n_items
    seen = [int(batcher(epoch, i).subgraph.node_ids[0].shape[0]) for epoch in range(4)
            for i in range(batcher.n_batches)]
    assert max(seen) <= batcher.max_candidates and len(batcher.pairs) % 11  # a short last batch was among them
    _, _, small = setup(batch_size=64)
    assert small.max_candidates == small.n_items  # 64 * 4 + 10 distinct items would exceed the 40 there are


def test_curriculum_and_hard_negative_picks() -> None:
    assert [hard_negatives_for_epoch(e, cap=3) for e in range(6)] == [0, 1, 2, 3, 3, 3]
    ids, mask = pick_hard_negatives(np.array([[4, -1, -1], [7, 8, 9]]), 2, np.random.default_rng(0))
    assert ids[0, 0] == 4 and mask.tolist()[0] == [True, False]
    assert set(ids[1].tolist()) <= {7, 8, 9} and len(set(ids[1].tolist())) == 2 and mask[1].all()


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_producer_yields_the_synchronous_batches(n_threads: int) -> None:
    _, _, batcher = setup()
    sync = list(iterate_batches(batcher, epoch=1, n_batches=batcher.n_batches, mode="sync"))
    stats = QueueStats()
    produced = list(iterate_batches(batcher, epoch=1, n_batches=batcher.n_batches, n_threads=n_threads,
                                    queue_size=2, stats=stats))
    assert len(produced) == len(sync) == batcher.n_batches
    assert all(batches_equal(a, b) for a, b in zip(sync, produced, strict=True))
    assert stats.produced == batcher.n_batches and stats.max_buffered <= 2
    assert producer_threads() == []


def test_producer_error_surfaces_and_threads_stop() -> None:
    def make(epoch: int, index: int) -> int:
        if index == 3:
            raise KeyError("row 3 is missing")
        return index

    seen: list[int] = []

    def consume() -> None:
        seen.extend(iterate_batches(make, epoch=0, n_batches=50, n_threads=3, queue_size=4))

    with pytest.raises(ProducerError, match="row 3 is missing") as info:
        consume()
    assert seen == [0, 1, 2] and isinstance(info.value.__cause__, KeyError)
    assert producer_threads() == []


def test_consumer_leaving_early_stops_producers() -> None:
    stream = iterate_batches(lambda e, i: i, epoch=0, n_batches=1000, n_threads=2, queue_size=3)
    for x in stream:
        if x == 5:
            break
    stream.close()  # what `with closing(...)` in the trainer does
    assert producer_threads() == []

    def boom() -> None:
        for x in iterate_batches(lambda e, i: i, epoch=0, n_batches=1000, n_threads=2):
            if x == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        boom()
    assert producer_threads() == []


def test_max_margin_loss_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    n = torch.tensor([[0.0, 1.0], [0.8, 0.6]])
    hard = torch.tensor([[[0.6, 0.8]], [[0.0, 1.0]]])
    loss = MaxMarginLoss(margin=0.5)
    # pair 0: pos 1; negs 0, 0.8 -> hinge 0, 0.3; hard 0.6 -> 0.1; pair 1: pos .8; negs 1, .6 -> .7, .3; hard 1 -> .7
    w = torch.tensor([1.0, 3.0])
    expected = (1 * (0.3 + 0.1) / 3 + 3 * (0.7 + 0.3 + 0.7) / 3) / 4
    got = loss(q, p, n, w, hard, torch.tensor([[True], [True]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    masked = loss(q, p, n, w, hard, torch.tensor([[True], [False]]))
    assert masked.item() == pytest.approx((1 * 0.4 / 3 + 3 * 1.0 / 2) / 4, rel=1e-6)


@pytest.mark.parametrize("kind", ["pinsage", "graphsage"])
def test_gradients_reach_every_parameter(kind: str) -> None:
    config, _, batcher = setup(kind)
    model = build_model(config, seed=0)
    compute_loss(model, MaxMarginLoss(0.5), batcher(1, 0)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def group_purity(model: torch.nn.Module, sampler: PinSageSampler | GraphSageSampler) -> float:
    """Share of each item's 5 nearest items (dot product) that lie in its own community."""
    emb = embed_items(model, sampler, np.arange(40))
    scores = emb @ emb.T
    scores.fill_diagonal_(-9.0)
    top = scores.topk(5, dim=1).indices
    return float(((top % 4) == (torch.arange(40)[:, None] % 4)).float().mean())


@pytest.mark.parametrize(("kind", "mode"), [("pinsage", "sync"), ("pinsage", "producer"), ("graphsage", "producer")])
def test_training_learns_the_communities(kind: str, mode: str) -> None:
    config, sampler, batcher = setup(kind)
    model = build_model(config, seed=0)
    before = group_purity(model, sampler)
    steps: list[StepInfo] = []
    trainer = Trainer(model, batcher, config=TrainConfig(epochs=15, lr=3e-3, margin=0.3, mode=mode,  # type: ignore[arg-type]
                                                         loss="max_margin",
                                                         hard_cap=0), on_step=steps.append)
    reports = trainer.fit()
    assert len(reports) == 15 and trainer.step == 15 * batcher.n_batches == len(steps)
    assert reports[-1].mean_loss < 0.85 * reports[0].mean_loss
    assert reports[0].pairs == len(batcher.pairs) and reports[0].pairs_per_s > 0
    for r in reports:  # the trainer thread's phases are parts of the epoch, each taken at every step
        assert r.forward_s > 0 and r.backward_s > 0 and r.optimizer_s > 0
        assert r.forward_s + r.backward_s + r.optimizer_s <= r.seconds
    after = group_purity(model, sampler)
    assert after > 0.85 and after > before + 0.2


def test_embed_items_is_the_forward_pass_whatever_the_batch_size() -> None:
    config, sampler, _ = setup()
    model = build_model(config, seed=1)
    ids = np.array([5, 3, 3, 0, 39, 12])
    a = embed_items(model, sampler, ids, batch_size=2)
    b = embed_items(model, sampler, ids, batch_size=100)
    assert a.shape == (6, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], a[2])
    with torch.no_grad():
        direct = model.eval()(sampler.sample(np.array([0, 3, 5]), np.random.default_rng(0)))
    torch.testing.assert_close(a[[3, 1, 0]], direct, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_gives_identical_state(tmp_path: Path) -> None:
    config, _, batcher = setup()
    train_cfg = TrainConfig(epochs=2, lr=1e-2, mode="sync")
    straight = Trainer(build_model(config, seed=0), batcher, config=train_cfg)
    straight.fit(2)

    first = Trainer(build_model(config, seed=0), batcher, config=train_cfg)
    first.fit(1)
    save_checkpoint(tmp_path / "ckpt.pt", first, config)
    resumed = Trainer(build_model(config, seed=99), batcher, config=train_cfg)
    ckpt = restore_checkpoint(tmp_path / "ckpt.pt", resumed)
    assert ckpt.epoch == 1 and ckpt.model_config == config and resumed.step == first.step
    resumed.fit(2)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert straight.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]
    assert repr(load_model(tmp_path / "ckpt.pt")) == repr(build_model(config))
