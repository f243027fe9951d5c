"""The `mednets` command line: a thin layer, each command parses arguments and calls one library function.

Errors a user can cause (`MednetsError`) print one line naming what was wrong and what was
expected, and exit with code 2; `mednets --debug COMMAND ...` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mednets.cli_inference import AsJson, Checkpoint, Device, Quiet, calibrate_command, denoise_command, predict_command
from mednets.cli_options import join_multi_value_options, parse_numbers, readable_metavars
from mednets.errors import ConfigError, MednetsError, UnknownNameError

__all__ = ["app", "main"]

# `--set KEY=VALUE` of every command that reads an experiment config.
ConfigOverrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set train.lr=3e-4 (repeatable)."),
]

app = typer.Typer(
    name="mednets",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Medical image segmentation, absent-anatomy detection and denoising.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (files, CI logs) has no terminal width: keep tables unwrapped there.
console = Console(width=None if sys.stdout.isatty() else 160)
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        from mednets import __version__

        console.print(f"mednets {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Medical image segmentation, absent-anatomy detection and denoising."""
    _state["debug"] = debug


@app.command("models")
def models_command(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter on model names.")] = "*",
) -> None:
    """List registered models with their task, dimensions, channels and parameter count."""
    from mednets.models import get_model_spec, list_models

    table = Table(title="mednets models")
    for column in ("name", "task", "dims", "in", "out", "input size", "parameters", "description"):
        table.add_column(
            column,
            justify="right" if column in ("dims", "in", "out", "parameters") else "left",
            no_wrap=column != "description",
        )
    for name in list_models(pattern):
        spec = get_model_spec(name)
        params = f"{spec.param_count:,}" if spec.param_count is not None else "-"
        size = "x".join(map(str, spec.input_size))
        table.add_row(
            name,
            spec.task,
            f"{spec.spatial_dims}D",
            str(spec.in_channels),
            str(spec.out_channels),
            size,
            params,
            spec.description,
        )
    console.print(table)


@app.command("report")
def report_command(
    models: Annotated[list[str], typer.Argument(help="Registered model names; two or more adds a comparison.")],
    input_size: Annotated[
        str, typer.Option("--input-size", metavar="C [D] H W", help="Input channels and spatial size, e.g. 3 256 256.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, report.html and figures.")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size of the measured passes.")] = 1,
    device: Device = "auto",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs per measurement (median).")] = 3,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Constructor argument of the model(s), read as YAML (repeatable), e.g. --set bilinear=true.",
        ),
    ] = None,
) -> None:
    """Write the measured model report (layer table, parameters, FLOPs, peak memory, data-flow map)."""
    from mednets.config import parse_assignments
    from mednets.reports.model_report import write_model_report

    shape = parse_numbers(input_size, "--input-size", counts=(3, 4))
    paths = write_model_report(models, shape, out, batch_size=batch_size, device=device, repeats=repeats,
                               overrides=parse_assignments(sets or []))  # fmt: skip
    for path in paths:
        console.print(f"wrote {path}")


