"""Denoise images of any size with a trained autoencoder run: windowed, blended, written in the input's format.

`mednets denoise --run RUN IN OUT` calls `load_denoiser` and `denoise_paths`. Pixels are scaled to
[0, 1] by their bit depth (`mednets.data.images`), denoised with overlapping windows blended without
seams (`mednets.engine.sliding_window`, seamless weights) and written back with the input's dtype,
channels and format: grey images go through the RGB model as three equal channels and come back as
their mean, an alpha channel is kept as it was, and every page of a multi-page TIFF is denoised.

Whole-slide images (`mednets.data.wsi.is_slide`: SVS, NDPI, SCN, BIF, pyramidal or large tiled TIFFs)
are streamed by `denoise_slide`: one level, chosen by index, magnification or microns per pixel, is
read region by region, blended by `sliding_window_blocks` and written tile by tile into a pyramidal
tiled TIFF (`mednets.data.pyramid.write_pyramid`) that keeps the level's microns per pixel and
magnification. Memory does not grow with the slide's height and grows little with its width (a few
kB per column: benchmarks/wsi_streaming.py), and the pixels are those of denoising the whole level
in memory at the same settings, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mednets.atomic import check_not_inputs
from mednets.data.images import from_unit_range, to_unit_range
from mednets.data.io import TIFF_SUFFIXES, list_image_files, read_image, write_volume
from mednets.data.pyramid import write_pyramid
from mednets.data.stain import StainNormaliser
from mednets.data.volume import Volume
from mednets.data.wsi import SLIDE_SUFFIXES, choose_level, is_slide, open_slide
from mednets.devices import resolve_device
from mednets.engine.inference import check_output_folder, check_outputs
from mednets.engine.run import RunFolder
from mednets.engine.sliding_window import sliding_window, sliding_window_blocks
from mednets.errors import ConfigError, InvalidInputError, MednetsError, failure_message
from mednets.host_memory import reuse_freed_memory
from mednets.tasks import task_type

__all__ = [
    "denoise_array",
    "denoise_image",
    "denoise_paths",
    "denoise_slide",
    "estimate_noise_sigma",
    "load_denoiser",
    "with_input_mean_colour",
    "with_strength",
]


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
    strength: float | str = 1.0,
    noise_sigma: float | None = None,
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
        strength: how much of what the model removes is removed (`with_strength`): 0 returns the input,
            1 the model's output; "auto" scales each window's removed part down to the noise level
            estimated from the window (`estimate_noise_sigma`), so that a clean or lightly noisy image
            keeps its detail.
        noise_sigma: the input's gaussian noise sigma in [0, 1] units, when known: "auto" uses it
            instead of the estimate.
    """
    network = _network(model, keep_mean_colour, strength, noise_sigma)
    rgb = rgb.to(next(model.parameters()).device)
    out = sliding_window(network, rgb, (patch_size, patch_size), overlap=overlap, weights="seamless",
                         size_multiple=size_multiple, batch_size=batch_size, precision=precision,
                         accumulate_device=rgb.device)  # fmt: skip
    return out.clamp(0.0, 1.0)


