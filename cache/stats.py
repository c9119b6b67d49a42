"""``CacheStats``: a consistent snapshot of one cache's counters, summed across workers for the run report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`cache.remote.RemoteRowCache` (or the sum over several).

    ``requests`` counts distinct remote ids per ``get`` call (a minibatch asking twice for one row asks once);
    each is a ``hit`` (served from the cache) or a ``miss`` (fetched from its owner). ``rows_fetched`` /
    ``bytes_fetched`` are the misses' traffic, ``fill_rows`` / ``fill_bytes`` the one-off fill of a static
    policy; ``bytes_saved`` is the payload the hits did not move. ``local_rows`` were served by the trainer's
    own shard and are not requests. ``refreshes``: cached rows replaced because they were older than
    ``max_staleness`` versions (each also counted as a miss). ``used_*`` / ``capacity_*`` describe the content now.
    """

    policy: str = "none"
    requests: int = 0
    hits: int = 0
    misses: int = 0
    local_rows: int = 0
    fetches: int = 0
    rows_fetched: int = 0
    bytes_fetched: int = 0
    bytes_saved: int = 0
    fill_rows: int = 0
    fill_bytes: int = 0
    insertions: int = 0
    evictions: int = 0
    refreshes: int = 0
    used_rows: int = 0
    used_bytes: int = 0
    capacity_rows: int = 0
    capacity_bytes: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "policy" and v < 0:
                raise ValueError(f"CacheStats.{f.name}={v}: counters cannot be negative")
        if self.hits + self.misses != self.requests:
            raise ValueError(f"CacheStats: hits {self.hits} + misses {self.misses} != requests {self.requests}")
        if self.used_rows > self.capacity_rows or self.used_bytes > self.capacity_bytes:
            raise ValueError(f"CacheStats: content {self.used_rows} rows / {self.used_bytes} B exceeds capacity "
                             f"{self.capacity_rows} rows / {self.capacity_bytes} B")

    @property
    def hit_rate(self) -> float:
        """hits / requests (0 when nothing was requested)."""
        return self.hits / self.requests if self.requests else 0.0

    @property
    def remote_bytes(self) -> int:
        """All payload moved from owners: misses plus the static fill."""
        return self.bytes_fetched + self.fill_bytes

    def __add__(self, other: CacheStats) -> CacheStats:
        if not isinstance(other, CacheStats):
            return NotImplemented
        values: dict[str, Any] = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in dataclasses.fields(self) if f.name != "policy"
        }
        values["policy"] = self.policy if self.policy == other.policy else f"{self.policy}+{other.policy}"
        return CacheStats(**values)

    @staticmethod
    def merge(stats: list[CacheStats]) -> CacheStats:
        """Sum of the stats of several workers (an empty list gives zeros)."""
        out = stats[0] if stats else CacheStats()
        for s in stats[1:]:
            out = out + s
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hit_rate"] = round(self.hit_rate, 6)
        return d

    def __repr__(self) -> str:
        return (f"CacheStats(policy={self.policy}, hit_rate={self.hit_rate:.1%}, requests={self.requests}, "
                f"hits={self.hits}, misses={self.misses}, bytes_fetched={self.bytes_fetched}, "
                f"bytes_saved={self.bytes_saved}, fill_bytes={self.fill_bytes}, evictions={self.evictions}, "
                f"used={self.used_rows}/{self.capacity_rows} rows, {self.used_bytes}/{self.capacity_bytes} B)")
