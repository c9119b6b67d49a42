"""Remote-vertex cache: policies, statistics, the fetch interface. Never imports dask, pipeline/ or gnn/.

Public API: :class:`RowBlock` (rows in transit), :class:`RowFetcher` (transport protocol), :class:`LocalOwnerTable`
and :class:`TableFetcher` (in-process owner side and transport), :class:`CountedFetcher` / :class:`TransportStats`
(traffic per owner), :class:`CacheConfig`, :class:`RemoteRowCache`, :class:`CacheStats`, and the static policies'
selectors (:func:`select_by_importance`, :func:`select_random`, :func:`count_accesses`).
"""

from __future__ import annotations

from cache.config import POLICIES, CacheConfig, Policy
from cache.policies import count_accesses, remote_items, select_by_importance, select_random
from cache.remote import RemoteRowCache
from cache.rows import RowBlock, row_nbytes
from cache.stats import CacheStats
from cache.transport import (
    CountedFetcher,
    LocalOwnerTable,
    OwnerTraffic,
    RowFetcher,
    RowSource,
    TableFetcher,
    TransportStats,
    as_row_block,
)

__all__ = [
    "POLICIES",
    "CacheConfig",
    "CacheStats",
    "CountedFetcher",
    "LocalOwnerTable",
    "OwnerTraffic",
    "Policy",
    "RemoteRowCache",
    "RowBlock",
    "RowFetcher",
    "RowSource",
    "TableFetcher",
    "TransportStats",
    "as_row_block",
    "count_accesses",
    "remote_items",
    "row_nbytes",
    "select_by_importance",
    "select_random",
]
