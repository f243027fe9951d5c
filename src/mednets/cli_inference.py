"""The commands that run a trained model on a user's images: `mednets predict` and `mednets denoise`.

Both take `--quiet` (errors only) and `--json` (one JSON object on stdout: what was written, what
failed and, for predict, every case's presence table and statistics); both exit 1 when an input failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mednets.errors import ConfigError

__all__ = ["AsJson", "Checkpoint", "Device", "Quiet", "denoise_command", "predict_command", "report_batch"]

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only (no progress, no list of files).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object with the results on stdout.")]
Device = Annotated[str, typer.Option("--device", help="auto (a GPU when present), cpu, cuda, cuda:N or mps.")]
Checkpoint = Annotated[str, typer.Option("--checkpoint", help="best or last.")]


def report_batch(result: dict[str, list], *, quiet: bool = False, as_json: bool = False, extra: Any = None) -> None:
    """Print what a batch wrote and each failed input (its message names the file); exit 1 after any failure."""
    errors = Console(stderr=True, soft_wrap=True)
    if as_json:
        record = {"written": [str(p) for p in result["written"]],
                  "failed": [{"input": i, "error": m} for i, m in result["failed"]], **(extra or {})}  # fmt: skip
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
    elif not quiet:
        for path in result["written"]:
            Console(soft_wrap=True).print(f"wrote {path}", highlight=False)
    if not as_json:
        for _path, message in result["failed"]:
            errors.print(f"[bold red]failed:[/] {message}", highlight=False)
    if result["failed"]:
        total = len(result["written"]) + len(result["failed"])
        if not as_json:
            errors.print(f"[bold red]{len(result['failed'])} of {total} inputs failed[/]; the others were written",
                         highlight=False)  # fmt: skip
        raise typer.Exit(1)


def predict_command(
    run: Annotated[Path, typer.Option("--run", help="Run folder made by `mednets train`.")],
    inputs: Annotated[
        list[Path],
        typer.Option("--input", help="Image or scan file, folder of them, or folder of DICOM series (repeatable)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder for each case's files (see --format).")],
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Label map format: nifti, nrrd, seg-nrrd (3D Slicer, named segments) or dicom-seg (DICOM "
            "inputs; joins their study).",
        ),
    ] = "nifti",
    split_masks: Annotated[
        bool, typer.Option("--split-masks", help="Also write OUT/CASE/STRUCTURE.nii.gz, one mask per structure.")
    ] = False,
    statistics: Annotated[
        bool,
        typer.Option(
            "--statistics", help="Also write CASE.statistics.json and .csv: volume, intensities, box, presence."
        ),
    ] = False,
    roi_subset: Annotated[
        str | None,
        typer.Option("--roi-subset", metavar="NAME...", help="Write only these structures, e.g. liver spleen."),
    ] = None,
    series_uid: Annotated[
        str | None, typer.Option("--series-uid", help="Of a folder holding several DICOM series, predict this one.")
    ] = None,
    tta: Annotated[
        bool | None, typer.Option("--tta/--no-tta", help="Average flips along the axes training augmented (slower).")
    ] = None,
    overlap: Annotated[
        float | None, typer.Option("--overlap", min=0.0, max=0.95, help="Sliding-window overlap, a fraction.")
    ] = None,
    gating: Annotated[bool | None, typer.Option("--gating/--no-gating", help="Empty organs judged absent.")] = None,
    checkpoint: Checkpoint = "best",
    device: Device = "auto",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Sliding windows per forward pass.")
    ] = None,
    accumulate_device: Annotated[
        str | None, typer.Option("--accumulate-device", help="Device holding the blended full-size scores (cpu, cuda).")
    ] = None,
    accumulate_dtype: Annotated[
        str | None,
        typer.Option("--accumulate-dtype", help="float32 or bfloat16 (half the memory) for the blended scores."),
    ] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="bf16 (autocast) or fp32.")] = None,
    min_volume_fraction: Annotated[
        float | None,
        typer.Option(
            "--min-volume-fraction",
            min=0.0,
            help="Empty a structure painted with less than this fraction of its smallest volume in training (0: off).",
        ),
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Segment images and scans (NIfTI, NRRD, MHA, DICOM, PNG, TIFF): label maps with the input's geometry,
    their names and colours, and a JSON sidecar per case with each structure's presence.

    Options left out take the run's `inference` settings (its config.yaml).
    """
    from mednets.engine.api import load_run, predict_paths
    from mednets.engine.outputs import OutputOptions

    if precision not in (None, "bf16", "fp32"):
        raise ConfigError("invalid value", source="--precision", expected="bf16 or fp32", got=precision)
    if accumulate_dtype not in (None, "float32", "bfloat16"):
        raise ConfigError("invalid value", source="--accumulate-dtype", expected="float32 or bfloat16",
                          got=accumulate_dtype)  # fmt: skip
    subset = tuple(name for name in (roi_subset or "").replace(",", " ").split() if name) or None
    outputs = OutputOptions(output_format, split_masks, statistics, subset)
    loaded = load_run(run, checkpoint=checkpoint, device=device)
    result = predict_paths(loaded, inputs, out, outputs=outputs, series_uid=series_uid,
                           progress=not (quiet or as_json), tta=tta, overlap=overlap, gating=gating,
                           precision=precision, batch_size=batch_size, accumulate_device=accumulate_device,
                           accumulate_dtype=accumulate_dtype, min_volume_fraction=min_volume_fraction)  # fmt: skip
    cases = {case.name: {"files": [str(p) for p in case.files], "structures": case.structures,
                         "statistics": case.statistics} for case in result["cases"]}  # fmt: skip
    report_batch(result, quiet=quiet, as_json=as_json, extra={"cases": cases})