@app.command("phantoms")
def phantoms_command(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write (imagesTr/, labelsTr/, dataset.json).")],
    n: Annotated[int, typer.Option("--n", help="Number of cases.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same bytes.")] = 0,
    shape: Annotated[
        str,
        typer.Option(
            "--shape", metavar="D H W", help="Array shape [z, y, x]; with --mixed-spacing, D is the most slices."
        ),
    ] = "64,64,64",
    spacing: Annotated[
        str | None,
        typer.Option(
            "--spacing", metavar="MM [MM MM]", help="Voxel size in mm (D H W, or one for all); default 320 mm / shape."
        ),
    ] = None,
    mixed_spacing: Annotated[
        bool,
        typer.Option(
            "--mixed-spacing",
            help="Each case its own voxel size: in-plane 0.6-0.95 mm, slices 1.25-5 mm, as many as cover "
            "300-450 mm (at least 120, at most D); H W as --shape. E.g. --shape 300 512 512.",
        ),
    ] = False,
    modality: Annotated[
        str,
        typer.Option(
            "--modality", metavar="ct|mr", help="ct: HU; mr: the same anatomy as an MR-like image in arbitrary units."
        ),
    ] = "ct",
    absence_rate: Annotated[
        str | None,
        typer.Option(
            "--absence-rate",
            help="Rate of each scenario: one number for all, or name=rate pairs, e.g. splenectomy=0.3,truncated_top=0.1 "
            "(left_/right_: nephrectomy, renal_agenesis, kidney_atrophy, partial_nephrectomy; splenectomy, "
            "splenic_atrophy, cholecystectomy, partial_hepatectomy, truncated_top, truncated_bottom).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Cases drawn at once in worker processes; default: the number of cores, at most one per case "
            "and per 8M voxels (starting a worker costs about a second).",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing dataset in --out.")] = False,
    kind: Annotated[
        str, typer.Option("--kind", metavar="abdomen|thorax", help="abdomen, or thorax (lungs, heart, vertebrae).")
    ] = "abdomen",
) -> None:
    """Generate synthetic abdominal CT (or MR-like) phantoms (13 organs, absent-organ scenarios) as a dataset folder."""
    from mednets.data.phantoms import PhantomConfig, default_workers, parse_absence_rates, write_phantom_dataset

    spacing_mm = None
    if spacing is not None:
        values = parse_numbers(spacing, "--spacing", kind=float, counts=(1, 3))
        spacing_mm = values * 3 if len(values) == 1 else values
    if kind not in ("abdomen", "thorax"):
        raise UnknownNameError("unknown phantom kind", source="--kind", expected="abdomen, thorax", got=kind)
    if kind == "thorax":  # mednets.data.phantom_thorax: its own structures and scenarios, CT at one spacing
        from mednets.data import phantom_thorax

        if mixed_spacing or modality.lower() != "ct":
            raise ConfigError("thorax phantoms take no --mixed-spacing or --modality mr", source="--kind")
        rates = parse_absence_rates(absence_rate, phantom_thorax.DEFAULT_ABSENCE_RATES)
        config = phantom_thorax.ThoraxConfig(parse_numbers(shape, "--shape", counts=(3,)), spacing_mm, rates)
    else:
        config = PhantomConfig(shape=parse_numbers(shape, "--shape", counts=(3,)), spacing=spacing_mm,
                               absence_rates=parse_absence_rates(absence_rate), mixed_spacing=mixed_spacing,
                               modality=modality.lower())  # fmt: skip
    workers = default_workers(n, config) if workers is None else workers
    root = write_phantom_dataset(out, n, seed, config, overwrite=overwrite, workers=workers, progress=True)
    console.print(f"wrote {n} {kind} phantoms to {root}")


@app.command("validate")
def validate_command(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (imagesTr/, labelsTr/, dataset.json).")],
    quick: Annotated[
        bool, typer.Option("--quick", help="Read headers only: layout, shapes, geometry; not the voxel values.")
    ] = False,
) -> None:
    """Check a dataset folder: layout, dataset.json, and every voxel of every file (truncation, NaN, labels)."""
    from mednets.data.dataset import load_dataset

    if not dataset.is_dir():
        raise ConfigError("not a folder", source=str(dataset), expected="a dataset folder")
    load_dataset(dataset, quick=quick, progress=True)  # a DatasetError lists every problem, each with its file
    console.print(f"{dataset}: valid ({'headers only' if quick else 'every voxel read'})")


@app.command("convert-labels")
def convert_labels_command(
    source: Annotated[
        Path, typer.Option("--input", "--in", help="Label map to convert (any supported volume format).")
    ],
    target: Annotated[Path, typer.Option("--out", help="Converted label map to write (same geometry).")],
    mapping: Annotated[
        str,
        typer.Option("--map", help="totalsegmentator, totalsegmentator_mr, or a JSON file {source id: organ name}."),
    ] = "totalsegmentator",
) -> None:
    """Map another tool's label ids onto mednets' 13 abdominal organs, by organ name."""
    from mednets.data.labels import convert_label_file

    counts = convert_label_file(source, target, mapping)
    console.print(f"wrote {target}: " + ", ".join(f"{name} {count}" for name, count in counts.items()))


@app.command("show")
def show_command(
    path: Annotated[Path, typer.Option("--input", help="Volume file or DICOM folder to show.")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="Label map to overlay (same grid); a .seg.nrrd shows its own names and colours."),
    ] = None,
    window: Annotated[
        str, typer.Option("--window", metavar="LOW HIGH", help="Display window, e.g. -160 240 (HU).")
    ] = "-160,240",
) -> None:
    """Write three orthogonal slices with the labels overlaid and a colour legend by organ name."""
    from mednets.data.preview import show

    low, high = parse_numbers(window, "--window", kind=float, counts=(2,))
    console.print(f"wrote {show(path, out, labels=labels, window=(low, high))}")


@app.command("train")
def train_command(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see configs/).")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Dataset folder; default: the config's, else phantoms.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/<config name>).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from <run>/checkpoints/last (none yet: start the run).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already in the run folder (its files go first).")
    ] = False,
    overrides: ConfigOverrides = None,
) -> None:
    """Train a model; writes config.yaml, metrics.csv, TensorBoard events and checkpoints into the run folder."""
    from mednets.config import load_config
    from mednets.engine.run import RunFolder
    from mednets.engine.training import run_training

    experiment = load_config(config, overrides or [])
    run_dir = out or Path("runs") / experiment.name
    if resume and not RunFolder(run_dir).has_checkpoint():
        console.print(f"no checkpoint in {run_dir} to resume from: starting the run from the beginning")
    result = run_training(experiment, run_dir, data_dir=data, resume=resume, overwrite=overwrite)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["metrics"].items())) or (
        "no validation cases (one case, or data.val_fraction=0): the last checkpoint is the model"
    )
    console.print(f"trained {result['state']['step']} steps into {run_dir}: {metrics}")


