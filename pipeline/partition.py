"""Stage ``partition``: split the items into K shards (pymetis on the neighbourhood graph), with halo and report.

Each Dask worker later owns one shard: the rows of its items live there, and the 1-hop remote neighbours of its
items (its *halo*) are what its sampler will ask other owners for. METIS minimises the visit-count weight of the
neighbourhood edges that cross shards, balanced on vertices and training pairs counted together (one combined
vertex weight: pymetis does not pass multi-constraint weights on), so that shards cost about the same to
train. A hash partition is the comparison point and the fallback when the graph is too large for METIS in memory.
Run ``pinsage partition --parts 4`` after ``pinsage walks``; in Python call :func:`partition_items` /
:func:`shard_halos` / :func:`partition_report` on plain CSR arrays.

Output ``<run>/partition/``: ``owner.npy`` (n_items,) int32, ``shard-<k>/items.npy`` (sorted int64 ids),
``shard-<k>/halo.npy`` (sorted int64 ids), and the report (edge cut, halo sizes, balance) in the manifest.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.common import add_arguments, add_common_arguments, from_sources, settings
from pipeline.config import check
from pipeline.rundir import StageOutput, read_stage, run_stage

log = logging.getLogger(__name__)

STAGE = "partition"
# Bytes METIS needs per directed adjacency entry, measured: 17.8M edges took +3.4 GB RSS (ANCHORS.md) ≈ 95 B per
# undirected edge, ≈ 48 B per directed entry; used only for the log line that explains a fallback.
METIS_BYTES_PER_ENTRY = 48


@dataclass(frozen=True)
class PartitionConfig:
    """Settings of the partition stage (section ``[partition]``).

    Args:
        parts: number of shards K, one per trainer (default 2).
        method: ``metis`` (default; pymetis on the symmetrised neighbourhood graph) or ``random`` (hash of the id).
        seed: METIS seed and hash salt (default 0).
        max_metis_edges: largest symmetrised graph, in directed adjacency entries, handed to METIS (default
            200_000_000, about 10 GB of METIS memory); above it the stage logs why and hashes instead.
        balance_pairs: balance training pairs per shard as well as items (one combined METIS vertex weight,
            see :func:`item_vertex_weights`; default True).
        imbalance: allowed load imbalance of the vertex weight, in 1/1000 (METIS ``ufactor``; default 30 = 3 %).
    """

    parts: int = field(default=2, metadata={"help": "number of shards (one per trainer)"})
    method: Literal["metis", "random"] = field(default="metis", metadata={"help": "metis or random (hash)"})
    seed: int = field(default=0, metadata={"help": "METIS seed / hash salt"})
    max_metis_edges: int = field(default=200_000_000,
                                 metadata={"help": "above this many adjacency entries, hash instead of METIS"})
    balance_pairs: bool = field(default=True, metadata={"help": "balance training pairs per shard too"})
    imbalance: int = field(default=30, metadata={"help": "METIS ufactor: allowed imbalance in 1/1000"})

    def __post_init__(self) -> None:
        check(isinstance(self.parts, int) and self.parts >= 1, "parts", self.parts, "must be an integer >= 1")
        check(self.method in ("metis", "random"), "method", self.method, "must be metis or random")
        check(self.max_metis_edges >= 0, "max_metis_edges", self.max_metis_edges, "must be >= 0")
        check(1 <= self.imbalance <= 1000, "imbalance", self.imbalance, "must lie in [1, 1000] (1/1000 units)")


# ------------------------------------------------------------------------------------------------ graph prep


@dataclass(frozen=True)
class UndirectedGraph:
    """Symmetric CSR without self loops, integer edge weights (METIS input).

    Shapes: ``xadj`` (n+1,) int64; ``adjncy`` (2m,) int64; ``eweights`` (2m,) int64 ≥ 1; ``m`` undirected edges.
    """

    xadj: np.ndarray
    adjncy: np.ndarray
    eweights: np.ndarray

    @property
    def n(self) -> int:
        return int(self.xadj.shape[0] - 1)

    @property
    def n_edges(self) -> int:
        return int(self.adjncy.shape[0] // 2)

    def sources(self) -> np.ndarray:
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.xadj))


def _check_csr(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, n_items: int) -> None:
    if indptr.shape != (n_items + 1,) or indptr[0] != 0 or indptr[-1] != indices.shape[0]:
        raise ValueError(f"indptr has shape {indptr.shape}: it must be (n_items+1,) = ({n_items + 1},), start at 0 "
                         f"and end at len(indices) = {indices.shape[0]}")
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(f"weights has shape {weights.shape}: one weight per neighbour ({indices.shape})")
    if indices.size and (indices.min() < 0 or indices.max() >= n_items):
        raise ValueError(f"indices must be item ids in [0, {n_items})")


def symmetrize(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, n_items: int
               ) -> UndirectedGraph:
    """The undirected item-item graph of directed neighbourhoods ``i -> indices[indptr[i]:indptr[i+1]]``.

    An edge {i, j} weighs ``w(i->j) + w(j->i)``; self loops are dropped; weights become integers ≥ 1 (scaled so the
    smallest positive weight is 1 when weights are below 1, e.g. normalised visit counts). Weights None = 1 each.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    w = np.ones(indices.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    _check_csr(indptr, indices, w, n_items)
    src = np.repeat(np.arange(n_items, dtype=np.int64), np.diff(indptr))
    keep = src != indices
    src, dst, w = src[keep], indices[keep], w[keep]
    u, v = np.concatenate([src, dst]), np.concatenate([dst, src])
    ww = np.concatenate([w, w])
    key = u * n_items + v
    uniq, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=ww, minlength=uniq.shape[0])
    pos = summed[summed > 0]
    scale = 1.0 / pos.min() if pos.size and pos.min() < 1.0 else 1.0
    eweights = np.clip(np.rint(summed * scale), 1, 2**40).astype(np.int64)
    rows = uniq // n_items
    xadj = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_items), out=xadj[1:])
    return UndirectedGraph(xadj=xadj, adjncy=(uniq % n_items).astype(np.int64), eweights=eweights)


