"""From a config to a trained run folder: data, model and task are assembled here, then `Trainer` runs.

`mednets train CONFIG` calls `run_training`. With no dataset folder in the config or on the
command line, the built-in phantoms are generated into `<run>/phantoms/{train,test}` first.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from mednets.atomic import atomic_write_text
from mednets.config import ExperimentConfig
from mednets.data.dataset import load_dataset
from mednets.data.io import read_volume
from mednets.data.loaders import ensure_phantom_datasets, label_atlas, segmentation_datasets
from mednets.engine.distributed import barrier, init_distributed
from mednets.engine.trainer import Trainer
from mednets.errors import ConfigError
from mednets.models import create_model, get_model_spec
from mednets.tasks import create_task

__all__ = ["run_training", "build_model_for_data", "write_preprocessing"]


def build_model_for_data(config: ExperimentConfig, num_labels: int) -> nn.Module:
    """Create the configured model with its output channels fitted to a dataset of `num_labels` labels.

    `num_labels` counts background: segmentation models get that many outputs, absence-aware models
    (one output per structure) one fewer.
    """
    spec = get_model_spec(config.model.name)
    overrides = dict(config.model.overrides)
    if spec.out_channels_option is not None:
        outputs = num_labels - 1 if spec.task == "absence_segmentation" else num_labels
        overrides.setdefault(spec.out_channels_option, outputs)
    return create_model(config.model.name, **overrides)


def write_preprocessing(
    run_dir: Path, dataset: Any, config: ExperimentConfig, *, grid: tuple[int, ...] | None, patch_size: Any
) -> Path:
    """Record what the model saw, so prediction can prepare any scan the same way (`preprocessing.json`).

    The voxel size the model saw is the training data's spacing (after `data.spacing_mm`), or, for a
    whole-volume grid model, the median field of view divided by the grid. The smallest volume of each
    structure in training lets prediction drop structures painted far smaller than any real one.
    """
    volumes = [read_volume(case.images[0]) for case in dataset.training]
    spacings = np.array([config.data.spacing_mm or v.spacing for v in volumes], dtype=float)
    if grid is not None:
        fields_of_view = np.array([np.array(v.spatial_shape) * np.array(v.spacing) for v in volumes])
        spacing = np.median(fields_of_view, axis=0) / np.array(grid)
    else:
        spacing = np.median(spacings, axis=0)
    record = {
        "orientation": volumes[0].orientation,
        "spacing_mm": [float(s) for s in spacing],
        "grid": list(grid) if grid else None,
        "patch_size": list(patch_size) if patch_size else None,
        "hu_window": list(config.data.hu_window) if config.data.hu_window else None,
        "smallest_training_volume_ml": dataset.smallest_volumes_ml(),
    }
    return atomic_write_text(run_dir / "preprocessing.json", json.dumps(record, indent=2))


def _sliding_window(patch_size: tuple[int, ...]) -> Any:
    """Validation inferer for patch-trained models: gaussian-blended windows over the whole volume."""

    def infer(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(image, patch_size, sw_batch_size=2, predictor=model, overlap=0.25,
                                        mode="gaussian")  # fmt: skip

    return infer


def run_training(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the configured model into `run_dir`; returns the final state and validation metrics.

    Raises:
        ConfigError: the model's task is not one this entry point serves (2D models go to `run_training_2d`).
        DatasetError: the dataset folder breaks the documented format.
    """
    run_dir = Path(run_dir)
    context = init_distributed(config.train.device)
    spec = get_model_spec(config.model.name)
    if spec.spatial_dims == 2:  # histology denoising and 2D segmentation
        from mednets.engine.training2d import run_training_2d

        return run_training_2d(config, run_dir, data_dir=data_dir, resume=resume, progress=progress)
    if spec.task not in ("segmentation", "absence_segmentation") or spec.spatial_dims != 3:
        raise ConfigError("run_training trains 3D segmenters", source="model.name", got=f"{spec.name} ({spec.task})")
    if data_dir is not None:
        config = replace(config, data=replace(config.data, dataset=str(data_dir)))
    if config.data.dataset is None:
        if context.is_main:
            ensure_phantom_datasets(run_dir / "phantoms", config.data.phantoms)
        barrier(context)
        config = replace(config, data=replace(config.data, dataset=str(run_dir / "phantoms" / "train")))
    dataset = load_dataset(config.data.dataset)

    torch.manual_seed(config.train.seed)
    model = build_model_for_data(config, len(dataset.labels))
    grid = tuple(getattr(model, "grid_size", ())) or None
    patch_size = config.data.patch_size
    if grid is None and patch_size is None:
        raise ConfigError(
            "patch-wise models need data.patch_size", source="data.patch_size", expected="e.g. [64, 64, 64]"
        )
    train_set, val_set = segmentation_datasets(
        dataset,
        grid=grid,
        patch_size=None if grid else patch_size,
        hu_window=config.data.hu_window,
        spacing_mm=config.data.spacing_mm,
        val_fraction=config.data.val_fraction,
        split_seed=config.data.split_seed,
        augment=config.data.augment,
        seed=config.train.seed,
        organ_removal=config.data.organ_removal,
        organ_removal_prob=config.data.organ_removal_prob,
    )
    if config.model.init_from_data:
        if not hasattr(model, "init_from_label_frequency"):
            raise ConfigError("this model cannot be initialised from data", source="model.init_from_data",
                              expected="false for this model", got=config.model.name)  # fmt: skip
        atlas = label_atlas(train_set, len(dataset.labels), grid=grid, hu_window=config.data.hu_window,
                            spacing_mm=config.data.spacing_mm)  # fmt: skip
        model.init_from_label_frequency(
            atlas.frequency, floor=config.model.init_prior_floor, smallest_share=atlas.smallest_share
        )
    task = create_task(spec.task, num_classes=len(dataset.labels), **config.loss)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(config.data.dataset) / "dataset.json", run_dir / "dataset.json")
        write_preprocessing(run_dir, dataset, config, grid=grid, patch_size=None if grid else patch_size)
    trainer = Trainer(
        config, model, task, train_set, val_set, run_dir, context=context, progress=progress,
        infer=None if grid else _sliding_window(tuple(patch_size)),
    )  # fmt: skip
    return trainer.fit(resume=resume)
