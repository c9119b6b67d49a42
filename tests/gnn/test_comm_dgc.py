"""DGC and the built-in hooks on real gloo process groups (2 spawned ranks)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState
from torch.nn.parallel import DistributedDataParallel as DDP

from gnn.comm import DGCConfig, TrafficAccount, parse_comm, setup_communication
from gnn.comm._annotations import ddp_hook
from gnn.comm.config import dgc_k
from gnn.comm.dgc import INDEX_BYTES, DGCState, decode_indices, encode_indices
from gnn.comm.hooks import _HookState, powersgd_counting_hook
from gnn.comm.launch import run_gloo

STEPS = 6
LR = 0.05


def tiny_model() -> torch.nn.Module:
    """Embedding (a PinSage-like id table) + two linear layers; biases are the dim-1 (dense) tensors."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Flatten(), torch.nn.Linear(16, 12),
                               torch.nn.ReLU(), torch.nn.Linear(12, 3))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(0, 50, (16, 2), generator=gen), torch.randn(16, 3, generator=gen)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: int,
          on_step: Any = None) -> None:
    for step in range(steps):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def equivalence_worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, momentum, masking, wd in [("momentum", 0.9, False, 1e-2), ("masked", 0.0, True, 0.0)]:
        reference = DDP(tiny_model())
        train(reference, torch.optim.SGD(reference.parameters(), lr=LR, momentum=momentum, weight_decay=wd),
              rank, STEPS)
        cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.0, warmup_sparsities=(), momentum=momentum,
                                              weight_decay=wd, momentum_masking=masking))
        model = DDP(tiny_model())
        session = setup_communication(model, cfg)
        train(model, session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR)), rank, STEPS)
        out[label] = {"reference": params_of(reference.module), "dgc": params_of(model.module),
                      "stats": session.stats()}
    return out


def adam_worker(rank: int, world: int) -> dict[str, Any]:
    """Error-feedback top-k feeding Adam (DGC momentum 0): at sparsity 0 against DDP + Adam, and at 90 % with an
    audit of every step (what Adam receives is the average of what the ranks sent)."""
    reference = DDP(tiny_model())
    train(reference, torch.optim.Adam(reference.parameters(), lr=LR), rank, STEPS)
    model = DDP(tiny_model())
    session = setup_communication(model, parse_comm("dgc", dgc=DGCConfig(sparsity=0.0, warmup_sparsities=(),
                                                                         momentum=0.0)))
    train(model, session.wrap_optimizer(torch.optim.Adam(model.parameters(), lr=LR)), rank, STEPS)
    assert session.dgc is not None
    out: dict[str, Any] = {"reference": params_of(reference.module), "dgc": params_of(model.module),
                           "momenta": len(session.dgc.momenta), "steps": []}
    cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.9, warmup_sparsities=(0.5,), warmup_unit="step",
                                          warmup_stage_length=2, momentum=0.0, min_sample=16, sample_fraction=0.2))
    model = DDP(tiny_model())
    session = setup_communication(model, cfg, audit=True)
    optimizer = session.wrap_optimizer(torch.optim.Adam(model.parameters(), lr=LR))
    dgc = session.dgc
    assert dgc is not None
    by_name = dict(model.module.named_parameters())
    names = [n for n, p in by_name.items() if p.dim() > 1]

    def on_step(step: int) -> None:  # .grad still holds what the optimizer just applied
        out["steps"].append({n: {"accumulated": dgc.last_audit[n].accumulated, "sent": dgc.last_audit[n].sent,
                                 "residual": dgc.last_audit[n].residual, "gradient": dgc.last_audit[n].gradient,
                                 "applied": by_name[n].grad.detach().reshape(-1).clone()}  # type: ignore[union-attr]
                             for n in names})

    train(model, optimizer, rank, 5, on_step)
    out["sparse_params"] = params_of(model.module)
    # Adam correction (Adam inside the hook on each rank's gradient, plain SGD outside): with the same batches on
    # both ranks (local gradient = average) at sparsity 0 it is DDP + Adam
    reference = DDP(tiny_model())
    train(reference, torch.optim.Adam(reference.parameters(), lr=LR), 0, STEPS)
    model = DDP(tiny_model())
    session = setup_communication(model, parse_comm("dgc", dgc=DGCConfig(
        sparsity=0.0, warmup_sparsities=(), momentum=0.0, correction="adam")))
    train(model, session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR)), 0, STEPS)
    out["corrected"] = {"reference": params_of(reference.module), "dgc": params_of(model.module)}
    try:
        session.wrap_optimizer(torch.optim.Adam(model.parameters(), lr=LR))
    except ValueError as error:
        out["corrected_error"] = str(error)
    return out


