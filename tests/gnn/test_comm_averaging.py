"""Local SGD and hierarchical model averaging (parameters and buffers) on a real gloo group of 4 ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gnn.comm import CommConfig, ModelAverager, ddp_wrap, parse_comm, setup_communication
from gnn.comm.launch import run_gloo


def bn_model() -> torch.nn.Module:
    """Linear + BatchNorm (float running stats and an int64 ``num_batches_tracked`` buffer) + Linear."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def averaging_worker(rank: int, world: int, sync: str, warmup: int, steps: int) -> dict[str, Any]:
    model = ddp_wrap(bn_model(), sync_buffers=False)
    session = setup_communication(model, parse_comm("none", sync, sync_warmup_steps=warmup))
    optimizer = session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    history = []
    gen = torch.Generator().manual_seed(rank)
    for step in range(steps):
        # uneven batches per rank so that BatchNorm's num_batches_tracked could not agree by chance
        x = torch.randn(8 + rank, 6, generator=gen) * (rank + 1)
        y = torch.randn(8 + rank, 2, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if rank == 0 and step == steps - 1:
            model.module[1].num_batches_tracked += 5  # int buffers follow the group leader
        optimizer.step()
        history.append(snapshot(model.module))
    errors = {}
    wrong_world = f"hierarchical:2@2,{world * 2}@4"
    for label, sync_buffers, spec in [("broadcast", True, "local:4"), ("world", False, wrong_world)]:
        try:
            setup_communication(ddp_wrap(bn_model(), sync_buffers=sync_buffers), parse_comm("none", spec))
        except ValueError as error:
            errors[label] = str(error)
    return {"history": history, "stats": session.stats(), "errors": errors}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str] | None = None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


def both_schedules(rank: int, world: int) -> dict[str, Any]:
    return {"local": averaging_worker(rank, world, "local:3", 2, 8),
            "hierarchical": averaging_worker(rank, world, "hierarchical:2@2,all@4", 0, 6),
            "pairs": averaging_worker(rank, world, "hierarchical:2@grad,all@4", 1, 7)}


@pytest.fixture(scope="module")
def gloo_four() -> list[dict[str, Any]]:
    """One set of 4 spawned gloo ranks runs both schedules (spawning costs seconds)."""
    return run_gloo(both_schedules, world_size=4)


@pytest.mark.timeout(240)  # a collective mismatch hangs rather than fails
def test_local_sgd_averages_params_and_buffers_every_h_steps_after_warmup(gloo_four: list[dict[str, Any]]) -> None:
    results = [r["local"] for r in gloo_four]
    h0, h1 = results[0]["history"], results[1]["history"]
    params = [n for n, _ in bn_model().named_parameters()]
    for step in range(8):  # step index s = step + 1
        if step < 2:  # warm-up: gradients all-reduced, so parameters agree (buffers are local)
            assert same(h0[step], h1[step], params)
            assert not same(h0[step], h1[step])
        elif step + 1 - 2 in (3, 6):  # averaging rounds: everything identical, int buffer from rank 0
            assert all(same(h0[step], r["history"][step]) for r in results)
        else:
            assert not same(h0[step], h1[step], params)
    # step 8 is a round: integer buffers are not averaged but taken from the group leader (rank 0 added 5)
    assert int(h1[-1]["1.num_batches_tracked"]) == int(h0[-1]["1.num_batches_tracked"]) == 8 + 5
    stats = results[0]["stats"]
    assert stats["sync_rounds"] == {"all@3": 2}
    n_bytes = sum(v.numel() * v.element_size() for v in h0[0].values())
    assert stats["sync_bytes"] == {"all@3": 2 * n_bytes}
    assert stats["total_sent_bytes"] == 2 * stats["last_step_dense_bytes"]  # only the 2 warm-up steps sent
    assert "forward_sync_buffers=False" in results[0]["errors"]["broadcast"]
    assert "must equal the world size 4" in results[0]["errors"]["world"]


