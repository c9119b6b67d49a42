"""Softmax candidates from every rank's batch: each rank's queries are scored against the items of the whole global
batch, as with one worker, instead of its own shard's batch only.

With METIS shards a rank's pairs come from one community, so its in-batch candidates do too; the gradient then
never pushes a query away from the other communities' items, and the model ranks them too high at evaluation.
:class:`CandidateGather` all-gathers the candidate embeddings and item ids of every rank each step (with
gradients: rank r's candidate rows receive the gradients of every rank's loss), keeps the rank's own rows first
(so that positions into them stay valid) and appends the other ranks' rows whose item is not already a candidate.

    gather = CandidateGather(max_rows=batcher.max_candidates)   # the default process group
    candidates, ids = gather(candidates, ids)        # (C, D), (C,) -> (C', D), (C',), C' >= C, own rows first

With ``max_rows`` (a bound on C that every rank knows) the rows and their ids travel in one all-gather, padded to
``max_rows``; without it, three (the counts, the ids, the rows). On two idle cores that takes a gather of the
stage's default batch from 5.9 to 3.9 ms (results/gather.json). Inside a training step the gather costs much more
(~35 ms of a 150 ms step on the 16-core device CPU, results/dtrain_device.json), mostly in waiting for the slower
rank, which packing does not remove.
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


class _GatherPacked(torch.autograd.Function):
    """One all-gather of every rank's rows and ids, padded to ``max_rows`` (id -1 marks padding; the int64 ids ride
    as raw bytes in extra columns of the rows' dtype). Fills ``sizes`` with each rank's row count; backward as
    :class:`_GatherRows` (the gradient of the rank's own rows summed over ranks)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, rows: torch.Tensor, ids: torch.Tensor, max_rows: int,
                sizes: list[int], rank: int, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
        c, d = rows.shape
        id_cols = 8 // rows.element_size()  # int64 id bytes in columns of the rows' dtype
        packed = rows.new_zeros((max_rows, d + id_cols))
        packed[:c, :d] = rows
        padded_ids = torch.full((max_rows,), -1, dtype=torch.int64, device=rows.device)
        padded_ids[:c] = ids
        packed[:, d:] = padded_ids.view(rows.dtype).view(max_rows, id_cols)
        parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, packed, group=group)
        all_ids = [part[:, d:].contiguous().view(torch.int64).view(max_rows) for part in parts]
        sizes.extend(int((part_ids >= 0).sum()) for part_ids in all_ids)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group  # type: ignore[attr-defined]
        out_ids = torch.cat([part_ids[:n] for part_ids, n in zip(all_ids, sizes, strict=True)])
        ctx.mark_non_differentiable(out_ids)
        return torch.cat([part[:n, :d] for part, n in zip(parts, sizes, strict=True)]), out_ids

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor,
                 _grad_ids: torch.Tensor | None) -> tuple[torch.Tensor, None, None, None, None, None]:
        sizes, rank = ctx.sizes, ctx.rank  # type: ignore[attr-defined]
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)  # type: ignore[attr-defined]
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]], None, None, None, None, None


class CandidateGather:
    """Callable ``(candidates (C, D), ids (C,) int64) -> (candidates (C', D), ids (C',))`` over ``group`` (default
    the world): this rank's rows first, unchanged, then the rows of the other ranks (in rank order) whose item id is
    neither among this rank's nor an earlier row's, so that every item is a candidate once. Every rank must call it
    at the same step (it runs one collective forward with ``max_rows``, three without, and one backward).
    ``max_rows``: a bound on C, the same on every rank (``PairBatcher.max_candidates``); a call with more rows raises.
    ``rows_added`` counts the other ranks' rows appended over all calls."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, max_rows: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("CandidateGather needs an initialised process group (dist.init_process_group)")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: must be >= 1 (a bound on a batch's candidates), or None")
        self.group, self.max_rows = group, max_rows
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.rows_added = 0

    def __call__(self, candidates: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if candidates.shape[0] != ids.shape[0]:
            raise ValueError(f"candidates has {candidates.shape[0]} rows but ids has {ids.shape[0]}: one id per row")
        if self.world == 1:
            return candidates, ids
        if self.max_rows is not None:
            if ids.shape[0] > self.max_rows:
                raise ValueError(f"{ids.shape[0]} candidates on rank {self.rank} but max_rows={self.max_rows}: the "
                                 "bound must cover every batch (PairBatcher.max_candidates)")
            sizes: list[int] = []
            all_rows, all_ids = _GatherPacked.apply(candidates, ids.to(torch.int64), self.max_rows, sizes,
                                                    self.rank, self.group)
        else:
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
