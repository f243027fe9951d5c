"""From a config to a trained run folder, for every task and dimension: data, model and task meet here.

`mednets train CONFIG` calls `run_training`. Tasks that learn from label maps read a dataset folder
(2D or 3D; with none in the config or on the command line the built-in phantoms are generated into
`<run>/phantoms/{train,test}` first); denoising reads image files (none: the IHC image scikit-image
ships). The run folder gets `preprocessing.json` (`PreprocessingRecord`), so prediction prepares
inputs exactly as training did.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mednets.atomic import atomic_write_text
from mednets.config import ExperimentConfig
from mednets.data.convert import ensure_phantom_datasets
from mednets.data.dataset import Dataset, load_dataset
from mednets.data.fingerprint import load_or_extract_fingerprint
from mednets.data.histology import denoising_datasets
from mednets.data.preprocessing import PreprocessedCache, preprocess_dataset
from mednets.data.samples import label_atlas, segmentation_datasets
from mednets.data.streaming import CachedCaseDataset
from mednets.engine.calibration import calibrate_run
from mednets.engine.distributed import DistributedContext, barrier, broadcast_from_main, init_distributed
from mednets.engine.planning import Plan, cache_root, dataset_cache_folder, plan_training
from mednets.engine.run import PreprocessingRecord, RunFolder, build_model_for_labels, build_model_head
from mednets.engine.sliding_window import WindowPresence, sliding_window
from mednets.engine.trainer import Trainer
from mednets.errors import ConfigError
from mednets.models import ModelSpec, get_model_spec
from mednets.models.base import layer_inputs
from mednets.models.kernels import BF16SafeConv3d
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


def _validation_inferer(patch_size: tuple[int, ...], precision: str, pad_values: Sequence[float]) -> Any:
    """Patch models validate on whole images through the prediction blender (padded as training pads)."""

    def infer(model: nn.Module, image: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        outputs = []
        for item in image:  # [C, *S] each
            windows = WindowPresence(model)
            logits = sliding_window(windows, item, patch_size, overlap=VALIDATION_OVERLAP, batch_size=2,
                                    precision="fp32" if precision == "fp32" else "bf16", pad_value=pad_values)  # fmt: skip
            outputs.append(windows.outputs(logits[None]))
        if isinstance(outputs[0], torch.Tensor):
            return torch.cat(outputs)
        return {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}

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
    plan: Plan | None = None  # the training plan of tasks that learn from labels


@dataclass
class _PlannedData:
    """A dataset's plan and its preprocessed cache, and the cases preprocessing kept."""

    plan: Plan
    cache: PreprocessedCache
    cases: list[str]


def _planned_data(
    config: ExperimentConfig, dataset: Dataset, run_dir: Path, context: DistributedContext, *, resume: bool,
    progress: bool,
) -> _PlannedData:  # fmt: skip
    """Fingerprint, plan and preprocess the dataset (main process; the others wait, then read the cache).

    A resumed run keeps the plan it was trained with (`plan.json` in the run folder); `data.plan` a
    path reads that plan; otherwise the plan is made from the fingerprint and the config. Nothing is
    written into the run folder here (`_write_run_records` writes the plan once the run is checked).
    """
    folder = dataset_cache_folder(cache_root(config), dataset.root)
    saved = RunFolder(run_dir).path / RunFolder.PLAN
    plan_path = (
        saved if resume and saved.is_file() else (None if config.data.plan == "auto" else Path(config.data.plan))
    )
    workers = config.data.preprocess_workers
    shared: tuple[dict, dict] | None = None
    if context.is_main:
        fingerprint = load_or_extract_fingerprint(dataset, folder, workers=workers, progress=progress)
        if plan_path is not None:
            if not plan_path.is_file():
                raise ConfigError("plan file not found", source="data.plan", got=str(plan_path))
            plan = Plan.from_dict(json.loads(plan_path.read_text(encoding="utf-8")), source=str(plan_path))
        else:
            build_model_head(config, len(dataset.labels))  # a head that does not fit the labels stops here
            plan = plan_training(fingerprint, config, in_channels=len(fingerprint.channel_names),
                                 num_labels=len(dataset.labels), device=context.device)  # fmt: skip
        _, skipped = preprocess_dataset(dataset, fingerprint, plan.preprocessing, folder / plan.preprocessing.key(),
                                        workers=workers, progress=progress)  # fmt: skip
        shared = (plan.to_dict(), skipped)
    plan_data, skipped = broadcast_from_main(shared, context)  # the other ranks train with the main's plan
    plan = Plan.from_dict(plan_data)
    cache = PreprocessedCache(folder / plan.preprocessing.key())
    cases = [case.case_id for case in dataset.training if case.case_id not in skipped]
    return _PlannedData(plan, cache, cases)