def layout_worker(rank: int, world: int) -> dict[str, Any]:
    """The embedding table (``0.weight``, 50 × 8) sent densely, then by whole rows, at 90 % sparsity (SGD, momentum
    0: the gradient the optimizer gets is the ranks' average of what they sent)."""
    out: dict[str, Any] = {}
    for label, extra in (("dense", {"dense_tensors": ("0.weight",)}), ("rows", {"row_tensors": ("0.*",)}),
                         ("local", {"local_tensors": ("0.weight",), "local_period": 2}),
                         ("senders", {"average": "senders"})):
        cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.9, warmup_sparsities=(), momentum=0.0, min_sample=16,
                                              sample_fraction=0.2, **extra))
        model = DDP(tiny_model())
        session = setup_communication(model, cfg, audit=True)
        dgc = session.dgc
        assert dgc is not None
        table = model.module[0].weight
        steps: list[dict[str, Any]] = []

        def on_step(step: int, steps: list[dict[str, Any]] = steps, table: torch.Tensor = table,
                    dgc: DGCState = dgc, traffic: TrafficAccount = session.traffic) -> None:
            audit = dgc.last_audit.get("0.weight")
            steps.append({"audited": audit is not None, "sent_bytes": traffic.last_step_sent_bytes,
                          "applied": table.grad.detach().reshape(-1).clone(),  # type: ignore[union-attr]
                          **({} if audit is None else {"sent": audit.sent, "accumulated": audit.accumulated,
                                                        "residual": audit.residual, "k": audit.k,
                                                        "indices": audit.indices})})

        train(model, session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR)), rank, 4, on_step)
        out[label] = {"steps": steps, "layout": dgc.layout(table), "params": params_of(model.module),
                      "traffic": session.traffic.as_dict()}
    try:
        setup_communication(DDP(tiny_model()), parse_comm("dgc", dgc=DGCConfig(row_tensors=("item_id.*",))))
    except ValueError as error:
        out["unmatched_error"] = str(error)
    return out


def merge_worker(rank: int, world: int) -> dict[str, Any]:
    """merge_changed_rows on a hand-made 6 × 2 table: rank 0 changed rows 1 and 3, rank 1 rows 3 and 4."""
    from gnn.comm.dgc import merge_changed_rows

    base = torch.arange(12, dtype=torch.float32).view(6, 2)
    changes = {0: {1: [10.0, 20.0], 3: [1.0, 2.0]}, 1: {3: [100.0, 200.0], 4: [-1.0, -3.0]}}[rank]
    out: dict[str, Any] = {}
    for merge in ("sum", "mean"):
        param, snapshot = base.clone(), base.clone()
        for row, delta in changes.items():
            param[row] += torch.tensor(delta)
        copy = param.clone()
        sent = merge_changed_rows(param, snapshot, copy, dist.group.WORLD, merge=merge, update_snapshot=False)
        out[merge] = {"copy": copy, "snapshot_untouched": bool(torch.equal(snapshot, base))}
        sent_in_place = merge_changed_rows(param, snapshot, param, dist.group.WORLD, merge=merge)
        out[merge].update(param=param, snapshot=snapshot, sent=sent, sent_in_place=sent_in_place)
    # touch-weighted: rank 0's gradient touched row 1 in 2 steps and row 3 in 3; rank 1's row 3 in 1 and row 4 in
    # none (row 4 moved by momentum drift only)
    touches = {0: torch.tensor([0, 2, 0, 3, 0, 0]), 1: torch.tensor([0, 0, 0, 1, 0, 0])}[rank]
    param, snapshot = base.clone(), base.clone()
    for row, delta in changes.items():
        param[row] += torch.tensor(delta)
    sent = merge_changed_rows(param, snapshot, param, dist.group.WORLD, merge="touches", touches=touches)
    out["touches"] = {"param": param, "sent": sent}
    unchanged = base.clone()
    out["nothing_changed_sent"] = merge_changed_rows(unchanged, base.clone(), unchanged, dist.group.WORLD)
    out["base"] = base
    return out


def flush_worker(rank: int, world: int) -> dict[str, Any]:
    """DGC at 90 % with momentum correction for 3 steps, then finish() with --dgc-flush: the residuals applied."""
    cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.9, warmup_sparsities=(), momentum=0.9, min_sample=16,
                                          sample_fraction=0.2, flush_at_end=True))
    model = DDP(tiny_model())
    session = setup_communication(model, cfg, audit=True)
    dgc = session.dgc
    assert dgc is not None
    names = [n for n, p in model.module.named_parameters() if p.dim() > 1]
    added = {n: torch.zeros(p.numel()) for n, p in model.module.named_parameters() if p.dim() > 1}
    previous = {n: torch.zeros(p.numel()) for n, p in model.module.named_parameters() if p.dim() > 1}

    def on_step(step: int) -> None:  # what each step added to the velocity: accumulated minus the residual before
        for n in names:
            audit = dgc.last_audit[n]
            added[n] += audit.accumulated - previous[n]
            previous[n] = audit.residual.clone()

    train(model, session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR)), rank, 3, on_step)
    before = dgc.residual_norm
    session.finish(lr=LR)
    return {"added": added, "params": params_of(model.module), "residual_before": before,
            "residual_after": dgc.residual_norm, "traffic": session.traffic.as_dict()}


def _adam_correction_run(rank: int, record: Any, **extra: Any) -> None:
    """3 steps of the Adam correction at 90 % with ``extra`` DGC settings and an audit; ``record(dgc, table)`` after
    each step (``table``: the embedding's weight)."""
    cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.9, warmup_sparsities=(), momentum=0.0, correction="adam",
                                          min_sample=16, sample_fraction=0.2, **extra))
    model = DDP(tiny_model())
    session = setup_communication(model, cfg, audit=True)
    dgc = session.dgc
    assert dgc is not None
    table = model.module[0].weight
    train(model, session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR)), rank, 3,
          lambda step: record(dgc, table))


