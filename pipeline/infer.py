"""Stage ``infer``: every item's embedding from a checkpoint, layer by layer on Dask (map, join, reduce).

Items are split into blocks — the partition stage's shards when ``<run>/partition/`` exists, else contiguous id
ranges — and each block lives on one worker for the whole run. Per layer k: *map* (block b: its items' messages
``m_k``, once per item: :meth:`gnn.inference.Layerwise.message`), *join* (block b's rows of ``m_k`` from its own
block, plus from each other block c the rows b's neighbours need — a small task on c's worker that selects them,
the halo of b), *reduce* (block b: aggregate, dense layer, normalisation -> ``h_(k+1)``). A worker holds only its
blocks' vectors and their halo rows, never the whole table. After layer K each block writes its part of
``embeddings/part-*.parquet`` (columns ``item``, ``embedding``) and its rows of ``embeddings.npy`` into the
stage's temporary directory; ``model_config.json`` and ``checkpoint.json`` record the checkpoint.

    pinsage infer --run-dir runs/x                    # checkpoint from <run>/train/
    pinsage infer --run-dir runs/x --checkpoint path/to/checkpoint.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from distributed import Client, Future, get_worker, span

from gnn.checkpoint import Checkpoint, load_checkpoint
from gnn.features import ItemFeatureTable
from gnn.graphstore import GraphStore, load_graph_store
from gnn.inference import (
    FrozenCoInteraction,
    JoinPlan,
    Layerwise,
    WalkLayerNeighbors,
    layer_neighbors_for,
    message_table,
    plan_join,
)
from gnn.models import ItemEncoder, ModelConfig, build_model
from gnn.sampler import NeighborhoodsLike
from gnn.walks import load_neighborhoods
from pipeline.backend import Backend
from pipeline.cluster import cluster_client
from pipeline.common import add_arguments, add_common_arguments, cluster_config, from_sources, settings
from pipeline.config import check
from pipeline.progress import track
from pipeline.rundir import StageError, StageOutput, read_stage, run_stage, write_json_atomic
from pipeline.schema import EMBEDDINGS_NPY, QUERY_EMBEDDINGS_NPY

log = logging.getLogger(__name__)

STAGE = "infer"
CHECKPOINT_FILE = "checkpoint.pt"  # what the train stage writes into <run>/train/
EMBEDDINGS_PARQUET = "embeddings"


@dataclass(frozen=True)
class InferConfig:
    """Settings of the infer stage (section ``[infer]``).

    Args:
        checkpoint: checkpoint file, or a directory holding ``checkpoint.pt`` (default "" = ``<run>/train/``).
        block_items: items per block when there is no partition (default 131072); at least one block per worker.
        use_partition: one block per shard of ``<run>/partition/`` when present (default True).
        sample_seed: seed of GraphSAGE's frozen neighbour sample (default 0; PinSage draws nothing).
        torch_threads: torch threads per task, 0 = the worker's thread count (default 0).
    """

    checkpoint: str = field(default="", metadata={"help": "checkpoint file or directory (default <run>/train/)"})
    block_items: int = field(default=131072, metadata={"help": "items per block when there is no partition"})
    use_partition: bool = field(default=True, metadata={"help": "one block per partition shard when present"})
    sample_seed: int = field(default=0, metadata={"help": "GraphSAGE: seed of the frozen neighbour sample"})
    torch_threads: int = field(default=0, metadata={"help": "torch threads per task (0 = the worker's threads)"})

    def __post_init__(self) -> None:
        check(self.block_items >= 1, "infer.block_items", self.block_items, "must be at least 1")
        check(self.sample_seed >= 0, "infer.sample_seed", self.sample_seed, "must be 0 or more")
        check(self.torch_threads >= 0, "infer.torch_threads", self.torch_threads, "must be 0 (auto) or more")


# ------------------------------------------------------------------------------------------- checkpoint


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | Path = "") -> Path:
    """The checkpoint file: ``checkpoint`` (a file, or a directory with ``checkpoint.pt``), default
    ``<run>/train/``; a clear error when there is none."""
    where = Path(checkpoint) if str(checkpoint) else Path(run_dir) / "train"
    if where.is_dir():
        if (where / CHECKPOINT_FILE).is_file():
            return where / CHECKPOINT_FILE
        found = sorted(where.glob("*.pt"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"{where}: {'several' if found else 'no'} checkpoint files (*.pt) there; run "
                                f"`pinsage train --run-dir {run_dir}` first or pass --checkpoint FILE")
    if not where.is_file():
        raise FileNotFoundError(f"{where}: no checkpoint there; run `pinsage train --run-dir {run_dir}` first or "
                                "pass --checkpoint FILE")
    return where


def load_encoder(path: str | Path) -> tuple[ItemEncoder, Checkpoint]:
    """The encoder of a checkpoint in eval mode; a one-line ValueError when the weights do not fit its config."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt.model_config)
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"{path}: weights do not match the checkpoint's model_config ({first}); the file is "
                         "corrupt or written by other code — re-run `pinsage train --force`") from None
    return model.eval(), ckpt