@pytest.mark.timeout(240)
def test_hierarchical_averages_within_groups_then_everyone(gloo_four: list[dict[str, Any]]) -> None:
    results = [r["hierarchical"] for r in gloo_four]
    hist = [r["history"] for r in results]
    for step in range(6):
        s = step + 1
        pairs_equal = same(hist[0][step], hist[1][step]) and same(hist[2][step], hist[3][step])
        across_equal = same(hist[0][step], hist[2][step], [n for n, _ in bn_model().named_parameters()])
        if s == 4:
            assert all(same(hist[0][step], h[step]) for h in hist)
        elif s % 2 == 0:  # steps 2 and 6: groups {0,1} and {2,3} agree inside, not across
            assert pairs_equal and not across_equal
        else:
            assert not same(hist[0][step], hist[1][step]) and not across_equal
    assert results[0]["stats"]["sync_rounds"] == {"group2@2": 2, "all@4": 1}
    assert results[3]["stats"]["total_sent_bytes"] == 0


@pytest.mark.timeout(240)
def test_gradient_level_trains_each_group_as_one_synchronous_replica(gloo_four: list[dict[str, Any]]) -> None:
    results = [r["pairs"] for r in gloo_four]
    hist = [r["history"] for r in results]
    params = [n for n, _ in bn_model().named_parameters()]
    for step in range(7):
        s = step + 1  # step 1 is the warm-up (global all-reduce); then pairs all-reduce gradients, all@4 at s = 5
        pairs_equal = same(hist[0][step], hist[1][step], params) and same(hist[2][step], hist[3][step], params)
        across_equal = same(hist[0][step], hist[2][step], params)
        assert pairs_equal  # every step: each pair steps on the pair's mean gradient
        if s in (1, 5):
            assert across_equal
        else:
            assert not across_equal
        if s == 5:  # the global round averages the buffers too (BatchNorm's running stats differ inside a pair)
            assert all(same(hist[0][step], h[step]) for h in hist)
        else:
            assert not same(hist[0][step], hist[1][step])
    stats = results[0]["stats"]
    assert stats["sync_rounds"] == {"all@4": 1}
    assert stats["config"]["sync_spec"] == "hierarchical:2@grad,all@4"
    assert stats["total_sent_bytes"] == 7 * stats["last_step_dense_bytes"]  # warm-up + 6 pair all-reduces


def touched_worker(rank: int, world: int, weighting: str) -> dict[str, Any]:
    """Rank 0 trains embedding rows 0 and 1, rank 1 rows 1 and 2; rows 3-5 nobody; local:2 without warm-up."""
    torch.manual_seed(0)
    model = ddp_wrap(torch.nn.Sequential(torch.nn.Embedding(6, 3), torch.nn.Linear(3, 1)), sync_buffers=False)
    session = setup_communication(model, parse_comm("none", "local:2", sync_weighting=weighting))
    assert session.averager is not None
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([rank, rank + 1])
    before, after = [], []
    for _ in range(2):
        inner.zero_grad()
        model(ids).pow(2).sum().backward()
        session.averager.record_touched(model)
        inner.step()
        before.append(snapshot(model.module))
        session.averager.step(model)
        after.append(snapshot(model.module))
    return {"before": before, "after": after}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("weighting", ["touched", "uniform"])
def test_touched_weighting_averages_each_row_over_the_ranks_that_trained_it(weighting: str) -> None:
    r0, r1 = run_gloo(touched_worker, world_size=2, args=(weighting,))
    assert same(r0["after"][0], r0["before"][0]) and not same(r0["after"][0], r1["after"][0])  # step 1: local
    a, b = r0["before"][1], r1["before"][1]  # each replica just before the round at step 2
    emb0, emb1, avg = r0["after"][1], r1["after"][1], {k: (a[k] + b[k]) / 2 for k in a}
    assert same(emb0, emb1)  # identical replicas after the round
    rows = emb0["0.weight"]
    assert torch.allclose(rows[1], avg["0.weight"][1]) and torch.allclose(rows[3:], a["0.weight"][3:])
    if weighting == "touched":  # a row only one rank trained keeps that rank's value; dense tensors: the mean
        assert torch.equal(rows[0], a["0.weight"][0]) and torch.equal(rows[2], b["0.weight"][2])
    else:
        assert torch.allclose(rows[0], avg["0.weight"][0]) and torch.allclose(rows[2], avg["0.weight"][2])
    assert torch.allclose(emb0["1.weight"], avg["1.weight"]) and torch.allclose(emb0["1.bias"], avg["1.bias"])


