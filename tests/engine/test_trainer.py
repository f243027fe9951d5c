"""The trainer: exact resume, NaN handling, checkpoint safety, run folder contents, DDP equality."""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mednets import host_memory
from mednets.config import load_config
from mednets.engine.batches import EpochSampler
from mednets.engine.checkpoints import load_model_weights, load_trainer_state
from mednets.engine.distributed import init_distributed, shutdown_distributed
from mednets.engine.trainer import Trainer
from mednets.errors import CheckpointError, TrainingError
from mednets.models import create_model
from mednets.tasks import create_task

SHAPE = (16, 32, 32)
CLASSES = 3


class BlobDataset(torch.utils.data.Dataset):
    """Two cubes of classes 1 and 2 at random places, with a seeded random flip per (epoch, index)."""

    def __init__(self, size: int = 8, nan_at: int | None = None) -> None:
        self.size, self.nan_at, self.epoch = size, nan_at, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 * index + 7)
        label = torch.zeros(SHAPE, dtype=torch.long)
        for cls in (1, 2):
            z, y, x = (torch.rand(3, generator=generator) * torch.tensor([10, 24, 24])).long().tolist()
            label[z : z + 6, y : y + 8, x : x + 8] = cls
        image = label.float()[None] + 0.3 * torch.randn((1, *SHAPE), generator=generator)
        flip = torch.Generator().manual_seed(self.epoch * 100 + index)
        if torch.rand((), generator=flip) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        if index == self.nan_at:
            image[:] = float("nan")
        return {"image": image, "label": label}


def make_config(tmp: Path, **train: object) -> object:
    overrides = [
        "train.precision=fp32",
        "train.channels_last=false",
        "train.batch_size=2",
        "train.max_steps=6",
        "train.val_every=3",
        "train.warmup_steps=2",
        "train.lr=0.01",
        "train.best_metric=val/dice",
        "train.best_mode=max",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


def make_trainer(
    run_dir: Path, config: object, dataset: torch.utils.data.Dataset | None = None, seed: int = 0
) -> Trainer:
    torch.manual_seed(seed)
    model = create_model("unet3d", n_classes=CLASSES, base_channels=4)
    task = create_task("segmentation", num_classes=CLASSES)
    return Trainer(config, model, task, dataset or BlobDataset(), BlobDataset(2), run_dir, progress=False)


def test_epoch_sampler_shards_one_permutation_and_resumes_mid_epoch() -> None:
    whole = list(EpochSampler(10, seed=3))
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(whole) and shards[0] == whole[0::2]
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(0, skip=4)
    assert list(sampler) == whole[4:]
    sampler.set_epoch(1)
    assert list(sampler) != whole


def test_run_folder_has_config_metrics_tensorboard_and_checkpoints(tmp_path: Path) -> None:
    result = make_trainer(tmp_path, make_config(tmp_path)).fit()
    assert result["state"]["step"] == 6
    assert (tmp_path / "config.yaml").is_file() and any((tmp_path / "tensorboard").iterdir())
    for name in ("last", "best"):
        assert {p.name for p in (tmp_path / "checkpoints" / name).iterdir()} == {
            "model.safetensors",
            "trainer_state.pt",
            "config.yaml",
        }
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["train/total"]] == [1, 2, 3, 4, 5, 6]
    assert sum(1 for r in rows if r.get("val/dice")) == 2
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary leftovers


