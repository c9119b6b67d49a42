"""Shared pieces of the quality benchmark: graph store, walk neighbourhoods, pairs and a trained model from
training histories, and a scorer over (query-side, item) embeddings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gnn.baselines import EmbeddingScorer, Histories
from gnn.batches import PairBatcher, TrainingPairs
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, csr_from_edges
from gnn.models import ModelConfig, build_model, build_sampler
from gnn.trainer import TrainConfig, Trainer, embed_items, query_side
from gnn.walks import Neighborhoods, WalkConfig, compute_neighborhoods

log = logging.getLogger(__name__)


def store_from_histories(train: Histories, *, category: np.ndarray | None = None, n_categories: int = 1,
                         content: np.ndarray | None = None) -> GraphStore:
    """Graph store of the training histories (edge time = position in the user's sequence), with dense
    ``content`` rows (n_items, D) when given."""
    n_users, n_items = train.n_users, train.n_items
    users = np.repeat(np.arange(n_users), train.lengths())
    pos = np.arange(users.shape[0]) - train.indptr[users]
    w = np.ones(users.shape[0], np.float32)
    counts = np.zeros((n_items, 4), np.int64)
    np.add.at(counts[:, 0], train.items, 1)
    cat = np.zeros(n_items, np.int64) if category is None else np.asarray(category, np.int64)
    return GraphStore(n_users=n_users, n_items=n_items, n_categories=n_categories,
                      user_items=csr_from_edges(users, train.items, w, pos, n_users),
                      item_users=csr_from_edges(train.items, users, w, pos, n_items),
                      item_category=cat, item_counts=counts, item_content=content)


def consecutive_pairs(train: Histories, *, both_directions: bool) -> TrainingPairs:
    """(previous item, next item) of every user's consecutive training rows (self-pairs dropped); with
    ``both_directions`` also (next, previous)."""
    users = np.repeat(np.arange(train.n_users), train.lengths())
    ok = (users[:-1] == users[1:]) & (train.items[:-1] != train.items[1:])
    q, p = train.items[:-1][ok], train.items[1:][ok]
    if both_directions:
        q, p = np.concatenate([q, p]), np.concatenate([p, q])
    return TrainingPairs.from_arrays(q, p)



@dataclass
class Trained:
    model: torch.nn.Module
    scorer: EmbeddingScorer
    epochs: list[dict[str, Any]]
    seconds: float
    budget_hit: bool = False  # the time budget, not ``epochs``, ended training: not comparable to a full run


def train_gnn(train: Histories, model_cfg: ModelConfig, train_cfg: TrainConfig, *, walk_cfg: WalkConfig,
              both_directions: bool = False, time_budget_s: float = 540.0, store: GraphStore | None = None,
              evaluate: Any = None, name: str = "pinsage") -> Trained:
    """Walks, pairs and ``train_cfg.epochs`` epochs (stopping early once ``time_budget_s`` is spent, which is
    logged as a warning and returned as ``budget_hit``: a table must not compare a model cut short with full
    runs unawares); ``evaluate(scorer) -> dict`` runs after each epoch when given."""
    started = time.perf_counter()
    store = store_from_histories(train) if store is None else store
    nb: Neighborhoods = compute_neighborhoods(store, walk_cfg)
    pairs = consecutive_pairs(train, both_directions=both_directions)
    sampler = build_sampler(model_cfg, rows=ItemFeatureTable.from_graph_store(store), neighborhoods=nb,
                            store=store)
    batcher = PairBatcher(pairs, sampler, n_items=store.n_items, batch_size=train_cfg.batch_size,
                          n_negatives=train_cfg.n_negatives, hard_negatives=nb.hard_negatives,
                          hard_per_epoch=train_cfg.hard_per_epoch, hard_cap=train_cfg.hard_cap, seed=train_cfg.seed)
    model = build_model(model_cfg, seed=train_cfg.seed)
    trainer = Trainer(model, batcher, config=train_cfg)
    epochs: list[dict[str, Any]] = []
    scorer = None

    def make_scorer() -> EmbeddingScorer:
        emb = embed_items(model, sampler, np.arange(store.n_items), batch_size=2048)
        with torch.no_grad():
            q = query_side(model, emb, torch.arange(store.n_items))
        return EmbeddingScorer(emb.numpy(), query_embeddings=q.numpy(), name=name)

    for _ in range(train_cfg.epochs):
        rep = trainer.train_epoch()
        row: dict[str, Any] = {"epoch": rep.epoch, "loss": round(rep.mean_loss, 5), "seconds": round(rep.seconds, 1)}
        if evaluate is not None:
            scorer = make_scorer()
            row.update(evaluate(scorer))
        epochs.append(row)
        print(name, row, flush=True)
        if len(epochs) < train_cfg.epochs and time.perf_counter() - started > time_budget_s:
            log.warning("%s: the time budget of %.0f s is spent after %d of %d epochs; stopping early "
                        "(raise --budget-s for a full run)", name, time_budget_s, len(epochs), train_cfg.epochs)
            break
    scorer = make_scorer() if scorer is None else scorer
    return Trained(model, scorer, epochs, time.perf_counter() - started,
                   budget_hit=len(epochs) < train_cfg.epochs)
