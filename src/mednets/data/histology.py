"""Histology tiles for the denoising autoencoders: noise models, tissue detection, datasets.

Tiles are float32 ``[3, H, W]`` RGB in [0, 1]; the training target is always the clean tile in that
range (the autoencoders end in a sigmoid), never an ImageNet-normalised one.

Noise models take physical parameters (`add_noise`): ``gaussian`` (``sigma``, intensity units),
``poisson`` (``peak``: photons at white), ``speckle`` (``sigma`` of multiplicative noise),
``salt_and_pepper`` (``amount``: fraction of pixels; ``per_channel``; ``values``: ``binary`` sets 0 or
1, ``uniform`` a random value), ``gaussian_blur`` (``sigma`` in pixels), ``motion_blur`` (``length``
in pixels, ``angle`` in degrees, 0 = horizontal) and ``jpeg`` (``quality``). A `NoiseMixture` applies
stages in order, each with its own probability; a stage may pick one of several models. In a
mixture spec a parameter is a number, a range ``[low, high]`` drawn uniformly (integers when both
ends are), or ``{"choice": [...]}``. ``"seed"`` names the mixture of the seed's public code
(`SEED_MIXTURE`).

Tissue detection: a pixel is tissue when its mean optical density over RGB exceeds 0.15 (white glass
and near-white background are below) and it is not black (scanner padding); a tile is used when at
least `min_tissue` of its pixels are tissue.
"""

from __future__ import annotations

import inspect
import io as _io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from mednets.data.dataset import split_cases
from mednets.data.histology_samples import builtin_training_images
from mednets.data.images import holdout_rows
from mednets.data.io import list_image_files, read_rgb
from mednets.data.stain import stain_augment
from mednets.errors import ConfigError, InvalidInputError, UnknownNameError

__all__ = [
    "NOISE_MODELS",
    "SEED_MIXTURE",
    "DenoisingTiles",
    "NoiseMixture",
    "NoisyTiles",
    "add_noise",
    "denoising_datasets",
    "tissue_mask",
    "tissue_tiles",
]

TISSUE_OPTICAL_DENSITY = 0.15
BLACK_LEVEL = 0.1


# --- noise models -------------------------------------------------------------------------------


def _gaussian(tile: np.ndarray, rng: np.random.Generator, sigma: float = 0.1) -> np.ndarray:
    return tile + rng.normal(0.0, sigma, tile.shape)


def _poisson(tile: np.ndarray, rng: np.random.Generator, peak: float = 30.0) -> np.ndarray:
    return rng.poisson(tile * peak) / peak


def _speckle(tile: np.ndarray, rng: np.random.Generator, sigma: float = 0.1) -> np.ndarray:
    return tile * (1.0 + rng.normal(0.0, sigma, tile.shape))


def _salt_and_pepper(
    tile: np.ndarray,
    rng: np.random.Generator,
    amount: float = 0.05,
    per_channel: bool = False,
    values: str = "binary",
) -> np.ndarray:
    if values not in ("binary", "uniform"):
        raise ConfigError("invalid value", source="salt_and_pepper.values", expected="binary or uniform", got=values)
    shape = tile.shape if per_channel else tile.shape[1:]
    hits = rng.random(shape) < amount
    count = int(hits.sum())
    replacement = rng.random(count) < 0.5 if values == "binary" else rng.random(count)
    noisy = tile.copy()
    if per_channel:
        noisy[hits] = replacement
    else:
        noisy[:, hits] = np.asarray(replacement, dtype=np.float32)[None, :]
    return noisy


def _gaussian_blur(tile: np.ndarray, rng: np.random.Generator, sigma: float = 1.0) -> np.ndarray:
    return ndimage.gaussian_filter(tile, (0.0, sigma, sigma), mode="reflect")


def _motion_blur(tile: np.ndarray, rng: np.random.Generator, length: int = 7, angle: float = 0.0) -> np.ndarray:
    length = max(1, int(length))
    kernel = np.zeros((length, length), dtype=np.float32)
    kernel[length // 2, :] = 1.0
    if angle % 180:
        kernel = ndimage.rotate(kernel, angle, reshape=False, order=1)
    kernel /= max(float(kernel.sum()), 1e-6)
    return np.stack([ndimage.convolve(channel, kernel, mode="reflect") for channel in tile])


def _jpeg(tile: np.ndarray, rng: np.random.Generator, quality: int = 30) -> np.ndarray:
    from PIL import Image

    pixels = np.round(np.clip(tile, 0.0, 1.0) * 255.0).astype(np.uint8)
    image = Image.fromarray(pixels.transpose(1, 2, 0) if pixels.shape[0] == 3 else pixels[0])
    buffer = _io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(buffer), dtype=np.float32) / 255.0
    return decoded.transpose(2, 0, 1) if decoded.ndim == 3 else decoded[None]


