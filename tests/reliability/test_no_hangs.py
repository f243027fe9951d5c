"""Every loop makes progress or stops with an error: distributed validation with fewer cases than ranks (issue 24)."""

from __future__ import annotations

import csv
import os
import queue as queue_module
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mednets.config import load_config
from mednets.engine.distributed import init_distributed, shutdown_distributed
from mednets.engine.trainer import Trainer
from mednets.models import create_model
from mednets.tasks import create_task

SHAPE = (16, 32, 32)


class Cubes(torch.utils.data.Dataset):
    """`size` samples: a cube of class 1 at a seeded place in noise."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        label = torch.zeros(SHAPE, dtype=torch.long)
        z, y, x = (torch.rand(3, generator=generator) * torch.tensor([8, 24, 24])).long().tolist()
        label[z : z + 8, y : y + 8, x : x + 8] = 1
        return {"image": label.float()[None] + 0.3 * torch.randn((1, *SHAPE), generator=generator), "label": label}


def _worker(rank: int, world_size: int, port: int, run_dir: str, queue: mp.Queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    config = load_config(None, ["train.precision=fp32", "train.channels_last=false", f"train.batch_size={2 // world_size}",
                                "train.max_steps=2", "train.val_every=1", "train.warmup_steps=1"])  # fmt: skip
    context = init_distributed("cpu")
    torch.manual_seed(0)
    model = create_model("unet3d", n_classes=2, base_channels=4)
    trainer = Trainer(config, model, create_task("segmentation", num_classes=2), Cubes(8), Cubes(1), run_dir,
                      context=context, progress=False)  # fmt: skip
    trainer.fit()
    if rank == 0:
        rows = list(csv.DictReader((Path(run_dir) / "metrics.csv").open()))
        queue.put([float(r["val/loss"]) for r in rows if r.get("val/loss")])
    shutdown_distributed()


def _result(queue: mp.Queue, processes: list, limit_s: float = 300) -> list[float]:
    """Rank 0's losses; fails as soon as a rank dies, or after `limit_s` (a rank waiting forever in a reduction)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1)
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in processes):
                pytest.fail(f"a rank failed: exit codes {[p.exitcode for p in processes]}")
    pytest.fail(f"no result after {limit_s:.0f} s: a rank hangs")


def _validation_losses(world_size: int, run_dir: Path) -> list[float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [context.Process(target=_worker, args=(r, world_size, port, str(run_dir), queue))
                 for r in range(world_size)]  # fmt: skip
    for process in processes:
        process.start()
    try:
        losses = _result(queue, processes)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert all(p.exitcode == 0 for p in processes)
    return losses


@pytest.mark.slow
def test_distributed_validation_with_fewer_cases_than_ranks_ends_and_counts_each_case_once(tmp_path: Path) -> None:
    single = _validation_losses(1, tmp_path / "single")
    distributed = _validation_losses(2, tmp_path / "ddp")  # one validation case, two ranks
    assert len(single) == len(distributed) == 2
    assert distributed == pytest.approx(single, abs=1e-4)
