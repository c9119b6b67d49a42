"""Minibatch computation graphs: which nodes a batch touches at every hop, and their input rows.

A sampler turns the target items of a batch into a :class:`Subgraph`:

* ``node_ids[0]`` = the targets, ``node_ids[h+1]`` = ``node_ids[h]`` followed by their not-yet-seen neighbours
  (each node once: deduplicated with a mapping, so ``node_ids[h]`` is a prefix of ``node_ids[h+1]``);
* ``blocks[h]`` connects the destinations ``node_ids[h]`` with the sources ``node_ids[h+1]``: positions of each
  destination's neighbours among the sources (``nbr_index``) and their weights (``nbr_weight``, 0 = padding);
* ``rows`` = the input features of ``node_ids[K]`` (the only rows a forward pass reads).

**The seam for remote vertices.** Samplers never read the graph or the features directly; they call two injected
functions, and this is where the distributed trainer puts its remote-row cache / fetcher:

* ``rows(item_ids: np.ndarray (n,) int64) -> torch.Tensor (n, F)`` — input rows (:class:`RowSource`);
* PinSage: ``neighbors(item_ids) -> (ids (n, T) int64 (-1 = none), weights (n, T) float32)``
  (:class:`NeighborSource`, e.g. :class:`WalkNeighbors` over the walks engineer's ``Neighborhoods``);
* GraphSAGE: ``sample(item_ids, fanout, rng) -> (ids (n, S), weights (n, S))`` (:class:`NeighborSampler`,
  e.g. :class:`CoInteractionNeighbors`, :class:`DistinctCoInteractionNeighbors` or :class:`UniformNeighbors`).

All sampling is vectorised numpy or a GIL-free numba kernel (no per-node Python loop) and draws only from the
``rng`` it is handed, so a batch is a pure function of its seed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numba
import numpy as np
import torch

logger = logging.getLogger(__name__)


@runtime_checkable
class NeighborhoodsLike(Protocol):
    """What :class:`WalkNeighbors` needs from ``gnn.walks.Neighborhoods`` (random-walk neighbourhoods).

    Shapes: ``indptr (n_items+1,) int64``; ``indices (nnz,) int64`` top-T neighbours by visit count, descending;
    ``weights (nnz,) float32`` raw visit counts; ``item_importance (n_items,)``; ``user_importance (n_users,)``;
    ``hard_negatives (n_items, H) int64``, -1 padded.
    """

    # read-only members: a frozen dataclass (``Neighborhoods``) and a published snapshot both satisfy them
    @property
    def indptr(self) -> np.ndarray: ...
    @property
    def indices(self) -> np.ndarray: ...
    @property
    def weights(self) -> np.ndarray: ...
    @property
    def item_importance(self) -> np.ndarray: ...
    @property
    def user_importance(self) -> np.ndarray: ...
    @property
    def hard_negatives(self) -> np.ndarray: ...


class RowSource(Protocol):
    def __call__(self, item_ids: np.ndarray) -> torch.Tensor: ...


class NeighborSource(Protocol):
    def __call__(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class NeighborSampler(Protocol):
    def __call__(self, item_ids: np.ndarray, fanout: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ...


def _padded_rows(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, ids: np.ndarray,
                 width: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``width`` entries of CSR rows ``ids``: (n, width) ids (-1 padded) and weights (0 padded)."""
    start = np.asarray(indptr[ids], dtype=np.int64)
    count = np.minimum(np.asarray(indptr[ids + 1], dtype=np.int64) - start, width)
    slot = np.arange(width, dtype=np.int64)
    valid = slot[None, :] < count[:, None]  # (n, width)
    pos = np.where(valid, start[:, None] + slot[None, :], 0)
    if indices.shape[0] == 0:
        return np.full(valid.shape, -1, np.int64), np.zeros(valid.shape, np.float32)
    nbr = np.where(valid, np.asarray(indices[pos.ravel()]).reshape(valid.shape), -1).astype(np.int64)
    w = np.where(valid, np.asarray(weights[pos.ravel()]).reshape(valid.shape), 0).astype(np.float32)
    return nbr, w


