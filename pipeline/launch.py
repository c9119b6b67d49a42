"""Run one long-lived task per Dask worker, as the ranks of a torch.distributed job (ARCHITECTURE.md, 3).

Rank ``r`` is pinned to the ``r``-th worker (sorted by address) with ``workers=[addr],
allow_other_workers=False, pure=False``. The rendezvous address is the rank-0 worker's host and a port
that worker found free (never hard-coded). :func:`run_ranks` watches the futures *and* the cluster's
membership: the first rank that raises, or a worker that leaves the cluster while its rank runs, ends
the whole job with that rank's error (:class:`RankFailed`) instead of a hang. Surviving ranks blocked in
a collective give up after the process group's ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from distributed import Client, Future, wait

log = logging.getLogger(__name__)
R = TypeVar("R")


class RankFailed(RuntimeError):
    """A rank of a distributed job raised, or its worker left the cluster."""


@dataclass(frozen=True)
class RankInfo:
    """What a rank needs to join the process group."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    worker: str
    backend: str = "gloo"
    timeout_s: float = 120.0

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def host_of(address: str) -> str:
    """The host of a Dask address such as ``tcp://10.0.0.1:4001``."""
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def _free_port() -> tuple[str, int]:
    """(host, port) of a TCP port free on this worker's machine, on the interface Dask uses."""
    from distributed import get_worker

    host = host_of(get_worker().address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return host, int(s.getsockname()[1])


def worker_addresses(client: Client, n_ranks: int | None = None) -> list[str]:
    """The addresses of the first ``n_ranks`` workers (all by default), sorted; a clear error if too few."""
    workers = sorted(client.nthreads())
    n = len(workers) if n_ranks is None else n_ranks
    if n < 1 or len(workers) < n:
        raise ValueError(
            f"workers={n}: the cluster has {len(workers)} worker(s); start more (--workers) or ask for fewer"
        )
    return workers[:n]


def rank_infos(client: Client, n_ranks: int | None = None, *, backend: str = "gloo",
               timeout_s: float = 120.0) -> list[RankInfo]:
    """One :class:`RankInfo` per rank, with a rendezvous port found free on the rank-0 worker."""
    workers = worker_addresses(client, n_ranks)
    host, port = client.submit(_free_port, workers=[workers[0]], allow_other_workers=False, pure=False).result()
    return [RankInfo(r, len(workers), host, port, w, backend, timeout_s) for r, w in enumerate(workers)]


def run_ranks(
    client: Client,
    fn: Callable[..., R],
    infos: Sequence[RankInfo],
    *,
    args: Sequence[tuple[Any, ...]] | None = None,
    poll_s: float = 0.5,
) -> list[R]:
    """Call ``fn(info, *args[r])`` on each rank's worker; return the results in rank order.

    Raises :class:`RankFailed` with the failing rank's error as soon as one rank fails or its worker
    leaves; the other ranks' futures are cancelled.
    """
    args = args if args is not None else [() for _ in infos]
    if len(args) != len(infos):
        raise ValueError(f"args has {len(args)} entries for {len(infos)} ranks: give one tuple per rank")
    tag = uuid.uuid4().hex[:8]
    futures: list[Future] = [
        client.submit(fn, info, *a, key=f"rank-{info.rank}-{tag}", workers=[info.worker],
                      allow_other_workers=False, pure=False, retries=0)
        for info, a in zip(infos, args, strict=True)
    ]
    try:
        while True:
            running = [f for f in futures if not f.done()]
            with contextlib.suppress(TimeoutError):
                wait(running, timeout=poll_s, return_when="FIRST_COMPLETED")
            for info, fut in zip(infos, futures, strict=True):
                if fut.status == "error":
                    exc = fut.exception()
                    raise RankFailed(f"rank {info.rank} on {info.worker} failed: {type(exc).__name__}: {exc}") \
                        from exc
                if fut.status == "cancelled":
                    raise RankFailed(f"rank {info.rank} on {info.worker} was cancelled")
            if all(f.status == "finished" for f in futures):
                return [f.result() for f in futures]
            alive = set(client.nthreads())
            for info, fut in zip(infos, futures, strict=True):
                if info.worker not in alive and not fut.done():
                    raise RankFailed(
                        f"rank {info.rank}: its worker {info.worker} left the cluster (killed or out of memory); "
                        "the job was stopped — restart it, from the last checkpoint if there is one"
                    )
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)


@contextlib.contextmanager
def process_group(info: RankInfo) -> Iterator[None]:
    """``torch.distributed`` process group of ``info`` for the duration of the block, then destroyed."""
    import torch.distributed as dist

    dist.init_process_group(
        info.backend,
        init_method=info.init_method,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=info.timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def host_slots(workers: Sequence[str]) -> list[int]:
    """For each worker address, its index among the given workers on the same host: its CPU slot there."""
    seen: dict[str, int] = {}
    slots = []
    for address in workers:
        host = host_of(address)
        slots.append(seen.get(host, 0))
        seen[host] = slots[-1] + 1
    return slots


def slot_cpus(slot: int, n_cpus: int, allowed: Sequence[int] | None = None) -> list[int]:
    """The CPUs of CPU slot ``slot`` when each slot gets ``n_cpus`` of the ``allowed`` ones (default: those this
    process may run on), or a clear error when the host has too few for that many slots."""
    if allowed is None:
        allowed = sorted(os.sched_getaffinity(0))
    first = slot * n_cpus
    if n_cpus < 1 or first + n_cpus > len(allowed):
        raise ValueError(
            f"cpus_per_rank={n_cpus}: slot {slot} on this host needs CPUs {first}..{first + n_cpus - 1} but the "
            f"worker may use only {len(allowed)}; lower --cpus-per-rank or run fewer workers per host"
        )
    return list(allowed[first:first + n_cpus])


def _set_thread_affinity(cpus_of: Callable[[int], set[int]]) -> None:
    """Move each thread of this process (by thread id) to the CPU set ``cpus_of(tid)``."""
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus_of(tid))


@contextlib.contextmanager
def pinned_cpus(cpus: Sequence[int]) -> Iterator[None]:
    """Every thread of this process (and the ones it starts meanwhile) runs on ``cpus`` for the block; each
    thread's earlier CPU set is restored after it, and threads started inside get the process's earlier set.

    A CPU slot of a Dask worker (one rank per slot) then holds its producer threads, trainer thread and row
    server to its own cores instead of spreading onto the cores of the slots beside it."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cpus_per_rank > 0: this platform cannot pin threads to CPUs; use cpus_per_rank=0")
    before = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
    default = os.sched_getaffinity(0)
    _set_thread_affinity(lambda _tid: set(cpus))
    try:
        yield
    finally:
        _set_thread_affinity(lambda tid: before.get(tid, default))


def worker_pid() -> int:
    """The process id of the worker running this (for tests that kill a worker)."""
    return os.getpid()


def wait_for_workers(client: Client, n: int, timeout_s: float = 60.0) -> None:
    """Block until the cluster has ``n`` workers, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while len(client.nthreads()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster has {len(client.nthreads())} of {n} workers after {timeout_s}s")
        time.sleep(0.1)
