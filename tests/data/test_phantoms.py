"""The phantom generator: determinism, speed, anatomy, Hounsfield units and absence bookkeeping."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from mednets import anatomy
from mednets.data.dataset import load_dataset
from mednets.data.phantoms import SCENARIOS, PhantomConfig, generate_phantom, parse_absence_rates, write_phantom_dataset
from mednets.errors import ConfigError, UnknownNameError

NO_ABSENCE = PhantomConfig(absence_rates={})


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(0, NO_ABSENCE)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    config = PhantomConfig(shape=(24, 24, 24), absence_rates=parse_absence_rates(0.5))
    first = _digest(write_phantom_dataset(tmp_path / "a", 2, seed=5, config=config))
    second = _digest(write_phantom_dataset(tmp_path / "b", 2, seed=5, config=config))
    other = _digest(write_phantom_dataset(tmp_path / "c", 2, seed=6, config=config))
    assert first == second
    assert first["imagesTr/phantom_000_0000.nii.gz"] != other["imagesTr/phantom_000_0000.nii.gz"]


def test_a_case_does_not_depend_on_how_many_are_drawn() -> None:
    config = PhantomConfig(shape=(24, 24, 24))
    one = generate_phantom(3, config, case_index=1)
    again = generate_phantom(3, config, case_index=1)
    np.testing.assert_array_equal(one.image, again.image)
    np.testing.assert_array_equal(one.labels, again.labels)
    assert not np.array_equal(one.image, generate_phantom(3, config, case_index=2).image)


def test_64_cube_case_under_one_second(tmp_path: Path) -> None:
    from mednets.data.io import write_volume
    from mednets.data.volume import Volume

    timings = []
    for index in range(3):
        start = time.perf_counter()
        case = generate_phantom(11, PhantomConfig(), case_index=index)
        write_volume(Volume(case.image, case.affine), tmp_path / f"{index}_0000.nii.gz")
        write_volume(Volume(case.labels, case.affine), tmp_path / f"{index}.nii.gz")
        timings.append(time.perf_counter() - start)
    assert case.image.shape == (64, 64, 64)
    assert min(timings) < 1.0, timings


def test_default_geometry(phantom) -> None:
    assert phantom.image.dtype == np.int16 and phantom.labels.dtype == np.uint8
    np.testing.assert_allclose(np.abs(np.diag(phantom.affine)[:3]), [5.0, 5.0, 5.0])
    import nibabel as nib

    assert "".join(nib.aff2axcodes(phantom.affine)) == "LPS"


def test_all_organs_present_with_plausible_volumes(phantom) -> None:
    voxel_ml = 5.0**3 / 1000.0
    counts = np.bincount(phantom.labels.ravel(), minlength=14)
    volumes = {o.name: counts[o.id] * voxel_ml for o in anatomy.ORGANS}
    assert phantom.absent == {}
    assert all(counts[1:] >= 10), volumes
    assert 700 < volumes["liver"] < 2500
    assert 60 < volumes["spleen"] < 400
    assert 60 < volumes["right_kidney"] < 260 and 60 < volumes["left_kidney"] < 260
    assert volumes["liver"] > volumes["stomach"] > volumes["pancreas"] > volumes["left_adrenal"]


def test_organs_sit_on_the_right_side(phantom) -> None:
    # w increases towards the patient's left (LPS): right-sided organs have smaller w.
    centre = {o.name: ndimage.center_of_mass(phantom.labels == o.id) for o in anatomy.ORGANS}
    middle = phantom.labels.shape[2] / 2
    assert centre["liver"][2] < middle < centre["spleen"][2]
    assert centre["right_kidney"][2] < middle < centre["left_kidney"][2]
    assert centre["inferior_vena_cava"][2] < centre["aorta"][2]
    assert centre["gallbladder"][0] < centre["liver"][0]  # below the liver's centre
    assert centre["esophagus"][0] > centre["pancreas"][0]  # d increases superiorly
    assert centre["stomach"][1] < centre["left_kidney"][1]  # stomach in front of the kidney


def test_hounsfield_units(phantom) -> None:
    image, labels = phantom.image.astype(float), phantom.labels
    median = {o.name: float(np.median(image[labels == o.id])) for o in anatomy.ORGANS}
    for name in ("liver", "spleen", "pancreas"):
        assert 40 <= median[name] <= 70, (name, median[name])
    for name in ("aorta", "inferior_vena_cava", "portal_splenic_vein"):
        assert 120 <= median[name] <= 250, (name, median[name])
    assert -10 <= median["gallbladder"] <= 35
    assert image[0, 0, 0] < -900  # air outside the body
    body = ndimage.binary_fill_holes(image > -400)
    background = image[(labels == 0) & body]
    assert np.mean((background > -150) & (background < -60)) > 0.15  # plenty of fat
    assert np.percentile(image[body], 99.5) > 300  # bone
    for name in ("right_kidney", "left_kidney"):
        kidney = labels == anatomy.organ_id(name)
        inner = ndimage.binary_erosion(kidney)  # the outermost voxels mix with perirenal fat (partial volume)
        core = ndimage.binary_erosion(inner)
        cortex_shell = inner & ~core
        medulla = core & (image > 0)  # without the sinus fat
        assert image[cortex_shell].mean() > image[medulla].mean() + 15, name  # cortex brighter than medulla


def test_absence_bookkeeping(tmp_path: Path) -> None:
    rates = dict.fromkeys(SCENARIOS, 0.5)
    root = write_phantom_dataset(tmp_path / "ds", 6, seed=2, config=PhantomConfig(absence_rates=rates))
    info = json.loads((root / "dataset.json").read_text())
    dataset = load_dataset(root)
    seen = set()
    for case in dataset.training:
        record = info["cases"][case.case_id]
        from mednets.data.io import read_volume

        labels = read_volume(case.label).array
        counts = np.bincount(labels.ravel(), minlength=14)
        for o in anatomy.ORGANS:
            if o.name in record["absent"]:
                assert counts[o.id] == 0, (case.case_id, o.name)
            else:
                assert counts[o.id] >= info["min_voxels"], (case.case_id, o.name, counts[o.id])
        for scenario in record["scenarios"]:
            seen.add(scenario)
            for organ in SCENARIOS[scenario][0]:
                assert record["absent"][organ] == SCENARIOS[scenario][1]
        assert dataset.presence(case.case_id) == {o.name: o.name not in record["absent"] for o in anatomy.ORGANS}
    assert len(seen) >= 4  # most scenarios occur at rate 0.5 over 6 cases


@pytest.mark.parametrize(("scenario", "lost"), [("truncated_top", "esophagus"), ("truncated_bottom", "right_kidney")])
def test_truncation_removes_or_cuts_organs(scenario: str, lost: str) -> None:
    reason = SCENARIOS[scenario][1]
    for index in range(3):
        case = generate_phantom(1, PhantomConfig(absence_rates={scenario: 1.0}), case_index=index)
        assert case.scenarios == [scenario]
        end = "top" if scenario == "truncated_top" else "bottom"
        assert lost in case.absent or case.cut.get(lost, "").endswith(end)
        assert all(why == reason for why in case.absent.values())
        assert case.absent or case.cut


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="nephrectomy"):
        parse_absence_rates("kidneyectomy=0.5")
    with pytest.raises(ConfigError):
        PhantomConfig(absence_rates={"splenectomy": 1.5})
    with pytest.raises(ConfigError):
        PhantomConfig(shape=(4, 64, 64))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_phantom_dataset(tmp_path / "busy", 1)
    assert parse_absence_rates("splenectomy=0.3")["splenectomy"] == 0.3
    assert set(parse_absence_rates(0.2).values()) == {0.2}