def denoise_command(
    source: Annotated[
        Path, typer.Option("--input", help="Image or whole-slide file (PNG, JPEG, TIFF, SVS) or folder of them.")
    ],
    target: Annotated[Path, typer.Option("--out", help="Output file (for one input file) or folder.")],
    run: Annotated[Path, typer.Option("--run", help="Denoising run folder made by `mednets train`.")],
    patch_size: Annotated[int, typer.Option("--patch-size", min=16, help="Window side in pixels.")] = 256,
    overlap: Annotated[
        float, typer.Option("--overlap", min=0.0, max=0.95, help="Fraction of a window shared with its neighbour.")
    ] = 0.25,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")] = 4,
    precision: Annotated[str, typer.Option("--precision", help="bf16 (autocast) or fp32.")] = "bf16",
    checkpoint: Checkpoint = "best",
    device: Device = "auto",
    keep_mean_colour: Annotated[
        bool,
        typer.Option(
            "--keep-mean-colour/--free-mean-colour",
            help="Give each tile's output the noisy tile's mean colour: removes a colour cast learned from "
            "other stains (mean-preserving noise such as gaussian, Poisson and blur).",
        ),
    ] = False,
    strength: Annotated[
        str,
        typer.Option(
            "--strength",
            help="How much of what the model removes is removed: 0 (the input) to 1 (the model's output), or "
            "'auto': scaled down per window to the noise level estimated from it (keeps detail in light noise).",
        ),
    ] = "1",
    noise_sigma: Annotated[
        float | None,
        typer.Option(
            "--noise-sigma",
            min=0.0,
            help="The input's gaussian noise sigma, in units of the full intensity range (e.g. 0.05), when known: "
            "--strength auto uses it instead of estimating it from each window.",
        ),
    ] = None,
    stain_normalise: Annotated[
        bool,
        typer.Option(
            "--stain-normalise",
            help="H&E images (not whole slides): denoise in Macenko's reference stains, fitted per image, then map "
            "the output back to the image's own stains.",
        ),
    ] = False,
    level: Annotated[
        int | None, typer.Option("--level", min=0, help="Whole slides: the pyramid level to denoise (0: full size).")
    ] = None,
    magnification: Annotated[
        float | None,
        typer.Option("--magnification", help="Whole slides: the level at this objective power, e.g. 20 (within 10%)."),
    ] = None,
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="Whole slides: the level at this many microns per pixel (within 10%).")
    ] = None,
    compression: Annotated[
        str | None,
        typer.Option(
            "--compression", help="Whole slides' tiles: jpeg, jpeg2000, deflate or none (default: the source's)."
        ),
    ] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Denoise images of any size with overlapping, seamlessly blended windows; same format and bit depth out.

    Whole-slide images (SVS, tiled TIFF) are streamed tile by tile at the chosen level into a tiled
    pyramidal TIFF, memory bounded whatever the slide's size.
    """
    from mednets.engine.denoise import denoise_paths, load_denoiser
    from mednets.engine.run import RunFolder

    if precision not in ("bf16", "fp32"):
        raise ConfigError("invalid value", source="--precision", expected="bf16 or fp32", got=precision)
    try:
        chosen_strength: float | str = strength if strength == "auto" else float(strength)
    except ValueError:
        raise ConfigError(
            "invalid value", source="--strength", expected="a number >= 0 or auto", got=strength
        ) from None
    model = load_denoiser(run, checkpoint=checkpoint, device=device)
    multiple = RunFolder(run).spec(checkpoint).size_multiple
    if compression not in (None, "jpeg", "jpeg2000", "deflate", "none"):
        raise ConfigError("invalid value", source="--compression", expected="jpeg, jpeg2000, deflate or none",
                          got=compression)  # fmt: skip
    result = denoise_paths(model, source, target, progress=not (quiet or as_json), level=level,
                           magnification=magnification, mpp=mpp, compression=compression, patch_size=patch_size,
                           overlap=overlap, batch_size=batch_size, size_multiple=multiple, precision=precision,
                           keep_mean_colour=keep_mean_colour, strength=chosen_strength,
                           noise_sigma=noise_sigma, stain_normalise=stain_normalise)  # fmt: skip
    report_batch(result, quiet=quiet, as_json=as_json)


def calibrate_command(
    run: Annotated[Path, typer.Option("--run", help="Run folder made by `mednets train`.")],
    device: Device = "auto",
) -> None:
    """Fit a run's presence calibration again on its validation cases (`calibration.json`; training does it at its end)."""
    from mednets.engine.calibration import recalibrate

    calibration = recalibrate(run, device=device, progress=True)
    console = Console(soft_wrap=True)
    if calibration is None:
        console.print("nothing to calibrate: the model has no presence logits (or its cases have several channels)")
        return
    fitted = calibration.fitted_on
    console.print(f"calibrated on {fitted['validation_cases']} validation cases: threshold {calibration.threshold}, "
                  f"volume floor {calibration.volume_floor_fraction}, ECE {fitted['ece_before']} -> {fitted['ece_after']}")  # fmt: skip
