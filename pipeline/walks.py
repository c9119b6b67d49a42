"""Stage ``walks``: PinSage neighbourhoods, vertex importance and hard negatives, walk starts spread over Dask.

Reads the graph store of stage ``graph`` (``<run>/graph/``) and writes ``<run>/walks/`` (see
:func:`gnn.walks.save_neighborhoods`). Each task walks from a chunk of ``chunk_items`` start items on a worker that
memory-maps the store once per process (:func:`gnn.walks.cached_walk_graph`) and adds the chunk's visit counts
into that worker's accumulator; the client gathers the per-chunk top-T rows as chunks finish, then one count
vector per worker, so no process holds all walks and the bytes moved do not grow with the number of chunks.

    pinsage walks --run-dir runs/x --n-walks 50 --hops 3 --top-t 20
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, span

from gnn.graphstore import load_graph_store
from gnn.walks import (
    NeighborhoodChunk,
    Neighborhoods,
    WalkConfig,
    assemble,
    cached_walk_graph,
    chunk_bounds,
    save_neighborhoods,
    store_token,
    walk_chunk,
)
from pipeline.backend import Backend
from pipeline.cluster import cluster_client
from pipeline.common import add_arguments, add_common_arguments, cluster_config, from_sources, settings
from pipeline.config import ConfigError
from pipeline.progress import track
from pipeline.rundir import StageOutput, read_stage, run_stage

log = logging.getLogger(__name__)

STAGE = "walks"


@dataclasses.dataclass
class VisitAccumulator:
    """Visit counts summed on one worker over the chunks it ran in one run (``chunks``: their first items).

    Dense per-chunk count vectors sent to the client would cost O(chunks x (items + users)) bytes; summed where
    they are made, the client receives one vector per worker.
    """

    item_visits: np.ndarray  # (n_items,) int64
    user_visits: np.ndarray  # (n_users,) int64
    chunks: list[int]

    def add(self, chunk: NeighborhoodChunk) -> None:
        self.item_visits += chunk.item_visits
        self.user_visits += chunk.user_visits
        self.chunks.append(chunk.lo)


_ACCUMULATORS: dict[str, VisitAccumulator] = {}  # per worker process, by run id
_ACCUMULATORS_LOCK = threading.Lock()


def _walk_task(path: str, token: str, cfg: WalkConfig, lo: int, hi: int, run_id: str | None = None
               ) -> NeighborhoodChunk:
    """One chunk of starts. With ``run_id`` the visit counts are added into this worker's accumulator of the
    run and the returned chunk carries empty visit vectors."""
    graph = cached_walk_graph(path, token, weighted=cfg.bias == "weight")
    chunk = walk_chunk(graph, cfg, lo, hi)
    if run_id is None:
        return chunk
    with _ACCUMULATORS_LOCK:
        acc = _ACCUMULATORS.get(run_id)
        if acc is None:
            acc = _ACCUMULATORS[run_id] = VisitAccumulator(
                np.zeros(chunk.item_visits.shape[0], np.int64), np.zeros(chunk.user_visits.shape[0], np.int64), [])
        acc.add(chunk)
    empty = np.zeros(0, np.int32)
    return dataclasses.replace(chunk, item_visits=empty, user_visits=empty)


def _pop_accumulator(run_id: str) -> VisitAccumulator | None:
    with _ACCUMULATORS_LOCK:
        return _ACCUMULATORS.pop(run_id, None)


def _collect_visits(client: Client, run_id: str, path: str, token: str, cfg: WalkConfig,
                    bounds: list[tuple[int, int]], n_items: int, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum the workers' accumulators; a chunk whose counts were lost with a worker (or added twice after a
    retry) is recomputed (walks are deterministic) and added (subtracted), so the totals are exact."""
    item_visits = np.zeros(n_items, np.int64)
    user_visits = np.zeros(n_users, np.int64)
    seen: dict[int, int] = {}
    for acc in client.run(_pop_accumulator, run_id).values():
        if acc is None:
            continue
        item_visits += acc.item_visits
        user_visits += acc.user_visits
        for lo in acc.chunks:
            seen[lo] = seen.get(lo, 0) + 1
    for lo, hi in bounds:
        times = seen.get(lo, 0)
        if times != 1:
            log.warning("walks: visit counts of chunk [%d, %d) arrived %d times; recomputing them", lo, hi, times)
            chunk = client.submit(_walk_task, path, token, cfg, lo, hi, pure=False).result()
            item_visits += (1 - times) * chunk.item_visits.astype(np.int64)
            user_visits += (1 - times) * chunk.user_visits.astype(np.int64)
    return item_visits, user_visits


def _gpu_task(path: str, cfg: WalkConfig) -> Neighborhoods:  # pragma: no cover - needs a GPU
    from gnn.walks_gpu import gpu_neighborhoods

    return gpu_neighborhoods(load_graph_store(path), cfg)


