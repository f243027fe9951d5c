"""Tiled pyramidal TIFFs (mednets.data.pyramid): row bands in, tiles and 2x2-mean levels out, mpp and magnification kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from mednets.data.pyramid import pyramid_shapes, write_pyramid
from mednets.data.wsi import choose_level, open_slide
from mednets.errors import ConfigError, InvalidInputError


def tissue(height: int, width: int) -> np.ndarray:
    """Smooth RGB "tissue" with a little noise, ``[H, W, 3]`` uint8, that JPEG keeps close."""
    rows, columns = np.mgrid[0:height, 0:width]
    base = 150 + 60 * np.sin(columns / 23.0) * np.cos(rows / 31.0)
    noise = np.random.default_rng(0).normal(0, 2, (height, width, 3))
    return np.clip(np.stack([base, base - 10, base - 20], axis=-1) + noise, 0, 255).astype(np.uint8)


def test_pyramid_shapes_halve_until_one_tile() -> None:
    assert pyramid_shapes(1000, 600, 256) == [(1000, 600), (500, 300), (250, 150)]
    assert pyramid_shapes(200, 100, 256) == [(200, 100)]


def test_write_pyramid_streams_bands_into_levels_with_mpp_and_magnification(tmp_path: Path) -> None:
    image = tissue(333, 530)
    bands = (image[start : start + 50] for start in range(0, 333, 50))  # bands unaligned with the tiles
    path = write_pyramid(tmp_path / "out.tif", bands, image.shape, tile_size=64, mpp=0.5, magnification=20)
    assert not [p for p in tmp_path.iterdir() if p.name != "out.tif"]  # no temporary left
    with open_slide(path) as slide:
        assert [level.shape for level in slide.levels] == pyramid_shapes(333, 530, 64)
        assert all(level.tile_shape == (64, 64) and level.compression == "deflate" for level in slide.levels)
        assert slide.levels[0].mpp == pytest.approx(0.5) and slide.levels[0].magnification == pytest.approx(20)
        assert choose_level(slide, magnification=5).index == 2
        np.testing.assert_array_equal(slide.read_rows(0, 0, 333), image)
        level1 = slide.read_rows(1, 0, 166)
    blocks = image[:332, :530].reshape(166, 2, 265, 2, 3).astype(np.uint32)
    np.testing.assert_array_equal(level1, ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8))
    with tifffile.TiffFile(path) as tif:  # OpenSlide's generic tiled TIFF: reduced pages after level 0
        assert [page.subfiletype for page in tif.pages] == [0] + [1] * (len(tif.pages) - 1)


@pytest.mark.parametrize("compression", ["jpeg", "jpeg2000", "none"])
def test_write_pyramid_compressions(tmp_path: Path, compression: str) -> None:
    image = tissue(100, 140)
    path = write_pyramid(tmp_path / "out.tif", [image], image.shape, tile_size=32, compression=compression)
    with open_slide(path) as slide:
        back = slide.read_rows(0, 0, 100)
        assert slide.levels[0].compression == compression
    assert np.abs(back.astype(int) - image).mean() <= (2 if compression == "jpeg" else 0)


def test_write_pyramid_refuses_what_does_not_fit(tmp_path: Path) -> None:
    image = tissue(64, 64)
    with pytest.raises(InvalidInputError, match="end before the slide's last row"):
        write_pyramid(tmp_path / "short.tif", [image[:40]], image.shape, tile_size=32)
    with pytest.raises(InvalidInputError, match="more rows"):
        write_pyramid(tmp_path / "long.tif", [image, image[:8]], image.shape, tile_size=32)
    with pytest.raises(InvalidInputError, match="does not match"):
        write_pyramid(tmp_path / "wide.tif", [image[:, :60]], image.shape, tile_size=32)
    with pytest.raises(ConfigError, match="JPEG tiles"):
        write_pyramid(tmp_path / "deep.tif", [image.astype(np.uint16)], image.shape, dtype=np.uint16,
                      compression="jpeg")  # fmt: skip
    with pytest.raises(ConfigError, match="multiple of 16"):
        write_pyramid(tmp_path / "odd.tif", [image], image.shape, tile_size=30)
    assert not list(tmp_path.iterdir())  # nothing half-written