# ------------------------------------------------------------------------------------------------ partitioners


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, wrapping uint64 arithmetic)."""
    z = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def random_partition(n_items: int, parts: int, *, seed: int = 0) -> np.ndarray:
    """(n_items,) int32 owner by a salted hash of the item id: stateless, so any process can recompute it."""
    with np.errstate(over="ignore"):
        salted = np.arange(n_items, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    return (_mix64(salted) % np.uint64(parts)).astype(np.int32)


def metis_partition(graph: UndirectedGraph, parts: int, *, vertex_weights: np.ndarray | None = None,
                    seed: int = 0, imbalance: int = 30) -> np.ndarray:
    """(n,) int32 owner from pymetis' k-way partitioner (also below 9 parts, where pymetis would default to
    recursive bisection: k-way balanced the combined weight with a lower cut in our checks).

    Shapes: ``vertex_weights`` (n,) positive integers (None = 1 each). One constraint only: pymetis 2025.2 reads
    the first n entries of ``vweights`` whatever its length (checked: interleaved or padded 2-constraint weights
    are not balanced), so several criteria are combined into one weight (:func:`item_vertex_weights`).
    """
    import pymetis

    if parts == 1 or graph.n == 0:
        return np.zeros(graph.n, np.int32)
    vw = None
    if vertex_weights is not None:
        vw = np.ascontiguousarray(vertex_weights, dtype=np.int64)
        if vw.shape != (graph.n,) or (vw.size and vw.min() < 0):
            raise ValueError(f"vertex_weights has shape {vw.shape}: pass ({graph.n},) non-negative integers")
    options = pymetis.Options(seed=int(seed), ufactor=int(imbalance))
    result = pymetis.part_graph(
        parts, adjacency=pymetis.CSRAdjacency(adj_starts=graph.xadj, adjacent=graph.adjncy),
        vweights=vw, eweights=graph.eweights, options=options, recursive=False,
    )
    return np.asarray(result.vertex_part, dtype=np.int32)


def item_vertex_weights(n_items: int, pairs: np.ndarray | None, *, resolution: int = 100) -> np.ndarray:
    """(n_items,) int64 METIS vertex weights: 1 each, or items and training pairs counted equally.

    With ``pairs``: ``w_i ∝ 1/n_items + pairs_i/sum(pairs)`` (scaled by ``resolution * n_items`` and rounded,
    at least 1), so a shard holding a quarter of all weight holds on average a quarter of the items and of the
    pairs. A stand-in for METIS multi-constraint balancing, which pymetis does not pass on.
    """
    if pairs is None:
        return np.ones(n_items, np.int64)
    p = np.asarray(pairs, dtype=np.float64).reshape(n_items)
    total = p.sum()
    if total <= 0:
        return np.ones(n_items, np.int64)
    share = 1.0 / n_items + p / total
    return np.maximum(1, np.rint(share * resolution * n_items)).astype(np.int64)


@dataclass(frozen=True)
class Partition:
    """An assignment of items to shards. Shapes: ``owner`` (n_items,) int32 in [0, parts)."""

    owner: np.ndarray
    parts: int
    method: str  # what ran: metis | random | random-fallback
    seconds: float

    def items(self, shard: int) -> np.ndarray:
        """Sorted int64 ids owned by ``shard``."""
        return np.flatnonzero(self.owner == shard).astype(np.int64)


def partition_items(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, n_items: int,
                    cfg: PartitionConfig, *, pairs: np.ndarray | None = None,
                    graph: UndirectedGraph | None = None) -> Partition:
    """Partition items on their neighbourhood graph (CSR ``indptr`` (n_items+1,), ``indices``/``weights`` (nnz,)).

    ``pairs`` (n_items,) training pairs per item (balanced as a second constraint when ``cfg.balance_pairs``);
    ``graph`` the symmetrised graph if already built. Falls back to the hash partition, with a warning saying why,
    when the symmetrised graph holds more than ``cfg.max_metis_edges`` adjacency entries.
    """
    started = time.perf_counter()
    method: str = cfg.method
    if method == "metis":
        entries = 2 * int(np.asarray(indices).shape[0])  # upper bound before building the symmetric graph
        if graph is not None:
            entries = int(graph.adjncy.shape[0])
        if entries > cfg.max_metis_edges:
            log.warning("partition: the symmetrised neighbourhood graph has up to %d adjacency entries "
                        "(~%.1f GB for METIS), above max_metis_edges=%d: hashing item ids instead (raise "
                        "max_metis_edges on a machine with more memory)", entries,
                        entries * METIS_BYTES_PER_ENTRY / 1e9, cfg.max_metis_edges)
            method = "random-fallback"
    if method == "metis":
        g = graph if graph is not None else symmetrize(indptr, indices, weights, n_items)
        vw = item_vertex_weights(n_items, pairs if cfg.balance_pairs else None)
        owner = metis_partition(g, cfg.parts, vertex_weights=vw, seed=cfg.seed, imbalance=cfg.imbalance)
    else:
        owner = random_partition(n_items, cfg.parts, seed=cfg.seed)
    return Partition(owner=owner, parts=cfg.parts, method=method, seconds=time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------ halo, report


def shard_halos(indptr: np.ndarray, indices: np.ndarray, owner: np.ndarray, parts: int) -> list[np.ndarray]:
    """Per shard, the sorted distinct remote 1-hop neighbours of its items (what its sampler asks others for).

    Uses the directed neighbourhoods (the rows a sampler reads), not the symmetrised graph.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    owner = np.asarray(owner)
    n = owner.shape[0]
    _check_csr(indptr, indices, None, n)
    src = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    src_owner = owner[src].astype(np.int64)
    cross = src_owner != owner[indices]
    key = np.unique(src_owner[cross] * n + indices[cross])
    shard, item = key // n, key % n
    bounds = np.searchsorted(shard, np.arange(parts + 1))
    return [item[bounds[k]: bounds[k + 1]].astype(np.int64) for k in range(parts)]