def _table(title: str, header: list[str], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


@app.command("plan")
def plan_command(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (imagesTr/, labelsTr/, dataset.json).")],
    config: Annotated[
        Path | None, typer.Option("--config", help="Experiment YAML whose model and settings to plan for.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the plan as JSON (train with data.plan=<file>).")
    ] = None,
    overrides: ConfigOverrides = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Fingerprint a dataset (once; kept in the cache) and print the training plan derived from it."""
    from mednets.config import load_config
    from mednets.engine.planning import fingerprint_table, plan_dataset

    experiment = load_config(config, overrides or [])
    plan, fingerprint = plan_dataset(dataset, experiment, out=out, progress=not (quiet or as_json))
    if as_json:
        console.print_json(json.dumps(plan.to_dict()))
        return
    if quiet:
        return
    console.print(_table(f"Fingerprint of {dataset}", ["Property", "Value"], fingerprint_table(fingerprint)))
    console.print(_table(f"Plan for {plan.model}", ["Setting", "Value", "Why"], plan.table()))
    if out is not None:
        console.print(f"wrote {out}")


@app.command("evaluate")
def evaluate_command(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted <case>.nii.gz (and <case>.json sidecars).")],
    truth: Annotated[Path, typer.Option("--truth", help="Folder of reference <case>.nii.gz, or a dataset folder.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write <out>.csv and <out>.json.")] = None,
    nsd_tolerance_mm: Annotated[float, typer.Option("--nsd-tolerance", help="NSD boundary tolerance in mm.")] = 2.0,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Score predictions: Dice, HD95, NSD on present organs; presence metrics; false-positive mL on absent organs."""
    from mednets.atomic import check_not_inputs
    from mednets.engine.evaluation import evaluate_folders, format_summary, write_evaluation

    if out is not None:  # the score files must not replace a prediction, its sidecar or a reference file
        stem = out.with_suffix("") if out.suffix in (".csv", ".json") else out
        check_not_inputs([stem.with_suffix(".csv"), stem.with_suffix(".json")], [pred, truth], "--out")
    evaluation = evaluate_folders(pred, truth, nsd_tolerance_mm=nsd_tolerance_mm)
    written = write_evaluation(evaluation, out) if out is not None else []
    if as_json:
        print(json.dumps({"summary": evaluation.summary, "written": [str(p) for p in written]}, indent=2))
        return
    if quiet:
        return
    table = Table(title=f"evaluation of {pred}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in format_summary(evaluation.summary):
        table.add_row(label, value)
    console.print(table)
    for path in written:
        console.print(f"wrote {path}")


app.command("predict")(predict_command)
app.command("denoise")(denoise_command)
app.command("calibrate")(calibrate_command)


@app.command("dataset-from-image")
def dataset_from_image_command(
    image: Annotated[Path, typer.Option("--image", help="The image (grey or colour, PNG or TIFF).")],
    mask: Annotated[Path, typer.Option("--mask", help="Its label map, same size.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train/ (left half) and test/ (right half).")],
    structure: Annotated[str, typer.Option("--structure", help="Name of label 1 (with --binary).")] = "foreground",
    channel: Annotated[str, typer.Option("--channel", help="Name of the image channel (CT is windowed).")] = "image",
    binary: Annotated[bool, typer.Option("--binary/--multi-label", help="Label = mask > 0.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output.")] = False,
) -> None:
    """Split one image and its mask into dataset folders: left half for training, right half for testing."""
    from mednets.data.convert import split_image_pair

    paths = split_image_pair(image, mask, out, structure=structure, channel_name=channel, binary=binary,
                             overwrite=overwrite)  # fmt: skip
    for path in paths:
        console.print(f"wrote {path}")


@app.command("report-run")
def report_run_command(
    run: Annotated[Path, typer.Option("--run", help="Run folder made by `mednets train` (or `mednets demo`).")],
    pred: Annotated[
        Path | None, typer.Option("--pred", help="Predictions folder (default: RUN/test_predictions).")
    ] = None,
    scores: Annotated[
        Path | None, typer.Option("--scores", help="`mednets evaluate` JSON (default: RUN/test_scores.json).")
    ] = None,
    truth: Annotated[
        Path | None, typer.Option("--truth", help="Reference labels (default: the dataset the predictions came from).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="HTML file to write (default: RUN/report.html).")] = None,
    screenshot: Annotated[
        Path | None, typer.Option("--screenshot", help="Also write a full-page PNG of the report (needs chromium).")
    ] = None,
) -> None:
    """Write the run report: one self-contained HTML page (config, curves, Dice, presence, absent organs, overlays, model)."""
    from mednets.reports.run_report import write_run_report

    page = write_run_report(run, predictions=pred, scores=scores, truth=truth, out=out)
    console.print(f"wrote {page}")
    if screenshot is not None:
        from mednets.reports.browser import screenshot as take_screenshot

        console.print(f"wrote {take_screenshot(page, screenshot)}")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder (an earlier demo there is replaced).")] = Path(
        "runs/demo"
    ),
    minutes: Annotated[
        float | None,
        typer.Option("--minutes", help="Training budget in minutes (default: the config's, 11); steps scale with it."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Experiment YAML (default: configs/sadaan_demo.yaml).")
    ] = None,
    overrides: ConfigOverrides = None,
) -> None:
    """Phantoms with absent organs -> train SADAAn -> predict held-out cases -> evaluate -> report.html (~15 min on 2 CPU cores)."""
    from mednets.demo import run_demo

    run_demo(out, minutes=minutes, config=config, overrides=overrides or [], echo=console.print)


@app.command("export")
def export_command(
    out: Annotated[
        Path, typer.Option("--out", help="File to write, e.g. model.onnx; its JSON record goes to OUT.json.")
    ],
    run: Annotated[Path, typer.Option("--run", help="Run folder made by `mednets train` (segmentation or denoising).")],
    export_format: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    checkpoint: Checkpoint = "best",
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset version (default 17).")] = None,
    tolerance: Annotated[
        float | None,
        typer.Option("--tolerance", help="Largest max abs difference accepted, onnxruntime vs PyTorch fp32 (1e-4)."),
    ] = None,
) -> None:
    """Export a trained model to ONNX (fp32), checked against PyTorch with onnxruntime."""
    import json

    from mednets.engine.export import export_run, sidecar_path

    path = export_run(run, out, format=export_format, checkpoint=checkpoint, opset=opset, tolerance=tolerance)
    record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    console.print(f"wrote {path} and {sidecar_path(path).name}")
    console.print(
        f"onnxruntime vs PyTorch fp32 at input {record['input']['shape']}: max abs difference "
        f"{record['max_abs_diff']:.2e} (tolerance {record['tolerance']:g})"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mednets` script; returns the exit code.

    Exit codes: 0 done; 1 some inputs failed (each reported) or an unexpected internal error; 2 a
    user error (bad input, config, path or option: one line naming it). `--debug` shows the traceback.
    """
    args = join_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    console = Console(stderr=True, soft_wrap=True)
    try:
        command = typer.main.get_command(app)
        readable_metavars(command)
        command(args=args, prog_name="mednets")  # standalone mode: always ends in SystemExit
    except MednetsError as error:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    except OSError as error:  # a file system problem (permissions, full disk, missing path): the user's to fix
        if debug:
            raise
        where = f"{error.filename}: " if error.filename else ""
        console.print(f"[bold red]error:[/] {where}{error.strerror or error}", highlight=False)
        return 2
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception as error:  # a bug: one line, and the traceback with --debug
        if debug:
            raise
        console.print(f"[bold red]internal error:[/] {type(error).__name__}: {error} (rerun with --debug for the "
                      "traceback)", highlight=False)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
