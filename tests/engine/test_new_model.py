"""Adding a model is one file: a toy patch model registered here trains, predicts and exports through the engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from mednets.config import load_config
from mednets.data.io import read_volume
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.engine.inference import load_run, predict_paths
from mednets.engine.training import run_training
from mednets.models.registry import register_model, unregister_model

TOY = "toy_patch_segmenter"


@pytest.fixture
def toy_model() -> Iterator[str]:
    """A two-layer 3D convolutional segmenter, registered for this test only."""

    @register_model(TOY, task="segmentation", spatial_dims=3, in_channels=1, out_channels=3, input_size=(16, 16, 16),
                    output_names=("logits",), size_multiple=1, description="toy patch segmenter")  # fmt: skip
    def toy(in_channels: int = 1, out_channels: int = 3) -> nn.Module:
        return nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, out_channels, 1))

    yield TOY
    unregister_model(TOY)


def test_a_model_registered_outside_the_package_trains_predicts_and_exports(toy_model: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from mednets.engine.export import export_run, sidecar_path

    data = write_phantom_dataset(tmp_path / "data", 3, seed=1, config=PhantomConfig(shape=(16, 16, 16)))
    config = load_config(None, [f"model.name={toy_model}", f"data.dataset={data}", "data.patch_size=[16, 16, 16]",
                                "data.val_fraction=0.34", "train.max_steps=2", "train.val_every=2",
                                "train.batch_size=2", "train.precision=fp32", "train.best_metric=val/dice",
                                "train.best_mode=max"])  # fmt: skip
    result = run_training(config, tmp_path / "run", progress=False)
    assert result["state"]["step"] == 2

    run = load_run(tmp_path / "run")
    assert run.spec.name == toy_model and len(run.structures) == 13  # the head fitted to the phantoms' labels
    written = predict_paths(run, [data / "imagesTr"], tmp_path / "pred", progress=False)
    assert written["failed"] == [] and len(written["written"]) == 3
    source = read_volume(data / "imagesTr" / "phantom_000_0000.nii.gz")
    labels = read_volume(tmp_path / "pred" / "phantom_000.nii.gz")
    assert labels.array.shape == source.array.shape and np.allclose(labels.affine, source.affine)
    sidecar = json.loads((tmp_path / "pred" / "phantom_000.json").read_text())
    assert set(sidecar["structures"]) == set(run.structures)

    onnx_path = export_run(tmp_path / "run", tmp_path / "toy.onnx")
    record = json.loads(sidecar_path(onnx_path).read_text())
    assert record["model"] == toy_model and record["max_abs_diff"] <= 1e-4
    assert record["input"]["shape"] == [1, 1, 16, 16, 16] and "depth" in record["dynamic_axes"]["image"].values()