def _balance(counts: np.ndarray) -> dict[str, Any]:
    mean = float(counts.mean()) if counts.size else 0.0
    return {"per_shard": counts.astype(int).tolist(), "mean": mean,
            "max_over_mean": float(counts.max() / mean) if mean > 0 else 0.0,
            "min_over_mean": float(counts.min() / mean) if mean > 0 else 0.0}


def partition_report(graph: UndirectedGraph, part: Partition, halos: list[np.ndarray], *,
                     indptr: np.ndarray, indices: np.ndarray, pairs: np.ndarray | None = None) -> dict[str, Any]:
    """Edge cut (undirected edges and their weight; directed neighbourhood entries), halo sizes and balance."""
    owner = part.owner
    src = graph.sources()
    upper = src < graph.adjncy  # each undirected edge once
    cut = owner[src[upper]] != owner[graph.adjncy[upper]]
    w = graph.eweights[upper]
    d_src = np.repeat(np.arange(owner.shape[0], dtype=np.int64), np.diff(np.asarray(indptr)))
    d_idx = np.asarray(indices, dtype=np.int64)
    d_keep = d_src != d_idx
    d_cut = owner[d_src[d_keep]] != owner[d_idx[d_keep]]
    items = np.bincount(owner, minlength=part.parts)
    halo_sizes = np.array([h.shape[0] for h in halos], dtype=np.int64)
    report: dict[str, Any] = {
        "parts": part.parts,
        "method": part.method,
        "seconds": round(part.seconds, 3),
        "n_items": int(owner.shape[0]),
        "n_edges": int(upper.sum()),
        "edges_cut": int(cut.sum()),
        "edge_cut_fraction": float(cut.mean()) if cut.size else 0.0,
        "weight_cut_fraction": float(w[cut].sum() / w.sum()) if w.size else 0.0,
        "neighbor_entries_cut_fraction": float(d_cut.mean()) if d_cut.size else 0.0,
        "halo_sizes": halo_sizes.tolist(),
        "halo_over_items": [float(h / max(i, 1)) for h, i in zip(halo_sizes, items, strict=True)],
        "items": _balance(items),
    }
    if pairs is not None:
        report["pairs"] = _balance(np.bincount(owner, weights=np.asarray(pairs, np.float64), minlength=part.parts))
    return report


