"""Softmax candidates gathered from every rank (gnn.comm.gather.CandidateGather) on a real gloo group of 3 ranks:
own rows first, every item once, and the gradients of every rank's loss on each rank's rows."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gnn.comm.gather import CandidateGather
from gnn.comm.launch import run_gloo
from gnn.loss import SampledSoftmaxLoss

IDS = [[0, 1, 2], [3, 2, 4], [4, 5, 0]]  # each rank's distinct candidate items; items 0, 2 and 4 on two ranks


def table() -> torch.Tensor:
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(0))


def upstream(rank: int, n: int) -> torch.Tensor:
    """The made-up gradient each rank's loss puts on its gathered rows: (n, 3), distinct per rank and row."""
    return torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100.0 * rank


UNEQUAL = [[0, 1, 2], [3, 2], [4, 5, 0, 1]]  # different counts per rank (the last batch of an epoch, say)


def gather_worker(rank: int, world: int, table_ids: list[list[int]], max_rows: int | None) -> dict[str, Any]:
    ids = torch.tensor(table_ids[rank])
    rows = table()[ids].clone().requires_grad_()
    gather = CandidateGather(max_rows=max_rows)
    out, out_ids = gather(rows, ids)
    (out * upstream(rank, out.shape[0])).sum().backward()
    return {"ids": out_ids.tolist(), "rows": out.detach(), "grad": rows.grad, "added": gather.rows_added}


def source(table_ids: list[list[int]], rank: int, item: int) -> tuple[int, int]:
    """(rank, position) of the row that ``rank`` uses for ``item``: its own, else the first other rank's."""
    if item in table_ids[rank]:
        return rank, table_ids[rank].index(item)
    return next((r, ids.index(item)) for r, ids in enumerate(table_ids) if r != rank and item in ids)


def expected_order(table_ids: list[list[int]], rank: int) -> list[int]:
    """Own items, then the other ranks' in rank order, each item once."""
    order = list(table_ids[rank])
    for r, ids in enumerate(table_ids):
        order += [i for i in ids if r != rank and i not in order]
    return order


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("table_ids", "max_rows"), [(IDS, None), (IDS, 3), (UNEQUAL, None), (UNEQUAL, 6)],
                         ids=["three-collectives", "packed", "unequal-three-collectives", "unequal-packed"])
def test_gather_puts_own_rows_first_takes_every_item_once_and_sums_every_ranks_gradient(
        table_ids: list[list[int]], max_rows: int | None) -> None:
    results = run_gloo(gather_worker, world_size=3, args=(table_ids, max_rows))
    if table_ids is IDS:
        assert [r["ids"] for r in results] == [[0, 1, 2, 3, 4, 5], [3, 2, 4, 0, 1, 5], [4, 5, 0, 1, 2, 3]]
        assert [r["added"] for r in results] == [3, 3, 3]
    assert [r["ids"] for r in results] == [expected_order(table_ids, rank) for rank in range(3)]
    for r in results:
        assert torch.equal(r["rows"], table()[torch.tensor(r["ids"])])  # every row is its item's row
    expected = [torch.zeros(len(ids), 3) for ids in table_ids]
    for s, r in enumerate(results):
        grad_out = upstream(s, len(r["ids"]))
        for k, item in enumerate(r["ids"]):
            owner, pos = source(table_ids, s, item)
            expected[owner][pos] += grad_out[k]
    for rank, r in enumerate(results):
        assert torch.equal(r["grad"], expected[rank]), rank


def too_many_worker(rank: int, world: int) -> str:
    ids = torch.tensor(UNEQUAL[rank])
    try:
        CandidateGather(max_rows=1)(table()[ids], ids)  # every rank over its bound: none reaches a collective
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(240)
def test_packed_gather_refuses_more_rows_than_its_bound() -> None:
    results = run_gloo(too_many_worker, world_size=3)
    assert [f"{len(ids)} candidates on rank {rank} but max_rows=1" in r
            for rank, (ids, r) in enumerate(zip(UNEQUAL, results, strict=True))] == [True] * 3


def loss_worker(rank: int, world: int) -> dict[str, Any]:
    """Both ranks' softmax losses with gathered candidates, and the gradient on a shared weight (DDP averages the
    ranks' gradients, so the mean of the two equals the gradient of the mean loss over one process's view)."""
    weight = torch.ones(3, requires_grad=True)
    ids = torch.tensor(IDS[rank])
    emb = table()[ids] * weight
    loss = SampledSoftmaxLoss(0.5, gather=CandidateGather())(emb[:2], emb, torch.tensor([0, 1]),
                                                             torch.tensor([1, 2]), torch.ones(2), ids)
    loss.backward()
    return {"loss": float(loss.detach()), "grad": weight.grad}


@pytest.mark.timeout(240)
def test_gathered_softmax_gradient_is_the_gradient_of_the_ranks_mean_loss() -> None:
    results = run_gloo(loss_worker, world_size=3)
    weight = torch.ones(3, requires_grad=True)
    total = torch.zeros(())
    for rank in range(3):  # one process: each rank's queries against the union of the items, own rows first
        ids = IDS[rank] + [i for i in range(6) if i not in IDS[rank]]
        emb = table()[torch.tensor(ids)] * weight
        loss = SampledSoftmaxLoss(0.5)(emb[:2], emb, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.ones(2))
        assert float(loss.detach()) == pytest.approx(results[rank]["loss"], rel=1e-6)
        total = total + loss
    (total / 3).backward()
    mean_grad = sum(r["grad"] for r in results) / 3
    assert torch.allclose(mean_grad, weight.grad, atol=1e-6)


def test_gather_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        CandidateGather()