def _labelled_setup(
    config: ExperimentConfig, spec: ModelSpec, run_dir: Path, context: DistributedContext, *, resume: bool,
    progress: bool,
) -> _Setup:  # fmt: skip
    """The setup of a task that learns from label maps (a dataset folder, 2D or 3D), planned from its fingerprint."""
    config, dataset = _labelled_dataset(config, run_dir, context, spec.spatial_dims)
    planned = _planned_data(config, dataset, run_dir, context, resume=resume, progress=progress)
    plan, data = planned.plan, config.data
    overrides = dict(config.model.overrides)
    if plan.grid is not None:
        overrides["grid_size"] = list(plan.grid)
    config = replace(config, model=replace(config.model, overrides=overrides),
                     data=replace(config.data, patch_size=tuple(plan.patch_size) if plan.patch_size else None),
                     train=replace(config.train, batch_size=plan.batch_size))  # fmt: skip
    model = build_model_for_labels(config, len(dataset.labels))
    grid = tuple(plan.grid) if plan.grid else None
    patch_size = tuple(plan.patch_size) if plan.patch_size else None
    train_set, val_set = segmentation_datasets(
        dataset, planned.cache, plan.preprocessing, cases=planned.cases, grid=grid, patch_size=patch_size,
        val_fraction=data.val_fraction, split_seed=data.split_seed, augment=data.augment, seed=config.train.seed,
        augmentation_strength=data.augmentation, foreground_share=data.foreground_share,
        absent_share=data.absent_share, organ_removal=data.organ_removal, organ_removal_prob=data.organ_removal_prob,
    )  # fmt: skip
    if config.model.init_from_data:
        if not hasattr(model, "init_from_label_frequency") or grid is None:
            raise ConfigError("this model cannot be initialised from data", source="model.init_from_data",
                              expected="false for this model", got=config.model.name)  # fmt: skip
        atlas_cases = CachedCaseDataset(str(planned.cache.root), train_set.cases, pad_values=train_set.pad_values,
                                        grid=grid)  # fmt: skip
        atlas = label_atlas(atlas_cases, len(dataset.labels))
        model.init_from_label_frequency(
            atlas.frequency, floor=config.model.init_prior_floor, smallest_share=atlas.smallest_share
        )
    task = create_task(spec.task, num_classes=len(dataset.labels), **config.loss)
    prep = plan.preprocessing
    record = PreprocessingRecord(
        spatial_dims=spec.spatial_dims, task=spec.task, orientation=prep.orientation,
        spacing_mm=list(prep.spacing) if prep.spacing else None, grid=list(grid) if grid else None,
        patch_size=list(patch_size) if patch_size else None, channel_names=dict(dataset.info["channel_names"]),
        smallest_training_volume_ml=dataset.smallest_volumes_ml() if context.is_main else {},
        normalisation=[rule.to_dict() for rule in prep.normalisation], crop=bool(grid) and prep.crop,
    )  # fmt: skip
    infer = None if grid else _validation_inferer(tuple(patch_size), config.train.precision, train_set.pad_values)
    return _Setup(config, train_set, val_set, model, task, record, infer, dataset, plan)


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


def _check_input_fits_model(setup: _Setup, spec: ModelSpec, context: DistributedContext) -> None:
    """Refuse a training input the model cannot train on, before any file of the run is written.

    Traced on the meta device (no arithmetic). Two faults are caught: a layer that refuses the map it
    gets (an instance normalisation over a single voxel), and, in CPU bf16 3D training, a plain
    `nn.Conv3d` that would see a map with a side under 4 voxels. torch's CPU bf16 kernels compute
    wrong weight gradients for those (`BF16SafeConv3d`, which mednets' own models use, runs them in
    float32), so a model from elsewhere gets a clear error instead of a run that diverges.
    """
    window = setup.record.window
    if not window:
        return
    source = "data.patch_size" if setup.record.patch_size else "model input size"
    try:
        calls = layer_inputs(setup.model, window)
    except ValueError as error:  # a layer refused the map it got, e.g. a normalisation over a single voxel
        raise ConfigError(f"model {spec.name} cannot run on this input ({error}); use a larger input",
                          source=source, got=list(window)) from error  # fmt: skip
    if setup.config.train.precision != "bf16" or context.device.type != "cpu" or spec.spatial_dims != 3:
        return
    smallest = BF16SafeConv3d.SMALLEST_BF16_SIDE
    unsafe = [(name, size) for name, module, size in calls if type(module) is nn.Conv3d and min(size) < smallest]
    if not unsafe:
        return
    name, size = unsafe[0]
    raise ConfigError(
        f"with bf16 on CPU, torch computes wrong weight gradients for 3D convolutions on maps with a side under "
        f"{smallest} voxels, and {len(unsafe)} convolution call(s) of this model get one (e.g. {name} gets "
        f"{list(size)}); use a larger input or train.precision=fp32",
        source=source,
        expected=f"sides of at least {_scaled(window, [size for _, size in unsafe], smallest)}",
        got=list(window),
    )


