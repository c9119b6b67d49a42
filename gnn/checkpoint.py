"""Checkpoints: weights, optimizer state, epoch/step, RNG state and the frozen configs, written atomically.

``save_checkpoint(path, trainer, model_config)`` then ``restore_checkpoint(path, trainer)`` continues training
with identical state (batches are a pure function of (seed, epoch, index), so no sampler state is needed).
``load_model(path)`` rebuilds the encoder from the config stored inside.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gnn.models import ItemEncoder, ModelConfig, build_model
from gnn.trainer import Trainer

CHECKPOINT_FORMAT = "pinsage-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    model_config: ModelConfig
    train_config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    epoch: int
    step: int
    rng_state: dict[str, Any]
    extra: dict[str, Any]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # a DDP wrapper keeps the model in .module


def save_checkpoint(path: str | Path, trainer: Trainer, model_config: ModelConfig, *,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the trainer's state to ``path`` (temp file + ``os.replace``: never a partial checkpoint)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_config": model_config.to_dict(), "train_config": trainer.config.to_dict(),
        "model_state": _unwrap(trainer.model).state_dict(), "optimizer_state": trainer.optimizer.state_dict(),
        "epoch": trainer.epoch, "step": trainer.step,
        "rng_state": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002 (legacy global, for user code)
                       "python": random.getstate()},
        "extra": dict(extra or {}),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def load_checkpoint(path: str | Path) -> Checkpoint:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no checkpoint there; train first or check the path")
    payload = torch.load(p, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{p}: checkpoint format {payload.get('format')!r} version {payload.get('version')!r}, "
                         f"this code reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}")
    return Checkpoint(model_config=ModelConfig.from_dict(payload["model_config"]),
                      train_config=payload["train_config"], model_state=payload["model_state"],
                      optimizer_state=payload["optimizer_state"], epoch=int(payload["epoch"]),
                      step=int(payload["step"]), rng_state=payload["rng_state"], extra=payload["extra"])


def restore_checkpoint(path: str | Path, trainer: Trainer) -> Checkpoint:
    """Load weights, optimizer state, counters and RNG state into ``trainer`` (built with the same config)."""
    ckpt = load_checkpoint(path)
    _unwrap(trainer.model).load_state_dict(ckpt.model_state)
    if ckpt.optimizer_state is not None:
        trainer.optimizer.load_state_dict(ckpt.optimizer_state)
    trainer.epoch, trainer.step = ckpt.epoch, ckpt.step
    torch.set_rng_state(ckpt.rng_state["torch"])
    np.random.set_state(ckpt.rng_state["numpy"])  # noqa: NPY002
    random.setstate(ckpt.rng_state["python"])
    return ckpt


def load_model(path: str | Path) -> ItemEncoder:
    """The encoder stored in a checkpoint, in eval mode."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    return model.eval()
