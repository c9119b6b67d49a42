"""Typed byte/synchronisation counters for gradient traffic (DGC, built-in hooks, model averaging).

Bytes are *payload* bytes that this rank hands to a collective per step (what it contributes), not wire bytes:
the wire cost of a payload depends on the collective's algorithm, see :mod:`gnn.comm.projection`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrafficAccount:
    """Per-step and cumulative gradient traffic of one rank.

    ``dense_bytes`` is what an uncompressed fp32 all-reduce of the same gradients would have sent;
    ``sent_bytes`` what was actually sent (values + indices for DGC, fp16 halves, P/Q for PowerSGD, 0 for local
    steps). Model-averaging rounds are counted separately per level (``sync_rounds`` / ``sync_bytes``).
    """

    steps: int = 0
    total_dense_bytes: int = 0
    total_sent_bytes: int = 0
    last_step_dense_bytes: int = 0
    last_step_sent_bytes: int = 0
    sync_rounds: dict[str, int] = field(default_factory=dict)
    sync_bytes: dict[str, int] = field(default_factory=dict)
    _open_dense: int = 0
    _open_sent: int = 0

    def record(self, *, dense_bytes: int, sent_bytes: int) -> None:
        """Add one bucket's traffic to the step in progress (closed by :meth:`end_step`)."""
        if dense_bytes < 0 or sent_bytes < 0:
            raise ValueError(f"byte counts must be non-negative, got dense_bytes={dense_bytes}, "
                             f"sent_bytes={sent_bytes}")
        self._open_dense += dense_bytes
        self._open_sent += sent_bytes

    def end_step(self) -> None:
        """Close the step in progress: its bucket totals become ``last_step_*`` and join the cumulative sums."""
        self.steps += 1
        self.last_step_dense_bytes, self.last_step_sent_bytes = self._open_dense, self._open_sent
        self.total_dense_bytes += self._open_dense
        self.total_sent_bytes += self._open_sent
        self._open_dense = self._open_sent = 0

    def record_sync(self, *, level: str, payload_bytes: int) -> None:
        """Count one model-averaging round at ``level`` (e.g. ``"group2@4"``, ``"all@16"``)."""
        if payload_bytes < 0:
            raise ValueError(f"payload_bytes must be non-negative, got {payload_bytes}")
        self.sync_rounds[level] = self.sync_rounds.get(level, 0) + 1
        self.sync_bytes[level] = self.sync_bytes.get(level, 0) + payload_bytes

    @property
    def total_sync_bytes(self) -> int:
        return sum(self.sync_bytes.values())

    @property
    def total_bytes(self) -> int:
        """Gradient bytes plus model-averaging bytes sent by this rank so far."""
        return self.total_sent_bytes + self.total_sync_bytes

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over bytes actually sent (gradients + averaging); ``inf`` when nothing was sent."""
        sent = self.total_bytes
        return float("inf") if sent == 0 else self.total_dense_bytes / sent

    def as_dict(self) -> dict[str, object]:
        """Plain-JSON view for reports and checkpoints."""
        return {
            "steps": self.steps,
            "total_dense_bytes": self.total_dense_bytes,
            "total_sent_bytes": self.total_sent_bytes,
            "last_step_dense_bytes": self.last_step_dense_bytes,
            "last_step_sent_bytes": self.last_step_sent_bytes,
            "sync_rounds": dict(self.sync_rounds),
            "sync_bytes": dict(self.sync_bytes),
            "total_bytes": self.total_bytes,
            "compression_ratio": self.compression_ratio,
        }

    def __repr__(self) -> str:
        return (f"TrafficAccount(steps={self.steps}, dense={self.total_dense_bytes} B, "
                f"sent={self.total_sent_bytes} B, sync={self.total_sync_bytes} B in "
                f"{sum(self.sync_rounds.values())} rounds, ratio={self.compression_ratio:.1f}x)")
