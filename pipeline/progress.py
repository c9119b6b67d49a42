"""Observability of long stages: a one-line progress bar over Dask futures, and the dashboard span."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import distributed
from distributed import as_completed


def track(futures: Iterable[Any], label: str, *, stream: Any = None, every: float = 0.5, loop: Any = None
          ) -> Iterator[Any]:
    """Yield futures as they complete while printing ``label  done/total  elapsed`` (TTY or not).

    ``loop``: the event loop of the futures' client (``client.loop``); needed when that client is not the default.
    """
    futs = list(futures)
    out = stream if stream is not None else sys.stderr
    total = len(futs)
    start = last = time.perf_counter()
    done = 0
    tty = getattr(out, "isatty", lambda: False)()
    for fut in as_completed(futs, loop=loop):
        done += 1
        now = time.perf_counter()
        if now - last >= every or done == total:
            last = now
            width = 24
            bar = "#" * int(width * done / max(total, 1))
            line = f"{label:<12} [{bar:<{width}}] {done}/{total} {now - start:6.1f}s"
            out.write(("\r" + line) if tty else (line + "\n"))
            out.flush()
        yield fut
    if tty:
        out.write("\n")


@contextlib.contextmanager
def stage_span(name: str) -> Iterator[str]:
    """``distributed.span(name)`` for a stage (it tags the stage's tasks on the dashboard).

    Dask DataFrame collections built inside a span warn that "annotations will be ignored when using
    query-planning"; the span still applies, because the client reads the active annotations when the
    graph is *submitted* (``Client._graph_to_futures``), so that one warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dask annotations .* detected", category=UserWarning)
        warnings.filterwarnings("ignore", message="An error occurred while calling the read_parquet",
                                category=UserWarning)
        with distributed.span(name) as span_id:
            yield span_id
