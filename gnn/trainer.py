"""Training loop on one worker: batches from producer threads (or synchronously), max-margin loss, Adam.

The model, optimizer, loss, batch builder and an ``on_step`` callback are injected so that the distributed issue
can pass a DDP-wrapped model (and its process group through the callback / optimizer) without changing this loop.
``embed_items`` is the reference forward pass that map-reduce inference must reproduce.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from gnn.batches import PairBatcher, TrainBatch
from gnn.loss import CandidateGatherer, MaxMarginLoss, SampledSoftmaxLoss, log_frequency
from gnn.producer import QueueStats, iterate_batches
from gnn.sampler import Sampler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (saved in checkpoints).

    Fields (defaults): ``epochs`` (6); ``batch_size`` pairs per step (1024); ``lr`` Adam learning rate (3e-3);
    ``weight_decay`` (0.0); ``n_negatives`` shared uniform negatives per batch
    (4096: with the softmax loss more candidates rank better over all items); ``margin`` (0.1);
    ``hard_per_epoch`` / ``hard_cap`` curriculum of hard negatives (1 / 0: none; with the softmax loss every
    distinct item of the batch is already a negative, and the Amazon sample trained best without them); ``seed`` (0);
    ``mode`` "producer" | "sync" ("producer"); ``producer_threads`` (1); ``queue_size`` (4);
    ``num_threads`` torch intra-op threads, set explicitly (1); ``log_every`` steps between log lines (50);
    ``device`` where the model computes, "cpu" or "cuda[:i]" ("cpu"; batches are built on the CPU and moved);
    ``loss`` "max_margin" | "softmax" ("softmax"): the hinge loss or the sampled softmax over the batch's
    distinct items (:class:`gnn.loss.SampledSoftmaxLoss`); ``temperature`` τ of the softmax (0.1);
    ``logq_alpha`` strength of its popularity (logQ) correction, 0 = none (0.0);
    ``lr_schedule`` "constant" | "cosine" ("constant"): with "cosine" the learning rate of step s (0-based) of
    ``epochs · n_batches`` steps is ``lr · (f + (1 − f) · (1 + cos(π s / total)) / 2)``, f = ``lr_final`` (0.05),
    see :func:`scheduled_lr`; ``warmup_steps`` linear warm-up over the first steps (0: none): the learning rate of
    step s < ``warmup_steps`` is the schedule's times ``w + (1 − w) · s / warmup_steps``, w = ``warmup_start``
    (0.0; the data-parallel stage passes 1 / its lr scale, so that the ramp starts at the unscaled rate,
    Goyal et al. 2017); ``adam_betas`` ((0.9, 0.999)) and ``adam_eps`` (1e-8) of Adam.
    """

    epochs: int = 6
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    n_negatives: int = 4096
    margin: float = 0.1
    hard_per_epoch: int = 1
    hard_cap: int = 0
    seed: int = 0
    mode: Literal["producer", "sync"] = "producer"
    producer_threads: int = 1
    queue_size: int = 4
    num_threads: int = 1
    log_every: int = 50
    device: str = "cpu"
    loss: Literal["max_margin", "softmax"] = "softmax"
    temperature: float = 0.1
    logq_alpha: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_final: float = 0.05
    warmup_steps: int = 0
    warmup_start: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "n_negatives", "producer_threads", "queue_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)}: must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr}: must be positive (try 3e-3 with Adam)")
        if self.mode not in ("producer", "sync"):
            raise ValueError(f"TrainConfig.mode={self.mode!r}: use 'producer' or 'sync'")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"TrainConfig.device={self.device!r}: use 'cpu' or 'cuda[:index]' ({exc})") from None
        if self.loss not in ("max_margin", "softmax"):
            raise ValueError(f"TrainConfig.loss={self.loss!r}: use 'max_margin' or 'softmax'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.lr_schedule={self.lr_schedule!r}: use 'constant' or 'cosine'")
        if not 0.0 <= self.lr_final <= 1.0:
            raise ValueError(f"TrainConfig.lr_final={self.lr_final}: a fraction of lr in [0, 1] (try 0.05)")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps}: must be >= 0 (0 = no warm-up)")
        if not 0.0 <= self.warmup_start <= 1.0:
            raise ValueError(f"TrainConfig.warmup_start={self.warmup_start}: a fraction of lr in [0, 1] (try 0.5)")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"TrainConfig.adam_betas={self.adam_betas}: two values in [0, 1) (try (0.9, 0.999))")
        if self.adam_eps <= 0:
            raise ValueError(f"TrainConfig.adam_eps={self.adam_eps}: must be > 0 (try 1e-8)")
        if self.temperature <= 0:
            raise ValueError(f"TrainConfig.temperature={self.temperature}: must be > 0 (try 0.1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepInfo:
    """What ``on_step`` receives after every optimizer step."""

    epoch: int
    step: int
    batch: int
    loss: float
    n_pairs: int


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    steps: int
    pairs: int
    mean_loss: float
    seconds: float
    pairs_per_s: float
    consumer_wait_s: float
    build_s: float
    # the trainer thread's time in each part of its steps (forward with the loss, backward with DDP's gradient
    # all-reduce, optimizer step): where a distributed step spends what a 1-worker step does not. On a GPU these are
    # host-side times (kernels run asynchronously; the step's end waits for them at the loss read-out)
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # fused=True: one kernel per step instead of ~8 per tensor; the hashed-id table makes Adam a visible cost.
    # (the CPU fused kernel exists from torch 2.4 on; pyproject allows 2.3)
    fused = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                            weight_decay=config.weight_decay, fused=fused)


