"""Real-size data: plan, preprocess and train on full-size phantoms; memory must not grow with the cases.

One run, on the same machine, of what issue 21 asks to show:

1. a dataset of full-size phantoms (``--cases`` cases, 512x512 in-plane, 120-300 slices, mixed voxel
   sizes: `mednets phantoms --shape 300 512 512 --mixed-spacing`), and its first 10 cases as a second
   dataset folder (links, same files);
2. per dataset: the fingerprint's time, the plan for LHA-Net (`mednets plan` table), the preprocessing
   time (cases per minute, both cores) and the cache's size on disk;
3. per model (LHA-Net with the large dataset's planned patch, SADAAn with its config's 64³ grid) and dataset: ``--steps``
   training steps in a fresh `mednets train` process, with the peak of the summed resident memory of
   that process and its data-loader workers (sampled every 50 ms; RSS; PSS, which counts once the
   pages a forked worker shares with its parent; and PSS's anonymous part, without the pages of the
   memory-mapped cache), and the share of each step's wall
   time not spent waiting for data (`data_wait_seconds` in metrics.csv, the first step left out: it
   waits for the worker to start).

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/real_size_training.py --work /tmp/realsize

The work folder keeps the phantoms and the cache between runs (`--fresh-cache` preprocesses again).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from phantom_speed import PeakRss  # benchmarks run as scripts: their folder is on the path

ROOT = Path(__file__).resolve().parents[1]
MEDNETS = [str(Path(sys.executable).parent / "mednets")]
# What a real dataset gets: the plan's CT normalisation and nnU-Net's augmentations, not the phantom
# configs' fixed window and light set.
REAL_DATA = ["data.hu_window=null", "data.augmentation=nnunet"]
MODELS = {
    "LHA-Net (planned patch)": ("configs/lhanet_phantoms.yaml", ["data.patch_size=null", *REAL_DATA]),
    "SADAAn (64³ grid)": ("configs/sadaan_phantoms.yaml", REAL_DATA),
}


def _run(command: list[str], env: dict[str, str]) -> tuple[float, PeakRss, str]:
    """Run `command`; its wall time, peak tree memory (RSS and PSS) and output. Stops the benchmark if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakRss(process.pid, interval=0.05, proportional=True) as peak:
        output, _ = process.communicate()
    if process.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{output[-3000:]}")
    return time.perf_counter() - start, peak, output


def _phantoms(work: Path, cases: int, env: dict[str, str]) -> tuple[Path, Path, float | None]:
    full = work / f"full{cases}"
    seconds = None
    if not (full / "dataset.json").is_file():
        seconds, _, _ = _run([*MEDNETS, "phantoms", "--out", str(full), "--n", str(cases), "--shape", "300", "512",
                              "512", "--mixed-spacing", "--seed", "21"], env)  # fmt: skip
    subset = work / "full10"
    if not (subset / "dataset.json").is_file():
        info = json.loads((full / "dataset.json").read_text())
        keep = sorted(info["cases"])[:10]
        for part in ("imagesTr", "labelsTr"):
            (subset / part).mkdir(parents=True, exist_ok=True)
            for path in (full / part).iterdir():
                if any(path.name.startswith(case) for case in keep):
                    (subset / part / path.name).symlink_to(path)
        info.update(numTraining=10, cases={case: info["cases"][case] for case in keep})
        (subset / "dataset.json").write_text(json.dumps(info, indent=1))
    return full, subset, seconds