def adam_masking_worker(rank: int, world: int) -> dict[str, Any]:
    """--dgc-adam-masking: Adam's first moment of the entries just sent, per step; --dgc-select gradient: what the
    top-k ranked (the accumulated steps and sqrt(v)), per step."""
    steps: list[dict[str, torch.Tensor]] = []
    _adam_correction_run(rank, lambda dgc, table: steps.append(
        {"indices": dgc.last_audit["0.weight"].indices.clone(), "moment": dgc.momenta[table].clone()}),
        adam_masking=True)
    selections: list[dict[str, torch.Tensor]] = []
    _adam_correction_run(rank, lambda dgc, table: selections.append(
        {"indices": dgc.last_audit["0.weight"].indices.clone(), "accumulated": dgc.last_audit["0.weight"].accumulated,
         "v": dgc.second_moments[table].clone()}), select="gradient")
    return {"steps": steps, "gradient_select": selections}


def owner_worker(rank: int, world: int) -> dict[str, Any]:
    """--dgc-owner-scale, then --dgc-shared-moment by entries and by rows, on the table at sparsity 0 (Adam
    correction), 4 steps where rank 0's ids lie in [0, 30) and rank 1's in [20, 50): per step each rank's local
    gradient of the table, the update applied to it and Adam's v. Again with neither, for the bytes."""
    out: dict[str, Any] = {}
    for label, extra in (("owner", {"owner_tensors": ("0.weight",)}), ("plain", {}),
                         ("moment_entries", {"shared_moment_tensors": ("0.*",), "shared_moment_by": "entries"}),
                         ("moment_rows", {"shared_moment_tensors": ("0.weight",)}),
                         ("moment_log8", {"shared_moment_tensors": ("0.weight",), "shared_moment_by": "rows-log8"}),
                         ("moment_log8o", {"shared_moment_tensors": ("0.weight",), "shared_moment_by": "rows-log8",
                                           "shared_moment_estimate": "owners"})):
        cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.0, warmup_sparsities=(), momentum=0.0, correction="adam",
                                              **extra))
        model = DDP(tiny_model())
        session = setup_communication(model, cfg, audit=True)
        dgc = session.dgc
        assert dgc is not None
        optimizer = session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR))
        table = model.module[0].weight
        steps: list[dict[str, Any]] = []
        for step in range(4):
            x, y = batch(rank, step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x % 30 + 20 * rank), y).backward()
            optimizer.step()
            steps.append({"gradient": dgc.last_audit["0.weight"].gradient,
                          "applied": table.grad.detach().reshape(-1).clone(),  # type: ignore[union-attr]
                          "sent_bytes": session.traffic.last_step_sent_bytes,
                          "v": dgc.second_moments[table].clone()})
        out[label] = steps
    try:
        setup_communication(DDP(tiny_model()), parse_comm("dgc", dgc=DGCConfig(
            momentum=0.0, correction="adam", owner_tensors=("0.weight",), dense_tensors=("0.weight",))))
    except ValueError as error:
        out["dense_error"] = str(error)
    return out


def resume_worker(rank: int, world: int) -> dict[str, Any]:
    """The Adam correction at 90 % (warm-up 50 % for 2 steps) run 4 steps straight, and again stopped after 2 steps:
    the weights and this rank's DGC state saved, a fresh model and session restored from them, 2 more steps."""
    import tempfile

    def session_for(model: DDP) -> Any:
        cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.9, warmup_sparsities=(0.5,), warmup_unit="step",
                                              warmup_stage_length=2, momentum=0.0, correction="adam", min_sample=16,
                                              sample_fraction=0.2, adam_masking=True))
        return setup_communication(model, cfg)

    def steps(model: DDP, session: Any, first: int, last: int) -> None:
        optimizer = session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR))
        for step in range(first, last):
            x, y = batch(rank, step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    straight = DDP(tiny_model())
    steps(straight, session_for(straight), 0, 4)
    stopped = DDP(tiny_model())
    first = session_for(stopped)
    steps(stopped, first, 0, 2)
    path = f"{tempfile.mkdtemp()}/comm-rank{rank}.pt"
    first.save_state(path, epoch=1)
    weights = params_of(stopped.module)
    resumed = DDP(tiny_model())
    resumed.module.load_state_dict(weights)
    session = session_for(resumed)
    other_epoch = session_for(DDP(tiny_model())).restore_state(path, epoch=2)
    restored = session.restore_state(path, epoch=1)
    steps(resumed, session, 2, 4)
    return {"straight": params_of(straight.module), "resumed": params_of(resumed.module), "restored": restored,
            "other_epoch": other_epoch, "steps": session.traffic.steps}


def all_workers(rank: int, world: int) -> dict[str, Any]:
    return {"equivalence": equivalence_worker(rank, world), "audit": audit_worker(rank, world),
            "builtin": builtin_worker(rank, world), "adam": adam_worker(rank, world),
            "layout": layout_worker(rank, world), "merge": merge_worker(rank, world),
            "flush": flush_worker(rank, world), "adam_masking": adam_masking_worker(rank, world),
            "resume": resume_worker(rank, world), "owner": owner_worker(rank, world)}


@pytest.fixture(scope="module")
def gloo_pair() -> list[dict[str, Any]]:
    """One pair of spawned gloo ranks runs every scenario of this file (spawning costs seconds)."""
    return run_gloo(all_workers, world_size=2)


@pytest.mark.timeout(180)  # a collective mismatch hangs rather than fails
def test_dgc_at_sparsity_zero_equals_dense_allreduce(gloo_pair: list[dict[str, Any]]) -> None:
    results = [r["equivalence"] for r in gloo_pair]
    for label in ("momentum", "masked"):
        for rank_result in results:
            ref, dgc = rank_result[label]["reference"], rank_result[label]["dgc"]
            for name in ref:
                torch.testing.assert_close(dgc[name], ref[name], rtol=1e-5, atol=1e-6, msg=f"{label} {name}")
        for name, value in results[0][label]["dgc"].items():
            torch.testing.assert_close(results[1][label]["dgc"][name], value, rtol=0, atol=0)
        assert results[0][label]["stats"]["steps"] == STEPS


def audit_worker(rank: int, world: int) -> dict[str, Any]:
    cfg = parse_comm("dgc", dgc=DGCConfig(sparsity=0.9, warmup_sparsities=(0.5, 0.75), warmup_unit="step",
                                          warmup_stage_length=2, momentum=0.0, min_sample=16,
                                          sample_fraction=0.2))
    model = DDP(tiny_model())
    session = setup_communication(model, cfg, audit=True)
    optimizer = session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR))
    dgc = session.dgc
    assert dgc is not None
    names = [n for n, p in model.module.named_parameters() if p.dim() > 1]
    record: dict[str, Any] = {"steps": [], "grad_sum": {}, "sent_sum": {}, "ever_sent": {}}
    before = params_of(model.module)

    def on_step(step: int) -> None:
        nonlocal before
        after = params_of(model.module)
        entry: dict[str, Any] = {"k": dict(dgc.last_k), "tensors": {}}
        for name in names:
            audit = dgc.last_audit[name]
            entry["tensors"][name] = {
                "accumulated": audit.accumulated, "sent": audit.sent, "residual": audit.residual,
                "delta": (before[name] - after[name]).reshape(-1),
            }
            record["grad_sum"][name] = record["grad_sum"].get(name, 0) + audit.gradient
            record["sent_sum"][name] = record["sent_sum"].get(name, 0) + audit.sent
            record["ever_sent"].setdefault(name, set()).update(audit.indices.tolist())
        entry["bytes"] = (session.traffic.last_step_dense_bytes, session.traffic.last_step_sent_bytes)
        record["steps"].append(entry)
        before = after

    train(model, optimizer, rank, 7, on_step)
    record["final_residual"] = {n: dgc.last_audit[n].residual for n in names}
    record["numel"] = {n: p.numel() for n, p in model.module.named_parameters()}
    record["coverage"] = dgc.coverage
    record["session_dgc"] = session.stats()["dgc"]
    return record


