"""``RowBlock``: the rows of a set of vertices as they travel between a shard's owner and a trainer.

A row is what a sampler needs of one item: its input features, its top-T neighbour ids and their weights.
Every byte that crosses between workers is a RowBlock, so :attr:`RowBlock.nbytes` is what the transport counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _as(arr: np.ndarray, dtype: type, name: str, ndim: int) -> np.ndarray:
    out = np.asarray(arr)
    if out.ndim != ndim:
        raise ValueError(f"{name} has shape {out.shape}: it must be {ndim}-dimensional")
    return out if out.dtype == dtype else out.astype(dtype)


@dataclass(frozen=True)
class RowBlock:
    """Rows of ``n`` vertices, in the order of ``ids`` (duplicates allowed).

    Shapes: ``ids`` (n,) int64; ``features`` (n, F) float32; ``neighbors`` (n, T) int64 neighbour item ids;
    ``neighbor_weights`` (n, T) float32; ``version`` (n,) int64 or None — reserved for the evolving graph
    (the graph version each row was read from); nothing sets it yet and the cache passes it through.
    """

    ids: np.ndarray
    features: np.ndarray
    neighbors: np.ndarray
    neighbor_weights: np.ndarray
    version: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = _as(self.ids, np.int64, "ids", 1)
        feats = _as(self.features, np.float32, "features", 2)
        nbrs = _as(self.neighbors, np.int64, "neighbors", 2)
        wts = _as(self.neighbor_weights, np.float32, "neighbor_weights", 2)
        n = ids.shape[0]
        for name, arr in (("features", feats), ("neighbors", nbrs), ("neighbor_weights", wts)):
            if arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} rows for {n} ids: one row per id")
        if nbrs.shape != wts.shape:
            raise ValueError(f"neighbors {nbrs.shape} and neighbor_weights {wts.shape} must have the same shape")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "neighbors", nbrs)
        object.__setattr__(self, "neighbor_weights", wts)
        if self.version is not None:
            ver = _as(self.version, np.int64, "version", 1)
            if ver.shape[0] != n:
                raise ValueError(f"version has {ver.shape[0]} entries for {n} ids: one per id")
            object.__setattr__(self, "version", ver)

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, n_features: int, n_neighbors: int, *, versioned: bool = False) -> RowBlock:
        """A block with no rows and the given row shape."""
        return cls(
            ids=np.empty(0, np.int64),
            features=np.empty((0, n_features), np.float32),
            neighbors=np.empty((0, n_neighbors), np.int64),
            neighbor_weights=np.empty((0, n_neighbors), np.float32),
            version=np.empty(0, np.int64) if versioned else None,
        )

    @classmethod
    def from_arrays(cls, ids: np.ndarray, arrays: Sequence[np.ndarray]) -> RowBlock:
        """From ``ids`` and a ``(features, neighbors, neighbor_weights)`` tuple (``ShardServer.take``'s answer)."""
        if len(arrays) not in (3, 4):
            raise ValueError(f"arrays has {len(arrays)} entries: pass (features, neighbors, neighbor_weights)")
        return cls(np.asarray(ids, np.int64), *arrays)

    @staticmethod
    def concat(blocks: Sequence[RowBlock]) -> RowBlock:
        """The rows of ``blocks`` one after another (at least one block, all of one row shape)."""
        if not blocks:
            raise ValueError("blocks is empty: pass at least one RowBlock (use RowBlock.empty for none)")
        if len(blocks) == 1:
            return blocks[0]
        versioned = [b.version is not None for b in blocks]
        if any(versioned) and not all(versioned):
            raise ValueError("blocks mix rows with and without version: version all of them or none")
        return RowBlock(
            ids=np.concatenate([b.ids for b in blocks]),
            features=np.concatenate([b.features for b in blocks]),
            neighbors=np.concatenate([b.neighbors for b in blocks]),
            neighbor_weights=np.concatenate([b.neighbor_weights for b in blocks]),
            version=np.concatenate([b.version for b in blocks if b.version is not None]) if all(versioned) else None,
        )

    # ------------------------------------------------------------------ access

    def take(self, positions: np.ndarray) -> RowBlock:
        """Rows at ``positions`` (n',) into this block, in that order (a copy)."""
        pos = np.asarray(positions, dtype=np.int64)
        return RowBlock(
            self.ids[pos], self.features[pos], self.neighbors[pos], self.neighbor_weights[pos],
            None if self.version is None else self.version[pos],
        )

    @property
    def n_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def n_neighbors(self) -> int:
        return int(self.neighbors.shape[1])

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row's payload (features, neighbours, weights, version if present; not the id)."""
        return row_nbytes(self.n_features, self.n_neighbors, versioned=self.version is not None)

    @property
    def nbytes(self) -> int:
        """Payload bytes of all rows: what the owner sends back (the same count as ``ShardServer.stats``)."""
        return self.n_rows * self.row_nbytes

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"RowBlock(n={self.n_rows}, F={self.n_features}, T={self.n_neighbors}, "
                f"versioned={self.version is not None}, nbytes={self.nbytes})")


def row_nbytes(n_features: int, n_neighbors: int, *, versioned: bool = False) -> int:
    """Payload bytes of one row: F float32 + T int64 + T float32 (+ int64 version). The requested id travels the
    other way and is counted as request bytes by :class:`cache.transport.TransportStats`."""
    return 4 * n_features + 12 * n_neighbors + (8 if versioned else 0)
