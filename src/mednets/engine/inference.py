"""Prediction on real scans: any readable volume in, a label map with the input's exact geometry out.

Steps (`predict_volume`):
1. reorient the scan to the orientation the model was trained in (phantoms: LPS), so anatomy is
   where the model expects it;
2. window the HU values as in training;
3. whole-volume models (SADAAn): resample to the voxel size the model saw and centre-pad/crop to its
   grid (air outside the scan); patch models: resample to the training spacing and run gaussian-blended
   sliding windows (`engine.sliding_window`: batched bf16 windows in channels_last_3d);
4. map scores back to the input grid slab by slab, taking the argmax as it goes (never all
   classes at full resolution in float), keep labels uint8;
5. undo the reorientation and write the input's affine.

The JSON sidecar gives, per structure, the presence decision, its probability and confidence (from
the presence head, or from the mask for models without one), the predicted volume in mL and, for
structures judged absent, why they are empty.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mednets.atomic import atomic_write_text
from mednets.data.io import Volume, read_volume, write_volume
from mednets.data.transforms import labels_from_logits, smallest_claim_first
from mednets.engine.checkpoints import load_checkpoint_config, load_model_weights
from mednets.engine.host_memory import reuse_freed_memory
from mednets.engine.predict2d import predict_paths_2d
from mednets.engine.sliding_window import sliding_window_logits
from mednets.engine.training import build_model_for_data
from mednets.errors import CheckpointError, InvalidInputError, MednetsError
from mednets.models import get_model_spec

__all__ = ["LoadedRun", "Prediction", "drop_small_structures", "load_run", "predict_volume", "predict_paths"]

AIR_HU = -1000.0


@dataclass
class LoadedRun:
    """A trained model with everything needed to prepare scans as in training."""

    run_dir: Path
    model: nn.Module
    model_name: str
    structures: dict[str, int]  # name -> label id, background excluded
    preprocessing: dict[str, Any]
    absence_aware: bool
    device: torch.device


@dataclass
class Prediction:
    """A label map on the input's grid, the per-structure sidecar entries and the time per stage."""

    labels: np.ndarray
    structures: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage


def load_run(run_dir: str | os.PathLike[str], *, checkpoint: str = "best", device: str = "cpu") -> LoadedRun:
    """Load `run_dir/checkpoints/<checkpoint>` (falling back to `last`) with the run's label map.

    Raises:
        CheckpointError: the run folder lacks a checkpoint, its dataset.json or preprocessing.json.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" / checkpoint
    if not folder.is_dir():
        folder = run_dir / "checkpoints" / "last"
    for required in (folder, run_dir / "dataset.json", run_dir / "preprocessing.json"):
        if not required.exists():
            raise CheckpointError(
                "run folder is incomplete", source=str(required), expected="a run made by `mednets train`"
            )
    config = load_checkpoint_config(folder)
    labels = {
        str(k): int(v) for k, v in json.loads((run_dir / "dataset.json").read_text(encoding="utf-8"))["labels"].items()
    }
    model = build_model_for_data(config, len(labels))
    load_model_weights(folder, model)
    if get_model_spec(config.model.name).spatial_dims == 3:  # the layout of the fast bf16 kernels
        model = model.to(memory_format=torch.channels_last_3d)
    target = torch.device(device)
    return LoadedRun(
        run_dir=run_dir,
        model=model.to(target).eval(),
        model_name=config.model.name,
        structures={name: i for name, i in sorted(labels.items(), key=lambda item: item[1]) if i != 0},
        preprocessing=json.loads((run_dir / "preprocessing.json").read_text(encoding="utf-8")),
        absence_aware=get_model_spec(config.model.name).task == "absence_segmentation",
        device=target,
    )


def _window(array: np.ndarray, hu_window: Sequence[float] | None) -> torch.Tensor:
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if hu_window is None:
        return (image - image.mean()) / image.std().clamp_min(1e-6)
    low, high = hu_window
    return ((image - low) / (high - low)).clamp(0, 1)


def _resample(image: torch.Tensor, spacing: Sequence[float], target_spacing: Sequence[float]) -> torch.Tensor:
    """Trilinear resampling of `[D, H, W]` from `spacing` to `target_spacing` (same field of view)."""
    size = [max(1, round(n * s / t)) for n, s, t in zip(image.shape, spacing, target_spacing, strict=True)]
    if list(image.shape) == size:
        return image
    return F.interpolate(image[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]


def _centre_pad_crop(
    image: torch.Tensor, grid: Sequence[int], fill: float
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Centre-pad (with `fill`) or centre-crop `[D, H, W]` to `grid`; returns the offsets to undo it."""
    out = torch.full(tuple(grid), fill, dtype=image.dtype)
    source, target, offsets = [], [], []
    for n, g in zip(image.shape, grid, strict=True):
        if n <= g:
            start = (g - n) // 2
            source.append(slice(0, n))
            target.append(slice(start, start + n))
            offsets.append((start, -1))
        else:
            start = (n - g) // 2
            source.append(slice(start, start + g))
            target.append(slice(0, g))
            offsets.append((-1, start))
    out[tuple(target)] = image[tuple(source)]
    return out, offsets