def _network(
    model: nn.Module, keep_mean_colour: bool, strength: float | str = 1.0, noise_sigma: float | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the windows run: the model, with each tile's input mean colour (`with_input_mean_colour`) and
    at a `strength` (`with_strength`) when asked."""
    network = (lambda tiles: with_input_mean_colour(model, tiles)) if keep_mean_colour else model
    if noise_sigma is not None:
        if strength != "auto":
            raise ConfigError("a noise sigma is used by the automatic strength only", source="noise_sigma",
                              expected='strength "auto" (--strength auto)', got=strength)  # fmt: skip
        if not 0 <= noise_sigma < float("inf"):
            raise ConfigError("invalid noise sigma", source="noise_sigma", expected="a finite number >= 0",
                              got=noise_sigma)  # fmt: skip
    if strength == 1.0:
        return network
    if strength != "auto" and not (isinstance(strength, int | float) and 0 <= strength < float("inf")):
        raise ConfigError("invalid denoising strength", source="strength", expected='a finite number >= 0 or "auto"',
                          got=strength)  # fmt: skip
    return lambda tiles: with_strength(network, tiles, strength, noise_sigma)


def estimate_noise_sigma(tiles: torch.Tensor) -> torch.Tensor:
    """Gaussian noise sigma of each tile ``[B, C, H, W]`` -> ``[B]``, averaged over channels.

    Donoho's estimate: the median absolute finest diagonal Haar detail / 0.6745 (scikit-image's
    `estimate_sigma` does the same with a Daubechies-2 wavelet); image structure adds to it a little.
    """
    x = tiles.float()[..., : tiles.shape[-2] // 2 * 2, : tiles.shape[-1] // 2 * 2]
    detail = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return (detail.abs().flatten(2).median(dim=2).values / 0.6745).mean(dim=1)


def with_strength(
    network: Callable[[torch.Tensor], torch.Tensor],
    tiles: torch.Tensor,
    strength: float | str,
    noise_sigma: float | None = None,
) -> torch.Tensor:
    """``tiles + s * (network(tiles) - tiles)`` per tile ``[B, C, h, w]``, float32.

    `strength` "auto": ``s = min(1, sigma_noise / sigma_removed)``, the noise sigma (`noise_sigma`, else
    the tile's `estimate_noise_sigma`) over the standard deviation of what the network removes; a
    network that removes more than the noise also removes detail, and is scaled back to the noise.
    """
    tiles = tiles.float()
    removed = network(tiles).float() - tiles
    if strength == "auto":
        noise = (
            estimate_noise_sigma(tiles)
            if noise_sigma is None
            else torch.full(tiles.shape[:1], noise_sigma, device=tiles.device)
        )
        scale = (noise / removed.flatten(1).std(dim=1).clamp_min(1e-6)).clamp(max=1.0)
        return tiles + scale[:, None, None, None] * removed
    return tiles + float(strength) * removed


def with_input_mean_colour(model: Callable[[torch.Tensor], torch.Tensor], tiles: torch.Tensor) -> torch.Tensor:
    """`model(tiles)` shifted per tile and channel to the input's mean: ``[B, C, h, w]`` -> ``[B, C, h, w]`` float32."""
    out = model(tiles).float()
    return out - out.mean(dim=(2, 3), keepdim=True) + tiles.float().mean(dim=(2, 3), keepdim=True)


def denoise_image(model: nn.Module, array: np.ndarray, *, stain_normalise: bool = False, **options: Any) -> np.ndarray:
    """Denoise pixels ``[H, W]`` or ``[H, W, C]`` (C = 1 to 4; alpha kept) into the same shape and dtype.

    With `stain_normalise`, the model sees the image in Macenko's reference stains (fitted to this
    image, `mednets.data.stain.StainNormaliser`) and its output goes back to the image's own stains.
    Other `options` go to `denoise_array`.

    Raises:
        InvalidInputError: `stain_normalise` on an image with too little stained tissue.
    """
    rgb = _model_input(array)
    if not stain_normalise:
        return _model_output(denoise_array(model, rgb, **options), array)
    normaliser = StainNormaliser(rgb.numpy())
    reference = torch.from_numpy(normaliser.to_reference(rgb.numpy()))
    denoised = denoise_array(model, reference, **options)
    return _model_output(torch.from_numpy(normaliser.from_reference(denoised.cpu().numpy())), array)


def _model_input(array: np.ndarray) -> torch.Tensor:
    """Pixels ``[H, W]`` or ``[H, W, C]`` as the RGB model's input ``[3, H, W]`` float32 in [0, 1]."""
    unit = to_unit_range(array)
    pixels = unit[..., None] if unit.ndim == 2 else unit
    colour = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)))


