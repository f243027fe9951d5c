"""The phantom generator: determinism, speed, anatomy, Hounsfield units, absence bookkeeping, full-size and MR modes."""

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
from mednets.data.phantom_grid import uses_drawing_grid
from mednets.data.phantoms import (
    MIXED_SLICE_MM,
    SCENARIOS,
    PhantomConfig,
    case_geometry,
    default_workers,
    generate_phantom,
    parse_absence_rates,
    write_phantom_dataset,
)
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
    with pytest.raises(UnknownNameError, match="modality"):
        PhantomConfig(modality="pet")
    with pytest.raises(ConfigError, match="mixed spacing"):
        PhantomConfig(spacing=(1.0, 1.0, 1.0), mixed_spacing=True)
    with pytest.raises(ConfigError, match="workers"):
        write_phantom_dataset(tmp_path / "none", 1, workers=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_phantom_dataset(tmp_path / "busy", 1)
    assert parse_absence_rates("splenectomy=0.3")["splenectomy"] == 0.3
    assert set(parse_absence_rates(0.2).values()) == {0.2}


# sha256 of image and label bytes, taken before the full-size path existed: the quality figures of
# benchmarks/RESULTS.md were measured on these phantoms.
DEFAULT_BYTES = {
    (0, 0, (64, 64, 64)): (
        "17a52768bff07653d6bc65af8eeb95229317dbb1efd8da84a0577f94ede5f541",
        "c39a83fdec1337b6662aa8cfe09bba5e5d5228ec893705f77d74a987adb26654",
    ),
    (1, 3, (64, 64, 64)): (
        "d31d8695bfed80d29e394ac0d3e2dbc2b29df60fc7db0bbffb2ca3093114f39f",
        "22ae4dbc94edd35c4dfe791e1d9f2c72178852f1b1670ac3cf120b6efd821515",
    ),
    (0, 0, (96, 96, 96)): (
        "014491d1aa86f7a5c1cda630ebf89a11d0ccbc9417a6a315720399b98983cb87",
        "469422032e84caeaac41f259155a9bd6fb0fdc21b6ba17ffc42412d4eb41d315",
    ),
}


@pytest.mark.parametrize(("seed", "index", "shape"), list(DEFAULT_BYTES))
def test_default_phantoms_keep_their_bytes(seed: int, index: int, shape: tuple[int, int, int]) -> None:
    case = generate_phantom(seed, PhantomConfig(shape=shape), case_index=index)
    digests = (hashlib.sha256(case.image.tobytes()).hexdigest(), hashlib.sha256(case.labels.tobytes()).hexdigest())
    assert digests == DEFAULT_BYTES[(seed, index, shape)]


def test_only_fine_voxels_use_the_drawing_grid() -> None:
    assert not uses_drawing_grid(PhantomConfig().spacing_mm)
    assert not uses_drawing_grid(PhantomConfig(shape=(160, 160, 160)).spacing_mm)  # 2 mm: voxel by voxel
    assert not uses_drawing_grid(PhantomConfig(shape=(75, 128, 128)).spacing_mm)
    assert uses_drawing_grid((1.5, 0.8, 0.8)) and uses_drawing_grid((5.0, 0.6, 0.6))


def test_workers_by_default_only_where_they_pay() -> None:
    import os

    assert default_workers(8, PhantomConfig()) == 1  # 64³: starting a worker costs more than a case
    full = PhantomConfig(shape=(300, 512, 512), mixed_spacing=True)
    assert default_workers(6, full) == min(6, len(os.sched_getaffinity(0)))
    assert default_workers(1, full) == 1


def test_mixed_spacing_draws_clinical_geometries() -> None:
    config = PhantomConfig(shape=(300, 512, 512), mixed_spacing=True)
    geometries = [case_geometry(4, config, case_index=index) for index in range(40)]
    slice_mm = {spacing[0] for _, spacing in geometries}
    in_plane = [spacing[1] for _, spacing in geometries]
    assert len(slice_mm) >= 4 and slice_mm <= set(MIXED_SLICE_MM)
    assert all(0.6 <= s <= 0.95 for s in in_plane) and max(in_plane) - min(in_plane) > 0.2
    for shape, spacing in geometries:
        assert shape[1:] == (512, 512) and spacing[1] == spacing[2]
        assert 120 <= shape[0] <= 300
        if 120 < shape[0] < 300:
            assert 300 <= shape[0] * spacing[0] <= 450  # the coverage asked for, unless clipped
    assert len({shape[0] for shape, _ in geometries}) > 10
    assert case_geometry(4, config, case_index=7) == geometries[7]  # fixed by seed and index


def test_mixed_spacing_dataset_records_each_geometry_in_its_files(tmp_path: Path) -> None:
    from mednets.data.io import read_volume

    config = PhantomConfig(shape=(24, 40, 48), mixed_spacing=True)
    root = write_phantom_dataset(tmp_path / "mixed", 4, seed=3, config=config)
    info = json.loads((root / "dataset.json").read_text())
    assert info["generator"]["spacing_mm"] == "per case"
    spacings = set()
    for index in range(4):
        record = info["cases"][f"phantom_{index:03d}"]
        image = read_volume(root / "imagesTr" / f"phantom_{index:03d}_0000.nii.gz")
        labels = read_volume(root / "labelsTr" / f"phantom_{index:03d}.nii.gz")
        assert list(image.array.shape) == record["shape"] == [24, 40, 48]  # D is the most slices: 24
        sz, sy, sx = record["spacing_mm"]
        np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), [sx, sy, sz], rtol=1e-6)
        np.testing.assert_allclose(labels.affine, image.affine)
        assert 0.6 <= sx <= 0.95 and sz in MIXED_SLICE_MM
        spacings.add((sz, sx))
    assert len(spacings) == 4
    load_dataset(root)


