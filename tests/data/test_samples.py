"""The training samples of `mednets.data.samples`: the label atlas on the model grid, organ removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mednets.data.dataset import load_dataset
from mednets.data.io import read_volume
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.data.samples import label_atlas, segmentation_datasets
from mednets.errors import ConfigError


def test_label_atlas_is_the_share_of_cases_per_voxel_and_the_smallest_extent(tmp_path):
    root = write_phantom_dataset(tmp_path / "ds", 3, seed=3, config=PhantomConfig(shape=(32, 32, 32)))
    dataset = load_dataset(root)
    grid = (32, 32, 32)  # the phantoms' own size: the resize is the identity, so the counts are exact
    train_set, _ = segmentation_datasets(dataset, grid=grid, patch_size=None, hu_window=(-175, 250), spacing_mm=None,
                                         val_fraction=0.0, split_seed=0, augment=False, seed=0)  # fmt: skip
    exact = label_atlas(
        train_set,
        len(dataset.labels),
        grid=grid,
        channel_names=["CT"],
        hu_window=(-175, 250),
        spacing_mm=None,
        smoothing_voxels=0,
    )
    atlas = exact.frequency
    assert atlas.shape == (len(dataset.labels) - 1, *grid) and atlas.dtype == torch.float32
    labels = [read_volume(dataset.case(record["case"]).label).array for record in train_set.data]
    liver = dataset.labels["liver"]
    expected = np.mean([labels_map == liver for labels_map in labels], axis=0)
    np.testing.assert_allclose(atlas[liver - 1].numpy(), expected, atol=1e-6)
    for name, label in dataset.labels.items():
        if label:
            extents = [int((labels_map == label).sum()) for labels_map in labels if (labels_map == label).any()]
            smallest = min(extents, default=0) / np.prod(grid)
            assert float(exact.smallest_share[label - 1]) == pytest.approx(smallest, rel=1e-6), name
    smoothed = label_atlas(
        train_set, len(dataset.labels), grid=grid, channel_names=["CT"], hu_window=(-175, 250), spacing_mm=None
    ).frequency
    assert float(smoothed.min()) >= 0 and float(smoothed.max()) <= 1
    assert abs(float(smoothed.sum()) - float(atlas.sum())) / float(atlas.sum()) < 0.01  # smoothing moves, not adds


def test_organ_removal_erases_an_organ_from_training_cases_only_and_checks_names(phantom_dataset):
    dataset = load_dataset(phantom_dataset)
    common = dict(grid=(32, 32, 32), patch_size=None, hu_window=(-175, 250), spacing_mm=None, val_fraction=0.34,
                  split_seed=0, augment=True, seed=0)  # fmt: skip
    train_set, val_set = segmentation_datasets(dataset, **common, organ_removal=("spleen",), organ_removal_prob=1.0)
    spleen = dataset.labels["spleen"]
    for sample in train_set:  # every training case has lost its spleen: labels and presence agree
        assert not (sample["label"] == spleen).any()
        assert not bool(sample["presence"][spleen - 1])
        assert bool(sample["presence"][dataset.labels["liver"] - 1])
    assert all((sample["label"] == spleen).any() for sample in val_set)  # validation is never altered
    with pytest.raises(ConfigError, match="unknown structure to remove") as caught:
        segmentation_datasets(dataset, **common, organ_removal=("appendix",), organ_removal_prob=0.5)
    assert "data.organ_removal" in str(caught.value) and "appendix" in str(caught.value)