def _undo_pad_crop(
    scores: torch.Tensor, shape: Sequence[int], offsets: list[tuple[int, int]], fill: float
) -> torch.Tensor:
    """Inverse of `_centre_pad_crop` for scores `[C, *grid]` -> `[C, *shape]` (cropped-away parts get `fill`)."""
    out = torch.full((scores.shape[0], *shape), fill, dtype=scores.dtype)
    source, target = [slice(None)], [slice(None)]
    for n, g, (pad_start, crop_start) in zip(shape, scores.shape[1:], offsets, strict=True):
        if pad_start >= 0:
            source.append(slice(pad_start, pad_start + n))
            target.append(slice(0, n))
        else:
            source.append(slice(0, g))
            target.append(slice(crop_start, crop_start + g))
    out[tuple(target)] = scores[tuple(source)]
    return out


class _StageClock:
    """Wall time per named stage: `lap(name)` closes the stage that ran since the previous lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


def _flip_variants(tta_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """No flip, then each axis alone (axes of `[B, C, D, H, W]` counted from the spatial ones)."""
    return [(), *[(2 + axis,) for axis in tta_axes]]


def _averaged(
    run_model: Callable[[torch.Tensor], dict[str, torch.Tensor]], x: torch.Tensor, tta_axes: Sequence[int]
) -> dict:
    """Mean of the model's float outputs over flip test-time augmentation (flips undone on spatial outputs)."""
    totals: dict[str, torch.Tensor] = {}
    variants = _flip_variants(tta_axes)
    for dims in variants:
        outputs = run_model(x.flip(dims) if dims else x)
        for key, value in outputs.items():
            if not value.is_floating_point():
                continue
            value = value if len(variants) == 1 else value.float()  # one pass: keep the accumulator's dtype
            if dims and value.ndim == x.ndim:
                value = value.flip(dims)
            totals[key] = totals.get(key, 0) + value / len(variants)
    return totals


