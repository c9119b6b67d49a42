"""Training minibatches from (query, positive, weight) pairs: a pure function of (seed, epoch, batch index).

:class:`PairBatcher` shuffles the pairs per epoch, draws shared uniform negatives and the curriculum's hard
negatives, and asks the injected sampler for the computation graph of all distinct items of the batch. Because
every random draw comes from ``np.random.default_rng([seed, epoch, index])``, batch i of epoch e is the same
whichever thread builds it and in whatever order (what makes producer-consumer equal to synchronous mode).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import torch

from gnn.loss import hard_negatives_for_epoch
from gnn.sampler import Sampler, Subgraph


@dataclass(frozen=True)
class TrainingPairs:
    """Training pairs (the shape ``gnn.pairs`` produces). Shapes: ``query, positive (P,) int64; weight (P,)``."""

    query: np.ndarray
    positive: np.ndarray
    weight: np.ndarray

    @classmethod
    def from_arrays(cls, query: np.ndarray, positive: np.ndarray, weight: np.ndarray | None = None) -> TrainingPairs:
        q = np.asarray(query, dtype=np.int64)
        p = np.asarray(positive, dtype=np.int64)
        w = np.ones(q.shape[0], np.float32) if weight is None else np.asarray(weight, dtype=np.float32)
        if q.ndim != 1 or q.shape != p.shape or q.shape != w.shape:
            raise ValueError(f"pairs: query {q.shape}, positive {p.shape}, weight {w.shape} must be equal 1-d shapes")
        return cls(q, p, w)

    def __len__(self) -> int:
        return int(self.query.shape[0])


@dataclass(frozen=True)
class TrainBatch:
    """A batch ready for a training step. Positions index ``subgraph.node_ids[0]`` (the distinct items).

    Shapes: ``query, positive (B,) int64``; ``weight (B,) float32``; ``negatives (N,) int64``;
    ``hard (B, H) int64`` and ``hard_mask (B, H) bool`` (H may be 0).
    """

    epoch: int
    index: int
    subgraph: Subgraph
    query: torch.Tensor
    positive: torch.Tensor
    weight: torch.Tensor
    negatives: torch.Tensor
    hard: torch.Tensor
    hard_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return int(self.query.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with every tensor on ``device`` (the trainer calls this for a CUDA model)."""
        if torch.device(device) == self.query.device:
            return self
        return dataclasses.replace(
            self, subgraph=self.subgraph.to(device),
            **{name: getattr(self, name).to(device, non_blocking=True)
               for name in ("query", "positive", "weight", "negatives", "hard", "hard_mask")})


