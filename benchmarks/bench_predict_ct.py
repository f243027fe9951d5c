"""`mednets predict` on a whole abdominal CT of 512x512x300 voxels: wall time by stage and peak memory.

The CT: a phantom drawn at 128x128x75 (320 mm field of view) and resampled (trilinear) to 300 slices of
512x512 pixels (0.625 mm pixels here, 1.07 mm slices), int16 HU, written as NIfTI (`--ct` writes it
once; it is made by the project, not downloaded). Then `mednets predict` runs as a child process
under `/usr/bin/time -v` (peak RSS of the whole command, Python start-up included), and the stages come
from the JSON sidecar's "seconds" (read, preprocess, inference, labels to the input grid, write).

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bench_predict_ct.py --run runs/lhanet_bench
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from mednets.data.phantoms import PhantomConfig, generate_phantom
from mednets.reports.measure import machine_description

SHAPE = (300, 512, 512)  # D, H, W
FIELD_OF_VIEW_MM = 320.0


def make_ct(path: Path) -> Path:
    """Write the 512x512x300 phantom CT (int16 HU, LPS-style affine like the phantoms) to `path`."""
    phantom = generate_phantom(0, PhantomConfig(shape=(75, 128, 128)))
    image = torch.from_numpy(phantom.image.astype(np.float32))[None, None]
    big = F.interpolate(image, size=SHAPE, mode="trilinear", align_corners=False)[0, 0]
    spacing = [FIELD_OF_VIEW_MM / n for n in SHAPE]  # D, H, W
    affine = phantom.affine.copy()
    affine[:3, :3] = phantom.affine[:3, :3] / np.abs(phantom.affine[:3, :3]).sum(0) * np.array(spacing[::-1])
    array = big.round().clamp(-1024, 3071).to(torch.int16).numpy().transpose(2, 1, 0)  # nibabel: x, y, z
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder of a trained 3D model")
    parser.add_argument("--ct", type=Path, default=Path("runs/bench_ct/ct_512x512x300.nii.gz"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `mednets predict` options")
    args = parser.parse_args()
    if not args.ct.exists():
        start = time.perf_counter()
        make_ct(args.ct)
        print(f"wrote {args.ct} in {time.perf_counter() - start:.1f} s")
    out = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    mednets = Path(sys.executable).with_name("mednets")
    command = ["/usr/bin/time", "-v", str(mednets), "predict", "--run", str(args.run), "--input", str(args.ct),
               "--out", str(out), *args.extra]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace")
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    sidecar = json.loads(next(out.glob("*.json")).read_text(encoding="utf-8"))
    print(f"\n`mednets predict` on {args.ct.name} ({'x'.join(map(str, SHAPE[::-1]))}), run {args.run}")
    print(machine_description() + "\n")
    print("| stage | seconds |\n|---|---|")
    for stage, seconds in sidecar["seconds"].items():
        print(f"| {stage} | {seconds:.2f} |")
    staged = sum(sidecar["seconds"].values())
    print(f"| start-up, loading the run, other | {wall - staged:.2f} |")
    print(f"| **total (wall)** | **{wall:.2f}** |\n\npeak RSS {peak_kb / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
