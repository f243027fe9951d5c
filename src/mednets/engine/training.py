"""From a config to a trained run folder, for every task and dimension: data, model and task meet here.

`mednets train CONFIG` calls `run_training`. Tasks that learn from label maps read a dataset folder
(2D or 3D; with none in the config or on the command line the built-in phantoms are generated into
`<run>/phantoms/{train,test}` first); denoising reads image files (none: the IHC image scikit-image
ships). The run folder gets `preprocessing.json` (`PreprocessingRecord`), so prediction prepares
inputs exactly as training did.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mednets.config import ExperimentConfig
from mednets.data.convert import ensure_phantom_datasets
from mednets.data.dataset import Dataset, load_dataset
from mednets.data.histology import denoising_datasets
from mednets.data.samples import label_atlas, segmentation_datasets
from mednets.engine.distributed import DistributedContext, barrier, init_distributed
from mednets.engine.run import PreprocessingRecord, RunFolder, build_model_for_labels
from mednets.engine.sliding_window import sliding_window
from mednets.engine.trainer import Trainer
from mednets.errors import ConfigError
from mednets.models import ModelSpec, get_model_spec
from mednets.tasks import Task, create_task, task_type

__all__ = ["VALIDATION_OVERLAP", "run_training"]

# Validation windows overlap less than prediction's: the same blender at half the windows.
VALIDATION_OVERLAP = 0.25


def _labelled_dataset(
    config: ExperimentConfig, run_dir: Path, context: DistributedContext, spatial_dims: int
) -> tuple[ExperimentConfig, Dataset]:
    """The config's dataset folder, validated (phantoms of the model's dimension generated when none is given)."""
    if config.data.dataset is None:
        if context.is_main:
            ensure_phantom_datasets(run_dir / "phantoms", config.data.phantoms, spatial_dims=spatial_dims)
        barrier(context)
        config = replace(config, data=replace(config.data, dataset=str(run_dir / "phantoms" / "train")))
    return config, load_dataset(config.data.dataset)


def _validation_inferer(patch_size: tuple[int, ...], precision: str) -> Any:
    """Patch models validate on whole images through the prediction blender."""

    def infer(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        blended = [sliding_window(model, item, patch_size, overlap=VALIDATION_OVERLAP, batch_size=2,
                                  precision="fp32" if precision == "fp32" else "bf16") for item in image]  # fmt: skip
        return torch.stack(blended)

    return infer


@dataclass
class _Setup:
    """What a run needs besides the config: samples, model, task, how inputs were prepared."""

    config: ExperimentConfig
    train_set: Any
    val_set: Any
    model: nn.Module
    task: Task
    record: PreprocessingRecord
    infer: Any = None  # the validation inferer of patch models
    dataset: Dataset | None = None  # the dataset folder of tasks that learn from labels


def _labelled_setup(config: ExperimentConfig, spec: ModelSpec, run_dir: Path, context: DistributedContext) -> _Setup:
    """The setup of a task that learns from label maps (a dataset folder, 2D or 3D)."""
    config, dataset = _labelled_dataset(config, run_dir, context, spec.spatial_dims)
    model = build_model_for_labels(config, len(dataset.labels))
    grid = tuple(getattr(model, "grid_size", spec.input_size)) if spec.whole_image else None
    patch_size = None if grid else config.data.patch_size
    if grid is None and patch_size is None:
        raise ConfigError("patch-wise models need data.patch_size", source="data.patch_size",
                          expected=f"{spec.spatial_dims} sizes, e.g. {list(spec.input_size)}")  # fmt: skip
    data = config.data
    train_set, val_set = segmentation_datasets(
        dataset, grid=grid, patch_size=patch_size, hu_window=data.hu_window, spacing_mm=data.spacing_mm,
        val_fraction=data.val_fraction, split_seed=data.split_seed, augment=data.augment, seed=config.train.seed,
        organ_removal=data.organ_removal, organ_removal_prob=data.organ_removal_prob,
    )  # fmt: skip
    if config.model.init_from_data:
        if not hasattr(model, "init_from_label_frequency") or grid is None:
            raise ConfigError("this model cannot be initialised from data", source="model.init_from_data",
                              expected="false for this model", got=config.model.name)  # fmt: skip
        atlas = label_atlas(train_set, len(dataset.labels), grid=grid, channel_names=dataset.channel_names,
                            hu_window=data.hu_window, spacing_mm=data.spacing_mm)  # fmt: skip
        model.init_from_label_frequency(
            atlas.frequency, floor=config.model.init_prior_floor, smallest_share=atlas.smallest_share
        )
    task = create_task(spec.task, num_classes=len(dataset.labels), **config.loss)
    geometry = dataset.geometry(spacing_mm=data.spacing_mm, grid=grid)
    record = PreprocessingRecord(
        spatial_dims=spec.spatial_dims, task=spec.task, orientation=geometry.orientation,
        spacing_mm=geometry.spacing_mm, grid=list(grid) if grid else None,
        patch_size=list(patch_size) if patch_size else None, hu_window=list(data.hu_window),
        channel_names=dict(dataset.info["channel_names"]),
        smallest_training_volume_ml=dataset.smallest_volumes_ml() if context.is_main else {},
    )  # fmt: skip
    infer = None if grid else _validation_inferer(tuple(patch_size), config.train.precision)
    return _Setup(config, train_set, val_set, model, task, record, infer, dataset)


def _image_setup(config: ExperimentConfig, spec: ModelSpec) -> _Setup:
    """The setup of an image-to-image task (denoising): tiles of image files, or of scikit-image's IHC image."""
    data = config.data
    tile = tuple(data.patch_size or spec.input_size)
    train_set, val_set = denoising_datasets(
        data.dataset, tile_size=tile[0], noise=data.noise, val_fraction=data.val_fraction,
        split_seed=data.split_seed, min_tissue=data.min_tissue,
        stain_scale=data.stain_augment if data.augment else 0.0, augment=data.augment, seed=config.train.seed,
    )  # fmt: skip
    record = PreprocessingRecord(spatial_dims=spec.spatial_dims, task=spec.task, patch_size=list(tile),
                                 channel_names={"0": "RGB"})  # fmt: skip
    return _Setup(config, train_set, val_set, build_model_for_labels(config, None), create_task(spec.task, **config.loss),
                  record)  # fmt: skip