def pick_hard_negatives(candidates: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct random entries of each row of ``candidates`` (B, H), -1 entries last.

    Returns ``(ids (B, count) int64, mask (B, count) bool)``; the mask is False where a row had too few.
    """
    b = candidates.shape[0]
    if count == 0 or candidates.shape[1] == 0:
        return np.zeros((b, 0), np.int64), np.zeros((b, 0), bool)
    keys = rng.random(candidates.shape) + (candidates < 0)  # valid entries sort before padding
    order = np.argsort(keys, axis=1)[:, :count]
    ids = np.take_along_axis(candidates, order, axis=1)
    return ids, ids >= 0


class PairBatcher:
    """Builds batch ``index`` of ``epoch`` from training pairs (see the module docstring).

    Args:
        pairs: the training pairs.
        sampler: computation-graph sampler (``gnn.sampler.PinSageSampler`` / ``GraphSageSampler``).
        n_items: negatives are drawn from ``[0, n_items)``.
        batch_size: pairs per batch (default 512).
        n_negatives: shared negatives per batch (default 256).
        hard_negatives: (n_items, H) candidates, -1 padded (``Neighborhoods.hard_negatives``), or None.
        hard_per_epoch, hard_cap: curriculum (defaults 1 and 6), see ``gnn.loss.hard_negatives_for_epoch``.
        seed: base seed (default 0).
        negative_pool: (M,) item ids the shared negatives are drawn from, uniformly (default None: all of
            ``[0, n_items)``). The distributed trainer passes its shard's items ("local" negatives, as
            PyTorch-BigGraph draws negatives from the partition in memory), so negatives cost no remote rows.
    """

    def __init__(self, pairs: TrainingPairs, sampler: Sampler, *, n_items: int, batch_size: int = 512,
                 n_negatives: int = 256, hard_negatives: np.ndarray | None = None, hard_per_epoch: int = 1,
                 hard_cap: int = 6, seed: int = 0, negative_pool: np.ndarray | None = None) -> None:
        if batch_size < 1 or n_negatives < 1 or len(pairs) == 0:
            raise ValueError(f"batch_size={batch_size}, n_negatives={n_negatives}, {len(pairs)} pairs: all must be "
                             "positive")
        self.pairs, self.sampler, self.n_items = pairs, sampler, int(n_items)
        self.batch_size, self.n_negatives = int(batch_size), int(n_negatives)
        self.hard_negatives = None if hard_negatives is None else np.asarray(hard_negatives, dtype=np.int64)
        self.hard_per_epoch, self.hard_cap, self.seed = hard_per_epoch, hard_cap, int(seed)
        self.negative_pool = None if negative_pool is None else np.asarray(negative_pool, dtype=np.int64)
        if self.negative_pool is not None and self.negative_pool.size == 0:
            raise ValueError("negative_pool is empty: pass at least one item id, or None for all items")
        self._lock = threading.Lock()
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def max_candidates(self) -> int:
        """A bound on a batch's distinct items (queries, positives, shared and hard negatives), the same on every
        rank: the row count that ``gnn.comm.gather.CandidateGather(max_rows=...)`` pads to."""
        hard = 0 if self.hard_negatives is None else min(self.hard_cap, self.hard_negatives.shape[1])
        return min(self.n_items, self.batch_size * (2 + hard) + self.n_negatives)

    @property
    def n_batches(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the pairs in ``epoch`` (computed once, shared by the producer threads)."""
        with self._lock:
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)))
            return self._order[1]

    def __call__(self, epoch: int, index: int) -> TrainBatch:
        if not 0 <= index < self.n_batches:
            raise ValueError(f"index={index}: batches of an epoch are 0..{self.n_batches - 1}")
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        take = self.epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        query, positive = self.pairs.query[take], self.pairs.positive[take]
        negatives = rng.integers(0, self.n_items, self.n_negatives) if self.negative_pool is None \
            else self.negative_pool[rng.integers(0, self.negative_pool.shape[0], self.n_negatives)]
        n_hard = 0 if self.hard_negatives is None else hard_negatives_for_epoch(
            epoch, per_epoch=self.hard_per_epoch, cap=self.hard_cap)
        if self.hard_negatives is not None and n_hard > 0:
            hard, hard_mask = pick_hard_negatives(self.hard_negatives[query], n_hard, rng)
        else:
            hard, hard_mask = np.zeros((query.shape[0], 0), np.int64), np.zeros((query.shape[0], 0), bool)
        items, inverse = np.unique(np.concatenate([query, positive, negatives, np.maximum(hard, 0).ravel()]),
                                   return_inverse=True)
        b, n = query.shape[0], negatives.shape[0]
        subgraph = self.sampler.sample(items, rng)

        def pos(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

        return TrainBatch(
            epoch=epoch, index=index, subgraph=subgraph,
            query=pos(inverse[:b]), positive=pos(inverse[b:2 * b]), weight=torch.from_numpy(self.pairs.weight[take]),
            negatives=pos(inverse[2 * b:2 * b + n]), hard=pos(inverse[2 * b + n:].reshape(hard.shape)),
            hard_mask=torch.from_numpy(hard_mask),
        )

    def __repr__(self) -> str:
        return (f"PairBatcher(pairs={len(self.pairs)}, batch_size={self.batch_size}, n_negatives={self.n_negatives}, "
                f"hard={'yes' if self.hard_negatives is not None else 'no'}, seed={self.seed})")