@dataclasses.dataclass
class WalkStats:
    """What a distributed run did: chunks, walk steps and time."""

    chunks: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def distributed_neighborhoods(client: Client, store_path: str | Path, cfg: WalkConfig, *,
                              backend: Backend = "cpu", progress: bool = True,
                              stats: WalkStats | None = None) -> Neighborhoods:
    """Neighbourhoods of every item of the store at ``store_path``, chunks of starts on every worker.

    ``backend`` (``"cpu"``): ``"gpu"`` runs cuGraph in one task on one worker; ``progress`` (True): a
    terminal bar; ``stats`` (None): filled with chunk / step counts and time. The result is identical for any
    number of workers and any ``cfg.chunk_items``.
    """
    path = str(Path(store_path).resolve())
    store = load_graph_store(path)  # validates format and version here, before any task runs
    if store.n_items == 0:
        raise ValueError(f"graph store {path} has no items: nothing to walk from; check the graph stage's input")
    started = time.perf_counter()
    with span(STAGE):
        if backend == "gpu":  # pragma: no cover - needs a GPU
            return client.submit(_gpu_task, path, cfg, pure=False).result()
        token = store_token(path)
        run_id = uuid.uuid4().hex
        bounds = chunk_bounds(store.n_items, cfg.chunk_items)
        futures = [client.submit(_walk_task, path, token, cfg, lo, hi, run_id, pure=False,
                                 key=f"walks-{run_id[:8]}-{lo}") for lo, hi in bounds]
        rows: list[NeighborhoodChunk] = []
        try:
            done = track(futures, STAGE) if progress else iter(futures)
            for fut in done:
                rows.append(fut.result())  # top-T rows and hard negatives only: O(chunk x T) bytes
                fut.release()
            item_visits, user_visits = _collect_visits(client, run_id, path, token, cfg, bounds, store.n_items,
                                                       store.n_users)
        finally:
            client.run(_pop_accumulator, run_id)  # nothing is left on the workers, whatever happened
        rows.sort(key=lambda c: c.lo)
        steps = sum(c.n_steps for c in rows)
        nb = assemble(rows, item_visits, user_visits, n_hard_negatives=cfg.n_hard_negatives)
    if stats is not None:
        stats.chunks, stats.steps, stats.seconds = len(bounds), steps, time.perf_counter() - started
    return nb


def run_walks(run_dir: str | Path, cfg: WalkConfig, client: Client, *, backend: Backend = "cpu",
              force: bool = False) -> StageOutput:
    """Run stage ``walks`` in ``run_dir`` (a no-op when its output is current)."""
    graph = read_stage(run_dir, "graph")

    def build(tmp: Path) -> dict[str, Any]:
        stats = WalkStats()
        nb = distributed_neighborhoods(client, graph.path, cfg, backend=backend, stats=stats)
        save_neighborhoods(tmp, nb)
        lengths = np.diff(nb.indptr)
        return {
            "n_items": nb.n_items,
            "n_users": int(nb.user_importance.shape[0]),
            "nnz": int(nb.indices.shape[0]),
            "empty_rows": int((lengths == 0).sum()),
            "mean_row_length": float(lengths.mean()) if lengths.size else 0.0,
            "hard_negatives_filled": float((np.asarray(nb.hard_negatives) >= 0).mean())
            if nb.hard_negatives.size else 0.0,
            "chunks": stats.chunks,
            "walk_steps": stats.steps,
            "walk_seconds": round(stats.seconds, 3),
            "steps_per_s": round(stats.steps_per_s),
            "backend": backend,
        }

    return run_stage(run_dir, STAGE, config=cfg, inputs={"graph": graph}, build=build, force=force)


def walk_config(args: argparse.Namespace, toml: dict[str, Any]) -> WalkConfig:
    try:
        return from_sources(WalkConfig, toml=toml, section=STAGE, args=args)
    except ConfigError:
        raise
    except ValueError as e:  # WalkConfig validates itself with ValueError (gnn/ does not import pipeline/)
        raise ConfigError(str(e)) from None


def _main(args: argparse.Namespace) -> int:
    toml = settings(args)
    cfg = walk_config(args, toml)
    with cluster_client(cluster_config(args, toml)) as (client, backend):
        print(f"pinsage walks: dashboard {client.dashboard_link}")
        out = run_walks(args.run_dir, cfg, client, backend=backend, force=args.force)
    state = "up to date" if out.reused else "done"
    rep = out.report
    print(f"pinsage walks: {state}: {out.path} ({rep.get('n_items')} items, {rep.get('nnz')} neighbours, "
          f"{rep.get('steps_per_s')} steps/s)")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(STAGE, help="random-walk neighbourhoods, importance and hard negatives of every item",
                              description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_arguments(p)
    add_arguments(p, WalkConfig)
    p.set_defaults(func=_main)
