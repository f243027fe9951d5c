"""The prediction API: `load_run` and `predict` for Python, and `predict_paths`, the batch the CLI runs.

`predict(image, run=...)` takes a path (file, folder, DICOM series), a nibabel or SimpleITK image,
or a numpy array with an explicit `spacing` or `affine` (an array without geometry is an error:
a silent 1 mm voxel would give wrong volumes). It returns the label map with the input's geometry,
the presence table and the statistics, and writes files only when `out` is given.

Axis order: arrays are `[D, H, W] = [z, y, x]` (2D: `[H, W]`), as `SimpleITK.GetArrayFromImage`
and PyTorch order them, with `spacing` in the same order; an `affine` is the RAS+ matrix nibabel
reports, mapping the index (x, y, z) = (W, H, D) to mm (`mednets.data.volume`). MONAI's `LoadImage`
(nibabel reader) gives `[x, y, z]`: pass `array.transpose(2, 1, 0)` with its affine. Label maps come
back in the same order (`CasePrediction.labels.array`), and `to_nibabel()` / `to_simpleitk()` give
them in each library's own order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednets.data.io import InputCase, list_cases
from mednets.data.volume import Volume, affine_from_itk, itk_image
from mednets.engine.inference import LoadedRun, StageClock, check_output_folder, check_outputs, load_run, predict_image
from mednets.engine.outputs import OutputOptions, planned_files, select_structures, write_case
from mednets.engine.statistics import structure_statistics
from mednets.errors import InvalidInputError, MednetsError, failure_message

__all__ = ["CasePrediction", "as_volume", "load_run", "predict", "predict_case", "predict_paths"]


@dataclass
class CasePrediction:
    """One predicted case.

    Attributes:
        name: the case name (output file stem).
        labels: the label map (uint8 ids) with the input's geometry.
        structures: the presence table: per structure `present`, `probability`, `confidence`,
            `volume_ml`, `voxels` and, when empty, `why_empty`.
        statistics: per structure volume, intensities, bounding box, presence (`engine.statistics`).
        seconds: wall time per stage.
        files: the files written (empty unless `out` was given).
    """

    name: str
    labels: Volume
    structures: dict[str, dict[str, Any]]
    statistics: dict[str, dict[str, Any]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def to_nibabel(self) -> Any:
        """The label map as a `nibabel.Nifti1Image` (array `[x, y, z]`, the same affine)."""
        import nibabel as nib

        return nib.Nifti1Image(np.ascontiguousarray(self.labels.array.T), self.labels.affine)

    def to_simpleitk(self) -> Any:
        """The label map as a `SimpleITK.Image` (LPS geometry)."""
        return itk_image(self.labels.array, self.labels.affine)


def as_volume(image: Any, *, spacing: Sequence[float] | None = None, affine: np.ndarray | None = None) -> Volume:
    """A `Volume` from a nibabel image, a SimpleITK image, a `Volume`, or a numpy array with its geometry.

    Raises:
        InvalidInputError: an array without `spacing` or `affine`, a spacing of the wrong length or not
            positive, or an object of another type.
    """
    if isinstance(image, Volume):
        return image
    if type(image).__module__.startswith("SimpleITK"):
        import SimpleITK as sitk

        return Volume(sitk.GetArrayFromImage(image), affine_from_itk(image), None, {"source": "SimpleITK image"})
    if hasattr(image, "affine") and hasattr(image, "get_fdata"):  # nibabel: [x, y, z] -> [z, y, x]
        return Volume(np.asarray(image.dataobj).T, np.asarray(image.affine), None, {"source": "nibabel image"})
    if isinstance(image, np.ndarray):
        if affine is not None:
            return Volume(image, np.asarray(affine, dtype=np.float64), None, {"source": "array"})
        if spacing is None:
            raise InvalidInputError("an array has no geometry: give its voxel size or affine", source="array",
                                    expected="spacing=(z, y, x) in mm or affine=4x4 RAS matrix")  # fmt: skip
        spacing = [float(s) for s in spacing]
        if len(spacing) != image.ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise InvalidInputError("spacing must give one positive voxel size per axis, in array order",
                                    source="spacing", expected=f"{image.ndim} positive numbers",
                                    got=spacing)  # fmt: skip
        matrix = np.eye(4)
        matrix[[0, 1, 2][: image.ndim], [0, 1, 2][: image.ndim]] = spacing[::-1]  # affine columns are x, y, z
        return Volume(image, matrix, None, {"source": "array"})
    raise InvalidInputError("cannot predict this object", source="image",
                            expected="a path, nibabel or SimpleITK image, or numpy array",
                            got=type(image).__name__)  # fmt: skip


def predict_case(
    run: LoadedRun, volume: Volume, name: str, *, outputs: OutputOptions | None = None, **options: Any
) -> CasePrediction:
    """Predict one image (`predict_image`), keep the structures asked for and compute their statistics."""
    outputs = outputs or OutputOptions()
    prediction = predict_image(run, volume, **options)
    kept = select_structures(run.structures, outputs.roi_subset)
    labels = prediction.labels
    if len(kept) < len(run.structures):  # an roi subset: the other structures go back to background
        keep = np.zeros(256, dtype=bool)
        keep[list(kept.values())] = True
        labels = np.where(keep[labels], labels, 0).astype(labels.dtype)
    table = {name: prediction.structures[name] for name in kept}
    clock = StageClock()
    statistics = None
    if outputs.statistics:
        statistics = structure_statistics(labels, volume.array, kept, volume.spacing, table)
        clock.lap("statistics")
    return CasePrediction(name, Volume(labels, volume.affine, None, {"source": volume.meta.get("source")}), table,
                          statistics, {**prediction.seconds, **clock.seconds})  # fmt: skip


def _sidecar(run: LoadedRun, case: CasePrediction, volume: Volume) -> dict[str, Any]:
    return {
        "structures": case.structures,
        "seconds": case.seconds,
        "model": {"name": run.spec.name, "run": str(run.run_dir)},
        "input": {"path": str(volume.meta.get("source")), "series_uid": volume.meta.get("series_uid"),
                  "shape": list(volume.array.shape), "spacing_mm": list(volume.spacing),
                  "orientation": volume.orientation if run.preprocessing.orientation else None},
    }  # fmt: skip


def _write(
    run: LoadedRun, case: CasePrediction, volume: Volume, files: dict[str, Path], outputs: OutputOptions
) -> None:
    """Write the case's files; its `seconds` gains the write time (the sidecar holds the same dict)."""
    kept = {name: run.structures[name] for name in case.structures}  # the structures `predict_case` kept
    case.files = write_case(case.labels, kept, files, outputs, _sidecar(run, case, volume), statistics=case.statistics,
                            source_meta=volume.meta, model_name=run.spec.name)  # fmt: skip


