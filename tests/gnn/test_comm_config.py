"""CommConfig parsing/validation, DGC top-k selection and schedule, traffic accounting, cluster projection."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from gnn.comm import CommConfig, DGCConfig, SyncLevel, TrafficAccount, parse_comm, parse_sync, select_topk
from gnn.comm.config import add_comm_arguments, comm_config_from_args, dgc_k


def test_parse_sync_forms() -> None:
    assert parse_sync("allreduce") == ("allreduce", ())
    assert parse_sync("local:16") == ("local", (SyncLevel(None, 16),))
    assert parse_sync("hierarchical:2@4,4@8,all@16") == (
        "hierarchical", (SyncLevel(2, 4), SyncLevel(4, 8), SyncLevel(None, 16)))
    kind, levels = parse_sync("hierarchical:2@grad,all@4")
    assert (kind, levels) == ("hierarchical", (SyncLevel(2, 1, gradients=True), SyncLevel(None, 4)))
    config = parse_comm("none", "hierarchical:2@grad,all@4")
    assert config.sync_spec == "hierarchical:2@grad,all@4"
    assert [lv.label for lv in levels] == ["group2@grad", "all@4"]
    assert CommConfig.from_dict(config.to_dict()) == config
    old = config.to_dict()  # a checkpoint written before gradient levels existed has no "gradients" key
    old["sync_levels"] = [{"group_size": 2, "period": 4}, {"group_size": None, "period": 8}]
    assert CommConfig.from_dict(old).sync_levels == (SyncLevel(2, 4), SyncLevel(None, 8))


@pytest.mark.parametrize(("compression", "sync", "fragment"), [
    ("zip", "allreduce", "--compression 'zip'"),
    ("none", "local:0", "local needs a positive period"),
    ("none", "local:x", "local needs a positive period"),
    ("none", "hierarchical:2-4", "must read GROUP@PERIOD"),
    ("none", "hierarchical:2@8,all@4", "periods must increase"),
    ("none", "hierarchical:3@2,4@4,all@8", "must be a larger multiple of 3"),
    ("none", "hierarchical:all@4,2@8", "'all' may only be the last level"),
    ("none", "hierarchical:1@2,all@4", "group size 1"),
    ("none", "hierarchical:2@4,4@grad,all@8", "must be the first of at least two levels"),
    ("none", "hierarchical:2@grad", "must be the first of at least two levels"),
    ("none", "hierarchical:all@grad,all@4", "all@grad is --sync allreduce"),
    ("none", "hierarchical:2@grad,all@1", "periods must increase (1 then 1)"),
    ("none", "local:grad", "local needs a positive period"),
    ("none", "ring", "--sync 'ring'"),
    ("dgc", "local:4", "cannot be combined with --sync local:4"),
])
def test_invalid_specs_name_the_argument(compression: str, sync: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="--") as info:
        parse_comm(compression, sync)
    assert fragment in str(info.value)


def test_powersgd_start_iter_must_exceed_one() -> None:
    with pytest.raises(ValueError, match="--powersgd-start-iter 1"):
        CommConfig(compression="powersgd", powersgd_start_iter=1)


def test_dgc_config_validation() -> None:
    with pytest.raises(ValueError, match=r"warmup_sparsities\[1\]=1.0"):
        DGCConfig(warmup_sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="sample_fraction"):
        DGCConfig(sample_fraction=0.0)
    with pytest.raises(ValueError, match="warmup_unit"):
        DGCConfig(warmup_unit="batch")


def test_warmup_schedule_follows_config() -> None:
    cfg = DGCConfig()
    assert [cfg.sparsity_at(e) for e in range(6)] == [0.75, 0.9375, 0.984375, 0.996, 0.999, 0.999]
    slow = DGCConfig(sparsity=0.99, warmup_sparsities=(0.5, 0.9), warmup_stage_length=3)
    assert [slow.sparsity_at(e) for e in range(8)] == [0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.99, 0.99]


def test_dgc_k_is_exact_and_at_least_one() -> None:
    assert dgc_k(1000, 0.999) == 1
    assert dgc_k(10, 0.999) == 1
    assert dgc_k(1000, 0.75) == 250
    assert dgc_k(1000, 0.0) == 1000
    assert dgc_k(3, 0.5) == 2


def test_cli_round_trip_and_checkpoint_dict() -> None:
    parser = argparse.ArgumentParser()
    add_comm_arguments(parser)
    args = parser.parse_args(["--compression", "dgc", "--dgc-sparsity", "0.99", "--dgc-warmup", "0.5,0.9",
                              "--dgc-weight-decay", "1e-4"])
    cfg = comm_config_from_args(args)
    assert cfg.compression == "dgc" and cfg.dgc.sparsity == 0.99 and cfg.dgc.warmup_sparsities == (0.5, 0.9)
    assert CommConfig.from_dict(cfg.to_dict()) == cfg
    hier = comm_config_from_args(parser.parse_args(["--sync", "hierarchical:2@4,all@16", "--sync-warmup-steps", "5"]))
    assert hier.sync_spec == "hierarchical:2@4,all@16" and hier.sync_warmup_steps == 5
    assert CommConfig.from_dict(hier.to_dict()) == hier
    assert not hier.uses_ddp_allreduce


@pytest.mark.parametrize("k", [1, 7, 100, 999])
def test_select_topk_matches_exact_topk(k: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20_000, generator=gen).abs()
    picked, _ = select_topk(x, k, sample_fraction=0.01, min_sample=64, generator=gen)
    assert picked.numel() == k
    assert set(picked.tolist()) == set(torch.topk(x, k).indices.tolist())


def test_select_topk_trims_ties_and_falls_back_when_the_sample_overshoots() -> None:
    x = torch.zeros(10_000)
    x[:5] = torch.arange(1.0, 6.0)  # most entries tie at 0: the threshold selects everything, trimmed to k
    picked, fell_back = select_topk(x, 20, sample_fraction=0.01, min_sample=64,
                                    generator=torch.Generator().manual_seed(0))
    assert not fell_back and picked.numel() == 20
    assert set(range(5)) <= set(picked.tolist())
    gen = torch.Generator().manual_seed(1)
    fallbacks = 0
    for _ in range(20):  # slack 1: the estimate lands below k about half the time -> exact fallback
        y = torch.rand(5_000, generator=gen)
        picked, fell_back = select_topk(y, 50, sample_fraction=0.02, min_sample=16, slack=1.0, generator=gen)
        fallbacks += fell_back
        assert set(picked.tolist()) == set(torch.topk(y, 50).indices.tolist())
    assert 0 < fallbacks < 20


def test_traffic_account_sums_steps_and_syncs() -> None:
    acc = TrafficAccount()
    acc.record(dense_bytes=400, sent_bytes=8)
    acc.record(dense_bytes=100, sent_bytes=2)
    acc.end_step()
    acc.record(dense_bytes=500, sent_bytes=0)
    acc.end_step()
    acc.record_sync(level="all@4", payload_bytes=40)
    assert (acc.steps, acc.last_step_dense_bytes, acc.last_step_sent_bytes) == (2, 500, 0)
    assert (acc.total_dense_bytes, acc.total_sent_bytes, acc.total_bytes) == (1000, 10, 50)
    assert acc.compression_ratio == 20.0
    assert acc.sync_rounds == {"all@4": 1}
    with pytest.raises(ValueError, match="non-negative"):
        acc.record(dense_bytes=-1, sent_bytes=0)
    assert "ratio=20.0x" in repr(acc)
    assert math.isinf(TrafficAccount().compression_ratio)


def test_projection_formulas() -> None:
    from gnn.comm.projection import (
        StepTraffic,
        communication_seconds,
        gbit,
        level_frequencies,
        ring_allgather_seconds,
        ring_allreduce_seconds,
    )

    bw = gbit(8.0)  # 1e9 bytes/s
    assert ring_allreduce_seconds(1e9, 4, bandwidth=bw) == 2 * 3 / 4
    assert ring_allreduce_seconds(1e9, 1, bandwidth=bw) == 0.0
    assert ring_allgather_seconds(1e6, 8, bandwidth=bw) == 7e-3
    levels = (SyncLevel(2, 4), SyncLevel(None, 16))
    assert level_frequencies(levels) == [3 / 16, 1 / 16]
    local = StepTraffic(model_bytes=1e9, levels=(SyncLevel(None, 10),))
    assert communication_seconds(local, 2, bandwidth=bw) == 1.0 / 10
    hier = StepTraffic(model_bytes=1e9, levels=levels)
    expected = 3 / 16 * 1.0 + 1 / 16 * 2 * 7 / 8
    assert abs(communication_seconds(hier, 8, bandwidth=bw) - expected) < 1e-12
    grads = (SyncLevel(2, 1, gradients=True), SyncLevel(None, 4))  # pairs all-reduce gradients at every step
    assert level_frequencies(grads) == [1.0, 1 / 4]
    pairs = StepTraffic(model_bytes=1e9, levels=grads)
    expected = 1.0 * 2 * 1 / 2 + 1 / 4 * 2 * 7 / 8
    assert abs(communication_seconds(pairs, 8, bandwidth=bw) - expected) < 1e-12
    # two tiers: the pairs' all-reduce inside a node at 10x the network's bandwidth, the global round across it
    expected = 1.0 * 2 * 1 / 2 / 10 + 1 / 4 * 2 * 7 / 8
    assert abs(communication_seconds(pairs, 8, bandwidth=bw, group_bandwidth=10 * bw) - expected) < 1e-12
    # a level over every worker, and plain all-reduce, stay on the network whatever the group bandwidth
    assert communication_seconds(local, 2, bandwidth=bw, group_bandwidth=10 * bw) == 1.0 / 10
    dense = StepTraffic(allreduce_bytes=1e9)
    assert communication_seconds(dense, 8, bandwidth=bw, group_bandwidth=10 * bw) == 2 * 7 / 8
    # a group as large as the cluster is the cluster: no faster link
    assert communication_seconds(pairs, 2, bandwidth=bw, group_bandwidth=10 * bw) == \
        communication_seconds(pairs, 2, bandwidth=bw)
    with pytest.raises(ValueError, match="group_bandwidth"):
        communication_seconds(pairs, 8, bandwidth=bw, group_bandwidth=0.0)


def test_dgc_state_round_trips_residuals_by_name() -> None:
    from gnn.comm.dgc import DGCState, _compress_local

    model = torch.nn.Linear(40, 30)
    state = DGCState(DGCConfig(sparsity=0.9, warmup_sparsities=()))
    state.name_parameters(model)
    grad = torch.arange(1200, dtype=torch.float32).reshape(30, 40) / 1200  # entry i has value i/1200
    values, indices, _ = _compress_local(state, model.weight, grad, 2, 0.9)
    assert sorted(indices.tolist()) == list(range(1080, 1200))  # exactly k = 120, the largest
    assert torch.equal(values, indices.double().div(1200).float())
    restored = DGCState(DGCConfig())
    fresh = torch.nn.Linear(40, 30)
    restored.load_state_dict(state.state_dict(), fresh)
    assert torch.equal(restored.velocities[fresh.weight], state.velocities[model.weight])
    assert float(restored.velocities[fresh.weight].max()) == float(torch.tensor(1079.0) / 1200)  # top 120 left
    with pytest.raises(ValueError, match="lacks"):
        restored.load_state_dict(state.state_dict(), torch.nn.Sequential(torch.nn.Linear(40, 30)))


def test_dgc_optimizer_rule_applies_momentum_once() -> None:
    from gnn.comm import CommSession, DGCState

    model = torch.nn.Linear(4, 3)

    def session(momentum: float) -> CommSession:
        cfg = parse_comm("dgc", dgc=DGCConfig(momentum=momentum))
        return CommSession(config=cfg, traffic=TrafficAccount(), dgc=DGCState(cfg.dgc))

    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"Adam with --compression dgc and DGCConfig.momentum=0.9: momentum would be "
                                         r"applied twice.*--dgc-momentum 0"):
        session(0.9).wrap_optimizer(adam)
    with pytest.raises(ValueError, match=r"\['momentum'\]=0.5.*DGCConfig.momentum=0"):
        session(0.9).wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5))
    with pytest.raises(ValueError, match=r"\['weight_decay'\]=0.01.*DGCConfig.weight_decay"):
        session(0.0).wrap_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01))
    assert session(0.0).wrap_optimizer(adam) is adam  # error feedback: Adam applies the momentum
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert session(0.0).wrap_optimizer(sgd) is sgd
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert session(0.9).wrap_optimizer(plain) is plain  # DGC proper: the hook applies the momentum


def test_dgc_adam_correction_config() -> None:
    with pytest.raises(ValueError, match=r"correction='adam' with momentum=0.9.*set momentum=0"):
        DGCConfig(correction="adam")
    with pytest.raises(ValueError, match=r"correction='sgd'"):
        DGCConfig(correction="sgd")
    cfg = parse_comm("dgc", dgc=DGCConfig(momentum=0.0, correction="adam", adam_betas=(0.8, 0.99)))
    assert CommConfig.from_dict(cfg.to_dict()) == cfg
    parser = argparse.ArgumentParser()
    add_comm_arguments(parser)
    args = parser.parse_args(["--compression", "dgc", "--dgc-momentum", "0", "--dgc-correction", "adam"])
    assert comm_config_from_args(args).dgc.correction == "adam"


def test_dgc_dense_and_row_tensor_patterns_config() -> None:
    import json

    from gnn.comm.config import dgc_row_k, parse_patterns

    assert parse_patterns(" input.item_id.weight, convs.* ,") == ("input.item_id.weight", "convs.*")
    assert parse_patterns("") == ()
    with pytest.raises(ValueError, match=r"'a\.w' is in both dense_tensors and row_tensors"):
        DGCConfig(dense_tensors=("a.w",), row_tensors=("a.w",))
    with pytest.raises(ValueError, match="empty pattern"):
        DGCConfig(row_tensors=(" ",))
    cfg = parse_comm("dgc", dgc=DGCConfig(dense_tensors=("g1.*",), row_tensors=("input.item_id.weight",)))
    assert CommConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # through a JSON checkpoint
    parser = argparse.ArgumentParser()
    add_comm_arguments(parser)
    args = parser.parse_args(["--compression", "dgc", "--dgc-rows", "input.item_id.weight", "--dgc-dense", "g1.*"])
    assert comm_config_from_args(args).dgc == DGCConfig(dense_tensors=("g1.*",), row_tensors=("input.item_id.weight",))
    local = DGCConfig(local_tensors=("input.item_id.weight",), local_period=7, local_merge="mean")
    assert CommConfig.from_dict(json.loads(json.dumps(parse_comm("dgc", dgc=local).to_dict()))).dgc == local
    args = parser.parse_args(["--compression", "dgc", "--dgc-local", "input.item_id.weight", "--dgc-local-period",
                              "7", "--dgc-local-merge", "mean"])
    assert comm_config_from_args(args).dgc == local
    with pytest.raises(ValueError, match=r"'a\.w' is in both row_tensors and local_tensors"):
        DGCConfig(row_tensors=("a.w",), local_tensors=("a.w",))
    with pytest.raises(ValueError, match=r"local_period=0 \(--dgc-local-period\) must be >= 1"):
        DGCConfig(local_tensors=("a.w",), local_period=0)
    with pytest.raises(ValueError, match=r"local_merge='max' \(--dgc-local-merge\)"):
        DGCConfig(local_merge="max")
    with pytest.raises(ValueError, match=r"flush_at_end \(--dgc-flush\) with momentum 0"):
        DGCConfig(flush_at_end=True, momentum=0.0)
    flush = DGCConfig(flush_at_end=True, momentum=0.0, correction="adam")
    args = parser.parse_args(["--compression", "dgc", "--dgc-flush", "--dgc-momentum", "0", "--dgc-correction",
                              "adam"])
    assert comm_config_from_args(args).dgc == flush
    with pytest.raises(ValueError, match=r"adam_masking \(--dgc-adam-masking\).*needs --dgc-correction adam"):
        DGCConfig(adam_masking=True)
    with pytest.raises(ValueError, match=r"select='gradient' \(--dgc-select\).*needs --dgc-correction adam"):
        DGCConfig(select="gradient")
    with pytest.raises(ValueError, match=r"average='all' \(--dgc-average\)"):
        DGCConfig(average="all")
    args = parser.parse_args(["--compression", "dgc", "--dgc-momentum", "0", "--dgc-correction", "adam",
                              "--dgc-adam-masking", "--dgc-average", "senders"])
    assert comm_config_from_args(args).dgc == DGCConfig(momentum=0.0, correction="adam", adam_masking=True,
                                                        average="senders")
    args = parser.parse_args(["--compression", "dgc", "--dgc-momentum", "0", "--dgc-correction", "adam",
                              "--dgc-owner-scale", "a.w", "--dgc-shared-moment", "a.*,b.w", "--dgc-shared-moment-by",
                              "rows-log8", "--dgc-shared-moment-estimate", "owners"])
    moment = DGCConfig(momentum=0.0, correction="adam", owner_tensors=("a.w",), shared_moment_tensors=("a.*", "b.w"),
                       shared_moment_by="rows-log8", shared_moment_estimate="owners")
    assert comm_config_from_args(args).dgc == moment
    assert CommConfig.from_dict(json.loads(json.dumps(parse_comm("dgc", dgc=moment).to_dict()))).dgc == moment
    with pytest.raises(ValueError, match=r"shared_moment_by='cols' \(--dgc-shared-moment-by\)"):
        DGCConfig(shared_moment_by="cols")
    with pytest.raises(ValueError, match=r"owner_tensors \(--dgc-owner-scale\).*needs --dgc-correction adam"):
        DGCConfig(owner_tensors=("a.w",))
    # rows within the entry-wise bytes: 16559 × 64 at 99.9 %: 1060 entries × 8 bytes buy 32 rows of 64 values + index
    assert dgc_row_k(16559, 64, 0.999, value_bytes=4, index_bytes=4) == 1060 * 8 // 260 == 32
    assert dgc_row_k(10, 1000, 0.999, value_bytes=4, index_bytes=4) == 1  # at least one row
    assert dgc_row_k(10, 2, 0.0, value_bytes=4, index_bytes=4) == 10  # at most every row


def test_dgc_momentum_zero_keeps_every_gradient_entry() -> None:
    from gnn.comm.dgc import DGCState, _compress_local

    model = torch.nn.Linear(40, 30)
    state = DGCState(DGCConfig(sparsity=0.95, warmup_sparsities=(), momentum=0.0, min_sample=64), audit=True)
    state.name_parameters(model)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(30, 40, generator=gen) for _ in range(4)]
    sent_total = torch.zeros(1200)
    for grad in grads:
        values, indices, _ = _compress_local(state, model.weight, grad, 2, 0.95)
        assert values.numel() == 60  # exact k
        sent_total[indices.long()] += values
        audit = state.last_audit["weight"]
        assert torch.equal(audit.sent + audit.residual, audit.accumulated)
    assert state.momenta == {}  # no momentum buffer: masking has nothing to clear
    # what was sent over the steps plus what is still held back is exactly the sum of the gradients
    torch.testing.assert_close(sent_total + state.velocities[model.weight], torch.stack(grads).sum(0).reshape(-1),
                               rtol=1e-5, atol=1e-5)