def write_partition(out: Path, part: Partition, halos: list[np.ndarray]) -> None:
    """``owner.npy`` and ``shard-<k>/{items,halo}.npy`` into ``out`` (a stage's temporary directory)."""
    np.save(out / "owner.npy", part.owner.astype(np.int32))
    for k in range(part.parts):
        d = out / f"shard-{k}"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "items.npy", part.items(k))
        np.save(d / "halo.npy", halos[k])


def load_owner(run_dir: str | Path) -> np.ndarray:
    """(n_items,) int32 owner of each item from a finished partition stage."""
    return np.load(read_stage(run_dir, STAGE).path / "owner.npy", allow_pickle=False)


def load_shard(run_dir: str | Path, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """``(items, halo)`` of ``shard`` from a finished partition stage: sorted int64 ids (memory-mapped)."""
    out = read_stage(run_dir, STAGE)
    d = out.path / f"shard-{shard}"
    if not d.is_dir():
        raise ValueError(f"shard={shard}: {out.path} holds shards 0..{out.report.get('parts', '?')}-1; "
                         "re-run `pinsage partition --parts K` with more parts")
    return np.load(d / "items.npy", mmap_mode="r"), np.load(d / "halo.npy", mmap_mode="r")


# ------------------------------------------------------------------------------------------------ the stage


def run_partition(run_dir: str | Path, cfg: PartitionConfig, *, force: bool = False) -> StageOutput:
    """Stage ``partition`` from ``<run>/walks`` (neighbourhoods) and ``<run>/graph`` (pairs per item)."""
    from gnn.graphstore import load_graph_store

    load_neighborhoods = importlib.import_module("gnn.walks").load_neighborhoods  # the walks engineer's module

    walks = read_stage(run_dir, "walks")
    graph_out = read_stage(run_dir, "graph")

    def build(tmp: Path) -> dict[str, Any]:
        nb = load_neighborhoods(walks.path)
        pairs = np.asarray(load_graph_store(graph_out.path).item_users.degree(), dtype=np.int64)
        n = nb.n_items
        if pairs.shape[0] != n:
            raise ValueError(f"{graph_out.path}: {pairs.shape[0]} items in the graph store, {n} in {walks.path}: "
                             "re-run `pinsage walks --force`")
        indptr, indices, weights = np.asarray(nb.indptr), np.asarray(nb.indices), np.asarray(nb.weights)
        sym = symmetrize(indptr, indices, weights, n)
        part = partition_items(indptr, indices, weights, n, cfg, pairs=pairs, graph=sym)
        halos = shard_halos(indptr, indices, part.owner, cfg.parts)
        write_partition(tmp, part, halos)
        report = partition_report(sym, part, halos, indptr=indptr, indices=indices, pairs=pairs)
        log.info("partition: %d shards by %s, edge cut %.1f %%, halos %s", cfg.parts, part.method,
                 100 * report["edge_cut_fraction"], report["halo_sizes"])
        return report

    return run_stage(run_dir, STAGE, config=cfg, inputs={"walks": walks, "graph": graph_out}, build=build,
                     force=force)


def _main(args: argparse.Namespace) -> int:
    cfg = from_sources(PartitionConfig, toml=settings(args), section=STAGE, args=args)
    out = run_partition(args.run_dir, cfg, force=args.force)
    r = out.report
    state = "up to date" if out.reused else "done"
    print(f"pinsage partition: {state}: {r['parts']} shards by {r['method']}, edge cut "
          f"{100 * r['edge_cut_fraction']:.1f} % ({100 * r['weight_cut_fraction']:.1f} % of weight), halos "
          f"{r['halo_sizes']}, items max/mean {r['items']['max_over_mean']:.3f} -> {out.path}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(STAGE, help="split items into shards (METIS on the neighbourhood graph), with halos",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_arguments(p, cluster=False)
    add_arguments(p, PartitionConfig)
    p.set_defaults(func=_main)
