"""Periodic (local SGD) and hierarchical model averaging of parameters *and* buffers on any backend (gloo too).

PyTorch's ``HierarchicalModelAverager`` averages parameters only, skips parameters without ``.grad`` and builds
its groups with ``dist.new_subgroups`` (which needs CUDA without ``group_size``); this averager builds explicit
groups of consecutive ranks with ``dist.new_group``, averages every floating tensor (parameters and buffers) and
broadcasts integer buffers from the group's first rank, so replicas inside a group are bit-identical afterwards.

``weighting="touched"`` averages each row of a matrix over the replicas whose gradients touched that row since the
last round of that level (the rest of the group for no row nobody touched: a plain mean): under hierarchical averaging
a global round weights a row by the replicas that trained it since the last *global* round, not since their group's
last round, which would leave a row one group trained between global rounds halved. Plain averaging shrinks the
update of a row that only one of G replicas trained (an item-embedding row of an item that lives in one shard) by G,
while gradient all-reduce under Adam does not (Adam's step does not scale with the averaged gradient's size): with
METIS shards most item rows are such rows, so local SGD under plain averaging trains them at 1/G of the rate.

``optimizer_state=True`` also averages the wrapped optimizer's per-parameter state tensors (Adam's ``exp_avg`` and
``exp_avg_sq``, SGD's ``momentum_buffer``) in each round, so that after a round the replicas agree on the optimizer as
well as on the model (local Adam with synchronised moments, as in the local adaptive methods of Chen et al. 2020,
"Toward communication efficient adaptive gradient method", and Wang et al. 2021, "Local adaptivity in federated
learning"); it costs the state's bytes on top of the model's (Adam: three times a round).

``outer_momentum=β > 0`` turns each global round (the last level) into a step of an outer optimizer, as in SlowMo
(Wang et al., ICLR 2020) with its slow learning rate 1: with ``x̄`` the replicas' mean and ``a`` the weights after the
previous global round (the anchor), ``u ← β·u + (a − x̄)``, ``a ← a − u``, and every replica continues from ``a``.
β = 0 is plain averaging. Averaged local Adam steps move the weights less than dense steps do (the replicas' noisy
directions cancel); the slow momentum carries the direction they agree on across rounds. It needs no extra traffic:
every replica computes the same update from the same mean. Parameters only; buffers are averaged as before.

    averager = ModelAverager(config.sync_levels, warmup_steps=config.sync_warmup_steps)
    optimizer = AveragingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), averager, model)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from gnn.comm.accounting import TrafficAccount
from gnn.comm.config import SYNC_WEIGHTINGS, SyncLevel

logger = logging.getLogger(__name__)


def _module_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class ModelAverager:
    """Average a model's parameters and buffers within groups on a schedule of levels.

    Step ``s`` (1-based, counted by :meth:`step`) does nothing while ``s <= warmup_steps`` (gradients are then
    all-reduced by the communication hook); afterwards, with ``t = s - warmup_steps``, the level with the largest
    period dividing ``t`` averages within its groups (consecutive ranks ``[j·g, (j+1)·g)``), if any. A gradient
    level (``G@grad``, the first) never averages models: it only builds the group in which the hook all-reduces
    gradients after the warm-up (:attr:`gradient_group`).

    Args:
        levels: averaging levels, group sizes nesting, last one covering every rank (``group_size`` None or world).
        warmup_steps: steps of global gradient all-reduce before averaging starts (default 0).
        process_group: the ranks taking part (default: the world).
        traffic: counter to record rounds and bytes in (default: a new one).
        weighting: ``uniform`` (plain mean, default) or ``touched`` (each row of a parameter of dim >= 2 averaged
            over the replicas that touched it since the last round; call :meth:`record_touched` after each
            backward, as :class:`AveragingOptimizer` does).
        optimizer_state: also average the optimizer's per-parameter state tensors in each round (plain mean;
            pass the optimizer to :meth:`step`, as :class:`AveragingOptimizer` does; default False).
        outer_momentum: slow momentum β of the global rounds, in [0, 1) (default 0: plain averaging); the anchor
            is taken by :meth:`before_step` (:class:`AveragingOptimizer` calls it) before the first local step.
    """

    def __init__(self, levels: Sequence[SyncLevel], *, warmup_steps: int = 0,
                 process_group: dist.ProcessGroup | None = None, traffic: TrafficAccount | None = None,
                 weighting: str = "uniform", optimizer_state: bool = False, outer_momentum: float = 0.0) -> None:
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"--sync-outer-momentum {outer_momentum} must be in [0, 1) (0: plain averaging)")
        self.outer_momentum = float(outer_momentum)
        self.anchor: list[torch.Tensor] | None = None  # weights after the last global round (outer momentum)
        self.velocity: list[torch.Tensor] | None = None
        if not levels:
            raise ValueError("levels must not be empty; give at least one SyncLevel (e.g. local:16)")
        if weighting not in SYNC_WEIGHTINGS:
            raise ValueError(f"--sync-weighting {weighting!r}: choose one of {', '.join(SYNC_WEIGHTINGS)}")
        self.weighting = weighting
        self.optimizer_state = optimizer_state
        # per level: parameter -> (rows,) bool, rows this replica touched since that level's last round
        self.touched: list[dict[torch.Tensor, torch.Tensor]] = [{} for _ in levels]
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        world_group = process_group if process_group is not None else dist.group.WORLD
        if world_group is None:
            raise RuntimeError("ModelAverager needs an initialised process group (dist.init_process_group)")
        self.process_group: dist.ProcessGroup = world_group
        world = dist.get_world_size(self.process_group)
        rank = dist.get_rank(self.process_group)
        last = levels[-1].group_size
        if last is not None and last != world:
            raise ValueError(f"--sync: the last level's group size {last} must equal the world size {world} "
                             "(write it as all@PERIOD)")
        self.levels = tuple(levels)
        self.warmup_steps = warmup_steps
        self.traffic = traffic if traffic is not None else TrafficAccount()
        self.step_count = 0
        self.groups: list[tuple[dist.ProcessGroup, list[int]]] = []
        global_ranks = dist.get_process_group_ranks(self.process_group)
        for level in self.levels:
            size = world if level.group_size is None else level.group_size
            if world % size:
                raise ValueError(f"--sync: group size {size} must divide the world size {world}")
            if size == world:
                self.groups.append((self.process_group, list(global_ranks)))
                continue
            mine: tuple[dist.ProcessGroup, list[int]] | None = None
            for start in range(0, world, size):  # every rank must create every group, in the same order
                members = global_ranks[start:start + size]
                group = dist.new_group(members)
                if start <= rank < start + size:
                    mine = (group, members)
            if mine is None:
                raise RuntimeError(f"rank {rank} is in no group of size {size}")
            self.groups.append(mine)

    @property
    def gradient_group(self) -> dist.ProcessGroup | None:
        """The group whose ranks all-reduce gradients every step after the warm-up (a ``G@grad`` level), or None."""
        return self.groups[0][0] if self.levels[0].gradients else None

    @property
    def in_warmup(self) -> bool:
        """True while the step in progress is a global gradient all-reduce step."""
        return self.step_count < self.warmup_steps

    def level_due(self, step: int) -> int | None:
        """Index of the level that averages after 1-based step ``step``, or None."""
        t = step - self.warmup_steps
        if t <= 0:
            return None
        for i in reversed(range(len(self.levels))):
            if t % self.levels[i].period == 0 and not self.levels[i].gradients:
                return i
        return None

    def record_touched(self, model: torch.nn.Module) -> None:
        """Mark the rows of every parameter of dim >= 2 that have a non-zero gradient now (``touched`` weighting;
        a no-op otherwise and during warm-up). Call after backward, before the optimizer step."""
        if self.weighting != "touched" or self.in_warmup:
            return
        for p in _module_of(model).parameters():
            if p.dim() < 2 or p.grad is None:
                continue
            rows = p.grad.detach().reshape(p.shape[0], -1).ne(0).any(dim=1)  # (rows,)
            for masks in self.touched:
                seen = masks.get(p)
                masks[p] = rows if seen is None else seen | rows

    def before_step(self, model: torch.nn.Module) -> None:
        """Call before each optimizer step: with outer momentum, the first step after the warm-up takes the anchor
        (the replicas are identical then: the warm-up all-reduced their gradients, or DDP broadcast the start)."""
        if self.outer_momentum and self.anchor is None and not self.in_warmup:
            params = list(_module_of(model).parameters())
            self.anchor = [p.detach().clone() for p in params]
            self.velocity = [torch.zeros_like(p) for p in params]

    def _outer_step(self, module: torch.nn.Module) -> None:
        """Replace the just-averaged parameters by the slow-momentum step from the anchor (see the module doc)."""
        if self.anchor is None or self.velocity is None:
            raise RuntimeError("ModelAverager(outer_momentum > 0) has no anchor: call before_step(model) before each "
                               "optimizer step, or wrap the optimizer in AveragingOptimizer")
        for p, a, u in zip(module.parameters(), self.anchor, self.velocity, strict=True):
            u.mul_(self.outer_momentum).add_(a - p.data)
            a.sub_(u)
            p.data.copy_(a)

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int | None:
        """Count one optimizer step and average if a level is due; returns the level index averaged, if any.
        ``optimizer``: the optimizer whose state is averaged too (needed with ``optimizer_state``)."""
        self.step_count += 1
        due = self.level_due(self.step_count)
        if due is not None:
            self.average(model, level=due, optimizer=optimizer)
        return due

    def average(self, model: torch.nn.Module, *, level: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Average parameters and floating buffers (with ``optimizer_state``, also ``optimizer``'s per-parameter
        state tensors) within this rank's group of ``level`` now (a sync point)."""
        if self.optimizer_state and optimizer is None:
            raise ValueError("ModelAverager(optimizer_state=True) needs the optimizer: call step(model, optimizer) "
                             "or wrap the optimizer in AveragingOptimizer")
        group, members = self.groups[level]
        module = _module_of(model)
        payload = 0
        weighted = set()
        if self.weighting == "touched":
            for p in module.parameters():
                if p.dim() >= 2 and p.is_floating_point():
                    payload += self._average_touched(p, self.touched[level].get(p), group, len(members))
                    weighted.add(p)
            for masks in self.touched[:level + 1]:  # a round of this level also settles every level inside it
                masks.clear()
        tensors = [p.data for p in module.parameters() if p not in weighted] + list(module.buffers())
        if self.optimizer_state and optimizer is not None:
            state = optimizer_state_tensors(optimizer, list(module.parameters()))
            _check_same_layout(len(state), group)
            tensors += state
        floats = [t for t in tensors if t.is_floating_point()]
        others = [t for t in tensors if not t.is_floating_point()]
        for dtype in {t.dtype for t in floats}:
            same = [t for t in floats if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in same])  # (total,)
            dist.all_reduce(flat, group=group)
            flat.div_(len(members))
            start = 0
            for t in same:
                t.copy_(flat[start:start + t.numel()].view_as(t))
                start += t.numel()
            payload += flat.numel() * flat.element_size()
        for t in others:  # e.g. BatchNorm's num_batches_tracked: take the group leader's
            dist.broadcast(t, src=members[0], group=group)
            payload += t.numel() * t.element_size()
        if self.outer_momentum and level == len(self.levels) - 1:
            self._outer_step(module)
        self.traffic.record_sync(level=self.levels[level].label, payload_bytes=payload)

    def _average_touched(self, p: torch.Tensor, mine: torch.Tensor | None, group: dist.ProcessGroup,
                         size: int) -> int:
        """Row-wise mean of ``p`` over the group's replicas that touched the row (``mine``: this replica's (rows,)
        mask; plain mean where none did); returns the bytes this rank sent. Three all-reduces: the touch counts, the
        touched rows' values, and the values of the rows nobody touched (the same rows on every rank once the
        counts are summed)."""
        rows = p.shape[0]
        if mine is None:
            mine = torch.zeros(rows, dtype=torch.bool, device=p.device)
        counts = mine.to(p.dtype)  # (rows,)
        dist.all_reduce(counts, group=group)
        flat = p.data.reshape(rows, -1)  # (rows, cols)
        values = flat * mine.unsqueeze(1).to(p.dtype)  # (rows, cols): zero where this replica did not touch
        dist.all_reduce(values, group=group)
        nobody = counts.eq(0)  # (rows,), identical on every rank
        untouched = flat[nobody].contiguous()  # (n0, cols)
        if untouched.numel():
            dist.all_reduce(untouched, group=group)
            untouched.div_(size)
        values.div_(counts.clamp(min=1).unsqueeze(1))
        values[nobody] = untouched
        flat.copy_(values)
        return (counts.numel() + values.numel() + untouched.numel()) * p.element_size()

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_count": self.step_count}
        if self.anchor is not None and self.velocity is not None:
            out["outer"] = {"anchor": [a.clone() for a in self.anchor], "velocity": [u.clone() for u in self.velocity]}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        outer = state.get("outer")
        self.anchor = None if outer is None else [a.clone() for a in outer["anchor"]]
        self.velocity = None if outer is None else [u.clone() for u in outer["velocity"]]

    def __repr__(self) -> str:
        levels = ", ".join(lv.label for lv in self.levels)
        outer = f", outer_momentum={self.outer_momentum}" if self.outer_momentum else ""
        return f"ModelAverager(levels=[{levels}], warmup={self.warmup_steps}, step={self.step_count}{outer})"


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The floating state tensors of ``optimizer`` shaped like their parameter (Adam's ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``; SGD's ``momentum_buffer``), in ``params`` order and key order: the same list on every rank
    whose optimizer has stepped the same parameters. Scalars such as Adam's ``step`` are left out (every replica
    counts the same steps)."""
    out = []
    for p in params:
        state = optimizer.state.get(p, {})
        for key in sorted(state):
            value = state[key]
            if (key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()
                    and value.shape == p.shape):
                out.append(value)
    return out


def _check_same_layout(count: int, group: dist.ProcessGroup) -> None:
    """Raise on every rank when the ranks of ``group`` hold different numbers of optimizer state tensors (one
    parameter stepped on one rank and never on another): averaging them would pair the wrong tensors."""
    spread = torch.tensor([count, -count], dtype=torch.int64)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=group)
    if int(spread[0]) != -int(spread[1]):
        raise RuntimeError(f"optimizer state differs between ranks ({-int(spread[1])} to {int(spread[0])} state "
                           "tensors): every rank must step every parameter before the first averaging round "
                           "(use --sync-warmup-steps >= 1 or turn --sync-optimizer-state off)")


class AveragingOptimizer(torch.optim.Optimizer):
    """Wrap an optimizer so that each ``step()`` is followed by :meth:`ModelAverager.step` (local SGD).

    Like PyTorch's ``PostLocalSGDOptimizer``, but averaging buffers as well and counting traffic. ``lr_scale``:
    the learning rate of every step after the averager's warm-up is multiplied by it for that step (the groups' lr,
    and any schedule that sets it, are left as they were).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, averager: ModelAverager, model: torch.nn.Module, *,
                 lr_scale: float = 1.0) -> None:
        if not lr_scale > 0:
            raise ValueError(f"lr_scale={lr_scale} must be > 0")
        self.optimizer = optimizer
        self.averager = averager
        self.model = model
        self.lr_scale = float(lr_scale)
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state  # the same dict: the wrapped optimizer keeps its momentum buffers

    def step(self, closure: Any = None) -> Any:
        self.averager.before_step(self.model)
        self.averager.record_touched(self.model)
        if self.lr_scale == 1.0 or self.averager.in_warmup:  # warm-up steps are all-reduced dense steps
            loss = self.optimizer.step(closure)
        else:
            base = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_scale
            try:
                loss = self.optimizer.step(closure)
            finally:
                for group, lr in zip(self.optimizer.param_groups, base, strict=True):
                    group["lr"] = lr
        self.averager.step(self.model, self.optimizer)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "averager": self.averager.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.averager.load_state_dict(state_dict["averager"])

    def __repr__(self) -> str:
        return f"AveragingOptimizer({self.optimizer.__class__.__name__}, {self.averager!r})"
