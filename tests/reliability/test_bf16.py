"""CPU bf16 training never runs on wrong gradients: mednets' convolutions adapt, foreign ones are refused (issue 24)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from mednets.config import load_config
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.engine.training import run_training
from mednets.errors import ConfigError
from mednets.models.base import layer_inputs
from mednets.models.registry import register_model, unregister_model

FOREIGN = "foreign_pooling_segmenter"


# The bf16 convolution itself is compared with fp32 on the failing sizes in tests/models/test_kernels.py.


def test_layer_inputs_traces_every_call_without_memory() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(2), nn.Conv3d(2, 2, 3, padding=1),
                          nn.InstanceNorm3d(2))  # fmt: skip
    calls = layer_inputs(model, (8, 16, 16))
    assert [(name, size) for name, _, size in calls] == [("0", (8, 16, 16)), ("2", (4, 8, 8))]
    norms = layer_inputs(model, (8, 16, 16), kinds=(nn.InstanceNorm3d,))
    assert [(name, size) for name, _, size in norms] == [("3", (4, 8, 8))]
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


@pytest.fixture
def foreign_model() -> Iterator[str]:
    """A registered 3D model built from plain `nn.Conv3d` (as a user's own model would be), pooling by 4."""

    @register_model(FOREIGN, task="segmentation", spatial_dims=3, in_channels=1, out_channels=3,
                    input_size=(16, 16, 16), output_names=("logits",), size_multiple=4,
                    description="plain convolutions, pooled by 4")  # fmt: skip
    def foreign(in_channels: int = 1, out_channels: int = 3) -> nn.Module:
        return nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.MaxPool3d(4), nn.Conv3d(4, 4, 3, padding=1),
                             nn.Upsample(scale_factor=4), nn.Conv3d(4, out_channels, 1))  # fmt: skip

    yield FOREIGN
    unregister_model(FOREIGN)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_patch_too_small_for_bf16_is_refused_before_training_and_fp32_trains(
    foreign_model: str, precision: str, tmp_path: Path
) -> None:
    data = write_phantom_dataset(tmp_path / "data", 3, seed=1, config=PhantomConfig(shape=(16, 16, 16)))
    config = load_config(None, [f"model.name={foreign_model}", f"data.dataset={data}", "data.patch_size=[8, 16, 16]",
                                "data.val_fraction=0.34", "train.max_steps=1", "train.val_every=1",
                                "train.batch_size=2", f"train.precision={precision}"])  # fmt: skip
    if precision == "fp32":
        assert run_training(config, tmp_path / "run", progress=False)["state"]["step"] == 1
        return
    with pytest.raises(ConfigError) as caught:
        run_training(config, tmp_path / "run", progress=False)
    message = str(caught.value)
    assert "data.patch_size" in message and "train.precision=fp32" in message
    assert "[2, 4, 4]" in message and "[16, 16, 16]" in message  # what the deep layer gets, and what would do
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_patch_that_leaves_one_voxel_to_an_instance_norm_is_refused_before_any_file(tmp_path: Path) -> None:
    data = write_phantom_dataset(tmp_path / "data", 3, seed=1, config=PhantomConfig(shape=(16, 16, 16)))
    config = load_config(None, ["model.name=unet3d", "model.overrides.base_channels=4", f"data.dataset={data}",
                                "data.patch_size=[16, 16, 16]", "data.val_fraction=0.34", "train.precision=fp32"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^data\.patch_size: model unet3d cannot run on this input \(Expected more"):
        run_training(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
