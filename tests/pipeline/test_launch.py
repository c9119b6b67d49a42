"""Ranks on a real 2-worker LocalCluster with real gloo process groups."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from distributed import Client, LocalCluster

from pipeline.launch import (
    RankFailed,
    RankInfo,
    host_slots,
    pinned_cpus,
    process_group,
    rank_infos,
    run_ranks,
    slot_cpus,
    wait_for_workers,
    worker_pid,
)

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"),
                                    reason="this platform cannot pin threads to CPUs")


def _allreduce_rank(info: RankInfo, value: float) -> list[float]:
    with process_group(info):
        t = torch.tensor([value, float(info.rank)])
        dist.all_reduce(t)
        return t.tolist()


def _fail_on_rank_1(info: RankInfo) -> int:
    if info.rank == 1:
        raise ValueError("bad shard 1: no items")
    return info.rank


def _sleep_in_collective(info: RankInfo) -> None:
    with process_group(info):
        t = torch.zeros(1)
        if info.rank == 0:
            time.sleep(60)  # rank 1 waits in all_reduce; rank 0's worker gets killed meanwhile
        dist.all_reduce(t)


def test_ranks_form_a_process_group(dask_client: Client) -> None:
    infos = rank_infos(dask_client, 2)
    assert [i.rank for i in infos] == [0, 1]
    assert len({i.worker for i in infos}) == 2
    assert infos[0].master_port > 0
    out = run_ranks(dask_client, _allreduce_rank, infos, args=[(1.5,), (2.5,)])
    assert out == [[4.0, 1.0], [4.0, 1.0]]
    # a second job on the same workers works too (the group was destroyed)
    assert run_ranks(dask_client, _allreduce_rank, rank_infos(dask_client, 2), args=[(1.0,), (1.0,)])[0][0] == 2.0


def test_a_failing_rank_ends_the_job_with_its_error(dask_client: Client) -> None:
    with pytest.raises(RankFailed, match=r"rank 1 on tcp://.* failed: ValueError: bad shard 1: no items"):
        run_ranks(dask_client, _fail_on_rank_1, rank_infos(dask_client, 2))


def test_too_few_workers_is_a_clear_error(dask_client: Client) -> None:
    with pytest.raises(ValueError, match="the cluster has 2 worker"):
        rank_infos(dask_client, 3)


def test_killed_worker_ends_the_job() -> None:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        infos = [RankInfo(i.rank, i.world_size, i.master_addr, i.master_port, i.worker, timeout_s=20)
                 for i in rank_infos(client, 2)]
        victim = infos[0].worker
        pid = client.submit(worker_pid, workers=[victim], pure=False).result()

        def kill_soon() -> None:
            time.sleep(2.0)
            os.kill(pid, signal.SIGKILL)

        import threading

        killer = threading.Thread(target=kill_soon)
        killer.start()
        with pytest.raises(RankFailed, match=r"left the cluster|failed"):
            run_ranks(client, _sleep_in_collective, infos)
        killer.join()
        wait_for_workers(client, 2)


def test_host_slots_count_ranks_per_host() -> None:
    workers = ["tcp://10.0.0.1:4001", "tcp://10.0.0.2:4001", "tcp://10.0.0.1:4002", "tcp://10.0.0.1:4003"]
    assert host_slots(workers) == [0, 0, 1, 2]


def test_slot_cpus_split_the_allowed_cpus_and_refuse_too_many() -> None:
    assert slot_cpus(0, 2, [0, 1, 4, 5]) == [0, 1]
    assert slot_cpus(1, 2, [0, 1, 4, 5]) == [4, 5]
    with pytest.raises(ValueError, match=r"cpus_per_rank=2: slot 2 .* may use only 4; lower --cpus-per-rank"):
        slot_cpus(2, 2, [0, 1, 4, 5])


@needs_affinity
def test_pinned_cpus_holds_every_thread_and_restores_it() -> None:
    import threading

    before = os.sched_getaffinity(0)
    target = [min(before)]
    seen: list[set[int]] = []
    started = threading.Event()
    release = threading.Event()

    def other() -> None:  # a thread that exists before the block (like a worker's event loop)
        started.set()
        release.wait(10)
        seen.append(os.sched_getaffinity(0))

    t = threading.Thread(target=other)
    t.start()
    started.wait(10)
    with pinned_cpus(target):
        assert os.sched_getaffinity(0) == set(target)
        inner: list[set[int]] = []
        child = threading.Thread(target=lambda: inner.append(os.sched_getaffinity(0)))
        child.start()
        child.join()
        assert inner == [set(target)]  # threads started inside (producers) inherit the slot
        release.set()
        t.join()
    assert seen == [set(target)]  # and a thread that was already running was moved too
    assert os.sched_getaffinity(0) == before
