"""The training plan: voxel size, normalisation, patch, grid and batch from a fingerprint; `mednets plan`; batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mednets.cli import app
from mednets.config import load_config
from mednets.data.fingerprint import CaseFingerprint, Fingerprint
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.engine.api import load_run, predict
from mednets.engine.batches import EpochBatches, EpochSampler, training_loader
from mednets.engine.planning import Plan, plan_training
from mednets.engine.training import run_training
from mednets.errors import ConfigError

STRUCTURES = ["liver", "spleen"]
FOREGROUND = {"mean": 60.0, "std": 40.0, "min": -900.0, "max": 900.0, "percentile_00_5": -80.0,
              "percentile_99_5": 220.0}  # fmt: skip


def _fingerprint(spacings: list[list[float]], shapes: list[list[int]], channel: str = "CT") -> Fingerprint:
    cases = [CaseFingerprint(case=f"c{i}", shape=shape, spacing=spacing, orientation="LPS",
                             box=[[0, n] for n in shape], dtype="int16", intensity=[FOREGROUND],
                             voxels={n: 100 for n in STRUCTURES}, present={n: True for n in STRUCTURES})
             for i, (spacing, shape) in enumerate(zip(spacings, shapes, strict=True))]  # fmt: skip
    return Fingerprint("sig", [channel], STRUCTURES, cases, [FOREGROUND])


def _config(*overrides: str):
    return load_config(None, ["model.name=unet3d", "model.overrides.base_channels=4", "train.precision=fp32",
                              *overrides])  # fmt: skip


def _plan(fingerprint: Fingerprint, *overrides: str) -> Plan:
    return plan_training(fingerprint, _config(*overrides), in_channels=1, num_labels=3)


def test_voxel_size_is_the_median_and_thick_slices_take_their_10th_percentile() -> None:
    iso = _fingerprint([[1.0, 0.8, 0.8], [1.5, 0.7, 0.7], [2.0, 0.9, 0.9]], [[100, 200, 200]] * 3)
    assert _plan(iso).preprocessing.spacing == pytest.approx((1.5, 0.8, 0.8))
    # 5 mm slices (6x the in-plane size) and few of them: nnU-Net's anisotropy rule.
    thick = _fingerprint([[5.0, 0.8, 0.8]] * 8 + [[1.0, 0.8, 0.8], [1.25, 0.8, 0.8]], [[40, 512, 512]] * 10)
    plan = _plan(thick)
    expected = max(np.percentile([5.0] * 8 + [1.0, 1.25], 10), 0.8 + 1e-5)
    assert plan.preprocessing.spacing[0] == pytest.approx(expected) and "10th percentile" in plan.reasons["spacing"]
    assert _plan(thick, "data.spacing_mm=[3, 1, 1]").preprocessing.spacing == (3.0, 1.0, 1.0)


def test_normalisation_follows_channel_names_and_the_config() -> None:
    ct = _fingerprint([[2.0, 2.0, 2.0]] * 2, [[32, 32, 32]] * 2)
    rule = _plan(ct).preprocessing.normalisation[0]
    assert (rule.scheme, rule.low, rule.high, rule.mean, rule.std) == ("ct", -80.0, 220.0, 60.0, 40.0)
    assert _plan(ct, "data.hu_window=[-175, 250]").preprocessing.normalisation[0].to_dict() == {
        "scheme": "window", "low": -175.0, "high": 250.0}  # fmt: skip
    assert _plan(ct, "data.normalisation=[zscore]").preprocessing.normalisation[0].scheme == "zscore"
    mr = _fingerprint([[2.0, 2.0, 2.0]] * 2, [[32, 32, 32]] * 2, channel="T2")
    assert _plan(mr).preprocessing.normalisation[0].scheme == "zscore"
    with pytest.raises(ConfigError, match="one normalisation per channel"):
        _plan(ct, "data.normalisation=[zscore, none]")
    with pytest.raises(ConfigError, match="unknown normalisation"):
        _plan(ct, "data.normalisation=[magic]")


def test_the_patch_shrinks_along_the_longest_axis_until_batch_two_fits_the_budget() -> None:
    big = _fingerprint([[1.0, 1.0, 1.0]] * 3, [[160, 256, 256]] * 3)
    roomy = _plan(big, "data.memory_budget_gb=64")
    assert roomy.patch_size == [160, 256, 256]  # the median case fits whole
    budget = (roomy.estimated_memory_gb + 3 * _plan(big, "data.patch_size=[8, 8, 8]").estimated_memory_gb) / 4
    tight = _plan(big, f"data.memory_budget_gb={budget}")
    assert math.prod(tight.patch_size) < math.prod(roomy.patch_size)
    assert tight.estimated_memory_gb <= budget and tight.batch_size >= 2
    assert all(side % 8 == 0 for side in tight.patch_size)
    assert max(tight.patch_size) - min(tight.patch_size) <= 16  # shrunk where longest: close to a cube in mm
    assert roomy.batch_size == 2  # 5% of the dataset's voxels is less than two such patches
    assert _plan(big, "data.patch_size=[32, 32, 32]", "train.batch_size=5").patch_size == [32, 32, 32]
    with pytest.raises(ConfigError, match="even at the smallest patch"):
        _plan(big, "data.memory_budget_gb=0.01")


def test_whole_image_models_get_a_grid_over_the_median_extent() -> None:
    fingerprint = _fingerprint([[2.5, 0.8, 0.8]] * 3, [[120, 400, 400]] * 3)
    config = load_config(None, ["model.name=sadaan_fast", "model.overrides.base_channels=4", "train.precision=fp32",
                                "data.memory_budget_gb=1"])  # fmt: skip
    plan = plan_training(fingerprint, config, in_channels=1, num_labels=3)
    extent = np.array([300.0, 320.0, 320.0])
    assert plan.grid is not None and plan.patch_size is None
    np.testing.assert_allclose(np.array(plan.preprocessing.spacing) * plan.grid, extent, rtol=1e-6)
    fixed = load_config(None, ["model.name=sadaan_fast", "model.overrides.grid_size=[32, 32, 32]"])
    assert plan_training(fingerprint, fixed, in_channels=1, num_labels=3).grid == [32, 32, 32]


def test_a_grid_larger_than_the_case_is_padded_not_filled_by_upsampling() -> None:
    # The 64³ phantoms: 5 mm voxels, a body box of 64 x 48 x 60 voxels (320 x 240 x 300 mm).
    fingerprint = _fingerprint([[5.0, 5.0, 5.0]] * 3, [[64, 48, 60]] * 3)
    config = load_config(None, ["model.name=sadaan_fast", "model.overrides.grid_size=[64, 64, 64]"])
    assert plan_training(fingerprint, config, in_channels=1, num_labels=3).preprocessing.spacing == (5.0, 5.0, 5.0)
    coarse = load_config(None, ["model.name=sadaan_fast", "model.overrides.grid_size=[48, 48, 48]"])
    spacing = plan_training(fingerprint, coarse, in_channels=1, num_labels=3).preprocessing.spacing
    assert spacing == pytest.approx((320 / 48, 5.0, 300 / 48))  # coarser where the extent needs it, never finer


def test_a_plan_saves_reads_back_and_prints(tmp_path: Path) -> None:
    plan = _plan(_fingerprint([[2.0, 2.0, 2.0]] * 2, [[32, 32, 32]] * 2))
    plan.save(tmp_path / "plans.json")
    again = Plan.from_dict(json.loads((tmp_path / "plans.json").read_text()))
    assert again.to_dict() == plan.to_dict()
    assert {row[0] for row in plan.table()} >= {"voxel size (mm)", "normalisation", "patch size", "batch size"}
    with pytest.raises(ConfigError, match="not a mednets plan"):
        Plan.from_dict({"model": "x"})


def test_plan_command_prints_the_fingerprint_and_the_plan(tmp_path: Path) -> None:
    root = write_phantom_dataset(tmp_path / "ds", 3, seed=2, config=PhantomConfig(shape=(24, 32, 32)))
    result = CliRunner().invoke(app, ["plan", str(root), "--out", str(tmp_path / "p.json"), "--set",
                                      "model.name=unet3d"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Fingerprint" in result.output and "patch size" in result.output and "CT: ct" in result.output
    assert json.loads((tmp_path / "p.json").read_text())["model"] == "unet3d"


def test_an_mr_dataset_trains_and_predicts_with_no_config_edits(tmp_path: Path) -> None:
    root = write_phantom_dataset(tmp_path / "mr", 3, seed=4, config=PhantomConfig(shape=(24, 32, 32), modality="mr"))
    config = load_config("configs/lhanet_phantoms.yaml", ["train.max_steps=2", "train.val_every=2",
                                                          "data.patch_size=[16, 32, 32]", "data.val_fraction=0.34"])  # fmt: skip
    run_training(config, tmp_path / "run", data_dir=root, progress=False)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert [rule["scheme"] for rule in plan["preprocessing"]["normalisation"]] == ["zscore"]
    result = predict(root / "imagesTr" / "phantom_000_0000.nii.gz", load_run(tmp_path / "run", device="cpu"))
    assert result.labels.array.shape == (24, 32, 32)


def test_worker_processes_give_the_batches_of_the_main_process_across_epochs() -> None:
    class Seeded(torch.utils.data.Dataset):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return 5

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.tensor([self.epoch * 100 + index])

    def batches(workers: int) -> list[list[int]]:
        sampler = EpochSampler(5, seed=1)
        loader = training_loader(Seeded(), EpochBatches(sampler, 2, 5, epoch=0, batch=1), workers, torch.device("cpu"))
        iterator = iter(loader)
        return [next(iterator).ravel().tolist() for _ in range(5)]

    in_process, in_worker = batches(0), batches(1)
    assert in_process == in_worker
    assert [value // 100 for batch in in_process for value in batch] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
