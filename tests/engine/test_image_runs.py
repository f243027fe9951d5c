"""Runs on 2D images end to end on tiny models: denoising (train, `denoise`) and segmentation (train, `predict`, `evaluate`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mednets.cli import main
from mednets.config import load_config
from mednets.data.convert import split_image_pair
from mednets.engine.denoise import denoise_image, load_denoiser
from mednets.engine.training import run_training
from mednets.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["train.max_steps=2", "train.val_every=2", "train.batch_size=2", "model.overrides.base_channels=4"]


@pytest.fixture(scope="module")
def denoising_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of a tiny HistoAutoencoder on the built-in IHC image."""
    run_dir = tmp_path_factory.mktemp("runs") / "histo"
    config = load_config(CONFIGS / "histo_denoise.yaml", [*TINY, "data.patch_size=[32, 32]"])
    run_training(config, run_dir, progress=False)
    return run_dir


def test_denoising_run_logs_validation_psnr_and_ssim(denoising_run: Path) -> None:
    with (denoising_run / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["val/psnr"]]
    assert rows and float(rows[-1]["val/psnr"]) > 0 and 0 < float(rows[-1]["val/ssim"]) <= 1


def test_denoise_keeps_shape_dtype_and_alpha(denoising_run: Path) -> None:
    model = load_denoiser(denoising_run)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (45, 70, 4), dtype=np.uint8)
    out = denoise_image(model, rgba, patch_size=32, overlap=0.375)
    assert out.shape == rgba.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    grey16 = rng.integers(0, 65535, (40, 33), dtype=np.uint16)
    out16 = denoise_image(model, grey16, patch_size=32, overlap=0.375)
    assert out16.shape == grey16.shape and out16.dtype == np.uint16


def test_denoise_command_writes_each_image_in_its_format(denoising_run: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((50, 60, 3), 200, np.uint8)).save(inputs / "a.png")
    Image.fromarray(np.full((50, 60, 3), 200, np.uint8)).save(inputs / "b.jpg", quality=95)
    tifffile.imwrite(inputs / "c.tif", np.full((2, 40, 40), 30000, np.uint16))  # two pages
    code = main(["denoise", "--run", str(denoising_run), "--input", str(inputs), "--out", str(tmp_path / "out"), "--patch-size", "32",
                 "--overlap", "0.375"])  # fmt: skip
    assert code == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (60, 50)
    assert Image.open(tmp_path / "out" / "b.jpg").format == "JPEG"
    pages = tifffile.imread(tmp_path / "out" / "c.tif")
    assert pages.shape == (2, 40, 40) and pages.dtype == np.uint16


def test_denoise_command_streams_a_real_slide_at_its_magnification(
    denoising_run: Path, real_slides: Path, tmp_path: Path, capsys
) -> None:
    from mednets.data.wsi import open_slide

    code = main(["denoise", "--run", str(denoising_run), "--input", str(real_slides / "small.svs"), "--out",
                 str(tmp_path / "out"), "--patch-size", "16", "--magnification", "20", "--json"])  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["written"] == [str(tmp_path / "out" / "small.tif")] and record["failed"] == []
    with open_slide(tmp_path / "out" / "small.tif") as slide:
        assert slide.levels[0].shape == (16, 16) and slide.levels[0].magnification == pytest.approx(20)
    code = main(["denoise", "--run", str(denoising_run), "--input", str(real_slides / "small.svs"), "--out",
                 str(tmp_path / "x"), "--magnification", "5"])  # fmt: skip
    assert code == 1 and "20" in capsys.readouterr().err  # no 5x level: the error lists the levels it has


def test_denoise_command_keeps_the_mean_colour_when_asked(denoising_run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(150, 240, (48, 48, 3), dtype=np.uint8)  # bright as H&E, away from 255: no clipping
    Image.fromarray(pixels).save(tmp_path / "in.png")
    code = main(["denoise", "--run", str(denoising_run), "--input", str(tmp_path / "in.png"), "--out", str(tmp_path / "out.png"),
                 "--patch-size", "48", "--overlap", "0.25", "--keep-mean-colour"])  # fmt: skip
    assert code == 0
    out = np.asarray(Image.open(tmp_path / "out.png")).astype(float)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), pixels.mean(axis=(0, 1)), atol=1.0)  # one grey level


def test_denoise_strength_zero_returns_the_input_and_a_bad_strength_is_one_line(
    denoising_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    common = ["denoise", "--run", str(denoising_run), "--input", str(tmp_path / "in.png"), "--patch-size", "48"]
    assert main([*common, "--out", str(tmp_path / "zero.png"), "--strength", "0"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "zero.png")), pixels)
    assert main([*common, "--out", str(tmp_path / "auto.png"), "--strength", "auto"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad.png"), "--strength", "strong"]) != 0
    error = capsys.readouterr().err.strip()
    assert "--strength" in error and len(error.splitlines()) == 1 and not (tmp_path / "bad.png").exists()


def test_denoise_refuses_a_segmentation_run(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "unet2d_phantoms.yaml",
        [*TINY, "data.phantoms={n_train: 2, n_test: 1, shape: [16, 32, 32]}", "data.patch_size=[32, 32]"],
    )
    run_training(config, tmp_path / "seg", progress=False)
    with pytest.raises(ConfigError, match="not a denoising run"):
        load_denoiser(tmp_path / "seg")


def test_nuclei_run_predicts_labels_of_the_input_size(shared_dir: Path, tmp_path: Path) -> None:
    folder = shared_dir / "data" / "nuclei2d"
    train, test = split_image_pair(
        folder / "img2d.tif", folder / "mask2d.tif", tmp_path / "nuclei", structure="nucleus"
    )
    run_dir = tmp_path / "run"
    assert main(["train", str(CONFIGS / "unet2d_nuclei.yaml"), "--data", str(train), "--out", str(run_dir),
                 *[f"--set={item}" for item in TINY], "--set", "data.patch_size=[64, 64]"]) == 0  # fmt: skip
    assert (
        main(["predict", "--run", str(run_dir), "--input", str(test / "imagesTr"), "--out", str(tmp_path / "pred")])
        == 0
    )
    labels = tifffile.imread(tmp_path / "pred" / "img2d_right.tif")
    assert labels.shape == (512, 256) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    assert (tmp_path / "pred" / "img2d_right.json").is_file()
    assert (
        main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(test), "--out", str(tmp_path / "scores")])
        == 0
    )
    report = tmp_path / "report.html"
    assert main(["report-run", "--run", str(run_dir), "--pred", str(tmp_path / "pred"), "--scores",
                 str(tmp_path / "scores.json"), "--out", str(report)]) == 0  # fmt: skip
    page = report.read_text()
    assert "nucleus" in page and "could not be built" not in page
