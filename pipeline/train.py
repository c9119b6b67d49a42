"""Stage ``train``: data-parallel PinSage / GraphSAGE, one long-running rank per Dask worker owning shard ``rank``.

Each rank (pipeline/launch.py) joins a gloo process group, wraps the model in DDP with the gradient communication
of ``gnn.comm`` (plain all-reduce, fp16/bf16/PowerSGD, DGC, local or hierarchical averaging) and trains on the
pairs whose query item its shard owns. Rows of items it does not own (input features, neighbour ids and weights)
come from their owners' ``ShardServer`` actors (pipeline/rowserver.py) through the remote-row cache (cache/), inside
the producer threads, one call per owner per hop of a minibatch (pipeline/remote_rows.py). Progress lines (loss,
pairs/s, cache hit rate, bytes) reach the client as Dask events while the ranks run; everything runs inside
``distributed.span("train")``. With ``workers = 1`` it is the single-worker trainer (every row local). N ranks of
``batch_size`` pairs take N times fewer optimizer steps per epoch; ``lr_scaling`` raises the learning rate for
that (sqrt, linear, or adam-sqrt, which also scales Adam's betas), from ``lr`` over ``lr_warmup_steps`` steps.

    pinsage train --run-dir runs/x --workers 2 --cache importance --cache-fraction 0.1 --compression dgc

Output ``<run>/train/``: ``checkpoint.pt`` (weights, optimizer state, frozen configs incl. compression/sync),
``embeddings.npy`` (n_items, D) float32, ``report.json`` (per-epoch loss and pairs/s, cache and transport stats per
worker and in total, gradient bytes, partition); with ``--epoch-embeddings`` also ``epochs/<n>/embeddings.npy`` (and
``query_embeddings.npy``) after each epoch n = 1, 2, ... of the one run, for quality against epochs. A killed run
resumes from the last finished epoch (``<run>/.train-resume/<key>/``); re-running with the same inputs and
settings does nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import operator
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.common import add_arguments, add_common_arguments, cluster_config, from_sources, settings
from pipeline.config import check, to_dict
from pipeline.rundir import StageOutput, read_stage, run_stage, stage_key, write_json_atomic
from pipeline.schema import EMBEDDINGS_NPY, QUERY_EMBEDDINGS_NPY

log = logging.getLogger(__name__)

STAGE = "train"
PROGRESS_TOPIC = "pinsage-train-progress"
RESUME_DIR = ".train-resume"
EPOCHS_DIR = "epochs"  # per-epoch embeddings (epoch_embeddings)
LR_SCALING = ("none", "sqrt", "linear", "adam-sqrt")  # TrainStageConfig.lr_scaling
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch's defaults, what "adam-sqrt" scales
MAX_AUTO_ID_BUCKETS = 65536  # id_buckets=0: the id table of a larger catalogue stays this size (hashed)


def id_buckets_for(n_items: int, id_buckets: int = 0) -> int:
    """Rows of the item-id table: ``id_buckets``, or with 0 one per item up to :data:`MAX_AUTO_ID_BUCKETS`.

    The id hash (gnn.features.hash_ids) multiplies by a prime, so with ``n_items`` buckets it is a permutation of
    the item ids: no two items share a row. The table's gradient is all-reduced every step, so a table sized to
    the catalogue (instead of a fixed 65536 rows mostly never touched) also cuts that traffic."""
    return id_buckets or max(1, min(n_items, MAX_AUTO_ID_BUCKETS))


@dataclass(frozen=True)
class TrainStageConfig:
    """Settings of the ``train`` stage (section ``[train]``); see the flags' help for each."""

    workers: int = field(default=1, metadata={"help": "ranks, one per Dask worker, each owning one shard"})
    model: Literal["pinsage", "graphsage"] = field(default="pinsage", metadata={"help": "pinsage or graphsage"})
    epochs: int = field(default=2, metadata={"help": "epochs over the training pairs"})
    steps_per_epoch: int = field(default=0, metadata={"help": "cap on steps per epoch (0 = all pairs)"})
    batch_size: int = field(default=512, metadata={"help": "pairs per step per rank"})
    n_negatives: int = field(default=256, metadata={"help": "shared negatives per batch"})
    loss: Literal["softmax", "max_margin"] = field(
        default="softmax", metadata={"help": "sampled softmax over the batch's distinct items, or max-margin"})
    temperature: float = field(default=0.1, metadata={"help": "softmax temperature"})
    hard_cap: int = field(default=0, metadata={"help": "hard negatives per query at most (curriculum +1 per "
                                                       "epoch; 0 = none, best with the softmax loss)"})
    lr: float = field(default=3e-3, metadata={"help": "learning rate (Adam; SGD with --optimizer sgd or dgc)"})
    lr_scaling: Literal["none", "sqrt", "linear", "adam-sqrt"] = field(
        default="none", metadata={"help": "data-parallel learning rate for the workers-times larger global batch: "
                                          "lr x workers^0.5 (sqrt) or x workers (linear); adam-sqrt: sqrt, and "
                                          "Adam's 1-beta1, 1-beta2 x workers, eps / workers^0.5 (the square-root "
                                          "rule of Malladi et al. 2022); 1 worker: unchanged"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "with --lr-scaling: steps over which the lr rises "
                                                              "linearly from --lr to the scaled lr (gradual "
                                                              "warm-up, Goyal et al. 2017; 0 = none)"})
    lr_schedule: Literal["constant", "cosine"] = field(
        default="constant", metadata={"help": "constant, or cosine decay over the run's steps from the (scaled) lr "
                                              "to lr x --lr-final (a warm-up ramp multiplies the first steps)"})
    lr_final: float = field(default=0.05, metadata={"help": "with --lr-schedule cosine: the last step's lr as a "
                                                            "fraction of the lr"})
    optimizer: Literal["auto", "adam", "sgd"] = field(
        default="auto", metadata={"help": "auto: Adam, or plain SGD under DGC (its hook applies the momentum); "
                                          "adam with DGC: error-feedback top-k, the hook's momentum is 0"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (DGC with SGD: the hook's momentum; "
                                                           "unused with Adam)"})
    hidden_dim: int = field(default=128, metadata={"help": "width of the convolutions"})
    embed_dim: int = field(default=64, metadata={"help": "embedding width"})
    n_neighbors: int = field(default=10, metadata={"help": "PinSage neighbours per item (T)"})
    sage_neighbors: Literal["two_step", "distinct"] = field(
        default="two_step", metadata={"help": "GraphSAGE's draw of co-interaction neighbours: two_step (item -> "
                                              "user -> item, never builds the item-item graph) or distinct "
                                              "(uniform over the distinct items that share a user; builds it)"})
    id_buckets: int = field(default=0, metadata={"help": "rows of the hashed item-id embedding; 0 = one row per item "
                                                         f"(no collisions) up to {MAX_AUTO_ID_BUCKETS}, hashed "
                                                         "into that many beyond"})
    item_ids: bool = field(default=True, metadata={"help": "learn an embedding row per item (false: an item is known "
                                                           "by its features and walk neighbourhood only, as in the "
                                                           "PinSage paper)"})
    cache: Literal["importance", "lru", "random", "none"] = field(
        default="importance", metadata={"help": "remote-row cache policy"})
    cache_fraction: float = field(default=0.1, metadata={"help": "cache capacity, share of the remote vertices"})
    cache_bytes: int | None = field(default=None, metadata={"help": "cache capacity in bytes (overrides fraction)"})
    importance: Literal["presample", "visits"] = field(
        default="presample", metadata={"help": "importance cache ranking: presample (the shard's own sampler over "
                                               "some batches, counted) or visits (global walk visit counts)"})
    negatives: Literal["global", "local"] = field(
        default="local", metadata={"help": "shared negatives drawn from all items, or from the rank's own shard "
                                           "(no remote rows for them; with 1 worker both are all items)"})
    gather_candidates: bool = field(default=False, metadata={
        "help": "score each rank's queries against the items of every rank's batch (all-gathered each step, with "
                "gradients), as one worker would: keeps METIS shards from limiting the softmax's in-batch "
                "candidates to one community (softmax loss only; no effect with 1 worker)"})
    presample_batches: int = field(default=16, metadata={"help": "batches of the importance pre-sampling pass"})
    compression: Literal["none", "fp16", "bf16", "powersgd", "dgc"] = field(
        default="none", metadata={"help": "gradient compression"})
    sync: str = field(default="allreduce", metadata={"help": "allreduce | local:H | hierarchical:G@P,...,all@P "
                                                           "(first level may be G@grad)"})
    sync_warmup_steps: int = field(default=0, metadata={"help": "global all-reduce steps before local averaging"})
    sync_weighting: Literal["uniform", "touched"] = field(
        default="uniform", metadata={"help": "averaging rounds: plain mean, or each matrix row (an item's embedding) "
                                             "over the ranks that trained it since the last round"})
    sync_optimizer_state: bool = field(
        default=False, metadata={"help": "averaging rounds also average the optimizer state (Adam's moments)"})
    sync_lr_scale: float = field(
        default=1.0, metadata={"help": "factor on the lr of the local steps between averaging rounds (after the "
                                       "warm-up)"})
    sync_outer_momentum: float = field(
        default=0.0, metadata={"help": "slow momentum of the global averaging rounds (SlowMo; 0: plain averaging)"})
    dgc_sparsity: float = field(default=0.999, metadata={"help": "DGC final sparsity"})
    dgc_warmup: str = field(default="0.75,0.9375,0.984375,0.996",
                            metadata={"help": "DGC warm-up sparsities, one per stage (empty: none)"})
    dgc_warmup_unit: Literal["epoch", "step"] = field(default="epoch", metadata={"help": "DGC warm-up stage unit"})
    dgc_warmup_stage_length: int = field(default=1, metadata={"help": "epochs or steps per DGC warm-up stage"})
    dgc_correction: Literal["momentum", "adam"] = field(
        default="momentum", metadata={"help": "DGC accumulates the SGD velocity (momentum; with Adam: the raw "
                                              "gradient, error feedback) or, with adam (needs --optimizer adam), "
                                              "each rank's own Adam step, applied by plain SGD"})
    dgc_dense: str = field(default="", metadata={"help": "DGC: comma-separated parameter names or fnmatch patterns "
                                                          "all-reduced densely, not compressed"})
    dgc_rows: str = field(default="", metadata={"help": "DGC: comma-separated 2-D parameter names or patterns "
                                                         "selected by whole rows (embedding tables, e.g. "
                                                         "input.item_id.weight)"})
    dgc_average: Literal["world", "senders"] = field(
        default="world", metadata={"help": "DGC: divide an entry's sum by every rank (world) or by the ranks that "
                                           "sent it (senders)"})
    dgc_adam_masking: bool = field(default=False, metadata={"help": "DGC with --dgc-correction adam: zero Adam's "
                                                                    "first moment of the entries just sent"})
    dgc_select: Literal["value", "gradient"] = field(
        default="value", metadata={"help": "DGC with --dgc-correction adam: rank entries by the accumulated steps "
                                           "(value) or by them times Adam's gradient scale (gradient)"})
    dgc_owner_scale: str = field(
        default="", metadata={"help": "DGC with --dgc-correction adam: comma-separated 2-D parameter names or patterns "
                                      "(embedding tables, e.g. input.item_id.weight) whose Adam step is scaled per "
                                      "row by N / the ranks whose gradient touched the row"})
    dgc_shared_moment: str = field(
        default="", metadata={"help": "DGC with --dgc-correction adam: comma-separated 2-D parameter names or patterns "
                                      "whose Adam second moment the ranks share (all-reduced squared gradients)"})
    dgc_shared_moment_by: Literal["entries", "rows", "rows-log8"] = field(
        default="rows", metadata={"help": "DGC: share the second moment per entry, per row, or per row touched "
                                          "in one byte (rows-log8)"})
    dgc_shared_moment_estimate: Literal["mean", "owners"] = field(
        default="mean", metadata={"help": "DGC with rows-log8: v follows the ranks' mean square, or that times the "
                                          "share of ranks that touched the row (owners)"})
    dgc_flush: bool = field(default=False, metadata={"help": "DGC: at the end of training, average the ranks' "
                                                              "residuals and apply them as one more update"})
    dgc_local: str = field(default="", metadata={"help": "DGC: comma-separated parameter names or patterns that send "
                                                          "no gradient; each rank steps them and the ranks merge the "
                                                          "rows they changed every --dgc-local-period steps"})
    dgc_local_period: int = field(default=100, metadata={"help": "DGC: steps between merges of the --dgc-local "
                                                                 "tensors"})
    dgc_local_merge: Literal["sum", "mean", "touches"] = field(
        default="sum", metadata={"help": "DGC: a merged row gets every rank's change (sum), their mean (mean) or "
                                         "their mean weighted by the steps each rank touched it (touches)"})
    partition: Literal["metis", "random"] = field(default="metis", metadata={"help": "shard partitioner"})
    window_s: int = field(default=1800, metadata={"help": "training pairs: largest gap between query and positive"})
    producer_threads: int = field(default=2, metadata={"help": "batch-building threads per rank"})
    cpus_per_rank: int = field(default=0, metadata={"help": "pin each rank's worker to this many cores of its host, "
                                                            "disjoint from the other ranks there, and use as many "
                                                            "torch threads (0 = no pinning)"})
    queue_size: int = field(default=4, metadata={"help": "batches built ahead per rank"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, batches and random cache"})
    progress_s: float = field(default=5.0, metadata={"help": "seconds between progress lines (0 = per epoch)"})
    timeout_s: float = field(default=120.0, metadata={"help": "collective timeout of the process group"})
    embed: bool = field(default=True, metadata={"help": "write embeddings.npy of all items after training "
                                                        "(off: benchmarks of the training loop only)"})
    record_weights: bool = field(default=False, metadata={"help": "digest of the weights after every step"})
    epoch_embeddings: bool = field(default=False, metadata={
        "help": "also write every item's embedding after each epoch to train/epochs/<n>/ (quality per epoch "
                "from one run; the epoch times exclude it, the cache and transport totals include its rows)"})

    def __post_init__(self) -> None:
        for name in ("workers", "epochs", "batch_size", "n_negatives", "hidden_dim", "embed_dim", "n_neighbors",
                     "producer_threads", "queue_size", "presample_batches"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"train.{name}",
                  getattr(self, name), "must be an integer >= 1")
        check(self.sage_neighbors in ("two_step", "distinct"), "train.sage_neighbors", self.sage_neighbors,
              "must be two_step or distinct")
        check(self.temperature > 0, "train.temperature", self.temperature, "must be positive (try 0.1)")
        check(self.hard_cap >= 0, "train.hard_cap", self.hard_cap, "must be >= 0")
        check(self.id_buckets >= 0, "train.id_buckets", self.id_buckets, "must be >= 0 (0 = one row per item)")
        check(self.item_ids or not self.id_buckets, "train.id_buckets", self.id_buckets,
              "sizes the id table that --item-ids false drops: leave it at 0")
        check(self.cpus_per_rank >= 0, "train.cpus_per_rank", self.cpus_per_rank, "must be >= 0 (0 = no pinning)")
        check(self.steps_per_epoch >= 0, "train.steps_per_epoch", self.steps_per_epoch, "must be >= 0 (0 = all)")
        check(self.lr > 0, "train.lr", self.lr, "must be positive (Adam: 3e-3, SGD: about 0.05)")
        check(self.lr_scaling in LR_SCALING, "train.lr_scaling", self.lr_scaling,
              f"must be one of {', '.join(LR_SCALING)}")
        check(isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0, "train.lr_warmup_steps",
              self.lr_warmup_steps, "must be an integer >= 0 (0 = no warm-up)")
        check(self.lr_scaling != "adam-sqrt" or self.optimizer_kind == "adam", "train.lr_scaling",
              self.lr_scaling, "scales Adam's betas: use it with Adam (not --optimizer sgd or --compression dgc)")
        check(self.lr_warmup_steps == 0 or self.lr_scaling != "none", "train.lr_warmup_steps",
              self.lr_warmup_steps, "warms up to the scaled lr: add --lr-scaling sqrt or linear, or set it to 0")
        check(self.lr_schedule in ("constant", "cosine"), "train.lr_schedule", self.lr_schedule,
              "must be constant or cosine")
        check(0.0 <= self.lr_final <= 1.0, "train.lr_final", self.lr_final, "must lie in [0, 1] (try 0.05)")
        check(0 <= self.momentum < 1, "train.momentum", self.momentum, "must lie in [0, 1)")
        check(not self.gather_candidates or self.loss == "softmax", "train.gather_candidates",
              self.gather_candidates, "gathers the softmax's candidates: use it with --loss softmax")
        check(self.window_s >= 1, "train.window_s", self.window_s, "must be a positive number of seconds")
        check(self.progress_s >= 0, "train.progress_s", self.progress_s, "must be >= 0")
        check(self.timeout_s > 0, "train.timeout_s", self.timeout_s, "must be positive")
        check(self.dgc_correction == "momentum" or self.optimizer_kind == "adam", "train.dgc_correction",
              self.dgc_correction, "needs --optimizer adam (it runs Adam inside the DGC hook)")
        check(not self.dgc_flush or self.compression == "dgc", "train.dgc_flush", self.dgc_flush,
              "applies the DGC residuals: add --compression dgc, or drop it")
        for name in ("dgc_dense", "dgc_rows", "dgc_local", "dgc_owner_scale", "dgc_shared_moment"):
            check(not getattr(self, name) or self.compression == "dgc", f"train.{name}", getattr(self, name),
                  "names tensors for the DGC hook: add --compression dgc, or leave it empty")
        try:
            self.cache_config()
            self.comm_config()
        except ValueError as e:
            raise ValueError(f"train: {e}") from None

    def cache_config(self) -> Any:
        from cache import CacheConfig

        return CacheConfig(self.cache, capacity_fraction=self.cache_fraction, capacity_bytes=self.cache_bytes,
                           seed=self.seed)

    def comm_config(self) -> Any:
        from gnn.comm import DGCConfig, parse_comm
        from gnn.comm.config import parse_patterns, parse_sparsities

        # Adam applies the momentum (beta1) itself: the hook is then error-feedback top-k with momentum 0
        hook_momentum = 0.0 if self.optimizer_kind == "adam" else self.momentum
        dgc = DGCConfig(sparsity=self.dgc_sparsity, momentum=hook_momentum, correction=self.dgc_correction,
                        warmup_sparsities=parse_sparsities(self.dgc_warmup), warmup_unit=self.dgc_warmup_unit,
                        warmup_stage_length=self.dgc_warmup_stage_length,
                        dense_tensors=parse_patterns(self.dgc_dense), row_tensors=parse_patterns(self.dgc_rows),
                        local_tensors=parse_patterns(self.dgc_local), local_period=self.dgc_local_period,
                        local_merge=self.dgc_local_merge, flush_at_end=self.dgc_flush,
                        average=self.dgc_average, adam_masking=self.dgc_adam_masking, select=self.dgc_select,
                        owner_tensors=parse_patterns(self.dgc_owner_scale),
                        shared_moment_tensors=parse_patterns(self.dgc_shared_moment),
                        shared_moment_by=self.dgc_shared_moment_by,
                        shared_moment_estimate=self.dgc_shared_moment_estimate)
        return parse_comm(self.compression, self.sync, sync_warmup_steps=self.sync_warmup_steps,
                          sync_weighting=self.sync_weighting, sync_optimizer_state=self.sync_optimizer_state,
                          sync_lr_scale=self.sync_lr_scale, sync_outer_momentum=self.sync_outer_momentum, dgc=dgc)

    def effective_lr(self, world: int | None = None) -> float:
        """The learning rate a run of ``world`` ranks (default ``workers``) trains at after any warm-up:
        ``lr`` times ``world ** 0.5`` (sqrt), ``world`` (linear) or 1 (none)."""
        world = self.workers if world is None else world
        return self.lr * {"none": 1.0, "linear": float(world)}.get(self.lr_scaling, world ** 0.5)

    def adam_betas(self, world: int | None = None) -> tuple[tuple[float, float], float]:
        """Adam's (beta1, beta2) and eps for ``world`` ranks: torch's defaults, or under "adam-sqrt" with
        1 - beta times ``world`` and eps over ``world ** 0.5``, so that the momenta average over as many pairs
        as with one worker."""
        world = self.workers if world is None else world
        if self.lr_scaling != "adam-sqrt" or world == 1:
            return ADAM_BETAS, ADAM_EPS
        b1, b2 = (max(0.0, 1.0 - (1.0 - b) * world) for b in ADAM_BETAS)
        return (b1, b2), ADAM_EPS / world ** 0.5

    def lr_info(self, world: int | None = None) -> dict[str, Any]:
        """The learning-rate settings of a run of ``world`` ranks, for the report and the checkpoint."""
        world = self.workers if world is None else world
        betas, eps = self.adam_betas(world)
        return {"lr": self.lr, "lr_scaling": self.lr_scaling, "world": world,
                "effective_lr": self.effective_lr(world), "warmup_steps": self.lr_warmup_steps,
                "schedule": self.lr_schedule, "lr_final": self.lr_final, "adam_betas": list(betas), "adam_eps": eps}

    @property
    def optimizer_kind(self) -> str:
        if self.optimizer == "auto":
            return "sgd" if self.compression == "dgc" else "adam"
        return self.optimizer


# ------------------------------------------------------------------------------------------------ shard rows


def shard_arrays(graph_path: str, walks_path: str, items: np.ndarray, n_neighbors: int) -> dict[str, np.ndarray]:
    """The rows of ``items`` (sorted int64): features (n, F) float32, top-T neighbours (n, T) and weights."""
    from gnn.features import ItemFeatureTable
    from gnn.graphstore import load_graph_store
    from gnn.sampler import WalkNeighbors
    from gnn.walks import load_neighborhoods

    store = load_graph_store(graph_path)
    items = np.asarray(items, dtype=np.int64)
    content = None if store.item_content is None else np.asarray(store.item_content[items])
    table = ItemFeatureTable.from_arrays(category=np.asarray(store.item_category[items]),
                                         counts=np.asarray(store.item_counts[items]), content=content,
                                         n_categories=store.n_categories)
    nb: Any = load_neighborhoods(walks_path)  # memory-mapped arrays: NeighborhoodsLike at run time
    nbr, w = WalkNeighbors(nb, n_neighbors=n_neighbors)(items)
    return {"items": items, "features": table.table.numpy(), "neighbors": nbr, "neighbor_weights": w}


def _load_shard(graph_path: str, walks_path: str, owner: np.ndarray, rank: int, n_neighbors: int
                ) -> dict[str, np.ndarray]:
    return shard_arrays(graph_path, walks_path, np.flatnonzero(owner == rank).astype(np.int64), n_neighbors)


def start_row_servers(client: Any, workers: list[str], loaded: list[Any]) -> dict[int, Any]:
    """One ``ShardServer`` actor per rank on that rank's worker, from ``loaded[r]`` (a future of a dict of
    :func:`shard_arrays` on that worker, so the rows never pass through the client)."""
    from pipeline.rowserver import ShardServer

    servers = {}
    for rank, (worker, fut) in enumerate(zip(workers, loaded, strict=True)):
        parts = [client.submit(operator.getitem, fut, k, workers=[worker], allow_other_workers=False, pure=False)
                 for k in ("items", "features", "neighbors", "neighbor_weights")]
        servers[rank] = client.submit(ShardServer, *parts, rank=rank, workers=[worker], allow_other_workers=False,
                                      actor=True, pure=False).result()
    return servers


# ------------------------------------------------------------------------------------------------ one rank


@dataclass(frozen=True)
class RankJob:
    """What a rank needs besides its :class:`pipeline.launch.RankInfo` (pickled to its worker)."""

    cfg: TrainStageConfig
    graph_path: str
    walks_path: str
    owner: np.ndarray  # (n_items,) int32
    query: np.ndarray  # (P,) this rank's pairs, padded to the same length on every rank
    positive: np.ndarray
    weight: np.ndarray
    out_dir: str  # the stage's temporary directory (rank 0 writes the checkpoint there)
    resume_path: str
    key: str
    device: str = "cpu"  # "cuda" on the GPU backend: each worker's own GPU (LocalCUDACluster sets one visible)
    cpu_slot: int = 0  # this rank's index among the ranks on its host (cpus_per_rank pins it to that slot's cores)


class _StepBatches:
    """A ``PairBatcher`` whose epoch is capped at ``max_batches`` steps (0 = no cap)."""

    def __init__(self, inner: Any, max_batches: int) -> None:
        self.inner, self.max_batches = inner, max_batches

    @property
    def n_batches(self) -> int:
        n = int(self.inner.n_batches)
        return min(n, self.max_batches) if self.max_batches else n

    def __call__(self, epoch: int, index: int) -> Any:
        return self.inner(epoch, index)


class _Progress:
    """Per-step accounting of a rank; a Dask event (and log line) every ``every_s`` seconds and per epoch."""

    def __init__(self, rank: int, n_steps: int, every_s: float, cache: Any, session: Any, model: Any,
                 record_weights: bool) -> None:
        self.rank, self.n_steps, self.every_s = rank, n_steps, every_s
        self.cache, self.session, self.model = cache, session, model
        self.record_weights = record_weights
        self.digests: list[str] = []
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.t0, self.pairs = now, 0
        self.losses: list[float] = []

    def on_step(self, info: Any) -> None:
        self.losses.append(info.loss)
        self.pairs += info.n_pairs
        if self.record_weights:
            self.digests.append(weights_digest(self.model))
        now = time.perf_counter()
        if self.every_s and now - self.t0 >= self.every_s:
            self.emit("step", epoch=info.epoch, step=info.batch + 1, now=now)

    def emit(self, kind: str, *, epoch: int, step: int, now: float | None = None, **extra: Any) -> None:
        now = time.perf_counter() if now is None else now
        stats = self.cache.stats
        msg = {"kind": kind, "rank": self.rank, "epoch": epoch, "step": step, "steps_per_epoch": self.n_steps,
               "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
               "pairs_per_s": self.pairs / max(now - self.t0, 1e-9), "hit_rate": stats.hit_rate,
               "remote_bytes": stats.remote_bytes, "grad_bytes": _grad_bytes(self.session), **extra}
        _publish(msg)
        self._reset(now)


def _grad_bytes(session: Any) -> int:
    return 0 if session is None else int(session.traffic.total_bytes)


def _publish(msg: dict[str, Any]) -> None:
    from distributed import get_worker

    with contextlib.suppress(ValueError):  # ValueError: not on a worker (a plain call in a test): log only
        get_worker().log_event(PROGRESS_TOPIC, msg)
    log.info("train %s", msg)


def weights_digest(model: Any) -> str:
    """SHA-1 of all parameters' bytes (replicas with identical weights have identical digests)."""
    h = hashlib.sha1(usedforsecurity=False)
    for p in getattr(model, "module", model).parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _rank_main(info: Any, job: RankJob, servers: dict[int, Any]) -> dict[str, Any]:
    from distributed import get_worker

    from pipeline.launch import pinned_cpus, process_group, slot_cpus

    worker = get_worker()
    nthreads = int(getattr(getattr(worker, "state", worker), "nthreads", 1) or 1)
    actors = worker.actors if hasattr(worker, "actors") else worker.state.actors
    server = actors[servers[info.rank].key]  # this rank's own ShardServer: its rows are the local table
    group = process_group(info) if info.world_size > 1 else contextlib.nullcontext()
    pin: Any = contextlib.nullcontext()
    if job.cfg.cpus_per_rank:
        nthreads = job.cfg.cpus_per_rank
        pin = pinned_cpus(slot_cpus(job.cpu_slot, nthreads))
    with pin, group:
        return _train_rank(info, job, servers, server, nthreads)


def _train_rank(info: Any, job: RankJob, servers: dict[int, Any], server: Any, nthreads: int) -> dict[str, Any]:
    import torch

    from cache import LocalOwnerTable, RemoteRowCache
    from gnn.batches import PairBatcher, TrainingPairs
    from gnn.checkpoint import restore_checkpoint, save_checkpoint
    from gnn.graphstore import load_graph_store
    from gnn.models import ModelConfig, build_model, sage_neighbors_for
    from gnn.sampler import GraphSageSampler, PinSageSampler
    from gnn.trainer import TrainConfig, Trainer, make_loss, make_optimizer
    from gnn.walks import load_neighborhoods
    from pipeline.remote_rows import BatchScopedSampler, ShardRows, actor_fetcher

    cfg, rank, world = job.cfg, info.rank, info.world_size
    torch.set_num_threads(nthreads)
    device_name = "cuda:0" if job.device == "cuda" else "cpu"  # the worker's one visible GPU
    store = load_graph_store(job.graph_path)
    nb = load_neighborhoods(job.walks_path)
    local = LocalOwnerTable(server.items, server.features, server.neighbors, server.neighbor_weights, owner=rank)
    mc = ModelConfig(kind=cfg.model, n_neighbors=cfg.n_neighbors, sage_neighbors=cfg.sage_neighbors,
                     hidden_dim=cfg.hidden_dim,
                     id_buckets=id_buckets_for(store.n_items, cfg.id_buckets) if cfg.item_ids else 0,
                     embed_dim=cfg.embed_dim, n_categories=store.n_categories,
                     content_dim=0 if store.item_content is None else int(store.item_content.shape[1]))
    pairs = TrainingPairs.from_arrays(job.query, job.positive, job.weight)

    # GraphSAGE's draw over the co-interaction graph, made once per rank ("distinct" builds that graph) and shared
    # by the pre-sampling pass and training
    sage_neighbors = sage_neighbors_for(mc, store) if cfg.model == "graphsage" else None

    def make_sampler(neighbors: Any, rows: Any) -> Any:
        if sage_neighbors is None:
            return PinSageSampler(neighbors=neighbors, rows=rows, n_layers=mc.n_layers)
        return GraphSageSampler(neighbors=sage_neighbors, rows=rows, fanouts=mc.fanouts)

    def make_batches(sampler: Any, seed: int) -> PairBatcher:
        return PairBatcher(pairs, sampler, n_items=store.n_items, batch_size=cfg.batch_size,
                           n_negatives=cfg.n_negatives, hard_negatives=np.asarray(nb.hard_negatives), seed=seed,
                           hard_cap=cfg.hard_cap,
                           negative_pool=local.items if cfg.negatives == "local" and world > 1 else None)

    importance = np.asarray(nb.item_importance, dtype=np.float64)
    presample_s = 0.0
    if cfg.cache == "importance" and cfg.importance == "presample" and world > 1:
        started = time.perf_counter()
        importance = presample_importance(make_sampler, make_batches, nb, cfg, store.n_items, rank) \
            + importance  # global visit shares (< 1 in total) only break ties between equal counts
        presample_s = time.perf_counter() - started
    fetcher = actor_fetcher(servers, local_rank=rank)
    try:
        cache = RemoteRowCache(cfg.cache_config(), fetcher=fetcher, owner_of=job.owner, local_rank=rank,
                               local=local, importance=importance)
        fill_started = time.perf_counter()
        cache.fill()
        fill_s = time.perf_counter() - fill_started
        shard_rows = ShardRows(cache)
        sampler = BatchScopedSampler(make_sampler(shard_rows.neighbors, shard_rows.rows), shard_rows)
        lr = cfg.effective_lr(world)  # the warm-up ramps from cfg.lr up to it (Goyal et al. 2017)
        betas, eps = cfg.adam_betas(world)
        tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, n_negatives=cfg.n_negatives,
                         seed=cfg.seed + rank, producer_threads=cfg.producer_threads, queue_size=cfg.queue_size,
                         num_threads=nthreads, log_every=0, device=device_name, loss=cfg.loss,
                         temperature=cfg.temperature, hard_cap=cfg.hard_cap,
                         warmup_steps=cfg.lr_warmup_steps if lr > cfg.lr else 0, warmup_start=cfg.lr / lr,
                         lr_schedule=cfg.lr_schedule, lr_final=cfg.lr_final, adam_betas=betas, adam_eps=eps)
        stepped = _StepBatches(make_batches(sampler, cfg.seed + rank), cfg.steps_per_epoch)
        model: torch.nn.Module = build_model(mc, seed=cfg.seed).to(device_name)
        comm = cfg.comm_config()
        session = None
        if world > 1:
            from gnn.comm import ddp_wrap, setup_communication

            model = ddp_wrap(model, sync_buffers=comm.uses_ddp_allreduce,
                             device_ids=[0] if job.device == "cuda" else None)

            session = setup_communication(model, comm)
        adam_in_hook = cfg.compression == "dgc" and cfg.dgc_correction == "adam" and world > 1
        if cfg.optimizer_kind == "sgd" or adam_in_hook:  # DGC's Adam correction: Adam inside the hook, then SGD(lr)
            momentum = 0.0 if cfg.compression == "dgc" else cfg.momentum
            optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        else:
            optimizer = make_optimizer(model, tc)
        if session is not None:
            optimizer = session.wrap_optimizer(optimizer)
        progress = _Progress(rank, stepped.n_batches, cfg.progress_s, cache, session, model, cfg.record_weights)
        gather = None
        if cfg.gather_candidates and world > 1:
            from gnn.comm.gather import CandidateGather

            gather = CandidateGather(max_rows=stepped.inner.max_candidates)  # one all-gather a step
        trainer = Trainer(model, stepped, config=tc, optimizer=optimizer,  # type: ignore[arg-type]
                          on_step=progress.on_step, loss=make_loss(tc, stepped, gather=gather))  # type: ignore[arg-type]
        resumed_from = 0
        comm_state = Path(job.resume_path).with_name(f"comm-rank{rank}.pt")  # this rank's DGC residuals
        comm_restored = False
        if Path(job.resume_path).is_file():
            restore_checkpoint(job.resume_path, trainer)
            resumed_from = trainer.epoch
            comm_restored = session is not None and session.restore_state(comm_state, epoch=trainer.epoch)
        extra = {"stage": STAGE, "stage_config": to_dict(cfg), "optimizer": cfg.optimizer_kind,
                 "comm": comm.to_dict(), "key": job.key, "world_size": world, "lr": cfg.lr_info(world)}
        epochs = []
        snapshots: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # epochs completed -> (emb, query)
        snapshot_bytes = 0  # remote rows the per-epoch embeddings fetched
        for epoch in range(trainer.epoch, cfg.epochs):
            if session is not None:
                session.set_epoch(epoch)
            rep = trainer.train_epoch()
            epochs.append(dataclasses.asdict(rep))
            progress.emit("epoch", epoch=epoch, step=rep.steps, mean_loss=rep.mean_loss,
                          epoch_pairs_per_s=rep.pairs_per_s, seconds=rep.seconds)
            if session is not None:  # before the checkpoint: a kill in between leaves a state the resume ignores
                session.save_state(comm_state, epoch=trainer.epoch)
            if rank == 0:
                save_checkpoint(job.resume_path, trainer, mc, extra=extra)
            if cfg.epoch_embeddings:
                before = cache.transport_stats.bytes
                snapshots[trainer.epoch] = _epoch_snapshot(model, sampler, local.items, cfg.seed, mc.query_head,
                                                           world, not comm.uses_ddp_allreduce, session)
                snapshot_bytes += cache.transport_stats.bytes - before
        train_stats = cache.stats.to_dict()
        transport = cache.transport_stats.to_dict()
        if world > 1 and not comm.uses_ddp_allreduce:
            _average_parameters(model, world)  # local/hierarchical: one final global average before embedding
        elif session is not None:
            # DGC: the local tensors' last round of changed rows, and with --dgc-flush the residuals applied
            session.finish(lr=float(optimizer.param_groups[0]["lr"]))
        if rank == 0:
            save_checkpoint(Path(job.out_dir) / "checkpoint.pt", trainer, mc, extra=extra)
        embed_started = time.perf_counter()
        emb, query_emb = _embed_local(model, sampler, local.items if cfg.embed else local.items[:0], cfg.seed,
                                      mc.query_head and cfg.embed)
        embed_bytes = cache.transport_stats.bytes - transport["total"]["bytes"]  # remote rows of the inference
        return {"rank": rank, "worker": info.worker, "epochs": epochs, "resumed_from_epoch": resumed_from,
                "comm_state_restored": comm_restored,
                "steps": trainer.step, "n_items": int(local.items.shape[0]), "n_pairs": int(job.query.shape[0]),
                "cache": train_stats, "transport": transport, "cache_fill_s": round(fill_s, 3),
                "presample_s": round(presample_s, 3),
                "gathered_candidates": None if gather is None else gather.rows_added,
                "comm": None if session is None else session.stats(), "items": np.asarray(local.items),
                "embeddings": emb, "query_embeddings": query_emb,
                "embed_s": round(time.perf_counter() - embed_started, 3),
                "embed_remote_bytes": int(embed_bytes), "epoch_snapshots": snapshots,
                "snapshot_remote_bytes": int(snapshot_bytes),
                "digests": progress.digests, "final_digest": weights_digest(model),
                "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "torch_threads": torch.get_num_threads()}
    finally:
        fetcher.close()


def presample_importance(make_sampler: Any, make_batches: Any, nb: Any, cfg: TrainStageConfig, n_items: int,
                         rank: int) -> np.ndarray:
    """GNNLab-style pre-sampled access counts of this shard: its own sampler over ``cfg.presample_batches``
    batches (drawn with a seed no training epoch uses), counting each item once per batch. The topology comes
    from the walks output (memory-mapped), no row moves. Returns (n_items,) float64."""
    import torch

    from cache import count_accesses
    from gnn.sampler import WalkNeighbors

    seen: list[np.ndarray] = []

    def record(ids: np.ndarray) -> torch.Tensor:
        seen.append(np.asarray(ids, dtype=np.int64))
        return torch.zeros((len(ids), 1))

    batches = make_batches(make_sampler(WalkNeighbors(nb, n_neighbors=cfg.n_neighbors), record),
                           cfg.seed + rank + 1_000_003)
    for b in range(min(cfg.presample_batches, batches.n_batches)):
        batches(0, b)
    return count_accesses(seen, n_items)


def _embed_local(model: Any, sampler: Any, items: np.ndarray, seed: int, with_query: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """This rank's items embedded by ``model`` (DDP-wrapped or not): (n, D) float32 and, with ``with_query``, the
    query side (n, D) of its query head."""
    import torch

    from gnn.trainer import embed_items, query_side

    plain = getattr(model, "module", model)
    emb_t = embed_items(plain, sampler, items, batch_size=1024, seed=seed)
    with torch.no_grad():  # the query side of a model with a query head (gnn.trainer.query_side)
        query = query_side(plain, emb_t, torch.as_tensor(items, dtype=torch.int64)  # ids: per-item query rows
                           ).cpu().numpy() if with_query else None
    return emb_t.cpu().numpy().astype(np.float32), query


def _epoch_snapshot(model: Any, sampler: Any, items: np.ndarray, seed: int, with_query: bool, world: int,
                    average: bool, session: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_embed_local` between epochs without touching the training state: under local / hierarchical
    averaging (``average``) the replicas differ, so a copy of the weights is averaged (a collective: every rank
    calls this) and embedded, as the final embedding does with the weights themselves; with DGC local tensors, a
    copy with their changed rows merged (``session.merged_copy``)."""
    import copy

    merged = None if session is None else session.merged_copy(getattr(model, "module", model))
    if merged is not None:
        return _embed_local(merged, sampler, items, seed, with_query)
    if average and world > 1:
        model = copy.deepcopy(getattr(model, "module", model))
        _average_parameters(model, world)
    return _embed_local(model, sampler, items, seed, with_query)


def _average_parameters(model: Any, world: int) -> None:
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in getattr(model, "module", model).parameters():
            dist.all_reduce(p.data)
            p.data /= world


# ------------------------------------------------------------------------------------------------ the stage


def _pairs_per_rank(run_dir: Path, cfg: TrainStageConfig, owner: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Training pairs of the split's train table, by the owner of the query item, padded (with a seeded draw of
    the rank's own pairs) to the same length on every rank so that every rank takes the same number of steps."""
    import pandas as pd

    from gnn.pairs import training_pairs

    split = read_stage(run_dir, "split")
    pairs = training_pairs(pd.read_parquet(split.path / "train.parquet"), window_s=cfg.window_s)
    if len(pairs) == 0:
        raise ValueError(f"{split.path / 'train.parquet'}: no training pairs (consecutive items of a user within "
                         f"{cfg.window_s} s); raise --window-s or use more data")
    rank_of = owner[pairs.query]
    groups = [np.flatnonzero(rank_of == r) for r in range(cfg.workers)]
    empty = [r for r, g in enumerate(groups) if g.size == 0]
    if empty:
        raise ValueError(f"shard {empty[0]} owns no query item of any training pair: use fewer --workers")
    longest = max(g.size for g in groups)
    rng = np.random.default_rng([cfg.seed, 7])
    out: list[tuple[np.ndarray, ...]] = []
    for g in groups:
        idx = np.concatenate([g, rng.choice(g, longest - g.size)]) if g.size < longest else g
        out.append((pairs.query[idx], pairs.positive[idx], pairs.weight[idx]))
    return out


def _print_progress(event: Any) -> None:
    _, m = event
    if m.get("kind") == "epoch":
        line = (f"[train] rank {m['rank']} epoch {m['epoch']} done: loss {m['mean_loss']:.4f}, "
                f"{m['epoch_pairs_per_s']:.0f} pairs/s, {m['seconds']:.1f} s")
    else:
        line = (f"[train] rank {m['rank']} epoch {m['epoch']} step {m['step']}/{m['steps_per_epoch']}: "
                f"loss {m['loss']:.4f}, {m['pairs_per_s']:.0f} pairs/s")
    line += (f", cache hit {100 * m['hit_rate']:.1f} %, remote {m['remote_bytes'] / 1e6:.2f} MB, "
             f"gradients {m['grad_bytes'] / 1e6:.1f} MB")
    print(line, file=sys.stderr, flush=True)


def _current_partition(run: Path, cfg: TrainStageConfig) -> StageOutput | None:
    """The finished partition stage when it has ``cfg.workers`` shards made by ``cfg.partition`` and is newer
    than the walks it was made from (any other settings of it are kept), else None."""
    from pipeline.rundir import MANIFEST

    if not (run / "partition" / MANIFEST).is_file():
        return None
    out = read_stage(run, "partition")
    walks_key = out.manifest.get("inputs", {}).get("walks", {}).get("key")
    method = str(out.report.get("method", ""))
    same_method = method == cfg.partition or (cfg.partition == "metis" and method == "random-fallback")
    current = walks_key == read_stage(run, "walks").key
    return out if current and out.report.get("parts") == cfg.workers and same_method else None


def stage_inputs(run: Path, cfg: TrainStageConfig, *, partition: bool = False) -> dict[str, StageOutput]:
    """The upstream outputs the stage reads; with ``partition`` the partition stage is run when it is missing
    or does not fit ``cfg`` (``workers > 1`` only)."""
    from pipeline.partition import PartitionConfig, run_partition

    inputs = {s: read_stage(run, s) for s in ("graph", "walks", "split")}
    if cfg.workers > 1:
        current = _current_partition(run, cfg)
        if current is None:
            current = run_partition(run, PartitionConfig(parts=cfg.workers, method=cfg.partition, seed=cfg.seed)) \
                if partition else read_stage(run, "partition")
        inputs["partition"] = current
    return inputs


def resume_path(run_dir: str | Path, cfg: TrainStageConfig) -> Path:
    """Where a run of ``cfg`` keeps the checkpoint of its last finished epoch until the stage completes
    (``<run>/.train-resume/<stage key>/checkpoint.pt``)."""
    run = Path(run_dir)
    inputs = stage_inputs(run, cfg)
    key = stage_key(STAGE, to_dict(cfg), {n: {"stage": o.stage, "key": o.key} for n, o in inputs.items()})
    return run / RESUME_DIR / key / "checkpoint.pt"


def train(run_dir: str | Path, cfg: TrainStageConfig, client: Any, *, backend: str = "cpu",
          force: bool = False) -> StageOutput:
    """Run stage ``train`` in ``run_dir`` (a no-op when its output is current); partitions first when
    ``cfg.workers > 1`` (itself a no-op when ``<run>/partition`` already holds that partition)."""
    from distributed import span

    from cache import CacheStats
    from pipeline.launch import host_slots, rank_infos, run_ranks

    run = Path(run_dir)
    inputs = stage_inputs(run, cfg, partition=True)
    graph, walks, part_out = inputs["graph"], inputs["walks"], inputs.get("partition")
    top_t = walks.manifest.get("config", {}).get("top_t")
    if cfg.model == "pinsage" and top_t is not None and cfg.n_neighbors > int(top_t):
        raise ValueError(f"train.n_neighbors={cfg.n_neighbors} is above the walks stage's top_t={top_t} "
                         f"({walks.path}): its neighbourhoods hold at most {top_t} items each; rerun the walks with "
                         f"`pinsage walks --top-t {cfg.n_neighbors} --force` or lower n_neighbors")
    resume_dir = resume_path(run, cfg).parent
    key = resume_dir.name

    def build(tmp: Path) -> dict[str, Any]:
        from gnn.graphstore import load_graph_store

        started = time.perf_counter()
        n_items = load_graph_store(graph.path).n_items
        owner = np.zeros(n_items, np.int32) if part_out is None else np.load(part_out.path / "owner.npy")
        per_rank = _pairs_per_rank(run, cfg, owner)
        # GPU backend: the model and batches on each worker's GPU, gradients over NCCL; batches are still built
        # (and remote rows cached) on the CPU and moved per step
        device = "cuda" if backend == "gpu" else "cpu"
        infos = rank_infos(client, cfg.workers, backend="nccl" if device == "cuda" else "gloo",
                           timeout_s=cfg.timeout_s)
        resume_dir.mkdir(parents=True, exist_ok=True)
        slots = host_slots([i.worker for i in infos])
        jobs = [RankJob(cfg, str(graph.path), str(walks.path), owner, q, p, w, str(tmp),
                        str(resume_dir / "checkpoint.pt"), key, device, slot)
                for (q, p, w), slot in zip(per_rank, slots, strict=True)]
        client.subscribe_topic(PROGRESS_TOPIC, _print_progress)
        try:
            with span(STAGE):
                workers = [i.worker for i in infos]
                # hash=False: a key of its own; a content-hashed key is the one the previous run on this client
                # used, and the scheduler may still be forgetting it ("lost dependencies" on back-to-back runs)
                owner_f = client.scatter(owner, broadcast=True, hash=False)
                loaded = [client.submit(_load_shard, str(graph.path), str(walks.path), owner_f, r, cfg.n_neighbors,
                                        workers=[w], allow_other_workers=False, pure=False)
                          for r, w in enumerate(workers)]
                servers = start_row_servers(client, workers, loaded)
                # each rank's pairs go to its worker once, as data (not inside the task graph)
                job_fs = [client.scatter(job, workers=[w], hash=False) for job, w in zip(jobs, workers, strict=True)]
                results = run_ranks(client, _rank_main, infos, args=[(job, servers) for job in job_fs])
                served = [servers[r].stats().result() for r in range(cfg.workers)]
        finally:
            client.unsubscribe_topic(PROGRESS_TOPIC)
        _write_epoch_snapshots(tmp, results, n_items, cfg.embed_dim)
        parts = [(r.pop("items"), r.pop("embeddings"), r.pop("query_embeddings")) for r in results]
        if cfg.embed:
            _save_item_tables(tmp, parts, n_items, cfg.embed_dim)
        report = _report(cfg, results, served, part_out, time.perf_counter() - started, CacheStats)
        write_json_atomic(tmp / "report.json", report)
        return {k: report[k] for k in ("workers", "epochs", "pairs_per_s", "cache_total", "grad_bytes_total",
                                       "replicas_identical", "seconds")}

    out = run_stage(run, STAGE, config=cfg, inputs=inputs, build=build, force=force)
    shutil.rmtree(run / RESUME_DIR, ignore_errors=True)
    return out


def _save_item_tables(out: Path, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], n_items: int,
                      dim: int) -> None:
    """Assemble the ranks' (items, embeddings, query side or None) into (n_items, dim) float32 tables and save
    ``embeddings.npy`` (and ``query_embeddings.npy``, which evaluate / recommend score against the items) in ``out``."""
    emb = np.zeros((n_items, dim), np.float32)
    query = None if parts[0][2] is None else np.zeros_like(emb)  # every rank runs the same model
    for items, part, query_part in parts:
        emb[items] = part
        if query is not None:
            query[items] = query_part
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / EMBEDDINGS_NPY, emb)
    if query is not None:
        np.save(out / QUERY_EMBEDDINGS_NPY, query)


def _write_epoch_snapshots(tmp: Path, results: list[dict[str, Any]], n_items: int, dim: int) -> None:
    """``<tmp>/epochs/<n>/`` tables of every item after epoch n, from the ranks' ``epoch_snapshots`` (a resumed
    run has those of the epochs it ran itself)."""
    for n in sorted(results[0]["epoch_snapshots"]):
        _save_item_tables(tmp / EPOCHS_DIR / str(n), [(r["items"], *r["epoch_snapshots"][n]) for r in results],
                          n_items, dim)
    for r in results:
        r.pop("epoch_snapshots")


def epoch_embeddings_path(train_dir: str | Path, epochs_done: int) -> Path:
    """Where a run with ``epoch_embeddings`` keeps the item embeddings after ``epochs_done`` epochs (a
    ``query_embeddings.npy`` beside it where the model has a query head)."""
    return Path(train_dir) / EPOCHS_DIR / str(epochs_done) / EMBEDDINGS_NPY


def _report(cfg: TrainStageConfig, results: list[dict[str, Any]], served: list[dict[str, Any]],
            part_out: StageOutput | None, seconds: float, stats_cls: Any) -> dict[str, Any]:
    epochs = []
    for e in range(len(results[0]["epochs"])):
        rows = [r["epochs"][e] for r in results]
        pairs, secs = sum(x["pairs"] for x in rows), max(x["seconds"] for x in rows)
        epochs.append({"epoch": rows[0]["epoch"], "mean_loss": float(np.mean([x["mean_loss"] for x in rows])),
                       "steps": rows[0]["steps"], "pairs": pairs, "seconds": round(secs, 3),
                       "pairs_per_s": round(pairs / secs, 1),
                       "per_rank_loss": [x["mean_loss"] for x in rows],
                       # seconds each trainer waited for a ready batch (sampling-bound when large) and seconds its
                       # producer threads spent building batches (summed over threads)
                       "per_rank_wait_s": [round(x["consumer_wait_s"], 3) for x in rows],
                       "per_rank_build_s": [round(x["build_s"], 3) for x in rows],
                       "per_rank_phase_s": [{k: round(x[f"{k}_s"], 3) for k in ("forward", "backward", "optimizer")}
                                            for x in rows]})
    caches = [stats_cls(**{k: v for k, v in r["cache"].items() if k != "hit_rate"}) for r in results]
    total = stats_cls.merge(caches)
    grad = [0 if r["comm"] is None else int(r["comm"].get("total_bytes", 0)) for r in results]
    part = None if part_out is None else {k: part_out.report.get(k) for k in (
        "parts", "method", "edge_cut_fraction", "weight_cut_fraction", "neighbor_entries_cut_fraction",
        "halo_sizes", "items")}
    return {
        "config": to_dict(cfg), "optimizer": cfg.optimizer_kind, "lr": cfg.lr_info(), "workers": cfg.workers,
        "epochs": epochs,
        "pairs_per_s": epochs[-1]["pairs_per_s"] if epochs else None,
        "per_worker": [{k: r[k] for k in ("rank", "worker", "steps", "n_items", "n_pairs", "cache", "transport",
                                          "cache_fill_s", "presample_s", "gathered_candidates", "comm", "embed_s",
                                          "embed_remote_bytes", "snapshot_remote_bytes", "resumed_from_epoch",
                                          "comm_state_restored", "cpus", "torch_threads")}
                       for r in results],
        "cache_total": total.to_dict(), "served": served, "grad_bytes_per_worker": grad,
        "grad_bytes_total": int(sum(grad)),
        "replicas_identical": len({r["final_digest"] for r in results}) == 1,
        "weight_digests": [r["digests"] for r in results] if cfg.record_weights else None,
        "partition": part, "seconds": round(seconds, 2),
    }


def train_config(args: argparse.Namespace, toml: dict[str, Any]) -> TrainStageConfig:
    """``--workers`` (a cluster flag) is also the number of ranks."""
    return from_sources(TrainStageConfig, toml=toml, section=STAGE, args=args, workers=getattr(args, "workers", None))


def _main(args: argparse.Namespace) -> int:
    from pipeline.cluster import cluster_client
    from pipeline.launch import RankFailed
    from pipeline.rundir import StageError

    toml = settings(args)
    cfg = train_config(args, toml)
    ccfg = cluster_config(args, toml)
    if ccfg.scheduler is None and ccfg.n_workers < cfg.workers:
        ccfg = dataclasses.replace(ccfg, n_workers=cfg.workers)
    with cluster_client(ccfg) as (client, backend):
        print(f"pinsage train: dashboard {client.dashboard_link}", file=sys.stderr)
        try:
            out = train(args.run_dir, cfg, client, backend=backend, force=args.force)
        except RankFailed as e:  # one line for the CLI: which rank, which worker, what it raised
            raise StageError(f"train: {e}") from e
    r = out.report
    state = "up to date" if out.reused else "done"
    c = r.get("cache_total", {})
    print(f"pinsage train: {state}: {out.path} ({r.get('workers')} workers, {r.get('pairs_per_s')} pairs/s, "
          f"cache hit {100 * c.get('hit_rate', 0.0):.1f} %, remote {c.get('bytes_fetched', 0) / 1e6:.1f} MB)")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(STAGE, help="distributed training: one rank per Dask worker, remote rows via a cache",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_arguments(p)
    add_arguments(p, TrainStageConfig, skip=("workers",))
    p.set_defaults(func=_main)