def predict_volume(
    run: LoadedRun,
    volume: Volume,
    *,
    tta_axes: Sequence[int] = (),
    overlap: float = 0.5,
    gating: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 2,
    accumulate_device: str | torch.device | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    min_volume_fraction: float = 0.25,
) -> Prediction:
    """Predict a label map for `volume` on its own grid, and the per-structure sidecar entries.

    Args:
        run: a loaded run.
        volume: a 3D scan in HU.
        tta_axes: spatial axes (0 = D, 1 = H, 2 = W of the model's orientation) to average flips over.
        overlap: sliding-window overlap (patch models).
        gating: empty the masks of structures the presence head judges absent (absence-aware models).
        dtype: autocast dtype on CPU/CUDA (`torch.float32` disables autocast).
        batch_size: windows per forward pass (patch models).
        accumulate_device: where the blended full-volume scores live (patch models; default: the CPU).
        accumulate_dtype: their dtype (patch models): bfloat16 halves the largest buffer of a big scan.
        min_volume_fraction: empty a structure painted with less than this fraction of its smallest
            volume in training (the run's `smallest_training_volume_ml`; runs without it are not
            filtered): a few voxels of a removed kidney are noise, not a kidney. 0 turns it off.
    """
    if volume.array.ndim != 3 or volume.channel_axis is not None:
        raise InvalidInputError("expected a 3D volume", source=str(volume.meta.get("source", "input")),
                                got=volume.array.shape)  # fmt: skip
    if not np.isfinite(volume.array).all():
        raise InvalidInputError(
            "volume contains NaN or infinite values", source=str(volume.meta.get("source", "input"))
        )
    prep = run.preprocessing
    clock = _StageClock()
    oriented = volume.reoriented(prep["orientation"])
    image = _resample(_window(oriented.array, prep["hu_window"]), oriented.spacing, prep["spacing_mm"])
    clock.lap("preprocess")
    autocast = torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32)
    structure_ids = list(run.structures.values())
    sidecar: dict[str, dict[str, Any]] = {}
    with torch.no_grad(), autocast, reuse_freed_memory():  # the network's activations, not the scan's buffers
        if run.absence_aware:
            fill = float(_window(np.array([AIR_HU]), prep["hu_window"])[0])
            grid_image, offsets = _centre_pad_crop(image, prep["grid"], fill)

            def run_model(x: torch.Tensor) -> dict[str, torch.Tensor]:
                return run.model(x, gating=False)

            outputs = _averaged(run_model, grid_image[None, None].to(run.device), tta_axes)
            presence = outputs["presence_probs"][0].cpu()  # [S]
            confidence = outputs["confidence_scores"][0].cpu()
            thresholds = torch.as_tensor(run.model.presence_threshold, dtype=torch.float32)
            present = presence >= thresholds
            probs = outputs["segmentation_probs"][0].cpu()  # [S, *grid]
            if gating:
                probs = probs * present[:, None, None, None]
            # Background scores 0.5: a structure claims the voxels where it is above one half, and
            # where several do, the one claiming the fewest voxels on the grid wins.
            priority = smallest_claim_first(probs > 0.5, spatial_dims=3)
            scores = torch.cat([torch.full_like(probs[:1], 0.5), probs])
            scores = _undo_pad_crop(scores, image.shape, offsets, fill=0.0)
            scores[0] = torch.where(scores[1:].amax(0) > 0, scores[0], torch.ones_like(scores[0]))
        else:

            def run_model(x: torch.Tensor) -> dict[str, torch.Tensor]:
                logits = sliding_window_logits(run.model, x[0], prep["patch_size"], overlap=overlap,
                                               batch_size=batch_size, accumulate_device=accumulate_device or "cpu",
                                               accumulate_dtype=accumulate_dtype,
                                               precision="fp32" if dtype == torch.float32 else "bf16")  # fmt: skip
                return {"scores": torch.softmax(logits, 0)[None]}

            scores = _averaged(run_model, image[None, None], tta_axes)["scores"][0].cpu()
            presence = confidence = present = priority = None
    clock.lap("inference")
    labels = labels_from_logits(scores, oriented.array.shape, priority=priority).numpy()  # float32 slab by slab
    label_ids = np.asarray([0, *structure_ids], dtype=np.uint8)
    labels = label_ids[labels]  # channel index -> label id
    voxel_ml = volume.voxel_volume_ml()
    counts = np.bincount(labels.ravel(), minlength=int(label_ids.max()) + 1)  # voxels per label, one pass
    dropped = drop_small_structures(labels, run.structures, voxel_ml, prep.get("smallest_training_volume_ml", {}),
                                    min_volume_fraction, counts=counts)  # fmt: skip
    for index, (name, label) in enumerate(run.structures.items()):
        volume_ml = float(counts[label]) * voxel_ml
        if presence is not None:
            entry = {"present": bool(present[index]), "probability": float(presence[index]),
                     "confidence": float(confidence[index]), "volume_ml": volume_ml}  # fmt: skip
            if gating and not entry["present"]:
                entry["why_empty"] = f"presence probability {entry['probability']:.3f} below the threshold"
        else:
            entry = {"present": volume_ml > 0, "probability": float(volume_ml > 0), "confidence": 1.0,
                     "volume_ml": volume_ml, "presence_source": "mask"}  # fmt: skip
        if name in dropped:
            entry["present"] = False
            entry["why_empty"] = dropped[name]
        sidecar[name] = entry
    restored = Volume(labels, oriented.affine).reoriented(volume.orientation)
    clock.lap("labels to the input grid")
    return Prediction(labels=restored.array, structures=sidecar, seconds=clock.seconds)


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


def _case_name(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return name[: -len("_0000")] if name.endswith("_0000") else name


def _inputs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files and DICOM folders to predict: a folder of volume files expands to its files."""
    found: list[Path] = []
    for item in map(Path, paths):
        volume_files = (
            sorted(p for p in item.iterdir() if p.is_file() and _case_name(p) != p.name) if item.is_dir() else []
        )
        found.extend(volume_files or [item])
    return found


def predict_paths(
    run: LoadedRun,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    **options: Any,
) -> dict[str, list[Any]]:
    """Predict every input (files, folders of files, DICOM folders) into `out_dir/<case>.nii.gz` + `.json`.

    An input that cannot be read or predicted is reported and skipped; the rest continue.

    Returns:
        `{"written": [paths], "failed": [(input, message)]}`.
    """
    if run.preprocessing.get("spatial_dims") == 2:  # 2D segmentation: label images of the input's size
        return predict_paths_2d(run, inputs, out_dir, progress=progress, **options)
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    written: list[Path] = []
    failed: list[tuple[str, str]] = []
    for path in tqdm(_inputs(inputs), desc="predicting", unit="scan", disable=not progress):
        try:
            reading = _StageClock()
            volume = read_volume(path)
            reading.lap("read")
            prediction = predict_volume(run, volume, **options)
            case = _case_name(path)
            writing = _StageClock()
            label_path = write_volume(Volume(prediction.labels, volume.affine), out_dir / f"{case}.nii.gz")
            writing.lap("write")
            sidecar = {
                "structures": prediction.structures,
                "seconds": {**reading.seconds, **prediction.seconds, **writing.seconds},
                "model": {"name": run.model_name, "run": str(run.run_dir)},
                "input": {"path": str(path), "shape": list(volume.array.shape), "spacing_mm": list(volume.spacing),
                          "orientation": volume.orientation},
            }  # fmt: skip
            atomic_write_text(out_dir / f"{case}.json", json.dumps(sidecar, indent=2))
            written.append(label_path)
        except MednetsError as error:
            failed.append((str(path), str(error)))
    return {"written": written, "failed": failed}
