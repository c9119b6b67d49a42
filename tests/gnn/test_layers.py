from __future__ import annotations

import numpy as np
import pytest
import torch

from gnn.layers import PinSageConv, SAGEConv, weighted_mean

# 4-node graph: neighbours of node v and their visit counts (padding = index to itself, weight 0)
NBR = torch.tensor([[1, 2], [0, 1], [3, 2], [0, 3]])
W = torch.tensor([[3.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
H = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])


def set_linear(layer: torch.nn.Linear, weight: list[list[float]], bias: list[float]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def pinsage_by_hand(v: int, pooling: str) -> np.ndarray:
    q, qb = np.array([[1.0, -1.0], [0.5, 0.5]]), np.array([0.0, 0.1])
    wmat, wb = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]), np.array([0.2, 0.3])
    h = H.numpy()
    num, den = np.zeros(2), 0.0
    for j, w in zip(NBR[v].tolist(), W[v].tolist(), strict=True):
        if w > 0:
            a = w if pooling == "importance" else 1.0
            num += a * relu(q @ h[j] + qb)
            den += a
    agg = num / den if den > 0 else np.zeros(2)
    z = relu(wmat @ np.concatenate([h[v], agg]) + wb)
    return z / np.linalg.norm(z)


@pytest.mark.parametrize("pooling", ["importance", "mean"])
def test_pinsage_conv_matches_hand_computation(pooling: str) -> None:
    conv = PinSageConv(2, 2, 2, pooling=pooling)  # type: ignore[arg-type]
    set_linear(conv.neighbor, [[1.0, -1.0], [0.5, 0.5]], [0.0, 0.1])
    set_linear(conv.combine, [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], [0.2, 0.3])
    out = conv(H, NBR, W)
    expected = np.stack([pinsage_by_hand(v, pooling) for v in range(4)])
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    # node 0: importance pooling weights neighbour 1 three times as much as neighbour 2, mean pooling equally
    assert not np.allclose(pinsage_by_hand(0, "importance"), pinsage_by_hand(0, "mean"))


def test_sage_conv_matches_hand_computation() -> None:
    conv = SAGEConv(2, 2, normalize=False)
    set_linear(conv.linear, [[1.0, 0.0, 1.0, 1.0], [0.0, -1.0, 2.0, 0.0]], [0.0, 0.5])
    out = conv(H, NBR, W).detach().numpy()
    h = H.numpy()
    for v in range(4):
        valid = [j for j, w in zip(NBR[v].tolist(), W[v].tolist(), strict=True) if w > 0]
        mean = h[valid].mean(axis=0) if valid else np.zeros(2)
        z = relu(np.array([[1.0, 0.0, 1.0, 1.0], [0.0, -1.0, 2.0, 0.0]]) @ np.concatenate([h[v], mean])
                 + np.array([0.0, 0.5]))
        np.testing.assert_allclose(out[v], z, rtol=1e-6, atol=1e-6)


def test_weighted_mean_isolated_row_is_zero() -> None:
    out = weighted_mean(H, NBR, W)
    np.testing.assert_allclose(out[0].numpy(), (3 * H[1] + H[2]).numpy() / 4)
    assert out[3].abs().sum() == 0


@pytest.mark.parametrize("conv", [PinSageConv(2, 3, 4), SAGEConv(2, 4)])
def test_gradients_reach_every_parameter_and_reset(conv: torch.nn.Module) -> None:
    torch.manual_seed(0)
    conv.reset_parameters()  # type: ignore[operator]
    h = H.clone().requires_grad_(True)
    out = conv(h, NBR, W)
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()  # not constant under L2 norm
    for name, p in conv.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_output_shapes_and_repr() -> None:
    conv = PinSageConv(2, 3, 5, pooling="mean")
    assert conv(H, NBR[:2], W[:2]).shape == (2, 5)
    assert repr(conv) == "PinSageConv(2, 3, 5, pooling='mean', normalize=True)"
    assert repr(SAGEConv(2, 4)) == "SAGEConv(2, 4, activation=True, normalize=True)"
    with pytest.raises(ValueError, match="pooling"):
        PinSageConv(2, pooling="max")  # type: ignore[arg-type]
