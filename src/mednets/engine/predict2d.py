"""2D segmentation prediction: PNG/TIFF (or JPEG, SVS level 0) in, a label image of the same size out.

`mednets predict` sends runs of 2D models here (`predict_paths` dispatches). The image is normalised
as in training (`normalise_2d`, from the run's `preprocessing.json`), segmented with overlapping
tiles of the training patch size blended without seams (`tiled_apply`), and written as
`<case>.png` (PNG and JPEG inputs) or `<case>.tif` (TIFF, SVS) holding label ids, uint8, plus a JSON
sidecar with each structure's pixel count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mednets.atomic import atomic_write_text
from mednets.data.dataset2d import normalise_2d
from mednets.data.images2d import list_image_files, read_image_2d
from mednets.data.io import Volume, write_volume
from mednets.data.loaders2d import augmentation_axes_2d
from mednets.engine.tiling import tiled_apply
from mednets.errors import InvalidInputError, MednetsError

if TYPE_CHECKING:
    from mednets.engine.inference import LoadedRun

__all__ = ["predict_image_2d", "predict_paths_2d"]


def predict_image_2d(
    run: LoadedRun,
    pixels: np.ndarray,
    *,
    overlap: float = 0.5,
    flip_axes: Sequence[int] = (),
    dtype: torch.dtype = torch.bfloat16,
    source: str = "image",
) -> np.ndarray:
    """Label ids ``[H, W]`` (uint8) for pixels ``[H, W]`` or ``[H, W, C]`` as read from a file.

    Args:
        run: a loaded 2D segmentation run.
        pixels: the image as stored (any bit depth; normalised as in training).
        overlap: share of a tile shared with its neighbours.
        flip_axes: axes of ``[H, W]`` to average flips over (test-time augmentation).
        dtype: autocast dtype (`torch.float32` disables autocast).
        source: the image's name for error messages.

    Raises:
        InvalidInputError: the run takes several channel files per image, or the channels do not match.
    """
    prep = run.preprocessing
    names = list(prep["channel_names"].values())
    if len(names) != 1:
        raise InvalidInputError("2D prediction takes runs with one image file per case", source=source, got=names)
    image = torch.from_numpy(normalise_2d(pixels, str(names[0]), prep["hu_window"]))
    tile = max(prep["patch_size"])
    overlap_px = max(round(overlap * tile), 5)
    margin = (overlap_px - 1) // 4

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(run.model(batch).float(), 1)

    autocast = torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32)
    outputs = []
    with torch.no_grad(), autocast:
        for dims in [(), *[(axis + 1,) for axis in flip_axes]]:
            x = (image.flip(dims) if dims else image).to(run.device)
            out = tiled_apply(probabilities, x, tile=tile, overlap=overlap_px, margin=margin).cpu()
            outputs.append(out.flip(dims) if dims else out)
    scores = torch.stack(outputs).mean(0)  # [K, H, W]
    label_ids = np.asarray([0, *run.structures.values()], dtype=np.uint8)
    return label_ids[scores.argmax(0).numpy()]


def _label_path(source: Path, out_dir: Path) -> Path:
    """`<case>.png|.tif`: the input's stem without a dataset channel suffix (`_0000`), as in `labelsTr`."""
    suffix = ".tif" if source.suffix.lower() in (".tif", ".tiff", ".svs") else ".png"
    stem = source.stem[: -len("_0000")] if source.stem.endswith("_0000") else source.stem
    return out_dir / f"{stem}{suffix}"


def predict_paths_2d(
    run: LoadedRun,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    overlap: float = 0.5,
    tta_axes: Sequence[int] = (),
    dtype: torch.dtype = torch.bfloat16,
    **_3d_options: Any,
) -> dict[str, list[Any]]:
    """Segment image files and folders of images into `out_dir/<case>.png|.tif` + `<case>.json`.

    Any `tta_axes` request averages over the flips the run's structures allow (`augmentation_axes_2d`);
    options of 3D prediction (gating) do not apply and are ignored.

    Returns:
        `{"written": [paths], "failed": [(input, message)]}`.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    flip_axes = augmentation_axes_2d(list(run.structures))[0] if tta_axes else []
    written: list[Path] = []
    failed: list[tuple[str, str]] = []
    for path in tqdm(list_image_files(inputs), desc="predicting", unit="image", disable=not progress):
        try:
            pixels = read_image_2d(path).array
            labels = predict_image_2d(run, pixels, overlap=overlap, flip_axes=flip_axes, dtype=dtype, source=str(path))
            label_path = write_volume(Volume(labels), _label_path(path, out_dir))
            sidecar = {
                "structures": {
                    name: {"pixels": int((labels == label).sum()), "present": bool((labels == label).any())}
                    for name, label in run.structures.items()
                },
                "model": {"name": run.model_name, "run": str(run.run_dir)},
                "input": {"path": str(path), "shape": list(pixels.shape)},
            }
            atomic_write_text(label_path.with_suffix(".json"), json.dumps(sidecar, indent=2))
            written.append(label_path)
        except MednetsError as error:
            failed.append((str(path), str(error)))
    return {"written": written, "failed": failed}
