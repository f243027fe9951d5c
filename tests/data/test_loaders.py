"""The training-data helpers of `mednets.data.loaders`: the label-frequency atlas on the model grid."""

from __future__ import annotations

import numpy as np
import torch

from mednets.data.dataset import load_dataset
from mednets.data.io import read_volume
from mednets.data.loaders import label_frequency_atlas, segmentation_datasets
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset


def test_label_frequency_atlas_is_the_share_of_cases_with_each_structure_per_voxel(tmp_path):
    root = write_phantom_dataset(tmp_path / "ds", 3, seed=3, config=PhantomConfig(shape=(32, 32, 32)))
    dataset = load_dataset(root)
    grid = (32, 32, 32)  # the phantoms' own size: the resize is the identity, so the counts are exact
    train_set, _ = segmentation_datasets(dataset, grid=grid, patch_size=None, hu_window=(-175, 250), spacing_mm=None,
                                         val_fraction=0.0, split_seed=0, augment=False, seed=0)  # fmt: skip
    atlas = label_frequency_atlas(
        train_set, len(dataset.labels), grid=grid, hu_window=(-175, 250), spacing_mm=None, smoothing_voxels=0
    )
    assert atlas.shape == (len(dataset.labels) - 1, *grid) and atlas.dtype == torch.float32
    labels = [read_volume(dataset.case(record["case"]).label).array for record in train_set.data]
    liver = dataset.labels["liver"]
    expected = np.mean([labels_map == liver for labels_map in labels], axis=0)
    np.testing.assert_allclose(atlas[liver - 1].numpy(), expected, atol=1e-6)
    smoothed = label_frequency_atlas(train_set, len(dataset.labels), grid=grid, hu_window=(-175, 250), spacing_mm=None)
    assert float(smoothed.min()) >= 0 and float(smoothed.max()) <= 1
    assert abs(float(smoothed.sum()) - float(atlas.sum())) / float(atlas.sum()) < 0.01  # smoothing moves, not adds