def touched_hierarchical_worker(rank: int, world: int) -> dict[str, Any]:
    """4 ranks, hierarchical:2@1,all@2, touched weighting: at step 1 rank 0 trains embedding row 0 and ranks 1-3
    rows 5-7 (pairs average after it); at step 2 rank r trains row 4 + r, so nobody touches row 0 before the
    global round that follows."""
    torch.manual_seed(0)
    model = ddp_wrap(torch.nn.Sequential(torch.nn.Embedding(8, 3), torch.nn.Linear(3, 1)), sync_buffers=False)
    session = setup_communication(model, parse_comm("none", "hierarchical:2@1,all@2", sync_weighting="touched"))
    assert session.averager is not None
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = []
    for ids in (torch.tensor([0 if rank == 0 else 4 + rank]), torch.tensor([4 + rank])):
        inner.zero_grad()
        model(ids).pow(2).sum().backward()
        session.averager.record_touched(model)
        inner.step()
        snapshots.append(snapshot(model.module))  # before this step's round
        session.averager.step(model)
        snapshots.append(snapshot(model.module))  # after it
    return {"snapshots": snapshots, "rounds": session.stats()["sync_rounds"]}


@pytest.mark.timeout(240)
def test_touched_weighting_counts_a_global_round_from_the_last_global_round() -> None:
    results = run_gloo(touched_hierarchical_worker, world_size=4)
    trained = results[0]["snapshots"][0]["0.weight"][0]  # row 0 after rank 0's own step 1
    torch.manual_seed(0)  # the workers' initial weights
    initial = torch.nn.Embedding(8, 3).weight.detach()[0]
    assert not torch.equal(trained, initial)
    for r in results:
        assert r["rounds"] == {"group2@1": 1, "all@2": 1}
        after_pairs, after_all = r["snapshots"][1]["0.weight"], r["snapshots"][3]["0.weight"]
        # the pair round keeps rank 0's row 0 in pair {0, 1}; pair {2, 3} never trained it
        assert torch.equal(after_pairs[0], trained if r is results[0] or r is results[1] else initial)
        # the global round: only rank 0 touched row 0 since the last global round, so its value stands (a plain
        # mean, or one counting touches since the pair round only, would give (trained + initial) / 2)
        assert torch.equal(after_all[0], trained)
        assert torch.equal(after_all, results[0]["snapshots"][3]["0.weight"])


def test_touched_weighting_needs_model_averaging() -> None:
    with pytest.raises(ValueError, match=r"sync-weighting touched .* needs --sync local"):
        parse_comm("none", "allreduce", sync_weighting="touched")
    with pytest.raises(ValueError, match="choose uniform or touched"):
        parse_comm("none", "local:2", sync_weighting="rows")