@pytest.mark.timeout(180)
def test_dgc_loses_nothing_sends_exact_k_and_follows_warmup(gloo_pair: list[dict[str, Any]]) -> None:
    results = [r["audit"] for r in gloo_pair]
    expected_sparsity = [0.5, 0.5, 0.75, 0.75, 0.9, 0.9, 0.9]
    numel = results[0]["numel"]
    for step, sparsity in enumerate(expected_sparsity):
        ks = [r["steps"][step]["k"] for r in results]
        assert ks[0] == ks[1]  # exact k: equal-size all-gather on every rank
        for name, k in ks[0].items():
            assert k == dgc_k(numel[name], sparsity)
        for name, t in results[0]["steps"][step]["tensors"].items():
            for r in results:
                rt = r["steps"][step]["tensors"][name]
                torch.testing.assert_close(rt["sent"] + rt["residual"], rt["accumulated"], rtol=0, atol=0)
                assert int((rt["sent"] != 0).sum()) <= ks[0][name]
                top = torch.topk(rt["accumulated"].abs(), ks[0][name]).values.min()
                assert bool((rt["sent"].abs() >= top).sum() >= ks[0][name])  # the largest were sent
            # the update applied is the average of what both ranks sent
            sent_mean = (results[0]["steps"][step]["tensors"][name]["sent"]
                         + results[1]["steps"][step]["tensors"][name]["sent"]) / 2
            torch.testing.assert_close(t["delta"], LR * sent_mean, rtol=1e-4, atol=1e-6)
        dense, sent = results[0]["steps"][step]["bytes"]
        assert dense == 4 * sum(numel.values())
        # each value 4 bytes; the indices as k int32, or as a bitmap of ceil(numel / 32) int32 words when smaller
        index_words = {n: min(k, -(-numel[n] // 32)) for n, k in ks[0].items()}
        assert sent == 4 * sum(ks[0].values()) + 4 * sum(index_words.values()) + 4 * sum(
            v for n, v in numel.items() if n not in ks[0])
        if sparsity == 0.5:  # 200 of 400 table entries: 13 bitmap words, not 200 indices
            assert index_words["0.weight"] == 13
    for r in results:  # coverage: the share of the compressed entries this rank sent at least once
        compressed = sum(numel[n] for n in r["ever_sent"])
        assert r["coverage"] == sum(len(s) for s in r["ever_sent"].values()) / compressed
        assert 0 < r["coverage"] < 1
        assert r["session_dgc"]["coverage"] == r["coverage"]  # the run report carries it
        assert r["session_dgc"]["coverage_by_tensor"] == {n: len(s) / numel[n] for n, s in r["ever_sent"].items()}
    for r in results:  # over all steps: what was sent plus what is held back = every gradient (momentum 0)
        for name, grad_sum in r["grad_sum"].items():
            torch.testing.assert_close(r["sent_sum"][name] + r["final_residual"][name], grad_sum,
                                       rtol=1e-5, atol=1e-6)


def index_bytes(k: int, slots: int) -> int:
    """Bytes of k indices into ``slots`` positions: k int32, or a bitmap of ceil(slots / 32) int32 words if fewer."""
    return INDEX_BYTES * min(k, -(-slots // 32))


def linear_sent_bytes() -> int:
    """What the tiny model's two linear weights (12 × 16, 3 × 12) send at 90 %: values and their indices."""
    return sum(dgc_k(n, 0.9) * 4 + index_bytes(dgc_k(n, 0.9), n) for n in (192, 36))


SEEN_BUCKETS: set[int] = set()


@ddp_hook
def bucket_spy(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    SEEN_BUCKETS.add(bucket.index())
    return powersgd_counting_hook(state, bucket)


def builtin_worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plain = DDP(tiny_model())
    train(plain, torch.optim.SGD(plain.parameters(), lr=LR), rank, STEPS)
    out["plain"] = params_of(plain.module)
    for compression in ("none", "fp16", "bf16", "powersgd"):
        model = DDP(tiny_model())
        cfg = parse_comm(compression, powersgd_rank=1, powersgd_start_iter=2)
        session = setup_communication(model, cfg)
        train(model, session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=LR)), rank, STEPS)
        out[compression] = {"params": params_of(model.module), "stats": session.stats()}
    # Several buckets (a tiny bucket cap): PowerSGD's chained all-reduces must not interleave across buckets.
    model = DDP(tiny_model(), bucket_cap_mb=0.0004)
    state = _HookState(None, TrafficAccount(), powersgd=PowerSGDState(None, matrix_approximation_rank=1,
                                                                       start_powerSGD_iter=2))
    model.register_comm_hook(state, bucket_spy)
    train(model, torch.optim.SGD(model.parameters(), lr=LR), rank, 12)
    out["powersgd_multi"] = {"params": params_of(model.module), "buckets": sorted(SEEN_BUCKETS)}
    try:
        DDP_model = DDP(tiny_model())
        s = setup_communication(DDP_model, parse_comm("dgc"))
        s.wrap_optimizer(torch.optim.SGD(DDP_model.parameters(), lr=0.1, momentum=0.9))
    except ValueError as error:
        out["momentum_error"] = str(error)
    dist.barrier()
    return out


@pytest.mark.timeout(180)
def test_builtin_hooks_run_on_gloo_and_are_counted(gloo_pair: list[dict[str, Any]]) -> None:
    results = [r["builtin"] for r in gloo_pair]
    dense = results[0]["none"]["stats"]["total_dense_bytes"]
    assert dense > 0
    for compression in ("none", "fp16", "bf16", "powersgd"):
        for name, value in results[0][compression]["params"].items():  # every hook keeps replicas in step
            torch.testing.assert_close(results[1][compression]["params"][name], value, rtol=0, atol=0)
        assert results[0][compression]["stats"]["steps"] == STEPS
    for name, value in results[0]["plain"].items():
        torch.testing.assert_close(results[0]["none"]["params"][name], value, rtol=0, atol=0)
        torch.testing.assert_close(results[0]["fp16"]["params"][name], value, rtol=1e-2, atol=1e-3)
    assert results[0]["fp16"]["stats"]["total_sent_bytes"] * 2 == dense
    assert results[0]["bf16"]["stats"]["total_sent_bytes"] * 2 == dense
    assert 0 < results[0]["powersgd"]["stats"]["last_step_sent_bytes"] < dense / STEPS
    assert "param_groups[0]['momentum']=0.9" in results[0]["momentum_error"]
    assert len(results[0]["powersgd_multi"]["buckets"]) > 1
    for name, value in results[0]["powersgd_multi"]["params"].items():
        torch.testing.assert_close(results[1]["powersgd_multi"]["params"][name], value, rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_dgc_with_momentum_zero_feeds_adam_exactly(gloo_pair: list[dict[str, Any]]) -> None:
    results = [r["adam"] for r in gloo_pair]
    for r in results:  # sparsity 0: the same weights as DDP's all-reduce + Adam, and no momentum buffer in the hook
        assert r["momenta"] == 0
        for name, value in r["reference"].items():
            torch.testing.assert_close(r["dgc"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in results[0]["sparse_params"].items():  # sparse steps keep the replicas identical
        torch.testing.assert_close(results[1]["sparse_params"][name], value, rtol=0, atol=0)
    for step in range(5):
        for name, t0 in results[0]["steps"][step].items():
            t1 = results[1]["steps"][step][name]
            for t in (t0, t1):  # nothing lost: sent + kept back = accumulated = previous residual + gradient
                torch.testing.assert_close(t["sent"] + t["residual"], t["accumulated"], rtol=0, atol=0)
                k = dgc_k(t["sent"].numel(), 0.5 if step < 2 else 0.9)
                assert int((t["sent"] != 0).sum()) <= k
                top = torch.topk(t["accumulated"].abs(), k).values.min()
                assert bool((t["sent"].abs() >= top).sum() >= k)
            for r in results:
                before = r["steps"][step - 1][name]["residual"] if step else torch.zeros_like(t0["gradient"])
                mine = r["steps"][step][name]
                torch.testing.assert_close(mine["accumulated"], before + mine["gradient"], rtol=1e-6, atol=1e-7)
            # Adam received the average of what the two ranks sent (its momentum is the only one applied)
            torch.testing.assert_close(t0["applied"], (t0["sent"] + t1["sent"]) / 2, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(t1["applied"], t0["applied"], rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_dgc_adam_correction_runs_adam_in_the_hook(gloo_pair: list[dict[str, Any]]) -> None:
    for r in (g["adam"] for g in gloo_pair):
        for name, value in r["corrected"]["reference"].items():
            torch.testing.assert_close(r["corrected"]["dgc"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert "DGCConfig.correction='adam': momentum would be applied twice" in r["corrected_error"]


@pytest.mark.timeout(180)
def test_dgc_sends_named_tensors_densely_or_by_whole_rows(gloo_pair: list[dict[str, Any]]) -> None:
    from gnn.comm.config import dgc_row_k

    ranks = [r["layout"] for r in gloo_pair]
    # the two linear layers' entries (12×16, 3×12) and the three biases + dense parts, at 90 %, fp32
    linear_bytes = linear_sent_bytes()
    biases = (12 + 3) * 4
    dense = [r["dense"] for r in ranks]
    assert [d["layout"] for d in dense] == ["dense", "dense"]
    for step in range(4):
        assert not dense[0]["steps"][step]["audited"]
        assert dense[0]["steps"][step]["sent_bytes"] == 50 * 8 * 4 + biases + linear_bytes
    for name, value in dense[0]["params"].items():
        torch.testing.assert_close(dense[1]["params"][name], value, rtol=0, atol=0)
    rows = [r["rows"] for r in ranks]
    assert [r["layout"] for r in rows] == ["rows", "rows"]
    r = dgc_row_k(50, 8, 0.9, value_bytes=4, index_bytes=INDEX_BYTES)
    assert r == (40 * 8) // (8 * 4 + 4) == 8  # 40 entries' bytes buy 8 whole rows (64 values)
    for step in range(4):
        per_rank = [x["steps"][step] for x in rows]
        for entry in per_rank:
            sent = entry["sent"].view(50, 8)
            chosen = sent.abs().sum(dim=1) > 0
            assert int(chosen.sum()) == r and entry["k"] == r * 8
            # whole rows: a chosen row is sent as it was accumulated, and nothing of it stays behind
            acc, res = entry["accumulated"].view(50, 8), entry["residual"].view(50, 8)
            torch.testing.assert_close(sent[chosen], acc[chosen], rtol=0, atol=0)
            assert not res[chosen].any()
            torch.testing.assert_close(sent + res, acc, rtol=0, atol=0)  # nothing lost
            norms = acc.norm(dim=1)
            assert float(norms[chosen].min()) >= float(norms[~chosen].max())  # the largest rows
            assert entry["sent_bytes"] == r * 8 * 4 + index_bytes(r, 50) + biases + linear_bytes
        average = (per_rank[0]["sent"] + per_rank[1]["sent"]) / 2
        for entry in per_rank:
            torch.testing.assert_close(entry["applied"], average, rtol=1e-6, atol=1e-7)
    for name, value in rows[0]["params"].items():
        torch.testing.assert_close(rows[1]["params"][name], value, rtol=0, atol=0)
    assert "'item_id.*'" in ranks[0]["unmatched_error"] and "matches no parameter" in ranks[0]["unmatched_error"]


@pytest.mark.timeout(180)
def test_merge_changed_rows_sends_only_changed_rows_and_sums_or_averages_them(
        gloo_pair: list[dict[str, Any]]) -> None:

    base = gloo_pair[0]["merge"]["base"]
    expected = {"sum": base.clone(), "mean": base.clone()}
    for table in expected.values():
        table[1] += torch.tensor([10.0, 20.0])
        table[4] += torch.tensor([-1.0, -3.0])
    expected["sum"][3] += torch.tensor([101.0, 202.0])  # both ranks' changes
    expected["mean"][3] += torch.tensor([50.5, 101.0])  # their mean over the 2 ranks that changed it
    for rank in gloo_pair:
        merged = rank["merge"]
        for merge in ("sum", "mean"):
            m = merged[merge]
            torch.testing.assert_close(m["copy"], expected[merge], rtol=0, atol=0)  # into a copy ...
            assert m["snapshot_untouched"]  # ... leaves the snapshot as it was
            torch.testing.assert_close(m["param"], expected[merge], rtol=0, atol=0)  # in place ...
            torch.testing.assert_close(m["snapshot"], expected[merge], rtol=0, atol=0)  # ... moves the snapshot
            # the count (int64), then 2 changed rows of 2 float32 values and an int32 index each
            assert m["sent"] == m["sent_in_place"] == 8 + 2 * (2 * 4 + INDEX_BYTES)
        assert merged["nothing_changed_sent"] == 8  # only the count travels when no row changed
        touch = base.clone()
        touch[1] += torch.tensor([10.0, 20.0])  # one rank changed it: its change
        touch[3] += (3 * torch.tensor([1.0, 2.0]) + 1 * torch.tensor([100.0, 200.0])) / 4  # weighted 3 : 1
        touch[4] += torch.tensor([-1.0, -3.0])  # changed, touched by nobody: the plain mean of the changes
        torch.testing.assert_close(merged["touches"]["param"], touch, rtol=1e-6, atol=1e-6)
        assert merged["touches"]["sent"] == 8 + 2 * (2 * 4 + INDEX_BYTES) + 2 * 4  # and a float32 weight a row


@pytest.mark.timeout(180)
def test_dgc_local_tensor_sends_no_gradient_and_its_rounds_lose_nothing(gloo_pair: list[dict[str, Any]]) -> None:
    local = [r["layout"]["local"] for r in gloo_pair]
    assert [x["layout"] for x in local] == ["local", "local"]
    linear_bytes = linear_sent_bytes()
    biases = (12 + 3) * 4
    for x in local:
        # the table sends no gradient: a step carries the linear layers' top-k and the biases only
        assert [step["sent_bytes"] for step in x["steps"]] == [biases + linear_bytes] * 4
        assert x["traffic"]["sync_rounds"] == {"local_rows": 2}  # 4 steps, a round every 2
        assert 0 < x["traffic"]["sync_bytes"]["local_rows"] <= 2 * (8 + 50 * (8 * 4 + 4))
    # each rank applied its own table gradient (the ranks' batches differ) ...
    assert not torch.equal(local[0]["steps"][0]["applied"], local[1]["steps"][0]["applied"])
    # ... and after the last round the replicas agree, holding every rank's every step (sum merge, SGD momentum 0)
    start = tiny_model()[0].weight.detach().reshape(-1)
    applied = sum(step["applied"] for x in local for step in x["steps"])
    for x in local:
        torch.testing.assert_close(x["params"]["0.weight"].reshape(-1), start - LR * applied, rtol=1e-5, atol=1e-6)
    for name, value in local[0]["params"].items():
        torch.testing.assert_close(local[1]["params"][name], value, rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_dgc_flush_applies_every_accumulated_update(gloo_pair: list[dict[str, Any]]) -> None:
    flushed = [r["flush"] for r in gloo_pair]
    start = params_of(tiny_model())
    for x in flushed:
        assert x["residual_before"] > 0 and x["residual_after"] == 0
        assert x["traffic"]["sync_rounds"] == {"flush": 1}
        assert x["traffic"]["sync_bytes"]["flush"] == (50 * 8 + 12 * 16 + 3 * 12) * 4  # the compressed tensors, dense
        # sent, then flushed: each compressed tensor moved by lr times the ranks' mean of every velocity added
        for name in x["added"]:
            mean = (flushed[0]["added"][name] + flushed[1]["added"][name]) / 2
            torch.testing.assert_close(x["params"][name].reshape(-1), start[name].reshape(-1) - LR * mean,
                                       rtol=1e-5, atol=1e-6)
    for name, value in flushed[0]["params"].items():
        torch.testing.assert_close(flushed[1]["params"][name], value, rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_dgc_senders_average_divides_each_entry_by_the_ranks_that_sent_it(gloo_pair: list[dict[str, Any]]) -> None:
    per_rank = [r["layout"]["senders"] for r in gloo_pair]
    shared = 0
    for step in range(4):
        entries = [x["steps"][step] for x in per_rank]
        senders = torch.zeros(50 * 8)
        for entry in entries:
            senders[entry["indices"]] += 1
        shared += int((senders == 2).sum())
        expected = (entries[0]["sent"] + entries[1]["sent"]) / senders.clamp(min=1)
        for entry in entries:
            torch.testing.assert_close(entry["applied"], expected, rtol=1e-6, atol=1e-7)
    assert 0 < shared < 4 * 40  # some entries came from both ranks (halved), the rest from one (kept whole)


@pytest.mark.timeout(180)
def test_dgc_adam_masking_restarts_the_moment_of_entries_sent(gloo_pair: list[dict[str, Any]]) -> None:
    for rank in gloo_pair:
        for step in rank["adam_masking"]["steps"]:
            sent = torch.zeros(50 * 8, dtype=torch.bool)
            sent[step["indices"]] = True
            assert not step["moment"][sent].any()  # the entries just sent keep no first moment
            assert step["moment"][~sent].any()  # the others keep theirs


@pytest.mark.timeout(180)
def test_dgc_gradient_select_ranks_adam_steps_by_gradient_scale(gloo_pair: list[dict[str, Any]]) -> None:
    differs = 0
    for rank in gloo_pair:
        for step in rank["adam_masking"]["gradient_select"]:
            magnitude = step["accumulated"].abs() * step["v"].sqrt()
            k = step["indices"].numel()
            assert k == dgc_k(50 * 8, 0.9)
            chosen = magnitude[step["indices"]]
            others = torch.ones(50 * 8, dtype=torch.bool)
            others[step["indices"]] = False
            assert float(chosen.min()) >= float(magnitude[others].max())  # the top k by step times sqrt(v)
            by_value = set(torch.topk(step["accumulated"].abs(), k).indices.tolist())
            differs += by_value != set(step["indices"].tolist())
    assert differs  # and not the entries that ranking the steps alone would pick


@pytest.mark.timeout(180)
def test_dgc_state_saved_per_rank_resumes_bit_for_bit(gloo_pair: list[dict[str, Any]]) -> None:
    for rank in gloo_pair:
        r = rank["resume"]
        assert r["restored"] and not r["other_epoch"]  # a state from another epoch than the checkpoint is ignored
        assert r["steps"] == 4  # the step clock (it drives the warm-up) continued from 2
        for name, value in r["straight"].items():  # residuals, Adam moments and the sampler carried over exactly
            torch.testing.assert_close(r["resumed"][name], value, rtol=0, atol=0)


@pytest.mark.timeout(180)
def test_dgc_owner_scale_gives_a_row_one_rank_trains_a_whole_adam_step(gloo_pair: list[dict[str, Any]]) -> None:
    beta1, beta2 = DGCConfig().adam_betas
    eps = DGCConfig().adam_eps
    moments = [(torch.zeros(50 * 8), torch.zeros(50 * 8)) for _ in gloo_pair]
    owners = torch.full((50,), 2.0)
    for step in range(4):
        records = [r["owner"]["owner"][step] for r in gloo_pair]
        touched = torch.stack([x["gradient"].view(50, 8).ne(0).any(dim=1) for x in records]).sum(dim=0)
        owners = torch.where(touched > 0, touched.float(), owners)
        expected = torch.zeros(50 * 8)
        for (m, v), x in zip(moments, records, strict=True):  # each rank's own Adam step, by hand
            m.mul_(beta1).add_(x["gradient"], alpha=1 - beta1)
            v.mul_(beta2).addcmul_(x["gradient"], x["gradient"], value=1 - beta2)
            adam = (m / (1 - beta1 ** (step + 1))) / ((v / (1 - beta2 ** (step + 1))).sqrt() + eps)
            expected += (adam.view(50, 8) * (2 / owners).unsqueeze(1)).view(-1) / 2
        for x in records:
            torch.testing.assert_close(x["applied"], expected, rtol=1e-5, atol=1e-6)
        assert bool((touched[:20] <= 1).all() and (touched[30:] <= 1).all())  # rows of one rank's ids only
        if step == 0:  # Adam's first step is sign(g): an entry of a row one rank touched moves by a whole step
            single = torch.zeros(50 * 8, dtype=torch.bool)
            for x in records:
                single |= x["gradient"].ne(0) & (touched == 1).repeat_interleave(8)
            assert int(single.sum()) > 50
            torch.testing.assert_close(records[0]["applied"][single].abs(), torch.ones(int(single.sum())),
                                       rtol=0, atol=1e-3)  # |g| / (|g| + eps)
        for rank, plain in enumerate(r["owner"]["plain"][step] for r in gloo_pair):
            assert records[rank]["sent_bytes"] == plain["sent_bytes"] + 7  # the 50-row bitmap: 7 bytes a step
    assert "--dgc-owner-scale" in gloo_pair[0]["owner"]["dense_error"]


def _log8(square: torch.Tensor) -> torch.Tensor:
    """A positive square through one byte, by hand: log2 rounded to quarter octaves."""
    return torch.pow(2.0, torch.round(torch.log2(square) * 4).clamp(-199, 55) / 4)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("label", ["moment_entries", "moment_rows", "moment_log8", "moment_log8o"])
def test_dgc_shared_moment_weighs_each_rank_step_against_every_rank_gradient(
        gloo_pair: list[dict[str, Any]], label: str) -> None:
    beta1, beta2 = DGCConfig().adam_betas
    eps = DGCConfig().adam_eps
    firsts = [torch.zeros(50 * 8) for _ in gloo_pair]
    v = torch.zeros(50 * 8)
    for step in range(4):
        records = [r["owner"][label][step] for r in gloo_pair]
        if label == "moment_entries":  # the ranks' mean square, by hand
            squares = sum(x["gradient"] ** 2 for x in records) / 2
            extra_bytes = 50 * 8 * 4
        else:
            by_row = [(x["gradient"] ** 2).view(50, 8).mean(dim=1) for x in records]
            extra_bytes = 50 * 4
            owners = sum((r > 0).float() for r in by_row)
            if label.startswith("moment_log8"):  # nonzero rows only, a byte each, padded to the larger count;
                by_row = [torch.where(r > 0, _log8(r), r) for r in by_row]  # a bitmap and a count
                extra_bytes = 8 + 7 + max(int((r > 0).sum()) for r in by_row)
            mean = sum(by_row) / 2
            if label == "moment_log8o":  # times the share of ranks that touched the row
                mean = mean * owners / 2
            squares = mean.repeat_interleave(8)
        v = beta2 * v + (1 - beta2) * squares
        denominator = (v / (1 - beta2 ** (step + 1))).sqrt() + eps
        expected = torch.zeros(50 * 8)
        for m, x in zip(firsts, records, strict=True):  # each rank's first moment over one shared v, averaged
            m.mul_(beta1).add_(x["gradient"], alpha=1 - beta1)
            expected += (m / (1 - beta1 ** (step + 1))) / denominator / 2
        for rank, x in enumerate(records):
            torch.testing.assert_close(x["v"], v, rtol=1e-5, atol=1e-12)  # one v on every rank
            torch.testing.assert_close(x["v"], records[0]["v"], rtol=0, atol=0)
            torch.testing.assert_close(x["applied"], expected, rtol=1e-4, atol=1e-6)
            assert x["sent_bytes"] == gloo_pair[rank]["owner"]["plain"][step]["sent_bytes"] + extra_bytes
        plain = records[0]["applied"] - gloo_pair[0]["owner"]["plain"][step]["applied"]
        assert float(plain.abs().max()) > 0.05  # and that differs from averaging the ranks' own Adam steps


def test_indices_travel_as_a_bitmap_only_when_it_is_smaller_and_decode_exactly() -> None:
    gen = torch.Generator().manual_seed(5)
    for slots, k, width in [(400, 13, 1), (400, 14, 1), (1000, 700, 1), (37, 20, 3), (64, 64, 2), (5, 1, 1)]:
        indices = torch.randperm(slots, generator=gen)[:k].to(torch.int32)
        values = torch.randn(k * width, generator=gen)
        sent_values, words = encode_indices(values, indices, slots)
        assert words.dtype == torch.int32
        bitmap = k > -(-slots // 32)
        assert words.numel() == (-(-slots // 32) if bitmap else k)
        at = decode_indices(words, slots, k)
        assert at.dtype == torch.int64 and at.numel() == k
        out = torch.zeros(slots, width).index_add_(0, at, sent_values.view(k, width))  # what the receiver rebuilds
        expected = torch.zeros(slots, width)
        expected[indices.long()] = values.view(k, width)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        if bitmap:
            assert at.tolist() == sorted(indices.tolist())
        else:
            assert torch.equal(sent_values, values) and torch.equal(at, indices.long())
