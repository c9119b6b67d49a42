"""Deep Gradient Compression (Lin et al., ICLR 2018) as a DDP communication hook.

Per parameter of dim > 1: add weight decay, clip locally (threshold × N^-1/2), accumulate *velocity*
(momentum correction), send exactly k = ceil(numel·(1 − sparsity)) entries of the accumulated velocity (values +
int32 indices, all-gathered, summed, divided by N), keep the rest as a local residual and zero the momentum of the
entries sent (momentum factor masking). Where k is above 1/32 of a tensor's index slots (sparsity under 96.9 %, the
warm-up's first stages) the indices travel as a bitmap instead (:func:`encode_indices`: same values, fewer bytes).
Parameters of dim ≤ 1 are all-reduced densely and get momentum + weight decay after averaging. The hook outputs the
*update direction*: the optimizer must be plain SGD (momentum 0, weight decay 0).

With ``DGCConfig.correction = "adam"`` the hook accumulates this rank's own Adam step (Adam on the local gradient,
moments kept per rank, as the velocity is in momentum correction) and the optimizer must be plain SGD(lr): the Adam
analogue of momentum correction, since an error-feedback residual fed to Adam moves a weight by about one step per
delivery however many steps it accumulated (Adam divides by the gradient's own scale).

With ``DGCConfig.momentum = 0`` the hook is error-feedback top-k: the local accumulator is the sum of the gradients
not yet sent (no momentum buffer, so masking has nothing to clear), the dense tensors are plainly averaged, and the
averaged sparse gradient goes to an optimizer that applies momentum once itself (Adam; or SGD with momentum).

With ``DGCConfig.local_tensors`` (an item-id table, say) the named tensors send no gradient: each rank steps them with
its own update (the same correction as the rest) and every ``local_period`` steps the ranks merge the rows that changed
since the last round (:func:`merge_changed_rows`, called from :meth:`DGCState.after_step`, which
:class:`gnn.comm.hooks.CommSession` runs after each optimizer step). Top-k of a 0.1 % share starves such a table: its
gradient touches thousands of rows a step, and a row waits hundreds of steps for its turn.

    state = DGCState(config.dgc)
    ddp_model.register_comm_hook(state, dgc_hook)
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=lr)  # no momentum, no weight decay: the hook does both
    # or, with DGCConfig(momentum=0.0): optimizer = torch.optim.Adam(ddp_model.parameters(), lr=lr)
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gnn.comm._annotations import ddp_hook
from gnn.comm.accounting import TrafficAccount
from gnn.comm.config import DGCConfig, dgc_k, dgc_row_k

logger = logging.getLogger(__name__)

INDEX_BYTES = 4  # indices travel as int32
MIN_SAMPLE_HITS = 32


def select_topk(magnitude: torch.Tensor, k: int, *, sample_fraction: float = 0.01, min_sample: int = 1024,
                slack: float = 1.3, generator: torch.Generator | None = None) -> tuple[torch.Tensor, bool]:
    """Indices of exactly ``k`` largest entries of ``magnitude``, by a threshold estimated on a random sample.

    The threshold is the entry of a ``sample_fraction`` sample (at least ``min_sample`` entries, and enough for 32
    sampled entries above it) that would select about ``slack``·k entries of the whole tensor. When it selects
    c >= k entries (so they include the top-k), the top k of those c are kept (exact trim: cost ∝ c, not n); when
    it selects fewer than k (the sample over-estimated), exact top-k runs on the whole tensor (the fallback,
    reported as the second return value). Either way the result is the exact top-k set (up to ties), of exactly
    k entries, so every rank's all-gather has the same size.

    Shapes:
        magnitude: (n,) non-negative; returns (k,) int64 indices and whether the exact fallback ran.
    """
    n = magnitude.numel()
    if k >= n:
        return torch.arange(n, device=magnitude.device), False
    # enough sample that ~MIN_SAMPLE_HITS sampled entries lie above the threshold (else the estimate is noise)
    m = max(min_sample, math.ceil(n * sample_fraction), math.ceil(MIN_SAMPLE_HITS * n / (k * slack)))
    if m >= n:
        return torch.topk(magnitude, k, sorted=False).indices, False
    sample = magnitude[torch.randint(n, (m,), generator=generator, device=magnitude.device)]
    k_sample = min(m, max(1, math.ceil(m * k * slack / n)))
    threshold = torch.topk(sample, k_sample, sorted=False).values.min()
    candidates = torch.nonzero(magnitude >= threshold).view(-1)  # (c,)
    c = candidates.numel()
    if c == k:
        return candidates, False
    if c > k:
        return candidates[torch.topk(magnitude[candidates], k, sorted=False).indices], False
    return torch.topk(magnitude, k, sorted=False).indices, True


@dataclass
class StepAudit:
    """What one compressed tensor went through in one step (kept only with ``DGCState(audit=True)``).

    Shapes: all (numel,) flattened; ``accumulated`` = velocity before selection, ``sent`` = dense form of the values
    sent, ``residual`` = velocity kept locally afterwards, ``gradient`` = local gradient incl. weight decay and clip;
    ``indices`` (k,) = the entries selected.
    """

    gradient: torch.Tensor
    accumulated: torch.Tensor
    sent: torch.Tensor
    residual: torch.Tensor
    k: int
    indices: torch.Tensor


@dataclass
class DGCState:
    """Residuals, momenta and counters of the DGC hook on one rank (pass as the hook's ``state``).

    Velocities/momenta are keyed by parameter (not bucket), so DDP's bucket rebuild after the first step is harmless.
    """

    config: DGCConfig
    process_group: dist.ProcessGroup | None = None
    audit: bool = False
    traffic: TrafficAccount = field(default_factory=TrafficAccount)
    epoch: int = 0
    fallbacks: int = 0
    selections: int = 0
    velocities: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    momenta: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    second_moments: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    adam_steps: dict[torch.Tensor, int] = field(default_factory=dict)
    last_audit: dict[str, StepAudit] = field(default_factory=dict)
    last_k: dict[str, int] = field(default_factory=dict)
    names: dict[torch.Tensor, str] = field(default_factory=dict)
    layouts: dict[torch.Tensor, str] = field(default_factory=dict)
    ever_sent: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    local_snapshots: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    local_touches: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    local_steps: int = 0
    local_rounds: int = 0
    row_owners: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.generator.manual_seed(self.config.seed * 1_000_003 + rank)

    def set_epoch(self, epoch: int) -> None:
        """Tell the hook the epoch (drives the sparsity warm-up when ``warmup_unit == "epoch"``)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.epoch = epoch

    def name_parameters(self, module: torch.nn.Module) -> None:
        """Label parameters by their module names (audits, per-tensor counters, and the ``dense_tensors`` /
        ``row_tensors`` patterns, each of which must match a parameter)."""
        self.names = {p: n for n, p in module.named_parameters()}
        self.layouts = {}
        cfg = self.config
        for pattern in (*cfg.dense_tensors, *cfg.row_tensors, *cfg.local_tensors, *cfg.owner_tensors,
                        *cfg.shared_moment_tensors):
            if not any(_matches(n, (pattern,)) for n in self.names.values()):
                shown = ", ".join(sorted(self.names.values())[:8])
                raise ValueError(f"DGC pattern {pattern!r} (--dgc-dense / --dgc-rows / --dgc-local / "
                                 f"--dgc-owner-scale / --dgc-shared-moment) matches no parameter of the model; its "
                                 f"parameters are: {shown}, ...")
        for name, param in module.named_parameters():
            for flag, patterns in (("--dgc-owner-scale", cfg.owner_tensors),
                                   ("--dgc-shared-moment", cfg.shared_moment_tensors)):
                if _matches(name, patterns) and (param.dim() != 2 or self.layout(param) in ("dense", "local")):
                    raise ValueError(f"DGC {flag} names {name!r} ({param.dim()}-D, sent as {self.layout(param)!r}): "
                                     f"it acts on compressed 2-D tensors only; drop it from --dgc-dense / "
                                     f"--dgc-local or from {flag}")

    def layout(self, param: torch.Tensor) -> str:
        """How ``param`` travels: ``"local"`` (a ``local_tensors`` pattern: no gradient sent, changed rows merged
        every ``local_period`` steps), ``"dense"`` (dim ≤ 1 or a ``dense_tensors`` pattern: all-reduced), ``"rows"``
        (a ``row_tensors`` pattern: whole rows selected) or ``"entries"`` (top-k entries)."""
        kind = self.layouts.get(param)
        if kind is None:
            name = self.names.get(param)
            cfg = self.config
            if name is None and (cfg.dense_tensors or cfg.row_tensors or cfg.local_tensors):
                raise ValueError("DGC dense_tensors / row_tensors / local_tensors need parameter names; call "
                                 "DGCState.name_parameters(module) before training")
            kind = ("local" if _matches(name, cfg.local_tensors)
                    else "dense" if param.dim() <= 1 or _matches(name, cfg.dense_tensors)
                    else "rows" if _matches(name, cfg.row_tensors) else "entries")
            self.layouts[param] = kind
        return kind

    def after_step(self, module: torch.nn.Module) -> bool:
        """Count one optimizer step; every ``local_period`` steps merge the local tensors (:meth:`merge_local`).
        Returns whether a round ran. A no-op without ``local_tensors``."""
        if not self.config.local_tensors:
            return False
        self.local_steps += 1
        if self.local_steps % self.config.local_period:
            return False
        self.merge_local(module)
        return True

    def merge_local(self, module: torch.nn.Module, *, into: torch.nn.Module | None = None) -> int:
        """One round of the local tensors now (a collective: every rank calls it): each rank sends the rows that
        changed since the last round as (index, change) pairs and every rank applies the merged changes
        (``local_merge``), so the tensors are bit-identical on every rank afterwards. With ``into`` (a copy of
        ``module``, e.g. for an evaluation between epochs) the merge is written there and the training state,
        snapshots included, is left as it was. Returns the bytes this rank sent (also counted in :attr:`traffic`
        as level ``local_rows``, unless ``into`` is given)."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("DGC local tensors need an initialised process group (dist.init_process_group)")
        target = dict((into if into is not None else module).named_parameters())
        sent = 0
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):  # same order on every rank
            if self.layout(param) != "local":
                continue
            snapshot = self.local_snapshots.get(param)
            if snapshot is None:  # no backward yet: nothing changed
                snapshot = self.local_snapshots[param] = param.detach().clone()
            out = target[name].detach()
            touches = self.local_touches.get(param)
            sent += merge_changed_rows(param.detach(), snapshot, out, group, merge=self.config.local_merge,
                                       update_snapshot=into is None,
                                       touches=touches if self.config.local_merge == "touches" else None)
            if into is None and touches is not None:
                touches.zero_()
        if into is None:
            self.local_rounds += 1
            self.traffic.record_sync(level="local_rows", payload_bytes=sent)
        return sent

    def flush(self, module: torch.nn.Module, lr: float) -> int:
        """Apply what the ranks still hold back (a collective): the residual of every compressed tensor is averaged
        over the ranks (a dense all-reduce) and stepped as ``param -= lr · mean residual``, the residuals cleared.
        Residuals hold update directions (Adam steps, or velocities), which the outer plain SGD scales by ``lr``.
        Returns the bytes this rank sent (counted in :attr:`traffic` as level ``flush``)."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("DGCState.flush needs an initialised process group (dist.init_process_group)")
        world = dist.get_world_size(group)
        sent = 0
        for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):  # same order on every rank
            velocity = self.velocities.get(param)  # compressed tensors only: dense and local ones keep none
            if velocity is None:
                continue
            mean = velocity.clone()
            dist.all_reduce(mean, group=group)
            mean.div_(world)
            with torch.no_grad():
                param.view(-1).sub_(mean, alpha=lr)
            velocity.zero_()
            sent += mean.numel() * mean.element_size()
        self.traffic.record_sync(level="flush", payload_bytes=sent)
        return sent

    def state_dict(self) -> dict[str, object]:
        """Residual velocities, momenta, Adam moments, the sampler's generator and the counters, by parameter name
        (call :meth:`name_parameters` first), for checkpoints: a rank restored from it continues bit for bit."""
        missing = [p for p in self.velocities if p not in self.names]
        if missing:
            raise ValueError(f"{len(missing)} parameters have no name; call DGCState.name_parameters(module) first")
        return {"epoch": self.epoch, "steps": self.traffic.steps,
                "velocities": {self.names[p]: v.clone() for p, v in self.velocities.items()},
                "momenta": {self.names[p]: u.clone() for p, u in self.momenta.items()},
                "second_moments": {self.names[p]: w.clone() for p, w in self.second_moments.items()},
                "adam_steps": {self.names[p]: t for p, t in self.adam_steps.items()},
                "ever_sent": {self.names[p]: m.clone() for p, m in self.ever_sent.items()},
                "row_owners": {self.names[p]: o.clone() for p, o in self.row_owners.items()},
                "generator": self.generator.get_state(), "fallbacks": self.fallbacks, "selections": self.selections,
                "local_steps": self.local_steps, "local_rounds": self.local_rounds}

    def load_state_dict(self, state: dict[str, Any], module: torch.nn.Module) -> None:
        """Restore :meth:`state_dict` onto ``module``'s parameters (matched by name)."""
        self.name_parameters(module)
        by_name = dict(module.named_parameters())
        unknown = sorted(set(state["velocities"]) - set(by_name))
        if unknown:
            raise ValueError(f"DGC state names parameters the module lacks: {unknown[:5]}; wrong checkpoint?")
        self.epoch = int(state["epoch"])
        self.traffic.steps = int(state["steps"])
        self.velocities = {by_name[n]: v.clone() for n, v in state["velocities"].items()}
        self.momenta = {by_name[n]: u.clone() for n, u in state["momenta"].items()}
        self.second_moments = {by_name[n]: w.clone() for n, w in state.get("second_moments", {}).items()}
        self.adam_steps = {by_name[n]: int(t) for n, t in state.get("adam_steps", {}).items()}
        self.ever_sent = {by_name[n]: m.clone() for n, m in state.get("ever_sent", {}).items()}
        self.row_owners = {by_name[n]: o.clone() for n, o in state.get("row_owners", {}).items()}
        if "generator" in state:  # the threshold sampler continues where it stopped
            self.generator.set_state(state["generator"])
        self.fallbacks, self.selections = int(state.get("fallbacks", 0)), int(state.get("selections", 0))
        # the local tensors' round clock; their snapshots are retaken at the next backward (every rank resumes from
        # the same weights, so changes a rank made after the last round are not in them)
        self.local_steps, self.local_rounds = int(state.get("local_steps", 0)), int(state.get("local_rounds", 0))
        self.local_snapshots, self.local_touches = {}, {}

    @property
    def sparsity(self) -> float:
        """Sparsity applied at the step in progress."""
        clock = self.epoch if self.config.warmup_unit == "epoch" else self.traffic.steps
        return self.config.sparsity_at(clock)

    @property
    def residual_norm(self) -> float:
        """L2 norm of everything kept back locally (velocities not yet sent)."""
        return math.sqrt(sum(float(v.pow(2).sum()) for v in self.velocities.values()))

    @property
    def coverage(self) -> float:
        """Share of the compressed tensors' entries this rank has sent at least once since the start (0 before the
        first step). At sparsity s, N steps can reach at most N·(1 − s) of the entries, so a short run at 99.9 %
        leaves most weights that the dense run moves untouched."""
        total = sum(m.numel() for m in self.ever_sent.values())
        return sum(int(m.sum()) for m in self.ever_sent.values()) / total if total else 0.0

    def coverage_by_tensor(self) -> dict[str, float]:
        """:attr:`coverage` of each compressed tensor, by parameter name (call :meth:`name_parameters` first)."""
        return {self.names.get(p, f"param{id(p)}"): int(m.sum()) / m.numel() for p, m in self.ever_sent.items()}

    def stats(self) -> dict[str, object]:
        """The hook's own counters, plain JSON (the bytes are in :attr:`traffic`, which the session reports)."""
        out: dict[str, object] = {"sparsity": self.sparsity, "fallbacks": self.fallbacks,
                                  "selections": self.selections, "residual_norm": self.residual_norm,
                                  "coverage": self.coverage, "coverage_by_tensor": self.coverage_by_tensor()}
        if self.config.local_tensors:
            out["local_rounds"] = self.local_rounds
        return out

    def __repr__(self) -> str:
        return (f"DGCState(sparsity={self.sparsity}, epoch={self.epoch}, tensors={len(self.velocities)}, "
                f"fallbacks={self.fallbacks}/{self.selections}, {self.traffic!r})")