def check_against_data(config: ModelConfig, store: GraphStore, path: Path, *, n_walk_items: int | None) -> None:
    """A checkpoint that cannot embed this run's items is a one-line ValueError naming the mismatch."""
    content = 0 if store.item_content is None else int(store.item_content.shape[1])
    width = 4 + content
    if config.n_numeric + config.content_dim != width:
        raise ValueError(f"{path}: the model reads {config.n_numeric} numeric + {config.content_dim} content columns,"
                         f" the graph store has {width}; was it trained on another run? pass --checkpoint")
    if store.n_categories > config.n_categories:
        raise ValueError(f"{path}: the model knows {config.n_categories} categories, the graph store has "
                         f"{store.n_categories}; was it trained on another run? pass --checkpoint")
    if n_walk_items is not None and n_walk_items != store.n_items:
        raise ValueError(f"walks hold {n_walk_items} items, the graph store {store.n_items}: re-run "
                         "`pinsage walks --force`")


def file_token(path: str | Path) -> str:
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


# ------------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockLayout:
    """Which block owns each item and at which row: contiguous id ranges (``bounds`` (B+1,)) or the shards of a
    partition stage (``partition_dir``: ``owner.npy`` and ``shard-<k>/items.npy``, sorted ids)."""

    n_items: int
    n_blocks: int
    bounds: tuple[int, ...] = ()
    partition_dir: str = ""

    @classmethod
    def ranges(cls, n_items: int, n_blocks: int) -> BlockLayout:
        n_blocks = max(1, min(n_blocks, n_items))
        edges = np.linspace(0, n_items, n_blocks + 1).round().astype(np.int64)
        return cls(n_items=n_items, n_blocks=n_blocks, bounds=tuple(int(x) for x in edges))

    @property
    def kind(self) -> str:
        return "partition" if self.partition_dir else "ranges"

    def items(self, block: int) -> np.ndarray:
        """Sorted int64 ids of ``block``."""
        if self.partition_dir:
            return np.asarray(_shard_items(self.partition_dir, block), dtype=np.int64)
        return np.arange(self.bounds[block], self.bounds[block + 1], dtype=np.int64)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block, row within the block) of each id (any shape; ids must be valid)."""
        if not self.partition_dir:
            block = np.searchsorted(np.asarray(self.bounds), ids, side="right") - 1
            return block, ids - np.asarray(self.bounds)[block]
        block = np.asarray(_owner(self.partition_dir))[ids].astype(np.int64)
        position = np.zeros(ids.shape, np.int64)
        for c in np.unique(block).tolist():
            sel = block == c
            position[sel] = np.searchsorted(_shard_items(self.partition_dir, c), ids[sel])
        return block, position


@functools.lru_cache(maxsize=4)
def _owner(partition_dir: str) -> np.ndarray:
    return np.load(Path(partition_dir) / "owner.npy", mmap_mode="r")


@functools.lru_cache(maxsize=256)
def _shard_items(partition_dir: str, shard: int) -> np.ndarray:
    return np.load(Path(partition_dir) / f"shard-{shard}" / "items.npy", mmap_mode="r")


# ------------------------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class InferContext:
    """What every task needs to rebuild its inputs on a worker (paths are read there; small to ship)."""

    checkpoint: str
    checkpoint_token: str
    model_config: ModelConfig
    store: str
    walks: str | None
    layout: BlockLayout
    sample_seed: int
    device: str
    torch_threads: int


@dataclass(frozen=True)
class BlockPlan:
    """A block's items and, per layer, where its neighbours' messages are (``plans[k]``)."""

    block: int
    items: np.ndarray
    plans: tuple[JoinPlan, ...]


@dataclass(frozen=True)
class BlockState:
    """A block's vectors after a layer: ``h (n, d)`` float32 and the next layer's messages ``msg (n, m)``
    (None after the last layer, when ``h`` is the embedding)."""

    h: np.ndarray
    msg: np.ndarray | None


@functools.lru_cache(maxsize=2)
def _worker_model(path: str, token: str, device: str) -> Layerwise:
    model, _ = load_encoder(path)
    return Layerwise(model.to(device))


@functools.lru_cache(maxsize=2)
def _worker_store(path: str) -> GraphStore:
    return load_graph_store(path)


@functools.lru_cache(maxsize=2)
def _worker_neighbors(config: ModelConfig, store_path: str, walks_path: str | None,
                      seed: int) -> WalkLayerNeighbors | FrozenCoInteraction:
    nb = cast(NeighborhoodsLike, load_neighborhoods(walks_path)) if walks_path else None
    return layer_neighbors_for(config, neighborhoods=nb, store=_worker_store(store_path), seed=seed)


def _threads(ctx: InferContext) -> None:
    n = ctx.torch_threads
    if n == 0:
        try:
            n = get_worker().state.nthreads
        except ValueError:  # not inside a worker (a direct call)
            n = torch.get_num_threads()
    torch.set_num_threads(max(1, n))


def _plan_task(ctx: InferContext, block: int, n_layers: int) -> BlockPlan:
    items = ctx.layout.items(block)
    table = _worker_neighbors(ctx.model_config, ctx.store, ctx.walks, ctx.sample_seed)
    plans: list[JoinPlan] = []
    for layer in range(n_layers):
        if layer > 0 and table.layer_independent:
            plans.append(plans[0])
            continue
        nbr, weight = table(layer, items)  # (n, S)
        owner, position = ctx.layout.locate(np.maximum(nbr, 0))
        plans.append(plan_join(block, items.shape[0], nbr, weight, owner, position))
    return BlockPlan(block, items, tuple(plans))


def _request_counts(plan: BlockPlan) -> dict[tuple[int, int], int]:
    return {(k, c): int(r.shape[0]) for k, p in enumerate(plan.plans) for c, r in p.requests.items()}


def _request_task(plan: BlockPlan, layer: int, other: int) -> np.ndarray:
    return plan.plans[layer].requests[other]


def _to_state(lw: Layerwise, layer_next: int, h: torch.Tensor) -> BlockState:
    msg = lw.message(layer_next, h).cpu().numpy() if layer_next < lw.n_layers else None
    return BlockState(h.cpu().numpy(), msg)


@torch.no_grad()
def _encode_task(ctx: InferContext, plan: BlockPlan) -> BlockState:
    """Map: input vectors of the block's items and their layer-0 messages."""
    _threads(ctx)
    lw = _worker_model(ctx.checkpoint, ctx.checkpoint_token, ctx.device)
    store = _worker_store(ctx.store)
    ids = plan.items
    content = None if store.item_content is None else np.asarray(store.item_content[ids])
    rows = ItemFeatureTable.from_arrays(category=np.asarray(store.item_category[ids]),
                                        counts=np.asarray(store.item_counts[ids]), content=content,
                                        n_categories=store.n_categories).table
    # plan.items may arrive read-only (a partition's memory-mapped shard): torch needs a writable array
    h = lw.encode(torch.from_numpy(np.array(ids, dtype=np.int64)).to(ctx.device), rows.to(ctx.device))  # (n, input_dim)
    return _to_state(lw, 0, h)


