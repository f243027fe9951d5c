"""Absurd numeric config values are refused at load time, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mednets.config import load_config
from mednets.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

REFUSED = [
    "train.max_steps=-1",
    "train.max_steps=0",
    "train.val_every=0",
    "train.val_every=-5",
    "train.max_minutes=-1",
    "train.batch_size=0",
    "train.accumulation_steps=0",
    "train.lr=0",
    "train.lr=-1e-3",
    "train.lr=.nan",
    "train.lr_multipliers={position_prior: -50}",
    "train.weight_decay=-0.1",
    "train.warmup_steps=-1",
    "train.grad_clip=-1",
    "train.seed=-1",
    "data.num_workers=-1",
    "data.patch_size=[32, -32, 32]",
    "data.patch_size=[32, 0]",
    "data.patch_size=[]",
    "data.val_fraction=1",
    "data.val_fraction=-0.1",
    "data.split_seed=-1",
    "data.hu_window=[300, -200]",
    "data.hu_window=[-200, 0, 300]",
    "data.spacing_mm=[1.0, 0, 1.0]",
    "data.organ_removal_prob=1.5",
    "data.min_tissue=-0.1",
    "data.stain_augment=-0.2",
    "data.phantoms.n_train=0",
    "data.phantoms.n_test=-1",
    "data.phantoms.shape=[64, 4, 64]",
    "data.phantoms.seed=-3",
    "model.init_prior_floor=1",
    "inference.overlap=1",
    "inference.overlap=-0.5",
    "inference.batch_size=0",
    "inference.min_volume_fraction=-0.25",
]


@pytest.mark.parametrize("override", REFUSED)
def test_absurd_value_is_a_config_error_naming_the_key(override: str) -> None:
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    message = str(caught.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize(
    "override",
    [
        "train.max_minutes=0",
        "train.max_minutes=null",
        "train.grad_clip=0",
        "train.grad_clip=null",
        "train.warmup_steps=0",
        "train.max_steps=1",
        "train.val_every=1",
        "train.lr_multipliers={position_prior: 0}",
        "data.val_fraction=0",
        "data.patch_size=null",
        "data.patch_size=[1, 1]",
        "data.spacing_mm=null",
        "data.organ_removal_prob=1",
        "inference.overlap=0",
        "inference.min_volume_fraction=0",
        "data.phantoms.n_test=0",
    ],
)
def test_boundary_values_still_load(override: str) -> None:
    load_config(None, [override])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


def test_defaults_load() -> None:
    load_config(None, [])
