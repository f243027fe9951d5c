"""The organ registry is the one source of truth for ids, names, volumes and left/right pairs."""

from __future__ import annotations

import pytest

from mednets import anatomy
from mednets.errors import UnknownNameError


def test_btcv_ids_in_order() -> None:
    expected = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                "inferior_vena_cava", "portal_splenic_vein", "pancreas", "right_adrenal", "left_adrenal"]  # fmt: skip
    assert anatomy.organ_names() == expected
    assert [o.id for o in anatomy.ORGANS] == list(range(1, 14))
    assert anatomy.label_names()["background"] == 0


def test_name_lookup_is_forgiving_about_case_and_spaces() -> None:
    assert anatomy.organ_id("Left Kidney") == 3
    assert anatomy.organ_by_id(6).name == "liver"


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="spleen") as caught:
        anatomy.organ("kidney")
    assert "kidney" in str(caught.value)
    with pytest.raises(UnknownNameError):
        anatomy.organ_by_id(0)


def test_left_right_pairs_are_symmetric() -> None:
    pairs = anatomy.left_right_pairs()
    assert pairs == [(2, 3), (12, 13)]
    for right, left in pairs:
        assert anatomy.organ_by_id(right).pair == anatomy.organ_by_id(left).name
        assert anatomy.organ_by_id(left).pair == anatomy.organ_by_id(right).name


def test_typical_volumes_are_plausible() -> None:
    volumes = {o.name: o.typical_volume_ml for o in anatomy.ORGANS}
    assert volumes["liver"] > volumes["spleen"] > volumes["right_adrenal"] > 0