def _model_output(denoised: torch.Tensor, array: np.ndarray) -> np.ndarray:
    """The model's output ``[3, H, W]`` back in the shape and dtype of the input pixels `array` (alpha as it was)."""
    colour = denoised.cpu().numpy().transpose(1, 2, 0)
    pixels = array[..., None] if array.ndim == 2 else array
    if pixels.shape[-1] < 3:
        colour = colour.mean(-1, keepdims=True)
    if pixels.shape[-1] > colour.shape[-1]:  # alpha (or grey's alpha) as it was
        colour = np.concatenate([colour, to_unit_range(pixels[..., colour.shape[-1] :])], axis=-1)
    return from_unit_range(colour.reshape(array.shape), array.dtype)


def denoise_slide(
    model: nn.Module,
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    level: int | None = None,
    magnification: float | None = None,
    mpp: float | None = None,
    tile_size: int = 256,
    compression: str | None = None,
    quality: int = 90,
    progress: bool = False,
    **options: Any,
) -> Path:
    """Denoise one level of a whole-slide image into a pyramidal tiled TIFF, band by band (module docstring).

    Args:
        model: a denoising autoencoder in eval mode.
        source: the slide (SVS, tiled TIFF, NDPI, SCN, BIF).
        target: the ``.tif`` to write.
        level, magnification, mpp: the level to denoise (`mednets.data.wsi.choose_level`; level 0 by default).
        tile_size: the output's tile side, a multiple of 16.
        compression: the output's tiles, "jpeg", "jpeg2000" (lossless), "deflate" or "none"; None: as the
            source level's (JPEG stays JPEG at `quality`, JPEG 2000 stays JPEG 2000, others deflate).
        quality: JPEG quality.
        progress: show a progress bar over the rows.
        options: `denoise_array`'s (patch_size, overlap, batch_size, size_multiple, precision, keep_mean_colour,
            strength, noise_sigma).

    Returns:
        The path written.

    Raises:
        InvalidInputError: unreadable slide, no such level, or `target` is `source`; ConfigError: bad options.
    """
    from tqdm.auto import tqdm

    if options.pop("stain_normalise", False):
        raise ConfigError("stain normalisation is for images, not whole slides", source=str(source),
                          expected="no --stain-normalise, or a PNG/JPEG/TIFF image")  # fmt: skip
    check_not_inputs([target], [source], "target")
    with open_slide(source) as slide, reuse_freed_memory():
        chosen = choose_level(slide, level=level, magnification=magnification, mpp=mpp)
        height, width = chosen.shape
        if compression is None:
            lossy = chosen.compression == "jpeg" and slide.dtype == np.uint8 and slide.channels in (1, 3)
            compression = "jpeg" if lossy else "jpeg2000" if chosen.compression == "jpeg2000" else "deflate"

        def read_region(top: int, left: int, rows: int, columns: int) -> torch.Tensor:
            return _model_input(slide.read_region(chosen.index, top, left, rows, columns))

        bar = tqdm(total=height, desc=Path(source).name, unit="row", disable=not progress, leave=False)

        def bands() -> Iterator[np.ndarray]:
            """The denoised level in row bands ``[rows, W, C]``, each made of the blender's blocks."""
            pieces: list[np.ndarray] = []
            for top, left, denoised in _blend_blocks(model, read_region, (height, width), **options):
                pixels = np.empty((*denoised.shape[1:], slide.channels), slide.dtype)  # its shape and dtype
                if slide.channels in (2, 4):  # the alpha channel is kept as it was
                    pixels = slide.read_region(chosen.index, top, left, *denoised.shape[1:])
                pieces.append(_model_output(denoised, pixels))
                if left + denoised.shape[2] == width:  # the band is complete
                    yield np.concatenate(pieces, axis=1)
                    pieces = []
                    bar.update(denoised.shape[1])

        try:
            return write_pyramid(target, bands(), (height, width, slide.channels), dtype=slide.dtype,
                                 tile_size=tile_size, mpp=chosen.mpp, magnification=chosen.magnification,
                                 compression=compression, quality=quality)  # fmt: skip
        finally:
            bar.close()