def run_training(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the configured model into `run_dir`; returns the final state and validation metrics.

    A folder that already holds a run is continued with `resume`, or replaced with `overwrite` (its
    run files go first; generated phantoms stay); otherwise it is refused, so no run is ever silently
    replaced.

    Raises:
        ConfigError: `run_dir` holds a run and neither `resume` nor `overwrite` is set; a patch-wise
            model without `data.patch_size`, or an impossible option.
        DatasetError, InvalidInputError: unusable data.
    """
    run_dir = Path(run_dir)
    existing = RunFolder(run_dir).run_files()
    if existing and not resume:
        if not overwrite:
            raise ConfigError("the folder already holds a run: continue it with --resume or replace it with "
                              "--overwrite", source=str(run_dir), got=sorted(p.name for p in existing))  # fmt: skip
        RunFolder(run_dir).remove_run_files()
    context = init_distributed(config.train.device)
    spec = get_model_spec(config.model.name)
    if data_dir is not None:
        config = replace(config, data=replace(config.data, dataset=str(data_dir)))
    torch.manual_seed(config.train.seed)
    if task_type(spec.task).uses_labels:
        setup = _labelled_setup(config, spec, run_dir, context)
    else:
        setup = _image_setup(config, spec)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if setup.dataset is not None:
            shutil.copyfile(setup.dataset.root / "dataset.json", run_dir / "dataset.json")
        setup.record.write(run_dir / "preprocessing.json")
    trainer = Trainer(setup.config, setup.model, setup.task, setup.train_set, setup.val_set, run_dir, context=context,
                      progress=progress, infer=setup.infer, spatial_dims=spec.spatial_dims)  # fmt: skip
    return trainer.fit(resume=resume)
