"""Outputs never replace inputs, hidden files are skipped, absurd headers are refused before allocating (issue 24)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mednets.atomic import check_not_inputs
from mednets.cli import main
from mednets.data.io import list_image_files, list_inputs, read_image, read_volume, write_volume
from mednets.data.volume import Volume
from mednets.errors import InvalidInputError


def _scan(path: Path) -> Path:
    return write_volume(Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.eye(4)), path)


def test_an_output_that_is_an_input_file_or_inside_an_input_folder_is_refused(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "in" / "scan.nii.gz")
    with pytest.raises(InvalidInputError, match=r"--out .*scan\.nii\.gz: an output would replace an input"):
        check_not_inputs([scan], [scan], "--out")
    with pytest.raises(InvalidInputError, match="would replace an input"):
        check_not_inputs([tmp_path / "in" / "scan.nii.gz"], [tmp_path / "in", None], "--out")
    check_not_inputs([tmp_path / "in" / "new.nii.gz", tmp_path / "out.png"], [tmp_path / "in"], "--out")  # new files


@pytest.mark.parametrize(
    "argv",
    [
        ["convert-labels", "--in", "{scan}", "--out", "{scan}"],
        ["show", "--input", "{scan}", "--out", "{scan}"],
        ["evaluate", "--pred", "{folder}", "--truth", "{folder}", "--out", "{folder}/scan"],
    ],
    ids=["convert-labels", "show", "evaluate"],
)
def test_commands_refuse_to_write_over_their_input(argv: list[str], tmp_path: Path, capsys) -> None:
    scan = _scan(tmp_path / "in" / "scan.nii.gz")
    (tmp_path / "in" / "scan.json").write_text("{}")
    before = {p: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    filled = [a.format(scan=scan, folder=tmp_path / "in") for a in argv]
    assert main(filled) == 2
    assert "would replace an input" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before


def test_hidden_files_beside_inputs_are_skipped(tmp_path: Path) -> None:
    scan = _scan(tmp_path / "scan.nii.gz")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "._scan.nii.gz").write_bytes(b"\0\5\26\7AppleDouble")
    (tmp_path / "._slide.png").write_bytes(b"\0\5\26\7AppleDouble")
    assert list_inputs([tmp_path]) == [scan]
    with pytest.raises(InvalidInputError, match="folder holds no image file"):
        list_image_files(tmp_path)


def test_a_header_claiming_more_voxels_than_the_file_holds_is_refused_for_nrrd_and_mha(tmp_path: Path) -> None:
    nrrd = tmp_path / "bomb.nrrd"
    nrrd.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1200 1200 1200\nencoding: raw\nendian: little\n\n" + bytes(16)
    )
    mha = tmp_path / "bomb.mha"
    mha.write_text("ObjectType = Image\nNDims = 3\nDimSize = 1200 1200 1200\nElementType = MET_FLOAT\n"
                   "CompressedData = True\nElementDataFile = LOCAL\n")  # fmt: skip
    for path in (nrrd, mha):
        with pytest.raises(InvalidInputError, match="claims more voxels than the file can hold"):
            read_volume(path)


def test_a_tiff_header_claiming_a_huge_image_is_refused_before_allocating(tmp_path: Path) -> None:
    side = 100_000
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
               (277, 3, 1), (278, 4, side), (279, 4, side * side % 2**32)]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
    path = tmp_path / "bomb.tif"
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(16))
    with pytest.raises(InvalidInputError, match=r"bomb\.tif: the header claims more"):
        read_image(path)


def test_a_sidecar_without_structures_is_a_typed_error(tmp_path: Path, capsys) -> None:
    _scan(tmp_path / "pred" / "scan.nii.gz")
    _scan(tmp_path / "truth" / "scan.nii.gz")
    (tmp_path / "pred" / "scan.json").write_text("{}")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")]) == 2
    assert "scan.json: not a prediction sidecar" in capsys.readouterr().err
