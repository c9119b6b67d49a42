"""The single-machine gloo launcher (gnn.comm.launch.run_gloo): results by rank, and a rank's exception reaches the
caller."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from gnn.comm import launch
from gnn.comm.launch import run_gloo


def summing_worker(rank: int, world: int, scale: int) -> dict[str, object]:
    value = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(value)  # a real collective right before the rank returns and leaves
    return {"rank": rank, "world": world, "sum": float(value)}


def failing_worker(rank: int, world: int) -> int:
    dist.barrier()
    if rank == 1:
        raise ValueError("rank 1 refuses")
    return rank


@pytest.mark.timeout(240)
def test_run_gloo_returns_each_ranks_result_in_rank_order() -> None:
    results = run_gloo(summing_worker, world_size=3, args=(10,))
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 and r["sum"] == 60.0 for r in results)


@pytest.mark.timeout(240)
def test_run_gloo_reports_a_ranks_exception(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ProcessRaisedException, match="rank 1 refuses"):
        run_gloo(failing_worker, world_size=2)
    assert "rendezvous failed" not in caplog.text  # a failure inside the worker is never run again


@pytest.mark.timeout(240)
def test_run_gloo_starts_again_only_when_the_rendezvous_fails(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(launch, "INIT_ATTEMPTS", 2)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-interface0")  # the spawned ranks' gloo cannot start
    with pytest.raises(ProcessRaisedException, match="no-such-interface0"):
        run_gloo(summing_worker, world_size=2, args=(1,))
    warnings = [r for r in caplog.records if "rendezvous failed" in r.getMessage()]
    assert [r.getMessage().split("), ")[1] for r in warnings] == ["attempt 1 of 2; starting the ranks again"]


def test_run_gloo_rejects_an_empty_world() -> None:
    with pytest.raises(ValueError, match="world_size=0 must be >= 1"):
        run_gloo(summing_worker, world_size=0)
