"""Shared fixtures: paths to the real samples in ../shared/data, real local Dask clusters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from pipeline.backend import gpu_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """Path of a real sample under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real sample {path} is absent (it lives beside the project in ../shared/data)")
    return path


@pytest.fixture
def taobao_head() -> Path:
    return shared_file("taobao/UserBehavior-head.csv")


@pytest.fixture
def amazon_videogames() -> Path:
    return shared_file("amazon-videogames/Video.txt")


@pytest.fixture
def cora_npz() -> Path:
    return shared_file("cora/cora.npz")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    reasons = {"gpu": gpu_unavailable_reason(),
               "cuda": None if torch.cuda.is_available() else "no CUDA device visible to torch"}
    for marker, reason in reasons.items():
        if reason is None:
            continue
        skip = pytest.mark.skip(reason=f"{marker} test: {reason}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Client]:
    """A real 2-worker LocalCluster (separate processes, one thread each), shared by the session."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def dask_client_1() -> Iterator[Client]:
    """A real 1-worker LocalCluster, to compare against the 2-worker one.

    Not the default client: code that falls back on the default (actor handles unpickled in tasks, say) must keep
    finding the session's 2-worker cluster, or it waits on a cluster that will never run its work.
    """
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as client:
        yield client
