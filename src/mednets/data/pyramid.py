"""Tiled pyramidal TIFFs written from row bands, tile by tile, with the microns per pixel and magnification kept.

`write_pyramid` lays a slide out as OpenSlide's generic tiled TIFF: level 0 first, then each
subresolution level (sides halved, rounded down, 2x2 means) as a reduced-resolution page, every level
tiled, with the microns per pixel in the resolution tags and the objective power in the description
(JSON, under ``"mednets"``; `mednets.data.wsi` reads it back). Level 0 comes from an iterator of row
bands, top to bottom, and is written tile by tile as the rows arrive; the smaller levels are built
from the same rows as they pass and kept, zlib-compressed, in unnamed temporary files beside the
target until level 0 is written. Memory holds a tile row of each level, never a level. The file is
written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from mednets.atomic import atomic_path
from mednets.errors import ConfigError, InvalidInputError

__all__ = ["COMPRESSIONS", "DESCRIPTION_KEY", "pyramid_shapes", "write_pyramid"]

COMPRESSIONS = ("jpeg", "jpeg2000", "deflate", "none")
DESCRIPTION_KEY = "mednets"  # the description's JSON key for mpp and objective power
_TIFF_COMPRESSION = {"jpeg": "jpeg", "jpeg2000": "jpeg2000", "deflate": "zlib", "none": None}


def pyramid_shapes(height: int, width: int, tile_size: int) -> list[tuple[int, int]]:
    """Level shapes ``(height, width)`` of a pyramid: sides halved (rounded down) until a level fits one tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile_size and min(shapes[-1]) >= 2:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return shapes


def write_pyramid(
    path: str | os.PathLike[str],
    bands: Iterable[np.ndarray],
    shape: tuple[int, int, int],
    *,
    dtype: np.dtype | type = np.uint8,
    tile_size: int = 256,
    mpp: float | None = None,
    magnification: float | None = None,
    compression: str = "deflate",
    quality: int = 90,
) -> Path:
    """Write a tiled pyramidal TIFF from level 0's row bands, tile by tile, atomically (module docstring).

    Args:
        path: the ``.tif`` to write.
        bands: arrays ``[rows, W, C]`` of `dtype`, top to bottom, whose rows add up to the height.
        shape: level 0's ``(H, W, C)``; C = 1 (grey), 3 (RGB) or 4 (RGBA).
        tile_size: the tiles' side, a multiple of 16.
        mpp: microns per pixel of level 0, kept in the resolution tags (scaled for every level).
        magnification: objective power of level 0, kept in the description.
        compression: "jpeg" (uint8, 1 or 3 channels; at `quality`), "jpeg2000" (lossless), "deflate" or "none".
        quality: the JPEG quality, 1 to 100.

    Returns:
        The path written.

    Raises:
        ConfigError: a compression, tile size or quality the writer cannot use for these pixels.
        InvalidInputError: the bands do not match `shape` and `dtype`.
    """
    import tifffile

    path, dtype = Path(path), np.dtype(dtype)
    height, width, channels = shape
    _check_write_options(path, shape, dtype, tile_size, compression, quality)
    shapes = pyramid_shapes(height, width, tile_size)
    options: dict[str, Any] = {
        "tile": (tile_size, tile_size),
        "dtype": dtype,
        "photometric": "rgb" if channels >= 3 else "minisblack",
        "extrasamples": ("unassalpha",) if channels == 4 else None,
        "compression": _TIFF_COMPRESSION[compression],
        "compressionargs": {"level": quality} if compression == "jpeg" else None,
        "metadata": None,
        # tifffile encodes as many tiles at once as fit its buffer (512 MiB by default): 64 tiles here
        "buffersize": 64 * tile_size * tile_size * channels * dtype.itemsize,
    }
    description = json.dumps({DESCRIPTION_KEY: {"mpp": mpp, "objective_power": magnification, "levels": len(shapes)}})
    bigtiff = height * width * channels * dtype.itemsize * 4 // 3 > 2**32 - 2**28  # over 4 GiB uncompressed
    with contextlib.ExitStack() as stack:
        temporary = stack.enter_context(atomic_path(path))
        spills = [stack.enter_context(_Spill(path.parent, tile_size)) for _ in shapes[1:]]
        pyramid = _Pyramid(spills)
        strips = _tile_rows(bands, shape, dtype, tile_size, path)
        with tifffile.TiffWriter(str(temporary), bigtiff=bigtiff) as tif:
            tif.write(_tiles(pyramid.feed(strips), tile_size, channels), shape=_page_shape(shapes[0], channels),
                      description=description, software="mednets", **_resolution(mpp, 1.0, 1.0), **options)  # fmt: skip
            if next(strips, None) is not None:
                raise InvalidInputError("more rows than the slide's height", source=str(path), expected=height)
            pyramid.finish()
            for (level_height, level_width), spill in zip(shapes[1:], spills, strict=True):
                tif.write(_tiles(spill.strips(), tile_size, channels), shape=_page_shape((level_height, level_width), channels),
                          subfiletype=1, **_resolution(mpp, width / level_width, height / level_height), **options)  # fmt: skip
    return path


