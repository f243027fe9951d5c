"""The data commands of the CLI: phantoms, convert-labels, show."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mednets.cli import main
from mednets.data.dataset import validate_dataset
from mednets.data.io import read_volume
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset


@pytest.fixture
def phantom_dataset(tmp_path: Path) -> Path:
    return write_phantom_dataset(tmp_path / "phantoms", 1, seed=0, config=PhantomConfig(shape=(16, 16, 16)))


def test_phantoms_command_writes_a_valid_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    code = main(["phantoms", "--out", str(out), "--n", "2", "--seed", "4", "--shape", "24", "24", "32",
                 "--spacing", "12", "--absence-rate", "splenectomy=1.0"])  # fmt: skip
    assert code == 0
    assert validate_dataset(out) == []
    info = json.loads((out / "dataset.json").read_text())
    assert info["generator"]["shape"] == [24, 24, 32] and info["generator"]["spacing_mm"] == [12.0, 12.0, 12.0]
    assert all(case["absent"]["spleen"] == "splenectomy" for case in info["cases"].values())
    image = read_volume(out / "imagesTr" / "phantom_001_0000.nii.gz")
    assert image.array.shape == (24, 24, 32) and image.spacing == pytest.approx((12.0, 12.0, 12.0))


def test_phantoms_command_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["phantoms", "--out", str(tmp_path / "a"), "--shape", "24", "24"]) == 2
    assert "--shape" in capsys.readouterr().err
    assert main(["phantoms", "--out", str(tmp_path / "b"), "--absence-rate", "appendectomy=0.5"]) == 2
    assert "appendectomy" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_convert_labels_command(real_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "mapped.nii.gz"
    assert (
        main(
            [
                "convert-labels",
                "--map",
                "totalsegmentator",
                "--in",
                str(real_ct / "example_seg.nii.gz"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    original = read_volume(real_ct / "example_seg.nii.gz").array
    mapped = read_volume(out).array
    assert int((mapped == 6).sum()) == int((original == 5).sum())  # liver
    assert int((mapped == 8).sum()) == int((original == 52).sum())  # aorta


def test_show_command_writes_png(real_ct: Path, tmp_path: Path) -> None:
    from PIL import Image

    mapped = tmp_path / "mapped.nii.gz"
    assert main(["convert-labels", "--in", str(real_ct / "example_seg.nii.gz"), "--out", str(mapped)]) == 0
    png = tmp_path / "show.png"
    assert (
        main(
            [
                "show",
                "--input",
                str(real_ct / "example_ct_sm.nii.gz"),
                "--labels",
                str(mapped),
                "--out",
                str(png),
                "--window",
                "-160",
                "240",
            ]
        )
        == 0
    )
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] > pixels.shape[0] > 300
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # slices, overlay colours, legend


def test_show_rejects_labels_on_another_grid(
    phantom_dataset: Path, real_ct: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "show",
            "--input",
            str(real_ct / "example_ct_sm.nii.gz"),
            "--labels",
            str(phantom_dataset / "labelsTr" / "phantom_000.nii.gz"),
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 2
    assert "do not match" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