def predict_paths(
    run: LoadedRun,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None,
    *,
    outputs: OutputOptions | None = None,
    series_uid: str | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, list[Any]]:
    """Predict every input (files, folders of files, folders of DICOM series) and write each case's files.

    An input that cannot be read or predicted is reported and skipped; the rest continue. `options`
    go to `predict_image`. Before anything is written, the run stops when an output would replace
    an input or two inputs would share an output (`check_outputs`), naming both.

    Returns:
        `{"written": [label map paths], "failed": [(input, message)], "cases": [CasePrediction]}`;
        with `out_dir` None nothing is written and `written` is empty.
    """
    from tqdm.auto import tqdm

    outputs = outputs or OutputOptions()
    if outputs.roi_subset:  # an unknown name stops the run before any work
        select_structures(run.structures, outputs.roi_subset)
    missing = [str(path) for path in map(Path, inputs) if not path.exists()]
    if missing:  # a mistyped path is the user's to fix before anything runs, not a failed case
        raise InvalidInputError("input not found", source=", ".join(missing), expected="an existing file or folder")
    cases = list_cases(inputs, series_uid=series_uid)
    plans: dict[InputCase, dict[str, Path]] = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        check_output_folder(out_dir)
        plans = {case: planned_files(case.path, case.name, out_dir, outputs) for case in cases}
        by_input = {}
        for case, files in plans.items():  # two series of one folder are two inputs
            key = case.path / case.series_uid if case.series_uid else case.path
            by_input[key] = list(files.values())
        check_outputs(by_input)
    result: dict[str, list[Any]] = {"written": [], "failed": [], "cases": []}
    for case in tqdm(cases, desc="predicting", unit="case", disable=not progress):
        try:
            reading = StageClock()
            volume = case.read()
            reading.lap("read")
            prediction = predict_case(run, volume, case.name, outputs=outputs, **options)
            prediction.seconds = {**reading.seconds, **prediction.seconds}
            if out_dir is not None:
                _write(run, prediction, volume, plans[case], outputs)
                result["written"].append(plans[case]["labels"])
            result["cases"].append(prediction)
        except (MednetsError, OSError) as error:  # one bad case (or a full disk) is reported; the rest go on
            result["failed"].append((str(case.path), failure_message(case.path, error)))
    return result


