"""Property-based fuzzing of the volume readers and the dataset validator (issue 24).

Random headers (dimensions, voxel types, voxel sizes, NaN and infinite values), random byte
mutations and truncations of valid NIfTI, NRRD and MHA files, and datasets with planted faults: a
reader either returns a well-formed volume or raises `InvalidInputError` naming the file; the
validator names exactly the planted faults. Derandomised (a fixed seed) with a bounded number of
examples, so CI runs the same cases every time.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mednets.data.dataset import validate_dataset
from mednets.data.io import read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import InvalidInputError

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
MAX_VOXELS = 200_000  # what a header may claim during the fuzzing: keeps every example's memory small

# NIfTI datatype codes: uint8, int16, int32, float32, complex64, float64, RGB24, int8, uint16, float128, RGBA32.
DATATYPES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1536, 2304]
ODD_FLOATS = st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf")])
VOXEL_SIZES = st.one_of(st.floats(0.1, 5.0), st.floats(0.1, 5.0), ODD_FLOATS)


@contextmanager
def _folder() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is one folder for all of a test's examples)."""
    with tempfile.TemporaryDirectory(prefix="mednets-fuzz-") as name:
        yield Path(name)


@contextmanager
def _voxel_limit(limit: int) -> Iterator[None]:
    previous = os.environ.get("MEDNETS_MAX_VOXELS")
    os.environ["MEDNETS_MAX_VOXELS"] = str(limit)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MEDNETS_MAX_VOXELS"]
        else:
            os.environ["MEDNETS_MAX_VOXELS"] = previous


def _read_or_refuse(path: Path) -> Volume | None:
    """`read_volume(path)`, which must give a well-formed volume or an `InvalidInputError` naming the file."""
    try:
        volume = read_volume(path)
    except InvalidInputError as error:
        assert str(path) in str(error)
        event("refused")  # --hypothesis-show-statistics: how often each outcome was fuzzed
        return None
    event("read")
    assert volume.array.ndim == 3 and volume.array.dtype.kind in "biuf"
    assert np.isfinite(volume.affine).all() and abs(np.linalg.det(volume.affine[:3, :3])) > 0
    return volume


# A plausible header (read unless its voxels are odd) or a wild one; the wild fields, one at a time or all.
PLAUSIBLE = {"dims": st.lists(st.integers(1, 12), min_size=3, max_size=3), "datatype": st.sampled_from([2, 4, 16, 64]),
             "voxel_sizes": st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3), "offset": st.just(352),
             "kept": st.just(1.0)}  # fmt: skip
WILD = {"dims": st.lists(st.integers(0, 5000), min_size=1, max_size=7), "datatype": st.sampled_from(DATATYPES),
        "voxel_sizes": st.lists(VOXEL_SIZES, min_size=3, max_size=3),
        "offset": st.sampled_from([0, 10, 348, 1 << 20]), "kept": st.floats(0.0, 1.0)}  # fmt: skip
HEADERS = st.one_of(
    st.fixed_dictionaries(PLAUSIBLE),
    *[st.fixed_dictionaries({**PLAUSIBLE, name: WILD[name]}) for name in WILD],
    st.fixed_dictionaries(WILD),
)


@FUZZ
@given(fields=HEADERS, compressed=st.booleans(), fill=st.one_of(st.floats(-1e3, 1e3), ODD_FLOATS))
def test_any_nifti_header_is_read_or_refused_with_the_file_named(fields: dict, compressed: bool, fill: float) -> None:
    dims, datatype, kept = fields["dims"], fields["datatype"], fields["kept"]
    header = nib.Nifti1Header()
    header["dim"] = [len(dims), *dims, *[1] * (7 - len(dims))]
    header["datatype"] = datatype
    header["bitpix"] = 8 * max(1, nib.nifti1.data_type_codes.dtype[datatype].itemsize)
    header["pixdim"] = [1.0, *fields["voxel_sizes"], 1.0, 1.0, 1.0, 1.0]
    header["vox_offset"] = fields["offset"]
    header["qform_code"] = 1
    header["sform_code"] = 0
    claimed = min(math.prod(dims), 4096) * int(header["bitpix"]) // 8  # a huge claim gets 4096 voxels of data
    voxels = np.full(claimed // 4 + 1, fill, dtype=np.float32).tobytes()[:claimed]
    raw = header.binaryblock + b"\0" * 4 + voxels
    raw = raw[: int(len(raw) * kept)] if kept < 1 else raw
    with _folder() as folder, _voxel_limit(MAX_VOXELS):
        path = folder / ("scan.nii.gz" if compressed else "scan.nii")
        path.write_bytes(gzip.compress(raw) if compressed else raw)
        volume = _read_or_refuse(path)
        if volume is not None:
            assert volume.array.size <= MAX_VOXELS


def _valid_file(folder: Path, ending: str) -> Path:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    return write_volume(Volume(array, affine), folder / f"scan{ending}")


@FUZZ
@given(
    ending=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]),
    edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8),
    kept=st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
)
def test_a_mutated_or_truncated_volume_file_is_read_or_refused_with_the_file_named(
    ending: str, edits: list[tuple[float, int]], kept: float
) -> None:
    with _folder() as folder, _voxel_limit(MAX_VOXELS):
        path = _valid_file(folder, ending)
        raw = bytearray(path.read_bytes())
        for where, value in edits:
            raw[int(where * len(raw))] = value
        path.write_bytes(bytes(raw[: int(len(raw) * kept)] if kept < 1 else raw))
        volume = _read_or_refuse(path)
        if volume is not None and not edits and kept == 1:
            assert volume.array.shape == (4, 5, 6)


def _dataset(root: Path, images: list[np.ndarray], labels: list[np.ndarray]) -> list[Path]:
    """A dataset folder of float32 images and uint8 label maps (ids 0-2 declared); returns its files."""
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    files = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        files.append(write_volume(Volume(image, affine), root / "imagesTr" / f"case_{index}_0000.nii.gz"))
        files.append(write_volume(Volume(label, affine), root / "labelsTr" / f"case_{index}.nii.gz"))
    info = {"labels": {"background": 0, "liver": 1, "spleen": 2}, "channel_names": {"0": "CT"},
            "numTraining": len(images), "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(info))
    return files


@FUZZ
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    cases=st.integers(1, 3),
    non_finite=st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), max_size=3),
    undeclared=st.sampled_from([None, 3, 7, 255]),
    truncated=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_validator_names_exactly_the_planted_faults(
    shape: tuple[int, int, int], cases: int, non_finite: list[float], undeclared: int | None, truncated: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=shape).astype(np.float32) for _ in range(cases)]
    labels = [rng.integers(0, 3, size=shape).astype(np.uint8) for _ in range(cases)]
    for value in non_finite:  # planted in the first image
        images[0].flat[rng.integers(images[0].size)] = value
    if undeclared is not None:  # planted in the last label map
        labels[-1].flat[rng.integers(labels[-1].size)] = undeclared
    with _folder() as root:
        files = _dataset(root, images, labels)
        if truncated:  # the first label map loses its end
            files[1].write_bytes(files[1].read_bytes()[:-12])
        problems = validate_dataset(root)
    expected = []
    if non_finite:
        expected.append((files[0].name, "expected finite values"))
    if truncated:
        expected.append((files[1].name, "cannot read label file"))
    if undeclared is not None and not (truncated and cases == 1):  # a truncated map's values cannot be read
        expected.append((files[-1].name, f"label values [{undeclared}] are not declared"))
    assert len(problems) == len(expected), problems
    for name, what in expected:
        assert any(name in problem and what in problem for problem in problems), (name, what, problems)
