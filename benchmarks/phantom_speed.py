"""Phantom generation speed: cases per minute at 64³ and at full size, 1 and 2 workers, with peak memory.

Every row runs in a fresh Python process (`--row`, called by this script), so its peak resident memory
is its own: the peak of the summed RSS of that process and its worker processes, sampled every 20 ms.
Rows:

- ``64³ CT``: `mednets phantoms`' default (64³, 5 mm), the phantoms of the quality figures;
- ``full CT`` / ``full MR``: ``--shape 300 512 512 --mixed-spacing`` (512x512, 120-300 slices, in-plane
  0.6-0.95 mm, slices 1.25-5 mm), CT and the MR-like mode;
- ``draw``: `generate_phantom` alone in one process; ``write``: `write_phantom_dataset` (draw, write
  the two ``.nii.gz`` files atomically, then dataset.json) with 1 or 2 worker processes;
- ``512x512x300 CT``: ``--shape 300 512 512 --spacing 1.5 0.8 0.8``, drawn on the coarse grid
  (`mednets.data.phantom_grid`) and, once, voxel by voxel by the 64³ path, which is how every size
  was drawn before (``--skip-voxelwise`` leaves that out: it takes about a minute and 10 GB).

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/phantom_speed.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

# label: (PhantomConfig arguments, cases)
SETTINGS = {
    "64³ CT": ({}, 16),
    "full CT": ({"shape": (300, 512, 512), "mixed_spacing": True}, 6),
    "full MR": ({"shape": (300, 512, 512), "mixed_spacing": True, "modality": "mr"}, 6),
    "512x512x300 CT": ({"shape": (300, 512, 512), "spacing": (1.5, 0.8, 0.8)}, 3),
}


def _pss_anon(pid: int) -> int:
    """Bytes of anonymous memory in a process's PSS (``Pss_Anon``, Linux 5.x; 0 where the kernel lacks it)."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Peak of the summed resident memory of a process (default: this one) and its descendants, sampled in a thread.

    `peak` sums RSS; with `proportional`, `peak_pss` also sums PSS (shared pages divided among the
    processes that map them), the tree's real footprint when data-loader workers are forked: their RSS
    counts the parent's libraries and copy-on-write pages a second time; and `peak_anon` sums the
    anonymous part of PSS (``Pss_Anon`` of ``/proc/PID/smaps_rollup``: memory the processes allocated, not
    the pages of mapped files, which the kernel can drop and read again). Reading PSS costs a few ms a process.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.02, *, proportional: bool = False):
        self.pid, self.interval, self.proportional = pid, interval, proportional
        self.peak, self.peak_pss, self.peak_anon, self._stop = 0, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(psutil.Error):  # the process ended
            root = psutil.Process(self.pid)
            while not self._stop.is_set():
                rss = pss = anon = 0
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error, OSError):  # a worker that just ended
                        if self.proportional:
                            info = process.memory_full_info()
                            rss, pss = rss + info.rss, pss + info.pss
                            anon += _pss_anon(process.pid)
                        else:
                            rss += process.memory_info().rss
                self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
                self.peak_anon = max(self.peak_anon, anon)
                time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_row(setting: str, mode: str, workers: int) -> dict:
    """In the row's own process: time `mode` (draw, write or voxelwise) and return the figures."""
    from mednets.data import phantoms
    from mednets.data.phantoms import PhantomConfig, generate_phantom, write_phantom_dataset

    arguments, n = SETTINGS[setting]
    config = PhantomConfig(**arguments)
    voxels = 0
    with PeakRss() as rss:
        start = time.perf_counter()
        if mode == "draw":
            for index in range(n):
                voxels += generate_phantom(0, config, case_index=index).image.size
        elif mode == "voxelwise":
            n = 1
            phantoms.uses_drawing_grid = lambda spacing: False  # the 64³ path at every size
            voxels = generate_phantom(0, config).image.size
        else:
            with tempfile.TemporaryDirectory() as folder:
                root = write_phantom_dataset(Path(folder) / "ds", n, 0, config, workers=workers)
                info = json.loads((root / "dataset.json").read_text())
                voxels = sum(math.prod(case.get("shape", config.shape)) for case in info["cases"].values())
        seconds = time.perf_counter() - start
    return {"cases": n, "seconds": seconds, "peak_rss_gb": rss.peak / 1e9, "mean_voxels": voxels / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", nargs=3, metavar=("SETTING", "MODE", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-voxelwise", action="store_true", help="Leave out the voxel-by-voxel row.")
    args = parser.parse_args()
    if args.row:
        setting, mode, workers = args.row
        print(json.dumps(run_row(setting, mode, int(workers))))
        return
    rows = [("64³ CT", "draw", 1), ("64³ CT", "write", 1), ("64³ CT", "write", 2)]
    for setting in ("full CT", "full MR"):
        rows += [(setting, "draw", 1), (setting, "write", 1), (setting, "write", 2)]
    rows.append(("512x512x300 CT", "draw", 1))
    if not args.skip_voxelwise:
        rows.append(("512x512x300 CT", "voxelwise", 1))
    from mednets.reports.measure import machine_description

    print(f"Measured {datetime.date.today()} on {machine_description()}; `{' '.join(sys.argv)}`.\n")
    print("| phantoms | what | workers | cases | mean voxels | seconds | s / case | cases / min | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, mode, workers in rows:
        command = [sys.executable, __file__, "--row", setting, mode, str(workers)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        n, seconds = result["cases"], result["seconds"]
        what = {"draw": "draw", "write": "draw + write", "voxelwise": "draw voxel by voxel (as before)"}
        print(
            f"| {setting} | {what[mode]} | {workers} | {n} | {result['mean_voxels'] / 1e6:.1f}M | {seconds:.1f} "
            f"| {seconds / n:.2f} | {60 * n / seconds:.1f} | {result['peak_rss_gb']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
