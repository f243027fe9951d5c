"""Label mapping onto the 13 organs (mednets.data.labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mednets import anatomy
from mednets.data.io import read_volume
from mednets.data.labels import convert_label_file, convert_labels, load_mapping
from mednets.errors import UnknownNameError


def test_shipped_map_agrees_with_totalsegmentator_class_map(real_ct: Path) -> None:
    class_map = json.loads((real_ct / "totalseg_class_map.json").read_text())["total"]
    for source_id, organ_id in load_mapping("totalsegmentator").items():
        source_name = class_map[str(source_id)]
        organ = anatomy.organ_by_id(organ_id).name
        # Same organ, TotalSegmentator spelling: e.g. kidney_left <-> left_kidney, adrenal_gland_right <-> right_adrenal.
        assert set(organ.replace("adrenal", "adrenal_gland").split("_")) <= set(source_name.split("_")) or (
            organ == "portal_splenic_vein" and source_name == "portal_vein_and_splenic_vein"
        ), (source_name, organ)
    assert len(load_mapping("totalsegmentator")) == 13


def test_totalsegmentator_example_keeps_voxel_counts(real_ct: Path, tmp_path: Path) -> None:
    original = read_volume(real_ct / "example_seg.nii.gz")
    counts = convert_label_file(real_ct / "example_seg.nii.gz", tmp_path / "seg.nii.gz")
    converted = read_volume(tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(converted.affine, original.affine)
    for ts_id, name in [
        (5, "liver"),
        (1, "spleen"),
        (2, "right_kidney"),
        (3, "left_kidney"),
        (7, "pancreas"),
        (52, "aorta"),
    ]:
        expected = int((original.array == ts_id).sum())
        assert expected > 0
        assert counts[name] == expected
        assert int((converted.array == anatomy.organ_id(name)).sum()) == expected
        np.testing.assert_array_equal(converted.array == anatomy.organ_id(name), original.array == ts_id)
    # Ribs, vertebrae, colon... become background.
    assert set(np.unique(converted.array)) <= set(range(14))
    assert int((converted.array > 0).sum()) == sum(counts.values())


def test_custom_json_mapping(tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"7": "liver", "9": "Left kidney"}))
    labels = np.array([[0, 7, 9, 4]])
    np.testing.assert_array_equal(convert_labels(labels, mapping), [[0, 6, 3, 0]])
    mapping.write_text(json.dumps({"7": "livr"}))
    with pytest.raises(UnknownNameError, match="livr"):
        convert_labels(labels, mapping)
    with pytest.raises(UnknownNameError, match="totalsegmentator"):
        convert_labels(labels, "no_such_map")