def _matches(name: str | None, patterns: tuple[str, ...]) -> bool:
    return name is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def merge_changed_rows(param: torch.Tensor, snapshot: torch.Tensor, out: torch.Tensor, group: dist.ProcessGroup,
                       *, merge: str = "sum", update_snapshot: bool = True,
                       touches: torch.Tensor | None = None) -> int:
    """Merge the rows of ``param`` that the ranks of ``group`` changed since ``snapshot`` (the value every rank
    agreed on at the last round) and write the result to ``out`` (``param`` itself, or a copy of it).

    Each rank sends the indices (int32) and changes (``param - snapshot``) of its changed rows, padded to the
    largest count of the group (gloo's all-gather needs equal sizes; padding rows carry index -1). A row changed by
    some ranks becomes ``snapshot + Σ changes`` (``merge="sum"``) or ``snapshot + mean of the changes`` over those
    ranks (``"mean"``), or ``"touches"``: the mean weighted by ``touches``, the steps in which each rank's gradient
    touched the row (sent as one float32 per changed row), so that a row one rank trains takes that rank's change
    and a few steps of another rank's momentum drift barely move it (a row no rank touched: the plain mean). Every
    rank adds the changes in rank order, so the result is bit-identical everywhere. A row nobody changed keeps its
    value (already the same on every rank). With ``update_snapshot`` the snapshot moves to the merged rows. Returns
    the bytes this rank sent (the count, then its padded indices, changes and, with ``touches``, weights).

    Shapes: ``param``, ``snapshot``, ``out`` (rows, ...) alike, rows along the first dimension; ``touches`` (rows,).
    """
    if merge == "touches" and touches is None:
        raise ValueError("merge_changed_rows(merge='touches') needs the touch counts (touches=)")
    rows = param.shape[0]
    current, base, target = param.reshape(rows, -1), snapshot.view(rows, -1), out.view(rows, -1)  # (rows, cols)
    world = dist.get_world_size(group)
    changed = torch.nonzero((current != base).any(dim=1)).view(-1)  # (c,)
    count = torch.tensor([changed.numel()], dtype=torch.int64, device=current.device)  # NCCL gathers device tensors
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    width = max(int(c) for c in counts)
    sent = count.numel() * count.element_size()
    if width == 0:
        return sent
    indices = torch.full((width,), -1, dtype=torch.int32, device=current.device)
    indices[:changed.numel()] = changed.to(torch.int32)
    deltas = current.new_zeros(width, current.shape[1])  # (width, cols)
    deltas[:changed.numel()] = current[changed] - base[changed]
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    all_deltas = [torch.empty_like(deltas) for _ in range(world)]
    dist.all_gather(all_indices, indices, group=group)
    dist.all_gather(all_deltas, deltas, group=group)
    sent += indices.numel() * INDEX_BYTES + deltas.numel() * deltas.element_size()
    all_weights: list[torch.Tensor] = []
    if merge == "touches" and touches is not None:
        weights = current.new_zeros(width)  # (width,)
        weights[:changed.numel()] = touches[changed].to(current.dtype)
        all_weights = [torch.empty_like(weights) for _ in range(world)]
        dist.all_gather(all_weights, weights, group=group)
        sent += weights.numel() * weights.element_size()
    total = torch.zeros_like(current)  # (rows, cols)
    weighted = torch.zeros_like(current) if all_weights else None  # (rows, cols)
    hits = current.new_zeros(rows)  # (rows,)
    mass = current.new_zeros(rows)  # (rows,) the touch counts of the ranks that changed a row
    for r, (n, rank_indices, rank_deltas) in enumerate(zip(counts, all_indices, all_deltas, strict=True)):
        at = rank_indices[:int(n)].long()
        total.index_add_(0, at, rank_deltas[:int(n)])
        hits.index_add_(0, at, current.new_ones(at.numel()))
        if weighted is not None:
            w = all_weights[r][:int(n)]
            weighted.index_add_(0, at, rank_deltas[:int(n)] * w.unsqueeze(1))
            mass.index_add_(0, at, w)
    touched = hits > 0
    change = total[touched]
    if merge in ("mean", "touches"):
        change /= hits[touched].unsqueeze(1)
    if weighted is not None:  # rows some rank's gradient touched: the touch-weighted mean
        by_touch = mass[touched] > 0
        change[by_touch] = weighted[touched][by_touch] / mass[touched][by_touch].unsqueeze(1)
    merged = base[touched] + change
    with torch.no_grad():
        target[touched] = merged
        if update_snapshot:
            base[touched] = merged
    return sent


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """(n,) bool -> (ceil(n/8),) uint8, bit i of byte j = flags[8j + i]."""
    padded = torch.zeros(-(-flags.numel() // 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[:flags.numel()] = flags.to(torch.uint8)
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(flags.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (ceil(n/8),) uint8 -> (n,) bool."""
    return (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)).ne(0).view(-1)[:n]


def row_owner_scale(state: DGCState, param: torch.Tensor, grad: torch.Tensor, group: dist.ProcessGroup | None,
                    world: int) -> tuple[torch.Tensor, int]:
    """Per-row factor N / owners for an ``owner_tensors`` parameter, where owners = the ranks whose gradient touched
    the row (nonzero gradient) at the latest step any did (N before the first touch). A collective: every rank
    all-gathers its bitmap of touched rows. Returns the (rows,) factor and the bytes this rank sent.

    Shapes: grad (rows, ...) -> (rows,)."""
    rows = param.shape[0]
    packed = pack_bits(grad.detach().reshape(rows, -1).ne(0).any(dim=1))  # (ceil(rows/8),)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    touched = torch.stack([unpack_bits(p, rows) for p in gathered]).sum(dim=0, dtype=torch.float32)  # (rows,)
    owners = state.row_owners.get(param)
    if owners is None:
        owners = state.row_owners[param] = torch.full((rows,), float(world), device=grad.device)
    owners.copy_(torch.where(touched > 0, touched, owners))
    return world / owners, packed.numel()


def shared_squares(state: DGCState, param: torch.Tensor, g: torch.Tensor, group: dist.ProcessGroup | None,
                   world: int) -> tuple[torch.Tensor, int]:
    """The ranks' mean squared gradient of a ``shared_moment_tensors`` parameter, per entry or per row (the mean
    over the row, broadcast back), by one all-reduce (a collective). Returns it and the bytes this rank sent.

    Shapes: g (n,) flattened -> (n,)."""
    rows = param.shape[0]
    by = state.config.shared_moment_by
    squares = g * g if by == "entries" else (g * g).view(rows, -1).mean(dim=1)
    if by == "rows-log8":
        squares, sent = _gather_log8(squares, group, world, owners=state.config.shared_moment_estimate == "owners")
    else:
        dist.all_reduce(squares, group=group)
        squares.div_(world)
        sent = squares.numel() * squares.element_size()
    if squares.numel() != g.numel():
        squares = squares.repeat_interleave(g.numel() // rows)
    return squares, sent


LOG8_STEPS = 4  # codes per octave: a square within 2^(1/8) (9 %), its root within 4.4 %
LOG8_OFFSET = 200  # code of a square of 1; codes 1..255 span 2^-49.75 .. 2^13.75


def _gather_log8(squares: torch.Tensor, group: dist.ProcessGroup | None, world: int,
                 owners: bool = False) -> tuple[torch.Tensor, int]:
    """The ranks' mean of non-negative ``squares`` (rows,), each rank sending only its nonzero entries: a bitmap of
    them and one byte each, the square's log2 in quarter octaves (padded to the group's largest count so gloo's
    equal-size all-gather works). Every rank decodes the same bytes, so all get the same mean. With ``owners`` each
    entry's mean is multiplied by k / N, k = the ranks that sent it: the square of the ranks' mean gradient when the
    k ranks' gradients agree (exact for k = 1: one rank's g, averaged over N, is g / N). Returns it and the bytes this
    rank sent (count, bitmap, padded codes)."""
    rows = squares.numel()
    touched = squares > 0
    codes = (squares[touched].log2() * LOG8_STEPS).round().add(LOG8_OFFSET).clamp(1, 255).to(torch.uint8)  # (c,)
    count = torch.tensor([codes.numel()], dtype=torch.int64, device=squares.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    width = max(1, *(int(c) for c in counts))  # at least one byte: gloo's all-gather of empty tensors is not relied on
    padded = torch.zeros(width, dtype=torch.uint8, device=squares.device)
    padded[:codes.numel()] = codes
    bitmap = pack_bits(touched)
    bitmaps = [torch.empty_like(bitmap) for _ in range(world)]
    all_codes = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bitmaps, bitmap, group=group)
    dist.all_gather(all_codes, padded, group=group)
    total = torch.zeros_like(squares)
    senders = torch.zeros_like(squares)
    for n, rank_bitmap, rank_codes in zip(counts, bitmaps, all_codes, strict=True):
        values = torch.pow(2.0, (rank_codes[:int(n)].to(squares.dtype) - LOG8_OFFSET) / LOG8_STEPS)
        sent_rows = unpack_bits(rank_bitmap, rows)
        total[sent_rows] += values
        senders[sent_rows] += 1.0
    total.div_(world)
    if owners:
        total.mul_(senders / world)
    return total, count.element_size() + bitmap.numel() + width


def _compress_local(state: DGCState, param: torch.Tensor, grad: torch.Tensor, world: int, sparsity: float,
                    group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fold ``grad`` into the velocity of ``param`` and take its top-k out. Returns (values, int32 indices, bytes
    sent besides them): k entries and their flat indices, or, for a ``rows`` tensor, r whole rows (r·cols values) and
    their row indices. With the Adam correction, an ``owner_tensors`` parameter scales each row of this rank's step
    (:func:`row_owner_scale`) and a ``shared_moment_tensors`` one updates Adam's v from the ranks' mean squares
    (:func:`shared_squares`); both are collectives on ``group``, and their bytes are the third value."""
    cfg = state.config
    extra = 0
    name = state.names.get(param)
    g = grad.detach().reshape(-1).clone()  # (n,)
    if cfg.weight_decay:
        g.add_(param.detach().reshape(-1), alpha=cfg.weight_decay)
    if cfg.clip_norm is not None:  # local clipping, threshold scaled by N^-1/2 (paper §3.2)
        limit = cfg.clip_norm / math.sqrt(world)
        norm = float(g.norm())
        if norm > limit:
            g.mul_(limit / norm)
    velocity = state.velocities.get(param)
    if velocity is None:
        velocity = state.velocities[param] = torch.zeros_like(g)
        if cfg.momentum and cfg.correction == "momentum":
            state.momenta[param] = torch.zeros_like(g)
    momentum = state.momenta.get(param) if cfg.correction == "momentum" else None
    if cfg.correction == "adam":  # Adam correction: accumulate this rank's own Adam step on its local gradient
        squares = None
        if _matches(name, cfg.shared_moment_tensors):
            squares, extra = shared_squares(state, param, g, group, world)
        step = _adam_step(state, param, g, squares)
        if _matches(name, cfg.owner_tensors):
            scale, bitmap_bytes = row_owner_scale(state, param, grad, group, world)
            step.view(scale.numel(), -1).mul_(scale.unsqueeze(1))
            extra += bitmap_bytes
        velocity.add_(step)
    elif momentum is None:  # momentum 0: error feedback, v ← v + g (the optimizer applies momentum, if any)
        velocity.add_(g)
    else:
        momentum.mul_(cfg.momentum).add_(g)  # u ← m·u + g
        velocity.add_(momentum)  # v ← v + u (momentum correction: accumulate velocity)
    accumulated = velocity.clone() if state.audit else None
    if state.layout(param) == "rows":  # whole rows by L2 norm, as many as the entry-wise bytes allow
        rows = param.shape[0]
        cols = g.numel() // rows
        selected, fell_back = select_topk(velocity.view(rows, cols).pow(2).sum(dim=1),
                                          dgc_row_k(rows, cols, sparsity, value_bytes=g.element_size(),
                                                    index_bytes=INDEX_BYTES),
                                          sample_fraction=cfg.sample_fraction, min_sample=cfg.min_sample,
                                          slack=cfg.threshold_slack, generator=state.generator)  # (r,) rows
        indices = (selected.unsqueeze(1) * cols + torch.arange(cols, device=g.device)).view(-1)  # (r·cols,)
    else:
        magnitude = velocity.abs()
        if cfg.correction == "adam" and cfg.select == "gradient":  # Adam steps back in gradient units: × √v
            magnitude.mul_(state.second_moments[param].sqrt())
        selected, fell_back = select_topk(magnitude, dgc_k(g.numel(), sparsity),
                                          sample_fraction=cfg.sample_fraction, min_sample=cfg.min_sample,
                                          slack=cfg.threshold_slack, generator=state.generator)  # (k,) entries
        indices = selected
    k = indices.numel()
    state.selections += 1
    state.fallbacks += int(fell_back)
    values = velocity[indices].clone()  # (k,)
    velocity[indices] = 0.0
    sent_mask = state.ever_sent.get(param)
    if sent_mask is None:
        sent_mask = state.ever_sent[param] = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
    sent_mask[indices] = True
    if momentum is not None and cfg.momentum_masking:
        momentum[indices] = 0.0
    if cfg.correction == "adam" and cfg.adam_masking:  # the same for Adam's first moment
        state.momenta[param][indices] = 0.0
    name = state.names.get(param, f"param{id(param)}")
    state.last_k[name] = k
    if accumulated is not None:
        sent = torch.zeros_like(g)
        sent[indices] = values
        state.last_audit[name] = StepAudit(gradient=g, accumulated=accumulated, sent=sent,
                                           residual=velocity.clone(), k=k,
                                           indices=indices.clone())
    return values, selected.to(torch.int32), extra