def test_fine_voxels_draw_the_same_anatomy_in_seconds() -> None:
    config = PhantomConfig(shape=(64, 400, 400), spacing=(5.0, 0.8, 0.8), absence_rates={})
    start = time.perf_counter()
    case = generate_phantom(0, config)
    seconds = time.perf_counter() - start
    voxel_ml = 5.0 * 0.8 * 0.8 / 1000.0
    counts = np.bincount(case.labels.ravel(), minlength=14)
    volumes = {o.name: counts[o.id] * voxel_ml for o in anatomy.ORGANS}
    assert case.absent == {} and all(counts[1:] >= 10), volumes
    assert 700 < volumes["liver"] < 2500 and 60 < volumes["spleen"] < 400
    image = case.image.astype(float)
    for name, low, high in (("liver", 45, 75), ("spleen", 35, 65), ("aorta", 150, 250), ("gallbladder", -10, 35)):
        assert low <= np.median(image[case.labels == anatomy.organ_id(name)]) <= high, name
    assert image[0, 0, 0] < -900
    assert seconds < 15, seconds  # drawn on the 1.6 mm grid: seconds, not the voxel-by-voxel minute


@pytest.mark.parametrize(("shape", "spacing"), [((40, 40, 40), None), ((24, 160, 160), (5.0, 0.8, 0.8))])
def test_mr_mode_renders_the_same_anatomy_in_arbitrary_units(shape, spacing) -> None:
    ct_config = PhantomConfig(shape=shape, spacing=spacing, absence_rates={})
    mr_config = PhantomConfig(shape=shape, spacing=spacing, absence_rates={}, modality="mr")
    scales = set()
    for index in range(2):
        ct = generate_phantom(5, ct_config, case_index=index)
        mr = generate_phantom(5, mr_config, case_index=index)
        np.testing.assert_array_equal(mr.labels, ct.labels)
        assert mr.absent == ct.absent and mr.image.dtype == np.int16 and mr.image.min() >= 0
        scales.add(mr.info["max_intensity"])
        assert 500 <= mr.image.max() <= 4000
        median = {o.name: np.median(mr.image[mr.labels == o.id]) for o in anatomy.ORGANS if (mr.labels == o.id).any()}
        fat = np.median(mr.image[(mr.labels == 0) & (ct.image > -130) & (ct.image < -80)])
        assert fat > median["liver"] > median["spleen"] > median["gallbladder"], (fat, median)
    assert len(scales) == 2  # not comparable across cases: a planner must normalise each image


def test_mr_dataset_names_its_channel(tmp_path: Path) -> None:
    root = write_phantom_dataset(tmp_path / "mr", 2, seed=1, config=PhantomConfig(shape=(24, 24, 24), modality="mr"))
    info = json.loads((root / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "MR"} and info["generator"]["modality"] == "mr"
    assert load_dataset(root).channel_names == ["MR"]


def test_workers_write_the_same_bytes(tmp_path: Path) -> None:
    config = PhantomConfig(shape=(16, 48, 48), mixed_spacing=True, modality="mr")
    one = _digest(write_phantom_dataset(tmp_path / "one", 3, seed=2, config=config, workers=1))
    two = _digest(write_phantom_dataset(tmp_path / "two", 3, seed=2, config=config, workers=2, progress=True))
    assert one == two and len(one) == 7


def test_phantoms_command_mixed_spacing_mr(tmp_path: Path) -> None:
    from mednets.cli import main

    out = tmp_path / "cli"
    args = ["phantoms", "--out", str(out), "--n", "2", "--shape", "20", "32", "32", "--mixed-spacing"]
    assert main([*args, "--modality", "mr", "--workers", "1"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "MR"} and "spacing_mm" in info["cases"]["phantom_001"]
    assert main(["phantoms", "--out", str(tmp_path / "bad"), "--modality", "pet"]) == 2
