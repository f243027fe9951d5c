"""One training loop for every task: config in; checkpoints, metrics and TensorBoard events out.

The loop knows no model: a `Task` turns outputs into losses and metrics. It runs AdamW with linear
warm-up and cosine decay, gradient accumulation and clipping, bf16 autocast (CPU and CUDA) or fp16
with a GradScaler (CUDA), channels-last, gradient checkpointing, a step and a time budget, and DDP
when launched by `torchrun`; freed host memory is kept for reuse while it trains
(`train.keep_freed_memory`, `mednets.host_memory`: no page faults on every step's activations).
Resuming restores weights, optimizer, scheduler, RNG states and the position in the data order, so
a resumed run ends where an uninterrupted one would.

Run folder: `config.yaml`, `metrics.csv`, `tensorboard/`, `checkpoints/last/`, `checkpoints/best/`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mednets.atomic import atomic_write_text
from mednets.config import ExperimentConfig, save_config
from mednets.engine.batches import EpochBatches, EpochSampler, training_loader
from mednets.engine.checkpoints import load_model_weights, load_trainer_state, recover_checkpoint, save_checkpoint
from mednets.engine.distributed import DistributedContext, all_reduce_sum, barrier
from mednets.errors import CheckpointError, ConfigError, TrainingError
from mednets.host_memory import reuse_freed_memory
from mednets.models.base import memory_format_for
from mednets.tasks import Task

__all__ = ["Trainer", "TrainState", "warmup_cosine", "BUDGET_PACE_STEPS"]

BUDGET_PACE_STEPS = 20  # steps before the pace is trusted to fit the schedule to a time budget


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_seconds: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    schedule_steps: int | None = None  # where the cosine ends: `max_steps`, or the steps the time budget reaches
    pace_mark: tuple[int, float] | None = None  # (step, elapsed seconds) from which the pace is measured


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up from 0 to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _parameter_groups(model: nn.Module, lr: float, multipliers: Mapping[str, float]) -> list[dict[str, Any]]:
    """Optimizer groups: parameters whose name contains a key of `multipliers` get `lr * multiplier`.

    Raises:
        ConfigError: a key matches no parameter (a typo would otherwise be silently ignored).
    """
    groups: dict[float, list[nn.Parameter]] = {}
    matched = set()
    for name, parameter in model.named_parameters():
        keys = [key for key in multipliers if key in name]
        matched.update(keys)
        factor = float(multipliers[keys[-1]]) if keys else 1.0
        groups.setdefault(factor, []).append(parameter)
    unmatched = sorted(set(multipliers) - matched)
    if unmatched:
        raise ConfigError("no parameter name contains this key", source="train.lr_multipliers", got=unmatched)
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items()]


def _rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "rest": list(numpy_state[2:])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"]["keys"].numpy().astype(np.uint32), *states["numpy"]["rest"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _to_device(batch: Mapping[str, Any], device: torch.device, memory_format: torch.memory_format | None) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == "image" and memory_format is not None:
                value = value.contiguous(memory_format=memory_format)
        moved[key] = value
    return moved


class MetricsLog:
    """`metrics.csv` (rewritten atomically, so it is never half-written) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.path = run_dir / "metrics.csv"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            with self.path.open(encoding="utf-8") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.append({"step": step, **values})
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """Trains `model` on `train_set` for `task` as `config.train` says, writing into `run_dir`.

    Args:
        config: the resolved experiment config (saved with every checkpoint).
        model: the model (not yet wrapped in DDP; the trainer moves and wraps it).
        task: turns outputs into losses and metrics.
        train_set: map-style dataset of sample dicts; an optional `set_epoch(epoch)` method lets
            random augmentation depend on the epoch only (needed for exact resume).
        val_set: validation samples (whole volumes / tiles), or None.
        run_dir: output folder.
        context: distributed context (`init_distributed()`); single process by default.
        progress: show a progress bar (main process only).
        infer: how to run the model on a validation image (default: one forward pass); e.g. a
            sliding-window inferer for patch-trained models.
        spatial_dims: 2 or 3, for the channels-last layout (default: the model's `spatial_dims`, else 2).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        model: nn.Module,
        task: Task,
        train_set: Dataset,
        val_set: Dataset | None,
        run_dir: str | Path,
        *,
        context: DistributedContext | None = None,
        progress: bool = True,
        infer: Any = None,
        spatial_dims: int | None = None,
    ) -> None:
        if config.train.batch_size is None:  # not planned (a denoising or hand-built run): two samples
            config = replace(config, train=replace(config.train, batch_size=2))
        self.config, self.task, self.train_set, self.val_set = config, task, train_set, val_set
        self.run_dir = Path(run_dir)
        self.context = context or DistributedContext()
        self.progress = progress
        self.infer = infer
        settings = config.train
        self.device = self.context.device
        if settings.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("fp16 needs CUDA (use bf16 on CPU)", source="train.precision", expected="bf16 or fp32")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
        spatial_dims = spatial_dims or getattr(model, "spatial_dims", 2)
        self.memory_format = memory_format_for(spatial_dims) if settings.channels_last else None
        if hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(settings.gradient_checkpointing)
        model = model.to(self.device)
        if self.memory_format is not None:
            model = model.to(memory_format=self.memory_format)
        self.model = model
        self.train_model = model
        if self.context.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(
            _parameter_groups(model, settings.lr, settings.lr_multipliers), lr=settings.lr,
            weight_decay=settings.weight_decay,
        )  # fmt: skip
        self.state = TrainState()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, settings.warmup_steps, self._horizon())
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.precision == "fp16")
        self.sampler = EpochSampler(
            len(train_set), seed=settings.seed, rank=self.context.rank, world_size=self.context.world_size
        )
        if len(self.sampler) < settings.batch_size:  # drop_last would leave every epoch empty: a loop without steps
            raise ConfigError("fewer training samples per process than the batch size: no batch can be formed",
                              source="train.batch_size", expected=f"at most {len(self.sampler)}",
                              got=settings.batch_size)  # fmt: skip
        self.data_seconds = 0.0  # this step's wait for its batches (logged: loading must hide behind compute)
        self.saved_step: int | None = None  # the step of checkpoints/last, once there is one

    def _horizon(self) -> int:
        return self.state.schedule_steps or self.config.train.max_steps

    def _fit_schedule_to_budget(self, budget: float | None) -> None:
        """End the cosine where the time budget does, at the pace measured since `BUDGET_PACE_STEPS`.

        Start-up (the first steps, the loader's first batches) is left out of the pace; every later
        estimate replaces the last, in either direction and never beyond `max_steps`, so one slow
        stretch (another job on the machine) does not cut the schedule for good. The same on every
        rank (the largest elapsed time decides).
        """
        step = self.state.step
        if budget is None or step < BUDGET_PACE_STEPS:
            return
        elapsed = self._elapsed_everywhere()
        if self.state.pace_mark is None:
            self.state.pace_mark = (step, elapsed)
            return
        mark_step, mark_seconds = self.state.pace_mark
        if step <= mark_step:
            return
        pace = (elapsed - mark_seconds) / (step - mark_step)  # seconds per step, validation included
        reachable = step + int(max(0.0, budget - elapsed) / max(pace, 1e-9))
        self.state.schedule_steps = max(step + 1, min(self.config.train.max_steps, reachable))

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "state": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_states(),
        }

    def save(self, name: str) -> None:
        """Write `checkpoints/<name>` (main process only)."""
        if self.context.is_main:
            save_checkpoint(self.checkpoint_dir / name, self.model, self._trainer_state(), self.config)
        if name == "last":
            self.saved_step = self.state.step

    def _what_is_kept(self) -> str:
        """What a failed step leaves behind, for its error message (never a checkpoint that does not exist)."""
        if self.saved_step is None:
            return f"no checkpoint was written before it (the first comes at step {self.config.train.val_every})"
        return f"the last good checkpoint (step {self.saved_step}) is kept"

    def resume(self) -> None:
        """Continue from `checkpoints/last`: weights, optimizer, scheduler, RNG, data position."""
        folder = self.checkpoint_dir / "last"
        recover_checkpoint(folder)
        if not folder.is_dir():
            raise CheckpointError("nothing to resume", source=str(folder), expected="a checkpoint from an earlier run")
        load_model_weights(folder, self.model)
        saved = load_trainer_state(folder)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            self.state = TrainState(**saved["state"])
            _restore_rng_states(saved["rng"])
            self.saved_step = self.state.step
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"trainer state does not fit this run ({error})", source=str(folder)) from error

    # ------------------------------------------------------------------ data
    def _batches(self) -> Iterator[dict[str, Any]]:
        """Training batches forever, epoch after epoch, starting at the saved position.

        One loader serves every epoch, so its worker processes (`data.num_workers`) stay alive and keep
        `prefetch_factor` batches ready while the model computes. The sampler tells the dataset each
        sample's epoch with its index (`EpochIndexed`): workers hold their own copy of the dataset,
        which the trainer cannot reach.
        """
        settings = self.config.train
        batches = EpochBatches(self.sampler, settings.batch_size, len(self.train_set), self.state.epoch,
                               self.state.batch_in_epoch)  # fmt: skip
        loader = training_loader(self.train_set, batches, self.config.data.num_workers, self.device)
        per_epoch = batches.per_epoch
        for batch in loader:
            self.state.batch_in_epoch += 1
            if self.state.batch_in_epoch == per_epoch:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            yield _to_device(batch, self.device, self.memory_format)

    # ------------------------------------------------------------------ steps
    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float]:
        settings = self.config.train
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(settings.accumulation_steps):
            waited = time.perf_counter()
            batch = next(batches)
            self.data_seconds += time.perf_counter() - waited
            last = micro == settings.accumulation_steps - 1
            sync = self.train_model.no_sync() if self.context.enabled and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    outputs = self.train_model(batch["image"])
                terms = self.task.loss(outputs, batch)
                self.scaler.scale(terms["total"] / settings.accumulation_steps).backward()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / settings.accumulation_steps
        reduced = self._mean_over_ranks(sums)
        if not math.isfinite(reduced["total"]):
            raise TrainingError(
                f"loss became {reduced['total']} at step {self.state.step + 1}; {self._what_is_kept()}",
                source=str(self.checkpoint_dir / "last"),
                got={k: v for k, v in reduced.items() if not math.isfinite(v)},
            )
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip or math.inf)
        if not math.isfinite(float(norm)) and not self.scaler.is_enabled():  # fp16's scaler skips such steps itself
            raise TrainingError(
                f"gradient norm became {float(norm)} at step {self.state.step + 1} with a finite loss; "
                f"{self._what_is_kept()}",
                source=str(self.checkpoint_dir / "last"),
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state.step += 1
        return reduced

    def _mean_over_ranks(self, values: Mapping[str, float]) -> dict[str, float]:
        keys = sorted(values)
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        packed = all_reduce_sum(packed, self.context) / self.context.world_size
        return dict(zip(keys, packed.tolist(), strict=True))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean validation loss and task metrics over the validation set (all ranks), as `val/<name>`."""
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        self.model.eval()
        rng = _rng_states()  # validation must not shift the training's random stream (exact resume)
        indices = list(range(self.context.rank, len(self.val_set), self.context.world_size))
        # A rank without cases of its own (fewer cases than ranks) scores case 0 with weight 0, so that
        # every rank reduces the same metric names; otherwise the reduction below would wait forever.
        weight = 1.0 if indices else 0.0
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for index in indices or [0]:
            batch = _to_device(torch.utils.data.default_collate([self.val_set[index]]), self.device, self.memory_format)
            with self._autocast():
                outputs = self.infer(self.model, batch["image"]) if self.infer else self.model(batch["image"])
            values = {"loss": self.task.loss(outputs, batch)["total"].reshape(1)}
            values.update(self.task.batch_metrics(outputs, batch))
            for key, value in values.items():
                value = value.detach().double().flatten()
                defined = ~torch.isnan(value)
                sums[key] = sums.get(key, 0.0) + weight * float(value[defined].sum())
                counts[key] = counts.get(key, 0.0) + weight * float(defined.sum())
        _restore_rng_states(rng)
        keys = sorted(sums)
        packed = torch.tensor([[sums[k], counts[k]] for k in keys], dtype=torch.float64, device=self.device)
        packed = all_reduce_sum(packed, self.context)
        return {f"val/{k}": (s / c if c else float("nan")) for k, (s, c) in zip(keys, packed.tolist(), strict=True)}

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self.state.best_value
        if best is None:
            return True
        return value > best if self.config.train.best_mode == "max" else value < best

    def _validate_and_checkpoint(self, log: MetricsLog) -> dict[str, float]:
        metrics = self.validate()
        if metrics:
            log.log(self.state.step, metrics)
            value = metrics.get(self.config.train.best_metric)
            if value is not None and self._is_better(value):
                self.state.best_value, self.state.best_step = value, self.state.step
                self.save("best")
        self.save("last")
        barrier(self.context)
        return metrics

    # ------------------------------------------------------------------ loop
    def fit(self, *, resume: bool = False, stop_after_step: int | None = None) -> dict[str, Any]:
        """Train until `max_steps`, the time budget, or `stop_after_step` (a simulated interruption).

        Returns:
            The final state and the last validation metrics.
        """
        keep = reuse_freed_memory() if self.config.train.keep_freed_memory else contextlib.nullcontext()
        with keep:  # every step's activations reuse the last step's memory: no page faults
            return self._fit(resume=resume, stop_after_step=stop_after_step)

    def _fit(self, *, resume: bool, stop_after_step: int | None) -> dict[str, Any]:
        settings = self.config.train
        if resume:
            self.resume()
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
        log = MetricsLog(self.run_dir, self.context.is_main, self.state.step)
        batches = self._batches()
        budget = None if settings.max_minutes is None else settings.max_minutes * 60
        start = time.perf_counter() - self.state.elapsed_seconds
        bar = _progress_bar(self.progress and self.context.is_main, settings.max_steps, self.state.step)
        metrics: dict[str, float] = {}
        validated_step = None
        stop = stop_after_step if stop_after_step is not None else settings.max_steps
        try:
            while self.state.step < min(stop, self._horizon()):
                step_start = time.perf_counter()
                self.data_seconds = 0.0
                terms = self._train_step(batches)
                self.state.elapsed_seconds = time.perf_counter() - start
                log.log(
                    self.state.step,
                    {
                        **{f"train/{k}": v for k, v in terms.items()},
                        "lr": self.scheduler.get_last_lr()[0],
                        "seconds_per_step": time.perf_counter() - step_start,
                        "data_wait_seconds": self.data_seconds,
                    },
                )
                bar.update(1)
                bar.set_postfix(loss=f"{terms['total']:.4f}", refresh=False)
                out_of_time = budget is not None and self._elapsed_everywhere() >= budget
                if (
                    self.state.step in (BUDGET_PACE_STEPS, 2 * BUDGET_PACE_STEPS)
                    or self.state.step % settings.val_every == 0
                ):
                    self._fit_schedule_to_budget(budget)  # before the checkpoint, which keeps the horizon
                if out_of_time or self.state.step % settings.val_every == 0:
                    metrics = self._validate_and_checkpoint(log) or metrics
                    validated_step = self.state.step
                if out_of_time:
                    break
            if validated_step != self.state.step:  # the final step always ends validated and saved
                metrics = self._validate_and_checkpoint(log) or metrics
        finally:
            batches.close()  # the loader's worker processes end here
            bar.close()
            log.close()
        return {"state": asdict(self.state), "metrics": metrics}

    def _elapsed_everywhere(self) -> float:
        """The largest elapsed time over ranks, so that every rank stops at the same step."""
        elapsed = torch.tensor([self.state.elapsed_seconds], dtype=torch.float64, device=self.device)
        if self.context.enabled:
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        return float(elapsed)


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)
