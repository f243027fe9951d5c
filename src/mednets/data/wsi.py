"""Whole-slide images: open a slide, list its levels with their size, downsample, mpp and magnification, read regions.

Reading goes through tiffslide (tifffile underneath, imagecodecs for the tiles' JPEG and JPEG 2000):
Aperio SVS (JPEG or JPEG 2000 tiles), generic tiled pyramidal TIFF and the other TIFF-based slides
tiffslide knows (Hamamatsu NDPI, Leica SCN, Ventana BIF, Philips TIFF). A level is chosen by its index,
its magnification (objective power, 20 = 20x) or its microns per pixel; mednets reads the level's own
pixels and never resamples. Regions are given in the chosen level's pixels, ``(top, left, height,
width)``, and come back as ``[h, w, C]`` (grey slides: C = 1) in the file's dtype.

`mednets.data.pyramid` writes slides (tiled pyramidal TIFFs) that this module reads back with
their mpp and magnification.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mednets.data.pyramid import DESCRIPTION_KEY
from mednets.errors import ConfigError, InvalidInputError

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideLevel", "choose_level", "is_slide", "open_slide"]

SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")
_SLIDE_FORMATS = "a tiled whole-slide image (SVS, pyramidal TIFF, NDPI, SCN, BIF)"
# A single-level tiled TIFF is streamed as a slide from this many pixels on (8192 x 8192).
_LARGE_LEVEL = 8192 * 8192


@dataclass(frozen=True)
class SlideLevel:
    """One resolution level of a slide.

    Attributes:
        index: 0 is full resolution.
        shape: ``(height, width)`` in pixels.
        downsample: level-0 pixels per pixel of this level.
        mpp: microns per pixel (x) at this level; None when the file does not record it.
        magnification: objective power at this level (level 0's divided by `downsample`); None when unknown.
        tile_shape: ``(height, width)`` of the file's tiles; None for a striped level.
        compression: the tiles' codec family: "jpeg", "jpeg2000", "deflate", "none" or tifffile's name.
    """

    index: int
    shape: tuple[int, int]
    downsample: float
    mpp: float | None
    magnification: float | None
    tile_shape: tuple[int, int] | None
    compression: str


class Slide:
    """An open whole-slide image; use as a context manager, or `close` it.

    Attributes:
        path: the file.
        levels: its levels, full resolution first.
        channels: samples per pixel (3 for RGB, 1 for grey).
        dtype: the pixels' dtype.
        vendor: tiffslide's name of the format ("aperio", "generic-tiff", ...).

    Raises:
        InvalidInputError: the file is missing, not a slide, corrupt or truncated.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidInputError("file not found", source=str(self.path))
        try:
            import tiffslide

            self._slide = tiffslide.TiffSlide(str(self.path))
        except Exception as error:
            raise InvalidInputError(f"cannot open slide: {error}", source=str(self.path),
                                    expected=_SLIDE_FORMATS) from error  # fmt: skip
        try:
            self._describe()
        except InvalidInputError:
            self.close()
            raise
        except Exception as error:
            self.close()
            raise InvalidInputError(f"cannot read the slide's levels: {error}", source=str(self.path),
                                    expected=_SLIDE_FORMATS) from error  # fmt: skip

    def _describe(self) -> None:
        properties = self._slide.properties
        series = self._slide.ts_tifffile.series[properties["tiffslide.series-index"]]
        axes = properties["tiffslide.series-axes"]
        self.channels = {"YXS": series.shape[-1], "CYX": series.shape[0]}.get(axes, 1)
        self.dtype = np.dtype(series.dtype)
        self.vendor = str(properties.get("tiffslide.vendor") or "generic-tiff")
        mpp = _positive(properties.get("tiffslide.mpp-x"))
        power = _positive(properties.get("tiffslide.objective-power")) or _written_objective_power(properties)
        levels = []
        size = self.path.stat().st_size
        for index, ((width, height), downsample) in enumerate(
            zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
        ):
            page = series.levels[index].keyframe
            _check_tile_offsets(page, size, index, self.path)
            tile = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else None
            levels.append(SlideLevel(index, (int(height), int(width)), float(downsample),
                                     None if mpp is None else mpp * downsample,
                                     None if power is None else power / downsample, tile,
                                     _compression_family(page.compression)))  # fmt: skip
        self.levels = tuple(levels)

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Pixels of a region of one level: ``[height, width, C]`` in the slide's dtype.

        Args:
            level: the level's index.
            top, left: the region's first row and column, in the level's pixels.
            height, width: the region's size; it must lie inside the level.

        Raises:
            InvalidInputError: the region leaves the level, or its tiles cannot be decoded.
        """
        shape = self.levels[_level_index(self, level)].shape
        if height < 1 or width < 1 or top < 0 or left < 0 or top + height > shape[0] or left + width > shape[1]:
            raise InvalidInputError(f"region outside level {level}", source=str(self.path),
                                    expected=f"rows and columns within {shape}",
                                    got={"top": top, "left": left, "height": height, "width": width})  # fmt: skip
        downsample = self._slide.level_downsamples[level]
        location = (_level0_coordinate(left, downsample), _level0_coordinate(top, downsample))
        try:
            region = self._slide.read_region(location, level, (width, height), as_array=True, padding=False)
        except Exception as error:  # corrupt tiles: the codec's own error type
            raise InvalidInputError(f"cannot decode level {level}, rows {top}-{top + height}, columns "
                                    f"{left}-{left + width}: {error}", source=str(self.path)) from error  # fmt: skip
        region = np.asarray(region)
        if region.shape[:2] != (height, width):
            raise InvalidInputError(f"level {level} gave a region of another size (truncated or corrupt)",
                                    source=str(self.path), expected=(height, width), got=region.shape[:2])  # fmt: skip
        return region

    def read_rows(self, level: int, first: int, stop: int) -> np.ndarray:
        """Rows ``[first, stop)`` of a level, whole width: ``[stop - first, W, C]``."""
        return self.read_region(level, first, 0, stop - first, self.levels[_level_index(self, level)].shape[1])

    def close(self) -> None:
        """Close the file."""
        self._slide.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, levels={[level.shape for level in self.levels]})"


def open_slide(path: str | os.PathLike[str]) -> Slide:
    """Open a whole-slide image (`Slide`, a context manager).

    Raises:
        InvalidInputError: the file is missing, not a slide, corrupt or truncated.
    """
    return Slide(path)


def is_slide(path: str | os.PathLike[str]) -> bool:
    """Whether to read `path` as a whole-slide image rather than a page-by-page TIFF.

    Slides are the scanner formats (``.svs``, ``.ndpi``, ``.scn``, ``.bif``) and tiled TIFFs with several
    levels or more than 8192 x 8192 pixels; other TIFFs (stacks, plain images) are not. An unreadable
    TIFF is not a slide here: its reader reports the problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff") or not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            page = series.keyframe
            if not page.is_tiled or series.ndim not in (2, 3) or (series.ndim == 3 and series.axes != "YXS"):
                return False
            pixels = int(np.prod(series.shape[:2]))
            return len(series.levels) > 1 or pixels > _LARGE_LEVEL or bool(tif.is_svs or tif.is_ndpi)
    except Exception:
        return False


def choose_level(
    slide: Slide,
    *,
    level: int | None = None,
    magnification: float | None = None,
    mpp: float | None = None,
    tolerance: float = 0.1,
) -> SlideLevel:
    """The level to read: by index, by magnification (objective power) or by microns per pixel; level 0 by default.

    A magnification or mpp picks the level nearest to it, which must lie within `tolerance` (relative)
    of the request: mednets reads a level's own pixels and does not resample.

    Raises:
        ConfigError: more than one of `level`, `magnification` and `mpp`, or a value out of range.
        InvalidInputError: the slide has no such level, or does not record its magnification or mpp.
    """
    given = {name: value for name, value in (("level", level), ("magnification", magnification), ("mpp", mpp))
             if value is not None}  # fmt: skip
    if len(given) > 1:
        raise ConfigError("choose the level one way", source="level", expected="one of level, magnification, mpp",
                          got=given)  # fmt: skip
    if level is not None or not given:
        return slide.levels[_level_index(slide, level or 0)]
    name, wanted = next(iter(given.items()))
    if not wanted > 0:
        raise ConfigError(f"{name} must be positive", source=name, got=wanted)
    unit = "x" if name == "magnification" else " um/pixel"
    known = [(lvl, getattr(lvl, name)) for lvl in slide.levels if getattr(lvl, name) is not None]
    if not known:
        raise InvalidInputError(f"the slide does not record its {name}", source=str(slide.path),
                                expected="a level index instead")  # fmt: skip
    best, value = min(known, key=lambda item: abs(math.log(item[1] / wanted)))
    if abs(value / wanted - 1.0) > tolerance:
        raise InvalidInputError(f"no level at {wanted:g}{unit}", source=str(slide.path),
                                expected=", ".join(f"level {lvl.index}: {v:.3g}{unit}" for lvl, v in known),
                                got=f"nearest {value:.3g}{unit}")  # fmt: skip
    return best


def _level_index(slide: Slide, level: int) -> int:
    if not isinstance(level, int | np.integer) or not 0 <= level < len(slide.levels):
        raise InvalidInputError("no such level", source=str(slide.path),
                                expected=f"a level from 0 to {len(slide.levels) - 1}", got=level)  # fmt: skip
    return int(level)


def _level0_coordinate(coordinate: int, downsample: float) -> int:
    """The level-0 coordinate that tiffslide maps back to `coordinate` (it takes ``int(x / downsample)``)."""
    base = math.ceil(coordinate * downsample)
    while base > 0 and int(base / downsample) > coordinate:
        base -= 1
    while int(base / downsample) < coordinate:
        base += 1
    return base


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _written_objective_power(properties: dict[str, Any]) -> float | None:
    """The objective power `mednets.data.pyramid` keeps in the description (generic TIFFs have no tag for it)."""
    try:
        description = json.loads(properties.get("tiff.ImageDescription") or "")
        return _positive(description[DESCRIPTION_KEY]["objective_power"])
    except (ValueError, TypeError, KeyError):
        return None


def _compression_family(compression: Any) -> str:
    name = str(getattr(compression, "name", compression)).lower()
    if "jp2000" in name or "jpeg2000" in name:
        return "jpeg2000"
    if name in ("jpeg", "ojpeg"):
        return "jpeg"
    if name in ("adobe_deflate", "deflate"):
        return "deflate"
    return name


def _check_tile_offsets(page: Any, file_size: int, level: int, path: Path) -> None:
    """A truncated file: tiles that would end past the end of the file."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    end = int((offsets + counts).max()) if offsets.size else 0
    if end > file_size:
        raise InvalidInputError(f"level {level}'s tiles end past the end of the file (truncated)",
                                source=str(path), expected=f">= {end} bytes", got=f"{file_size} bytes")  # fmt: skip
