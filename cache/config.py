"""``CacheConfig``: which rows a trainer keeps of other shards' items, and how many (section ``[cache]``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["importance", "lru", "random", "none"]
POLICIES: tuple[str, ...] = ("importance", "lru", "random", "none")


@dataclass(frozen=True)
class CacheConfig:
    """Settings of the remote-vertex cache.

    Args:
        policy: ``importance`` (default; static: the remote vertices with the highest importance — random-walk
            visit counts or pre-sampled access counts — fetched once before training), ``lru`` (dynamic,
            least recently used is evicted), ``random`` (static random subset, seeded), ``none`` (every remote
            row is fetched every time).
        capacity_fraction: capacity as a share of this shard's remote vertices, in [0, 1] (default 0.1). Ignored
            when ``capacity_bytes`` is set.
        capacity_bytes: capacity in bytes of row payload (default None = use ``capacity_fraction``).
        seed: seed of the ``random`` policy's subset (default 0).
        max_staleness: for an evolving graph (rows carry the graph version they were read from): a cached row
            older than ``max_staleness`` versions behind the current one is fetched again and replaced, so every
            row served is at most that many versions old; 0 = always current. Default None: rows are never
            refreshed (a static graph). Needs ``current_version`` on the cache.
    """

    policy: Policy = "importance"
    capacity_fraction: float | None = 0.1
    capacity_bytes: int | None = None
    seed: int = 0
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}: must be one of {', '.join(POLICIES)}")
        if self.capacity_bytes is not None:
            if isinstance(self.capacity_bytes, bool) or not isinstance(self.capacity_bytes, int) \
                    or self.capacity_bytes < 0:
                raise ValueError(f"capacity_bytes={self.capacity_bytes!r}: must be an integer >= 0 "
                                 "(or None to use capacity_fraction)")
        elif self.policy != "none":
            f = self.capacity_fraction
            if f is None or isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f <= 1.0:
                raise ValueError(f"capacity_fraction={f!r}: must be a number in [0, 1] "
                                 "(share of remote vertices), or set capacity_bytes instead")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer")
        m = self.max_staleness
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"max_staleness={m!r}: must be an integer >= 0 (versions a cached row may lag), "
                             "or None for a static graph")

    @property
    def static(self) -> bool:
        """True for policies whose content is chosen once before training (importance, random)."""
        return self.policy in ("importance", "random")
