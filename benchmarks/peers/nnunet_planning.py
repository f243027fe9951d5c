"""nnU-Net v2's own fingerprint, plan and preprocessing on a mednets dataset folder, each step timed.

The nnU-Net half of issue 21's planning comparison: what nnU-Net v2 plans for a dataset (target spacing,
median image size, patch and batch size, normalisation per channel, foreground intensity statistics) and what
its preprocessing costs (seconds, cases per minute, cache bytes), for the lead to put beside `mednets plan`.

Usage (the peers environment, under the heavy-job lock):

    make bench-peers
    flock /tmp/mednets-heavy.lock .venv-peers/bin/python benchmarks/peers/nnunet_planning.py DATASET \\
        [--np 2] [--lowres] [--verify] [--json OUT] [--workdir DIR]

A mednets dataset folder is nnU-Net's raw format (docs/dataset_format.md), so the script only links it:
`<workdir>/nnUNet_raw/Dataset900_<name>/{imagesTr,labelsTr}` hold symlinks to the case files (no copies) and
a dataset.json that is mednets' own with `numTraining` and `file_ending` filled in when absent (nnU-Net requires
both; mednets' extra keys such as `cases`, `presence`, `generator` are passed through and nnU-Net ignores them).
Then nnU-Net's own command-line tools run one after the other, each in a subprocess whose environment alone
carries `nnUNet_raw`, `nnUNet_preprocessed` and `nnUNet_results`:

    nnUNetv2_extract_fingerprint -d 900 -np NP [--verify_dataset_integrity]
    nnUNetv2_plan_experiment -d 900 [-pl PLANNER]
    nnUNetv2_preprocess -d 900 -plans_name PLANS -c 3d_fullres -np NP   (and 3d_lowres with --lowres, if planned)

`--planner` picks nnU-Net's planner: `ExperimentPlanner` (the default, the original nnU-Net) or one of the
residual-encoder presets nnU-Net now recommends (`nnUNetPlannerResEncM`, `...L`, `...XL`), which plan larger
patches for a larger GPU memory target.

Each step's wall time includes its interpreter start and imports (`startup` in the table: the time of
`nnUNetv2_plan_experiment -h`, which imports the same modules and does nothing). Cases per minute is the number
of training cases over the step's wall time. The cache size is the bytes of the configuration's preprocessed
folder (`nnUNetPlans_3d_fullres/`: compressed arrays and per-case properties); `gt_segmentations/`, the
copies of the label maps nnU-Net keeps for validation, is reported apart.

Axis order: nnU-Net reads NIfTI with SimpleITK, whose arrays are `[z, y, x]` (mednets' `[D, H, W]`) and may
transpose them so the anisotropic axis comes first (`transpose_forward` in the plan). Spacings and sizes here
are given in the file's `[z, y, x]` order, the transpose undone.

Planning and preprocessing run on CPU: nnU-Net's planner estimates memory from the architecture without a GPU,
and its preprocessing uses NumPy, SciPy and scikit-image. The work folder (a temporary one unless `--workdir`) is
removed at the end unless `--workdir` names it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from mednets.errors import DatasetError, MednetsError
from mednets.reports.measure import machine_description

__all__ = ["NnunetError", "link_raw_dataset", "main", "nnunet_planning", "print_table"]

DEFAULT_DATASET_ID = 900
DEFAULT_PLANNER = "ExperimentPlanner"
STEP_TIMEOUT_S = 3600
LOG_TAIL_LINES = 40


class NnunetError(MednetsError, RuntimeError):
    """One of nnU-Net's tools failed, timed out, or is not installed where the script looks for it."""


