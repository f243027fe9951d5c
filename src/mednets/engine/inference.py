"""One predictor for 2D and 3D: any readable image in, a label map with the input's exact geometry out.

Steps (`predict_image`), each driven by the run's `PreprocessingRecord` and the model's registry entry:
1. reorient a volume to the orientation the model was trained in (phantoms: LPS), so anatomy is
   where the model expects it;
2. normalise each channel file as in training (`mednets.data.intensity`);
3. resample to the voxel size the model saw (when training recorded one);
4. whole-image models (SADAAn): centre-pad/crop to the model's grid (what lies outside the scan is
   air); patch models: blend windows of the training patch size (`engine.sliding_window`);
5. the task turns the outputs into scores and presence (`Task.decode`); scores go back to the input
   grid slab by slab with the argmax taken on the way (never all classes at full resolution in
   float), labels stay uint8;
6. undo the reorientation; the label map has the input's affine.

`mednets.engine.api` runs it for each case and `mednets.engine.outputs` writes the files. The JSON sidecar gives, per structure, the presence decision, its probability and confidence (from
the presence head, or from the mask for models without one), the painted volume and, for structures
judged absent, why they are empty.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mednets.atomic import check_not_inputs
from mednets.config import InferenceConfig
from mednets.data.cropping import centre_start, window
from mednets.data.intensity import padding_value
from mednets.data.preprocessing import PreprocessingPlan, preprocess_arrays
from mednets.data.transforms import augmentation_axes
from mednets.data.volume import Volume
from mednets.devices import resolve_device
from mednets.engine.run import PreprocessingRecord, RunFolder
from mednets.engine.sliding_window import WindowPresence, sliding_window
from mednets.errors import ConfigError, InvalidInputError
from mednets.host_memory import reuse_freed_memory
from mednets.models import ModelSpec
from mednets.tasks import Task, create_task, task_type
from mednets.tasks.decoding import labels_from_logits

__all__ = [
    "LoadedRun",
    "Prediction",
    "StageClock",
    "check_outputs",
    "check_output_folder",
    "drop_small_structures",
    "load_run",
    "predict_image",
]


@dataclass
class LoadedRun:
    """A trained model with everything needed to prepare inputs as in training."""

    folder: RunFolder
    model: nn.Module
    spec: ModelSpec
    task: Task
    structures: dict[str, int]  # name -> label id, background excluded
    preprocessing: PreprocessingRecord
    inference: InferenceConfig
    device: torch.device

    @property
    def run_dir(self) -> Path:
        return self.folder.path


@dataclass
class Prediction:
    """A label map on the input's grid, the per-structure sidecar entries and the time per stage."""

    labels: np.ndarray
    structures: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    presence_logits: list[float] | None = None  # a presence head's uncalibrated log-odds, structure order


def load_run(run_dir: str | os.PathLike[str], *, checkpoint: str = "best", device: str = "auto") -> LoadedRun:
    """Load a segmentation run's model (`checkpoints/<checkpoint>`, else `last`) with its labels and settings.

    Raises:
        CheckpointError: the run folder lacks a checkpoint, its dataset.json or preprocessing.json.
    """
    target = resolve_device(device, source="--device")
    folder = RunFolder(run_dir)
    config = folder.config(checkpoint)
    spec = folder.spec(checkpoint)
    if not task_type(spec.task).uses_labels:
        raise ConfigError("not a segmentation run (denoise with `mednets denoise`)", source=str(run_dir),
                          got=f"a {spec.task} run")  # fmt: skip
    labels = folder.labels or {}
    task = create_task(spec.task, num_classes=len(labels))
    inference = config.inference
    task.calibration = folder.calibration
    if task.calibration is not None and task.calibration.volume_floor_fraction is not None:
        inference = replace(inference, min_volume_fraction=task.calibration.volume_floor_fraction)
    return LoadedRun(folder=folder, model=folder.load_model(checkpoint, target), spec=spec, task=task,
                     structures=folder.structures, preprocessing=folder.preprocessing, inference=inference,
                     device=target)  # fmt: skip


class StageClock:
    """Wall time per named stage: `lap(name)` closes the stage that ran since the previous lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


def _averaged(
    run_model: Callable[[torch.Tensor], dict[str, torch.Tensor]], x: torch.Tensor, axes: Sequence[int]
) -> dict:
    """Mean of the model's float outputs over flips of the spatial `axes` (flips undone on spatial outputs)."""
    variants = [(), *[(2 + axis,) for axis in axes]]
    totals: dict[str, torch.Tensor] = {}
    for dims in variants:
        outputs = run_model(x.flip(dims) if dims else x)
        for key, value in outputs.items():
            value = value if len(variants) == 1 else value.float()  # one pass: keep the accumulator's dtype
            if dims and value.ndim == x.ndim:
                value = value.flip(dims)
            totals[key] = totals.get(key, 0) + value / len(variants)
    return totals


