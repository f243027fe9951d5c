"""Denoise images of any size with a trained autoencoder run: windowed, blended, written in the input's format.

`mednets denoise --run RUN IN OUT` calls `load_denoiser` and `denoise_paths`. Pixels are scaled to
[0, 1] by their bit depth (`mednets.data.images`), denoised with overlapping windows blended without
seams (`mednets.engine.sliding_window`, seamless weights) and written back with the input's dtype,
channels and format: grey images
go through the RGB model as three equal channels and come back as their mean, an alpha channel is
kept as it was, every page of a multi-page TIFF is denoised, and SVS slides (level 0) are written as
TIFF.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mednets.data.images import from_unit_range, to_unit_range
from mednets.data.io import list_image_files, read_image, write_volume
from mednets.data.volume import Volume
from mednets.devices import resolve_device
from mednets.engine.inference import check_output_folder, check_outputs
from mednets.engine.run import RunFolder
from mednets.engine.sliding_window import sliding_window
from mednets.errors import ConfigError, MednetsError, failure_message
from mednets.tasks import task_type

__all__ = ["denoise_array", "denoise_image", "denoise_paths", "load_denoiser", "with_input_mean_colour"]


def load_denoiser(run_dir: str | os.PathLike[str], *, checkpoint: str = "best", device: str = "cpu") -> nn.Module:
    """The autoencoder of a denoising run (`checkpoints/<checkpoint>`, else `last`), in eval mode on `device`.

    Raises:
        CheckpointError: no checkpoint in the run folder.
        ConfigError: the run trained another task.
    """
    folder = RunFolder(run_dir)
    spec = folder.spec(checkpoint)
    if task_type(spec.task).uses_labels:
        raise ConfigError("not a denoising run (use `mednets predict`)", source=str(run_dir), got=spec.task)
    return folder.load_model(checkpoint, resolve_device(device, source="--device"))


def denoise_array(
    model: nn.Module,
    rgb: torch.Tensor,
    *,
    patch_size: int = 256,
    overlap: float = 0.25,
    batch_size: int = 4,
    size_multiple: int = 16,
    precision: str = "bf16",
    keep_mean_colour: bool = False,
) -> torch.Tensor:
    """Denoise an RGB image ``[3, H, W]`` in [0, 1] of any size; returns ``[3, H, W]`` float32 in [0, 1].

    Args:
        model: a denoising autoencoder in eval mode.
        rgb: the noisy image.
        patch_size: window side.
        overlap: fraction of a window shared with its neighbour (seamless blending).
        batch_size: windows per forward pass.
        size_multiple: window sides are multiples of this (the model's registry entry).
        precision: "bf16" (autocast) or "fp32".
        keep_mean_colour: shift each window's output so that its mean colour is the noisy window's
            (`with_input_mean_colour`). Gaussian and Poisson noise and blur leave the mean colour
            unchanged, so this removes a colour cast the model learned from its training stains
            (benchmarks/RESULTS.md); noise that moves the mean (dense salt-and-pepper) keeps that shift.
    """
    network = (lambda tiles: with_input_mean_colour(model, tiles)) if keep_mean_colour else model
    rgb = rgb.to(next(model.parameters()).device)
    out = sliding_window(network, rgb, (patch_size, patch_size), overlap=overlap, weights="seamless",
                         size_multiple=size_multiple, batch_size=batch_size, precision=precision,
                         accumulate_device=rgb.device)  # fmt: skip
    return out.clamp(0.0, 1.0)


def with_input_mean_colour(model: Callable[[torch.Tensor], torch.Tensor], tiles: torch.Tensor) -> torch.Tensor:
    """`model(tiles)` shifted per tile and channel to the input's mean: ``[B, C, h, w]`` -> ``[B, C, h, w]`` float32."""
    out = model(tiles).float()
    return out - out.mean(dim=(2, 3), keepdim=True) + tiles.float().mean(dim=(2, 3), keepdim=True)


def denoise_image(model: nn.Module, array: np.ndarray, **options: Any) -> np.ndarray:
    """Denoise pixels ``[H, W]`` or ``[H, W, C]`` (C = 1 to 4; alpha kept) into the same shape and dtype.

    `options` go to `denoise_array`.
    """
    unit = to_unit_range(array)
    pixels = unit[..., None] if unit.ndim == 2 else unit
    colour = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    rgb = torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)))
    denoised = denoise_array(model, rgb, **options).cpu().numpy().transpose(1, 2, 0)
    if pixels.shape[-1] < 3:
        denoised = denoised.mean(-1, keepdims=True)
    out = np.concatenate([denoised, pixels[..., denoised.shape[-1] :]], axis=-1)  # alpha as it was
    return from_unit_range(out.reshape(array.shape), array.dtype)


def _output_path(source: Path, target: Path, single: bool) -> Path:
    name = source.with_suffix(".tif").name if source.suffix.lower() == ".svs" else source.name
    if single and target.suffix and not target.is_dir():
        return target
    return target / name


def denoise_paths(
    model: nn.Module,
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    progress: bool = True,
    **options: Any,
) -> dict[str, list[Any]]:
    """Denoise an image file (into `target`, a file or a folder) or every image of a folder (into folder `target`).

    An image that cannot be read or written is reported and skipped; the rest continue. Nothing is
    written when an output would replace an input (`mednets.engine.inference.check_outputs`).

    Returns:
        `{"written": [paths], "failed": [(input, message)]}`.
    """
    from tqdm.auto import tqdm

    source, target = Path(source), Path(target)
    if not source.is_file():  # a folder of images goes into a folder
        check_output_folder(target, "target")
    files = list_image_files(source)
    check_outputs({path: [_output_path(path, target, single=source.is_file())] for path in files}, "target")
    written: list[Path] = []
    failed: list[tuple[str, str]] = []
    for path in tqdm(files, desc="denoising", unit="image", disable=not progress):
        try:
            volume = read_image(path)
            pages = volume.array.ndim - (2 if volume.channel_axis is None else 3)
            stack = volume.array.reshape(-1, *volume.array.shape[pages:])
            denoised = np.stack([denoise_image(model, page, **options) for page in stack]).reshape(volume.array.shape)
            out = Volume(denoised, channel_axis=volume.channel_axis)
            written.append(write_volume(out, _output_path(path, target, single=source.is_file())))
        except (MednetsError, OSError) as error:  # one bad image (or a full disk) is reported; the rest go on
            failed.append((str(path), failure_message(path, error)))
    return {"written": written, "failed": failed}
