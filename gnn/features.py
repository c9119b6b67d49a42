"""Item input features: the row table a sampler gathers from, and the encoder turning rows into input vectors.

A *row* of an item is a float32 vector ``[category, log1p(count_pv), log1p(count_fav), log1p(count_cart),
log1p(count_buy), content...]``. :class:`ItemFeatureTable` is the default local row source (``rows(item_ids)``);
the distributed trainer puts a remote-row cache with the same call signature in its place.
:class:`ItemInputEncoder` embeds the category, a hashed item id (the id comes from the sampled block, not the row)
and projects the numeric / content columns.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from gnn.graphstore import GraphStore

logger = logging.getLogger(__name__)

CATEGORY_COLUMN = 0
NUMERIC_START = 1
N_COUNT_FEATURES = 4  # one log-popularity column per behaviour (pv, fav, cart, buy)
ID_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads consecutive ids over the buckets


class ItemFeatureTable:
    """In-memory item rows; calling it with item ids returns their rows (the local row source).

    Args:
        table: (n_items, 1 + n_numeric + content_dim) float32 rows, column 0 the category id.
        n_categories: number of category ids (column 0 lies in ``[0, n_categories)``).

    Shapes:
        ``__call__(item_ids (n,) int64) -> (n, width) float32``
    """

    def __init__(self, table: torch.Tensor, *, n_categories: int, n_numeric: int = N_COUNT_FEATURES) -> None:
        if table.ndim != 2 or table.shape[1] < 1 + n_numeric:
            raise ValueError(
                f"table: shape {tuple(table.shape)} needs 2 dims and at least {1 + n_numeric} columns "
                "(category, numeric...); build it with ItemFeatureTable.from_arrays"
            )
        self.table = table.to(torch.float32).contiguous()
        self.n_categories = int(n_categories)
        self.n_numeric = int(n_numeric)

    @classmethod
    def from_arrays(
        cls, *, category: np.ndarray, counts: np.ndarray, content: np.ndarray | None = None, n_categories: int
    ) -> ItemFeatureTable:
        """Rows from category ids (N,), behaviour counts (N, 4) and optional content (N, D)."""
        cat = np.asarray(category, dtype=np.float32)[:, None]
        num = np.log1p(np.asarray(counts, dtype=np.float64)).astype(np.float32)
        parts = [cat, num]
        if content is not None:
            parts.append(np.asarray(content, dtype=np.float32))
        return cls(torch.from_numpy(np.concatenate(parts, axis=1)), n_categories=n_categories,
                   n_numeric=num.shape[1])

    @classmethod
    def from_graph_store(cls, store: GraphStore) -> ItemFeatureTable:
        return cls.from_arrays(category=np.asarray(store.item_category), counts=np.asarray(store.item_counts),
                               content=None if store.item_content is None else np.asarray(store.item_content),
                               n_categories=store.n_categories)

    @property
    def n_items(self) -> int:
        return int(self.table.shape[0])

    @property
    def width(self) -> int:
        return int(self.table.shape[1])

    @property
    def content_dim(self) -> int:
        return self.width - 1 - self.n_numeric

    def __call__(self, item_ids: np.ndarray) -> torch.Tensor:
        return self.table.index_select(0, torch.as_tensor(np.asarray(item_ids, dtype=np.int64)))

    def __repr__(self) -> str:
        return (f"ItemFeatureTable(n_items={self.n_items}, n_categories={self.n_categories}, "
                f"n_numeric={self.n_numeric}, content_dim={self.content_dim})")


def hash_ids(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket of each id: ``(id * 2654435761) mod buckets`` (int64 arithmetic, always in [0, buckets))."""
    return torch.remainder(ids.to(torch.int64) * ID_HASH_MULTIPLIER, buckets)


class ItemInputEncoder(nn.Module):
    """Input vector of an item: ReLU(W · [emb_cat(category), emb_id(hash(id)), numeric, content] + b).

    Args:
        n_categories: category vocabulary; ids outside it are folded in by ``mod`` (default required).
        category_dim: category embedding width (default 16).
        id_buckets: hashed item-id embedding rows (default 65536); 0 disables the id embedding.
        id_dim: id embedding width (default 32).
        n_numeric: numeric columns after the category (default 4).
        content_dim: dense content columns after the numeric ones (default 0).
        out_dim: output width (default 64).
        id_dropout: in training mode, the share of rows whose id vector is zeroed (default 0): each row of a
            batch (an item of the batch's input layer) loses its id vector with this probability, so the model
            also learns to place an item from its category, counts and neighbourhood. No rescaling: at
            evaluation every id is present, as in the kept rows. Ignored without an id table.

    Shapes:
        ``forward(ids (n,) int64, rows (n, 1 + n_numeric + content_dim) float32) -> (n, out_dim)``
    """

    def __init__(self, *, n_categories: int, category_dim: int = 16, id_buckets: int = 65536, id_dim: int = 32,
                 n_numeric: int = N_COUNT_FEATURES, content_dim: int = 0, out_dim: int = 64,
                 id_dropout: float = 0.0) -> None:
        super().__init__()
        if n_categories < 1:
            raise ValueError(f"n_categories={n_categories}: need at least one category")
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"id_dropout={id_dropout}: give a probability in [0, 1)")
        self.id_dropout = float(id_dropout)
        self.n_categories, self.n_numeric, self.content_dim = n_categories, n_numeric, content_dim
        self.id_buckets = id_buckets
        self.category = nn.Embedding(n_categories, category_dim)
        self.item_id = nn.Embedding(id_buckets, id_dim) if id_buckets > 0 else None
        in_dim = category_dim + (id_dim if id_buckets > 0 else 0) + n_numeric + content_dim
        self.proj = nn.Linear(in_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.category.weight, std=0.1)
        if self.item_id is not None:
            nn.init.normal_(self.item_id.weight, std=0.1)
        self.proj.reset_parameters()

    @property
    def out_dim(self) -> int:
        return self.proj.out_features

    def forward(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        cat = torch.remainder(rows[:, CATEGORY_COLUMN].to(torch.int64), self.n_categories)
        parts = [self.category(cat)]  # (n, category_dim)
        if self.item_id is not None:
            vec = self.item_id(hash_ids(ids, self.id_buckets))  # (n, id_dim)
            if self.training and self.id_dropout > 0.0:
                keep = torch.rand(vec.shape[0], 1, device=vec.device) >= self.id_dropout  # (n, 1)
                vec = vec * keep
            parts.append(vec)
        parts.append(rows[:, NUMERIC_START:])  # (n, n_numeric + content_dim)
        return torch.relu(self.proj(torch.cat(parts, dim=1)))

    def __repr__(self) -> str:
        drop = f", id_dropout={self.id_dropout}" if self.id_dropout else ""
        return (f"ItemInputEncoder(n_categories={self.n_categories}, id_buckets={self.id_buckets}, "
                f"n_numeric={self.n_numeric}, content_dim={self.content_dim}, out_dim={self.out_dim}{drop})")


class TensorRows:
    """Row source over a dense (N, F) tensor (node ids as features in tests; Cora attributes).

    Shapes: ``__call__(ids (n,)) -> (n, F)``.
    """

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table.contiguous()

    def __call__(self, item_ids: np.ndarray) -> torch.Tensor:
        return self.table.index_select(0, torch.as_tensor(np.asarray(item_ids, dtype=np.int64)))

    def __repr__(self) -> str:
        return f"TensorRows(shape={tuple(self.table.shape)})"
