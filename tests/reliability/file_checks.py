"""Checks shared by the fault tests: what a folder holds after a crash, a kill or a full disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import torch
import yaml
from safetensors.torch import load_file


def visible_files(folder: Path) -> list[Path]:
    """Files under final names: none of the path's parts below `folder` is hidden (temporaries are)."""
    return [
        p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    ]


def assert_nothing_half_written(folder: Path) -> None:
    """Every file under a final name reads completely (gzip checks the whole stream's CRC)."""
    readers = {".nii.gz": lambda p: nib.load(p).get_fdata(), ".json": lambda p: json.loads(p.read_text()),
               ".yaml": lambda p: yaml.safe_load(p.read_text()), ".csv": lambda p: list(csv.DictReader(p.open())),
               ".safetensors": load_file, ".pt": lambda p: torch.load(p, weights_only=True)}  # fmt: skip
    for path in visible_files(folder):
        for ending, read in readers.items():
            if path.name.endswith(ending):
                read(path)


def assert_cases_whole(folder: Path) -> set[str]:
    """Each case's label map and sidecar are both there or both absent; returns the cases there."""
    names = {p.name for p in visible_files(folder) if p.parent == folder}
    labels = {n.removesuffix(".nii.gz") for n in names if n.endswith(".nii.gz")}
    assert labels == {n.removesuffix(".json") for n in names if n.endswith(".json")}
    return labels