def link_raw_dataset(dataset: Path, raw_root: Path, dataset_id: int, name: str) -> tuple[Path, int]:
    """Lay out a mednets dataset folder as nnU-Net raw data, linking the case files rather than copying them.

    Args:
        dataset: a mednets dataset folder (dataset.json, imagesTr/, labelsTr/).
        raw_root: the folder that becomes `nnUNet_raw`.
        dataset_id: nnU-Net's dataset number (three digits).
        name: the dataset name after `DatasetXXX_`.

    Returns:
        The raw dataset folder and its number of training cases.
    """
    dataset = dataset.resolve()
    json_path = dataset / "dataset.json"
    try:
        dataset_json = json.loads(json_path.read_text())
    except FileNotFoundError as error:
        raise DatasetError("missing dataset.json", source=str(json_path)) from error
    except json.JSONDecodeError as error:
        raise DatasetError(f"dataset.json is not valid JSON ({error})", source=str(json_path)) from error
    for field in ("channel_names", "labels"):
        if not isinstance(dataset_json.get(field), dict) or not dataset_json[field]:
            raise DatasetError(f"field '{field}' is missing or empty", source=str(json_path))
    file_ending = dataset_json.get("file_ending", ".nii.gz")
    channels = sorted(int(key) for key in dataset_json["channel_names"])

    labels = sorted((dataset / "labelsTr").glob(f"*{file_ending}"))
    if not labels:
        raise DatasetError(f"no label files ending in {file_ending}", source=str(dataset / "labelsTr"))
    problems = []
    case_files = []
    for label in labels:
        case = label.name[: -len(file_ending)]
        images = [dataset / "imagesTr" / f"{case}_{channel:04d}{file_ending}" for channel in channels]
        problems += [f"{image}: missing channel file of case {case}" for image in images if not image.is_file()]
        case_files.append((case, images, label))
    if problems:
        raise DatasetError("cases with missing channel files:\n" + "\n".join(problems), source=str(dataset))

    raw_dataset = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (raw_dataset / "imagesTr").mkdir(parents=True)
    (raw_dataset / "labelsTr").mkdir()
    for case, images, label in case_files:
        for image in images:
            (raw_dataset / "imagesTr" / image.name).symlink_to(image)
        (raw_dataset / "labelsTr" / f"{case}{file_ending}").symlink_to(label)
    # nnU-Net requires numTraining (its batch size is capped by the dataset's voxel count) and file_ending.
    dataset_json.update(numTraining=len(case_files), file_ending=file_ending)
    (raw_dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return raw_dataset, len(case_files)


def _run_tool(tool: str, args: list[str], env: dict[str, str], log: Path, timeout_s: float) -> float:
    """Run one nnU-Net command-line tool to completion; its wall time in seconds (output goes to `log`)."""
    start = time.perf_counter()
    try:
        with log.open("w") as out:
            result = subprocess.run(
                [tool, *args], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            )
    except subprocess.TimeoutExpired as error:
        raise NnunetError(
            f"{Path(tool).name} {' '.join(args)} did not finish within {timeout_s:.0f} s; its output:\n{_tail(log)}"
        ) from error
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise NnunetError(
            f"{Path(tool).name} {' '.join(args)} failed with exit status {result.returncode}; its output:\n{_tail(log)}"
        )
    return seconds


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (symlinks not followed)."""
    return sum(path.lstat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def _untranspose(values: list, transpose_backward: list[int]) -> list:
    """A per-axis value from nnU-Net's transposed order back to the file's [z, y, x] order."""
    return [values[axis] for axis in transpose_backward]


def _configuration(plans: dict, name: str) -> dict:
    """A configuration of nnUNetPlans.json with `inherits_from` resolved."""
    configuration = dict(plans["configurations"][name])
    parent = configuration.pop("inherits_from", None)
    return {**_configuration(plans, parent), **configuration} if parent else configuration


def _summarise_configuration(plans: dict, name: str, channel_names: dict[str, str]) -> dict:
    configuration = _configuration(plans, name)
    backward = plans["transpose_backward"]
    schemes = configuration["normalization_schemes"]
    return {
        "spacing_mm": [round(float(s), 4) for s in _untranspose(configuration["spacing"], backward)],
        "median_image_size_voxels": [
            int(s) for s in _untranspose(configuration["median_image_size_in_voxels"], backward)
        ],
        "patch_size": [int(s) for s in _untranspose(configuration["patch_size"], backward)],
        "batch_size": int(configuration["batch_size"]),
        "normalization": {
            f"{key}:{channel_names[key]}": scheme
            for key, scheme in zip(sorted(channel_names, key=int), schemes, strict=True)
        },
        "use_mask_for_norm": list(configuration["use_mask_for_norm"]),
        "network": configuration["architecture"]["network_class_name"].rsplit(".", 1)[-1],
        "n_stages": int(configuration["architecture"]["arch_kwargs"]["n_stages"]),
        "batch_dice": configuration.get("batch_dice"),
    }


def nnunet_planning(
    dataset: Path,
    *,
    dataset_id: int = DEFAULT_DATASET_ID,
    name: str | None = None,
    planner: str = DEFAULT_PLANNER,
    num_processes: int = 2,
    lowres: bool = False,
    verify: bool = False,
    workdir: Path | None = None,
    nnunet_bin: Path | None = None,
    timeout_s: float = STEP_TIMEOUT_S,
) -> dict:
    """Run nnU-Net v2's fingerprint extraction, planning and preprocessing on `dataset`, timing each step.

    Args:
        dataset: a mednets dataset folder.
        dataset_id: nnU-Net's dataset number in the work folder.
        name: the nnU-Net dataset name; default: dataset.json's `name`, else the folder's name.
        planner: nnU-Net's experiment planner class (`-pl`).
        num_processes: worker processes for fingerprint extraction and preprocessing (`-np`).
        lowres: also preprocess 3d_lowres when nnU-Net plans it (timed apart).
        verify: run nnU-Net's `--verify_dataset_integrity` in the fingerprint step (it reads every file, so
            it is part of that step's time).
        workdir: an absent or empty folder to hold nnUNet_raw/preprocessed/results and the logs, kept
            afterwards; default: a temporary folder, removed.
        nnunet_bin: the folder holding the `nnUNetv2_*` tools; default: beside this Python interpreter.
        timeout_s: the most seconds one tool may run.

    Returns:
        The plan summary, fingerprint statistics, step times and cache sizes (what `--json` writes).
    """
    nnunet_bin = nnunet_bin or Path(sys.executable).parent
    tools = {step: nnunet_bin / f"nnUNetv2_{step}" for step in ("extract_fingerprint", "plan_experiment", "preprocess")}
    missing = [str(tool) for tool in tools.values() if not os.access(tool, os.X_OK)]
    if missing:
        raise NnunetError(
            f"nnU-Net v2's tools are not installed here ({', '.join(missing)}): build the peers environment with "
            "`make bench-peers` and run this script with .venv-peers/bin/python (or pass --nnunet-bin)"
        )
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        raise NnunetError(f"{workdir}: the work folder must be absent or empty")
    root = workdir or Path(tempfile.mkdtemp(prefix="nnunet_planning_"))
    try:
        return _plan_in(dataset, root, tools, dataset_id, name, planner, num_processes, lowres, verify, timeout_s)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _plan_in(
    dataset: Path,
    root: Path,
    tools: dict[str, Path],
    dataset_id: int,
    name: str | None,
    planner: str,
    num_processes: int,
    lowres: bool,
    verify: bool,
    timeout_s: float,
) -> dict:
    source_json = json.loads((dataset / "dataset.json").read_text()) if (dataset / "dataset.json").is_file() else {}
    name = re.sub(r"[^A-Za-z0-9_]", "_", name or source_json.get("name") or dataset.resolve().name)
    raw, preprocessed, results, logs = (root / folder for folder in ("raw", "preprocessed", "results", "logs"))
    for folder in (preprocessed, results, logs):
        folder.mkdir(parents=True)
    raw_dataset, n_cases = link_raw_dataset(dataset, raw, dataset_id, name)
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(preprocessed),
        "nnUNet_results": str(results),
        "nnUNet_def_n_proc": str(num_processes),
    }
    dataset_arg = ["-d", str(dataset_id)]
    startup_s = _run_tool(str(tools["plan_experiment"]), ["-h"], env, logs / "startup.log", timeout_s)

    steps = {}
    fingerprint_args = [*dataset_arg, "-np", str(num_processes), "--no_pbar"]
    fingerprint_args += ["--verify_dataset_integrity"] if verify else []
    steps["extract_fingerprint"] = _run_tool(
        str(tools["extract_fingerprint"]), fingerprint_args, env, logs / "extract_fingerprint.log", timeout_s
    )
    steps["plan_experiment"] = _run_tool(
        str(tools["plan_experiment"]), [*dataset_arg, "-pl", planner], env, logs / "plan_experiment.log", timeout_s
    )
    preprocessed_dataset = preprocessed / raw_dataset.name
    # Each planner names its plans file after its own plans identifier (nnUNetPlans, nnUNetResEncUNetMPlans, ...).
    plans_files = sorted(
        set(preprocessed_dataset.glob("*.json"))
        - {preprocessed_dataset / "dataset.json"}
        - {preprocessed_dataset / "dataset_fingerprint.json"}
    )
    if len(plans_files) != 1:
        raise NnunetError(f"{preprocessed_dataset}: expected one plans file after planning, found {plans_files}")
    plans = json.loads(plans_files[0].read_text())
    fingerprint = json.loads((preprocessed_dataset / "dataset_fingerprint.json").read_text())
    planned = list(plans["configurations"])
    to_preprocess = ["3d_fullres"] + (["3d_lowres"] if lowres and "3d_lowres" in planned else [])
    for configuration in to_preprocess:
        steps[f"preprocess_{configuration}"] = _run_tool(
            str(tools["preprocess"]),
            [
                *dataset_arg,
                "-plans_name",
                plans["plans_name"],
                "-c",
                configuration,
                "-np",
                str(num_processes),
                "--no_pbar",
            ],
            env,
            logs / f"preprocess_{configuration}.log",
            timeout_s,
        )

    channel_names = source_json["channel_names"]
    configurations = {}
    for configuration in ("3d_fullres", "3d_lowres"):
        if configuration not in planned:
            continue
        summary = _summarise_configuration(plans, configuration, channel_names)
        cache = preprocessed_dataset / _configuration(plans, configuration)["data_identifier"]
        summary["cache_bytes"] = _folder_bytes(cache) if cache.is_dir() else None
        configurations[configuration] = summary
    backward = plans["transpose_backward"]
    gt_folder = preprocessed_dataset / "gt_segmentations"
    return {
        "tool": "nnunetv2",
        "versions": {package: metadata.version(package) for package in ("nnunetv2", "torch")},
        "machine": machine_description(),
        "dataset": str(dataset.resolve()),
        "nnunet_dataset": raw_dataset.name,
        "planner": planner,
        "plans_name": plans["plans_name"],
        "n_cases": n_cases,
        "num_processes": num_processes,
        "axis_order": "z y x (the file's array order; nnU-Net's transpose_forward undone)",
        "transpose_forward": plans["transpose_forward"],
        "original_median_spacing_mm": [
            round(float(s), 4) for s in _untranspose(plans["original_median_spacing_after_transp"], backward)
        ],
        "original_median_shape_after_crop": _untranspose(plans["original_median_shape_after_transp"], backward),
        "planned_configurations": planned,
        "lowres_planned": "3d_lowres" in planned,
        "configurations": configurations,
        "foreground_intensity": {
            f"{key}:{channel_names[key]}": {
                stat: round(float(properties[stat]), 3)
                for stat in ("percentile_00_5", "percentile_99_5", "mean", "std")
            }
            for key, properties in fingerprint["foreground_intensity_properties_per_channel"].items()
        },
        "startup_seconds": round(startup_s, 2),
        "steps": {
            step: {"seconds": round(seconds, 2), "cases_per_minute": round(n_cases * 60 / seconds, 1)}
            for step, seconds in steps.items()
        },
        "input_bytes": _folder_bytes(dataset / "imagesTr") + _folder_bytes(dataset / "labelsTr"),
        "gt_segmentations_bytes": _folder_bytes(gt_folder) if gt_folder.is_dir() else None,
    }


def _axes(values: list) -> str:
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def print_table(result: dict) -> None:
    """Print the planning summary as a plain-text table."""
    print(f"nnU-Net v2 {result['versions']['nnunetv2']} on {result['dataset']} ({result['n_cases']} cases)")
    print(
        f"planner {result['planner']} ({result['plans_name']}); machine: {result['machine']}; -np {result['num_processes']}"
    )
    print(f"axes: {result['axis_order']}; nnU-Net transpose_forward {result['transpose_forward']}")
    print(
        f"original median spacing {_axes(result['original_median_spacing_mm'])} mm, "
        f"median shape after crop {_axes(result['original_median_shape_after_crop'])}"
    )
    print(
        f"planned configurations: {', '.join(result['planned_configurations'])} (3d_lowres planned: "
        f"{'yes' if result['lowres_planned'] else 'no'})"
    )
    print()
    names = list(result["configurations"])
    rows = [
        ("target spacing (mm)", lambda c: _axes(c["spacing_mm"])),
        ("median image size (voxels)", lambda c: _axes(c["median_image_size_voxels"])),
        ("patch size", lambda c: _axes(c["patch_size"])),
        ("batch size", lambda c: str(c["batch_size"])),
        ("normalisation", lambda c: ", ".join(f"{k} {v}" for k, v in c["normalization"].items())),
        ("network", lambda c: f"{c['network']}, {c['n_stages']} stages"),
        ("cache (bytes)", lambda c: "not preprocessed" if c["cache_bytes"] is None else f"{c['cache_bytes']:,}"),
    ]
    width = max(len(label) for label, _ in rows)
    column = max(24, *(len(getter(result["configurations"][n])) for _, getter in rows for n in names))
    print(f"{'':{width}}  " + "  ".join(f"{n:{column}}" for n in names))
    for label, getter in rows:
        print(f"{label:{width}}  " + "  ".join(f"{getter(result['configurations'][n]):{column}}" for n in names))
    print()
    print("foreground intensity (fingerprint): channel  p0.5  p99.5  mean  std")
    for channel, stats in result["foreground_intensity"].items():
        print(
            f"  {channel}  {stats['percentile_00_5']:g}  {stats['percentile_99_5']:g}  {stats['mean']:g}  {stats['std']:g}"
        )
    print()
    print(f"{'step':28}  {'seconds':>8}  {'cases/min':>9}")
    print(f"{'startup (in each step)':28}  {result['startup_seconds']:8.2f}  {'':>9}")
    for step, timing in result["steps"].items():
        print(f"{step:28}  {timing['seconds']:8.2f}  {timing['cases_per_minute']:9.1f}")
    print()
    gt = result["gt_segmentations_bytes"]
    print(
        f"input bytes (imagesTr + labelsTr): {result['input_bytes']:,}; gt_segmentations copies: "
        f"{'none' if gt is None else f'{gt:,}'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="a mednets dataset folder (docs/dataset_format.md)")
    parser.add_argument("--np", type=int, default=2, dest="num_processes", help="nnU-Net's -np (default 2)")
    parser.add_argument("--dataset-id", type=int, default=DEFAULT_DATASET_ID, help="nnU-Net dataset number")
    parser.add_argument("--name", help="nnU-Net dataset name (default: dataset.json's name)")
    parser.add_argument("--planner", default=DEFAULT_PLANNER, help="nnU-Net's -pl, e.g. nnUNetPlannerResEncM")
    parser.add_argument("--lowres", action="store_true", help="also preprocess 3d_lowres when it is planned")
    parser.add_argument("--verify", action="store_true", help="nnU-Net's --verify_dataset_integrity (timed)")
    parser.add_argument("--workdir", type=Path, help="keep nnU-Net's folders and logs here (absent or empty)")
    parser.add_argument("--nnunet-bin", type=Path, help="folder of the nnUNetv2_* tools (default: beside python)")
    parser.add_argument("--timeout", type=float, default=STEP_TIMEOUT_S, help="seconds one tool may run")
    parser.add_argument("--json", type=Path, dest="json_out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        result = nnunet_planning(
            args.dataset,
            dataset_id=args.dataset_id,
            name=args.name,
            planner=args.planner,
            num_processes=args.num_processes,
            lowres=args.lowres,
            verify=args.verify,
            workdir=args.workdir,
            nnunet_bin=args.nnunet_bin,
            timeout_s=args.timeout,
        )
    except MednetsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print_table(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
