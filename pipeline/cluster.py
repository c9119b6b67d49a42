"""One function that gives a ``distributed.Client`` (ARCHITECTURE.md, decision 2).

* default: a new ``LocalCluster`` bound to 127.0.0.1 (scheduler and dashboard);
* ``scheduler="tcp://host:8786"``: an existing ``dask scheduler`` with ``dask worker`` s on any machines;
* the GPU backend: ``dask_cuda.LocalCUDACluster``, one worker per GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from distributed import Client

from pipeline.backend import Backend, resolve_backend
from pipeline.config import check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Where the work runs.

    ``n_workers`` / ``threads_per_worker`` apply to a new local cluster only; ``processes=False`` runs the
    workers as threads of this process (tests). ``dashboard_address`` ``"127.0.0.1:0"`` picks a free port.
    """

    backend: Literal["auto", "cpu", "gpu"] = "auto"
    scheduler: str | None = None
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    processes: bool = True
    dashboard_address: str = "127.0.0.1:8787"

    def __post_init__(self) -> None:
        check(self.n_workers >= 1, "cluster.n_workers", self.n_workers, "must be at least 1")
        check(self.threads_per_worker >= 1, "cluster.threads_per_worker", self.threads_per_worker,
              "must be at least 1")
        if self.scheduler is not None:
            check("://" in self.scheduler, "cluster.scheduler", self.scheduler,
                  "must be an address such as tcp://10.0.0.5:8786")


def _local_cpu_cluster(cfg: ClusterConfig) -> Client:
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=cfg.processes,
        host="127.0.0.1",
        dashboard_address=cfg.dashboard_address,
        memory_limit=cfg.memory_limit,
    )
    return Client(cluster)


def _local_gpu_cluster(cfg: ClusterConfig) -> Client:  # pragma: no cover - needs a GPU
    from dask_cuda import LocalCUDACluster

    cluster = LocalCUDACluster(
        host="127.0.0.1",
        dashboard_address=cfg.dashboard_address,
        threads_per_worker=cfg.threads_per_worker,
        memory_limit=cfg.memory_limit,
        rmm_allocator_external_lib_list=["torch"],
    )
    return Client(cluster)


def make_client(cfg: ClusterConfig) -> tuple[Client, Backend]:
    """A connected client and the resolved backend. Close it with ``client.close()`` (and its cluster)."""
    backend = resolve_backend(cfg.backend)
    # The P2P shuffle logs every shuffle's start and end at WARNING level; they are not warnings.
    logging.getLogger("distributed.shuffle").setLevel(logging.ERROR)
    if cfg.scheduler is not None:
        client = Client(cfg.scheduler)
    elif backend == "gpu":
        client = _local_gpu_cluster(cfg)
    else:
        client = _local_cpu_cluster(cfg)
    if backend == "gpu":
        import dask

        dask.config.set({"dataframe.backend": "cudf"})
    log.info("dask client %s, backend %s, dashboard %s", client, backend, client.dashboard_link)
    return client, backend


@contextlib.contextmanager
def cluster_client(cfg: ClusterConfig) -> Iterator[tuple[Client, Backend]]:
    """Context manager around :func:`make_client` that closes the client and any cluster it started."""
    client, backend = make_client(cfg)
    try:
        yield client, backend
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and cfg.scheduler is None:
            cluster.close()
