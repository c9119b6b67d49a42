"""Layer-wise inference: every item's layer-k vector computed once, from the layer-(k-1) vectors of its neighbours.

The trainer's forward pass (:func:`gnn.trainer.embed_items`) expands a K-hop computation graph per batch, so an
item that several batches reach is recomputed in each. Here the K layers run over *all* items, one layer at a
time, split into blocks of items (the map-reduce of PinSage, Ying et al. 2018, section 3.5):

* map: ``h_0 = encode(ids, rows)`` per block, then the *message* each item sends its neighbours at layer k
  (PinSage: ``ReLU(Q_k h_k + q_k)``; GraphSAGE: ``h_k`` itself), computed once per item per layer;
* join: each item with the messages of its neighbours (own block, plus rows fetched from the blocks that own the
  others: :func:`plan_join` says which);
* reduce: :meth:`Layerwise.combine` (aggregate, dense layer, normalisation) gives ``h_(k+1)``; after layer K the
  dense head :meth:`Layerwise.head`.

Which neighbours an item has at layer k must depend on (item, k) only, or no once-per-layer computation can equal
the forward pass. PinSage neighbourhoods are fixed (top-T by visit count, the same at every layer):
:func:`layer_neighbors_for` gives :class:`WalkLayerNeighbors`, and the reference is the model's own
``build_sampler``. GraphSAGE samples at random per batch; inference uses a *frozen seeded sample*
(:class:`FrozenCoInteraction`): slot s of item i at layer k is the co-interaction draw of the training sampler
(two-step or distinct, ``ModelConfig.sage_neighbors``) with its uniforms taken from a counter-based hash of
(seed, k, i, s) — the same distribution, but a
function of the item. Its reference is ``embed_items`` with :class:`LayerNeighborSampler` over the same table
(:func:`reference_sampler`). Pure PyTorch / numpy; ``pipeline/infer.py`` runs the blocks on Dask.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from gnn.graphstore import GraphStore
from gnn.layers import PinSageConv, SAGEConv
from gnn.models import ItemEncoder, ModelConfig, build_sampler, sage_neighbors_for
from gnn.sampler import (
    CoInteractionNeighbors,
    NeighborhoodsLike,
    RowSource,
    Sampler,
    UniformNeighbors,
    WalkNeighbors,
    _BlockSampler,
    _uniform_pick,
)

logger = logging.getLogger(__name__)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


class LayerNeighbors(Protocol):
    """``(layer, item_ids (n,)) -> (ids (n, S_layer) int64, -1 padded; weights (n, S_layer) float32, 0 padded)``;
    layer 0 is the convolution next to the inputs. ``layer_independent``: every layer gets the same table."""

    layer_independent: bool

    def __call__(self, layer: int, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class WalkLayerNeighbors:
    """PinSage: the top-``n_neighbors`` random-walk neighbours with their visit counts, at every layer."""

    layer_independent = True

    def __init__(self, neighborhoods: NeighborhoodsLike, *, n_neighbors: int) -> None:
        self.walk = WalkNeighbors(neighborhoods, n_neighbors=n_neighbors)

    def __call__(self, layer: int, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.walk(item_ids)

    def __repr__(self) -> str:
        return f"WalkLayerNeighbors({self.walk!r})"


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def counter_uniforms(seed: int, layer: int, item_ids: np.ndarray, slots: int, stream: int) -> np.ndarray:
    """(n, slots) float64 uniforms in [0, 1), a pure function of (seed, layer, item, slot, stream)."""
    ids = np.asarray(item_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _mix64(np.array(np.uint64(seed) * _GOLD + np.uint64(layer) * _M1 + np.uint64(stream) * _M2))
        z = key + ids[:, None] * np.uint64(0x100000000) + np.arange(slots, dtype=np.uint64)[None, :]
        z = _mix64(_mix64(z) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


class FrozenCoInteraction:
    """GraphSAGE neighbours frozen for inference: ``fanouts[layer]`` draws per item and layer, as the training
    sampler draws them — i → u → j for :class:`gnn.sampler.CoInteractionNeighbors`, one uniform pick of a CSR row
    for :class:`gnn.sampler.UniformNeighbors` (e.g. ``DistinctCoInteractionNeighbors``) — with the uniforms of slot
    s of item i at layer k taken from :func:`counter_uniforms` (seed, k, i, s). Any block of items, on any worker,
    sees the same sample.

    Shapes: ``__call__(layer, ids (n,)) -> (ids (n, fanouts[layer]) int64, -1 padded; weights in {0, 1})``.
    """

    layer_independent = False

    def __init__(self, neighbors: CoInteractionNeighbors | UniformNeighbors, *, fanouts: tuple[int, ...],
                 seed: int = 0) -> None:
        if not fanouts or min(fanouts) < 1:
            raise ValueError(f"fanouts={fanouts}: need one positive sample size per layer, e.g. (25, 10)")
        self.neighbors, self.fanouts, self.seed = neighbors, tuple(int(f) for f in fanouts), int(seed)

    def __call__(self, layer: int, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(item_ids, dtype=np.int64)
        fanout = self.fanouts[layer]
        flat = np.repeat(ids, fanout)
        r_user = counter_uniforms(self.seed, layer, ids, fanout, 0).ravel()
        if isinstance(self.neighbors, UniformNeighbors):  # one draw from the item's own CSR row
            nbr = _uniform_pick(self.neighbors.indptr, self.neighbors.indices, flat, r_user).reshape(-1, fanout)
            return nbr, (nbr >= 0).astype(np.float32)
        r_item = counter_uniforms(self.seed, layer, ids, fanout, 1).ravel()
        users = _uniform_pick(*self.neighbors.item_users, flat, r_user)
        items = _uniform_pick(*self.neighbors.user_items, np.maximum(users, 0), r_item)
        nbr = np.where(users >= 0, items, -1).reshape(-1, fanout)
        return nbr, (nbr >= 0).astype(np.float32)

    def __repr__(self) -> str:
        return f"FrozenCoInteraction(fanouts={self.fanouts}, seed={self.seed}, neighbors={self.neighbors!r})"


def layer_neighbors_for(config: ModelConfig, *, neighborhoods: NeighborhoodsLike | None = None,
                        store: GraphStore | None = None, seed: int = 0) -> WalkLayerNeighbors | FrozenCoInteraction:
    """The neighbour table inference uses for ``config``: walk neighbourhoods (PinSage) or the frozen seeded
    co-interaction sample of ``store`` (GraphSAGE, ``seed``)."""
    if config.kind == "pinsage":
        if neighborhoods is None:
            raise ValueError("neighborhoods: a PinSage model needs the walk neighbourhoods (gnn.walks.Neighborhoods)")
        return WalkLayerNeighbors(neighborhoods, n_neighbors=config.n_neighbors)
    return FrozenCoInteraction(sage_neighbors_for(config, store), fanouts=config.fanouts, seed=seed)


class LayerNeighborSampler(_BlockSampler):
    """A computation-graph sampler over a :class:`LayerNeighbors` table: hop h of a K-layer graph feeds layer
    K-1-h, so it reads that layer's neighbours; ``rng`` is not used. With it, ``embed_items`` computes what
    layer-wise inference computes (the reference of the tests)."""

    def __init__(self, *, neighbors: LayerNeighbors, rows: RowSource, n_layers: int) -> None:
        super().__init__(rows=rows, n_layers=n_layers)
        self.neighbors = neighbors

    def _neighbors(self, hop: int, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.neighbors(self.n_layers - 1 - hop, ids)

    def __repr__(self) -> str:
        return f"LayerNeighborSampler(n_layers={self.n_layers}, neighbors={self.neighbors!r})"


def reference_sampler(config: ModelConfig, *, rows: RowSource, neighborhoods: NeighborhoodsLike | None = None,
                      store: GraphStore | None = None, seed: int = 0) -> Sampler:
    """The sampler whose ``embed_items`` layer-wise inference equals: the model's own PinSage sampler, or for
    GraphSAGE the frozen seeded sample (see the module docstring)."""
    if config.kind == "pinsage":
        return build_sampler(config, rows=rows, neighborhoods=neighborhoods)
    table = layer_neighbors_for(config, store=store, seed=seed)
    return LayerNeighborSampler(neighbors=table, rows=rows, n_layers=config.n_layers)


def fixed_width_mean(messages: torch.Tensor, nbr_index: torch.Tensor, nbr_weight: torch.Tensor) -> torch.Tensor:
    """:func:`gnn.layers.weighted_mean` for rows of exactly S slots, as one CSR (n, M) x dense (M, d) product.

    The rows are already in order with S entries each, so the CSR row pointers are ``0, S, 2S, ...`` and no sort
    is needed (the COO form of ``weighted_mean`` coalesces first): about 2-3x faster on CPU, same values within
    float32 rounding. Shapes: ``messages (M, d)``, ``nbr_index (n, S)``, ``nbr_weight (n, S)`` -> ``(n, d)``.
    """
    n, s = nbr_index.shape
    total = nbr_weight.sum(dim=1, keepdim=True)  # (n, 1)
    total = torch.where(total > 0, total, torch.ones_like(total))  # rows without neighbours: 0 / 1
    crow = torch.arange(0, n * s + 1, s, device=nbr_index.device, dtype=torch.int64)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long-standing
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        adjacency = torch.sparse_csr_tensor(crow, nbr_index.reshape(-1).to(torch.int64),
                                            (nbr_weight / total).reshape(-1).to(messages.dtype),
                                            (n, messages.shape[0]), check_invariants=False)
    return adjacency @ messages


def _dense_on_pair(linear: nn.Linear, left: torch.Tensor, right: torch.Tensor, *, relu: bool,
                   normalize: bool) -> torch.Tensor:
    """``linear([left ; right])`` as two products into one buffer (no (n, 2d) concatenation), then ReLU and L2
    normalisation in place: what the layers compute, with fewer passes over memory (inference only, no autograd).
    Shapes: ``left (n, a)``, ``right (n, b)``, ``linear: a + b -> c`` -> ``(n, c)``."""
    a = left.shape[1]
    w = linear.weight  # (c, a + b)
    z = torch.addmm(linear.bias, left, w[:, :a].t()) if linear.bias is not None else left @ w[:, :a].t()
    z.addmm_(right, w[:, a:].t())
    if relu:
        z.relu_()
    return _l2_normalize_(z) if normalize else z


def _l2_normalize_(z: torch.Tensor) -> torch.Tensor:
    """:func:`gnn.layers.l2_normalize` (eps 1e-12) in place."""
    return z.mul_(torch.rsqrt(z.square().sum(dim=1, keepdim=True).clamp_min(1e-24)))


class Layerwise:
    """The pieces of an :class:`gnn.models.ItemEncoder` run one layer at a time (eval mode, no autograd).

    Shapes: ``encode(ids (n,), rows (n, F)) -> (n, input_dim)``; ``message(k, h (n, d_k)) -> (n, m_k)``;
    ``combine(k, h_self (n, d_k), messages (M, m_k), nbr_index (n, S) rows of messages, nbr_weight (n, S))
    -> (n, hidden_dim)``; ``head(h (n, hidden_dim)) -> (n, embed_dim)``.
    """

    def __init__(self, model: nn.Module) -> None:
        encoder = getattr(model, "module", model)  # a DDP wrapper keeps the model in .module
        if not isinstance(encoder, ItemEncoder):
            raise TypeError(f"model: {type(encoder).__name__} is not a gnn.models.ItemEncoder")
        self.model = encoder.eval()
        self.convs = list(encoder.convs)

    @property
    def n_layers(self) -> int:
        return len(self.convs)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def to(self, device: torch.device | str) -> Layerwise:
        self.model.to(device)
        return self

    def encode(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.input(ids, rows)

    def message(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """What an item sends its neighbours at ``layer``: computed once per item (PinSage applies Q here)."""
        conv = self.convs[layer]
        if isinstance(conv, PinSageConv):
            return torch.relu(conv.neighbor(h))
        return h

    def message_dim(self, layer: int) -> int:
        conv = self.convs[layer]
        if isinstance(conv, PinSageConv | SAGEConv):
            return conv.hidden_dim if isinstance(conv, PinSageConv) else conv.in_dim
        raise TypeError(f"layer {layer}: {type(conv).__name__} has no layer-wise form")

    def combine(self, layer: int, h_self: torch.Tensor, messages: torch.Tensor, nbr_index: torch.Tensor,
                nbr_weight: torch.Tensor) -> torch.Tensor:
        """Aggregate the neighbours' messages and apply the layer's dense part (``conv.forward`` after Q)."""
        conv = self.convs[layer]
        if isinstance(conv, PinSageConv):
            weight = nbr_weight if conv.pooling == "importance" else (nbr_weight > 0).to(nbr_weight.dtype)
            agg = fixed_width_mean(messages, nbr_index, weight)  # (n, hidden)
            return _dense_on_pair(conv.combine, h_self, agg, relu=True, normalize=conv.normalize)
        if not isinstance(conv, SAGEConv):
            raise TypeError(f"layer {layer}: {type(conv).__name__} has no layer-wise form")
        agg = fixed_width_mean(messages, nbr_index, (nbr_weight > 0).to(messages.dtype))  # (n, in)
        return _dense_on_pair(conv.linear, h_self, agg, relu=conv.activation, normalize=conv.normalize)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        z = self.model.g2(self.model.g1(h).relu_())
        return _l2_normalize_(z) if self.config.normalize_output else z


@dataclass(frozen=True)
class JoinPlan:
    """How a block reads its neighbours' messages: rows of ``[own messages ; fetched rows of block c1 ; ...]``.

    Shapes: ``nbr_index (n, S)`` int64 rows of that table (padding -> 0, with weight 0); ``nbr_weight (n, S)``
    float32; ``requests``: for each other block c (ascending), the sorted distinct positions within c to fetch.
    """

    nbr_index: np.ndarray
    nbr_weight: np.ndarray
    requests: dict[int, np.ndarray]

    @property
    def n_fetched(self) -> int:
        return int(sum(r.shape[0] for r in self.requests.values()))


def plan_join(block: int, n_own: int, nbr: np.ndarray, weight: np.ndarray, owner: np.ndarray,
              position: np.ndarray) -> JoinPlan:
    """Where each neighbour's message will be found when block ``block`` (``n_own`` items) reduces.

    Args:
        block: this block's number.
        n_own: items in this block (own messages are the first ``n_own`` rows of the table).
        nbr: (n, S) neighbour ids, -1 = none; weight: (n, S).
        owner: (n, S) block owning each neighbour (ignored at padding).
        position: (n, S) each neighbour's row within its owner block.
    """
    valid = nbr >= 0
    index = np.zeros(nbr.shape, np.int64)
    own = valid & (owner == block)
    index[own] = position[own]
    remote = valid & ~own
    # one sort of the remote entries by (owner block, row): the distinct keys in order are exactly the fetched
    # rows in table order (blocks ascending, rows ascending within a block), so a key's rank is its table row
    stride = int(position[remote].max()) + 1 if remote.any() else 1
    keys, rank = np.unique(owner[remote].astype(np.int64) * stride + position[remote], return_inverse=True)
    index[remote] = n_own + rank.ravel()
    blocks, first = np.unique(keys // stride, return_index=True)
    rows = np.split(keys % stride, first[1:]) if keys.size else []
    requests = {int(c): r.astype(np.int64) for c, r in zip(blocks.tolist(), rows, strict=True)}
    return JoinPlan(index, np.where(valid, weight, 0).astype(np.float32), requests)


def message_table(own: torch.Tensor, fetched: dict[int, torch.Tensor]) -> torch.Tensor:
    """``[own ; fetched[c] for c ascending]``, the table a :class:`JoinPlan` indexes."""
    return torch.cat([own, *(fetched[c] for c in sorted(fetched))]) if fetched else own


@torch.no_grad()
def layerwise_embeddings(model: nn.Module, rows: RowSource, neighbors: LayerNeighbors, n_items: int, *,
                         block_items: int = 65536,
                         on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """All ``n_items`` embeddings in one process, layer by layer in blocks of ``block_items`` (default 65536).

    Each block's messages are joined straight from the whole previous-layer table (the one-process join);
    ``on_layer(k)`` is called after layer k. Shapes: ``-> (n_items, embed_dim)``.
    """
    if block_items < 1:
        raise ValueError(f"block_items={block_items}: must be at least 1")
    lw = Layerwise(model)
    bounds = [*range(0, n_items, block_items), n_items]
    spans = list(itertools.pairwise(bounds))
    h = torch.cat([lw.encode(torch.arange(lo, hi), rows(np.arange(lo, hi))) for lo, hi in spans]) \
        if n_items else torch.zeros(0, lw.config.input_dim)
    for layer in range(lw.n_layers):
        msg = lw.message(layer, h)  # (n_items, m): once per item
        out = []
        for lo, hi in spans:
            nbr, w = neighbors(layer, np.arange(lo, hi))
            index = torch.from_numpy(np.where(nbr >= 0, nbr, 0))
            weight = torch.from_numpy(np.where(nbr >= 0, w, 0).astype(np.float32))
            out.append(lw.combine(layer, h[lo:hi], msg, index, weight))
        h = torch.cat(out) if out else torch.zeros(0, lw.config.hidden_dim)
        if on_layer is not None:
            on_layer(layer)
    return lw.head(h)
