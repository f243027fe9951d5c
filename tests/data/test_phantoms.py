"""The phantom generator: determinism, speed, anatomy, Hounsfield units, scenarios and their bookkeeping, full-size and MR modes."""

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
SMALL = (48, 48, 48)  # 6.7 mm voxels: organs keep hundreds of voxels, a case draws in a few hundredths of a second
CLIP_HU = 1000  # above any blurred bone (at most about 700 HU): only a surgical clip is brighter


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
            if o.name in record["small"]:
                assert o.name not in record["absent"], (case.case_id, o.name)
        for scenario in record["scenarios"]:
            seen.add(scenario)
            effect, reason = SCENARIOS[scenario].effect, SCENARIOS[scenario].reason
            for organ in SCENARIOS[scenario].organs:
                if effect == "absent":
                    assert record["absent"][organ] == reason
                else:  # a small organ is present unless truncation took it
                    assert record["small"].get(organ) == reason or record["absent"][organ].startswith("outside")
        assert len({SCENARIOS[name].site for name in record["scenarios"]}) == len(record["scenarios"])
        assert dataset.presence(case.case_id) == {o.name: o.name not in record["absent"] for o in anatomy.ORGANS}
    assert len(seen) >= 6  # many scenarios occur at rate 0.5 over 6 cases (one per site)


@pytest.mark.parametrize(
    ("scenario", "lost"), [("truncated_top", "esophagus"), ("truncated_bottom", "inferior_vena_cava")]
)
def test_truncation_removes_or_cuts_organs_at_random_levels(scenario: str, lost: str) -> None:
    reason = SCENARIOS[scenario].reason
    shifts, losses = [], []
    for index in range(8):
        case = generate_phantom(1, PhantomConfig(shape=SMALL, absence_rates={scenario: 1.0}), case_index=index)
        assert case.scenarios == [scenario]
        end = "top" if scenario == "truncated_top" else "bottom"
        assert lost in case.absent or case.cut.get(lost, "").endswith(end)
        assert all(why == reason for why in case.absent.values())
        assert case.absent or case.cut
        shifts.append(case.info["fov_shift_mm"])
        losses.append(len(case.absent))
    assert max(shifts) - min(shifts) > 100  # the cut edge wanders over the abdomen
    assert len(set(losses)) >= 3, losses  # from no organ lost to many


def _twins(scenario: str, index: int, seed: int = 4):
    """The case with `scenario` forced and the same patient without any scenario."""
    case = generate_phantom(seed, PhantomConfig(shape=SMALL, absence_rates={scenario: 1.0}), case_index=index)
    return case, generate_phantom(seed, PhantomConfig(shape=SMALL, absence_rates={}), case_index=index)


def _voxels(case, organ: str) -> int:
    return int(np.count_nonzero(case.labels == anatomy.organ_id(organ)))


def test_a_scenario_changes_only_the_organs_it_touches() -> None:
    case, twin = _twins("left_nephrectomy", 0)
    elsewhere = twin.labels != anatomy.organ_id("left_kidney")
    np.testing.assert_array_equal(case.labels[elsewhere], twin.labels[elsewhere])
    assert case.absent == {"left_kidney": "left nephrectomy"} and twin.absent == {}


def test_renal_agenesis_leaves_a_larger_solitary_kidney_without_clips() -> None:
    normal = [_voxels(generate_phantom(4, PhantomConfig(shape=SMALL, absence_rates={}), case_index=i), "right_kidney")
              for i in range(6)]  # fmt: skip
    for index in range(3):
        case, twin = _twins("left_renal_agenesis", index)
        assert case.absent == {"left_kidney": "congenital absence (solitary kidney)"} and case.small == {}
        assert 1.2 <= _voxels(case, "right_kidney") / _voxels(twin, "right_kidney") <= 1.6  # compensatory growth
        assert _voxels(case, "right_kidney") > np.median(normal)
        assert case.info["clips"] == [] and case.image.max() < CLIP_HU  # no surgery, no metal


