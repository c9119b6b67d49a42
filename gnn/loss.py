"""Max-margin ranking loss with negatives shared across the batch plus per-query hard negatives (PinSage).

For a pair (q, p) with weight w and negatives n: ``w · mean_n max(0, q·n − q·p + margin)``, averaged over pairs
with the weights. Shared negatives (uniform over items by default) are drawn once per batch; hard negatives come
from ``Neighborhoods.hard_negatives`` under a curriculum (see :func:`hard_negatives_for_epoch`).
"""

from __future__ import annotations

import torch
from torch import nn


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
