"""Planning data: intensity rules, the body box, the fingerprint, the disk cache and the streamed samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mednets.data.cropping import body_box, centre_pad_crop, centre_start, window
from mednets.data.dataset import load_dataset
from mednets.data.fingerprint import dataset_signature, extract_fingerprint, load_or_extract_fingerprint
from mednets.data.intensity import ChannelNormalisation, normalise, padding_value, scheme_for_channel
from mednets.data.io import read_volume, write_volume
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.data.preprocessing import PreprocessedCache, PreprocessingPlan, preprocess_dataset
from mednets.data.samples import label_atlas, segmentation_datasets
from mednets.data.streaming import CachedCaseDataset
from mednets.data.volume import Volume
from mednets.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(
        tmp_path_factory.mktemp("ph") / "ds", 4, seed=5, config=PhantomConfig(shape=(24, 32, 32))
    )


def _window_plan(spacing: tuple[float, ...] | None = None) -> PreprocessingPlan:
    return PreprocessingPlan(3, spacing, "LPS", (ChannelNormalisation.window((-175, 250)),))


def _cached(dataset_root: Path, folder: Path, plan: PreprocessingPlan | None = None) -> tuple:
    dataset = load_dataset(dataset_root)
    fingerprint = extract_fingerprint(dataset, workers=1, progress=False)
    cache, skipped = preprocess_dataset(dataset, fingerprint, plan or _window_plan(), folder, workers=1, progress=False)
    return dataset, fingerprint, cache, skipped


# ---------------------------------------------------------------- intensity
def test_each_normalisation_rule_gives_its_numbers() -> None:
    values = np.array([-1000.0, -100.0, 0.0, 40.0, 400.0], dtype=np.float32)
    ct = ChannelNormalisation("ct", -100.0, 200.0, 20.0, 50.0)
    np.testing.assert_allclose(normalise(values, ct), (np.clip(values, -100, 200) - 20) / 50, rtol=1e-6)
    window = ChannelNormalisation.window((-200, 300))
    np.testing.assert_allclose(normalise(values, window), np.clip((values + 200) / 500, 0, 1), rtol=1e-6)
    z = normalise(values, ChannelNormalisation("zscore"))
    assert abs(float(z.mean())) < 1e-6 and float(z.std()) == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_array_equal(normalise(values, ChannelNormalisation("none")), values)
    rgb = normalise(np.array([0, 255], dtype=np.uint8), ChannelNormalisation("rgb"))
    np.testing.assert_allclose(rgb, [0.0, 1.0])
    tensor = torch.tensor(values)
    assert isinstance(normalise(tensor, ct), torch.Tensor) and torch.equal(tensor, torch.tensor(values))  # input kept
    assert padding_value(ct) == pytest.approx((-100 - 20) / 50) and padding_value(window) == 0.0
    assert padding_value(ChannelNormalisation("zscore")) == 0.0


def test_channel_names_choose_the_scheme_and_bad_rules_are_refused() -> None:
    assert scheme_for_channel("CT") == "ct" and scheme_for_channel("T1") == "zscore"
    assert scheme_for_channel("image", np.dtype(np.uint8)) == "rgb" and scheme_for_channel("noNorm") == "none"
    assert scheme_for_channel("rescale_to_0_1") == "rescale"
    with pytest.raises(ConfigError, match="unknown normalisation"):
        ChannelNormalisation("magic")
    with pytest.raises(ConfigError, match="positive std"):
        ChannelNormalisation("ct", 0.0, 1.0, 0.0, 0.0)


# ---------------------------------------------------------------- cropping
def test_body_box_holds_the_body_and_every_label_and_leaves_air_out() -> None:
    image = np.full((20, 30, 40), -1000.0, dtype=np.float32)
    image[4:16, 6:24, 10:30] = 40.0  # the body
    labels = np.zeros(image.shape, np.uint8)
    labels[2, 3, 35] = 1  # a label outside it (e.g. a marker)
    box = body_box([image], ["ct"], labels)
    assert box[0][0] <= 2 and box[1][0] <= 3 and box[2][1] >= 36
    assert box[0][1] <= 18 and box[1][1] <= 26  # air beyond the body's far side is cut
    assert body_box([image], ["ct"]) == ((2, 18), (4, 26), (8, 32))  # found on every second voxel, grown by 2
    uniform = np.ones((6, 6), np.float32)
    assert body_box([uniform], ["zscore"]) == ((0, 6), (0, 6))  # nothing stands out: no crop


# ---------------------------------------------------------------- fingerprint
def test_a_centred_window_pads_or_crops_per_axis_and_its_inverse_gives_the_array_back() -> None:
    array = np.arange(2 * 5 * 8 * 3, dtype=np.float32).reshape(2, 5, 8, 3)  # [C, *S]
    size = (7, 4, 3)  # padded, cropped, kept
    start = centre_start(array.shape[1:], size)
    assert start == [-1, 2, 0]
    out = centre_pad_crop(array, size, [-1.0, -2.0])
    assert out.shape == (2, 7, 4, 3) and (out[0, 0] == -1).all() and (out[1, -1] == -2).all()
    np.testing.assert_array_equal(out[:, 1:6], array[:, :, 2:6])
    back = window(out, [-v for v in start], array.shape[1:], 9.0)
    np.testing.assert_array_equal(back[:, :, 2:6], array[:, :, 2:6])
    assert (back[:, :, :2] == 9).all() and (back[:, :, 6:] == 9).all()  # cropped away: the fill


def test_fingerprint_reads_every_case_once_and_equals_numpy(phantoms: Path, tmp_path: Path) -> None:
    dataset = load_dataset(phantoms)
    fingerprint = extract_fingerprint(dataset, workers=1, progress=False)
    assert len(fingerprint.cases) == 4 and fingerprint.channel_names == ["CT"]
    first = fingerprint.cases[0]
    label = read_volume(dataset.training[0].label)
    image = read_volume(dataset.training[0].images[0]).array
    assert first.shape == [24, 32, 32] and first.spacing == pytest.approx(list(label.spacing))
    assert first.voxels["liver"] == int((label.array == dataset.labels["liver"]).sum())
    foreground = image[label.array > 0]
    assert first.intensity[0]["mean"] == pytest.approx(float(foreground.mean()), rel=1e-4)  # all sampled: few voxels
    assert fingerprint.orientation() == "LPS"
    assert sum(fingerprint.presence_counts().values()) == sum(sum(c.present.values()) for c in fingerprint.cases)
    # Saved once, read again while the files are unchanged, extracted again when one changes.
    folder = tmp_path / "cache"
    saved = load_or_extract_fingerprint(dataset, folder, workers=1, progress=False)
    stamp = (folder / "fingerprint.json").stat().st_mtime_ns
    assert load_or_extract_fingerprint(dataset, folder, workers=1, progress=False).signature == saved.signature
    assert (folder / "fingerprint.json").stat().st_mtime_ns == stamp
    before = dataset_signature(dataset)
    os.utime(dataset.training[0].label, ns=(1, 1))
    assert dataset_signature(dataset) != before


def test_a_case_whose_voxel_size_differs_tenfold_is_named(phantoms: Path, tmp_path: Path) -> None:
    root = write_phantom_dataset(tmp_path / "ds", 3, seed=1, config=PhantomConfig(shape=(16, 16, 16)))
    path = root / "imagesTr" / "phantom_001_0000.nii.gz"
    volume = read_volume(path)
    write_volume(Volume(volume.array, volume.affine @ np.diag([1, 1, 12.0, 1])), path)
    label = root / "labelsTr" / "phantom_001.nii.gz"
    write_volume(Volume(read_volume(label).array, volume.affine @ np.diag([1, 1, 12.0, 1])), label)
    with pytest.raises(DatasetError, match="10-fold") as caught:
        extract_fingerprint(load_dataset(root), workers=1, progress=False)
    assert "phantom_001" in str(caught.value)


# ---------------------------------------------------------------- the cache
def test_preprocessing_writes_each_case_once_resamples_and_resumes(phantoms: Path, tmp_path: Path) -> None:
    plan = _window_plan((10.0, 10.0, 10.0))
    dataset, fingerprint, cache, skipped = _cached(phantoms, tmp_path / plan.key(), plan)
    assert skipped == {}
    case = cache.open_case("phantom_000")
    props = case.properties
    extent = np.array([b - a for a, b in props["box"]]) * np.array(props["spacing"])
    assert list(case.image.shape[1:]) == [max(1, round(e / 10)) for e in extent]
    assert case.image.dtype == np.float32 and case.labels.dtype == np.uint8
    assert float(case.image.min()) >= 0.0 and float(case.image.max()) <= 1.0  # the window
    assert set(np.unique(case.locations[:, 0])) <= set(np.unique(case.labels)) - {0}
    stamps = {p: p.stat().st_mtime_ns for p in cache.cases_dir.rglob("*.npy")}
    # An interrupted run's temporary folder is removed, finished cases are not redone.
    leftover = cache.cases_dir / ".phantom_001.abc.tmp"
    leftover.mkdir()
    (leftover / "image.npy").write_bytes(b"half")
    preprocess_dataset(dataset, fingerprint, plan, cache.root, workers=1, progress=False)
    assert not leftover.exists()
    assert {p: p.stat().st_mtime_ns for p in cache.cases_dir.rglob("*.npy")} == stamps
    assert _window_plan((8.0, 8.0, 8.0)).key() != plan.key()  # another plan, another cache


def test_a_corrupt_cached_case_is_a_typed_error_and_is_preprocessed_again(phantoms: Path, tmp_path: Path) -> None:
    dataset, fingerprint, cache, _ = _cached(phantoms, tmp_path / "c")
    image = cache.case_dir("phantom_002") / "image.npy"
    image.write_bytes(image.read_bytes()[:-100])  # truncated
    with pytest.raises(DatasetError, match="corrupt") as caught:
        cache.open_case("phantom_002")
    assert "phantom_002" in str(caught.value)
    with pytest.raises(DatasetError):
        CachedCaseDataset(str(cache.root), ["phantom_002"], pad_values=[0.0])[0]
    preprocess_dataset(dataset, fingerprint, _window_plan(), cache.root, workers=1, progress=False)
    assert cache.is_complete("phantom_002")


def test_a_case_too_large_for_the_memory_limit_is_skipped_and_named(phantoms: Path, tmp_path: Path) -> None:
    dataset = load_dataset(phantoms)
    fingerprint = extract_fingerprint(dataset, workers=1, progress=False)
    cache, skipped = preprocess_dataset(dataset, fingerprint, _window_plan(), tmp_path / "c", workers=1,
                                        progress=False, memory_limit_bytes=1000)  # fmt: skip
    assert sorted(skipped) == [c.case_id for c in dataset.training] and "GiB" in skipped["phantom_000"]
    assert not cache.is_complete("phantom_000")


def test_worker_processes_write_the_same_bytes_as_one_process(phantoms: Path, tmp_path: Path) -> None:
    dataset = load_dataset(phantoms)
    fingerprint = extract_fingerprint(dataset, workers=2, progress=False)
    assert fingerprint.to_json() == extract_fingerprint(dataset, workers=1, progress=False).to_json()
    two, _ = preprocess_dataset(dataset, fingerprint, _window_plan(), tmp_path / "two", workers=2, progress=False)
    one, _ = preprocess_dataset(dataset, fingerprint, _window_plan(), tmp_path / "one", workers=1, progress=False)
    for case in dataset.training:
        a, b = two.open_case(case.case_id), one.open_case(case.case_id)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.labels, b.labels)


# ---------------------------------------------------------------- streamed samples
def test_patches_are_seeded_by_epoch_and_index_and_oversample_foreground(phantoms: Path, tmp_path: Path) -> None:
    _, _, cache, _ = _cached(phantoms, tmp_path / "c")
    cases = ["phantom_000", "phantom_001"]
    samples = CachedCaseDataset(str(cache.root), cases, pad_values=[0.0], patch_size=(8, 8, 8), seed=3,
                                foreground_share=1.0, absent_share=0.0)  # fmt: skip
    first = samples[1]
    assert tuple(first["image"].shape) == (1, 8, 8, 8) and first["label"].dtype == torch.int64
    assert torch.equal(samples[1]["image"], first["image"])  # same (seed, epoch, index): same patch
    assert all(bool((samples[i]["label"] > 0).any()) for i in range(len(samples)))  # centred on foreground
    samples.set_epoch(1)
    assert not torch.equal(samples[1]["image"], first["image"])


def test_patches_stay_inside_the_case_and_the_case_inside_a_larger_patch(phantoms: Path, tmp_path: Path) -> None:
    _, _, cache, _ = _cached(phantoms, tmp_path / "c")
    case = "phantom_000"
    shape = np.array(cache.open_case(case).labels.shape)
    for patch, expect_inside in (((8, 8, 8), True), (tuple(int(n) + 4 for n in shape), False)):
        for share in (0.0, 1.0):  # anywhere, and centred on foreground voxels (many near the border)
            samples = CachedCaseDataset(str(cache.root), [case], pad_values=[0.0], patch_size=patch,
                                        foreground_share=share, absent_share=0.0, repeat=32)  # fmt: skip
            for index in range(32):
                start = np.array(samples._patch_start(samples._opened(case), np.random.default_rng([0, 0, index])))
                if expect_inside:  # no padding: the window lies in the case
                    assert (start >= 0).all() and (start + np.array(patch) <= shape).all()
                else:  # the whole case is in the window
                    assert (start <= 0).all() and (start + np.array(patch) >= shape).all()


def test_absent_organ_patches_are_centred_on_the_organ_bed(phantoms: Path, tmp_path: Path) -> None:
    dataset, _, cache, _ = _cached(phantoms, tmp_path / "c")
    spleen = dataset.labels["spleen"]
    prior = {spleen: (0.5, 0.5, 0.9)}
    case = "phantom_000"
    props = json.loads((cache.case_dir(case) / "properties.json").read_text())
    props["presence"][spleen - 1] = False
    (cache.case_dir(case) / "properties.json").write_text(json.dumps(props))
    samples = CachedCaseDataset(str(cache.root), [case], pad_values=[0.0], patch_size=(8, 8, 8), prior=prior,
                                absent_share=1.0, repeat=8)  # fmt: skip
    shape = np.array(cache.open_case(case).labels.shape)
    for index in range(8):  # the patch's window starts near 0.9 of the width (jittered by 0.15 of the patch)
        rng = np.random.default_rng([0, 0, index])
        start = samples._patch_start(samples._opened(case), rng)
        assert abs(start[2] + 4 - 0.9 * shape[2]) < 8


def test_whole_image_samples_and_the_label_atlas_on_the_grid(phantoms: Path, tmp_path: Path) -> None:
    dataset, _, cache, _ = _cached(phantoms, tmp_path / "c")
    grid = (24, 32, 32)
    cases = [c.case_id for c in dataset.training]
    samples = CachedCaseDataset(str(cache.root), cases, pad_values=[0.0], grid=grid)
    assert tuple(samples[0]["image"].shape) == (1, *grid)
    atlas = label_atlas(samples, len(dataset.labels), smoothing_voxels=0)
    liver = dataset.labels["liver"]
    expected = np.mean([centre_pad_crop(np.asarray(cache.open_case(c).labels), grid, 0) == liver for c in cases], 0)
    np.testing.assert_allclose(atlas.frequency[liver - 1].numpy(), expected, atol=1e-6)


def test_organ_removal_erases_an_organ_from_training_cases_only_and_checks_names(phantoms: Path, tmp_path) -> None:
    dataset, _, cache, _ = _cached(phantoms, tmp_path / "c")
    cases = [c.case_id for c in dataset.training if dataset.presence(c.case_id)["spleen"]]
    common = dict(cases=cases, grid=(24, 32, 32), patch_size=None, val_fraction=0.34, split_seed=0, augment=True,
                  seed=0)  # fmt: skip
    train_set, val_set = segmentation_datasets(dataset, cache, _window_plan(), **common, organ_removal=("spleen",),
                                               organ_removal_prob=1.0)  # fmt: skip
    spleen = dataset.labels["spleen"]
    for index in range(len(train_set.cases)):  # every training case has lost its spleen: labels and presence agree
        sample = train_set[index]
        assert not (sample["label"] == spleen).any() and not bool(sample["presence"][spleen - 1])
    assert all((val_set[i]["label"] == spleen).any() for i in range(len(val_set)))  # validation is never altered
    with pytest.raises(ConfigError, match="unknown structure to remove"):
        segmentation_datasets(dataset, cache, _window_plan(), **common, organ_removal=("appendix",),
                              organ_removal_prob=0.5)  # fmt: skip


def test_cached_case_pickles_for_worker_processes(phantoms: Path, tmp_path: Path) -> None:
    import pickle

    _, _, cache, _ = _cached(phantoms, tmp_path / "c")
    samples = CachedCaseDataset(str(cache.root), ["phantom_000"], pad_values=[0.0], patch_size=(8, 8, 8))
    copy = pickle.loads(pickle.dumps(samples))
    assert torch.equal(copy[0]["image"], samples[0]["image"])
    assert isinstance(cache, PreprocessedCache)


def test_an_empty_label_map_is_logged_and_trains_as_background(tmp_path: Path, caplog) -> None:
    root = write_phantom_dataset(tmp_path / "ds", 3, seed=2, config=PhantomConfig(shape=(16, 16, 16)))
    label = root / "labelsTr" / "phantom_001.nii.gz"
    volume = read_volume(label)
    write_volume(Volume(np.zeros_like(volume.array), volume.affine), label)
    with caplog.at_level("WARNING"):
        _, fingerprint, cache, skipped = _cached(root, tmp_path / "c")
    assert "phantom_001 has no labelled voxel" in caplog.text and skipped == {}
    empty = CachedCaseDataset(str(cache.root), ["phantom_001"], pad_values=[0.0], patch_size=(8, 8, 8),
                              foreground_share=1.0)  # fmt: skip
    assert int(empty[0]["label"].max()) == 0  # no foreground to centre on: anywhere
    assert fingerprint.foreground[0]  # the other cases' foreground still plans CT normalisation
