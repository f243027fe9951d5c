"""Adding a model is one file: a toy patch model registered here trains, predicts and exports through the engine.

The same test runs in 2D (a dataset of PNG images) and in 3D (phantom volumes): one pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from mednets.config import load_config
from mednets.data.convert import write_image_dataset
from mednets.data.io import case_name, read_any
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.engine.api import load_run, predict_paths
from mednets.engine.training import run_training
from mednets.models.registry import register_model, unregister_model

TOY = "toy_patch_segmenter"


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def toy_model(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A two-layer convolutional segmenter of the parametrised dimension, registered for this test only."""
    dims = request.param
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]

    @register_model(TOY, task="segmentation", spatial_dims=dims, in_channels=1, out_channels=3,
                    input_size=(16,) * dims, output_names=("logits",), size_multiple=1,
                    description="toy patch segmenter")  # fmt: skip
    def toy(in_channels: int = 1, out_channels: int = 3) -> nn.Module:
        return nn.Sequential(conv(in_channels, 4, 3, padding=1), nn.ReLU(), conv(4, out_channels, 1))

    yield TOY, dims
    unregister_model(TOY)


def _dataset(root: Path, dims: int) -> Path:
    """Three labelled cases: phantom volumes (3D) or grey PNG images with two structures (2D)."""
    if dims == 3:
        return write_phantom_dataset(root, 3, seed=1, config=PhantomConfig(shape=(16, 16, 16)))
    rng = np.random.default_rng(0)
    cases = []
    for index in range(3):
        label = np.zeros((24, 20), np.uint8)
        label[4:12, 3:9], label[14:20, 10:18] = 1, 2
        image = (rng.integers(0, 60, label.shape) + 90 * label).astype(np.uint8)
        cases.append((f"cells_{index}", image, label))
    return write_image_dataset(root, cases, {"background": 0, "nucleus": 1, "vesicle": 2}, channel_name="microscopy",
                               file_ending=".png")  # fmt: skip


def test_a_model_registered_outside_the_package_trains_predicts_and_exports(
    toy_model: tuple[str, int], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from mednets.engine.export import export_run, sidecar_path

    name, dims = toy_model
    data = _dataset(tmp_path / "data", dims)
    config = load_config(None, [f"model.name={name}", f"data.dataset={data}", f"data.patch_size={[16] * dims}",
                                "data.val_fraction=0.34", "train.max_steps=2", "train.val_every=2",
                                "train.batch_size=2", "train.precision=fp32", "train.best_metric=val/dice",
                                "train.best_mode=max"])  # fmt: skip
    result = run_training(config, tmp_path / "run", progress=False)
    assert result["state"]["step"] == 2

    run = load_run(tmp_path / "run")
    structures = 13 if dims == 3 else 2
    assert run.spec.name == name and len(run.structures) == structures  # the head fitted to the dataset's labels
    written = predict_paths(run, [data / "imagesTr"], tmp_path / "pred", progress=False)
    assert written["failed"] == [] and len(written["written"]) == 3
    source_path = sorted((data / "imagesTr").iterdir())[0]
    source, labels = read_any(source_path), read_any(written["written"][0])
    assert labels.array.shape == source.array.shape and np.allclose(labels.affine, source.affine)
    sidecar = json.loads((tmp_path / "pred" / f"{case_name(source_path)}.json").read_text())
    assert set(sidecar["structures"]) == set(run.structures)

    onnx_path = export_run(tmp_path / "run", tmp_path / "toy.onnx")
    record = json.loads(sidecar_path(onnx_path).read_text())
    assert record["model"] == name and record["max_abs_diff"] <= 1e-4
    assert record["input"]["shape"] == [1, 1, *[16] * dims] and "width" in record["dynamic_axes"]["image"].values()