def _prepared(run: LoadedRun, volume: Volume) -> tuple[Volume, torch.Tensor, tuple[tuple[int, int], ...]]:
    """The input as the model saw it in training: oriented volume and normalised, resampled `[C, *S]`."""
    prep = run.preprocessing
    source = str(volume.meta.get("source", "input"))
    if not np.isfinite(volume.array).all():
        raise InvalidInputError("image contains NaN or infinite values", source=source)
    if len(volume.spatial_shape) != prep.spatial_dims:
        raise InvalidInputError(f"the run's model takes {prep.spatial_dims}D images", source=source,
                                got=volume.array.shape)  # fmt: skip
    oriented = volume.reoriented(prep.orientation) if prep.orientation else volume
    array = oriented.array[None] if oriented.channel_axis is None else np.moveaxis(oriented.array, -1, 0)
    rules = prep.rules()
    if len(rules) != array.shape[0]:
        raise InvalidInputError(f"the run's model takes {len(rules)} channel(s)", source=source, got=array.shape[0])
    plan = PreprocessingPlan(prep.spatial_dims, tuple(prep.spacing_mm) if prep.spacing_mm else None, prep.orientation,
                             tuple(rules), crop=prep.crop)  # fmt: skip
    spacing = oriented.spacing if prep.spatial_dims == 3 else (1.0,) * prep.spatial_dims
    image, _, box = preprocess_arrays(list(array), None, spacing, plan, source=source)
    return oriented, image, box


def predict_image(
    run: LoadedRun,
    volume: Volume,
    *,
    tta: bool | Sequence[int] | None = None,
    overlap: float | None = None,
    gating: bool | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    accumulate_device: str | torch.device | None = None,
    accumulate_dtype: str | None = None,
    min_volume_fraction: float | None = None,
) -> Prediction:
    """Predict a label map for a 2D image or 3D volume on its own grid, and the per-structure sidecar entries.

    Every option left None takes the run's `inference` settings (`InferenceConfig`).

    Args:
        run: a loaded run.
        volume: the image as read (`mednets.data.io.read_any`).
        tta: average over the flips the structures allow (True), or over flips of these spatial axes.
        overlap: sliding-window overlap (patch models).
        gating: empty the masks of structures a presence head judges absent.
        precision: "bf16" (autocast) or "fp32".
        batch_size: windows per forward pass (patch models).
        accumulate_device: where the blended full-size scores live (patch models; default: the CPU).
        accumulate_dtype: "float32" or "bfloat16" (half the memory of the largest buffer of a big scan).
        min_volume_fraction: empty a structure painted with less than this fraction of its smallest
            volume in training (a few voxels of a removed kidney are noise, not a kidney); 0 turns it off.
    """
    chosen = dict(tta=tta, overlap=overlap, gating=gating, precision=precision, batch_size=batch_size,
                  accumulate_device=accumulate_device, accumulate_dtype=accumulate_dtype,
                  min_volume_fraction=min_volume_fraction)  # fmt: skip
    settings = replace(run.inference, **{key: value for key, value in chosen.items() if value is not None})
    prep = run.preprocessing
    clock = StageClock()
    oriented, image, box = _prepared(run, volume)
    clock.lap("preprocess")
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    if isinstance(settings.tta, bool):
        axes = augmentation_axes(list(run.structures), prep.spatial_dims)[0] if settings.tta else []
    else:
        axes = list(settings.tta)
    with torch.no_grad(), autocast, reuse_freed_memory():  # the network's activations, not the scan's buffers
        fills = [padding_value(rule) for rule in prep.rules()]  # "outside the scan", as training padded
        if prep.grid:
            start = centre_start(image.shape[1:], prep.grid)
            model_input = torch.from_numpy(window(image.numpy(), start, prep.grid, fills))  # [C, *grid]

            def run_model(x: torch.Tensor) -> dict[str, torch.Tensor]:
                return run.task.probabilities(run.model(x, **run.task.call_options))

            probabilities = _averaged(run_model, model_input[None].to(run.device), axes)
        else:

            def run_model(x: torch.Tensor) -> dict[str, torch.Tensor]:
                model = WindowPresence(run.model)
                logits = sliding_window(model, x[0], prep.patch_size, overlap=settings.overlap,
                                        batch_size=settings.batch_size, size_multiple=run.spec.size_multiple,
                                        accumulate_device=settings.accumulate_device or "cpu",
                                        accumulate_dtype=getattr(torch, settings.accumulate_dtype),
                                        precision=settings.precision, pad_value=fills)  # fmt: skip
                return run.task.probabilities(model.outputs(logits[None]))

            probabilities = _averaged(run_model, image[None], axes)
        decoded = run.task.decode(probabilities, model=run.model, gating=settings.gating)
    scores = decoded.scores.cpu()
    if prep.grid:
        background = [1.0] + [0.0] * (scores.shape[0] - 1)  # what was cropped away
        scores = torch.from_numpy(window(scores.float().numpy(), [-v for v in start], image.shape[1:], background))
    clock.lap("inference")
    cropped = tuple(stop - start for start, stop in box)
    indices = labels_from_logits(scores, cropped, priority=decoded.priority).numpy()  # float32 slab by slab
    label_ids = np.asarray([0, *run.structures.values()], dtype=np.uint8)
    labels = np.zeros(oriented.spatial_shape, dtype=np.uint8)  # outside the body box: background
    labels[tuple(slice(start, stop) for start, stop in box)] = label_ids[indices]  # channel index -> label id
    voxel_ml = volume.voxel_volume_ml()
    counts = np.bincount(labels.ravel(), minlength=int(label_ids.max()) + 1)  # voxels per label, one pass
    dropped = drop_small_structures(labels, run.structures, voxel_ml, prep.smallest_training_volume_ml,
                                    settings.min_volume_fraction, counts=counts)  # fmt: skip
    volumes_ml = {name: float(counts[label]) * voxel_ml for name, label in run.structures.items()}
    sidecar = run.task.sidecar_entries(decoded, run.structures, volumes_ml, gating=settings.gating)
    for name, label in run.structures.items():
        sidecar[name]["voxels"] = int(counts[label])
        if name in dropped:
            sidecar[name]["present"] = False
            sidecar[name]["why_empty"] = dropped[name]
    if prep.orientation:
        labels = Volume(labels, oriented.affine).reoriented(volume.orientation).array
    clock.lap("labels to the input grid")
    logits = None if decoded.presence_logits is None else [float(v) for v in decoded.presence_logits]
    return Prediction(labels=labels, structures=sidecar, seconds=clock.seconds, presence_logits=logits)