def _adam_step(state: DGCState, param: torch.Tensor, g: torch.Tensor,
               squares: torch.Tensor | None = None) -> torch.Tensor:
    """Bias-corrected Adam direction m̂ / (√v̂ + eps) of ``param`` after gradient ``g`` (its moments kept in the state;
    the learning rate is applied by the outer SGD); v follows ``squares`` (the ranks' mean square) when given, else
    g². Shapes: g, squares (n,) -> (n,)."""
    cfg = state.config
    beta1, beta2 = cfg.adam_betas
    m = state.momenta.get(param)
    if m is None:
        m = state.momenta[param] = torch.zeros_like(g)
        state.second_moments[param] = torch.zeros_like(g)
    v = state.second_moments[param]
    t = state.adam_steps[param] = state.adam_steps.get(param, 0) + 1
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    if squares is None:
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    else:
        v.mul_(beta2).add_(squares, alpha=1.0 - beta2)
    denom = (v / (1.0 - beta2 ** t)).sqrt_().add_(cfg.adam_eps)
    return (m / (1.0 - beta1 ** t)).div_(denom)


def _dense_momentum(state: DGCState, param: torch.Tensor, averaged: torch.Tensor) -> torch.Tensor:
    """SGD momentum + weight decay for a densely averaged tensor (identical on every rank); with momentum 0 the
    averaged gradient (plus weight decay), without a momentum buffer."""
    cfg = state.config
    d = averaged.clone()
    if cfg.weight_decay:
        d.add_(param.detach().reshape(-1), alpha=cfg.weight_decay)
    if cfg.correction == "adam":  # the averaged gradient is the same on every rank, so is this step
        return _adam_step(state, param, d)
    if not cfg.momentum:
        return d
    buf = state.momenta.get(param)
    if buf is None:
        buf = state.momenta[param] = torch.zeros_like(d)
    return buf.mul_(cfg.momentum).add_(d)


