"""Run a function on N local gloo ranks (spawned processes) and collect what each returns: for tests, benchmarks
and notebooks. The Dask trainer does its own rendezvous; this is the single-machine stand-in.

    results = run_gloo(worker, world_size=2, args=(config,))   # worker(rank, world_size, config) -> picklable
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)

# A gloo rendezvous between spawned ranks on one busy machine can fail (a TCP pair of the full mesh closed while
# connecting); fn has not run then, so starting all ranks again is safe. Failures inside fn are never retried.
INIT_ATTEMPTS = 3


def _entry(rank: int, fn: Callable[..., Any], world_size: int, init_file: str, out_dir: str,
           args: Sequence[Any], threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    except RuntimeError:  # the rendezvous itself failed (nothing of fn ran): let run_gloo know it may start again
        (Path(out_dir) / f"rank{rank}.init_failed").touch()
        raise
    try:
        result = fn(rank, world_size, *args)
        tmp = Path(out_dir) / f"rank{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalisation. A gloo worker thread may still be releasing the last collective's
    # work, which drops Python tensors and so takes the GIL; once the interpreter is finalising, CPython ends such a
    # thread with pthread_exit, and its unwind through a noexcept destructor calls std::terminate (the rank dies by
    # SIGABRT after its result is saved: about 1 run in 6 of tests/gnn/test_comm_averaging.py). Only reached on
    # success; an exception above still goes to torch.multiprocessing, which reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo(fn: Callable[..., Any], *, world_size: int = 2, args: Sequence[Any] = (), threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return their results by rank.

    Args:
        fn: a module-level (picklable) function; its return value must be ``torch.save``-able.
        world_size: number of ranks (default 2).
        args: extra positional arguments for ``fn`` (default none).
        threads: ``torch.set_num_threads`` in each rank (default 1).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    for attempt in range(1, INIT_ATTEMPTS + 1):
        with tempfile.TemporaryDirectory(prefix="gloo-") as tmp:
            init_file = str(Path(tmp) / "rendezvous")
            try:
                mp.start_processes(_entry, args=(fn, world_size, init_file, tmp, tuple(args), threads),
                                   nprocs=world_size, join=True, start_method="spawn")
            except (mp.ProcessRaisedException, mp.ProcessExitedException):
                failed = sorted(p.name for p in Path(tmp).glob("*.init_failed"))
                if not failed or attempt == INIT_ATTEMPTS:
                    raise
                logger.warning("gloo rendezvous failed (%s), attempt %d of %d; starting the ranks again",
                               ", ".join(failed), attempt, INIT_ATTEMPTS)
                continue
            return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    raise AssertionError("unreachable: the last attempt returns or raises")
