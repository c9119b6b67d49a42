"""Project measured per-step gradient bytes to the time per step on a cluster (bandwidth model, no overlap).

Model, per step and per worker, link bandwidth ``b`` bytes/s (full duplex), latency ``a`` s per message round:
  ring all-reduce of B bytes over N workers:     2(N−1)/N · B / b + 2(N−1)·a
  ring all-gather of S bytes from each worker:   (N−1) · S / b + (N−1)·a
  dense / fp16 / bf16 / PowerSGD:                all-reduce of what the hook sends
  DGC:                                           all-gather of the sparse values+indices + all-reduce of dim≤1 tensors
  local:H / hierarchical:                        model all-reduce in the level's group, times the level's frequency
                                                 (a G@grad level: a gradient all-reduce in groups of G every step)
  step time = compute + codec overhead + communication (no compute/communication overlap: an upper bound).

Two tiers: a level whose groups are smaller than the cluster (G < N) can run inside a node, over links of
``group_bandwidth`` (NVLink, PCIe, shared memory) while everything that spans the cluster (dense all-reduce, DGC's
all-gather, a level over all workers) crosses the slower network at ``bandwidth``. A group is consecutive ranks and
ranks follow the sorted worker addresses (pipeline/launch.py), so with the same number of workers on every host and G
dividing it, each group lies inside one node. Without ``group_bandwidth`` every link is equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gnn.comm.config import SyncLevel


def ring_allreduce_seconds(payload_bytes: float, workers: int, *, bandwidth: float, latency: float = 0.0) -> float:
    """Time of a ring all-reduce of ``payload_bytes`` over ``workers`` (0 for one worker)."""
    if workers < 1 or bandwidth <= 0:
        raise ValueError(f"workers={workers} must be >= 1 and bandwidth={bandwidth} > 0")
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) / workers * payload_bytes / bandwidth + 2 * (workers - 1) * latency


def ring_allgather_seconds(payload_bytes: float, workers: int, *, bandwidth: float, latency: float = 0.0) -> float:
    """Time of a ring all-gather where every worker contributes ``payload_bytes``."""
    if workers < 1 or bandwidth <= 0:
        raise ValueError(f"workers={workers} must be >= 1 and bandwidth={bandwidth} > 0")
    return (workers - 1) * payload_bytes / bandwidth + (workers - 1) * latency


def level_frequencies(levels: Sequence[SyncLevel]) -> list[float]:
    """Share of steps at which each level is the one that averages (the largest dividing period wins); a gradient
    level (``G@grad``) communicates at every step, beside the others: share 1."""
    horizon = math.lcm(*(lv.period for lv in levels))
    counts = [horizon if lv.gradients else 0 for lv in levels]
    for t in range(1, horizon + 1):
        for i in reversed(range(len(levels))):
            if t % levels[i].period == 0 and not levels[i].gradients:
                counts[i] += 1
                break
    return [c / horizon for c in counts]


@dataclass(frozen=True)
class StepTraffic:
    """Measured per-step traffic of one mode (bytes this worker sends per step).

    ``allreduce_bytes``: all-reduced payload; ``allgather_bytes``: all-gathered payload (DGC's values+indices);
    ``model_bytes`` + ``levels``: model averaging (local/hierarchical); ``codec_seconds``: measured extra local time
    of the mode over plain all-reduce (compression, selection), 0 if none.
    """

    allreduce_bytes: float = 0.0
    allgather_bytes: float = 0.0
    model_bytes: float = 0.0
    levels: tuple[SyncLevel, ...] = ()
    codec_seconds: float = 0.0


def communication_seconds(traffic: StepTraffic, workers: int, *, bandwidth: float, latency: float = 0.0,
                          group_bandwidth: float | None = None) -> float:
    """Projected communication time per step of ``traffic`` on ``workers`` workers; the all-reduces of a level whose
    groups are smaller than ``workers`` run at ``group_bandwidth`` (inside a node; default ``bandwidth``)."""
    if group_bandwidth is not None and group_bandwidth <= 0:
        raise ValueError(f"group_bandwidth={group_bandwidth} must be > 0 (bytes/s), or None for one link speed")
    seconds = ring_allreduce_seconds(traffic.allreduce_bytes, workers, bandwidth=bandwidth, latency=latency) \
        if traffic.allreduce_bytes else 0.0
    if traffic.allgather_bytes:
        seconds += ring_allgather_seconds(traffic.allgather_bytes, workers, bandwidth=bandwidth, latency=latency)
    if traffic.levels:
        for level, share in zip(traffic.levels, level_frequencies(traffic.levels), strict=True):
            group = workers if level.group_size is None else min(level.group_size, workers)
            link = group_bandwidth if group_bandwidth is not None and group < workers else bandwidth
            seconds += share * ring_allreduce_seconds(traffic.model_bytes, group, bandwidth=link, latency=latency)
    return seconds


def projected_step_seconds(traffic: StepTraffic, workers: int, *, compute_seconds: float, bandwidth: float,
                           latency: float = 0.0, group_bandwidth: float | None = None) -> float:
    """Compute + codec overhead + projected communication, per step (no overlap)."""
    return compute_seconds + traffic.codec_seconds + communication_seconds(
        traffic, workers, bandwidth=bandwidth, latency=latency, group_bandwidth=group_bandwidth)


def gbit(gbit_per_s: float) -> float:
    """Gbit/s → bytes/s."""
    return gbit_per_s * 1e9 / 8
