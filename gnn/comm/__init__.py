"""Gradient-traffic reduction for data-parallel training: DGC, fp16/bf16/PowerSGD hooks, local and hierarchical
model averaging, byte accounting and a cluster projection. Pure PyTorch + torch.distributed (gloo or NCCL)."""

from __future__ import annotations

from gnn.comm.accounting import TrafficAccount
from gnn.comm.averaging import AveragingOptimizer, ModelAverager
from gnn.comm.config import (
    CommConfig,
    DGCConfig,
    SyncLevel,
    add_comm_arguments,
    comm_config_from_args,
    parse_comm,
    parse_sync,
)
from gnn.comm.dgc import DGCState, dgc_hook, select_topk
from gnn.comm.hooks import CommSession, ddp_wrap, setup_communication

__all__ = [
    "AveragingOptimizer",
    "CommConfig",
    "CommSession",
    "DGCConfig",
    "DGCState",
    "ModelAverager",
    "SyncLevel",
    "TrafficAccount",
    "add_comm_arguments",
    "comm_config_from_args",
    "ddp_wrap",
    "dgc_hook",
    "parse_comm",
    "parse_sync",
    "select_topk",
    "setup_communication",
]
