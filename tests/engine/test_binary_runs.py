"""Binary segmentation end to end: a one-output UNet (sigmoid, BCE + Dice) trains, predicts, is scored, reported, exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mednets.config import load_config
from mednets.data.convert import write_image_dataset
from mednets.data.intensity import normalise
from mednets.data.io import write_volume
from mednets.data.volume import Volume
from mednets.engine.api import load_run, predict_paths
from mednets.engine.evaluation import evaluate_folders, write_evaluation
from mednets.engine.training import run_training
from mednets.errors import ConfigError
from mednets.reports.run_report import write_run_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LABELS = {"background": 0, "nucleus": 1}
BINARY = ["model.overrides.out_channels=1", "model.overrides.base_channels=4", "train.max_minutes=null"]


def _disks(seed: int, count: int, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`count` images of `shape` with two bright disks (balls in 3D) on a dim noisy background, and their masks."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    cases = []
    for index in range(count):
        image = rng.normal(0.2, 0.05, shape).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        for _ in range(2):
            centre = rng.integers(6, np.asarray(shape) - 6)
            inside = sum((axis - c) ** 2 for axis, c in zip(grid, centre, strict=True)) <= rng.integers(3, 6) ** 2
            mask[inside] = 1
            image[inside] += 0.6
        cases.append((f"case{seed}_{index}", image, mask))
    return cases


@pytest.fixture(scope="module")
def binary_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """50 steps of a tiny one-output UNet on 32x32 images of disks: (run folder, test dataset)."""
    root = tmp_path_factory.mktemp("binary2d")
    train = write_image_dataset(root / "train", _disks(0, 6, (32, 32)), LABELS, channel_name="fluorescence")
    test = write_image_dataset(root / "test", _disks(1, 2, (32, 32)), LABELS, channel_name="fluorescence")
    config = load_config(CONFIGS / "unet2d_nuclei.yaml", [*BINARY, "data.patch_size=[32, 32]", "train.max_steps=50",
                         "train.val_every=50", "train.batch_size=4", "train.lr=0.01", "train.warmup_steps=2"])  # fmt: skip
    run_training(config, root / "run", data_dir=train, progress=False)
    return root / "run", test


def test_binary_run_has_a_one_output_head_and_validates(binary_2d: tuple[Path, Path]) -> None:
    run = load_run(binary_2d[0], device="cpu")
    assert run.model.outc.out_channels == 1
    with (binary_2d[0] / "metrics.csv").open() as handle:
        header = handle.readline().split(",")
    assert "val/dice" in header


def test_binary_prediction_is_the_sigmoid_above_one_half(binary_2d: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, test = binary_2d
    run = load_run(run_dir, device="cpu")
    result = predict_paths(run, [test / "imagesTr"], tmp_path, progress=False, precision="fp32")
    assert not result["failed"] and len(result["written"]) == 2
    for label_path in result["written"]:
        labels = tifffile.imread(label_path)
        assert labels.shape == (32, 32) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
        # The image is one window of the training patch size: the predictor's labels are the model's own sigmoid > 0.5.
        image = tifffile.imread(test / "imagesTr" / f"{label_path.stem}_0000.tif")
        x = torch.as_tensor(normalise(image[None], run.preprocessing.rules()[0]))[None]
        with torch.no_grad():
            expected = (torch.sigmoid(run.model.float()(x))[0, 0] > 0.5).numpy()
        np.testing.assert_array_equal(labels, expected)
        sidecar = json.loads(label_path.with_suffix(".json").read_text())
        assert set(sidecar["structures"]) == {"nucleus"}
        assert sidecar["structures"]["nucleus"]["voxels"] == int(labels.sum())


def test_binary_prediction_is_scored(binary_2d: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, test = binary_2d
    predict_paths(load_run(run_dir, device="cpu"), [test / "imagesTr"], tmp_path, progress=False)
    evaluation = evaluate_folders(tmp_path, test)
    assert {row["structure"] for row in evaluation.rows} == {"nucleus"} and len(evaluation.rows) == 2
    assert evaluation.summary["dice"] > 0.5  # bright disks: 50 steps find them (0.86 when written)
    scores = write_evaluation(evaluation, tmp_path / "scores")[1]
    page = write_run_report(run_dir, predictions=tmp_path, scores=scores, out=tmp_path / "report.html").read_text()
    assert "nucleus" in page and "could not be built" not in page


def test_a_one_output_head_on_several_structures_is_refused(tmp_path: Path) -> None:
    cases = [
        (name, image, mask * (1 + (np.indices(mask.shape)[1] > 16))) for name, image, mask in _disks(0, 2, (32, 32))
    ]
    train = write_image_dataset(tmp_path / "train", cases, {"background": 0, "a": 1, "b": 2}, channel_name="x")
    config = load_config(CONFIGS / "unet2d_nuclei.yaml", [*BINARY, "data.patch_size=[32, 32]", "train.max_steps=1"])
    with pytest.raises(ConfigError, match=r"model.overrides.out_channels.*expected one of \[3\].*got 1"):
        run_training(config, tmp_path / "run", data_dir=train, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_binary_3d_run_trains_predicts_and_scores(tmp_path: Path) -> None:
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for part, seed, count in (("train", 0, 3), ("test", 1, 1)):
        folder = tmp_path / part
        for name, image, mask in _disks(seed, count, (32, 32, 32)):
            write_volume(Volume(image, affine), folder / "imagesTr" / f"{name}_0000.nii.gz")
            write_volume(Volume(mask, affine), folder / "labelsTr" / f"{name}.nii.gz")
        info = {"channel_names": {"0": "MR"}, "labels": LABELS, "numTraining": count, "file_ending": ".nii.gz"}
        (folder / "dataset.json").write_text(json.dumps(info))
    config = load_config(CONFIGS / "unet3d_phantoms.yaml", [*BINARY, "data.patch_size=[32, 32, 32]",
                         "train.max_steps=3", "train.val_every=3", "train.batch_size=1", "data.val_fraction=0.34"])  # fmt: skip
    run_training(config, tmp_path / "run", data_dir=tmp_path / "train", progress=False)
    run = load_run(tmp_path / "run", device="cpu")
    result = predict_paths(run, [tmp_path / "test" / "imagesTr"], tmp_path / "pred", progress=False)
    assert not result["failed"]
    predicted = result["cases"][0].labels.array
    assert predicted.shape == (32, 32, 32) and set(np.unique(predicted)) <= {0, 1}
    evaluation = evaluate_folders(tmp_path / "pred", tmp_path / "test")
    assert [row["structure"] for row in evaluation.rows] == ["nucleus"] and evaluation.summary["cases"] == 1


def test_binary_run_exports_its_one_logit_channel(binary_2d: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from mednets.engine.export import export_run, sidecar_path

    path = export_run(binary_2d[0], tmp_path / "binary.onnx")
    record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    assert record["outputs"]["logits"][1] == 1


def test_the_api_on_a_2d_array_writes_a_png_label_map(binary_2d: tuple[Path, Path], tmp_path: Path) -> None:
    import mednets

    run_dir, test = binary_2d
    image = tifffile.imread(sorted((test / "imagesTr").iterdir())[0])
    case = mednets.predict(image, run=run_dir, device="cpu", spacing=(0.5, 0.5), out=tmp_path, name="cells",
                           precision="fp32")  # fmt: skip
    assert [p.name for p in case.files] == [
        "cells.png",
        "cells.ctbl",
        "cells.statistics.json",
        "cells.statistics.csv",
        "cells.json",
    ]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cells.png")), case.labels.array)
    assert case.statistics["nucleus"]["volume_ml"] == pytest.approx(case.labels.array.sum() * 0.25 / 1000)