def _check_write_options(
    path: Path, shape: tuple[int, int, int], dtype: np.dtype, tile_size: int, compression: str, quality: int
) -> None:
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise InvalidInputError("a pyramidal TIFF is written to a .tif or .tiff file", source=str(path))
    if compression not in COMPRESSIONS:
        raise ConfigError(
            "unknown compression", source="compression", expected=", ".join(COMPRESSIONS), got=compression
        )
    if tile_size < 16 or tile_size % 16:
        raise ConfigError("TIFF tiles need a side that is a multiple of 16", source="tile_size", got=tile_size)
    if len(shape) != 3 or min(shape) < 1 or shape[2] not in (1, 3, 4):
        raise InvalidInputError("a slide is [H, W, C] with C = 1, 3 or 4", source=str(path), got=shape)
    if compression == "jpeg" and (dtype != np.uint8 or shape[2] == 4 or not 1 <= quality <= 100):
        raise ConfigError("JPEG tiles hold 8-bit grey or RGB pixels at a quality from 1 to 100", source="compression",
                          expected="deflate, jpeg2000 or none for these pixels",
                          got={"dtype": str(dtype), "channels": shape[2], "quality": quality})  # fmt: skip


def _resolution(mpp: float | None, scale_x: float, scale_y: float) -> dict[str, Any]:
    """tifffile's resolution arguments: pixels per centimetre of a level `scale` times coarser than level 0."""
    if mpp is None:
        return {}
    return {"resolution": (1e4 / (mpp * scale_x), 1e4 / (mpp * scale_y)), "resolutionunit": "CENTIMETER"}


def _page_shape(shape: tuple[int, int], channels: int) -> tuple[int, ...]:
    return shape if channels == 1 else (*shape, channels)


