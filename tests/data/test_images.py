"""PNG/JPEG/TIFF/SVS images and their pixels as 2D model input (mednets.data.images, through mednets.data.io)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mednets.data.images import first_level, from_unit_range, holdout_rows, to_unit_range
from mednets.data.io import list_image_files, read_image_2d, read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import InvalidInputError


def test_png_rgb_and_grey_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    back = read_volume(write_volume(Volume(rgb, channel_axis=-1), tmp_path / "tile.png"))
    np.testing.assert_array_equal(back.array, rgb)
    assert back.channel_axis == -1 and back.spatial_shape == (9, 11)
    grey = rng.integers(0, 65535, size=(9, 11), dtype=np.uint16)
    back = read_volume(write_volume(Volume(grey), tmp_path / "grey.png"))
    np.testing.assert_array_equal(back.array, grey)


def test_jpeg_round_trip_is_close(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    rgb = np.stack([smooth, smooth.T, 255 - smooth], axis=-1)
    back = read_volume(write_volume(Volume(rgb, channel_axis=-1), tmp_path / "tile.jpg"))
    assert back.array.shape == rgb.shape
    assert np.abs(back.array.astype(int) - rgb).mean() < 4


def test_multipage_tiff_and_svs_level0(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(2)
    stack = rng.integers(0, 4000, size=(4, 16, 12), dtype=np.uint16)
    back = read_volume(write_volume(Volume(stack), tmp_path / "stack.tif"))
    np.testing.assert_array_equal(back.array, stack)
    slide = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "slide.svs") as tif:  # a two-level pyramid, like a whole-slide image
        tif.write(slide, photometric="rgb", subifds=1, tile=(16, 16))
        tif.write(slide[::2, ::2], photometric="rgb", subfiletype=1, tile=(16, 16))
    level0 = read_volume(tmp_path / "slide.svs")
    np.testing.assert_array_equal(level0.array, slide)
    assert level0.channel_axis == -1


def test_real_histology_tile_and_nuclei_tiff(shared_dir: Path) -> None:
    tile = read_volume(shared_dir / "data" / "histology" / "high-nuclei-score-level2.png")
    assert tile.array.shape == (512, 512, 4) and tile.channel_axis == -1
    nuclei = read_volume(shared_dir / "data" / "nuclei2d" / "img2d.tif")
    assert nuclei.array.shape == (512, 512) and nuclei.array.dtype == np.uint16


def test_read_image_2d_keeps_the_first_page_of_a_stack(tmp_path: Path) -> None:
    stack = np.arange(2 * 5 * 4 * 3, dtype=np.uint8).reshape(2, 5, 4, 3)
    path = write_volume(Volume(stack, channel_axis=-1), tmp_path / "pages.tif")
    image = read_image_2d(path)
    np.testing.assert_array_equal(image.array, stack[0])
    assert image.channel_axis == -1
    with pytest.raises(InvalidInputError, match="not a 2D image"):
        first_level(Volume(np.zeros((3, 0, 4))), "empty")


def test_list_image_files_expands_folders_to_their_images(tmp_path: Path) -> None:
    for name in ("b.png", "a.TIF", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_image_files(tmp_path) == [tmp_path / "a.TIF", tmp_path / "b.png"]
    with pytest.raises(InvalidInputError, match="not found"):
        list_image_files([tmp_path / "missing.png"])


def test_unit_range_round_trips_integer_pixels_and_holdout_keeps_multiples() -> None:
    pixels = np.array([[0, 1, 65535]], dtype=np.uint16)
    unit = to_unit_range(pixels)
    assert unit.dtype == np.float32 and unit.max() == 1.0
    np.testing.assert_array_equal(from_unit_range(unit, np.uint16), pixels)
    assert holdout_rows(100, 0.3, multiple=8) == 32
    with pytest.raises(InvalidInputError, match="too small"):
        holdout_rows(10, 0.2, multiple=8)