def _prepare(dataset_root: Path) -> dict:
    """Fingerprint, plan (LHA-Net) and preprocess in this process, timed."""
    from mednets.config import load_config
    from mednets.data.dataset import load_dataset
    from mednets.data.fingerprint import load_or_extract_fingerprint
    from mednets.data.preprocessing import preprocess_dataset
    from mednets.engine.planning import cache_root, dataset_cache_folder, plan_training

    config = load_config(ROOT / MODELS["LHA-Net (planned patch)"][0], MODELS["LHA-Net (planned patch)"][1])
    dataset = load_dataset(dataset_root)
    folder = dataset_cache_folder(cache_root(config), dataset.root)
    start = time.perf_counter()
    fingerprint = load_or_extract_fingerprint(dataset, folder, progress=False)
    fingerprint_seconds = time.perf_counter() - start
    plan = plan_training(fingerprint, config, in_channels=1, num_labels=len(dataset.labels))
    start = time.perf_counter()
    cache, skipped = preprocess_dataset(dataset, fingerprint, plan.preprocessing, folder / plan.preprocessing.key(),
                                        progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    size = sum(path.stat().st_size for path in cache.cases_dir.rglob("*") if path.is_file())
    n = len(dataset.training)
    return {"cases": n, "fingerprint_s": fingerprint_seconds, "preprocess_s": seconds,
            "cases_per_min": 60 * n / seconds, "cache_gb": size / 2**30, "skipped": skipped, "plan": plan}  # fmt: skip


def _train(config: str, sets: list[str], dataset: Path, run: Path, steps: int, env: dict[str, str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    overrides = [*sets, f"train.max_steps={steps}", "train.val_every=100000", "train.max_minutes=null",
                 "data.val_fraction=0", "train.warmup_steps=1"]  # fmt: skip
    command = [*MEDNETS, "train", config, "--data", str(dataset), "--out", str(run)]
    for item in overrides:
        command += ["--set", item]
    seconds, peak, _ = _run(command, env)
    rows = [row for row in csv.DictReader((run / "metrics.csv").open()) if row.get("seconds_per_step")]
    timed = rows[1:]
    step = sum(float(r["seconds_per_step"]) for r in timed)
    wait = sum(float(r["data_wait_seconds"]) for r in timed)
    plan = json.loads((run / "plan.json").read_text())
    return {"peak_gb": peak.peak / 2**30, "peak_pss_gb": peak.peak_pss / 2**30, "peak_anon_gb": peak.peak_anon / 2**30, "seconds_per_step": step / max(len(timed), 1), "compute_share": 1 - wait / step,
            "window": plan["grid"] or plan["patch_size"], "batch": plan["batch_size"], "wall_s": seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/realsize"))
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--fresh-cache", action="store_true")
    parser.add_argument("--model", action="append", choices=list(MODELS), help="train only these (repeatable)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    if args.fresh_cache:
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["MEDNETS_CACHE"] = str(cache)
    env = {**os.environ, "MEDNETS_CACHE": str(cache)}
    full, subset, phantom_seconds = _phantoms(args.work, args.cases, env)
    print(f"# Real-size data ({datetime.date.today()}, {os.cpu_count()} cores)\n")
    if phantom_seconds:
        print(f"{args.cases} full-size phantoms drawn and written in {phantom_seconds:.0f} s "
              f"({60 * args.cases / phantom_seconds:.1f} cases/min)\n")  # fmt: skip
    prepared = {name: _prepare(path) for name, path in (("10 cases", subset), (f"{args.cases} cases", full))}
    print("| dataset | fingerprint s | preprocessing s | cases/min | cache GiB | skipped |")
    print("|---|---|---|---|---|---|")
    for name, p in prepared.items():
        print(f"| {name} | {p['fingerprint_s']:.1f} | {p['preprocess_s']:.1f} | {p['cases_per_min']:.1f} | "
              f"{p['cache_gb']:.2f} | {len(p['skipped'])} |")  # fmt: skip
    plan = prepared[f"{args.cases} cases"]["plan"]
    print(f"\nPlan of the {args.cases}-case dataset for LHA-Net:\n")
    print("| setting | value | why |\n|---|---|---|")
    for row in plan.table():
        print("| " + " | ".join(row) + " |")
    print(
        "\n| model | cases | window | batch | s/step | compute share | peak RSS GiB (process + workers) "
        "| peak PSS GiB | of it anonymous GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    peaks: dict[str, list[float]] = {}
    patch = ",".join(map(str, plan.patch_size))
    for model, (config, sets) in MODELS.items():
        if args.model and model not in args.model:
            continue
        if "data.patch_size=null" in sets:  # both datasets with the larger one's planned patch: memory compared alike
            sets = [item for item in sets if item != "data.patch_size=null"] + [f"data.patch_size=[{patch}]"]
        for name, path in (("10", subset), (str(args.cases), full)):
            run = args.work / "runs" / f"{Path(config).stem}_{name}"
            r = _train(config, sets, path, run, args.steps, env)
            peaks.setdefault(model, []).append((r["peak_pss_gb"], r["peak_anon_gb"]))
            print(f"| {model} | {name} | {'x'.join(map(str, r['window']))} | {r['batch']} | "
                  f"{r['seconds_per_step']:.2f} | {r['compute_share']:.1%} | {r['peak_gb']:.2f} | "
                  f"{r['peak_pss_gb']:.2f} | {r['peak_anon_gb']:.2f} |", flush=True)  # fmt: skip
    print()
    for model, (ten, many) in peaks.items():
        print(f"{model}, with {args.cases} cases / with 10 cases: peak PSS {many[0] / ten[0]:.3f}, "
              f"its anonymous part {many[1] / max(ten[1], 1e-9):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
