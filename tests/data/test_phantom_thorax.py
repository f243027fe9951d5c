"""The thorax phantom: determinism, each scenario doing what it says, record and labels agreeing, a loadable dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mednets.cli import main
from mednets.data.dataset import DEFAULT_MIN_VOXELS, load_dataset
from mednets.data.phantom_thorax import (
    DEFAULT_ABSENCE_RATES,
    SCENARIOS,
    STRUCTURES,
    ThoraxConfig,
    generate_thorax_phantom,
)
from mednets.data.phantoms import Phantom, parse_absence_rates, write_phantom_dataset
from mednets.errors import ConfigError, UnknownNameError

SHAPE = (48, 48, 48)  # 8.75 x 7.5 x 7.5 mm: every vertebra keeps its min_voxels
PLAIN = ThoraxConfig(shape=SHAPE, absence_rates={})
ID = {name: label for label, name in enumerate(STRUCTURES, 1)}


def _forced(scenario: str) -> ThoraxConfig:
    return ThoraxConfig(shape=SHAPE, absence_rates={scenario: 1.0})


def _count(phantom: Phantom, name: str) -> int:
    return int((phantom.labels == ID[name]).sum())


def _assert_record_agrees_with_labels(phantom: Phantom, min_voxels: int = DEFAULT_MIN_VOXELS) -> None:
    for name in STRUCTURES:
        mask = phantom.labels == ID[name]
        touches = bool(mask[0].any() or mask[-1].any())
        if name in phantom.absent:
            assert not mask.any(), name
        else:
            assert mask.sum() >= min_voxels, name
            assert (name in phantom.cut) == touches, name


def test_same_seed_same_case_and_cases_differ() -> None:
    config = ThoraxConfig(shape=(24, 24, 24))
    one, again = generate_thorax_phantom(3, config, case_index=1), generate_thorax_phantom(3, config, case_index=1)
    np.testing.assert_array_equal(one.image, again.image)
    np.testing.assert_array_equal(one.labels, again.labels)
    assert one.record() == again.record()
    assert not np.array_equal(one.image, generate_thorax_phantom(3, config, case_index=2).image)


def test_plain_case_has_every_structure_in_hounsfield_units() -> None:
    phantom = generate_thorax_phantom(0, PLAIN)
    assert phantom.image.dtype == np.int16 and phantom.labels.dtype == np.uint8
    assert phantom.absent == {} and phantom.scenarios == []
    lung = phantom.image[phantom.labels == ID["left_lung"]]
    assert np.median(lung) < -700
    assert np.median(phantom.image[phantom.labels == ID["heart"]]) > 50
    assert np.median(phantom.image[phantom.labels == ID["vertebrae_L3"]]) > 150
    _assert_record_agrees_with_labels(phantom)


@pytest.mark.parametrize(("side", "sign"), [("left", 1.0), ("right", -1.0)])
def test_pneumonectomy_removes_the_lung_and_shifts_the_heart_towards_it(side: str, sign: float) -> None:
    plain = generate_thorax_phantom(1, PLAIN)
    case = generate_thorax_phantom(1, _forced(f"{side}_pneumonectomy"))
    lung = f"{side}_lung"
    assert case.scenarios == [f"{side}_pneumonectomy"]
    assert case.absent == {lung: SCENARIOS[f"{side}_pneumonectomy"]}
    assert _count(case, lung) == 0
    # Index w grows towards the patient's left: the heart moves towards the empty side.
    spacing_x = ThoraxConfig(shape=SHAPE).spacing_mm[2]
    shift_mm = (np.argwhere(case.labels == ID["heart"])[:, 2].mean() - np.argwhere(plain.labels == ID["heart"])[:, 2].mean()) * spacing_x  # fmt: skip
    assert sign * shift_mm > 10.0
    # Where the lung was, fluid and mediastinum: no longer air.
    assert np.median(case.image[plain.labels == ID[lung]]) > -200
    _assert_record_agrees_with_labels(case)


@pytest.mark.parametrize("side", ["left", "right"])
def test_lobectomy_leaves_a_smaller_lung_and_staple_lines(side: str) -> None:
    plain = generate_thorax_phantom(2, PLAIN)
    case = generate_thorax_phantom(2, _forced(f"{side}_lobectomy"))
    lung = f"{side}_lung"
    assert case.absent == {} and case.small == {lung: SCENARIOS[f"{side}_lobectomy"]}
    assert 0 < _count(case, lung) < 0.9 * _count(plain, lung)
    assert (plain.image > 1200).sum() == 0 < (case.image > 1200).sum()  # staples outshine bone
    _assert_record_agrees_with_labels(case)


def test_missing_vertebra_is_absent_and_the_column_shorter() -> None:
    vertebrae = [label for name, label in ID.items() if name.startswith("vertebrae_")]
    seen = {}
    for index in range(12):
        case = generate_thorax_phantom(4, _forced("missing_vertebra"), case_index=index)
        (name,) = case.absent
        seen.setdefault(name, (index, case))
        if len(seen) == 2:
            break
    assert set(seen) == {"vertebrae_T12", "vertebrae_L5"}
    for name, (index, case) in seen.items():
        assert case.absent[name].startswith("congenitally missing vertebra") and _count(case, name) == 0
        plain = generate_thorax_phantom(4, PLAIN, case_index=index)
        lowest_slice = [np.argwhere(np.isin(p.labels, vertebrae))[:, 0].min() for p in (plain, case)]
        assert lowest_slice[1] > lowest_slice[0]  # the column ends higher
        _assert_record_agrees_with_labels(case)


def test_fused_vertebrae_become_one_block_with_the_upper_label() -> None:
    plain = generate_thorax_phantom(5, PLAIN)
    case = generate_thorax_phantom(5, _forced("fused_vertebrae"))
    ((lower, reason),) = case.absent.items()
    upper = "vertebrae_" + reason.removeprefix("fused with ").split(" ")[0]
    assert reason.endswith("(block vertebra)") and _count(case, lower) == 0
    assert _count(case, upper) > 1.5 * _count(plain, upper)
    _assert_record_agrees_with_labels(case)


def test_thorax_only_field_of_view_loses_lower_vertebrae_and_cuts_the_last() -> None:
    for index in range(4):
        case = generate_thorax_phantom(6, _forced("thorax_only"), case_index=index)
        lost = [name for name, reason in case.absent.items() if reason == SCENARIOS["thorax_only"]]
        assert "vertebrae_L5" in lost and all(name.startswith("vertebrae_L") for name in lost)
        assert {"left_lung", "right_lung", "heart", "trachea"}.isdisjoint(case.absent)
        assert any(reason.endswith("bottom") for reason in case.cut.values())
        _assert_record_agrees_with_labels(case)


def test_abdomen_only_field_of_view_loses_or_cuts_the_chest() -> None:
    for index in range(4):
        case = generate_thorax_phantom(7, _forced("abdomen_only"), case_index=index)
        assert case.absent["trachea"] == SCENARIOS["abdomen_only"]
        for name in ("heart", "left_lung", "right_lung"):
            assert name in case.absent or case.cut[name] == "cut by the field of view at the top"
        assert "vertebrae_L3" not in case.absent
        _assert_record_agrees_with_labels(case)


def test_record_and_labels_agree_at_any_mix_of_scenarios() -> None:
    config = ThoraxConfig(shape=(32, 40, 40), absence_rates=parse_absence_rates(0.5, DEFAULT_ABSENCE_RATES))
    for index in range(6):
        _assert_record_agrees_with_labels(generate_thorax_phantom(8, config, case_index=index))


def test_bad_absence_rates_are_refused() -> None:
    assert parse_absence_rates("left_lobectomy=0.5", DEFAULT_ABSENCE_RATES)["left_lobectomy"] == 0.5
    with pytest.raises(UnknownNameError, match="left_pneumonectomy"):
        parse_absence_rates("splenectomy=0.5", DEFAULT_ABSENCE_RATES)
    with pytest.raises(ConfigError):
        parse_absence_rates("thorax_only", DEFAULT_ABSENCE_RATES)
    with pytest.raises(ConfigError):
        ThoraxConfig(absence_rates={"thorax_only": 2.0})


def test_written_dataset_loads_and_its_presence_matches_the_record(tmp_path: Path) -> None:
    config = ThoraxConfig(shape=(24, 32, 32), absence_rates=parse_absence_rates(0.4, DEFAULT_ABSENCE_RATES))
    root = write_phantom_dataset(tmp_path / "thorax", 3, seed=9, config=config, workers=2)
    dataset = load_dataset(root)
    assert dataset.structures == list(STRUCTURES) and dataset.channel_names == ["CT"]
    cases = json.loads((root / "dataset.json").read_text())["cases"]
    for case in dataset.training:
        record = cases[case.case_id]
        assert set(record) >= {"scenarios", "absent", "cut", "small"}
        assert dataset.presence(case.case_id) == {name: name not in record["absent"] for name in STRUCTURES}
    with pytest.raises(ConfigError):
        write_phantom_dataset(root, 1, config=config)


def test_phantoms_command_draws_thorax_phantoms(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["phantoms", "--kind", "thorax", "--out", str(out), "--n", "1", "--shape", "16", "24", "24"]
    assert main([*args, "--absence-rate", "abdomen_only=1"]) == 0
    assert json.loads((out / "dataset.json").read_text())["cases"]["phantom_000"]["scenarios"] == ["abdomen_only"]
    assert main([*args, "--overwrite", "--modality", "mr"]) == 2
    assert main(["phantoms", "--kind", "pelvis", "--out", str(tmp_path / "other")]) == 2


def test_legends_name_a_dataset_s_own_structures() -> None:
    from mednets.data.preview import label_colours

    colours = label_colours([1, 3], {"left_lung": 1, "right_lung": 2, "heart": 3})
    assert colours[1][0] == "Left lung" and colours[3][0] == "Heart"
