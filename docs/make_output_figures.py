"""Make docs/seg_nrrd_overlay.png and the statistics table of the README's "Outputs" section.

Run from the project root after `make demo` (it uses the demo's run and its held-out phantoms):

    .venv/bin/python docs/make_output_figures.py [RUN]

It predicts the first held-out phantom with an absent organ through the Python API, writing a
`.seg.nrrd` and the statistics; renders the `.seg.nrrd` over the scan with the legend read from the
file's own segment names and colours (`mednets show`), and prints the statistics as Markdown.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mednets
from mednets.data.preview import show

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "demo"
    test = run / "phantoms" / "test"
    dataset = json.loads((test / "dataset.json").read_text())
    removed = [case for case, record in dataset.get("cases", {}).items() if record.get("absent") and
               not any(s.startswith("truncated") for s in record.get("scenarios", []))]  # fmt: skip
    case_name = removed[-1] if removed else sorted(p.name for p in (test / "labelsTr").iterdir())[0].split(".")[0]
    scan = next((test / "imagesTr").glob(f"{case_name}_0000.*"))
    out = Path(tempfile.mkdtemp(prefix="mednets-outputs-"))
    case = mednets.predict(scan, run=run, out=out, output_format="seg-nrrd", statistics=True, device="cpu")
    segmentation = next(out.glob("*.seg.nrrd"))
    figure = show(scan, ROOT / "docs" / "seg_nrrd_overlay.png", labels=segmentation)
    reason = dataset.get("cases", {}).get(case_name, {}).get("absent")
    print(f"wrote {figure} from {segmentation} ({case.name}, absent: {reason}; files: "
          f"{', '.join(p.name for p in case.files)})\n")  # fmt: skip
    print("| structure | present (p) | volume mL | mean HU | median HU | std HU | bounding box (z y x) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, row in case.statistics.items():
        box = f"{row['bbox_start']} - {row['bbox_stop']}" if row["bbox_start"] else "-"
        mean = "-" if row["intensity_mean"] is None else f"{row['intensity_mean']:.0f}"
        median = "-" if row["intensity_median"] is None else f"{row['intensity_median']:.0f}"
        std = "-" if row["intensity_std"] is None else f"{row['intensity_std']:.0f}"
        print(f"| {name} | {'yes' if row['present'] else 'no'} ({row['presence_probability']:.2f}) | "
              f"{row['volume_ml']:.1f} | {mean} | {median} | {std} | {box} |")  # fmt: skip


if __name__ == "__main__":
    main()