@ddp_hook
def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sparse all-gather for dim>1 tensors, dense all-reduce for the rest."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    grads, params = bucket.gradients(), bucket.parameters()
    sparsity = state.sparsity
    sparse_slots, dense_slots = [], []
    values, indices = [], []
    extra_bytes = 0  # row bitmaps of owner_tensors, squares of shared_moment_tensors
    for slot, (param, grad) in enumerate(zip(params, grads, strict=True)):
        kind = state.layout(param)
        if kind == "local":  # no exchange: this rank's own update direction, merged by rows every local_period steps
            if param not in state.local_snapshots:  # before the first step: the value every rank starts from
                state.local_snapshots[param] = param.detach().clone()
            if state.config.local_merge == "touches":
                counts = state.local_touches.get(param)
                if counts is None:
                    counts = state.local_touches[param] = torch.zeros(param.shape[0], dtype=torch.int64,
                                                                       device=grad.device)
                counts += grad.reshape(param.shape[0], -1).ne(0).any(dim=1)
            grad.view(-1).copy_(_dense_momentum(state, param, grad.reshape(-1)))
        elif kind == "dense":
            dense_slots.append(slot)
        else:
            v, i, side_bytes = _compress_local(state, param, grad, world, sparsity, group)
            extra_bytes += side_bytes
            values.append(v)
            indices.append(i)
            sparse_slots.append(slot)
    elem = buffer.element_size()
    # positions an index names: a whole row for a ``rows`` tensor, else an entry
    slots = [grads[s].shape[0] if state.layout(params[s]) == "rows" else grads[s].numel() for s in sparse_slots]
    encoded = [encode_indices(v, i, n) for v, i, n in zip(values, indices, slots, strict=True)]
    sent_values = torch.cat([v for v, _ in encoded]) if encoded else buffer.new_zeros(0)  # (K,)
    sent_indices = (torch.cat([i for _, i in encoded]) if encoded
                    else torch.zeros(0, dtype=torch.int32, device=buffer.device))  # (I,): indices or bitmap words
    dense = torch.cat([grads[s].reshape(-1) for s in dense_slots]) if dense_slots else buffer.new_zeros(0)  # (D,)
    state.traffic.record(dense_bytes=buffer.numel() * elem,
                         sent_bytes=(sent_values.numel() + dense.numel()) * elem + sent_indices.numel() * INDEX_BYTES
                         + extra_bytes)
    # Synchronisation point: every rank sends exactly K values and I index words (k and the encoding follow from the
    # sizes alone, equal on every rank), so gloo's equal-size gather works.
    gathered_values = [torch.empty_like(sent_values) for _ in range(world)]
    gathered_indices = [torch.empty_like(sent_indices) for _ in range(world)]
    futures = [dist.all_gather(gathered_values, sent_values, group=group, async_op=True).get_future(),
               dist.all_gather(gathered_indices, sent_indices, group=group, async_op=True).get_future()]
    if dense.numel():
        futures.append(dist.all_reduce(dense, group=group, async_op=True).get_future())
    if bucket.is_last():
        state.traffic.end_step()

    def decompress(_: torch.futures.Future[list[torch.futures.Future[object]]]) -> torch.Tensor:
        at_value = at_index = 0
        for slot, (local_values, local_words), n_slots in zip(sparse_slots, encoded, slots, strict=True):
            n_values, n_words = local_values.numel(), local_words.numel()
            out = grads[slot].view(n_slots, -1)  # (index slots, values per index): (n, 1) entries, (rows, cols) rows
            out.zero_()
            senders = (torch.zeros(n_slots, dtype=out.dtype, device=out.device) if state.config.average == "senders"
                       else None)
            for rank_values, rank_words in zip(gathered_values, gathered_indices, strict=True):
                at = decode_indices(rank_words[at_index:at_index + n_words], n_slots, n_values // out.shape[1])
                out.index_add_(0, at, rank_values[at_value:at_value + n_values].view(at.numel(), -1))
                if senders is not None:
                    senders.index_add_(0, at, torch.ones(at.numel(), dtype=out.dtype, device=out.device))
            if senders is None:
                out.div_(world)
            else:  # each entry (row) over the ranks that sent it
                out.div_(senders.clamp(min=1.0).unsqueeze(1))
            at_value += n_values
            at_index += n_words
        start = 0
        for slot in dense_slots:
            n = grads[slot].numel()
            averaged = dense[start:start + n] / world
            grads[slot].view(-1).copy_(_dense_momentum(state, params[slot], averaged))
            start += n
        return buffer

    return torch.futures.collect_all(futures).then(decompress)


def _bitmap_words(slots: int) -> int:
    """int32 words that carry a bitmap of ``slots`` bits."""
    return -(-slots // 32)


def encode_indices(values: torch.Tensor, indices: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cheaper of two exact encodings of k distinct ``indices`` into ``slots`` positions: the int32 indices
    themselves (k words), or, when k > ceil(slots / 32), a bitmap of them packed into int32 words with the values
    reordered by position (each index owning ``values.numel() // k`` consecutive values). The choice depends on k and
    slots only, so every rank of an exact-k all-gather makes the same one. :func:`decode_indices` inverts it.

    Shapes: values (k·w,), indices (k,) int32 -> values (k·w,), words (k,) or (ceil(slots/32),) int32."""
    k = indices.numel()
    if k <= _bitmap_words(slots):
        return values, indices
    order = torch.argsort(indices)
    flags = torch.zeros(_bitmap_words(slots) * 32, dtype=torch.bool, device=indices.device)  # whole int32 words
    flags[indices.long()] = True
    return values.view(k, -1)[order].reshape(-1), pack_bits(flags).view(torch.int32)


def decode_indices(words: torch.Tensor, slots: int, k: int) -> torch.Tensor:
    """Inverse of :func:`encode_indices`: the k positions (int64, ascending when they came as a bitmap)."""
    if k <= _bitmap_words(slots):
        return words.long()
    return unpack_bits(words.view(torch.uint8), slots).nonzero().squeeze(1)
