"""Terminal progress for long stages: a one-line bar on stderr over a set of Dask futures."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from distributed import as_completed


def track(futures: Iterable[Any], label: str, *, stream: Any = None, every: float = 0.5) -> Iterator[Any]:
    """Yield futures as they complete while printing ``label  done/total  elapsed`` (TTY or not)."""
    futs = list(futures)
    out = stream if stream is not None else sys.stderr
    total = len(futs)
    start = last = time.perf_counter()
    done = 0
    tty = getattr(out, "isatty", lambda: False)()
    for fut in as_completed(futs):
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
