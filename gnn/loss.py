"""Training losses: the sampled softmax over the batch's distinct items (the default, ``TrainConfig.loss``) and
PinSage's max-margin ranking loss with negatives shared across the batch plus per-query hard negatives.

On the Amazon sample (protocol B, validation HR@10 after 3-4 epochs) the softmax reaches 0.071-0.079 where the
max-margin loss stayed at 0.022; a logQ correction with alpha 1 lowered the first epoch from 0.062 to 0.054.

For a pair (q, p) with weight w and negatives n: ``w · mean_n max(0, q·n − q·p + margin)``, averaged over pairs
with the weights. Shared negatives (uniform over items by default) are drawn once per batch; hard negatives come
from ``Neighborhoods.hard_negatives`` under a curriculum (see :func:`hard_negatives_for_epoch`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

CandidateGatherer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def hard_negatives_for_epoch(epoch: int, *, per_epoch: int = 1, cap: int = 6) -> int:
    """Hard negatives per query in 0-based ``epoch``: ``min(epoch · per_epoch, cap)`` — the paper's epoch n
    (1-based) adds n − 1 (with ``per_epoch=1``), up to ``cap``."""
    if epoch < 0 or per_epoch < 0 or cap < 0:
        raise ValueError(f"epoch={epoch}, per_epoch={per_epoch}, cap={cap}: must be non-negative")
    return min(epoch * per_epoch, cap)


class MaxMarginLoss(nn.Module):
    """Weighted hinge loss over shared and hard negatives.

    Args:
        margin: the hinge margin Δ (default 0.1; embeddings are L2-normalised so scores lie in [-1, 1]).

    Shapes:
        ``forward(query (B, D), positive (B, D), negatives (N, D), weight (B,), hard (B, H, D) | None,
        hard_mask (B, H) bool | None) -> scalar``.
    """

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin={margin}: must be >= 0")
        self.margin = float(margin)

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, weight: torch.Tensor,
                hard: torch.Tensor | None = None, hard_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = (query * positive).sum(dim=1, keepdim=True)  # (B, 1)
        hinge = torch.relu(query @ negatives.T - pos + self.margin)  # (B, N)
        total = hinge.sum(dim=1)  # (B,)
        count = torch.full_like(total, float(negatives.shape[0]))
        if hard is not None and hard.shape[1] > 0:
            mask = torch.ones(hard.shape[:2], dtype=torch.bool) if hard_mask is None else hard_mask
            hard_scores = torch.einsum("bd,bhd->bh", query, hard)  # (B, H)
            hard_hinge = torch.relu(hard_scores - pos + self.margin) * mask
            total = total + hard_hinge.sum(dim=1)
            count = count + mask.sum(dim=1)
        per_pair = total / count.clamp_min(1.0)  # (B,)
        return (weight * per_pair).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class SampledSoftmaxLoss(nn.Module):
    """Sampled-softmax (InfoNCE) loss over the batch's distinct items, with an optional logQ correction.

    Every distinct item of the batch (queries, positives, shared and hard negatives) is a candidate for every
    query; the row's own positive is the target and the query item itself is masked out. With ``log_q`` (the
    log sampling frequency of each item, (n_items,)) the logit of candidate j becomes
    ``s_qj / τ − α · log_q[j]``, which removes the popularity bias of in-batch candidates (Yi et al. 2019).
    Per pair: ``w · (−log softmax_j(logits)[positive])``, averaged over pairs with the weights.

    Args:
        temperature: τ (default 0.1; scores of L2-normalised embeddings lie in [-1, 1]).
        log_q: (n_items,) float log-frequency of every item as a candidate, or None (no correction).
        logq_alpha: α, strength of the correction (default 1.0).
        gather: in data-parallel training, ``(candidates, ids) -> (candidates', ids')`` adding the other ranks'
            batch items after this rank's own (:class:`gnn.comm.gather.CandidateGather`), or None (default: this
            rank's batch only).

    Shapes:
        ``forward(query (B, D), candidates (C, D), query_pos (B,) int64, positive_pos (B,) int64, weight (B,),
        candidate_ids (C,) int64) -> scalar``; ``query_pos`` / ``positive_pos`` index ``candidates``.
    """

    def __init__(self, temperature: float = 0.1, *, log_q: torch.Tensor | None = None,
                 logq_alpha: float = 1.0, gather: CandidateGatherer | None = None) -> None:
        super().__init__()
        self.gather = gather
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0 (try 0.1)")
        self.temperature = float(temperature)
        self.logq_alpha = float(logq_alpha)
        self.log_q: torch.Tensor | None = None if log_q is None else log_q.to(torch.float32)

    def forward(self, query: torch.Tensor, candidates: torch.Tensor, query_pos: torch.Tensor,
                positive_pos: torch.Tensor, weight: torch.Tensor,
                candidate_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.gather is not None:  # the other ranks' batch items join as candidates, after this rank's own
            if candidate_ids is None:
                raise ValueError("candidate_ids: gathering the other ranks' candidates needs the id of every row")
            candidates, candidate_ids = self.gather(candidates, candidate_ids)
        logits = query @ candidates.T / self.temperature  # (B, C)
        if self.log_q is not None and self.logq_alpha != 0.0:
            if candidate_ids is None:
                raise ValueError("candidate_ids: the logQ correction needs the item id of every candidate")
            logits = logits - self.logq_alpha * self.log_q[candidate_ids][None, :]
        rows = torch.arange(query.shape[0])
        self_hit = torch.zeros_like(logits, dtype=torch.bool)
        self_hit[rows, query_pos] = query_pos != positive_pos  # never mask the target
        logits = logits.masked_fill(self_hit, float("-inf"))
        per_pair = torch.logsumexp(logits, dim=1) - logits[rows, positive_pos]  # (B,)
        return (weight * per_pair).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, logq={'yes' if self.log_q is not None else 'no'}, " \
               f"logq_alpha={self.logq_alpha}"


def log_frequency(items: torch.Tensor | object, n_items: int, *, smoothing: float = 1.0) -> torch.Tensor:
    """``log((count_i + smoothing) / Σ)`` of the item ids in ``items`` (e.g. the positives of the training
    pairs), the candidate log-frequency of :class:`SampledSoftmaxLoss`. Shapes: ``(P,) -> (n_items,)``."""
    ids = torch.as_tensor(items, dtype=torch.int64)
    counts = torch.bincount(ids, minlength=n_items).to(torch.float64) + smoothing
    return torch.log(counts / counts.sum()).to(torch.float32)