class WalkNeighbors:
    """PinSage neighbour source: the top-``n_neighbors`` items of each item's random-walk neighbourhood.

    Args:
        neighborhoods: a ``gnn.walks.Neighborhoods`` (anything :class:`NeighborhoodsLike`).
        n_neighbors: T, neighbours kept per item (default: the longest row).

    Shapes: ``__call__(item_ids (n,)) -> (ids (n, T) int64, -1 padded; visit counts (n, T) float32, 0 padded)``.
    """

    def __init__(self, neighborhoods: NeighborhoodsLike, *, n_neighbors: int | None = None) -> None:
        self.indptr = np.asarray(neighborhoods.indptr, dtype=np.int64)
        self.indices = np.asarray(neighborhoods.indices, dtype=np.int64)
        self.weights = np.asarray(neighborhoods.weights, dtype=np.float32)
        longest = int(np.diff(self.indptr).max()) if self.indptr.shape[0] > 1 else 0
        self.n_neighbors = longest if n_neighbors is None else int(n_neighbors)
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors={self.n_neighbors}: need at least 1 (the neighbourhoods are empty?)")

    def __call__(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _padded_rows(self.indptr, self.indices, self.weights, np.asarray(item_ids, np.int64),
                            self.n_neighbors)

    def __repr__(self) -> str:
        return f"WalkNeighbors(n_items={self.indptr.shape[0] - 1}, n_neighbors={self.n_neighbors})"


@numba.njit(nogil=True, cache=True)
def _pick_kernel(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray,
                 r: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    out = np.empty(rows.shape[0], np.int64)
    for i in range(rows.shape[0]):
        start = indptr[rows[i]]
        deg = indptr[rows[i] + 1] - start
        out[i] = indices[start + min(np.int64(r[i] * deg), deg - 1)] if deg > 0 else -1
    return out


def _uniform_pick(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, r: np.ndarray) -> np.ndarray:
    """For each (row, uniform r in [0,1)) an entry of that CSR row chosen uniformly; -1 where the row is empty.

    A numba kernel without the GIL; the uniforms come from the caller's numpy generator, so the draw is a
    function of the seed alone.
    """
    return _pick_kernel(np.asarray(indptr), np.asarray(indices), np.asarray(rows, np.int64), r)


class UniformNeighbors:
    """GraphSAGE neighbour sampler on a homogeneous CSR graph: ``fanout`` neighbours drawn uniformly with
    replacement (Hamilton et al. 2017); isolated nodes get only padding.

    Shapes: ``__call__(ids (n,), fanout, rng) -> (ids (n, fanout) int64, weights (n, fanout) float32 in {0, 1})``.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray) -> None:
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)

    def __call__(self, item_ids: np.ndarray, fanout: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids = np.repeat(np.asarray(item_ids, np.int64), fanout)
        nbr = _uniform_pick(self.indptr, self.indices, ids, rng.random(ids.shape[0])).reshape(-1, fanout)
        return nbr, (nbr >= 0).astype(np.float32)

    def __repr__(self) -> str:
        return f"UniformNeighbors(n_nodes={self.indptr.shape[0] - 1}, n_edges={self.indices.shape[0]})"


class CoInteractionNeighbors:
    """GraphSAGE neighbours of items in the item-item co-interaction graph, without building that graph.

    A neighbour of item i is drawn by one two-step walk i → u → j: u uniform among i's interactions (item_users
    row), j uniform among u's interactions (user_items row). This is the random-walk transition
    P(j | i) = Σ_u 1 / (deg(i) · deg(u)): a uniform draw from i's co-interaction multiset {(u, j)} weighted by
    1/deg(u) — exactly uniform over the multiset when the users' degrees are equal, and it favours items that
    share the less active users. j may be i itself (u also interacted with i); the concat with the node's own vector
    makes that harmless. Users are only traversed, never embedded. Draws with replacement.

    Shapes: ``__call__(ids (n,), fanout, rng) -> (ids (n, fanout) int64, -1 padded; weights (n, fanout) in {0, 1})``.
    """

    def __init__(self, *, item_users_indptr: np.ndarray, item_users_indices: np.ndarray,
                 user_items_indptr: np.ndarray, user_items_indices: np.ndarray) -> None:
        self.item_users = (item_users_indptr, item_users_indices)
        self.user_items = (user_items_indptr, user_items_indices)

    @classmethod
    def from_graph_store(cls, store: object) -> CoInteractionNeighbors:
        """From a ``gnn.graphstore.GraphStore`` (its memory-mapped arrays are read in place)."""
        iu, ui = store.item_users, store.user_items  # type: ignore[attr-defined]
        return cls(item_users_indptr=iu.indptr, item_users_indices=iu.indices,
                   user_items_indptr=ui.indptr, user_items_indices=ui.indices)

    def __call__(self, item_ids: np.ndarray, fanout: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids = np.repeat(np.asarray(item_ids, np.int64), fanout)
        r = rng.random((2, ids.shape[0]))
        users = _uniform_pick(*self.item_users, ids, r[0])
        items = _uniform_pick(*self.user_items, np.maximum(users, 0), r[1])
        nbr = np.where(users >= 0, items, -1).reshape(-1, fanout)
        return nbr, (nbr >= 0).astype(np.float32)

    def __repr__(self) -> str:
        return (f"CoInteractionNeighbors(n_items={self.item_users[0].shape[0] - 1}, "
                f"n_users={self.user_items[0].shape[0] - 1})")


class CoInteractionGraphTooLarge(ValueError):
    """The simple co-interaction graph would hold more user-item-item triples than the given limit."""


def co_interaction_graph(*, user_items_indptr: np.ndarray, user_items_indices: np.ndarray, n_items: int,
                         max_pairs: int = 200_000_000) -> tuple[np.ndarray, np.ndarray]:
    """The item-item co-interaction graph as a simple graph: CSR ``(indptr (n_items + 1,), indices (E,))`` where
    ``indices[indptr[i]:indptr[j]]`` are the distinct items j != i that share at least one user with item i,
    ascending. Repeated interactions and the number of shared users do not matter (that is what makes it the
    graph of Hamilton et al.'s uniform sampler, not a walk distribution).

    Building it costs ``sum_u deg(u)^2`` user-item-item triples; above ``max_pairs`` it raises
    :class:`CoInteractionGraphTooLarge` instead of exhausting memory (use ``sage_neighbors="two_step"``, which
    never builds the graph, on such data).
    """
    import scipy.sparse as sp

    indptr = np.asarray(user_items_indptr, dtype=np.int64)
    indices = np.asarray(user_items_indices, dtype=np.int64)
    n_users = indptr.shape[0] - 1
    a = sp.csr_matrix((np.ones(indices.shape[0], dtype=np.float32), indices, indptr), shape=(n_users, n_items))
    a.sum_duplicates()
    deg = np.diff(a.indptr).astype(np.int64)
    triples = int((deg * deg).sum())
    if triples > max_pairs:
        raise CoInteractionGraphTooLarge(
            f"co_interaction_graph: {triples:,} user-item-item triples exceed max_pairs={max_pairs:,} "
            f"(the most active user has {int(deg.max())} distinct items); use sage_neighbors='two_step', which "
            "samples the same graph without building it, or raise max_pairs")
    a.data[:] = 1.0
    c = (a.T @ a).tocsr()
    c.setdiag(0)
    c.eliminate_zeros()
    c.sort_indices()
    return c.indptr.astype(np.int64), c.indices.astype(np.int64)


class DistinctCoInteractionNeighbors(UniformNeighbors):
    """GraphSAGE neighbours of items drawn uniformly, with replacement, from their distinct co-interaction
    neighbours (:func:`co_interaction_graph`): every item that shares a user with i is equally likely, however
    many users it shares. This is Hamilton et al.'s sampler on the simple item-item graph; the two-step walk of
    :class:`CoInteractionNeighbors` instead favours items that share many (or little active) users.

    Shapes: ``__call__(ids (n,), fanout, rng) -> (ids (n, fanout) int64, -1 padded; weights (n, fanout) in {0, 1})``.
    """

    @classmethod
    def from_graph_store(cls, store: object, *, max_pairs: int = 200_000_000) -> DistinctCoInteractionNeighbors:
        """Built from a ``gnn.graphstore.GraphStore``'s user -> item CSR (see :func:`co_interaction_graph`)."""
        ui = store.user_items  # type: ignore[attr-defined]
        indptr, indices = co_interaction_graph(user_items_indptr=ui.indptr, user_items_indices=ui.indices,
                                               n_items=int(store.n_items), max_pairs=max_pairs)  # type: ignore[attr-defined]
        return cls(indptr, indices)

    def __repr__(self) -> str:
        return (f"DistinctCoInteractionNeighbors(n_items={self.indptr.shape[0] - 1}, "
                f"n_edges={self.indices.shape[0]})")


@dataclass(frozen=True)
class Block:
    """One hop of a computation graph. Destinations are the first ``n_dst`` sources.

    Shapes: ``nbr_index (n_dst, S)`` int64 positions in the source list (padding points at the node itself);
    ``nbr_weight (n_dst, S)`` float32 (visit counts for PinSage, 1 for GraphSAGE; 0 = padding).
    """

    nbr_index: torch.Tensor
    nbr_weight: torch.Tensor

    @property
    def n_dst(self) -> int:
        return int(self.nbr_index.shape[0])

    def to(self, device: torch.device | str) -> Block:
        """The same block on ``device`` (no copy where it is there already)."""
        return Block(self.nbr_index.to(device, non_blocking=True), self.nbr_weight.to(device, non_blocking=True))


@dataclass(frozen=True)
class Subgraph:
    """The computation graph of a batch (see the module docstring).

    Shapes: ``node_ids[h]`` (N_h,) int64 with N_0 = number of targets; ``blocks[h]`` links node_ids[h] (dst) to
    node_ids[h+1] (src); ``rows (N_K, F)`` input features of ``node_ids[K]``.
    """

    node_ids: tuple[torch.Tensor, ...]
    blocks: tuple[Block, ...]
    rows: torch.Tensor

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def targets(self) -> torch.Tensor:
        return self.node_ids[0]

    def to(self, device: torch.device | str) -> Subgraph:
        """The same computation graph on ``device`` (ids, blocks and rows)."""
        return Subgraph(tuple(ids.to(device, non_blocking=True) for ids in self.node_ids),
                        tuple(block.to(device) for block in self.blocks), self.rows.to(device, non_blocking=True))


@numba.njit(nogil=True, cache=True)
def _first_seen(flat: np.ndarray, mark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - numba
    """Distinct values of ``flat`` in first-seen order and each entry's position among them; O(len(flat)).

    ``mark`` is a scratch array (all -1, longer than the largest id) left all -1 again on return. No GIL held.
    """
    m = flat.shape[0]
    position = np.empty(m, np.int64)
    distinct = np.empty(m, np.int64)
    k = 0
    for i in range(m):
        v = flat[i]
        p = mark[v]
        if p < 0:
            mark[v] = k
            distinct[k] = v
            p = k
            k += 1
        position[i] = p
    for j in range(k):
        mark[distinct[j]] = -1
    return distinct[:k].copy(), position


_scratch = threading.local()


def _mark_array(max_id: int) -> np.ndarray:
    """This thread's scratch array for :func:`_first_seen` (one int64 per node id, grown on demand)."""
    mark: np.ndarray | None = getattr(_scratch, "mark", None)
    if mark is None or mark.shape[0] <= max_id:
        mark = np.full(max(max_id + 1, 1024, 0 if mark is None else 2 * mark.shape[0]), -1, np.int64)
        _scratch.mark = mark
    return mark


def expand_hop(dst: np.ndarray, nbr: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deduplicate one hop: sources = ``dst`` followed by each new neighbour once (first-seen order).

    Runs in a numba kernel without the GIL (so producer threads sample in parallel with the trainer) using a
    per-thread scratch array of one int64 per node id (8 bytes x n_items per producer thread).

    Args:
        dst: (n,) distinct node ids.
        nbr: (n, S) neighbour ids, -1 = none.
        weight: (n, S) weights.

    Returns: ``src (m,)`` with ``src[:n] == dst``, ``nbr_index (n, S)`` positions in ``src`` (padding -> own
    position), ``nbr_weight (n, S)`` float32 (0 at padding).
    """
    n, s = nbr.shape
    valid = nbr >= 0
    flat = np.concatenate([dst, nbr[valid]]).astype(np.int64, copy=False)
    src, position = _first_seen(flat, _mark_array(int(flat.max()) if flat.shape[0] else 0))
    if src.shape[0] < n or not np.array_equal(src[:n], dst):
        raise ValueError("dst: node ids must be distinct; deduplicate the targets first")
    nbr_index = np.repeat(np.arange(n, dtype=np.int64)[:, None], s, axis=1)
    nbr_index[valid] = position[n:]
    return src, nbr_index, np.where(valid, weight, 0).astype(np.float32)


class _BlockSampler:
    """Shared expansion loop: targets -> K hops of neighbours -> rows of the last hop."""

    def __init__(self, *, rows: RowSource, n_layers: int) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers={n_layers}: need at least one layer")
        self.rows = rows
        self.n_layers = n_layers

    def _neighbors(self, hop: int, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample(self, targets: np.ndarray, rng: np.random.Generator) -> Subgraph:
        """Computation graph of ``targets`` (distinct item ids, shape (B,)); draws only from ``rng``."""
        ids = np.asarray(targets, dtype=np.int64)
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise ValueError("targets: item ids must be distinct; pass np.unique(targets)")
        node_ids = [ids]
        blocks = []
        for hop in range(self.n_layers):
            nbr, w = self._neighbors(hop, node_ids[-1], rng)
            src, index, weight = expand_hop(node_ids[-1], nbr, w)
            node_ids.append(src)
            blocks.append(Block(torch.from_numpy(index), torch.from_numpy(weight)))
        rows = self.rows(node_ids[-1])  # the remote-row seam: one call per batch
        return Subgraph(tuple(torch.from_numpy(n) for n in node_ids), tuple(blocks), rows)


class PinSageSampler(_BlockSampler):
    """Computation graphs over random-walk neighbourhoods (the same T neighbours at every hop).

    Args:
        neighbors: ``neighbors(item_ids) -> (ids (n, T), weights (n, T))``, e.g. :class:`WalkNeighbors`.
        rows: ``rows(item_ids) -> (n, F)`` input features, e.g. ``gnn.features.ItemFeatureTable``.
        n_layers: K (default 2).
    """

    def __init__(self, *, neighbors: NeighborSource, rows: RowSource, n_layers: int = 2) -> None:
        super().__init__(rows=rows, n_layers=n_layers)
        self.neighbors = neighbors

    def _neighbors(self, hop: int, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.neighbors(ids)

    def __repr__(self) -> str:
        return f"PinSageSampler(n_layers={self.n_layers}, neighbors={self.neighbors!r})"


class GraphSageSampler(_BlockSampler):
    """Computation graphs over uniformly sampled neighbours (GraphSAGE).

    Args:
        neighbors: ``sample(item_ids, fanout, rng) -> (ids (n, S), weights (n, S))``.
        rows: input row source.
        fanouts: (S_1, ..., S_K) in the paper's numbering (default (25, 10)): layer k samples S_k neighbours,
            and layer K is the one next to the targets, so the targets get S_K = 10 neighbours and those get
            S_1 = 25 each (as in the reference implementation).
    """

    def __init__(self, *, neighbors: NeighborSampler, rows: RowSource, fanouts: Sequence[int] = (25, 10)) -> None:
        if not fanouts or min(fanouts) < 1:
            raise ValueError(f"fanouts={tuple(fanouts)}: need one positive sample size per layer, e.g. (25, 10)")
        super().__init__(rows=rows, n_layers=len(fanouts))
        self.neighbors = neighbors
        self.fanouts = tuple(int(f) for f in fanouts)

    def _neighbors(self, hop: int, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.neighbors(ids, self.fanouts[self.n_layers - 1 - hop], rng)

    def __repr__(self) -> str:
        return f"GraphSageSampler(fanouts={self.fanouts}, neighbors={self.neighbors!r})"


class Sampler(Protocol):
    """What the batch builder and ``embed_items`` need from a sampler."""

    n_layers: int

    def sample(self, targets: np.ndarray, rng: np.random.Generator) -> Subgraph: ...