_NOISE_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian": _gaussian,
    "poisson": _poisson,
    "speckle": _speckle,
    "salt_and_pepper": _salt_and_pepper,
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "jpeg": _jpeg,
}
NOISE_MODELS = tuple(_NOISE_FUNCTIONS)


def _noise_function(model: str) -> Callable[..., np.ndarray]:
    if model not in _NOISE_FUNCTIONS:
        raise UnknownNameError("unknown noise model", source="noise model", expected=", ".join(NOISE_MODELS), got=model)
    return _NOISE_FUNCTIONS[model]


def _check_parameters(model: str, names: Sequence[str]) -> None:
    accepted = [p for p in inspect.signature(_noise_function(model)).parameters if p not in ("tile", "rng")]
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise UnknownNameError(
            f"unknown parameter of noise model {model}", source="noise", expected=accepted, got=unknown
        )


def add_noise(tile: np.ndarray, model: str, rng: np.random.Generator, **parameters: Any) -> np.ndarray:
    """Degrade a clean tile with one noise model (parameters: see the module docstring).

    Args:
        tile: float ``[C, H, W]`` in [0, 1].
        model: one of `NOISE_MODELS`.
        rng: random generator.

    Returns:
        The noisy tile, float32 ``[C, H, W]`` clipped to [0, 1].

    Raises:
        UnknownNameError: unknown model or parameter.
    """
    _check_parameters(model, list(parameters))
    noisy = _noise_function(model)(np.asarray(tile, dtype=np.float32), rng, **parameters)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def _draw(value: Any, rng: np.random.Generator) -> Any:
    """A parameter value of a mixture spec: fixed, ``[low, high]`` (uniform) or ``{"choice": [...]}``."""
    if isinstance(value, Mapping):
        options = list(value["choice"])
        return options[int(rng.integers(len(options)))]
    if isinstance(value, list | tuple):
        low, high = value
        if isinstance(low, int) and isinstance(high, int):
            return int(rng.integers(low, high + 1))
        return float(rng.uniform(low, high))
    return value


@dataclass(frozen=True)
class _Stage:
    """One mixture stage: with `probability`, apply one of `options` (model name, parameter spec)."""

    probability: float
    options: tuple[tuple[str, dict[str, Any]], ...]


# The seed's public code (terejuricek/slide_autoencoder, noise_factor 0.3): gaussian noise (p 0.5,
# sigma 0.03), random-valued impulses on 2% of the values (p 0.3), then a blur (p 0.3): horizontal
# motion blur of 3, 5 or 7 pixels or a 3x3 / 5x5 gaussian (OpenCV's sigma 0.8 / 1.1), half each.
SEED_MIXTURE: tuple[dict[str, Any], ...] = (
    {"model": "gaussian", "p": 0.5, "sigma": 0.03},
    {"model": "salt_and_pepper", "p": 0.3, "amount": 0.02, "per_channel": True, "values": "uniform"},
    {
        "p": 0.3,
        "one_of": [
            {"model": "motion_blur", "length": {"choice": [3, 5, 7]}, "angle": 0.0},
            {"model": "gaussian_blur", "sigma": {"choice": [0.8, 1.1]}},
        ],
    },
)
_PRESETS = {"seed": SEED_MIXTURE}