def _messages(state: BlockState) -> np.ndarray:
    if state.msg is None:
        raise RuntimeError("infer: a block's messages were asked for after its last layer (a scheduling bug)")
    return state.msg


def _take_task(state: BlockState, positions: np.ndarray) -> np.ndarray:
    """Join, owner side: the rows of this block's messages another block asked for (its halo here)."""
    return _messages(state)[positions]


@torch.no_grad()
def _reduce_task(ctx: InferContext, plan: BlockPlan, state: BlockState, layer: int, others: tuple[int, ...],
                 *fetched: np.ndarray) -> BlockState:
    """Reduce: aggregate the joined messages, dense layer, normalisation; after the last layer, the head."""
    _threads(ctx)
    lw = _worker_model(ctx.checkpoint, ctx.checkpoint_token, ctx.device)
    dev = ctx.device
    jp = plan.plans[layer]
    table = message_table(torch.from_numpy(_messages(state)).to(dev),
                          {c: torch.from_numpy(f).to(dev) for c, f in zip(others, fetched, strict=True)})
    h = lw.combine(layer, torch.from_numpy(state.h).to(dev), table, torch.from_numpy(jp.nbr_index).to(dev),
                   torch.from_numpy(jp.nbr_weight).to(dev))  # (n, hidden)
    if layer + 1 == lw.n_layers:
        return BlockState(lw.head(h).cpu().numpy(), None)
    return _to_state(lw, layer + 1, h)


