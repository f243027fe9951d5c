"""Absent anatomy, scored so that 0.99 can be told from 0.95: per model and per scenario, with 95% intervals.

For each trained run (`--run name=path`), the held-out set (default: 64 new phantoms drawn with seed
1000, which no run trained or validated on) is predicted exactly as `mednets predict` does and
scored by `mednets evaluate`'s per-structure rows. The dataset's per-case records say why an organ is
absent (scenario) and which present organs are small (atrophy, partial resection, cut by the field
of view). Per model:

- Dice on present organs; presence accuracy; ECE of the presence probabilities (sidecar);
- absent organs painted (any voxel in the final label map) and the mL painted;
- small present organs called absent (recall of "present" on them);

with 95% percentile intervals from a bootstrap over cases (`--bootstrap` resamples). A second table
splits the absent instances by scenario (reason in the record).

Run (after training the runs; heavy jobs one at a time):
`flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/absence_benchmark.py --run lhanet=runs/lhanet_presence
--run dynunet=runs/dynunet_phantoms --out /tmp/absence_bench` (about 1 s per case and model at 64³).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mednets.data.phantom_thorax import ThoraxConfig
from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.engine.api import predict_paths
from mednets.engine.evaluation import evaluate_folders
from mednets.engine.inference import load_run
from mednets.metrics import expected_calibration_error


def _held_out(args: argparse.Namespace) -> Path:
    data = Path(args.data) if args.data else Path(args.out) / f"{args.kind}_seed{args.seed}_n{args.n}"
    if not (data / "dataset.json").is_file():
        config = ThoraxConfig() if args.kind == "thorax" else PhantomConfig()
        write_phantom_dataset(data, args.n, args.seed, config, workers=2, progress=True)
    return data


def _rows(name: str, run_dir: Path, data: Path, out: Path) -> list[dict[str, Any]]:
    predictions = out / "predictions" / name
    if not predictions.is_dir():
        run = load_run(run_dir)
        predict_paths(run, [data / "imagesTr"], predictions, progress=True)
    return evaluate_folders(predictions, data).rows


def _records(data: Path) -> dict[str, dict[str, Any]]:
    return json.loads((data / "dataset.json").read_text())["cases"]


def _annotate(rows: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> None:
    """Each row gets why the organ is absent (scenario reason) and whether it is small but present."""
    for row in rows:
        record = records[row["case"]]
        row["why_absent"] = record.get("absent", {}).get(row["structure"])
        row["small"] = row["present_in_truth"] and (
            row["structure"] in record.get("small", {}) or row["structure"] in record.get("cut", {})
        )
        row["painted"] = (not row["present_in_truth"]) and row["false_positive_ml"] > 0


def _metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    present = [r for r in rows if r["present_in_truth"]]
    absent = [r for r in rows if not r["present_in_truth"]]
    small = [r for r in rows if r["small"]]
    dice = [r["dice"] for r in present if r["dice"] is not None]
    return {
        "dice": float(np.mean(dice)) if dice else float("nan"),
        "presence_accuracy": float(np.mean([r["presence_decision"] == r["present_in_truth"] for r in rows])),
        "absent_painted": float(sum(r["painted"] for r in absent)),
        "absent_painted_ml": float(sum(r["false_positive_ml"] for r in absent)),
        "small_recall": float(np.mean([r["presence_decision"] for r in small])) if small else float("nan"),
        "ece": expected_calibration_error(
            [r["presence_probability"] for r in rows], [r["present_in_truth"] for r in rows]
        ),
    }


def _bootstrap(rows: list[dict[str, Any]], resamples: int, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Each metric with its 95% percentile interval over case resamples."""
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_case[row["case"]].append(row)
    cases = sorted(by_case)
    point = _metrics(rows)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(resamples):
        sample = [row for index in rng.integers(len(cases), size=len(cases)) for row in by_case[cases[index]]]
        for key, value in _metrics(sample).items():
            draws[key].append(value)
    return {key: (point[key], *np.nanpercentile(draws[key], [2.5, 97.5])) for key in point}


def _format(value: tuple[float, float, float], digits: int = 3) -> str:
    middle, low, high = value
    return f"{middle:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="name=run folder (repeatable)")
    parser.add_argument("--data", help="held-out dataset folder (default: phantoms drawn into --out)")
    parser.add_argument("--kind", default="abdomen", choices=["abdomen", "thorax"], help="default held-out set's kind")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/absence_bench")
    args = parser.parse_args()
    out = Path(args.out)
    data = _held_out(args)
    records = _records(data)
    absences = sum(len(r.get("absent", {})) for r in records.values())
    print(f"held-out set {data}: {len(records)} cases, {absences} absent-organ instances\n")
    results: dict[str, Any] = {}
    header = "| model | Dice (present) | presence accuracy | absent painted (of {n}) | mL painted | small present recall | ECE |"
    table = [header.format(n=absences), "|---|---|---|---|---|---|---|"]
    scenario_rows = []
    for item in args.run:
        name, run_dir = item.split("=", 1)
        rows = _rows(name, Path(run_dir), data, out)
        _annotate(rows, records)
        stats = _bootstrap(rows, args.bootstrap)
        results[name] = {k: list(v) for k, v in stats.items()}
        small = sum(r["small"] for r in rows)
        table.append(f"| {name} | {_format(stats['dice'])} | {_format(stats['presence_accuracy'])} | "
                     f"{_format(stats['absent_painted'], 0)} | {_format(stats['absent_painted_ml'], 1)} | "
                     f"{_format(stats['small_recall'])} (n={small}) | {_format(stats['ece'])} |")  # fmt: skip
        by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if row["why_absent"]:
                by_reason[row["why_absent"]].append(row)
        for reason, mine in sorted(by_reason.items()):
            called_absent = sum(not r["presence_decision"] for r in mine)
            painted = [r["false_positive_ml"] for r in mine if r["painted"]]
            scenario_rows.append(f"| {name} | {reason} | {len(mine)} | {called_absent} | {len(painted)} | "
                                 f"{max(painted) if painted else 0:.1f} |")  # fmt: skip
        results[name]["per_scenario"] = {reason: len(mine) for reason, mine in by_reason.items()}
    print("\n".join(table))
    print(
        "\n| model | why absent | instances | called absent | painted | largest painted mL |\n|---|---|---|---|---|---|"
    )
    print("\n".join(scenario_rows))
    (out / "absence_benchmark.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