def optimizer_state_worker(rank: int, world: int, sync_state: bool) -> dict[str, Any]:
    """Adam under local:2 after 1 warm-up step, each rank on its own data: the optimizer states before and after the
    round at step 3 (and the model after it)."""
    model = ddp_wrap(bn_model(), sync_buffers=False)
    session = setup_communication(model, parse_comm("none", "local:2", sync_warmup_steps=1,
                                                    sync_optimizer_state=sync_state))
    inner = torch.optim.Adam(model.parameters(), lr=0.05)
    optimizer = session.wrap_optimizer(inner)
    gen = torch.Generator().manual_seed(rank)

    def states() -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v.clone() for i, p in enumerate(model.parameters())
                for k, v in inner.state[p].items()}

    history = []
    for _ in range(3):
        x, y = torch.randn(8, 6, generator=gen) * (rank + 1), torch.randn(8, 2, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        inner.step()  # the wrapped optimizer's two halves, apart, to see the state just before the round
        before = states()
        assert session.averager is not None
        session.averager.step(model, inner)
        history.append({"before": before, "after": states(), "model": snapshot(model.module)})
    return {"history": history, "stats": session.stats()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sync_state", [True, False])
def test_sync_optimizer_state_makes_both_ranks_adam_state_identical(sync_state: bool) -> None:
    r0, r1 = run_gloo(optimizer_state_worker, world_size=2, args=(sync_state,))
    (w0, l0, a0), (w1, l1, a1) = r0["history"], r1["history"]
    assert same(w0["after"], w1["after"])  # warm-up step: all-reduced gradients, the same Adam state everywhere
    assert not same(l0["after"], l1["after"])  # local step: each rank's Adam saw its own gradient
    moments = [k for k in a0["before"] if not k.endswith(".step")]
    assert {k.split(".", 1)[1] for k in moments} == {"exp_avg", "exp_avg_sq"}
    assert same(a0["model"], a1["model"])  # the round at step 3 (warm-up 1 + period 2) averages the model
    if sync_state:  # ... and Adam's moments: identical on both ranks, the mean of the two replicas' states
        assert same(a0["after"], a1["after"])
        assert all(torch.allclose(a0["after"][k], (a0["before"][k] + a1["before"][k]) / 2) for k in moments)
        recorded = r0["stats"]["config"]  # what report.json and the checkpoint keep, round-tripping
        assert recorded["sync_optimizer_state"] is True and CommConfig.from_dict(recorded) == parse_comm(
            "none", "local:2", sync_warmup_steps=1, sync_optimizer_state=True)
    else:  # each replica keeps its own optimizer state (PostLocalSGDOptimizer's behaviour)
        assert same(a0["after"], a0["before"]) and not same(a0["after"], a1["after"])


def test_sync_optimizer_state_needs_model_averaging() -> None:
    with pytest.raises(ValueError, match=r"sync-optimizer-state .* needs --sync local"):
        parse_comm("none", "allreduce", sync_optimizer_state=True)


def mismatched_state_worker(rank: int, world: int) -> str:
    """Rank 0's Adam has stepped the model, rank 1's has not: no state tensors on rank 1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    if rank == 0:
        model(torch.ones(1, 3)).sum().backward()
        inner.step()
    averager = ModelAverager(parse_comm("none", "local:2").sync_levels, optimizer_state=True)
    try:
        averager.average(model, level=0, optimizer=inner)
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.timeout(240)
def test_sync_optimizer_state_refuses_ranks_with_different_state() -> None:
    errors = run_gloo(mismatched_state_worker, world_size=2)
    assert all("optimizer state differs between ranks (0 to 4 state tensors)" in e for e in errors), errors


def lr_scale_worker(rank: int, world: int) -> dict[str, Any]:
    """local:4 after 1 warm-up step, lr scale 2: step 1 is a dense step at lr 0.1 (all-reduced gradient), steps 2-3
    are local steps at lr 0.2; the group's lr reads 0.1 throughout."""
    torch.manual_seed(0)
    model = ddp_wrap(torch.nn.Linear(3, 1, bias=False), sync_buffers=False)
    session = setup_communication(model, parse_comm("none", "local:4", sync_warmup_steps=1, sync_lr_scale=2.0))
    optimizer = session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.tensor([[1.0 + rank, 2.0, -1.0]])
    weights, grads, lrs = [model.module.weight.detach().clone()], [], []
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        grads.append(model.module.weight.grad.detach().clone())
        optimizer.step()
        weights.append(model.module.weight.detach().clone())
        lrs.append(optimizer.param_groups[0]["lr"])
    return {"weights": weights, "grads": grads, "lrs": lrs}


@pytest.mark.timeout(240)
def test_sync_lr_scale_multiplies_the_local_steps_only() -> None:
    results = run_gloo(lr_scale_worker, world_size=2)
    for r in results:
        w, g = r["weights"], r["grads"]
        assert torch.allclose(g[0], torch.tensor([[1.5, 2.0, -1.0]]))  # step 1: the mean of both ranks' x
        assert torch.allclose(w[1], w[0] - 0.1 * g[0])  # warm-up: the plain lr
        for step in (1, 2):  # local steps: each rank's own gradient at twice the lr
            assert torch.allclose(w[step + 1], w[step] - 0.2 * g[step])
        assert r["lrs"] == [0.1, 0.1, 0.1]
    assert not torch.allclose(results[0]["weights"][3], results[1]["weights"][3])  # no round before step 4


def test_sync_lr_scale_needs_local_averaging() -> None:
    with pytest.raises(ValueError, match="--sync-lr-scale scales the local steps"):
        parse_comm("none", "allreduce", sync_lr_scale=2.0)
    with pytest.raises(ValueError, match=r"--sync-lr-scale 0\.0 must be > 0"):
        parse_comm("none", "local:2", sync_lr_scale=0.0)


def outer_momentum_worker(rank: int, world: int, beta: float) -> dict[str, Any]:
    """local:2 after 1 warm-up step, SGD lr 0.1 on sum(w·x): each rank's gradient is its constant x."""
    torch.manual_seed(0)
    model = ddp_wrap(torch.nn.Linear(3, 1, bias=False), sync_buffers=False)
    session = setup_communication(model, parse_comm("none", "local:2", sync_warmup_steps=1,
                                                    sync_outer_momentum=beta))
    optimizer = session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.tensor([[1.0 + rank, 2.0, -1.0]])
    weights = [model.module.weight.detach().clone()]
    for _ in range(5):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        weights.append(model.module.weight.detach().clone())
    return {"weights": weights, "state": optimizer.state_dict()["averager"], "stats": session.stats()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_outer_momentum_steps_from_the_anchor_with_slow_momentum(beta: float) -> None:
    results = run_gloo(outer_momentum_worker, world_size=2, args=(beta,))
    xbar = torch.tensor([[1.5, 2.0, -1.0]])
    w = results[0]["weights"]
    assert torch.allclose(w[1], w[0] - 0.1 * xbar)  # the warm-up step; the anchor is taken after it
    # round 1 (step 3): mean = w1 - 0.2·x̄, u = 0.2·x̄: the plain mean whatever beta
    assert torch.allclose(w[3], w[1] - 0.2 * xbar)
    # round 2 (step 5): mean = w3 - 0.2·x̄, u = beta·0.2·x̄ + 0.2·x̄
    assert torch.allclose(w[5], w[3] - (0.2 + beta * 0.2) * xbar)
    for r in results:
        assert torch.equal(r["weights"][3], w[3]) and torch.equal(r["weights"][5], w[5])
    assert not torch.allclose(results[0]["weights"][4], results[1]["weights"][4])  # local step in between
    state = results[0]["state"]
    assert results[0]["stats"]["config"]["sync_outer_momentum"] == beta
    if beta:  # the anchor (resumable) is the weights after the last global round
        assert torch.equal(state["outer"]["anchor"][0], w[5])
        assert torch.allclose(state["outer"]["velocity"][0], (0.2 + beta * 0.2) * xbar)
    else:
        assert "outer" not in state


def test_outer_momentum_needs_model_averaging() -> None:
    with pytest.raises(ValueError, match="--sync-outer-momentum applies to model averaging rounds"):
        parse_comm("none", "allreduce", sync_outer_momentum=0.5)
    with pytest.raises(ValueError, match=r"--sync-outer-momentum 1\.0 must be in \[0, 1\)"):
        parse_comm("none", "local:2", sync_outer_momentum=1.0)