def _scaled(window: Sequence[int], sizes: list[tuple[int, ...]], smallest: int) -> list[int]:
    """The input size that gives every map in `sizes` at least `smallest` voxels per side (scaled per axis)."""
    return [max([side] + [math.ceil(smallest * side / size[axis]) for size in sizes if size[axis] < smallest])
            for axis, side in enumerate(window)]  # fmt: skip


def _write_run_records(folder: RunFolder, setup: _Setup, *, resume: bool) -> None:
    """Write `dataset.json` and `preprocessing.json` (atomically); a resumed run must find what its
    weights were trained with, or prediction would prepare inputs differently from training."""
    records = {folder.preprocessing_path: json.dumps(asdict(setup.record), indent=2)}
    if setup.plan is not None:
        records[folder.path / RunFolder.PLAN] = json.dumps(setup.plan.to_dict(), indent=1)
    if setup.dataset is not None:
        records[folder.dataset_path] = (setup.dataset.root / "dataset.json").read_text(encoding="utf-8")
    folder.path.mkdir(parents=True, exist_ok=True)
    for path, text in records.items():
        if resume and path.is_file() and _meaning(path, path.read_text(encoding="utf-8")) != _meaning(path, text):
            raise ConfigError("the data or preprocessing changed since the run began: the saved weights were "
                              "trained on the old ones; start a new run (another name, or --overwrite)",
                              source=str(path))  # fmt: skip
        atomic_write_text(path, text)


def _meaning(path: Path, text: str) -> Any:
    """What prediction reads from a run record: all of preprocessing.json, the labels and channels of dataset.json."""
    content = json.loads(text)
    if path.name == RunFolder.DATASET:
        return {key: content.get(key) for key in ("labels", "channel_names", "file_ending")}
    return content


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

    A folder that already holds a run is continued with `resume` (one stopped before its first
    checkpoint, or an empty folder, starts afresh, as nnU-Net's `--c` does), or replaced with
    `overwrite` (its run files go first; generated phantoms stay); otherwise it is refused, so no run
    is ever silently replaced. A resumed run must find its data and preprocessing unchanged.

    Raises:
        ConfigError: `run_dir` holds a run and neither `resume` nor `overwrite` is set; a patch-wise
            model without `data.patch_size`, or an impossible option.
        DatasetError, InvalidInputError: unusable data.
    """
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    existing = folder.run_files()
    if resume and not folder.has_checkpoint():  # stopped before its first checkpoint (or never started): start
        resume, overwrite = False, True
    if existing and not resume:
        if not overwrite:
            raise ConfigError("the folder already holds a run: continue it with --resume or replace it with "
                              "--overwrite", source=str(run_dir), got=sorted(p.name for p in existing))  # fmt: skip
        folder.remove_run_files()
    context = init_distributed(config.train.device)
    spec = get_model_spec(config.model.name)
    if data_dir is not None:
        config = replace(config, data=replace(config.data, dataset=str(data_dir)))
    torch.manual_seed(config.train.seed)
    if task_type(spec.task).uses_labels:
        setup = _labelled_setup(config, spec, run_dir, context, resume=resume, progress=progress)
    else:
        setup = _image_setup(config, spec)
    _check_input_fits_model(setup, spec, context)
    if context.is_main:
        _write_run_records(folder, setup, resume=resume)
    folder.calibration_path.unlink(missing_ok=True)  # it belongs to the finished weights, fitted again below
    trainer = Trainer(setup.config, setup.model, setup.task, setup.train_set, setup.val_set, run_dir, context=context,
                      progress=progress, infer=setup.infer, spatial_dims=spec.spatial_dims)  # fmt: skip
    result = trainer.fit(resume=resume)
    if context.is_main and setup.dataset is not None and spec.spatial_dims == 3:
        cases = list(getattr(setup.val_set, "cases", []))
        calibration = calibrate_run(run_dir, setup.dataset, cases, device=str(context.device), progress=progress)
        result["calibration"] = None if calibration is None else calibration.to_dict()
    return result
