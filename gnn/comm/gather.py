"""Softmax candidates from every rank's batch: each rank's queries are scored against the items of the whole global
batch, as with one worker, instead of its own shard's batch only.

With METIS shards a rank's pairs come from one community, so its in-batch candidates do too; the gradient then
never pushes a query away from the other communities' items, and the model ranks them too high at evaluation.
:class:`CandidateGather` all-gathers the candidate embeddings and item ids of every rank each step (with
gradients: rank r's candidate rows receive the gradients of every rank's loss), keeps the rank's own rows first
(so that positions into them stay valid) and appends the other ranks' rows whose item is not already a candidate.

    gather = CandidateGather()                       # the default process group
    candidates, ids = gather(candidates, ids)        # (C, D), (C,) -> (C', D), (C',), C' >= C, own rows first
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    """All-gather rows of different counts per rank; backward: the sum over ranks of the gradient on this rank's
    rows (each rank's loss saw them)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, rows: torch.Tensor, sizes: list[int], rank: int,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group  # type: ignore[attr-defined]
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        sizes, rank = ctx.sizes, ctx.rank  # type: ignore[attr-defined]
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)  # type: ignore[attr-defined]
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]], None, None, None


class CandidateGather:
    """Callable ``(candidates (C, D), ids (C,) int64) -> (candidates (C', D), ids (C',))`` over ``group`` (default
    the world): this rank's rows first, unchanged, then the rows of the other ranks (in rank order) whose item id is
    neither among this rank's nor an earlier row's, so that every item is a candidate once. Every rank must call it
    at the same step (it runs three collectives forward and one backward). ``rows_added`` counts the other ranks'
    rows appended over all calls."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("CandidateGather needs an initialised process group (dist.init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.rows_added = 0

    def __call__(self, candidates: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if candidates.shape[0] != ids.shape[0]:
            raise ValueError(f"candidates has {candidates.shape[0]} rows but ids has {ids.shape[0]}: one id per row")
        if self.world == 1:
            return candidates, ids
        count = torch.tensor([ids.shape[0]], dtype=torch.int64, device=ids.device)
        counts = [torch.empty_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count, group=self.group)
        sizes = [int(c) for c in counts]
        all_ids = _GatherRows.apply(ids.to(torch.int64), sizes, self.rank, self.group)
        all_rows = _GatherRows.apply(candidates, sizes, self.rank, self.group)
        start = sum(sizes[:self.rank])
        own = np.arange(start, start + sizes[self.rank])
        others = np.concatenate([np.arange(sum(sizes[:r]), sum(sizes[:r + 1]))
                                 for r in range(self.world) if r != self.rank])
        ids_np = all_ids.cpu().numpy()
        other_ids = ids_np[others]
        fresh = ~np.isin(other_ids, ids_np[own])
        _, first = np.unique(other_ids, return_index=True)  # the first row of every item among the other ranks'
        keep = np.zeros(len(others), dtype=bool)
        keep[first] = True
        keep &= fresh
        index = torch.from_numpy(np.concatenate([own, others[keep]])).to(candidates.device)
        self.rows_added += int(keep.sum())
        return all_rows[index], all_ids[index]