@torch.no_grad()
def write_query_side(encoder: ItemEncoder, embeddings: Path, out: Path, chunk: int = 1 << 18) -> None:
    """``encoder.queries`` of every row of ``embeddings`` (.npy) into ``out`` (.npy), ``chunk`` rows at a time
    (a (D, D) map: cheap beside the layers, so it runs where the stage is driven)."""
    emb = np.load(embeddings, mmap_mode="r")
    table = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=emb.shape)
    for lo in range(0, emb.shape[0], chunk):
        rows = torch.from_numpy(np.array(emb[lo:lo + chunk]))  # row i of the table is item i
        table[lo:lo + chunk] = encoder.queries(rows, torch.arange(lo, lo + rows.shape[0])).numpy()
    table.flush()


def _write_task(plan: BlockPlan, state: BlockState, out_dir: str) -> int:
    """The block's embeddings into ``embeddings/part-<b>.parquet`` and its rows of ``embeddings.npy``."""
    out = Path(out_dir)
    emb = np.ascontiguousarray(state.h, dtype=np.float32)  # (n, D)
    dim = emb.shape[1]
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim)
    # float vectors do not compress: snappy on them cost 4x the write time for nothing, so only ids are compressed
    pq.write_table(pa.table({"item": pa.array(plan.items, pa.int64()), "embedding": vectors}),
                   out / EMBEDDINGS_PARQUET / f"part-{plan.block:05d}.parquet",
                   compression={"item": "snappy", "embedding": "none"}, use_dictionary=False)
    table = np.load(out / EMBEDDINGS_NPY, mmap_mode="r+")
    table[plan.items] = emb
    table.flush()
    return int(emb.shape[0])


# ------------------------------------------------------------------------------------------- client side


def message_width(config: ModelConfig, layer: int) -> int:
    """Floats per fetched row at ``layer``: PinSage sends ``ReLU(Q h)`` (hidden), GraphSAGE ``h`` itself."""
    if config.kind == "pinsage" or layer > 0:
        return config.hidden_dim
    return config.input_dim


