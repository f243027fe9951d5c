"""From a config to a trained 2D run: histology denoising and 2D segmentation (`run_training` dispatches here).

Denoising (the histology autoencoders): `data.dataset` is an image file or folder; None uses the
built-in IHC image of scikit-image. Tiles of `data.tile_size` with `data.noise`; validation PSNR and
SSIM go to `metrics.csv`.

2D segmentation (UNet): `data.dataset` is a 2D dataset folder (`mednets.data.dataset2d`); None
generates phantom axial slices into `<run>/phantoms2d/{train,test}` first. Patches of
`data.patch_size` (else `data.tile_size` squared); validation Dice on whole images.

The run folder also gets `preprocessing.json` (and, for segmentation, the dataset's `dataset.json`),
so prediction prepares images exactly as training did.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mednets.atomic import atomic_write_text
from mednets.config import ExperimentConfig
from mednets.data.dataset2d import load_dataset_2d, write_phantom_slice_datasets
from mednets.data.histology import denoising_datasets
from mednets.data.loaders2d import segmentation_datasets_2d
from mednets.engine.distributed import barrier, init_distributed
from mednets.engine.trainer import Trainer
from mednets.errors import ConfigError
from mednets.models import create_model, get_model_spec
from mednets.tasks import create_task

__all__ = ["run_training_2d"]


def _segmentation_data(config: ExperimentConfig, run_dir: Path, context: Any) -> tuple[ExperimentConfig, Any]:
    """The validated 2D dataset of the config (phantom slices generated when none is given)."""
    if config.data.dataset is None:
        phantoms = config.data.phantoms
        if context.is_main:
            write_phantom_slice_datasets(run_dir / "phantoms2d", n_train=phantoms.n_train, n_test=phantoms.n_test,
                                         shape=phantoms.shape, seed=phantoms.seed)  # fmt: skip
        barrier(context)
        config = replace(config, data=replace(config.data, dataset=str(run_dir / "phantoms2d" / "train")))
    return config, load_dataset_2d(config.data.dataset)


def run_training_2d(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the configured 2D model into `run_dir`; returns the final state and validation metrics.

    Raises:
        ConfigError: the model is not a 2D denoising or segmentation model.
        DatasetError, InvalidInputError: unusable data.
    """
    run_dir = Path(run_dir)
    context = init_distributed(config.train.device)
    spec = get_model_spec(config.model.name)
    if spec.spatial_dims != 2 or spec.task not in ("denoising", "segmentation"):
        raise ConfigError("run_training_2d trains 2D denoisers and segmenters", source="model.name",
                          got=f"{spec.name} ({spec.task}, {spec.spatial_dims}D)")  # fmt: skip
    if data_dir is not None:
        config = replace(config, data=replace(config.data, dataset=str(data_dir)))
    data = config.data
    torch.manual_seed(config.train.seed)
    overrides = dict(config.model.overrides)
    preprocessing: dict[str, Any] = {"spatial_dims": 2, "task": spec.task}
    if spec.task == "denoising":
        train_set, val_set = denoising_datasets(
            data.dataset, tile_size=data.tile_size, noise=data.noise, val_fraction=data.val_fraction,
            split_seed=data.split_seed, min_tissue=data.min_tissue, stain_scale=data.stain_augment if data.augment
            else 0.0, augment=data.augment, seed=config.train.seed,
        )  # fmt: skip
        task = create_task("denoising", **config.loss)
        preprocessing["tile_size"] = data.tile_size
        dataset = None
    else:
        config, dataset = _segmentation_data(config, run_dir, context)
        patch_size = tuple(config.data.patch_size or (data.tile_size, data.tile_size))
        train_set, val_set = segmentation_datasets_2d(
            dataset, patch_size=patch_size, hu_window=data.hu_window, val_fraction=data.val_fraction,
            split_seed=data.split_seed, augment=data.augment, seed=config.train.seed,
        )  # fmt: skip
        task = create_task("segmentation", num_classes=len(dataset.labels), **config.loss)
        overrides.setdefault(spec.out_channels_option or "n_classes", len(dataset.labels))
        preprocessing.update(
            patch_size=list(patch_size), hu_window=list(data.hu_window), channel_names=dataset.info["channel_names"]
        )
    model = create_model(config.model.name, **overrides)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if dataset is not None:
            shutil.copyfile(dataset.root / "dataset.json", run_dir / "dataset.json")
        atomic_write_text(run_dir / "preprocessing.json", json.dumps(preprocessing, indent=2))
    trainer = Trainer(config, model, task, train_set, val_set, run_dir, context=context, progress=progress)
    return trainer.fit(resume=resume)
