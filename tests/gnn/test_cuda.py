"""The model, trainer and DGC hook on a CUDA device give what the CPU gives (marked ``cuda``: skipped without one).

These need only torch with CUDA (no RAPIDS); the cuDF / cuGraph paths carry the ``gpu`` marker instead.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gnn.comm import CommConfig, DGCConfig, setup_communication
from gnn.loss import MaxMarginLoss
from gnn.models import build_model
from gnn.trainer import TrainConfig, Trainer, compute_loss, embed_items
from tests.gnn.test_training import setup

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("kind", ["pinsage", "graphsage"])
def test_forward_and_loss_on_cuda_equal_the_cpu(kind: str) -> None:
    config, sampler, batcher = setup(kind)
    cpu_model = build_model(config, seed=0)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    batch = batcher(0, 0)
    loss_cpu = compute_loss(cpu_model, MaxMarginLoss(0.1), batch)
    loss_gpu = compute_loss(gpu_model, MaxMarginLoss(0.1), batch.to("cuda"))
    assert loss_gpu.device.type == "cuda"
    assert abs(float(loss_cpu.detach()) - float(loss_gpu.detach())) < 1e-4
    ids = np.arange(40)  # community_store() has 40 items
    cpu = embed_items(cpu_model, sampler, ids, batch_size=16)
    gpu = embed_items(gpu_model, sampler, ids, batch_size=16)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)


def test_trainer_on_cuda_follows_the_cpu_trajectory() -> None:
    config, _, batcher = setup("pinsage")
    losses = {}
    for device in ("cpu", "cuda"):
        model = build_model(config, seed=0).to(device)
        cfg = TrainConfig(epochs=2, lr=1e-2, mode="sync", device=device, log_every=0)
        trainer = Trainer(model, batcher, config=cfg, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2))
        losses[device] = [r.mean_loss for r in trainer.fit()]
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-3, atol=1e-4)


@pytest.fixture
def nccl_world_of_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compression", ["none", "dgc", "fp16"])
def test_ddp_hooks_run_on_nccl(nccl_world_of_one: None, compression: str) -> None:
    config, _, batcher = setup("pinsage")
    model = torch.nn.parallel.DistributedDataParallel(build_model(config, seed=0).cuda(), device_ids=[0])
    session = setup_communication(model, CommConfig(compression=compression))
    cfg = TrainConfig(epochs=1, mode="sync", device="cuda", log_every=0)
    report = Trainer(model, batcher, config=cfg).fit()[0]
    assert np.isfinite(report.mean_loss) and report.steps == batcher.n_batches
    traffic = session.traffic.as_dict()
    assert traffic["steps"] == report.steps  # every step went through the hook and was counted


@pytest.mark.parametrize("options", [
    {"shared_moment_tensors": ("input.item_id.weight",), "shared_moment_by": "rows-log8",
     "shared_moment_estimate": "owners", "adam_masking": True},
    {"owner_tensors": ("input.item_id.weight",)},
    {"local_tensors": ("input.item_id.weight",), "local_period": 2, "local_merge": "touches"},
])
def test_dgc_adam_correction_options_run_on_nccl(nccl_world_of_one: None, options: dict[str, object]) -> None:
    """The shared moment, the owner scale and the local table exchange all-gather their counts, bitmaps and rows
    as tensors on the gradient's device (NCCL takes no CPU tensors); the warm-up's first stage sends bitmaps."""
    config, _, batcher = setup("pinsage")
    model = torch.nn.parallel.DistributedDataParallel(build_model(config, seed=0).cuda(), device_ids=[0])
    dgc = DGCConfig(correction="adam", momentum=0.0, warmup_sparsities=(0.75,), warmup_unit="step",
                    warmup_stage_length=2, **options)  # type: ignore[arg-type]
    session = setup_communication(model, CommConfig(compression="dgc", dgc=dgc))
    optimizer = session.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-2))
    cfg = TrainConfig(epochs=1, mode="sync", device="cuda", log_every=0)
    report = Trainer(model, batcher, config=cfg, optimizer=optimizer).fit()[0]  # the wrapper runs the local rounds
    assert np.isfinite(report.mean_loss) and report.steps == batcher.n_batches
    assert session.traffic.as_dict()["steps"] == report.steps
    assert all(p.is_cuda and bool(torch.isfinite(p).all()) for p in model.parameters())