@dataclass
class InferStats:
    """What a run did: blocks, rows fetched across blocks per layer, seconds per layer."""

    blocks: int = 0
    layout: str = ""
    fetched_rows: list[int] = dataclasses.field(default_factory=list)
    fetched_bytes: list[int] = dataclasses.field(default_factory=list)
    layer_seconds: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def distributed_embeddings(client: Client, ctx: InferContext, config: ModelConfig, out_dir: str | Path, *,
                           progress: bool = True, stats: InferStats | None = None) -> int:
    """Compute every item's embedding with ``ctx`` and write them into ``out_dir`` (see the module docstring);
    returns the number of items written."""
    started = time.perf_counter()
    layout, n_layers = ctx.layout, config.n_layers
    workers = sorted(client.nthreads())
    home = {b: [workers[b % len(workers)]] for b in range(layout.n_blocks)}
    run = uuid.uuid4().hex[:8]
    out = Path(out_dir)
    (out / EMBEDDINGS_PARQUET).mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(out / EMBEDDINGS_NPY, mode="w+", dtype=np.float32,
                              shape=(layout.n_items, config.embed_dim)).flush()

    def submit(fn: Any, *args: Any, block: int, name: str) -> Future:
        return client.submit(fn, *args, workers=home[block], allow_other_workers=True, pure=False,
                             key=f"infer-{name}-{run}-{block}")

    st = InferStats(blocks=layout.n_blocks, layout=layout.kind) if stats is None else stats
    st.blocks, st.layout = layout.n_blocks, layout.kind
    with span(STAGE):
        plans = {b: submit(_plan_task, ctx, b, n_layers, block=b, name="plan") for b in home}
        counts = {b: client.submit(_request_counts, f, pure=False, key=f"infer-counts-{run}-{b}")
                  for b, f in plans.items()}
        wanted = {b: f.result() for b, f in counts.items()}  # {(layer, other block): rows}, small
        states = {b: submit(_encode_task, ctx, plans[b], block=b, name="encode") for b in home}
        for layer in range(n_layers):
            t0 = time.perf_counter()
            reduced: dict[int, Future] = {}
            rows_moved = 0
            for b in home:
                others = tuple(sorted(c for (k, c), n in wanted[b].items() if k == layer and n > 0))
                fetched = []
                for c in others:
                    req = submit(_request_task, plans[b], layer, c, block=b, name=f"req{layer}-{c}")
                    fetched.append(submit(_take_task, states[c], req, block=c, name=f"take{layer}-{b}"))
                    rows_moved += wanted[b][(layer, c)]
                reduced[b] = submit(_reduce_task, ctx, plans[b], states[b], layer, others, *fetched, block=b,
                                    name=f"layer{layer}")
            done = track(reduced.values(), f"infer {layer + 1}/{n_layers}") if progress else reduced.values()
            for fut in done:  # a layer barrier; only a failed block's error comes back, never the vectors
                if fut.status != "finished":
                    fut.result()
            states = reduced  # the previous layer's vectors and fetched rows are released here
            st.fetched_rows.append(rows_moved)
            st.fetched_bytes.append(rows_moved * 4 * message_width(config, layer))
            st.layer_seconds.append(round(time.perf_counter() - t0, 3))
        written = [submit(_write_task, plans[b], states[b], str(out), block=b, name="write") for b in home]
        n = sum(f.result() for f in written)
    st.seconds = time.perf_counter() - started
    if n != layout.n_items:
        raise RuntimeError(f"infer wrote {n} embeddings for {layout.n_items} items: a block is missing")
    return n


def block_layout(run_dir: str | Path, n_items: int, cfg: InferConfig, n_workers: int) -> tuple[BlockLayout,
                                                                                                 StageOutput | None]:
    """Shards of ``<run>/partition/`` when present (and ``cfg.use_partition``), else ranges of ~block_items."""
    if cfg.use_partition:
        try:
            part = read_stage(run_dir, "partition")
        except StageError:
            part = None
        if part is not None:
            parts = int(part.report.get("parts", 0))
            owner = np.load(part.path / "owner.npy", mmap_mode="r")
            if owner.shape[0] != n_items:
                raise ValueError(f"{part.path}: partition of {owner.shape[0]} items, the graph has {n_items}: "
                                 "re-run `pinsage partition --force`")
            return BlockLayout(n_items=n_items, n_blocks=parts, partition_dir=str(part.path.resolve())), part
    n_blocks = max(n_workers, math.ceil(n_items / cfg.block_items))
    return BlockLayout.ranges(n_items, n_blocks), None


