"""Graph convolutions over one sampled hop (a :class:`gnn.sampler.Block`): PinSage and GraphSAGE-mean.

Both layers take the source-node vectors of a block and, for each destination node, the positions of its
neighbours among the sources and their weights. Destination nodes are the first ``n_dst`` sources (the sampler
puts them first), so each layer reads its own vector as ``h_src[:n_dst]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Pooling = Literal["importance", "mean"]


def l2_normalize(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows divided by their L2 norm; an all-zero row (every ReLU unit off) stays zero with a zero gradient,
    where ``F.normalize`` would give NaN gradients. Shapes: ``(N, D) -> (N, D)``."""
    return z * torch.rsqrt((z * z).sum(dim=1, keepdim=True).clamp_min(eps * eps))


def weighted_mean(h: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j h[index_j] / Σ_j w_j per row; rows whose weights are all zero give zeros.

    Computed as one sparse (B, N) x dense (N, D) product: about 6x faster on CPU (forward + backward) than
    gathering a (B, S, D) tensor, and its backward is a scatter-add rather than an index_put.

    Shapes: ``h (N, D)``, ``index (B, S)`` int64, ``weight (B, S)`` float -> ``(B, D)``.
    """
    b, s = index.shape
    total = weight.sum(dim=1, keepdim=True)  # (B, 1)
    total = torch.where(total > 0, total, torch.ones_like(total))  # isolated rows: 0 / 1
    rows = torch.arange(b, device=index.device).repeat_interleave(s)  # (B·S,)
    adjacency = torch.sparse_coo_tensor(torch.stack([rows, index.reshape(-1)]), (weight / total).reshape(-1),
                                        (b, h.shape[0]), dtype=h.dtype, check_invariants=False)
    return torch.sparse.mm(adjacency, h)


class PinSageConv(nn.Module):
    """PinSage convolution (Ying et al. 2018, Algorithm 1).

    ``n_v = γ({ReLU(Q h_u + q) : u ∈ N(v)}, α)`` with γ the weighted mean under the normalised visit counts α
    (``pooling="importance"``) or the plain mean over the valid neighbours (``pooling="mean"``, weights ignored);
    ``z_v = ReLU(W · [h_v ; n_v] + w)``; ``z_v ← z_v / ‖z_v‖₂`` when ``normalize``.

    Args:
        in_dim: width of the source vectors (required).
        hidden_dim: width of the neighbour transform Q (default 64).
        out_dim: width of the output (default 64).
        pooling: ``"importance"`` (default) or ``"mean"``.
        normalize: L2-normalise the output (default True).

    Shapes:
        ``forward(h_src (N_src, in_dim), nbr_index (N_dst, T) int64, nbr_weight (N_dst, T) float)
        -> (N_dst, out_dim)``; weight 0 marks a padding slot.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 64, out_dim: int = 64, *, pooling: Pooling = "importance",
                 normalize: bool = True) -> None:
        super().__init__()
        if pooling not in ("importance", "mean"):
            raise ValueError(f"pooling={pooling!r}: use 'importance' or 'mean'")
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.neighbor = nn.Linear(in_dim, hidden_dim)  # Q, q
        self.combine = nn.Linear(in_dim + hidden_dim, out_dim)  # W, w
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.neighbor.reset_parameters()
        self.combine.reset_parameters()

    def forward(self, h_src: torch.Tensor, nbr_index: torch.Tensor, nbr_weight: torch.Tensor) -> torch.Tensor:
        n_dst = nbr_index.shape[0]
        # Q is applied once per distinct source node, then gathered (each vector computed once).
        msg = torch.relu(self.neighbor(h_src))  # (N_src, hidden)
        weight = nbr_weight if self.pooling == "importance" else (nbr_weight > 0).to(nbr_weight.dtype)
        agg = weighted_mean(msg, nbr_index, weight)  # (N_dst, hidden)
        z = torch.relu(self.combine(torch.cat([h_src[:n_dst], agg], dim=1)))  # (N_dst, out)
        return l2_normalize(z) if self.normalize else z

    def __repr__(self) -> str:
        return (f"PinSageConv({self.in_dim}, {self.hidden_dim}, {self.out_dim}, pooling={self.pooling!r}, "
                f"normalize={self.normalize})")


class SAGEConv(nn.Module):
    """GraphSAGE convolution with the mean aggregator (Hamilton et al. 2017, Algorithm 1, concat variant).

    ``z_v = σ(W · [h_v ; mean{h_u : u ∈ N_S(v)}] + b)`` over the uniformly sampled neighbours, σ = ReLU when
    ``activation``; ``z_v ← z_v / ‖z_v‖₂`` when ``normalize``.

    Args:
        in_dim: width of the source vectors (required).
        out_dim: width of the output (default 64).
        activation: apply ReLU (default True).
        normalize: L2-normalise the output (default True).

    Shapes:
        ``forward(h_src (N_src, in_dim), nbr_index (N_dst, S) int64, nbr_weight (N_dst, S) float)
        -> (N_dst, out_dim)``; the weights only mark valid (> 0) and padding (0) slots.
    """

    def __init__(self, in_dim: int, out_dim: int = 64, *, activation: bool = True, normalize: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.activation, self.normalize = activation, normalize
        self.linear = nn.Linear(2 * in_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.linear.reset_parameters()

    def forward(self, h_src: torch.Tensor, nbr_index: torch.Tensor, nbr_weight: torch.Tensor) -> torch.Tensor:
        n_dst = nbr_index.shape[0]
        agg = weighted_mean(h_src, nbr_index, (nbr_weight > 0).to(h_src.dtype))  # (N_dst, in)
        z = self.linear(torch.cat([h_src[:n_dst], agg], dim=1))  # (N_dst, out)
        if self.activation:
            z = torch.relu(z)
        return l2_normalize(z) if self.normalize else z

    def __repr__(self) -> str:
        return (f"SAGEConv({self.in_dim}, {self.out_dim}, activation={self.activation}, "
                f"normalize={self.normalize})")
