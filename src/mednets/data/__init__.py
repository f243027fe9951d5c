"""Data: files with their geometry, dataset folders, label mapping, phantoms and MONAI transform pipelines.

`mednets.data` imports neither `mednets.models` nor `mednets.engine` (DESIGN.md dependency rules).
"""

from __future__ import annotations

from mednets.data.dataset import (
    DEFAULT_MIN_VOXELS,
    Case,
    Dataset,
    load_dataset,
    presence_targets,
    split_cases,
    validate_dataset,
)
from mednets.data.io import read_volume, write_volume
from mednets.data.labels import convert_label_file, convert_labels, load_mapping
from mednets.data.phantoms import Phantom, PhantomConfig, generate_phantom, write_phantom_dataset
from mednets.data.volume import Volume

__all__ = [
    "DEFAULT_MIN_VOXELS",
    "Case",
    "Dataset",
    "Phantom",
    "PhantomConfig",
    "Volume",
    "convert_label_file",
    "convert_labels",
    "generate_phantom",
    "load_dataset",
    "load_mapping",
    "presence_targets",
    "read_volume",
    "split_cases",
    "validate_dataset",
    "write_phantom_dataset",
    "write_volume",
]