def drop_small_structures(
    labels: np.ndarray,
    structures: dict[str, int],
    voxel_ml: float,
    smallest_ml: dict[str, float],
    fraction: float,
    *,
    counts: np.ndarray | None = None,
) -> dict[str, str]:
    """Set to background (in place) each structure painted with less than `fraction` of its smallest
    training volume; returns {name: why} for those emptied.

    Args:
        labels: label map (any shape), changed in place.
        structures: {name: label id}.
        voxel_ml: volume of one voxel in mL.
        smallest_ml: {name: smallest volume in training, mL}; structures missing here are kept.
        fraction: share of the smallest training volume below which a painted structure is noise.
        counts: voxels per label id (`np.bincount(labels.ravel())`) when the caller has them, so the
            label map is not counted twice; the entries of emptied structures are set to 0.
    """
    if fraction <= 0 or not smallest_ml:
        return {}
    if counts is None:
        counts = np.bincount(labels.ravel(), minlength=max(structures.values(), default=0) + 1)
    dropped = {}
    for name, label in structures.items():
        painted = float(counts[label]) * voxel_ml
        floor = fraction * smallest_ml.get(name, 0.0)
        if 0 < painted < floor:
            labels[labels == label] = 0
            counts[label] = 0
            dropped[name] = (f"painted {painted:.2f} mL, under {fraction:g} x its smallest volume in training "
                             f"({smallest_ml[name]:.2f} mL)")  # fmt: skip
    return dropped


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """Refuse an output folder that is an existing file (an input scan, an earlier result), before any work."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError("is a file, not a folder: outputs go into a folder", source=f"{option} {folder}",
                          expected="a folder (created when missing)")  # fmt: skip


def check_outputs(outputs: dict[Path, list[Path]], option: str = "--out") -> None:
    """Refuse, before anything is written, outputs that would replace an input (`check_not_inputs`) or
    that two inputs share.

    Args:
        outputs: {input path: the files it would write}.
        option: where the outputs' folder comes from, for the message.

    Raises:
        InvalidInputError: naming the output and the input (or the two inputs) that collide.
    """
    check_not_inputs([target for targets in outputs.values() for target in targets], outputs, option)
    owners: dict[Path, Path] = {}
    for source, targets in outputs.items():
        for target in targets:
            resolved = target.resolve()
            if resolved in owners and owners[resolved] != source:
                raise InvalidInputError("two inputs would write the same output; predict them into separate folders",
                                        source=f"{owners[resolved]} and {source}", got=f"output {target}")  # fmt: skip
            owners[resolved] = source