@pytest.mark.parametrize("scenario", ["left_nephrectomy", "right_renal_agenesis"])
def test_displaced_bowel_fills_most_empty_renal_beds(scenario: str) -> None:
    organ = SCENARIOS[scenario].organs[0]
    medians = {True: [], False: []}
    for index in range(8):
        case, twin = _twins(scenario, index)
        bed = (twin.labels == anatomy.organ_id(organ)) & (case.labels == 0)
        medians[organ in case.info["displaced_bowel"]].append(float(np.median(case.image[bed])))
    assert len(medians[True]) >= 4, medians
    assert all(median > -50 for median in medians[True]), medians  # bowel wall and fluid, not a fat hole
    assert all(median < -50 for median in medians[False]), medians  # the rest: perirenal fat


@pytest.mark.parametrize(
    "scenario",
    ["cholecystectomy", "left_nephrectomy", "splenectomy", "right_partial_nephrectomy", "partial_hepatectomy"],
)
def test_surgical_clips_are_optional(scenario: str) -> None:
    organ = SCENARIOS[scenario].organs[0]
    with_clips = []
    for index in range(10):
        case = generate_phantom(6, PhantomConfig(shape=SMALL, absence_rates={scenario: 1.0}), case_index=index)
        with_clips.append(organ in case.info["clips"])
        assert case.info["clips"] in ([], [organ])
        assert (case.image.max() > CLIP_HU) == with_clips[-1], (index, case.image.max())  # metal iff recorded
    assert 0 < sum(with_clips) < len(with_clips), with_clips  # clip or no clip: neither says "absent"


@pytest.mark.parametrize(
    ("scenario", "low", "high"),
    [
        ("left_kidney_atrophy", 0.25, 0.6),
        ("splenic_atrophy", 0.25, 0.75),
        ("right_partial_nephrectomy", 0.4, 0.9),
        ("partial_hepatectomy", 0.5, 0.95),
    ],
)
def test_small_organs_stay_present_and_smaller(scenario: str, low: float, high: float) -> None:
    organ = SCENARIOS[scenario].organs[0]
    for index in range(3):
        case, twin = _twins(scenario, index)
        assert case.absent == {} and case.small == {organ: SCENARIOS[scenario].reason}
        assert case.record()["small"] == case.small
        assert low <= _voxels(case, organ) / _voxels(twin, organ) <= high, index


def test_esophagus_is_soft_tissue_on_contrast_ct() -> None:
    esophagus = anatomy.organ_id("esophagus")
    inside = [
        case.image[case.labels == esophagus]
        for case in (generate_phantom(9, NO_ABSENCE, case_index=i) for i in range(6))
    ]
    assert 10 <= np.median(np.concatenate(inside)) <= 80  # collapsed muscular tube, a thin air lumen in some


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


# sha256 of image and label bytes of the default phantoms, retaken when the scenarios grew (renal
# agenesis, atrophy, partial resection, optional clips, displaced bowel, a soft-tissue esophagus): the
# quality figures of benchmarks/RESULTS.md measured before then used phantoms without them.
DEFAULT_BYTES = {
    (0, 0, (64, 64, 64)): (
        "3dd25971226ebc62d007a12be33924161ccf18e40b8152f531551be932357747",
        "472244da8e4143f2e225f3610d1530b279c4a260d2e6b2a3563441f5dc86bfa2",
    ),
    (1, 3, (64, 64, 64)): (
        "99833623fb2cf3a86f0abe1c32c7a5d5e8f49c1d52e619bfefd769e6fd396845",
        "39055cc9fa6478349effffe26059b0cabc49de32b6276aea8a6e6b64b3c287d7",
    ),
    (0, 0, (96, 96, 96)): (
        "9da74b08bcd6911b89876ff2b020b214b90d0bf8aacd6f718b50cf01d9d5ddf7",
        "cc13569b8decf10529409d2f5d43fd22be44fff8331cc71fe7302e0cb7e7820f",
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