def _blend_blocks(
    model: nn.Module,
    read_region: Callable[[int, int, int, int], torch.Tensor],
    shape: tuple[int, int],
    *,
    patch_size: int = 256,
    overlap: float = 0.25,
    batch_size: int = 4,
    size_multiple: int = 16,
    precision: str = "bf16",
    keep_mean_colour: bool = False,
    strength: float | str = 1.0,
    noise_sigma: float | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """`denoise_array` over an image read region by region: its output in blocks ``(top, left, [3, h, w])``."""
    network = _network(model, keep_mean_colour, strength, noise_sigma)
    for top, left, block in sliding_window_blocks(network, read_region, shape, (patch_size, patch_size),
                                                  overlap=overlap, batch_size=batch_size,
                                                  size_multiple=size_multiple, precision=precision):  # fmt: skip
        yield top, left, block.clamp(0.0, 1.0)


def _output_path(source: Path, target: Path, single: bool) -> Path:
    name = source.with_suffix(".tif").name if source.suffix.lower() in SLIDE_SUFFIXES else source.name
    if single and target.suffix and not target.is_dir():
        return target
    return target / name


def denoise_paths(
    model: nn.Module,
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    progress: bool = True,
    level: int | None = None,
    magnification: float | None = None,
    mpp: float | None = None,
    tile_size: int = 256,
    compression: str | None = None,
    **options: Any,
) -> dict[str, list[Any]]:
    """Denoise an image file (into `target`, a file or a folder) or every image of a folder (into folder `target`).

    Whole-slide images go through `denoise_slide` (one level, streamed, a pyramidal TIFF out, ``.svs``
    and the other scanner formats renamed ``.tif``); so does any TIFF when a level, magnification or
    mpp is asked for. An image that cannot be read or written is reported and skipped; the rest
    continue. Nothing is written when an output would replace an input
    (`mednets.engine.inference.check_outputs`).

    Args:
        level, magnification, mpp: the slide level to denoise (`mednets.data.wsi.choose_level`); a
            PNG/JPEG has level 0 only.
        tile_size, compression: the pyramidal TIFF's (`denoise_slide`).
        options: `denoise_image`'s (`stain_normalise`, images only) and `denoise_array`'s.

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
            output = _output_path(path, target, single=source.is_file())
            if _as_slide(path, level, magnification, mpp):
                written.append(denoise_slide(model, path, output, level=level, magnification=magnification, mpp=mpp,
                                             tile_size=tile_size, compression=compression, progress=progress,
                                             **options))  # fmt: skip
                continue
            volume = read_image(path)
            pages = volume.array.ndim - (2 if volume.channel_axis is None else 3)
            stack = volume.array.reshape(-1, *volume.array.shape[pages:])
            denoised = np.stack([denoise_image(model, page, **options) for page in stack]).reshape(volume.array.shape)
            out = Volume(denoised, channel_axis=volume.channel_axis)
            written.append(write_volume(out, output))
        except (MednetsError, OSError) as error:  # one bad image (or a full disk) is reported; the rest go on
            failed.append((str(path), failure_message(path, error)))
    return {"written": written, "failed": failed}


def _as_slide(path: Path, level: int | None, magnification: float | None, mpp: float | None) -> bool:
    """Whether `path` goes through `denoise_slide`: a slide, or a TIFF with a level asked for.

    Raises:
        InvalidInputError: a level other than 0, a magnification or an mpp asked of a PNG/JPEG.
    """
    if is_slide(path):
        return True
    if path.suffix.lower() in TIFF_SUFFIXES + SLIDE_SUFFIXES:
        return level is not None or magnification is not None or mpp is not None
    if level or magnification is not None or mpp is not None:
        raise InvalidInputError("not a whole-slide image: one level, no magnification or mpp", source=str(path),
                                expected="level 0, or a slide (SVS, tiled TIFF, NDPI, SCN, BIF)",
                                got={"level": level, "magnification": magnification, "mpp": mpp})  # fmt: skip
    return False