def run_infer(run_dir: str | Path, cfg: InferConfig, client: Client, *, backend: Backend = "cpu",
              force: bool = False, progress: bool = True) -> StageOutput:
    """Run stage ``infer`` in ``run_dir`` (a no-op when its output is current)."""
    ckpt_path = resolve_checkpoint(run_dir, cfg.checkpoint).resolve()
    encoder, ckpt = load_encoder(ckpt_path)  # fails here, in one line, on a corrupt or mismatched checkpoint
    config = ckpt.model_config
    graph = read_stage(run_dir, "graph")
    store = load_graph_store(graph.path)
    walks = read_stage(run_dir, "walks") if config.kind == "pinsage" else None
    n_walk_items = None
    if walks is not None:
        n_walk_items = load_neighborhoods(walks.path).n_items
    check_against_data(config, store, ckpt_path, n_walk_items=n_walk_items)
    layout, part = block_layout(run_dir, store.n_items, cfg, len(client.nthreads()))
    inputs: dict[str, StageOutput | str | Path] = {"graph": graph, "checkpoint": ckpt_path}
    if walks is not None:
        inputs["walks"] = walks
    if part is not None:
        inputs["partition"] = part
    ctx = InferContext(checkpoint=str(ckpt_path), checkpoint_token=file_token(ckpt_path), model_config=config,
                       store=str(graph.path.resolve()), walks=None if walks is None else str(walks.path.resolve()),
                       layout=layout, sample_seed=cfg.sample_seed, device="cuda" if backend == "gpu" else "cpu",
                       torch_threads=cfg.torch_threads)

    def build(tmp: Path) -> dict[str, Any]:
        stats = InferStats()
        n = distributed_embeddings(client, ctx, config, tmp, progress=progress, stats=stats)
        if config.query_head:
            write_query_side(encoder, tmp / EMBEDDINGS_NPY, tmp / QUERY_EMBEDDINGS_NPY)
        write_json_atomic(tmp / "model_config.json", config.to_dict())
        write_json_atomic(tmp / "checkpoint.json", {"path": str(ckpt_path), "epoch": ckpt.epoch, "step": ckpt.step,
                                                    "train_config": ckpt.train_config})
        return {"n_items": n, "embed_dim": config.embed_dim, "kind": config.kind, "n_layers": config.n_layers,
                "blocks": stats.blocks, "layout": stats.layout, "workers": len(client.nthreads()),
                "fetched_rows_per_layer": stats.fetched_rows, "fetched_bytes_per_layer": stats.fetched_bytes,
                "layer_seconds": stats.layer_seconds, "seconds": round(stats.seconds, 3),
                "items_per_s": round(n / stats.seconds) if stats.seconds > 0 else 0, "device": ctx.device}

    return run_stage(run_dir, STAGE, config=cfg, inputs=inputs, build=build, force=force)


def load_embeddings(run_dir: str | Path, *, mmap: bool = True) -> np.ndarray:
    """(n_items, D) float32 embeddings of a finished infer stage (row i = item i), memory-mapped by default."""
    out = read_stage(run_dir, STAGE)
    return np.load(out.path / EMBEDDINGS_NPY, mmap_mode="r" if mmap else None)


def load_model_config(run_dir: str | Path) -> ModelConfig:
    """The model config of the checkpoint a finished infer stage used."""
    out = read_stage(run_dir, STAGE)
    return ModelConfig.from_dict(json.loads((out.path / "model_config.json").read_text()))


def _main(args: argparse.Namespace) -> int:
    toml = settings(args)
    cfg = from_sources(InferConfig, toml=toml, section=STAGE, args=args)
    with cluster_client(cluster_config(args, toml)) as (client, backend):
        print(f"pinsage infer: dashboard {client.dashboard_link}")
        out = run_infer(args.run_dir, cfg, client, backend=backend, force=args.force)
    rep = out.report
    state = "up to date" if out.reused else "done"
    print(f"pinsage infer: {state}: {rep.get('n_items')} items x {rep.get('embed_dim')} ({rep.get('kind')}, "
          f"{rep.get('blocks')} blocks by {rep.get('layout')}, {rep.get('items_per_s')} items/s) -> {out.path}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(STAGE, help="all item embeddings from a checkpoint, layer by layer (map-reduce)",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_arguments(p)
    add_arguments(p, InferConfig)
    p.set_defaults(func=_main)
