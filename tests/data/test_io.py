"""The format table and dispatch by file ending (mednets.data.io)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mednets.data.io import case_name, list_inputs, read_any, read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import InvalidInputError


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd", ".png", ".tif"])
def test_corrupt_file_is_rejected_naming_it(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InvalidInputError) as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(InvalidInputError, match="unknown file type"):
        read_volume(other)


def test_writing_an_unknown_ending_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot write this file type"):
        write_volume(Volume(np.zeros((2, 2, 2))), tmp_path / "table.csv")
    assert list(tmp_path.iterdir()) == []


def test_read_any_gives_images_at_level_0_and_volumes_as_they_are(tmp_path: Path) -> None:
    stack = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    image = read_any(write_volume(Volume(stack), tmp_path / "pages.tif"))
    np.testing.assert_array_equal(image.array, stack[0])
    volume = read_any(write_volume(Volume(stack), tmp_path / "volume.nii.gz"))
    np.testing.assert_array_equal(volume.array, stack)


def test_list_inputs_expands_folders_of_files_and_keeps_dicom_folders(tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("b.png", "a_0000.nii.gz", "notes.txt"):
        (cases / name).write_bytes(b"")
    series = tmp_path / "series"
    series.mkdir()
    (series / "slice_0.dcm").write_bytes(b"")
    missing = tmp_path / "missing.nii.gz"
    assert list_inputs([cases, series, missing]) == [cases / "a_0000.nii.gz", cases / "b.png", series, missing]


@pytest.mark.parametrize(
    ("path", "case"),
    [
        ("a/b/case_0000.nii.gz", "case"),
        ("x.nrrd", "x"),
        ("scan.png", "scan"),
        ("CT_0000.NII.GZ", "CT"),  # endings in any letter case
        ("slide_0000.svs", "slide"),
        ("dicom/case_0000", "case"),  # a DICOM folder: no ending, channel suffix still removed
        ("case_0001.nii.gz", "case_0001"),  # only the first channel names the case
        ("notes.txt", "notes.txt"),  # an unknown ending stays
    ],
)
def test_case_name_strips_a_known_ending_and_the_channel_suffix(path: str, case: str) -> None:
    assert case_name(path) == case
    assert case_name(Path(path)) == case


def test_import_io_in_a_fresh_process_loads_no_models() -> None:
    code = "import sys, mednets.data.io; print(sorted(m for m in sys.modules if m.startswith('mednets.models')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
