"""Item encoders: K graph convolutions over a sampled :class:`gnn.sampler.Subgraph`, then a final dense layer.

``PinSage`` convolves over random-walk neighbourhoods (importance or mean pooling); ``GraphSAGE`` (the baseline)
over uniformly sampled co-interaction neighbours. Only items are embedded. All settings live in the frozen
:class:`ModelConfig`, which checkpoints carry so that a model can be rebuilt with :func:`build_model`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from gnn.features import N_COUNT_FEATURES, ItemInputEncoder, hash_ids
from gnn.graphstore import GraphStore
from gnn.layers import PinSageConv, Pooling, SAGEConv, l2_normalize
from gnn.sampler import (
    CoInteractionNeighbors,
    DistinctCoInteractionNeighbors,
    GraphSageSampler,
    NeighborhoodsLike,
    PinSageSampler,
    RowSource,
    Subgraph,
    WalkNeighbors,
)

logger = logging.getLogger(__name__)

ModelKind = Literal["pinsage", "graphsage"]
SageNeighbors = Literal["two_step", "distinct"]


@dataclass(frozen=True)
class ModelConfig:
    """Settings of an item encoder (saved in every checkpoint).

    Fields (defaults): ``kind`` "pinsage" | "graphsage" ("pinsage"); ``pooling`` "importance" | "mean"
    ("importance", PinSage only; measured over paired seeds in results/quality_pooling.json, with 95 % intervals
    of the mean difference: importance leads mean only when nothing else tells items apart, i.e. no id rows
    (``id_buckets=0``) and no content on the generated data (test hit@10 +0.022, interval [+0.010, +0.034], 5
    seeds); with id rows, or with content vectors that differ per item, the intervals span 0 on every figure (4-7
    seeds per setting, neighbours ranked by visits; on Amazon with id rows importance is ahead by about 0.001,
    above 0 for valid MRR only); on Amazon without id rows the item features carry too little for either to
    learn);
    ``n_layers`` K (2); ``n_neighbors`` T, PinSage neighbours per item (10);
    ``fanouts`` GraphSAGE (S_1, ..., S_K) ((25, 10)); ``sage_neighbors`` how GraphSAGE draws an item's
    co-interaction neighbours ("two_step"): "two_step" by one walk item -> user -> item
    (:class:`gnn.sampler.CoInteractionNeighbors`, never builds the item-item graph, so it scales; it favours
    items that share many users, much as visit counts do), "distinct" uniformly over the distinct items that share
    a user (:class:`gnn.sampler.DistinctCoInteractionNeighbors`, Hamilton et al.'s uniform sampler on the simple
    graph; builds that graph, sum of squared user degrees in memory; on Amazon with id rows it trails the two-step
    draw by 0.0025 test hit@10 over 7 seeds, results/quality_pooling.json ``amazon_ids_e10``);
    ``input_dim`` width of the input encoder (64);
    ``hidden_dim`` width of every convolution (128); ``embed_dim`` output width (64); ``n_categories`` (1);
    ``category_dim`` (16); ``id_buckets`` hashed item-id rows, 0 = none (65536); ``id_dim`` (64);
    ``n_numeric`` (4); ``content_dim`` (0); ``normalize_output`` L2-normalise embeddings (True);
    ``query_head`` a separate linear map for the query side of a pair, outside the item encoder (True):
    next-item relations are directional, so a query item is scored as ``queries(z_q) · z_p``;
    ``query_hidden`` width of a residual ReLU layer added to the linear query head, 0 = linear only (0):
    ``queries(z) = A z + b + W₂ ReLU(W₁ z + b₁)`` with W₂ starting at zero, so the head starts as the identity;
    ``query_id_buckets`` rows of a hashed per-item query offset added to the head, 0 = none (0): the query of
    item i becomes ``A z_i + b + e[hash(i)]`` (rows start at zero), a free vector per query item that can hold
    an item's own successor (a planted "next item"), which a shared map of z cannot; it needs the query items'
    ids (``queries(z, ids)``); ``id_dropout`` share of the input layer's rows whose id vector is zeroed in
    training (0): the model must then also place an item from its features and its neighbours' vectors (measured
    at 0.5 on generated data, results/quality_pooling.json ``iddrop05_t10``: every model loses ~0.09 hit@10 in 8
    epochs and importance pooling does not pull ahead of mean pooling).
    """

    kind: ModelKind = "pinsage"
    pooling: Pooling = "importance"
    n_layers: int = 2
    n_neighbors: int = 10
    fanouts: tuple[int, ...] = (25, 10)
    sage_neighbors: SageNeighbors = "two_step"
    input_dim: int = 64
    hidden_dim: int = 128
    embed_dim: int = 64
    n_categories: int = 1
    category_dim: int = 16
    id_buckets: int = 65536
    id_dim: int = 64
    n_numeric: int = N_COUNT_FEATURES
    content_dim: int = 0
    normalize_output: bool = True
    query_head: bool = True
    query_hidden: int = 0
    query_id_buckets: int = 0
    id_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("pinsage", "graphsage"):
            raise ValueError(f"ModelConfig.kind={self.kind!r}: use 'pinsage' or 'graphsage'")
        if self.pooling not in ("importance", "mean"):
            raise ValueError(f"ModelConfig.pooling={self.pooling!r}: use 'importance' or 'mean'")
        if self.sage_neighbors not in ("two_step", "distinct"):
            raise ValueError(f"ModelConfig.sage_neighbors={self.sage_neighbors!r}: use 'two_step' or 'distinct'")
        object.__setattr__(self, "fanouts", tuple(int(f) for f in self.fanouts))
        if self.kind == "graphsage" and len(self.fanouts) != self.n_layers:
            raise ValueError(f"ModelConfig.fanouts={self.fanouts}: give one sample size per layer "
                             f"(n_layers={self.n_layers})")
        for name in ("n_layers", "n_neighbors", "input_dim", "hidden_dim", "embed_dim", "n_categories"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)}: must be at least 1")
        if self.id_buckets < 0 or self.content_dim < 0 or self.n_numeric < 0 or self.query_hidden < 0:
            raise ValueError("ModelConfig.id_buckets, content_dim, n_numeric and query_hidden must be non-negative")
        if self.query_hidden and not self.query_head:
            raise ValueError(f"ModelConfig.query_hidden={self.query_hidden}: needs query_head=True (or set it to 0)")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"ModelConfig.id_dropout={self.id_dropout}: give a probability in [0, 1)")
        if self.query_id_buckets < 0 or (self.query_id_buckets and not self.query_head):
            raise ValueError(f"ModelConfig.query_id_buckets={self.query_id_buckets}: pass 0 (none) or a positive "
                             "number of rows with query_head=True")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        # Checkpoints written before the query head existed have none.
        return cls(**{"query_head": False, **values})


class ItemEncoder(nn.Module):
    """Input encoder -> K convolutions -> G2 · ReLU(G1 · h + g1) + g2 (Ying et al. 2018, Algorithm 2).

    Shapes: ``forward(subgraph) -> (N_0, embed_dim)``, one row per target ``subgraph.node_ids[0]``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input = ItemInputEncoder(n_categories=config.n_categories, category_dim=config.category_dim,
                                      id_buckets=config.id_buckets, id_dim=config.id_dim,
                                      n_numeric=config.n_numeric, content_dim=config.content_dim,
                                      out_dim=config.input_dim, id_dropout=config.id_dropout)
        convs: list[nn.Module] = []
        for layer in range(config.n_layers):
            in_dim = config.input_dim if layer == 0 else config.hidden_dim
            if config.kind == "pinsage":
                convs.append(PinSageConv(in_dim, config.hidden_dim, config.hidden_dim, pooling=config.pooling))
            else:
                convs.append(SAGEConv(in_dim, config.hidden_dim))
        self.convs = nn.ModuleList(convs)
        self.g1 = nn.Linear(config.hidden_dim, config.hidden_dim)
        self.g2 = nn.Linear(config.hidden_dim, config.embed_dim)
        # Query side (not part of the item embedding, so inference stays layer by layer): starts as the identity.
        self.query_proj = nn.Linear(config.embed_dim, config.embed_dim) if config.query_head else None
        # Optional residual ReLU layer of the head: W₂ ReLU(W₁ z + b₁) + b₂ (query_hidden > 0).
        self.query_hidden = nn.Linear(config.embed_dim, config.query_hidden) if config.query_hidden else None
        self.query_out = nn.Linear(config.query_hidden, config.embed_dim) if config.query_hidden else None
        # Optional hashed per-item query offset (query_id_buckets > 0), rows starting at zero.
        self.query_id = nn.Embedding(config.query_id_buckets, config.embed_dim) if config.query_id_buckets else None
        self._reset_query_head()

    def reset_parameters(self) -> None:
        self.input.reset_parameters()
        for conv in self.convs:
            conv.reset_parameters()  # type: ignore[operator]
        self.g1.reset_parameters()
        self.g2.reset_parameters()
        self._reset_query_head()

    def _reset_query_head(self) -> None:
        if self.query_proj is not None:
            nn.init.eye_(self.query_proj.weight)
            nn.init.zeros_(self.query_proj.bias)
        if self.query_hidden is not None and self.query_out is not None:
            self.query_hidden.reset_parameters()
            nn.init.zeros_(self.query_out.weight)  # the residual branch starts silent: the head is the identity
            nn.init.zeros_(self.query_out.bias)
        if self.query_id is not None:
            nn.init.zeros_(self.query_id.weight)

    def queries(self, z: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Query vectors of item embeddings ``z`` (N, D) -> (N, D): the query head when configured (then
        re-normalised like the embeddings), else ``z`` unchanged. ``ids`` (N,) int64: the items of the rows of
        ``z``, needed by a head with per-item offsets (``query_id_buckets``), ignored otherwise."""
        if self.query_proj is None:
            return z
        q = self.query_proj(z)
        if self.query_hidden is not None and self.query_out is not None:
            q = q + self.query_out(torch.relu(self.query_hidden(z)))  # (N, D)
        if self.query_id is not None:
            if ids is None or ids.shape != z.shape[:1]:
                raise ValueError(f"ids={None if ids is None else tuple(ids.shape)}: a query head with "
                                 f"query_id_buckets={self.config.query_id_buckets} needs the item id of each of "
                                 f"the {z.shape[0]} rows")
            q = q + self.query_id(hash_ids(ids.to(z.device), self.config.query_id_buckets))  # (N, D)
        return l2_normalize(q) if self.config.normalize_output else q

    def forward(self, subgraph: Subgraph) -> torch.Tensor:
        k = len(self.convs)
        if subgraph.n_layers != k:
            raise ValueError(f"subgraph has {subgraph.n_layers} hops, the model {k} layers; "
                             "build the sampler with the model's n_layers / fanouts")
        h = self.input(subgraph.node_ids[k], subgraph.rows)  # (N_K, input_dim)
        for layer, conv in enumerate(self.convs):
            block = subgraph.blocks[k - 1 - layer]  # the hop furthest from the targets first
            h = conv(h, block.nbr_index, block.nbr_weight)  # (N_{k-1-layer}, hidden)
        z = self.g2(torch.relu(self.g1(h)))  # (N_0, embed_dim)
        return l2_normalize(z) if self.config.normalize_output else z

    def __repr__(self) -> str:
        c = self.config
        return (f"ItemEncoder(kind={c.kind!r}, pooling={c.pooling!r}, n_layers={c.n_layers}, "
                f"input_dim={c.input_dim}, hidden_dim={c.hidden_dim}, embed_dim={c.embed_dim})")


def build_model(config: ModelConfig, *, seed: int | None = None) -> ItemEncoder:
    """A fresh encoder; with ``seed`` its initial weights depend only on the seed."""
    if seed is None:
        return ItemEncoder(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ItemEncoder(config)


def build_sampler(config: ModelConfig, *, rows: RowSource, neighborhoods: NeighborhoodsLike | None = None,
                  store: GraphStore | None = None) -> PinSageSampler | GraphSageSampler:
    """The sampler that fits ``config``: PinSage over ``neighborhoods`` (top ``n_neighbors``), GraphSAGE over the
    co-interaction graph of ``store`` (``fanouts``). ``rows`` is the row source (local table or remote cache)."""
    if config.kind == "pinsage":
        if neighborhoods is None:
            raise ValueError("neighborhoods: a PinSage model needs the walk neighbourhoods (gnn.walks.Neighborhoods)")
        return PinSageSampler(neighbors=WalkNeighbors(neighborhoods, n_neighbors=config.n_neighbors), rows=rows,
                              n_layers=config.n_layers)
    return GraphSageSampler(neighbors=sage_neighbors_for(config, store), rows=rows, fanouts=config.fanouts)


def sage_neighbors_for(config: ModelConfig,
                       store: GraphStore | None) -> CoInteractionNeighbors | DistinctCoInteractionNeighbors:
    """GraphSAGE's neighbour sampler over the co-interaction graph of ``store``, as ``config.sage_neighbors``
    says (the training samplers and inference share it)."""
    if store is None:
        raise ValueError("store: a GraphSAGE model samples the co-interaction graph; pass the GraphStore")
    if config.sage_neighbors == "distinct":
        return DistinctCoInteractionNeighbors.from_graph_store(store)
    return CoInteractionNeighbors.from_graph_store(store)
