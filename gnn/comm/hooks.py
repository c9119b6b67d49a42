"""Register the configured gradient-communication hook on a DDP model and hand back a :class:`CommSession`.

    session = setup_communication(ddp_model, comm_config)       # after DDP(...), before the first backward
    optimizer = session.wrap_optimizer(torch.optim.SGD(ddp_model.parameters(), lr=0.1))
    for epoch ...: session.set_epoch(epoch); ... loss.backward(); optimizer.step()
    report["comm"] = session.stats()

Design of local/hierarchical sync: the model stays wrapped in DDP (one code path for the trainer), but the hook
registered here all-reduces gradients only during ``sync_warmup_steps`` and afterwards returns the local gradient
untouched, without any communication (DDP's per-step all-reduce is off), or, under a ``G@grad`` level, all-reduced
within the rank's group of G only; the wrapped optimizer then averages
parameters and buffers on the configured schedule. Build the DDP model with ``ddp_wrap(module, sync_buffers=False)``
then (``forward_sync_buffers=False``; ``broadcast_buffers=False`` before torch 2.13), or DDP would broadcast rank 0's
buffers at every forward.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from gnn.comm._annotations import ddp_hook
from gnn.comm.accounting import TrafficAccount
from gnn.comm.averaging import AveragingOptimizer, ModelAverager, _module_of
from gnn.comm.config import CommConfig
from gnn.comm.dgc import DGCState, dgc_hook

logger = logging.getLogger(__name__)

Future = torch.futures.Future


@dataclass
class _HookState:
    """State handed to the counting wrappers of the built-in hooks."""

    process_group: dist.ProcessGroup | None
    traffic: TrafficAccount
    powersgd: powerSGD_hook.PowerSGDState | None = None
    averager: ModelAverager | None = None
    pending: Future[torch.Tensor] | None = None


def _close(state: _HookState, bucket: dist.GradBucket, *, dense: int, sent: int) -> None:
    state.traffic.record(dense_bytes=dense, sent_bytes=sent)
    if bucket.is_last():
        state.traffic.end_step()


@ddp_hook
def allreduce_counting_hook(state: _HookState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """Plain averaging all-reduce (what DDP does without a hook), counted."""
    nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
    _close(state, bucket, dense=nbytes, sent=nbytes)
    return default_hooks.allreduce_hook(state.process_group, bucket)  # type: ignore[arg-type]


@ddp_hook
def fp16_counting_hook(state: _HookState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """PyTorch's fp16 compression hook, counted (2 bytes per entry)."""
    buf = bucket.buffer()
    _close(state, bucket, dense=buf.numel() * buf.element_size(), sent=buf.numel() * 2)
    return default_hooks.fp16_compress_hook(state.process_group, bucket)  # type: ignore[arg-type]


