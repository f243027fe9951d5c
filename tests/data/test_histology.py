"""Histology tiles: noise models' statistics, the seed's mixture, tissue detection, stain augmentation, datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mednets.data.histology import (
    NOISE_MODELS,
    DenoisingTiles,
    NoiseMixture,
    NoisyTiles,
    add_noise,
    denoising_datasets,
    tissue_tiles,
)
from mednets.data.histology_samples import default_training_image
from mednets.data.io import read_rgb
from mednets.data.stain import stain_augment
from mednets.errors import ConfigError, InvalidInputError, UnknownNameError

GREY = np.full((3, 96, 96), 0.5, dtype=np.float32)


def _edge_tile() -> np.ndarray:
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    tile = np.stack([yy, xx, (yy + xx) / 2]).astype(np.float32)
    tile[:, 8:24, 14:18] = 1.0  # an edge for the blurs to soften
    return tile


def test_gaussian_noise_has_the_requested_sigma_within_5_percent() -> None:
    noisy = add_noise(GREY, "gaussian", np.random.default_rng(0), sigma=0.1)
    assert abs(float((noisy - GREY).std()) - 0.1) < 0.005
    assert abs(float((noisy - GREY).mean())) < 0.005


def test_poisson_noise_variance_is_intensity_over_peak() -> None:
    noisy = add_noise(GREY, "poisson", np.random.default_rng(0), peak=40.0)
    assert abs(float((noisy - GREY).var()) / (0.5 / 40.0) - 1.0) < 0.05


def test_speckle_noise_scales_with_intensity() -> None:
    noisy = add_noise(GREY, "speckle", np.random.default_rng(0), sigma=0.2)
    assert abs(float((noisy - GREY).std()) / (0.5 * 0.2) - 1.0) < 0.05


@pytest.mark.parametrize("per_channel", [False, True])
def test_salt_and_pepper_hits_the_requested_share(per_channel: bool) -> None:
    noisy = add_noise(GREY, "salt_and_pepper", np.random.default_rng(0), amount=0.1, per_channel=per_channel)
    hit = noisy != 0.5
    share = hit.mean() if per_channel else hit.any(0).mean()
    assert abs(float(share) - 0.1) < 0.01
    assert set(np.unique(noisy[hit])) <= {0.0, 1.0}  # binary impulses
    if not per_channel:
        assert np.array_equal(hit[0], hit[1])  # whole pixels flip


def test_blurs_keep_the_mean_and_soften_edges() -> None:
    tile = _edge_tile()
    rng = np.random.default_rng(0)
    blurred = add_noise(tile, "gaussian_blur", rng, sigma=1.5)
    horizontal = add_noise(tile, "motion_blur", rng, length=7, angle=0.0)
    assert abs(float(blurred.mean() - tile.mean())) < 0.01
    assert np.abs(np.diff(blurred, axis=2)).max() < np.abs(np.diff(tile, axis=2)).max()
    # A horizontal motion blur smears along rows only: a tile constant along rows is unchanged.
    rows = np.repeat(np.linspace(0, 1, 32, dtype=np.float32)[None, :, None], 32, axis=2).repeat(3, 0)
    np.testing.assert_allclose(add_noise(rows, "motion_blur", rng, length=7, angle=0.0), rows, atol=1e-6)
    assert not np.allclose(horizontal, tile)


def test_jpeg_loses_more_at_lower_quality() -> None:
    tile = _edge_tile()
    rng = np.random.default_rng(0)
    errors = [np.abs(add_noise(tile, "jpeg", rng, quality=q) - tile).mean() for q in (90, 10)]
    assert errors[1] > errors[0] > 0


@pytest.mark.parametrize("model", NOISE_MODELS)
def test_noise_models_degrade_but_stay_in_unit_range(model: str) -> None:
    tile = _edge_tile()
    noisy = add_noise(tile, model, np.random.default_rng(0))
    assert noisy.shape == tile.shape and noisy.dtype == np.float32
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0
    assert np.abs(noisy - tile).mean() > 1e-3


def test_unknown_noise_model_or_parameter_is_named() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(UnknownNameError, match="speckles"):
        add_noise(GREY, "speckles", rng)
    with pytest.raises(UnknownNameError, match="sigmaa"):
        add_noise(GREY, "gaussian", rng, sigmaa=0.1)
    with pytest.raises(UnknownNameError, match="film_grain"):
        NoiseMixture([{"model": "film_grain"}])
    with pytest.raises(ConfigError, match=r"data.noise\[0\].p"):
        NoiseMixture([{"model": "gaussian", "p": 1.5}])


def test_seed_mixture_applies_stages_with_their_probabilities() -> None:
    mixture = NoiseMixture("seed")
    rng = np.random.default_rng(0)
    draws = [mixture(GREY[:, :8, :8], rng)[1] for _ in range(4000)]
    assert all(draws)  # a draw that degrades nothing is redrawn
    none_fired = 0.5 * 0.7 * 0.7
    share = np.mean(["gaussian" in d for d in draws])
    assert abs(share - 0.5 / (1 - none_fired)) < 0.03
    blurs = np.mean([d[-1] in ("motion_blur", "gaussian_blur") for d in draws])
    assert abs(blurs - 0.3 / (1 - none_fired)) < 0.03
    motion = sum(d[-1] == "motion_blur" for d in draws) / max(1, sum(d[-1].endswith("blur") for d in draws))
    assert abs(motion - 0.5) < 0.05  # one_of: half motion, half gaussian blur


def test_mixture_draws_parameters_from_ranges_and_choices() -> None:
    mixture = NoiseMixture([{"model": "gaussian", "sigma": [0.05, 0.15]}])
    sigmas = [float((mixture(GREY, np.random.default_rng(i))[0] - GREY).std()) for i in range(40)]
    assert min(sigmas) > 0.045 and max(sigmas) < 0.16 and np.std(sigmas) > 0.01


def test_tissue_detection_skips_near_white_and_background_tiles(shared_dir: Path) -> None:
    folder = shared_dir / "data" / "histology"
    for name in ("almost-white-1.png", "no-tissue.png"):
        assert tissue_tiles(read_rgb(folder / name), 256, 128, 0.25) == []
    for name in ("tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png"):
        assert len(tissue_tiles(read_rgb(folder / name), 256, 256, 0.25)) >= 3
    background = np.zeros((3, 64, 64), dtype=np.float32)  # black scanner padding is not tissue
    assert tissue_tiles(background, 64, 64, 0.01) == []


def test_read_rgb_drops_alpha_and_scales_to_unit_range(shared_dir: Path) -> None:
    rgb = read_rgb(shared_dir / "data" / "histology" / "torchstain_source_HE.png")  # RGBA uint8
    assert rgb.shape == (3, 438, 584) and rgb.dtype == np.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0


def test_stain_augment_keeps_shape_and_range() -> None:
    tile = default_training_image()[:, :64, :64]
    out = stain_augment(tile, np.random.default_rng(1), 0.2)
    assert out.shape == tile.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and not np.allclose(out, tile)


def test_denoising_tiles_are_clean_targets_seeded_by_epoch() -> None:
    image = default_training_image()[:, :256, :256]
    tiles = DenoisingTiles([image], 64, NoiseMixture([{"model": "gaussian", "sigma": 0.1}]), seed=3, epoch_size=8)
    assert len(tiles) >= 8
    first = tiles[0]
    assert tuple(first["image"].shape) == (3, 64, 64) and tuple(first["target"].shape) == (3, 64, 64)
    assert float(first["target"].min()) >= 0.0 and float(first["target"].max()) <= 1.0
    assert abs(float((first["image"] - first["target"]).std()) - 0.1) < 0.02
    assert np.array_equal(tiles[0]["image"], first["image"])  # same seed, epoch, index: same sample
    tiles.set_epoch(1)
    assert not np.array_equal(tiles[0]["image"], first["image"])


def test_default_data_holds_out_the_bottom_rows_for_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNETS_HISTOLOGY_SAMPLES", str(tmp_path))  # no wheels: the IHC image only, with a warning
    with pytest.warns(UserWarning, match="built-in histology images missing"):
        train, val = denoising_datasets(
            None, tile_size=128, noise="seed", val_fraction=0.2, split_seed=0, min_tissue=0.25, stain_scale=0.0,
            augment=False, seed=0,
        )  # fmt: skip
    assert train.images[0].shape == (3, 384, 512)
    assert isinstance(val, NoisyTiles) and 1 <= len(val) <= 4
    full = default_training_image()
    sample = val[0]
    y, x = (int(v) for v in sample["name"].split("@")[1].split(","))
    np.testing.assert_array_equal(sample["target"].numpy(), full[:, 384 + y : 384 + y + 128, x : x + 128])


def test_too_small_images_are_rejected(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(InvalidInputError, match="smaller than a tile"):
        denoising_datasets(tmp_path, tile_size=64, noise="seed", val_fraction=0.2, split_seed=0, min_tissue=0.25,
                           stain_scale=0.0, augment=False, seed=0)  # fmt: skip