def scheduled_lr(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of 0-based optimizer ``step`` out of ``total_steps`` under ``config.lr_schedule``:
    ``config.lr`` throughout for "constant"; for "cosine" a half cosine from ``lr`` at step 0 down to
    ``lr · lr_final`` at the last step (and after it), so the last epochs take small, precise steps. During the
    first ``config.warmup_steps`` steps that rate is scaled by a linear ramp from ``config.warmup_start`` to 1."""
    lr = config.lr
    if config.lr_schedule == "cosine" and total_steps > 1:
        frac = min(max(step, 0) / (total_steps - 1), 1.0)
        lr *= config.lr_final + (1.0 - config.lr_final) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if step < config.warmup_steps:
        lr *= config.warmup_start + (1.0 - config.warmup_start) * max(step, 0) / config.warmup_steps
    return lr


def query_side(model: nn.Module, item_embeddings: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Query vectors from item embeddings: the model's query head when it has one (``ModelConfig.query_head``),
    else the embeddings themselves. ``ids`` (N,): the rows' item ids, needed when the head has per-item offsets
    (``ModelConfig.query_id_buckets``). Works on a DDP-wrapped model. Shapes: ``(N, D) -> (N, D)``."""
    inner = getattr(model, "module", model)
    head = getattr(inner, "queries", None)
    return item_embeddings if head is None else head(item_embeddings, ids)


def compute_loss(model: nn.Module, loss_fn: MaxMarginLoss | SampledSoftmaxLoss, batch: TrainBatch) -> torch.Tensor:
    """Forward pass over the batch's distinct items, then the loss of its pairs (hinge or sampled softmax)."""
    emb = model(batch.subgraph)  # (N_0, D): every distinct item of the batch once
    query = query_side(model, emb[batch.query], batch.subgraph.node_ids[0][batch.query])  # (B, D)
    if isinstance(loss_fn, SampledSoftmaxLoss):
        return loss_fn(query, emb, batch.query, batch.positive, batch.weight, batch.subgraph.node_ids[0])
    hard = emb[batch.hard] if batch.hard.shape[1] else None  # (B, H, D)
    return loss_fn(query, emb[batch.positive], emb[batch.negatives], batch.weight, hard, batch.hard_mask)


def make_loss(config: TrainConfig, batches: PairBatcher, *,
              gather: CandidateGatherer | None = None) -> MaxMarginLoss | SampledSoftmaxLoss:
    """The loss ``config`` names; the softmax's logQ table counts the positives of the batcher's pairs.
    ``gather``: the softmax's cross-rank candidates (:class:`gnn.comm.gather.CandidateGather`; softmax only)."""
    if config.loss == "max_margin":
        if gather is not None:
            raise ValueError("gather: cross-rank candidates are the softmax's; use TrainConfig.loss='softmax'")
        return MaxMarginLoss(config.margin)
    log_q = log_frequency(batches.pairs.positive, batches.n_items) if config.logq_alpha else None
    return SampledSoftmaxLoss(config.temperature, log_q=log_q, logq_alpha=config.logq_alpha, gather=gather)


class Trainer:
    """Epoch loop (see the module docstring).

    Args:
        model: maps a ``Subgraph`` to target embeddings (possibly DDP-wrapped).
        batches: builds ``TrainBatch`` i of an epoch (``PairBatcher``).
        optimizer: default Adam with ``config.lr``.
        loss: default :func:`make_loss` of ``config`` (the sampled softmax; ``MaxMarginLoss(config.margin)``
            when ``config.loss`` is "max_margin").
        config: ``TrainConfig``.
        on_step: called with a ``StepInfo`` after each step (progress, gradient-sync statistics, ...).
    """

    def __init__(self, model: nn.Module, batches: PairBatcher, *, config: TrainConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 loss: MaxMarginLoss | SampledSoftmaxLoss | None = None,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
        self.config = TrainConfig() if config is None else config
        self.model, self.batches = model, batches
        self.optimizer = make_optimizer(model, self.config) if optimizer is None else optimizer
        self.loss = make_loss(self.config, batches) if loss is None else loss
        self.on_step = on_step
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.reports: list[EpochReport] = []

    def train_epoch(self) -> EpochReport:
        cfg = self.config
        torch.set_num_threads(cfg.num_threads)
        self.model.train()
        stats = QueueStats()
        losses: list[float] = []
        pairs = 0
        phases = np.zeros(3)  # forward, backward, optimizer seconds
        start = time.perf_counter()
        stream = iterate_batches(self.batches, epoch=self.epoch, n_batches=self.batches.n_batches, mode=cfg.mode,
                                 n_threads=cfg.producer_threads, queue_size=cfg.queue_size, stats=stats)
        device = torch.device(cfg.device)
        total_steps = cfg.epochs * self.batches.n_batches
        with closing(stream):
            for batch in stream:
                batch = batch.to(device)
                in_warmup = cfg.warmup_steps > 0 and self.step <= cfg.warmup_steps
                if cfg.lr_schedule != "constant" or in_warmup:  # the ramp's last set (step == warmup_steps) is lr
                    for group in self.optimizer.param_groups:
                        group["lr"] = scheduled_lr(cfg, self.step, total_steps)
                self.optimizer.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = compute_loss(self.model, self.loss, batch)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                self.optimizer.step()
                t3 = time.perf_counter()
                phases += np.array([t1 - t0, t2 - t1, t3 - t2])
                self.step += 1
                value = float(loss.detach())
                losses.append(value)
                pairs += batch.n_pairs
                if self.on_step is not None:
                    self.on_step(StepInfo(self.epoch, self.step, batch.index, value, batch.n_pairs))
                if cfg.log_every and self.step % cfg.log_every == 0:
                    logger.info("epoch %d step %d loss %.4f", self.epoch, self.step, value)
        seconds = time.perf_counter() - start
        report = EpochReport(epoch=self.epoch, steps=len(losses), pairs=pairs,
                             mean_loss=float(np.mean(losses)) if losses else float("nan"), seconds=seconds,
                             pairs_per_s=pairs / seconds if seconds > 0 else float("nan"),
                             consumer_wait_s=stats.consumer_wait_s, build_s=stats.build_s,
                             forward_s=float(phases[0]), backward_s=float(phases[1]), optimizer_s=float(phases[2]))
        logger.info("epoch %d: loss %.4f, %.0f pairs/s (waited %.1f s for batches)", report.epoch,
                    report.mean_loss, report.pairs_per_s, report.consumer_wait_s)
        self.epoch += 1
        self.reports.append(report)
        return report

    def fit(self, epochs: int | None = None) -> list[EpochReport]:
        """Train until ``epochs`` epochs are completed in total (default ``config.epochs``)."""
        target = self.config.epochs if epochs is None else epochs
        return [self.train_epoch() for _ in range(max(target - self.epoch, 0))]


@torch.no_grad()
def embed_items(model: nn.Module, sampler: Sampler, item_ids: np.ndarray, *, batch_size: int = 1024,
                seed: int = 0) -> torch.Tensor:
    """Embeddings of ``item_ids`` (N,) -> (N, D) in eval mode, ``batch_size`` distinct items per forward pass.

    Batch b's sampler draws come from ``default_rng([seed, b])`` (PinSage neighbourhoods draw nothing). Computed on
    the model's device; returned there.
    """
    ids = np.asarray(item_ids, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters())).device
        uniq, inverse = np.unique(ids, return_inverse=True)
        chunks = [model(sampler.sample(uniq[i:i + batch_size], np.random.default_rng([seed, b])).to(device))
                  for b, i in enumerate(range(0, uniq.shape[0], batch_size))]
        out = torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)
        return out[torch.from_numpy(inverse.ravel()).to(device)]
    finally:
        model.train(was_training)
