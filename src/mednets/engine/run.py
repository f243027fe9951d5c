"""What a run folder is, in one place: its paths, its preprocessing record and its trained model.

A run folder is what `mednets train` writes::

    config.yaml            the resolved experiment config
    dataset.json           the training dataset's labels and channel names (segmentation runs)
    preprocessing.json     how training prepared its inputs (`PreprocessingRecord`)
    metrics.csv            one row per logged step
    checkpoints/{best,last}/   model.safetensors, trainer_state.pt, config.yaml

Prediction, denoising, export, evaluation and the run report all open runs through `RunFolder`, so
none of them can prepare an input differently from training.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mednets.config import ExperimentConfig, load_config
from mednets.data.intensity import DEFAULT_HU_WINDOW, ChannelNormalisation
from mednets.engine.checkpoints import (
    load_checkpoint_config,
    load_model_weights,
    load_trainer_state,
    recover_checkpoint,
)
from mednets.errors import CheckpointError
from mednets.models import ModelSpec, create_model, get_model_spec
from mednets.models.base import memory_format_for
from mednets.tasks import create_task, task_type
from mednets.tasks.calibration import PresenceCalibration

__all__ = ["PreprocessingRecord", "RunFolder", "build_model_for_labels", "build_model_head"]


@dataclass
class PreprocessingRecord:
    """How training prepared its inputs; prediction prepares every input the same way.

    Attributes:
        spatial_dims: 2 or 3.
        task: the model's task (`mednets.models.registry.TASKS`).
        orientation: axis codes the model saw (3D volumes are reoriented to it), or None.
        spacing_mm: voxel size the model saw (3D), or None to keep the input's.
        grid: whole-image models' fixed input size, else None.
        patch_size: the window size of patch-wise models (training patches, prediction windows).
        hu_window: the CT window of runs made before planning (their one normalisation rule).
        channel_names: {"0": name, ...} of the input channels (`dataset.json`).
        normalisation: one `ChannelNormalisation` (as a dict) per input channel; None in older runs.
        crop: inputs are cropped to their body box before the model sees them (whole-image models).
        smallest_training_volume_ml: {structure: smallest volume in training, mL} (the volume floor).
    """

    spatial_dims: int = 3
    task: str = "segmentation"
    orientation: str | None = None
    spacing_mm: list[float] | None = None
    grid: list[int] | None = None
    patch_size: list[int] | None = None
    hu_window: list[float] | None = None
    channel_names: dict[str, str] = field(default_factory=lambda: {"0": "CT"})
    smallest_training_volume_ml: dict[str, float] = field(default_factory=dict)
    normalisation: list[dict[str, Any]] | None = None
    crop: bool = False

    def rules(self) -> list[ChannelNormalisation]:
        """Each input channel's normalisation; runs made before planning: their CT window, else per-image rescaling."""
        if self.normalisation is not None:
            return [ChannelNormalisation.from_dict(rule) for rule in self.normalisation]
        names = [self.channel_names[key] for key in sorted(self.channel_names, key=int)]
        return [ChannelNormalisation.window(self.hu_window or DEFAULT_HU_WINDOW) if name.upper() == "CT"
                else ChannelNormalisation("rescale") for name in names]  # fmt: skip

    @property
    def window(self) -> tuple[int, ...] | None:
        """The input size one forward pass sees: the grid of whole-image models, else the patch."""
        size = self.grid or self.patch_size
        return tuple(int(s) for s in size) if size else None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "preprocessing.json") -> PreprocessingRecord:
        """Read a record, including those of older runs (`tile_size` for `patch_size`).

        Raises:
            CheckpointError: a key that no version of the record has.
        """
        data = dict(data)
        if "tile_size" in data:  # denoising runs before the redesign
            tile = data.pop("tile_size")
            data.setdefault("patch_size", [tile, tile] if tile else None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError("unknown key in preprocessing record", source=source, expected=sorted(known),
                                  got=unknown)  # fmt: skip
        return cls(**data)


# `out_channels` and the seed names `create_model` still accepts for it.
_OUT_CHANNEL_NAMES = ("out_channels", "n_classes", "num_classes", "num_structures")


def build_model_for_labels(config: ExperimentConfig, num_labels: int | None) -> nn.Module:
    """Create the configured model with its output channels fitted to `num_labels` labels (with background).

    The task decides how many outputs that is (`Task.out_channels`), unless `model.overrides` sets
    them (`out_channels`, or a seed name of it such as `n_classes`), which the task must accept
    (`Task.check_head`: 1 is a binary head for a dataset of one structure). Denoising runs
    (`num_labels` None) keep the model's own output.

    Raises:
        ConfigError: the overridden output channels do not fit the labels.
    """
    overrides = dict(config.model.overrides)
    if num_labels is not None and not any(name in overrides for name in _OUT_CHANNEL_NAMES):
        overrides["out_channels"] = build_model_head(config, num_labels)
    return create_model(config.model.name, **overrides)


def build_model_head(config: ExperimentConfig, num_labels: int) -> int:
    """The output channels the configured model gets for `num_labels` labels (with background).

    Raises:
        ConfigError: `model.overrides` sets output channels that do not fit the labels.
    """
    task = create_task(get_model_spec(config.model.name).task, num_classes=num_labels)
    given = [config.model.overrides[name] for name in _OUT_CHANNEL_NAMES if name in config.model.overrides]
    if given:
        task.check_head(given[0])
        return int(given[0])
    return task.out_channels


class RunFolder:
    """A run folder made by `mednets train`: paths, config, labels, preprocessing and model loading.

    Args:
        path: the run folder.
    """

    CONFIG = "config.yaml"
    DATASET = "dataset.json"
    PREPROCESSING = "preprocessing.json"
    PLAN = "plan.json"
    METRICS = "metrics.csv"
    CALIBRATION = "calibration.json"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def dataset_path(self) -> Path:
        return self.path / self.DATASET

    @property
    def preprocessing_path(self) -> Path:
        return self.path / self.PREPROCESSING

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_dir(self, checkpoint: str = "best") -> Path:
        """`checkpoints/<checkpoint>`, else `checkpoints/last` (a run stopped before its first validation).

        Raises:
            CheckpointError: neither exists.
        """
        for folder in (self.checkpoints / checkpoint, self.checkpoints / "last"):
            recover_checkpoint(folder)
            if folder.is_dir():
                return folder
        raise CheckpointError("no checkpoint in run folder", source=str(self.checkpoints),
                              expected=f"{checkpoint}/ or last/ written by `mednets train`")  # fmt: skip

    def config(self, checkpoint: str | None = None) -> ExperimentConfig:
        """The experiment config: the checkpoint's own when `checkpoint` is given, else the run's `config.yaml`."""
        if checkpoint is not None:
            return load_checkpoint_config(self.checkpoint_dir(checkpoint))
        if not self.config_path.is_file():
            raise CheckpointError("run folder has no config", source=str(self.config_path),
                                  expected="a run made by `mednets train`")  # fmt: skip
        return load_config(self.config_path)

    def spec(self, checkpoint: str = "best") -> ModelSpec:
        """The registry entry of the run's model."""
        return get_model_spec(self.config(checkpoint).model.name)

    @property
    def labels(self) -> dict[str, int] | None:
        """{name: id} of the training labels, background included; None for runs without labels (denoising)."""
        if not self.dataset_path.is_file():
            return None
        info = self._json(self.dataset_path)
        return {str(name): int(value) for name, value in sorted(info["labels"].items(), key=lambda item: item[1])}

    @property
    def structures(self) -> dict[str, int]:
        """{name: id} of the labelled structures, background excluded, in id order."""
        return {name: value for name, value in (self.labels or {}).items() if value != 0}

    @property
    def preprocessing(self) -> PreprocessingRecord:
        """The preprocessing record (`preprocessing.json`).

        Raises:
            CheckpointError: the file is missing or unreadable.
        """
        if not self.preprocessing_path.is_file():
            raise CheckpointError("run folder is incomplete", source=str(self.preprocessing_path),
                                  expected="a run made by `mednets train`")  # fmt: skip
        return PreprocessingRecord.from_dict(self._json(self.preprocessing_path), str(self.preprocessing_path))

    def trainer_state(self, checkpoint: str = "last") -> dict[str, Any]:
        """The trainer state of a checkpoint (loaded with `weights_only=True`)."""
        return load_trainer_state(self.checkpoint_dir(checkpoint))

    def build_model(self, checkpoint: str = "best", config: ExperimentConfig | None = None) -> nn.Module:
        """The run's model, untrained, fitted to its labels (`config`: the checkpoint's, when already read)."""
        labels = self.labels
        config = config or self.config(checkpoint)
        return build_model_for_labels(config, None if labels is None else len(labels))

    def load_model(self, checkpoint: str = "best", device: str | torch.device = "cpu") -> nn.Module:
        """The trained model of `checkpoint` (best, falling back to last), in eval mode on `device`.

        Raises:
            CheckpointError: no checkpoint, missing run files, or weights that do not fit.
        """
        folder = self.checkpoint_dir(checkpoint)
        config = load_checkpoint_config(folder)
        spec = get_model_spec(config.model.name)
        if task_type(spec.task).uses_labels and not self.dataset_path.is_file():
            raise CheckpointError("run folder is incomplete", source=str(self.dataset_path),
                                  expected="a run made by `mednets train`")  # fmt: skip
        model = self.build_model(checkpoint, config)
        load_model_weights(folder, model)
        model = model.to(memory_format=memory_format_for(spec.spatial_dims))  # the layout of the fast bf16 kernels
        return model.to(torch.device(device)).eval()

    def has_checkpoint(self) -> bool:
        """Whether the run has saved `checkpoints/last` (recovering one a crash left mid-swap)."""
        try:
            return self.checkpoint_dir("last").is_dir()
        except CheckpointError:
            return False

    @property
    def calibration_path(self) -> Path:
        return self.path / self.CALIBRATION

    @property
    def calibration(self) -> PresenceCalibration | None:
        """The presence calibration fitted on validation after training (`engine.calibration`), or None."""
        if not self.calibration_path.is_file():
            return None
        return PresenceCalibration.from_dict(self._json(self.calibration_path), source=str(self.calibration_path))

    def run_files(self) -> list[Path]:
        """The files and folders of a training run that exist here, checkpoints first (config, records, metrics)."""
        names = ("checkpoints", self.CONFIG, self.DATASET, self.PREPROCESSING, self.METRICS, self.CALIBRATION,
                 "tensorboard")  # fmt: skip
        return [self.path / name for name in names if (self.path / name).exists()]

    def remove_run_files(self) -> None:
        """Remove the run's files (generated data such as phantoms stays), for a run that replaces this one.

        The weights go first: a crash midway leaves a run that cannot predict, never old weights beside
        new records."""
        for path in self.run_files():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    @staticmethod
    def _json(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"unreadable run file ({error})", source=str(path)) from error
