"""Producer threads that build minibatches ahead of the trainer, through a bounded local queue.

``iterate_batches(make, epoch, n_batches, mode="producer", n_threads=2, queue_size=4)`` yields
``make(epoch, 0), make(epoch, 1), ...`` in index order. In ``"producer"`` mode, ``n_threads`` threads claim batch
indices and build them while the consumer (the trainer) computes; at most ``queue_size`` batches are built or being
built and not yet consumed (the bound of the local queue, kept as a reorder buffer so that the order — and so the
result — does not depend on thread timing). ``"sync"`` mode builds each batch when it is needed (no overlap), the
comparison point. An exception in a producer is re-raised in the consumer as :class:`ProducerError`; leaving the
loop early (break, exception, KeyboardInterrupt, ``close()``) stops and joins every producer thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
Mode = Literal["producer", "sync"]
JOIN_TIMEOUT_S = 30.0


class ProducerError(RuntimeError):
    """A producer thread failed while building a batch; the original exception is the ``__cause__``."""


@dataclass
class QueueStats:
    """Accounting of one epoch's loop: batches made, seconds the consumer waited, seconds spent building."""

    produced: int = 0
    consumed: int = 0
    consumer_wait_s: float = 0.0
    build_s: float = 0.0
    max_buffered: int = 0


class _EpochRun(Generic[T]):
    """Shared state of one epoch: claimed indices, the reorder buffer, the first error, the stop flag."""

    def __init__(self, make: Callable[[int, int], T], epoch: int, n_batches: int, queue_size: int,
                 stats: QueueStats) -> None:
        self.make, self.epoch, self.n_batches, self.queue_size = make, epoch, n_batches, queue_size
        self.cond = threading.Condition()
        self.next_index = 0  # next index a producer may claim
        self.consumed = 0
        self.ready: dict[int, T] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.stats = stats

    def work(self) -> None:
        while True:
            with self.cond:
                # Bounded queue: claim only while fewer than queue_size batches are in flight or waiting.
                while not self.stopped and self.next_index < self.n_batches \
                        and self.next_index >= self.consumed + self.queue_size:
                    self.cond.wait()
                if self.stopped or self.next_index >= self.n_batches:
                    return
                index = self.next_index
                self.next_index += 1
            start = time.perf_counter()
            try:
                batch = self.make(self.epoch, index)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                with self.cond:
                    if self.error is None:
                        self.error = exc
                    self.cond.notify_all()
                return
            with self.cond:
                self.ready[index] = batch
                self.stats.produced += 1
                self.stats.build_s += time.perf_counter() - start
                self.stats.max_buffered = max(self.stats.max_buffered, len(self.ready))
                self.cond.notify_all()

    def take(self, index: int) -> T:
        start = time.perf_counter()
        with self.cond:
            while index not in self.ready and self.error is None:
                self.cond.wait()
            if index not in self.ready:
                raise ProducerError(f"producer failed building batch of epoch {self.epoch}: {self.error!r}") \
                    from self.error
            batch = self.ready.pop(index)
            self.consumed += 1
            self.stats.consumed += 1
            self.stats.consumer_wait_s += time.perf_counter() - start
            self.cond.notify_all()
            return batch

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.ready.clear()
            self.cond.notify_all()


def iterate_batches(make: Callable[[int, int], T], *, epoch: int, n_batches: int, mode: Mode = "producer",
                    n_threads: int = 2, queue_size: int = 4,
                    stats: QueueStats | None = None) -> Generator[T, None, None]:
    """Yield ``make(epoch, i)`` for ``i`` in ``range(n_batches)`` (see the module docstring).

    Args:
        make: batch builder, a pure function of ``(epoch, index)`` (e.g. ``gnn.batches.PairBatcher``).
        epoch: passed to ``make``.
        n_batches: batches in the epoch.
        mode: ``"producer"`` (default) or ``"sync"``.
        n_threads: producer threads (default 2).
        queue_size: most batches built ahead of the consumer (default 4).
        stats: filled in while iterating, if given.
    """
    if mode not in ("producer", "sync"):
        raise ValueError(f"mode={mode!r}: use 'producer' or 'sync'")
    if n_threads < 1 or queue_size < 1:
        raise ValueError(f"n_threads={n_threads}, queue_size={queue_size}: both must be at least 1")
    stats = QueueStats() if stats is None else stats
    if mode == "sync":
        for index in range(n_batches):
            start = time.perf_counter()
            batch = make(epoch, index)
            stats.build_s += time.perf_counter() - start
            stats.consumer_wait_s += time.perf_counter() - start
            stats.produced += 1
            stats.consumed += 1
            yield batch
        return
    run: _EpochRun[T] = _EpochRun(make, epoch, n_batches, queue_size, stats)
    threads = [threading.Thread(target=run.work, name=f"pinsage-producer-{epoch}-{i}", daemon=True)
               for i in range(min(n_threads, max(n_batches, 1)))]
    for thread in threads:
        thread.start()
    try:
        for index in range(n_batches):
            yield run.take(index)
    finally:
        run.stop()
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():  # only if make() itself hangs; reported, never silently left behind
                logger.error("producer thread %s did not stop within %.0f s", thread.name, JOIN_TIMEOUT_S)