@ddp_hook
def bf16_counting_hook(state: _HookState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """PyTorch's bf16 compression hook, counted (2 bytes per entry)."""
    buf = bucket.buffer()
    _close(state, bucket, dense=buf.numel() * buf.element_size(), sent=buf.numel() * 2)
    return default_hooks.bf16_compress_hook(state.process_group, bucket)  # type: ignore[arg-type]


@ddp_hook
def powersgd_counting_hook(state: _HookState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """PyTorch's (unbatched) PowerSGD hook, counted from its own compression statistics (P and Q entries).

    PowerSGD issues its second all-reduce (Qs) from a callback of the first; with several buckets, rank A can issue
    bucket 1's P before bucket 0's Q while rank B does the opposite, and gloo (which matches collectives by issue
    order) aborts ("Received data size doesn't match expected size"). So each bucket waits here for the previous
    bucket's exchange to finish before starting its own: correct on gloo, at the cost of overlap between buckets.
    """
    ps = state.powersgd
    if ps is None:
        raise ValueError("powersgd_counting_hook needs a PowerSGDState in state.powersgd")
    if state.pending is not None:
        state.pending.wait()  # synchronisation point: keep collective issue order identical on every rank
    buf = bucket.buffer()
    dense = buf.numel() * buf.element_size()
    before = ps.total_numel_after_compression
    was_plain = ps.iter < ps.start_powerSGD_iter
    future = powerSGD_hook.powerSGD_hook(ps, bucket)
    sent = dense if was_plain else (ps.total_numel_after_compression - before) * buf.element_size()
    _close(state, bucket, dense=dense, sent=sent)
    state.pending = None if bucket.is_last() else future
    return future


@ddp_hook
def local_sgd_hook(state: _HookState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """All-reduce during the averager's warm-up, then no communication at all (local steps), or an all-reduce
    within the rank's group under a ``G@grad`` level (the group's ranks step as one synchronous replica)."""
    averager = state.averager
    if averager is None:
        raise ValueError("local_sgd_hook needs a ModelAverager in state.averager")
    buf = bucket.buffer()
    dense = buf.numel() * buf.element_size()
    if averager.in_warmup:
        _close(state, bucket, dense=dense, sent=dense)
        return default_hooks.allreduce_hook(state.process_group, bucket)  # type: ignore[arg-type]
    group = averager.gradient_group
    if group is not None:
        _close(state, bucket, dense=dense, sent=dense)
        return default_hooks.allreduce_hook(group, bucket)
    _close(state, bucket, dense=dense, sent=0)
    future: Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buf)
    return future


_BUILTIN = {"none": allreduce_counting_hook, "fp16": fp16_counting_hook, "bf16": bf16_counting_hook,
            "powersgd": powersgd_counting_hook}


@dataclass
class CommSession:
    """What :func:`setup_communication` registered, with the counters the trainer reports."""

    config: CommConfig
    traffic: TrafficAccount
    dgc: DGCState | None = None
    powersgd: powerSGD_hook.PowerSGDState | None = None
    averager: ModelAverager | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Return the optimizer to step: with averaging, one that averages after each step; with DGC, the same
        optimizer after checking that momentum is applied once and weight decay only in the hook: with
        ``DGCConfig.momentum > 0`` or ``correction="adam"`` the optimizer must be SGD without momentum or weight
        decay; with momentum 0 (error-feedback top-k) any optimizer without weight decay, e.g. Adam, which applies
        the momentum."""
        if self.dgc is not None:
            cfg = self.dgc.config
            in_hook = ("DGCConfig.correction='adam'" if cfg.correction == "adam"
                       else f"DGCConfig.momentum={cfg.momentum}" if cfg.momentum else None)
            _check_dgc_optimizer(optimizer, in_hook)
        if self.averager is not None:
            if self.model is None:
                raise ValueError("CommSession.model is unset; create the session with setup_communication")
            return AveragingOptimizer(optimizer, self.averager, self.model, lr_scale=self.config.sync_lr_scale)
        if self.dgc is not None and self.dgc.config.local_tensors:
            if self.model is None:
                raise ValueError("CommSession.model is unset; create the session with setup_communication")
            return LocalRowsOptimizer(optimizer, self.dgc, _module_of(self.model))
        return optimizer

    def finish(self, lr: float | None = None) -> None:
        """Settle the training before the trained model is read (a collective: every rank calls it): the DGC local
        tensors' last round, and with ``DGCConfig.flush_at_end`` the averaged residuals applied at ``lr`` (the
        outer SGD's current learning rate) (local / hierarchical averaging keep their own final average)."""
        if self.dgc is None or self.model is None:
            return
        if self.dgc.config.flush_at_end:
            if lr is None:
                raise ValueError("CommSession.finish: DGCConfig.flush_at_end needs the learning rate (lr=)")
            self.dgc.flush(_module_of(self.model), lr)
        if self.dgc.config.local_tensors:
            self.dgc.merge_local(_module_of(self.model))

    def save_state(self, path: str | Path, *, epoch: int) -> Path | None:
        """Write this rank's DGC state (residuals, momenta, Adam moments, sampler) after ``epoch`` epochs to ``path``
        atomically (temporary file, then rename); each rank writes its own. None (nothing written) without DGC."""
        if self.dgc is None:
            return None
        out = Path(path)
        tmp = out.with_name(f".{out.name}.tmp")
        torch.save({"epoch": int(epoch), "dgc": self.dgc.state_dict()}, tmp)
        os.replace(tmp, out)
        return out

    def restore_state(self, path: str | Path, *, epoch: int) -> bool:
        """Load :meth:`save_state`'s file if it holds the state after ``epoch`` epochs (the checkpoint's); returns
        whether it did. A file from another epoch (a run killed between the checkpoint and this rank's file) is
        ignored with a warning: the residuals then start empty, as on a fresh run."""
        if self.dgc is None or self.model is None or not Path(path).is_file():
            return False
        payload = torch.load(Path(path), map_location="cpu", weights_only=False)
        if int(payload["epoch"]) != epoch:
            logger.warning("%s holds the DGC state after epoch %s, the checkpoint is after epoch %s: DGC residuals "
                           "start empty", path, payload["epoch"], epoch)
            return False
        self.dgc.load_state_dict(payload["dgc"], _module_of(self.model))
        return True

    def merged_copy(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """A copy of ``module`` with the DGC local tensors merged as a round would, the training state untouched (a
        collective); None when this session has no local tensors."""
        if self.dgc is None or not self.dgc.config.local_tensors or self.model is None:
            return None
        import copy

        copied = copy.deepcopy(module)
        self.dgc.merge_local(_module_of(self.model), into=copied)
        return copied

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the hook (DGC sparsity warm-up); harmless for the other modes."""
        if self.dgc is not None:
            self.dgc.set_epoch(epoch)

    def stats(self) -> dict[str, Any]:
        """Counters and the config, plain JSON, for reports and checkpoints."""
        out: dict[str, Any] = {"config": self.config.to_dict(), **self.traffic.as_dict()}
        if self.dgc is not None:
            out["dgc"] = self.dgc.stats()
        if self.averager is not None:
            out["averager"] = {"step": self.averager.step_count, "warmup_steps": self.averager.warmup_steps}
        return out


class LocalRowsOptimizer(torch.optim.Optimizer):
    """Wrap an optimizer so that each ``step()`` is followed by :meth:`DGCState.after_step` (the DGC local tensors'
    rounds, every ``local_period`` steps). The wrapped optimizer's state and checkpoints are passed through."""

    def __init__(self, optimizer: torch.optim.Optimizer, dgc: DGCState, module: torch.nn.Module) -> None:
        self.optimizer = optimizer
        self.dgc = dgc
        self.module = module
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state

    def step(self, closure: Any = None) -> Any:
        loss = self.optimizer.step(closure)
        self.dgc.after_step(self.module)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return (f"LocalRowsOptimizer({self.optimizer.__class__.__name__}, every {self.dgc.config.local_period} "
                "steps)")


def _check_dgc_optimizer(optimizer: torch.optim.Optimizer, in_hook: str | None) -> None:
    """Raise unless ``optimizer`` and the DGC hook together apply momentum once and weight decay once (in the hook);
    ``in_hook`` names the setting by which the hook applies momentum itself (None: it does not)."""
    hook_momentum = in_hook is not None
    kind = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        if group.get("weight_decay", 0):
            raise ValueError(f"optimizer param_groups[{i}]['weight_decay']={group['weight_decay']} with --compression "
                             "dgc: the DGC hook applies weight decay itself; set DGCConfig.weight_decay instead")
        if hook_momentum and group.get("momentum", 0):
            raise ValueError(f"optimizer param_groups[{i}]['momentum']={group['momentum']} with --compression dgc: "
                             "the DGC hook applies momentum itself; use SGD(lr=...) and set DGCConfig.momentum "
                             "instead, or DGCConfig.momentum=0 to leave momentum to the optimizer")
    if hook_momentum and not isinstance(optimizer, torch.optim.SGD):
        fix = ("use plain SGD(lr=...): the hook runs Adam" if "correction" in str(in_hook) else
               "set DGCConfig.momentum=0 (--dgc-momentum 0) for error-feedback top-k feeding the optimizer, or use "
               "plain SGD")
        raise ValueError(f"{kind} with --compression dgc and {in_hook}: momentum would be applied twice (hook and "
                         f"{kind}); {fix}")


def ddp_wrap(module: torch.nn.Module, *, sync_buffers: bool,
             device_ids: list[int] | None = None) -> torch.nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(module)`` that broadcasts rank 0's buffers at every forward only if
    ``sync_buffers`` (False under local / hierarchical averaging), on any torch the project supports: the argument
    is ``forward_sync_buffers`` from torch 2.13 (which deprecates ``broadcast_buffers``) and ``broadcast_buffers``
    before it (the CUDA images ship torch 2.11)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters \
        else "broadcast_buffers"
    kwargs: dict[str, Any] = {"device_ids": device_ids, name: sync_buffers}
    return ddp(module, **kwargs)


def _syncs_buffers_every_forward(ddp_model: torch.nn.parallel.DistributedDataParallel) -> bool:
    if "forward_sync_buffers" in vars(ddp_model):  # torch >= 2.13 (broadcast_buffers is deprecated there)
        return bool(vars(ddp_model)["forward_sync_buffers"])
    return bool(vars(ddp_model).get("broadcast_buffers", True))


def setup_communication(ddp_model: torch.nn.parallel.DistributedDataParallel, config: CommConfig, *,
                        process_group: dist.ProcessGroup | None = None, audit: bool = False) -> CommSession:
    """Register the hook that ``config`` asks for on ``ddp_model`` and return the session holding its state.

    Args:
        ddp_model: the DDP-wrapped model (no hook registered yet).
        config: the communication settings.
        process_group: ranks to synchronise (default: the world).
        audit: keep DGC's per-tensor audit of the last step (tests; costs memory; default False).
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    traffic = TrafficAccount()
    session = CommSession(config=config, traffic=traffic, model=ddp_model)
    if not config.uses_ddp_allreduce:
        if _syncs_buffers_every_forward(ddp_model):
            raise ValueError(f"--sync {config.sync_spec}: build the model with ddp_wrap(model, sync_buffers=False) "
                             "(DistributedDataParallel(..., forward_sync_buffers=False); broadcast_buffers=False "
                             "before torch 2.13); the averager synchronises buffers on its own schedule")
        session.averager = ModelAverager(config.sync_levels, warmup_steps=config.sync_warmup_steps,
                                         process_group=process_group, traffic=traffic,
                                         weighting=config.sync_weighting,
                                         optimizer_state=config.sync_optimizer_state,
                                         outer_momentum=config.sync_outer_momentum)
        ddp_model.register_comm_hook(_HookState(process_group, traffic, averager=session.averager),
                                     local_sgd_hook)
    elif config.compression == "dgc":
        session.dgc = DGCState(config.dgc, process_group=process_group, audit=audit, traffic=traffic)
        session.dgc.name_parameters(ddp_model.module)
        ddp_model.register_comm_hook(session.dgc, dgc_hook)
    elif config.compression == "powersgd":
        session.powersgd = powerSGD_hook.PowerSGDState(
            process_group=process_group, matrix_approximation_rank=config.powersgd_rank,
            start_powerSGD_iter=config.powersgd_start_iter)
        ddp_model.register_comm_hook(_HookState(process_group, traffic, powersgd=session.powersgd),
                                     powersgd_counting_hook)
    else:
        ddp_model.register_comm_hook(_HookState(process_group, traffic), _BUILTIN[config.compression])
    logger.info("gradient communication: compression=%s sync=%s", config.compression, config.sync_spec)
    return session
