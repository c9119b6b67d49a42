"""Gradient-traffic settings: ``--compression dgc|fp16|bf16|powersgd|none`` and
``--sync allreduce|local:H|hierarchical:G@P,...,all@P`` parsed into a frozen, validated :class:`CommConfig`.

Hierarchical spec: comma-separated ``group_size@period`` levels with strictly increasing group sizes (each dividing
the next) and strictly increasing periods; the last level must cover every rank (``all@P``, or the world size,
checked when the process group exists). ``hierarchical:2@4,all@16``: groups of 2 average every 4 steps, everyone
every 16 (the larger level wins when both divide a step). The first level may instead read ``G@grad``: groups of G
all-reduce their *gradients* every step (synchronous data parallelism inside a group, as PyTorch's
``post_localSGD_hook`` does within its subgroup), and the levels after it average models: ``hierarchical:2@grad,all@4``
trains pairs of ranks as one synchronous replica each and averages the pairs every 4 steps.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd", "dgc")
SYNC_KINDS = ("allreduce", "local", "hierarchical")
SYNC_WEIGHTINGS = ("uniform", "touched")  # how an averaging round weighs the replicas (gnn/comm/averaging.py)
DGC_CORRECTIONS = ("momentum", "adam")  # what the DGC hook accumulates
DGC_SHARED_MOMENTS = ("entries", "rows", "rows-log8")  # how --dgc-shared-moment exchanges the squared gradients
DGC_WARMUP_DEFAULT = (0.75, 0.9375, 0.984375, 0.996)  # Lin et al. 2018, then `sparsity` (0.999)
DGC_LOCAL_MERGES = ("sum", "mean", "touches")  # how a round combines the ranks' changes to a local tensor's row
DGC_AVERAGES = ("world", "senders")  # what divides the sum of the values sent for an entry


@dataclass(frozen=True)
class SyncLevel:
    """One synchronisation level: ranks in consecutive blocks of ``group_size`` (``None`` = all ranks) average
    parameters and buffers every ``period`` local steps; with ``gradients`` (first level only, period 1) they
    all-reduce gradients every step instead, before the optimizer step."""

    group_size: int | None
    period: int
    gradients: bool = False

    @property
    def label(self) -> str:
        return f"{'all' if self.group_size is None else f'group{self.group_size}'}@{self.spec_period}"

    @property
    def spec_period(self) -> str:
        """``grad`` for a gradient level, else the period: the text after ``@`` in a ``--sync`` spec."""
        return "grad" if self.gradients else str(self.period)


@dataclass(frozen=True)
class DGCConfig:
    """Deep Gradient Compression settings (Lin et al., ICLR 2018).

    Args:
        sparsity: final share of each dim>1 tensor's entries kept back per step (default 0.999: send 0.1 %).
        warmup_sparsities: sparsities of the warm-up stages before ``sparsity`` (default 75, 93.75, 98.44, 99.6 %).
        warmup_unit: what a warm-up stage counts, ``"epoch"`` (the trainer calls ``set_epoch``) or ``"step"``
            (default ``"epoch"``).
        warmup_stage_length: epochs (or steps) per warm-up stage (default 1).
        momentum: momentum of the velocity kept in the hook (momentum correction; default 0.9). Use plain SGD
            (momentum 0, weight decay 0) as the optimizer. 0 makes the hook error-feedback top-k: it accumulates
            the raw gradients not yet sent (nothing is lost), sends the exact top-k of that accumulator and hands
            the averaged sparse gradient to an optimizer that applies momentum once itself (Adam, or SGD with
            momentum); an optimizer other than momentum-free SGD is refused while this is above 0.
        weight_decay: L2 weight decay added to the local gradient inside the hook (default 0.0).
        clip_norm: local per-tensor gradient-norm clip; the threshold is scaled by N^-1/2 (default None: off).
        momentum_masking: zero the momentum of entries just sent (momentum factor masking; default True; no
            effect at momentum 0, where there is no momentum buffer).
        correction: what the hook accumulates: ``"momentum"`` (the SGD velocity, DGC's momentum correction; with
            momentum 0 the raw gradient) or ``"adam"`` (this rank's Adam step m̂/(√v̂+eps) on its local gradient,
            the Adam analogue of momentum correction; the optimizer is then plain SGD(lr)) (default ``"momentum"``).
        adam_betas: Adam's (beta1, beta2) with ``correction="adam"`` (default (0.9, 0.999)).
        adam_eps: Adam's epsilon with ``correction="adam"`` (default 1e-8).
        sample_fraction: share of entries sampled to estimate the top-k threshold (default 0.01).
        min_sample: smallest sample; smaller tensors use exact top-k directly (default 1024).
        threshold_slack: the sampled threshold aims at ``slack``·k entries; the selection is trimmed to exactly k
            by top-k over those candidates, or falls back to exact top-k when it found fewer than k (default 1.3).
        seed: seed of the sampling generator (default 0).
        dense_tensors: ``fnmatch`` patterns of parameter names (``input.item_id.weight``, ``convs.*``) that are
            all-reduced densely like the dim ≤ 1 tensors, not compressed (default none).
        row_tensors: patterns of 2-D parameters whose selection takes whole rows: the rows with the largest
            accumulated L2 norm, as many as fit the bytes the entry-wise selection would send (a row costs its values
            and one index, an entry a value and an index, so about twice the values per byte). Meant for embedding
            tables, whose rows are updated one item at a time (default none).
        local_tensors: patterns of parameters that send no gradient at all: each rank applies its own update
            (the same correction as the rest: its own Adam step, or momentum) and every ``local_period`` optimizer
            steps the ranks exchange the rows (first dimension) that changed since the last round, as (index, delta)
            pairs, and merge them (``local_merge``); meant for an item-id table, whose gradient touches thousands of
            rows a step, which top-k of the gradient starves (default none).
        local_period: optimizer steps between two rounds of the local tensors (default 100).
        local_merge: ``"sum"`` (a changed row becomes its value at the last round plus every rank's change: a row one
            rank trains keeps that rank's whole update), ``"mean"`` (plus the mean change over the ranks that changed
            it) or ``"touches"`` (the mean weighted by the steps in which each rank's gradient touched the row)
            (default ``"sum"``).
        adam_masking: with ``correction="adam"``, zero Adam's first moment of the entries just sent (momentum factor
            masking for Adam: an entry sent keeps no momentum from the gradients its delivered value already holds)
            (default False).
        select: with ``correction="adam"``, what the entry-wise top-k ranks: ``"value"`` (the accumulated Adam steps,
            which Adam's normalisation makes about one per step for every entry with a steady sign) or ``"gradient"``
            (those steps times the entry's √v, Adam's gradient scale: entries with large gradients first, as top-k of
            the velocity does under SGD); the values sent are the accumulated steps either way (default ``"value"``).
        average: what divides the sum of the values the ranks sent for an entry: ``"world"`` (every rank, as the
            paper's all-gather and average) or ``"senders"`` (the ranks that sent that entry, or row). With the Adam
            correction a rank's value is a sum of whole Adam steps, so an entry only one rank trains (an item-id row
            of that rank's shard) moves by half a step under ``"world"`` on 2 ranks, where Adam on the all-reduced
            gradient moves it by a whole one (default ``"world"``).
        flush_at_end: when training ends (:meth:`gnn.comm.hooks.CommSession.finish`), apply what every rank still
            holds back: the ranks' residuals are averaged (one dense all-reduce of the compressed tensors) and stepped
            as one more update, so the trained model carries every accumulated update. Needs an update direction in
            the residual: ``correction="adam"`` or ``momentum > 0`` (default False).
        owner_tensors: with ``correction="adam"``, patterns of compressed 2-D parameters with row-sparse gradients
            (an item-id table) whose per-rank Adam step is scaled, row by row, by N / the ranks whose gradient touched
            that row the last time any did. Each step the ranks all-gather a bitmap of the rows their gradient
            touched (rows/8 bytes each). Averaging N ranks' own Adam steps moves a row one rank trains by 1/N of a
            step, where Adam on the all-reduced gradient (scale-free) moves it by a whole one; the scale restores
            that, and leaves a row every rank trains as it was (default none).
        shared_moment_tensors: with ``correction="adam"``, patterns of compressed 2-D parameters whose Adam second
            moment the ranks share: every step each rank sends its squared gradient (``shared_moment_by="entries"``:
            one value per entry, a dense all-reduce; ``"rows"``: the mean over each row, one value per row) and every
            rank updates one v from the ranks' mean, so each rank's step m_r / √v is weighed by the gradient's size
            against every rank's, not against its own: a rank that touches a row once, weakly, no longer moves it by a
            whole Adam step (default none).
        shared_moment_by: ``"entries"``, ``"rows"`` or ``"rows-log8"`` (per row, only the rows a rank's gradient
            touched: a bitmap and one byte a row, log2 of the mean square in quarter octaves) (default ``"rows"``).
        shared_moment_estimate: what v follows with ``"rows-log8"``: ``"mean"`` (the ranks' mean square) or
            ``"owners"`` (that times k / N, k = the ranks that touched the row: the square of the ranks' mean
            gradient, exactly so for a row one rank trains, as Adam on the all-reduced gradient has it)
            (default ``"mean"``).
    """

    sparsity: float = 0.999
    warmup_sparsities: tuple[float, ...] = DGC_WARMUP_DEFAULT
    warmup_unit: str = "epoch"
    warmup_stage_length: int = 1
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = None
    momentum_masking: bool = True
    correction: str = "momentum"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    sample_fraction: float = 0.01
    min_sample: int = 1024
    threshold_slack: float = 1.3
    seed: int = 0
    dense_tensors: tuple[str, ...] = ()
    row_tensors: tuple[str, ...] = ()
    local_tensors: tuple[str, ...] = ()
    local_period: int = 100
    local_merge: str = "sum"
    flush_at_end: bool = False
    average: str = "world"
    adam_masking: bool = False
    select: str = "value"
    owner_tensors: tuple[str, ...] = ()
    shared_moment_tensors: tuple[str, ...] = ()
    shared_moment_by: str = "rows"
    shared_moment_estimate: str = "mean"

    def __post_init__(self) -> None:
        named = [("sparsity", self.sparsity)]
        named += [(f"warmup_sparsities[{i}]", s) for i, s in enumerate(self.warmup_sparsities)]
        for name, value in named:
            if not 0.0 <= value < 1.0:
                raise ValueError(f"DGCConfig.{name}={value!r} must be in [0, 1) (0.999 = send 0.1 % of entries)")
        if self.warmup_unit not in ("epoch", "step"):
            raise ValueError(f"DGCConfig.warmup_unit={self.warmup_unit!r}: use 'epoch' or 'step'")
        if self.warmup_stage_length < 1:
            raise ValueError(f"DGCConfig.warmup_stage_length={self.warmup_stage_length} must be >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"DGCConfig.momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"DGCConfig.weight_decay={self.weight_decay} must be >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"DGCConfig.clip_norm={self.clip_norm} must be > 0 or None (off)")
        if self.correction not in DGC_CORRECTIONS:
            raise ValueError(f"DGCConfig.correction={self.correction!r}: use 'momentum' or 'adam'")
        if self.correction == "adam" and self.momentum:
            raise ValueError(f"DGCConfig.correction='adam' with momentum={self.momentum}: Adam's beta1 is the "
                             "momentum; set momentum=0")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas) or self.adam_eps <= 0:
            raise ValueError(f"DGCConfig.adam_betas={self.adam_betas} must lie in [0, 1) and adam_eps="
                             f"{self.adam_eps} be > 0")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"DGCConfig.sample_fraction={self.sample_fraction} must be in (0, 1] (paper: 0.001-0.01)")
        if self.min_sample < 1:
            raise ValueError(f"DGCConfig.min_sample={self.min_sample} must be >= 1")
        if self.threshold_slack < 1.0:
            raise ValueError(f"DGCConfig.threshold_slack={self.threshold_slack} must be >= 1")
        for a, b in itertools.combinations(("dense_tensors", "row_tensors", "local_tensors"), 2):
            both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            if both:
                raise ValueError(f"DGCConfig: {both[0]!r} is in both {a} and {b}; a tensor travels one way only")
        if any(not pattern.strip() for pattern in (*self.dense_tensors, *self.row_tensors, *self.local_tensors,
                                                   *self.owner_tensors, *self.shared_moment_tensors)):
            raise ValueError("DGCConfig.dense_tensors / row_tensors / local_tensors / owner_tensors / "
                             "shared_moment_tensors: empty pattern; give parameter names or fnmatch patterns such as "
                             "input.item_id.weight")
        if self.local_period < 1:
            raise ValueError(f"DGCConfig.local_period={self.local_period} (--dgc-local-period) must be >= 1 step")
        if self.flush_at_end and self.correction == "momentum" and not self.momentum:
            raise ValueError("DGCConfig.flush_at_end (--dgc-flush) with momentum 0: the residual then holds raw "
                             "gradients for the optimizer's own momentum; use --dgc-correction adam or a momentum")
        if self.adam_masking and self.correction != "adam":
            raise ValueError("DGCConfig.adam_masking (--dgc-adam-masking) masks Adam's moment: it needs "
                             "--dgc-correction adam (momentum_masking covers the SGD velocity)")
        if self.select not in ("value", "gradient"):
            raise ValueError(f"DGCConfig.select={self.select!r} (--dgc-select): use 'value' or 'gradient'")
        if self.select != "value" and self.correction != "adam":
            raise ValueError("DGCConfig.select='gradient' (--dgc-select) ranks Adam steps by Adam's gradient scale: "
                             "it needs --dgc-correction adam")
        for field_name, flag, what in (("owner_tensors", "--dgc-owner-scale", "scales each rank's Adam step"),
                                       ("shared_moment_tensors", "--dgc-shared-moment", "shares Adam's second moment")):
            if getattr(self, field_name) and self.correction != "adam":
                raise ValueError(f"DGCConfig.{field_name} ({flag}) {what}: it needs --dgc-correction adam")
        if self.shared_moment_by not in DGC_SHARED_MOMENTS:
            raise ValueError(f"DGCConfig.shared_moment_by={self.shared_moment_by!r} (--dgc-shared-moment-by): use "
                             "'entries', 'rows' or 'rows-log8'")
        if self.shared_moment_estimate not in ("mean", "owners"):
            raise ValueError(f"DGCConfig.shared_moment_estimate={self.shared_moment_estimate!r} "
                             "(--dgc-shared-moment-estimate): use 'mean' or 'owners'")
        if self.shared_moment_estimate == "owners" and self.shared_moment_by != "rows-log8":
            raise ValueError("DGCConfig.shared_moment_estimate='owners' (--dgc-shared-moment-estimate) counts the "
                             "ranks that sent a row: it needs --dgc-shared-moment-by rows-log8")
        if self.average not in DGC_AVERAGES:
            raise ValueError(f"DGCConfig.average={self.average!r} (--dgc-average): use 'world' or 'senders'")
        if self.local_merge not in DGC_LOCAL_MERGES:
            raise ValueError(f"DGCConfig.local_merge={self.local_merge!r} (--dgc-local-merge): use 'sum', 'mean' or "
                             "'touches'")

    def sparsity_at(self, stage_clock: int) -> float:
        """Sparsity at epoch (or step) ``stage_clock`` (0-based) under the warm-up schedule."""
        stage = stage_clock // self.warmup_stage_length
        return self.warmup_sparsities[stage] if stage < len(self.warmup_sparsities) else self.sparsity


@dataclass(frozen=True)
class CommConfig:
    """How gradients / models are synchronised between data-parallel ranks.

    Args:
        compression: ``none`` (plain all-reduce), ``fp16``, ``bf16``, ``powersgd`` or ``dgc`` (default ``none``).
        sync: ``allreduce`` (every step), ``local`` (periodic averaging) or ``hierarchical`` (default ``allreduce``).
        sync_levels: averaging levels for ``local``/``hierarchical`` (parsed from the ``--sync`` spec).
        sync_warmup_steps: global gradient all-reduce steps before local/hierarchical averaging starts (default 0).
        sync_weighting: ``uniform`` (plain mean, default) or ``touched`` (each row of a matrix averaged over the
            replicas whose gradients touched it since the last round; see gnn/comm/averaging.py).
        sync_optimizer_state: average the optimizer's per-parameter state (Adam's moments, SGD's momentum) along
            with the model in each averaging round (default False: each replica keeps its own, as in PyTorch's
            ``PostLocalSGDOptimizer``).
        sync_lr_scale: factor on the learning rate of the local steps of local/hierarchical averaging, after the
            warm-up (default 1.0). An averaged local Adam step is normalised by each replica's own batch's second
            moment, larger than that of the all-reduced mean gradient, so it moves less than one dense step.
        sync_outer_momentum: slow momentum β of the global averaging rounds (SlowMo, Wang et al. 2020; default 0:
            plain averaging; see gnn/comm/averaging.py).
        powersgd_rank: PowerSGD matrix approximation rank (default 2).
        powersgd_start_iter: plain all-reduce steps before PowerSGD starts; must be > 1 (default 10).
        dgc: DGC settings (used when ``compression == "dgc"``).
    """

    compression: str = "none"
    sync: str = "allreduce"
    sync_levels: tuple[SyncLevel, ...] = ()
    sync_warmup_steps: int = 0
    sync_weighting: str = "uniform"
    sync_optimizer_state: bool = False
    sync_lr_scale: float = 1.0
    sync_outer_momentum: float = 0.0
    powersgd_rank: int = 2
    powersgd_start_iter: int = 10
    dgc: DGCConfig = field(default_factory=DGCConfig)

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"--compression {self.compression!r}: choose one of {', '.join(COMPRESSIONS)}")
        if self.sync not in SYNC_KINDS:
            raise ValueError(f"--sync {self.sync!r}: choose allreduce, local:H or hierarchical:G@P,...,all@P")
        if self.sync == "allreduce" and self.sync_levels:
            raise ValueError("--sync allreduce takes no averaging levels; use local:H or hierarchical:...")
        if self.sync != "allreduce":
            _check_levels(self.sync, self.sync_levels)
            if self.compression != "none":
                raise ValueError(f"--compression {self.compression} cannot be combined with --sync "
                                 f"{self.sync_spec}: local/hierarchical averaging sends no gradients after "
                                 "warm-up; use --compression none")
        if self.sync_warmup_steps < 0:
            raise ValueError(f"--sync-warmup-steps {self.sync_warmup_steps} must be >= 0")
        if self.sync_weighting not in SYNC_WEIGHTINGS:
            raise ValueError(f"--sync-weighting {self.sync_weighting!r}: choose uniform or touched")
        if self.sync_weighting != "uniform" and self.sync == "allreduce":
            raise ValueError(f"--sync-weighting {self.sync_weighting} weights model averaging rounds; it needs "
                             "--sync local:H or hierarchical:..., not allreduce")
        if self.sync_optimizer_state and self.sync == "allreduce":
            raise ValueError("--sync-optimizer-state averages the optimizer state in model averaging rounds; it "
                             "needs --sync local:H or hierarchical:..., not allreduce")
        if not self.sync_lr_scale > 0:
            raise ValueError(f"--sync-lr-scale {self.sync_lr_scale} must be > 0")
        if self.sync_lr_scale != 1.0 and self.sync == "allreduce":
            raise ValueError("--sync-lr-scale scales the local steps between averaging rounds; it needs --sync "
                             "local:H or hierarchical:..., not allreduce")
        if not 0.0 <= self.sync_outer_momentum < 1.0:
            raise ValueError(f"--sync-outer-momentum {self.sync_outer_momentum} must be in [0, 1) (0: plain averaging)")
        if self.sync_outer_momentum and self.sync == "allreduce":
            raise ValueError("--sync-outer-momentum applies to model averaging rounds; it needs --sync local:H or "
                             "hierarchical:..., not allreduce")
        if self.powersgd_rank < 1:
            raise ValueError(f"--powersgd-rank {self.powersgd_rank} must be >= 1")
        if self.powersgd_start_iter <= 1:
            raise ValueError(f"--powersgd-start-iter {self.powersgd_start_iter} must be > 1 (PyTorch's PowerSGD "
                             "needs plain all-reduce for the first 2 iterations)")

    @property
    def sync_spec(self) -> str:
        """The ``--sync`` string this config was parsed from (canonical form)."""
        if self.sync == "allreduce":
            return "allreduce"
        if self.sync == "local":
            return f"local:{self.sync_levels[0].period}"
        return "hierarchical:" + ",".join(
            f"{'all' if lv.group_size is None else lv.group_size}@{lv.spec_period}" for lv in self.sync_levels)

    @property
    def uses_ddp_allreduce(self) -> bool:
        """True when gradients are averaged every step (after any warm-up): DDP's all-reduce must stay on."""
        return self.sync == "allreduce"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for checkpoints and reports (round-trips through :meth:`from_dict`)."""
        out = asdict(self)
        out["sync_spec"] = self.sync_spec
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CommConfig:
        data = dict(data)
        data.pop("sync_spec", None)
        dgc = dict(data.pop("dgc", {}))
        for key in ("warmup_sparsities", "adam_betas", "dense_tensors", "row_tensors", "local_tensors",
                    "owner_tensors", "shared_moment_tensors"):
            if key in dgc:
                dgc[key] = tuple(dgc[key])
        levels = tuple(SyncLevel(**lv) for lv in data.pop("sync_levels", ()))
        return cls(sync_levels=levels, dgc=DGCConfig(**dgc), **data)


def _check_levels(kind: str, levels: tuple[SyncLevel, ...]) -> None:
    if not levels:
        raise ValueError(f"--sync {kind} needs averaging levels, e.g. local:16 or hierarchical:2@4,all@16")
    if kind == "local" and (len(levels) != 1 or levels[0].group_size is not None):
        raise ValueError("--sync local:H averages every rank every H steps; for groups use hierarchical:G@P,...")
    if levels[-1].group_size is not None and kind == "local":
        raise ValueError("--sync local:H must average all ranks")
    for i, level in enumerate(levels):
        misplaced = kind != "hierarchical" or i != 0 or level.group_size is None or len(levels) < 2
        if level.gradients and (misplaced or level.period != 1):
            raise ValueError(f"--sync {kind}: a gradient level G@grad must be the first of at least two levels, "
                             "with a group size (e.g. hierarchical:2@grad,all@4); all@grad is --sync allreduce")
        if level.period < 1:
            raise ValueError(f"--sync {kind}: period {level.period} of level {i + 1} must be >= 1")
        if level.group_size is not None and level.group_size < 2:
            raise ValueError(f"--sync {kind}: group size {level.group_size} of level {i + 1} must be >= 2")
        if level.group_size is None and i != len(levels) - 1:
            raise ValueError(f"--sync {kind}: 'all' may only be the last level")
    for lower, upper in itertools.pairwise(levels):
        if upper.period <= lower.period:
            raise ValueError(f"--sync {kind}: periods must increase ({lower.period} then {upper.period})")
        if lower.group_size is not None and upper.group_size is not None and (
                upper.group_size <= lower.group_size or upper.group_size % lower.group_size):
            raise ValueError(f"--sync {kind}: group size {upper.group_size} must be a larger multiple of "
                             f"{lower.group_size} so that groups nest")


def parse_sync(spec: str) -> tuple[str, tuple[SyncLevel, ...]]:
    """Parse ``allreduce``, ``local:H`` or ``hierarchical:G@P,...,all@P`` (the first level may be ``G@grad``) into
    a sync kind and its levels.

    >>> kind, levels = parse_sync("hierarchical:2@grad,all@16")
    >>> kind, [level.label for level in levels]
    ('hierarchical', ['group2@grad', 'all@16'])
    """
    text = spec.strip()
    kind, _, rest = text.partition(":")
    if kind == "allreduce" and not rest:
        return "allreduce", ()
    if kind == "local":
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"--sync {spec!r}: local needs a positive period, e.g. local:16")
        return "local", (SyncLevel(None, int(rest)),)
    if kind == "hierarchical":
        levels = []
        for item in rest.split(","):
            size, at, period = item.strip().partition("@")
            if not at or not (period.isdigit() or period == "grad") or not (size.isdigit() or size == "all"):
                raise ValueError(f"--sync {spec!r}: level {item!r} must read GROUP@PERIOD (e.g. 2@4 or all@16) "
                                 "or, first, GROUP@grad")
            grads = period == "grad"
            levels.append(SyncLevel(None if size == "all" else int(size), 1 if grads else int(period), grads))
        return "hierarchical", tuple(levels)
    raise ValueError(f"--sync {spec!r}: use allreduce, local:H or hierarchical:G@P,...,all@P")


def parse_sparsities(text: str) -> tuple[float, ...]:
    """``"0.75,0.9375"`` → ``(0.75, 0.9375)``; an empty string means no warm-up."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--dgc-warmup {text!r}: give comma-separated sparsities, e.g. 0.75,0.9375") from None


def add_comm_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the communication flags (``--compression``, ``--sync``, and their knobs) to a CLI parser."""
    d, dg = CommConfig(), DGCConfig()
    group = parser.add_argument_group("gradient communication")
    group.add_argument("--compression", default=d.compression, choices=COMPRESSIONS)
    group.add_argument("--sync", default="allreduce",
                       help="allreduce | local:H | hierarchical:G@P,...,all@P (the first level may be G@grad: "
                       "gradient all-reduce in groups of G at every step)")
    group.add_argument("--sync-warmup-steps", type=int, default=d.sync_warmup_steps)
    group.add_argument("--sync-weighting", default=d.sync_weighting, choices=SYNC_WEIGHTINGS,
                       help="averaging rounds: plain mean, or each matrix row over the replicas that touched it")
    group.add_argument("--sync-optimizer-state", action="store_true",
                       help="averaging rounds also average the optimizer state (Adam's moments, SGD's momentum)")
    group.add_argument("--sync-lr-scale", type=float, default=d.sync_lr_scale,
                       help="factor on the lr of the local steps between averaging rounds (after the warm-up)")
    group.add_argument("--sync-outer-momentum", type=float, default=d.sync_outer_momentum,
                       help="slow momentum of the global averaging rounds (SlowMo; 0: plain averaging)")
    group.add_argument("--powersgd-rank", type=int, default=d.powersgd_rank)
    group.add_argument("--powersgd-start-iter", type=int, default=d.powersgd_start_iter)
    group.add_argument("--dgc-sparsity", type=float, default=dg.sparsity)
    group.add_argument("--dgc-warmup", default=",".join(str(s) for s in dg.warmup_sparsities),
                       help="warm-up sparsities, one per stage (empty: none)")
    group.add_argument("--dgc-warmup-unit", default=dg.warmup_unit, choices=("epoch", "step"))
    group.add_argument("--dgc-warmup-stage-length", type=int, default=dg.warmup_stage_length)
    group.add_argument("--dgc-momentum", type=float, default=dg.momentum)
    group.add_argument("--dgc-weight-decay", type=float, default=dg.weight_decay)
    group.add_argument("--dgc-clip-norm", type=float, default=None)
    group.add_argument("--dgc-correction", default=dg.correction, choices=DGC_CORRECTIONS,
                       help="accumulate the SGD velocity (momentum) or each rank's Adam step (adam; optimizer SGD)")
    group.add_argument("--dgc-dense", default="",
                       help="comma-separated parameter names or fnmatch patterns all-reduced densely, not compressed")
    group.add_argument("--dgc-rows", default="",
                       help="comma-separated 2-D parameter names or patterns selected by whole rows (embedding tables)")
    group.add_argument("--dgc-average", default=dg.average, choices=DGC_AVERAGES,
                       help="divide an entry's sum by every rank (world) or by the ranks that sent it (senders)")
    group.add_argument("--dgc-adam-masking", action="store_true",
                       help="with --dgc-correction adam, zero Adam's first moment of the entries just sent")
    group.add_argument("--dgc-select", default=dg.select, choices=("value", "gradient"),
                       help="with --dgc-correction adam, rank entries by the accumulated steps (value) or by them "
                       "times Adam's gradient scale sqrt(v) (gradient)")
    group.add_argument("--dgc-flush", action="store_true",
                       help="at the end of training, average the ranks' residuals and apply them as one more update")
    group.add_argument("--dgc-local", default="",
                       help="comma-separated parameter names or patterns that send no gradient: each rank steps them "
                       "itself and the ranks merge their changed rows every --dgc-local-period steps")
    group.add_argument("--dgc-local-period", type=int, default=dg.local_period,
                       help="steps between two merges of the --dgc-local tensors")
    group.add_argument("--dgc-local-merge", default=dg.local_merge, choices=DGC_LOCAL_MERGES,
                       help="a merged row gets every rank's change (sum), their mean over the ranks that changed it "
                       "(mean), or their mean weighted by the steps each rank's gradient touched it (touches)")
    group.add_argument("--dgc-owner-scale", default="",
                       help="with --dgc-correction adam, comma-separated 2-D parameter names or patterns (embedding "
                       "tables) whose Adam step is scaled per row by N / the ranks that touched the row")
    group.add_argument("--dgc-shared-moment", default="",
                       help="with --dgc-correction adam, comma-separated 2-D parameter names or patterns whose Adam "
                       "second moment the ranks share (each step they exchange their squared gradients)")
    group.add_argument("--dgc-shared-moment-by", default=dg.shared_moment_by, choices=DGC_SHARED_MOMENTS,
                       help="share the second moment per entry (a dense all-reduce), per row (one value a row) or "
                       "per row touched (rows-log8: a bitmap and one byte, the log of the square, a row touched)")
    group.add_argument("--dgc-shared-moment-estimate", default=dg.shared_moment_estimate, choices=("mean", "owners"),
                       help="with rows-log8, v follows the ranks' mean square (mean) or that times the share of "
                       "ranks that touched the row (owners: the square of the mean gradient)")


def comm_config_from_args(args: argparse.Namespace) -> CommConfig:
    """Build the :class:`CommConfig` from flags added by :func:`add_comm_arguments` (ValueError names the flag)."""
    kind, levels = parse_sync(args.sync)
    dgc = DGCConfig(sparsity=args.dgc_sparsity, warmup_sparsities=parse_sparsities(args.dgc_warmup),
                    warmup_unit=args.dgc_warmup_unit, warmup_stage_length=args.dgc_warmup_stage_length,
                    momentum=args.dgc_momentum, weight_decay=args.dgc_weight_decay, clip_norm=args.dgc_clip_norm,
                    correction=args.dgc_correction, dense_tensors=parse_patterns(args.dgc_dense),
                    row_tensors=parse_patterns(args.dgc_rows), local_tensors=parse_patterns(args.dgc_local),
                    local_period=args.dgc_local_period, local_merge=args.dgc_local_merge,
                    flush_at_end=args.dgc_flush, average=args.dgc_average, adam_masking=args.dgc_adam_masking,
                    select=args.dgc_select, owner_tensors=parse_patterns(args.dgc_owner_scale),
                    shared_moment_tensors=parse_patterns(args.dgc_shared_moment),
                    shared_moment_by=args.dgc_shared_moment_by,
                    shared_moment_estimate=args.dgc_shared_moment_estimate)
    return CommConfig(compression=args.compression, sync=kind, sync_levels=levels,
                      sync_warmup_steps=args.sync_warmup_steps, sync_weighting=args.sync_weighting,
                      sync_optimizer_state=args.sync_optimizer_state, sync_lr_scale=args.sync_lr_scale,
                      sync_outer_momentum=args.sync_outer_momentum, powersgd_rank=args.powersgd_rank,
                      powersgd_start_iter=args.powersgd_start_iter, dgc=dgc)


def parse_comm(compression: str = "none", sync: str = "allreduce", **settings: Any) -> CommConfig:
    """Shortcut: ``parse_comm("dgc", "allreduce", dgc=DGCConfig(...))`` or ``parse_comm("none", "local:16")``."""
    kind, levels = parse_sync(sync)
    return CommConfig(compression=compression, sync=kind, sync_levels=levels, **settings)


def dgc_k(numel: int, sparsity: float) -> int:
    """Entries sent for a tensor of ``numel`` entries at ``sparsity``: ``max(1, ceil(numel·(1 - sparsity)))``."""
    return min(numel, max(1, math.ceil(numel * (1.0 - sparsity) - 1e-9)))


def dgc_row_k(rows: int, cols: int, sparsity: float, *, value_bytes: int, index_bytes: int) -> int:
    """Rows sent for a ``rows`` × ``cols`` tensor selected by rows: as many as fit the bytes of the entry-wise
    selection (``dgc_k`` entries of a value and an index each), a row costing ``cols`` values and one index; at least
    one, at most ``rows``."""
    budget = dgc_k(rows * cols, sparsity) * (value_bytes + index_bytes)
    return min(rows, max(1, budget // (cols * value_bytes + index_bytes)))


def parse_patterns(text: str) -> tuple[str, ...]:
    """``"input.item_id.weight, convs.*"`` → ``("input.item_id.weight", "convs.*")``; an empty string → ``()``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())
