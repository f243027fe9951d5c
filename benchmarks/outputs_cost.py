"""What the named outputs cost on a full-size CT label map (issue 23): statistics and each file format.

    .venv/bin/python benchmarks/outputs_cost.py [--shape 300 512 512]

A phantom label map of the 13 organs at the given shape (CT-like 0.8 x 0.8 x 1.5 mm voxels) and a
HU image: the per-structure statistics (`engine.statistics`, bincount + ndimage) against the plain
numpy loop a script would write (one boolean mask per structure; the reference in the tests), and the write time and size of
each label-map format (`--format`), the colour table and `--split-masks`, side by side in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mednets.anatomy import describe_structures, label_names
from mednets.data.phantoms import PhantomConfig, generate_phantom
from mednets.data.segmentation_files import write_split_masks
from mednets.data.volume import Volume
from mednets.engine.outputs import OUTPUT_FORMATS, OutputOptions, write_case
from mednets.engine.statistics import structure_statistics


def _numpy_statistics(labels: np.ndarray, image: np.ndarray, structures: dict[str, int]) -> dict:
    out = {}
    for name, label in structures.items():
        inside = image[labels == label]
        out[name] = (inside.size, inside.mean() if inside.size else None, np.median(inside) if inside.size else None,
                     inside.std() if inside.size else None)  # fmt: skip
    return out


def _timed(function, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    shape = tuple(parser.parse_args().shape)
    spacing = (1.5, 0.8, 0.8)
    phantom = generate_phantom(0, PhantomConfig(shape=shape, spacing=list(spacing)))
    image, labels = phantom.image, phantom.labels.astype(np.uint8)
    structures = {name: label for name, label in label_names().items() if label}
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    print(f"label map {shape} ({labels.size / 1e6:.0f} M voxels), 13 structures\n")
    ours = _timed(lambda: structure_statistics(labels, image, structures, spacing))
    plain = _timed(lambda: _numpy_statistics(labels, image, structures))
    print("| statistics | seconds | ratio |\n|---|---:|---:|")
    print(f"| mednets (the structures' voxels, sorted once) | {ours:.2f} | 1.00 |\n| numpy, one mask per structure | {plain:.2f} | "
          f"{plain / ours:.2f} |\n")  # fmt: skip
    volume = Volume(labels, affine)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for output_format in ("nifti", "nrrd", "seg-nrrd"):
            options = OutputOptions(output_format)
            name = output_format.replace("-", "_")
            files = {"labels": Path(folder) / f"{name}{OUTPUT_FORMATS[output_format]}",
                     "colours": Path(folder) / f"{name}.ctbl", "sidecar": Path(folder) / f"{name}.json"}  # fmt: skip
            start = time.perf_counter()
            write_case(volume, structures, files, options, {"seconds": {}})
            seconds = time.perf_counter() - start
            megabytes = files["labels"].stat().st_size / 1e6
            rows.append((output_format, seconds, megabytes))
        start = time.perf_counter()
        write_split_masks(volume, describe_structures(structures), Path(folder) / "masks")
        seconds = time.perf_counter() - start
        rows.append(
            (
                "--split-masks (13 .nii.gz)",
                seconds,
                sum(p.stat().st_size for p in (Path(folder) / "masks").iterdir()) / 1e6,
            )
        )
    print("| --format | write seconds (label map, colour table, sidecar) | label map MB |\n|---|---:|---:|")
    for label, seconds, megabytes in rows:
        print(f"| {label} | {seconds:.2f} | {megabytes:.2f} |")


if __name__ == "__main__":
    main()