def _tile_rows(
    bands: Iterable[np.ndarray], shape: tuple[int, int, int], dtype: np.dtype, tile_size: int, path: Path
) -> Iterator[np.ndarray]:
    """Regroup row bands ``[rows, W, C]`` into strips of `tile_size` rows (the last one may be shorter)."""
    height = shape[0]
    pending: list[np.ndarray] = []
    count = done = 0
    for band in bands:
        band = np.asarray(band)
        if band.ndim != 3 or band.shape[1:] != shape[1:] or band.dtype != dtype:
            raise InvalidInputError("a row band does not match the slide", source=str(path),
                                    expected=f"[rows, {shape[1]}, {shape[2]}] {dtype}",
                                    got=f"{list(band.shape)} {band.dtype}")  # fmt: skip
        pending.append(band)
        count += len(band)
        while count >= tile_size or (count and done + count >= height):
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            take = min(tile_size, count)
            if done + take > height:
                raise InvalidInputError("more rows than the slide's height", source=str(path), expected=height)
            yield joined[:take]
            done += take
            rest = joined[take:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if done + count != height:
        raise InvalidInputError("the row bands end before the slide's last row", source=str(path),
                                expected=height, got=done + count)  # fmt: skip


def _tiles(strips: Iterable[np.ndarray], tile_size: int, channels: int) -> Iterator[np.ndarray]:
    """The tiles of each strip ``[rows, W, C]``, left to right (tifffile pads the edge tiles)."""
    for strip in strips:
        for left in range(0, strip.shape[1], tile_size):
            tile = strip[:, left : left + tile_size]
            yield np.ascontiguousarray(tile[..., 0] if channels == 1 else tile)


class _Pyramid:
    """Feeds level-0 strips through 2x2 means into the spills of levels 1, 2, ...: each level's rows make the next's."""

    def __init__(self, spills: list[_Spill]) -> None:
        self.spills = spills
        self.odd_rows: list[np.ndarray | None] = [None] * len(spills)  # a row waiting for its pair, per level

    def feed(self, strips: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for strip in strips:
            self._add(0, strip)
            yield strip

    def _add(self, level: int, rows: np.ndarray) -> None:
        if level >= len(self.spills):
            return
        odd = self.odd_rows[level]
        if odd is not None:
            rows = np.concatenate([odd, rows])
        pairs = len(rows) // 2
        self.odd_rows[level] = rows[2 * pairs :] if len(rows) % 2 else None
        if pairs:
            halved = _halve(rows[: 2 * pairs])
            self.spills[level].add(halved)
            self._add(level + 1, halved)

    def finish(self) -> None:
        """Write the rows still held; an unpaired last row is dropped (sides round down)."""
        for spill in self.spills:
            spill.flush()


def _halve(rows: np.ndarray) -> np.ndarray:
    """2x2 means of ``[2n, W, C]`` (rounded half up; an odd last column dropped): ``[n, W // 2, C]``."""
    width = rows.shape[1] // 2
    blocks = rows[:, : 2 * width].reshape(rows.shape[0] // 2, 2, width, 2, rows.shape[2])
    wide = np.uint64 if rows.dtype.itemsize > 2 else np.uint32
    if np.issubdtype(rows.dtype, np.floating):
        return blocks.mean(axis=(1, 3), dtype=np.float64).astype(rows.dtype)
    return ((blocks.sum(axis=(1, 3), dtype=wide) + 2) // 4).astype(rows.dtype)


class _Spill:
    """Rows of one subresolution level, kept as zlib-compressed strips in an unnamed temporary file."""

    def __init__(self, folder: Path, strip_rows: int) -> None:
        self.folder, self.strip_rows = folder, strip_rows
        self.pending: list[np.ndarray] = []
        self.sizes: list[int] = []
        self.layout: tuple[tuple[int, ...], np.dtype] | None = None
        self.file: IO[bytes] | None = None

    def __enter__(self) -> _Spill:
        self.file = tempfile.TemporaryFile(dir=self.folder, prefix=".mednets-pyramid-")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.file is not None:
            self.file.close()

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        while sum(len(r) for r in self.pending) >= self.strip_rows:
            joined = np.concatenate(self.pending)
            self._write(joined[: self.strip_rows])
            self.pending = [joined[self.strip_rows :]]

    def flush(self) -> None:
        rows = np.concatenate(self.pending) if self.pending else None
        if rows is not None and len(rows):
            self._write(rows)
        self.pending = []

    def _write(self, strip: np.ndarray) -> None:
        assert self.file is not None  # opened by __enter__
        self.layout = (strip.shape[1:], strip.dtype)
        data = zlib.compress(np.ascontiguousarray(strip).tobytes(), 1)
        self.file.write(data)
        self.sizes.append(len(data))

    def strips(self) -> Iterator[np.ndarray]:
        """The strips written, top to bottom."""
        assert self.file is not None and self.layout is not None
        self.file.seek(0)
        row_shape, dtype = self.layout
        for size in self.sizes:
            yield np.frombuffer(zlib.decompress(self.file.read(size)), dtype).reshape(-1, *row_shape)
