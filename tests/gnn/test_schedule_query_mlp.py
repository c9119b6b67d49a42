"""The cosine learning-rate schedule and the linear warm-up (values at given steps, what the trainer hands the
optimizer) and the
residual ReLU layer of the query head (identity at the start, gradients, validation)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gnn.loss import SampledSoftmaxLoss
from gnn.models import ModelConfig, build_model
from gnn.trainer import StepInfo, TrainConfig, Trainer, compute_loss, embed_items, make_loss, query_side, scheduled_lr
from tests.gnn.test_training import setup


def test_cosine_schedule_values_by_hand() -> None:
    cfg = TrainConfig(lr=1e-2, lr_schedule="cosine", lr_final=0.1)
    assert scheduled_lr(cfg, 0, 5) == pytest.approx(1e-2)
    assert scheduled_lr(cfg, 2, 5) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # half way: cos(pi/2) = 0
    assert scheduled_lr(cfg, 1, 5) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert scheduled_lr(cfg, 4, 5) == pytest.approx(1e-3)  # the last step reaches lr * lr_final
    assert scheduled_lr(cfg, 9, 5) == pytest.approx(1e-3)  # and stays there (e.g. fit() past config.epochs)
    assert scheduled_lr(cfg, 0, 1) == pytest.approx(1e-2)
    constant = TrainConfig(lr=1e-2)
    assert constant.lr_schedule == "constant"
    assert [scheduled_lr(constant, s, 5) for s in range(5)] == [1e-2] * 5


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.lr_schedule"):
        TrainConfig(lr_schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"TrainConfig\.lr_final"):
        TrainConfig(lr_final=1.5)


def test_trainer_steps_with_the_scheduled_rates() -> None:
    config, _, batcher = setup("pinsage", batch_size=64)
    model = build_model(config, seed=0)
    cfg = TrainConfig(epochs=2, lr=4e-3, lr_schedule="cosine", lr_final=0.25, mode="sync", log_every=0)
    seen: list[float] = []
    trainer = Trainer(model, batcher, config=cfg)

    def record(info: StepInfo) -> None:
        seen.append(trainer.optimizer.param_groups[0]["lr"])

    trainer.on_step = record
    trainer.fit()
    total = 2 * batcher.n_batches
    assert len(seen) == total > 2
    assert seen == pytest.approx([scheduled_lr(cfg, s, total) for s in range(total)])
    assert seen[0] == pytest.approx(4e-3) and seen[-1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(seen))


def test_warmup_ramps_linearly_from_warmup_start_to_lr() -> None:
    cfg = TrainConfig(lr=4e-3, warmup_steps=4, warmup_start=0.5)  # Goyal et al.: from lr / 2 up to lr
    assert [scheduled_lr(cfg, s, 100) for s in range(6)] == pytest.approx([2e-3, 2.5e-3, 3e-3, 3.5e-3, 4e-3, 4e-3])
    from_zero = TrainConfig(lr=1e-2, warmup_steps=2)
    assert [scheduled_lr(from_zero, s, 100) for s in range(3)] == pytest.approx([0.0, 5e-3, 1e-2])
    both = TrainConfig(lr=1e-2, lr_schedule="cosine", lr_final=0.1, warmup_steps=2, warmup_start=0.5)
    cosine = TrainConfig(lr=1e-2, lr_schedule="cosine", lr_final=0.1)  # the ramp multiplies the schedule's rate
    assert scheduled_lr(both, 1, 5) == pytest.approx(0.75 * scheduled_lr(cosine, 1, 5))
    assert scheduled_lr(both, 3, 5) == pytest.approx(scheduled_lr(cosine, 3, 5))
    with pytest.raises(ValueError, match=r"TrainConfig\.warmup_steps=-1"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"TrainConfig\.warmup_start=2"):
        TrainConfig(warmup_start=2)


def test_trainer_warms_up_then_keeps_lr() -> None:
    config, _, batcher = setup("pinsage", batch_size=64)
    cfg = TrainConfig(epochs=1, lr=4e-3, warmup_steps=2, warmup_start=0.5, mode="sync", log_every=0)
    seen: list[float] = []
    trainer = Trainer(build_model(config, seed=0), batcher, config=cfg)
    trainer.on_step = lambda info: seen.append(trainer.optimizer.param_groups[0]["lr"])
    trainer.fit()
    assert len(seen) == batcher.n_batches > 3
    assert seen == pytest.approx([2e-3, 3e-3] + [4e-3] * (len(seen) - 2))


def test_query_mlp_starts_as_the_identity_and_learns() -> None:
    config, sampler, batcher = setup("pinsage")
    headed = build_model(ModelConfig(**{**config.to_dict(), "query_head": True, "query_hidden": 12}), seed=0)
    assert headed.query_hidden is not None and headed.query_out is not None
    assert headed.query_hidden.out_features == 12
    emb = embed_items(headed, sampler, np.arange(40))
    assert torch.allclose(query_side(headed, emb), emb, atol=1e-6)  # residual branch silent at the start
    loss = make_loss(TrainConfig(), batcher)
    assert isinstance(loss, SampledSoftmaxLoss)
    compute_loss(headed, loss, batcher(0, 0)).backward()
    for name, p in headed.named_parameters():
        if not name.startswith("query_hidden."):  # behind a zero layer at step 0
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    Trainer(headed, batcher, config=TrainConfig(epochs=1, mode="sync", log_every=0)).fit()
    assert headed.query_out.weight.abs().sum() > 0
    assert headed.query_hidden.weight.grad is not None  # reached once the output layer moved
    with pytest.raises(ValueError, match=r"query_hidden"):
        ModelConfig(query_head=False, query_hidden=8)
    with pytest.raises(ValueError, match=r"query_hidden"):
        ModelConfig(query_hidden=-1)