def predict(
    image: Any,
    run: str | os.PathLike[str] | LoadedRun,
    *,
    device: str = "auto",
    checkpoint: str = "best",
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    out: str | os.PathLike[str] | None = None,
    output_format: str = "nifti",
    split_masks: bool = False,
    statistics: bool = True,
    roi_subset: Sequence[str] | None = None,
    series_uid: str | None = None,
    name: str = "case",
    **options: Any,
) -> CasePrediction | list[CasePrediction]:
    """Segment an image with a trained run, the function `mednets predict` runs for each case.

    Args:
        image: a path (file, DICOM folder, folder of files or series), a list of paths, a nibabel or
            SimpleITK image, or a numpy array `[D, H, W]` with `spacing` (z, y, x) mm or `affine`.
        run: a run folder or a `LoadedRun` (`load_run`, to predict many images without reloading).
        device: for a run folder: auto (a GPU when present), cpu, cuda, cuda:N or mps.
        checkpoint: for a run folder: best or last.
        spacing, affine: the geometry of an array input (one of them is required for arrays).
        out: a folder to write the case files into (`mednets.engine.outputs`); None writes nothing.
        output_format, split_masks, statistics, roi_subset: as the CLI's `--format`, `--split-masks`,
            `--statistics`, `--roi-subset`; statistics are computed unless turned off (and written with `out`).
        series_uid: for a folder of several DICOM series, the one to predict.
        name: the case name of an in-memory image (its output file stem).
        **options: inference settings (`tta`, `overlap`, `gating`, `precision`, ...; `predict_image`).

    Returns:
        A `CasePrediction` for one image or file; a list for a folder or a list of paths.

    Raises:
        MednetsError: the input cannot be read or predicted (for several inputs: after the others,
            naming every failed one).
    """
    loaded = run if isinstance(run, LoadedRun) else load_run(run, checkpoint=checkpoint, device=device)
    outputs = OutputOptions(output_format, split_masks, statistics, tuple(roi_subset) if roi_subset else None)
    if isinstance(image, str | os.PathLike | list | tuple):
        paths = list(image) if isinstance(image, list | tuple) else [image]
        result = predict_paths(loaded, paths, out, outputs=outputs, series_uid=series_uid, progress=False, **options)
        if result["failed"]:
            raise InvalidInputError("; ".join(message for _, message in result["failed"]), source="predict",
                                    got=f"{len(result['failed'])} of {len(result['failed']) + len(result['cases'])} "
                                    "inputs failed")  # fmt: skip
        many = isinstance(image, list | tuple) or (Path(image).is_dir() and len(result["cases"]) != 1)
        return result["cases"] if many else result["cases"][0]
    volume = as_volume(image, spacing=spacing, affine=affine)
    case = predict_case(loaded, volume, name, outputs=outputs, **options)
    if out is not None:
        stand_in = Path(f"{name}.png" if len(volume.spatial_shape) == 2 else f"{name}.nii.gz")  # its file type
        files = planned_files(stand_in, name, Path(out), outputs)
        check_output_folder(Path(out))
        _write(loaded, case, volume, files, outputs)
    return case