class NoiseMixture:
    """Noise stages applied in order, each with its own probability; a draw that applies none is redrawn.

    Args:
        spec: ``"seed"`` or a list of stages ``{"model": name, "p": probability, **parameters}`` or
            ``{"p": probability, "one_of": [{"model": name, **parameters}, ...]}`` (equal odds).

    Raises:
        ConfigError: malformed spec; UnknownNameError: unknown preset, model or parameter.
    """

    def __init__(self, spec: str | Sequence[Mapping[str, Any]] = "seed") -> None:
        if isinstance(spec, str):
            if spec not in _PRESETS:
                raise UnknownNameError("unknown noise preset", source="data.noise", expected=list(_PRESETS), got=spec)
            spec = _PRESETS[spec]
        if not spec:
            raise ConfigError("a noise mixture needs at least one stage", source="data.noise")
        self.stages = tuple(self._stage(dict(entry), f"data.noise[{i}]") for i, entry in enumerate(spec))

    @staticmethod
    def _stage(entry: dict[str, Any], where: str) -> _Stage:
        probability = float(entry.pop("p", 1.0))
        if not 0.0 < probability <= 1.0:
            raise ConfigError("stage probability must be in (0, 1]", source=f"{where}.p", got=probability)
        choices = entry.pop("one_of", None)
        if choices is None:
            choices = [entry]
        elif entry:
            raise ConfigError("a one_of stage takes only p and one_of", source=where, got=sorted(entry))
        options = []
        for choice in choices:
            parameters = dict(choice)
            if "model" not in parameters:
                raise ConfigError(
                    "stage names no model", source=where, expected="model: one of " + ", ".join(NOISE_MODELS)
                )
            model = str(parameters.pop("model"))
            _check_parameters(model, list(parameters))
            options.append((model, parameters))
        return _Stage(probability, tuple(options))

    def __call__(self, tile: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """Degrade `tile` (float ``[C, H, W]`` in [0, 1]); returns the noisy tile and the models applied."""
        while True:
            fired = [stage for stage in self.stages if rng.random() < stage.probability]
            if fired:
                break
        noisy, applied = np.asarray(tile, dtype=np.float32), []
        for stage in fired:
            model, parameters = stage.options[int(rng.integers(len(stage.options)))]
            noisy = add_noise(noisy, model, rng, **{k: _draw(v, rng) for k, v in parameters.items()})
            applied.append(model)
        return noisy, applied


# --- tissue detection and tiles -----------------------------------------------------------------


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels of an RGB image ``[3, H, W]`` in [0, 1]: mean optical density > 0.15 and not black; ``[H, W]`` bool."""
    optical_density = -np.log(np.clip(rgb, 1.0 / 255.0, 1.0))
    return (optical_density.mean(0) > TISSUE_OPTICAL_DENSITY) & (rgb.max(0) > BLACK_LEVEL)


def tissue_tiles(rgb: np.ndarray, tile_size: int, stride: int, min_tissue: float) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the `tile_size` tiles on a `stride` grid with at least `min_tissue` tissue."""
    mask = tissue_mask(rgb)
    height, width = mask.shape
    corners = []
    for y in range(0, height - tile_size + 1, stride):
        for x in range(0, width - tile_size + 1, stride):
            if mask[y : y + tile_size, x : x + tile_size].mean() >= min_tissue:
                corners.append((y, x))
    return corners


# --- datasets -----------------------------------------------------------------------------------


def _augment_geometry(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and 90-degree turns: a slide has no up or left."""
    tile = np.rot90(tile, int(rng.integers(4)), axes=(1, 2))
    if rng.random() < 0.5:
        tile = tile[:, :, ::-1]
    return np.ascontiguousarray(tile)


class DenoisingTiles(Dataset):
    """Training samples: tissue tiles of the training images, jittered, augmented and degraded.

    Sample `index` is the tissue tile at grid corner `index` modulo their number (stride
    `tile_size // 2`), moved by up to half a stride; flips, 90-degree turns, stain augmentation and the noise are drawn from
    (seed, epoch, index), so a resumed run sees the same samples.

    Args:
        images: clean RGB images ``[3, H, W]`` in [0, 1], each at least `tile_size` on both sides.
        tile_size: tile side in pixels.
        noise: the noise mixture.
        min_tissue: least share of tissue pixels of a used tile.
        stain_scale: stain augmentation strength (`stain_augment`); 0 disables it.
        augment: flips and 90-degree turns.
        seed: base seed.
        epoch_size: samples per epoch (at least one per tissue tile).

    Returns (per sample):
        ``{"image": noisy [3, T, T], "target": clean [3, T, T]}`` float32 in [0, 1].
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        tile_size: int,
        noise: NoiseMixture,
        *,
        min_tissue: float = 0.25,
        stain_scale: float = 0.2,
        augment: bool = True,
        seed: int = 0,
        epoch_size: int = 64,
    ) -> None:
        self.images, self.tile_size, self.noise = list(images), int(tile_size), noise
        self.stain_scale, self.augment, self.seed, self.epoch = float(stain_scale), augment, seed, 0
        self.stride, self.epoch_size = max(1, self.tile_size // 2), epoch_size
        self.corners = [
            (i, y, x)
            for i, image in enumerate(self.images)
            for y, x in tissue_tiles(image, self.tile_size, self.stride, min_tissue)
        ]
        if not self.corners:
            raise InvalidInputError(
                "no training tile holds enough tissue",
                source="data.min_tissue",
                expected=f"images with {tile_size}-pixel tiles of at least {min_tissue:.0%} tissue",
            )

    def set_epoch(self, epoch: int) -> None:
        """Make the next samples depend on `epoch` (called by the trainer before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return max(self.epoch_size, len(self.corners))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image_index, y, x = self.corners[index % len(self.corners)]
        image = self.images[image_index]
        jitter = rng.integers(-(self.stride // 2), self.stride // 2 + 1, 2)
        y = int(np.clip(y + jitter[0], 0, image.shape[1] - self.tile_size))
        x = int(np.clip(x + jitter[1], 0, image.shape[2] - self.tile_size))
        clean = image[:, y : y + self.tile_size, x : x + self.tile_size]
        if self.augment:
            clean = _augment_geometry(clean, rng)
        if self.stain_scale > 0:
            clean = stain_augment(clean, rng, self.stain_scale)
        noisy, _ = self.noise(clean, rng)
        return {"image": torch.from_numpy(noisy), "target": torch.from_numpy(np.ascontiguousarray(clean))}


class NoisyTiles(Dataset):
    """Fixed evaluation tiles: non-overlapping tissue tiles with noise drawn once from (seed, tile).

    Args:
        images: clean RGB images ``[3, H, W]`` in [0, 1].
        tile_size: tile side in pixels.
        noise: the noise mixture.
        min_tissue: least share of tissue pixels of a used tile.
        max_tiles: keep at most this many tiles (evenly spaced over the list).
        seed: seed of the noise.
        names: a name per image, to label the tiles (default: the image index).

    Returns (per sample):
        ``{"image": noisy, "target": clean, "name": "<image>@y,x", "noise": "model+model"}``.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        tile_size: int,
        noise: NoiseMixture,
        *,
        min_tissue: float = 0.25,
        max_tiles: int | None = None,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        names = list(names) if names is not None else [str(i) for i in range(len(images))]
        corners = [
            (i, y, x)
            for i, image in enumerate(images)
            for y, x in tissue_tiles(image, tile_size, tile_size, min_tissue)
        ]
        if max_tiles is not None and len(corners) > max_tiles:
            corners = [corners[int(k)] for k in np.linspace(0, len(corners) - 1, max_tiles).round()]
        self.samples = []
        for number, (i, y, x) in enumerate(corners):
            clean = np.ascontiguousarray(images[i][:, y : y + tile_size, x : x + tile_size])
            noisy, applied = noise(clean, np.random.default_rng([seed, number]))
            self.samples.append(
                {"image": torch.from_numpy(noisy), "target": torch.from_numpy(clean), "name": f"{names[i]}@{y},{x}",
                 "noise": "+".join(applied)}
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def denoising_datasets(
    source: str | os.PathLike[str] | None,
    *,
    tile_size: int,
    noise: str | Sequence[Mapping[str, Any]],
    val_fraction: float,
    split_seed: int,
    min_tissue: float,
    stain_scale: float,
    augment: bool,
    seed: int,
    max_val_tiles: int = 16,
) -> tuple[DenoisingTiles, NoisyTiles]:
    """Training and validation tiles from an image file or folder (None: `builtin_training_images`).

    Two or more of a user's images are split by file (`split_cases`, seeded); a single image, and each
    built-in image (whose stains all belong in training), by rows: the bottom `val_fraction` of it
    (rounded to whole tiles) is the validation part.
    """
    if source is None:
        images, names = builtin_training_images()
    else:
        files = list_image_files(source)
        images, names = [read_rgb(path) for path in files], [path.stem for path in files]
    small = [name for name, image in zip(names, images, strict=True) if min(image.shape[1:]) < tile_size]
    if small:
        raise InvalidInputError(
            "images smaller than a tile", source=str(source), expected=f">= {tile_size} px", got=small
        )
    mixture = NoiseMixture(noise)
    if source is not None and len(images) >= 2:
        train_names, val_names = split_cases(names, val_fraction=val_fraction, seed=split_seed)
        train = [images[names.index(n)] for n in train_names]
        val, val_labels = [images[names.index(n)] for n in val_names], val_names
    else:
        held = [holdout_rows(image.shape[1], val_fraction, tile_size) for image in images]
        train = [image[:, :-rows] for image, rows in zip(images, held, strict=True)]
        val, val_labels = [image[:, -rows:] for image, rows in zip(images, held, strict=True)], names
    return (
        DenoisingTiles(train, tile_size, mixture, min_tissue=min_tissue, stain_scale=stain_scale, augment=augment,
                       seed=seed),
        NoisyTiles(val, tile_size, mixture, min_tissue=min_tissue, max_tiles=max_val_tiles, seed=split_seed,
                   names=val_labels),
    )  # fmt: skip