def test_resume_ends_with_the_same_parameters(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    straight = make_trainer(tmp_path / "straight", config)
    straight.fit()

    interrupted = make_trainer(tmp_path / "resumed", config)
    interrupted.fit(stop_after_step=4)
    resumed = make_trainer(tmp_path / "resumed", config, seed=123)  # fresh weights: all must come from the checkpoint
    resumed.fit(resume=True)

    assert resumed.state.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    rows = list(csv.DictReader((tmp_path / "resumed" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["train/total"]] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    config = make_config(tmp_path, val_every=2, batch_size=1)
    # The 5th sample of the first epoch is broken: steps 1-4 succeed, with checkpoints at steps 2 and 4.
    nan_index = list(EpochSampler(8, seed=0))[4]
    nan_step = 5
    trainer = make_trainer(tmp_path, config, dataset=BlobDataset(8, nan_at=nan_index))
    with pytest.raises(TrainingError, match=f"loss became nan at step {nan_step}"):
        trainer.fit()
    saved = load_trainer_state(tmp_path / "checkpoints" / "last")
    assert saved["state"]["step"] == 4
    assert all(
        torch.isfinite(p).all()
        for p in load_model_weights(
            tmp_path / "checkpoints" / "last", create_model("unet3d", n_classes=CLASSES, base_channels=4)
        ).parameters()
    )


def test_corrupt_and_mismatched_checkpoints_name_the_file(tmp_path: Path) -> None:
    make_trainer(tmp_path, make_config(tmp_path, max_steps=3)).fit()
    folder = tmp_path / "checkpoints" / "last"
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*do not match"):
        load_model_weights(folder, create_model("unet3d", n_classes=5, base_channels=4))
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable weights"):
        load_model_weights(folder, create_model("unet3d", n_classes=CLASSES, base_channels=4))
    (folder / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: unreadable trainer state"):
        load_trainer_state(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, run_dir: str, queue: mp.Queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    config = make_config(Path(run_dir), batch_size=2 // world_size, max_steps=5, val_every=100)
    context = init_distributed("cpu")
    torch.manual_seed(0)
    model = create_model("unet3d", n_classes=CLASSES, base_channels=4)
    task = create_task("segmentation", num_classes=CLASSES)
    trainer = Trainer(config, model, task, BlobDataset(), None, run_dir, context=context, progress=False)
    trainer.fit()
    if rank == 0:
        rows = list(csv.DictReader((Path(run_dir) / "metrics.csv").open()))
        queue.put([float(r["train/total"]) for r in rows if r["train/total"]])
    shutdown_distributed()


def _losses(world_size: int, run_dir: Path) -> list[float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_ddp_worker, args=(r, world_size, port, str(run_dir), queue)) for r in range(world_size)
    ]
    for p in processes:
        p.start()
    losses = queue.get(timeout=300)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    return losses


def test_ddp_with_two_processes_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    single = _losses(1, tmp_path / "single")
    distributed = _losses(2, tmp_path / "ddp")
    assert len(single) == len(distributed) == 5
    for a, b in zip(single, distributed, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_lr_multipliers_make_their_own_group_and_typos_are_errors(tmp_path: Path) -> None:
    from mednets.errors import ConfigError

    trainer = make_trainer(tmp_path, make_config(tmp_path, lr_multipliers="{outc: 10}"))
    rates = sorted(group["initial_lr"] for group in trainer.optimizer.param_groups)  # before warm-up scaling
    assert rates == [pytest.approx(0.01), pytest.approx(0.1)]
    with pytest.raises(ConfigError, match="no parameter name contains"):
        make_trainer(tmp_path, make_config(tmp_path, lr_multipliers="{no_such_layer: 10}"))


def test_time_budget_stops_early_and_validates_once(tmp_path: Path) -> None:
    result = make_trainer(tmp_path, make_config(tmp_path, max_minutes=1e-6)).fit()
    assert result["state"]["step"] == 1  # the budget is spent after the first step
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("val/dice")] == [1]
    assert (tmp_path / "checkpoints" / "last").is_dir()


@pytest.mark.parametrize("keep", [True, False])
def test_keep_freed_memory_switches_the_allocator_setting_for_the_fit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    calls: list[tuple[str, int]] = []

    class RecordingLibc:
        def mallopt(self, option: int, value: int) -> int:
            calls.append(("mallopt", option))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("malloc_trim", pad))
            return 1

    monkeypatch.setattr(host_memory, "_LIBC", RecordingLibc())
    config = make_config(tmp_path, max_steps=2, val_every=2, keep_freed_memory=str(keep).lower())
    assert make_trainer(tmp_path, config).fit()["state"]["step"] == 2
    # on: the setting once on entry and the defaults plus a trim on exit; off: glibc left alone
    assert calls == (
        [("mallopt", -4), ("mallopt", -1), ("mallopt", -4), ("mallopt", -1), ("malloc_trim", 0)] if keep else []
    )


def test_a_time_budget_shortens_the_cosine_to_the_steps_it_reaches(tmp_path: Path, monkeypatch) -> None:
    # A fake clock of one second per step: a one-minute budget reaches 60 of the 1000 configured steps.
    monkeypatch.setattr(Trainer, "_elapsed_everywhere", lambda self: float(self.state.step))
    config = make_config(tmp_path, max_steps=1000, max_minutes=1.0, val_every=25)
    result = make_trainer(tmp_path, config).fit()
    assert result["state"]["schedule_steps"] == 60
    assert result["state"]["step"] == 60
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    learning_rates = [float(r["lr"]) for r in rows if r.get("lr")]
    assert learning_rates[-1] < 0.01 * 0.01  # the schedule has ended, not 6% of the way through
    assert max(learning_rates) > 0.9 * 0.01
