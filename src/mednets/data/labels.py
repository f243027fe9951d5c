"""Map other tools' label ids onto mednets' 13 abdominal organs, by organ name.

A mapping says, for each source label id, which source *name* it is; the names are translated to
mednets organ names (`mednets.anatomy`), whose ids are written. Source labels that are not one of the
13 organs become background. The first mapping shipped is TotalSegmentator's (`resources/
totalsegmentator.json`, tasks ``total`` and ``total_mr``); any other is a JSON file
``{"source id": "mednets organ name"}``.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from mednets import anatomy
from mednets.atomic import check_not_inputs
from mednets.errors import ConfigError, InvalidInputError, UnknownNameError

__all__ = ["MAPPINGS", "convert_label_file", "convert_labels", "load_mapping"]

MAPPINGS = ("totalsegmentator", "totalsegmentator_mr")


@cache
def _totalsegmentator() -> dict:
    text = resources.files("mednets").joinpath("resources/totalsegmentator.json").read_text(encoding="utf-8")
    return json.loads(text)


def load_mapping(mapping: str | os.PathLike[str]) -> dict[int, int]:
    """Return {source id: mednets organ id} for a named mapping or a JSON file.

    Args:
        mapping: ``"totalsegmentator"`` (task ``total``), ``"totalsegmentator_mr"`` (task ``total_mr``),
            or the path of a JSON file ``{"source id": "mednets organ name", ...}``.

    Raises:
        UnknownNameError: unknown mapping name, or an organ name mednets does not know.
        ConfigError: the JSON file is unreadable or not of that form.
    """
    text = str(mapping)
    if text in MAPPINGS:
        shipped = _totalsegmentator()
        task = "total" if text == "totalsegmentator" else "total_mr"
        names = shipped["names"]
        return {int(k): anatomy.organ_id(names[v]) for k, v in shipped["tasks"][task].items()}
    path = Path(text)
    if not path.is_file():
        raise UnknownNameError(
            "unknown label mapping", source="--map", expected=f"{', '.join(MAPPINGS)} or a JSON file", got=text
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        pairs = {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(
            f"cannot read label mapping: {error}", source=str(path), expected='{"source id": "organ name"}'
        ) from error
    result = {}
    for source_id, name in pairs.items():
        try:
            result[source_id] = anatomy.organ_id(name)
        except UnknownNameError as error:
            raise UnknownNameError(
                "unknown organ name in mapping", source=f"{path}: {source_id}", expected=error.expected, got=name
            ) from error
    return result


def convert_labels(labels: np.ndarray, mapping: str | os.PathLike[str] = "totalsegmentator") -> np.ndarray:
    """Relabel an integer label map onto mednets organ ids.

    Args:
        labels: integer label map of any shape.
        mapping: see `load_mapping`.

    Returns:
        uint8 array of the same shape: mednets organ ids (1-13), 0 elsewhere.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise InvalidInputError("label map must hold integers", source="labels", got=str(labels.dtype))
        labels = labels.astype(np.int64)
    table = load_mapping(mapping)
    top = max(int(labels.max(initial=0)), max(table, default=0))
    if labels.size and labels.min() < 0:
        raise InvalidInputError("label map has negative values", source="labels", got=int(labels.min()))
    lookup = np.zeros(top + 1, dtype=np.uint8)  # one vectorised lookup, whatever the number of labels
    for source_id, organ_id in table.items():
        lookup[source_id] = organ_id
    return lookup[labels]


def convert_label_file(
    source: str | os.PathLike[str], target: str | os.PathLike[str], mapping: str | os.PathLike[str] = "totalsegmentator"
) -> dict[str, int]:
    """Read a label file, relabel it with `convert_labels`, and write it with the same geometry.

    Returns:
        {organ name: voxel count} of the organs in the written map.
    """
    from mednets.data.io import read_volume, write_volume
    from mednets.data.volume import Volume

    check_not_inputs([target], [source], "--out")
    volume = read_volume(source)
    converted = convert_labels(volume.array, mapping)
    write_volume(Volume(converted, volume.affine, None, {"source": str(target)}), target)
    counts = np.bincount(converted.ravel(), minlength=len(anatomy.ORGANS) + 1)
    return {o.name: int(counts[o.id]) for o in anatomy.ORGANS if counts[o.id] > 0}
