"""Probe the `mednets` command line with bad inputs and faults, as a new user would meet them.

Usage (under the heavy-job lock; the full probe takes about 10 minutes on 2 CPU cores):

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/bad_inputs.py [--only SUBSTRING] \
        [--markdown out.md] [--keep]

Each case runs `mednets ...` in a subprocess, in its own folder under a fresh temporary root, with a
timeout, `MEDNETS_MAX_VOXELS` unset and an 8 GiB address-space limit (`RLIMIT_AS`). The fixtures
every case shares are made once per probe with the command line itself: two small phantom datasets,
a tiny 3D UNet run (2 steps) with its predictions, and a tiny denoising run (1 step).

Each outcome is classified automatically:

- **handled**: the exit code expected (2 for a user error; 1 with one `failed:` line per bad input
  for a batch where the good inputs are still written; 0 where success is right), no traceback, and
  a one-line message naming the offending file, option or field (Click's boxed usage error counts
  as one message, and so does a dataset's list of problems: a header line ending in ':' with one
  indented line per problem, each naming its file);
- **poor message**: non-zero exit without a traceback, but the message names neither the file nor
  the option, or spans several lines;
- **crash**: a traceback, `internal error:`, a timeout (hang), a signal, a memory blow-up (hitting
  the 8 GiB limit, or more than 3 GiB resident), exit 1 for a user error, or a batch aborted by
  one bad input (exit 2, or good inputs left unwritten);
- **data lost**: a file made as input changed or vanished, a new file under a final name that
  cannot be read back, or two inputs written to one output; the code of a malicious pickle or YAML
  tag running counts here too;
- **unexpected**: no crash, but the opposite of what was expected (a bad input accepted silently,
  or a valid one refused);
- **n/a**: the case cannot be run here (a command that does not exist yet, no way to make a folder
  unwritable).

The markdown table goes to stdout (and `--markdown PATH`), then the full command and output of every
case that is not handled. Exit code 1 when any case crashed or lost data.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEDNETS = Path(sys.executable).with_name("mednets")
MEMORY_LIMIT = 8 << 30  # RLIMIT_AS of every child
RSS_LIMIT_MB = 3 * 1024  # a tiny run's command never needs this much resident memory
TIMEOUT_S = 120.0
OUTCOMES = ("handled", "poor message", "crash", "data lost", "unexpected", "n/a")
# What the fixtures' tiny 3D UNet trains on; `--set` overrides of the cases go on top.
TINY_CONFIG = {
    "name": "tiny_unet3d",
    "model": {"name": "unet3d", "overrides": {"base_channels": 4}},
    "data": {"val_fraction": 0.34, "patch_size": [32, 32, 32], "augment": False},
    "train": {"max_steps": 2, "val_every": 2, "batch_size": 2, "warmup_steps": 0, "precision": "fp32",
              "best_metric": "val/dice", "best_mode": "max"},
}  # fmt: skip
TINY_DENOISER = ["train.max_steps=1", "train.val_every=1", "train.batch_size=2", "model.overrides.base_channels=4",
                 "data.patch_size=[32, 32]"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Fixtures:
    """What the cases share, made once per probe (never modified by a case: they copy what they break)."""

    root: Path
    train: Path  # dataset folder, 3 phantoms of 32³
    test: Path  # dataset folder, 2 phantoms of 32³ (other seed)
    config: Path  # the tiny 3D UNet experiment
    run: Path  # its trained run folder
    pred: Path  # its predictions of `test`
    drun: Path  # a tiny denoising run
    commands: tuple[str, ...]  # what `mednets --help` lists

    @property
    def scan(self) -> Path:
        """A good 32³ CT scan."""
        return self.test / "imagesTr" / "phantom_000_0000.nii.gz"


@dataclass
class CaseSpec:
    """One prepared case: the command and what to check after it ran.

    Attributes:
        argv: the arguments after `mednets`.
        names: the message must contain one of these (the offending file's name, the option or field).
        outputs: files that must exist, readable, after a success or a partial batch.
        mutable: files or folders that the command may legitimately change (a run it replaces).
        forbidden: paths that must not exist afterwards (the marker of code that must never run).
        readonly: folders made unwritable for the run (chattr +i as root, chmod 555 otherwise).
        env: extra environment variables.
        check: more data-loss problems, looked for after the run.
        not_applicable: why the case cannot run here.
    """

    argv: list[str]
    names: tuple[str, ...] = ()
    outputs: tuple[Path, ...] = ()
    mutable: tuple[Path, ...] = ()
    forbidden: tuple[Path, ...] = ()
    readonly: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[], list[str]] | None = None
    not_applicable: str | None = None


@dataclass
class Ctx:
    """A case's own folder (the working directory of its command) and the shared fixtures."""

    dir: Path
    fx: Fixtures

    def path(self, relative: str) -> Path:
        """`dir/relative`, with its parent folder made."""
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def scan(self, relative: str) -> Path:
        """A copy of the good scan at `dir/relative`."""
        return Path(shutil.copyfile(self.fx.scan, self.path(relative)))

    def copy(self, source: Path, relative: str) -> Path:
        """A copy of a fixture file or folder at `dir/relative`."""
        target = self.path(relative)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
        return target


@dataclass
class Case:
    """A registered case: where it belongs, what is right, and how to prepare it."""

    category: str
    name: str
    expected: str  # error (exit 2), fails (exit 1 or 2), partial (exit 1, good inputs written), success, any
    build: Callable[[Ctx], CaseSpec]
    timeout: float = TIMEOUT_S


CASES: list[Case] = []


def case(category: str, name: str, expected: str = "error", timeout: float = TIMEOUT_S) -> Callable:
    """Register the decorated `build(ctx) -> CaseSpec` function as a case."""

    def register(build: Callable[[Ctx], CaseSpec]) -> Callable[[Ctx], CaseSpec]:
        CASES.append(Case(category, name, expected, build, timeout))
        return build

    return register


def add(category: str, name: str, expected: str, build: Callable[[Ctx], CaseSpec], timeout: float = TIMEOUT_S) -> None:
    """Register a case from a table row."""
    CASES.append(Case(category, name, expected, build, timeout))


def names(*items: Path | str) -> tuple[str, ...]:
    """What a message may name: file names of paths, other items as given."""
    return tuple(item.name if isinstance(item, Path) else item for item in items)


# --- file makers --------------------------------------------------------------------------------------


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A NIfTI file of `array` (x, y, z order) with `affine` (identity by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def scan_array(fx: Fixtures) -> tuple[np.ndarray, np.ndarray]:
    """The good scan's voxels (float32) and affine."""
    image = nib.load(str(fx.scan))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def make_rgb_nifti(path: Path, fx: Fixtures) -> None:
    rgb = np.zeros((32, 32, 32), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    write_nifti(path, rgb)


def make_truncated(path: Path, fx: Fixtures) -> None:
    data = fx.scan.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_nan(path: Path, fx: Fixtures) -> None:
    array, affine = scan_array(fx)
    array[10:12, 10:12, 10:12] = np.nan
    write_nifti(path, array, affine)


def make_inf(path: Path, fx: Fixtures) -> None:
    array, affine = scan_array(fx)
    array[5, 5, 5] = np.inf
    write_nifti(path, array, affine)


def make_empty(path: Path, fx: Fixtures) -> None:
    path.write_bytes(b"")


def make_text(path: Path, fx: Fixtures) -> None:
    path.write_text("patient notes, not an image\n" * 20)


def make_png_grey(path: Path, fx: Fixtures) -> None:
    Image.fromarray(np.full((32, 32), 120, np.uint8)).save(path)


def make_2d_nifti(path: Path, fx: Fixtures) -> None:
    write_nifti(path, np.zeros((32, 32), np.int16))


def make_4d_nifti(path: Path, fx: Fixtures) -> None:
    write_nifti(path, np.zeros((32, 32, 32, 2), np.int16))


def write_sform(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """A NIfTI file whose sform is `affine` as given, even singular (nibabel refuses such an affine otherwise)."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    nib.save(nib.Nifti1Image(array, None, header=header), str(path))


def make_zero_affine(path: Path, fx: Fixtures) -> None:
    write_sform(path, scan_array(fx)[0], np.zeros((4, 4)))


def make_spacing(spacing_mm: float) -> Callable[[Path, Fixtures], None]:
    def make(path: Path, fx: Fixtures) -> None:
        write_sform(path, scan_array(fx)[0], np.diag([spacing_mm, 10.0, 10.0, 1.0]))

    return make


def make_constant(path: Path, fx: Fixtures) -> None:
    write_nifti(path, np.full((32, 32, 32), 40, np.int16), np.diag([10.0, 10.0, 10.0, 1.0]))


def make_flipped(path: Path, fx: Fixtures) -> None:
    array, affine = scan_array(fx)
    write_nifti(path, array, affine @ np.diag([-1.0, 1.0, 1.0, 1.0]))


def make_tiny(path: Path, fx: Fixtures) -> None:
    write_nifti(path, np.zeros((2, 2, 2), np.int16), np.diag([10.0, 10.0, 10.0, 1.0]))


def make_dicom_junk(path: Path, fx: Fixtures) -> None:
    path.mkdir(parents=True)
    (path / "IM0001.dcm").write_bytes(os.urandom(2048))


def make_nifti_bomb(shape: tuple[int, ...], compressed: bool) -> Callable[[Path, Fixtures], None]:
    """A NIfTI header claiming `shape` int16 voxels, followed by 16 bytes of them."""

    def make(path: Path, fx: Fixtures) -> None:
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(np.int16)
        header.set_data_offset(352)
        data = header.binaryblock + b"\0" * 4 + np.zeros(8, np.int16).tobytes()
        path.write_bytes(gzip.compress(data) if compressed else data)

    return make


def make_nrrd_bomb(size: int) -> Callable[[Path, Fixtures], None]:
    def make(path: Path, fx: Fixtures) -> None:
        header = (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {size} {size} {size}\nencoding: raw\n"
                  "endian: little\nspace: left-posterior-superior\n"
                  "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n")  # fmt: skip
        path.write_bytes(header.encode() + bytes(16))

    return make


def make_mha_bomb(size: int) -> Callable[[Path, Fixtures], None]:
    def make(path: Path, fx: Fixtures) -> None:
        header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                  f"DimSize = {size} {size} {size}\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")  # fmt: skip
        path.write_bytes(header.encode() + bytes(16))

    return make


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png_bomb(path: Path, fx: Fixtures) -> None:
    """A PNG whose header claims 100000 x 100000 grey pixels (10 GB), in 80 bytes."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(bytes(1000))) + _png_chunk(b"IEND", b""))  # fmt: skip


def make_tiff_bomb(path: Path, fx: Fixtures) -> None:
    """A little-endian TIFF whose one strip claims 100000 x 100000 grey pixels, in 150 bytes."""
    side = 100_000
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 10 * 12 + 4), (277, 3, 1, 1), (278, 4, 1, side), (279, 4, 1, side * side % 2**32)]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += (
            struct.pack("<HHII", tag, kind, count, value)
            if kind == 4
            else struct.pack("<HHIHH", tag, kind, count, value, 0)
        )
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(16))


def make_png(path: Path, size: tuple[int, int] = (48, 48)) -> Path:
    """A good RGB PNG with some texture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(120, 230, (*size, 3), dtype=np.uint8)).save(path)
    return path


class _Evil:
    """A pickle payload: unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


# --- command helpers ----------------------------------------------------------------------------------


def predict_argv(fx: Fixtures, inputs: list[Path], out: Path, *extra: str, run: Path | None = None) -> list[str]:
    argv = ["predict", "--run", str(run or fx.run), "--out", str(out), *extra]
    for item in inputs:
        argv += ["--input", str(item)]
    return argv


def denoise_argv(fx: Fixtures, source: Path, target: Path, *extra: str, run: Path | None = None) -> list[str]:
    return [
        "denoise",
        "--run",
        str(run or fx.drun),
        "--input",
        str(source),
        "--out",
        str(target),
        "--patch-size",
        "32",
        *extra,
    ]


def train_argv(ctx: Ctx, *overrides: str, data: Path | None = None, config: Path | None = None,
               out: Path | None = None, flags: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    argv = ["train", str(config or ctx.fx.config), "--out", str(out or ctx.dir / "run"), *flags]
    if data is not None:
        argv += ["--data", str(data)]
    for item in overrides:
        argv += ["--set", item]
    return argv


def label_outputs(out: Path, *cases: str) -> tuple[Path, ...]:
    return tuple(out / f"{name}{ending}" for name in cases for ending in (".nii.gz", ".json"))


def shared_output(out: Path, inputs: int) -> Callable[[], list[str]]:
    """A check: `inputs` inputs must not leave fewer label maps than that in `out` (one written over another)."""

    def check() -> list[str]:
        written = list(out.glob("*.nii.gz")) if out.is_dir() else []
        return (
            [f"{inputs} inputs wrote {len(written)} label map(s): one output shared"]
            if 0 < len(written) < inputs
            else []
        )

    return check


# --- 1. user files overwritten ------------------------------------------------------------------------


@case("1 overwrite", "predict --input DIR --out DIR (case.nii.gz: output name = input name)")
def _(ctx: Ctx) -> CaseSpec:
    scans = ctx.dir / "scans"
    ctx.scan("scans/case.nii.gz")
    return CaseSpec(predict_argv(ctx.fx, [scans], scans), names("case.nii.gz", "scans"))


@case("1 overwrite", "predict --input DIR --out DIR (case_0000.nii.gz: outputs beside inputs)", "success")
def _(ctx: Ctx) -> CaseSpec:
    scans = ctx.dir / "scans"
    ctx.scan("scans/case_0000.nii.gz")
    return CaseSpec(predict_argv(ctx.fx, [scans], scans), outputs=label_outputs(scans, "case"))


@case("1 overwrite", "predict two inputs with one case name from two folders into one --out")
def _(ctx: Ctx) -> CaseSpec:
    first, second = ctx.scan("a/case_0000.nii.gz"), ctx.scan("b/case.nii.gz")
    out = ctx.dir / "out"
    return CaseSpec(predict_argv(ctx.fx, [first, second], out), names("case"), check=shared_output(out, 2))


@case("1 overwrite", "predict one folder holding scan.nii.gz and scan.nrrd")
def _(ctx: Ctx) -> CaseSpec:
    import SimpleITK as sitk

    ctx.scan("scans/scan.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(ctx.fx.scan)), str(ctx.path("scans/scan.nrrd")))
    out = ctx.dir / "out"
    return CaseSpec(predict_argv(ctx.fx, [ctx.dir / "scans"], out), names("scan"), check=shared_output(out, 2))


@case("1 overwrite", "predict the same file given twice", "any")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("in/scan_0000.nii.gz")
    return CaseSpec(
        predict_argv(ctx.fx, [scan, scan], ctx.dir / "out"), names(scan), outputs=label_outputs(ctx.dir / "out", "scan")
    )


@case("1 overwrite", "predict --out pointing at an existing file")
def _(ctx: Ctx) -> CaseSpec:
    scan, target = ctx.scan("in/scan_0000.nii.gz"), ctx.path("results.nii.gz")
    target.write_bytes(b"the user's earlier results")
    return CaseSpec(predict_argv(ctx.fx, [scan], target), names(target, "--out"))


@case("1 overwrite", "predict --out that is the input file")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("in/scan.nii.gz")
    return CaseSpec(predict_argv(ctx.fx, [scan], scan), names(scan, "--out"))


@case("1 overwrite", "denoise IMG IMG")
def _(ctx: Ctx) -> CaseSpec:
    image = make_png(ctx.path("slide.png"))
    return CaseSpec(denoise_argv(ctx.fx, image, image), names(image))


@case("1 overwrite", "denoise DIR DIR")
def _(ctx: Ctx) -> CaseSpec:
    make_png(ctx.path("slides/a.png"))
    return CaseSpec(denoise_argv(ctx.fx, ctx.dir / "slides", ctx.dir / "slides"), names("a.png", "slides"))


@case("1 overwrite", "denoise IMG into the folder that holds it")
def _(ctx: Ctx) -> CaseSpec:
    image = make_png(ctx.path("slides/a.png"))
    return CaseSpec(denoise_argv(ctx.fx, image, ctx.dir / "slides"), names(image, "slides"))


@case("1 overwrite", "evaluate --out PRED/<case> (over a prediction's sidecar)")
def _(ctx: Ctx) -> CaseSpec:
    pred = ctx.copy(ctx.fx.pred, "pred")
    argv = ["evaluate", "--pred", str(pred), "--truth", str(ctx.fx.test), "--out", str(pred / "phantom_000")]
    return CaseSpec(argv, names("phantom_000", "--out"))


@case("1 overwrite", "evaluate --out TRUTH/dataset.json (over the truth's dataset.json)")
def _(ctx: Ctx) -> CaseSpec:
    truth = ctx.copy(ctx.fx.test, "truth")
    argv = ["evaluate", "--pred", str(ctx.fx.pred), "--truth", str(truth), "--out", str(truth / "dataset.json")]
    return CaseSpec(argv, names("dataset.json", "--out"))


@case("1 overwrite", "convert-labels --in X --out X")
def _(ctx: Ctx) -> CaseSpec:
    labels = ctx.copy(ctx.fx.test / "labelsTr" / "phantom_000.nii.gz", "seg.nii.gz")
    return CaseSpec(["convert-labels", "--in", str(labels), "--out", str(labels)], names(labels, "--out"))


@case("1 overwrite", "show SCAN --out SCAN (a PNG over the scan)")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("scan.nii.gz")
    return CaseSpec(["show", "--input", str(scan), "--out", str(scan)], names(scan, "--out"))


@case("1 overwrite", "export over the run's own model.safetensors")
def _(ctx: Ctx) -> CaseSpec:
    run = ctx.copy(ctx.fx.run, "run")
    target = run / "checkpoints" / "best" / "model.safetensors"
    return CaseSpec(["export", "--out", str(target), "--run", str(run)], names(target))


@case("1 overwrite", "report-run RUN --out RUN/config.yaml")
def _(ctx: Ctx) -> CaseSpec:
    run = ctx.copy(ctx.fx.run, "run")
    return CaseSpec(["report-run", "--run", str(run), "--out", str(run / "config.yaml")], names("config.yaml", "--out"))


@case("1 overwrite", "phantoms --out an existing dataset without --overwrite")
def _(ctx: Ctx) -> CaseSpec:
    data = ctx.copy(ctx.fx.test, "data")
    return CaseSpec(
        ["phantoms", "--out", str(data), "--n", "2", "--shape", "32", "32", "32"], names("data", "--overwrite")
    )


@case("1 overwrite", "phantoms --overwrite keeps the user's other files in the folder", "success")
def _(ctx: Ctx) -> CaseSpec:
    data = ctx.copy(ctx.fx.test, "data")
    (data / "notes.txt").write_text("my notes on this dataset")
    argv = ["phantoms", "--out", str(data), "--n", "2", "--shape", "32", "32", "32", "--overwrite"]
    return CaseSpec(argv, mutable=(data / "imagesTr", data / "labelsTr", data / "dataset.json"),
                    outputs=(data / "dataset.json",))  # fmt: skip


# --- 2. training runs ---------------------------------------------------------------------------------


@case("2 runs", "train into an existing run without --resume")
def _(ctx: Ctx) -> CaseSpec:
    ctx.copy(ctx.fx.run, "run")
    return CaseSpec(train_argv(ctx), names("run", "--resume"))


@case("2 runs", "train --resume on a run folder that does not exist (starts it, as nnU-Net's --c does)", "success")
def _(ctx: Ctx) -> CaseSpec:
    run = ctx.dir / "run"
    return CaseSpec(train_argv(ctx, flags=("--resume",)), outputs=(run / "checkpoints" / "last" / "model.safetensors",))


@case("2 runs", "train --overwrite on an existing run (a user file in it stays)", "success")
def _(ctx: Ctx) -> CaseSpec:
    run = ctx.copy(ctx.fx.run, "run")
    (run / "notes.txt").write_text("what I changed in this run")
    keep = {p for p in run.rglob("*") if p.is_file()} - {run / "notes.txt"}
    return CaseSpec(train_argv(ctx, flags=("--overwrite",)), mutable=(*keep, run / "tensorboard"),
                    outputs=(run / "config.yaml", run / "checkpoints" / "last" / "model.safetensors"))  # fmt: skip


@case("2 runs", "train --resume on a finished run (continues to a higher max_steps)", "success")
def _(ctx: Ctx) -> CaseSpec:
    run = ctx.copy(ctx.fx.run, "run")
    return CaseSpec(train_argv(ctx, "train.max_steps=3", flags=("--resume",)), mutable=(run,),
                    outputs=(run / "checkpoints" / "last" / "model.safetensors",))  # fmt: skip


@case("2 runs", "train --resume with another model in the config")
def _(ctx: Ctx) -> CaseSpec:
    run = ctx.copy(ctx.fx.run, "run")
    argv = train_argv(ctx, "model.overrides.base_channels=8", "train.max_steps=3", flags=("--resume",))
    return CaseSpec(
        argv, names("model.safetensors", "checkpoints", "base_channels", "model"), mutable=(run / "tensorboard",)
    )


for _label, _value in [("/abs/path", None), ("../..", "../.."), ("a/b", "a/b"), ("''", "''")]:

    def _run_name(ctx: Ctx, value: str | None = _value) -> CaseSpec:
        cwd_name = str(ctx.dir / "abs" / "path") if value is None else value
        config = ctx.path("named.yaml")
        config.write_text(ctx.fx.config.read_text().replace("name: tiny_unet3d", f"name: {cwd_name}"))
        return CaseSpec(["train", str(config)], names("name"))

    add("2 runs", f"train with run name {_label} (no --out)", "error", _run_name)


@case("2 runs", "train --out pointing at an existing file")
def _(ctx: Ctx) -> CaseSpec:
    target = ctx.path("run.txt")
    target.write_text("not a folder")
    return CaseSpec(train_argv(ctx, out=target), names(target, "--out"))


@case("2 runs", "train a config file that does not exist")
def _(ctx: Ctx) -> CaseSpec:
    return CaseSpec(train_argv(ctx, config=ctx.dir / "no_such.yaml"), names("no_such.yaml"))


@case("2 runs", "train --data pointing at a folder that does not exist")
def _(ctx: Ctx) -> CaseSpec:
    return CaseSpec(train_argv(ctx, data=ctx.dir / "no_such_data"), names("no_such_data"))


# --- 3. hangs -----------------------------------------------------------------------------------------

# (case name, overrides, expected, what the message must name)
TRAIN_SETTINGS = [
    ("3 hangs", "fewer training cases than batch_size (2 < 8)", ["train.batch_size=8"], "any", "batch_size"),
    ("3 hangs", "max_steps 0", ["train.max_steps=0"], "any", "max_steps"),
    ("3 hangs", "max_steps -1", ["train.max_steps=-1"], "error", "max_steps"),
    ("3 hangs", "val_every 0", ["train.val_every=0"], "error", "val_every"),
    ("3 hangs", "val_every -5", ["train.val_every=-5"], "error", "val_every"),
    ("3 hangs", "time budget 0 minutes", ["train.max_minutes=0"], "any", "max_minutes"),
    ("3 hangs", "time budget -1 minutes", ["train.max_minutes=-1"], "error", "max_minutes"),
    ("3 hangs", "batch_size 0", ["train.batch_size=0"], "error", "batch_size"),
    ("3 hangs", "batch_size -2", ["train.batch_size=-2"], "error", "batch_size"),
    ("3 hangs", "accumulation_steps 0", ["train.accumulation_steps=0"], "error", "accumulation_steps"),
    ("3 hangs", "learning rate -1", ["train.lr=-1"], "error", "lr"),
    ("3 hangs", "warmup_steps -10", ["train.warmup_steps=-10"], "error", "warmup_steps"),
    ("3 hangs", "val_fraction -0.5", ["data.val_fraction=-0.5"], "error", "val_fraction"),
    ("3 hangs", "val_fraction 1.0", ["data.val_fraction=1.0"], "error", "val_fraction"),
    ("3 hangs", "num_workers -1", ["data.num_workers=-1"], "error", "num_workers"),
    ("3 hangs", "patch_size with a negative side", ["data.patch_size=[32, -32, 32]"], "error", "patch_size"),
    ("4 precision", "bf16 with patch 16³ for a 5-level UNet", ["train.precision=bf16", "data.patch_size=[16, 16, 16]"],
     "error", "patch_size"),
    ("4 precision", "bf16 with patch 8³ for a 5-level UNet", ["train.precision=bf16", "data.patch_size=[8, 8, 8]"],
     "error", "patch_size"),
    ("4 precision", "fp32 with patch 16³ for a 5-level UNet", ["data.patch_size=[16, 16, 16]"], "error", "patch_size"),
    ("4 precision", "precision fp16 on CPU", ["train.precision=fp16"], "error", "precision"),
    ("4 precision", "precision bf17", ["train.precision=bf17"], "error", "precision"),
    ("4 precision", "two patch sides for a 3D model", ["data.patch_size=[32, 32]"], "error", "patch_size"),
    ("4 precision", "patch 40³, not a multiple of 16", ["data.patch_size=[40, 40, 40]"], "any", "patch_size"),
    ("4 precision", "train.device cuda without CUDA", ["train.device=cuda"], "error", "device"),
]  # fmt: skip

for _category, _name, _overrides, _expected, _field in TRAIN_SETTINGS:

    def _settings(ctx: Ctx, overrides: list[str] = _overrides, field_name: str = _field) -> CaseSpec:
        return CaseSpec(train_argv(ctx, *overrides), names(field_name))

    add(_category, f"train with {_name}", _expected, _settings, timeout=90)


@case("4 precision", "predict --precision fp16")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("in/scan_0000.nii.gz")
    return CaseSpec(predict_argv(ctx.fx, [scan], ctx.dir / "out", "--precision", "fp16"), names("--precision"))


# --- 5. one bad file in a batch -----------------------------------------------------------------------

# (case, file or folder name, maker; None: the path does not exist, expected)
BAD_SCANS: list[tuple[str, str, Callable[[Path, Fixtures], None] | None, str]] = [
    ("an RGB NIfTI", "rgb.nii.gz", make_rgb_nifti, "partial"),
    ("a truncated .nii.gz", "truncated.nii.gz", make_truncated, "partial"),
    ("NaN voxels", "nan.nii.gz", make_nan, "partial"),
    ("an infinite voxel", "inf.nii.gz", make_inf, "partial"),
    ("a zero-byte file", "empty.nii.gz", make_empty, "partial"),
    ("a text file renamed .nii.gz", "notes.nii.gz", make_text, "partial"),
    ("a text file renamed .nrrd", "notes.nrrd", make_text, "partial"),
    ("a 2D PNG given to a 3D model", "photo.png", make_png_grey, "partial"),
    ("a 2D NIfTI given to a 3D model", "slice.nii.gz", make_2d_nifti, "partial"),
    ("a 4D NIfTI (2 volumes)", "dynamic.nii.gz", make_4d_nifti, "partial"),
    ("an all-zero affine", "flat.nii.gz", make_zero_affine, "partial"),
    ("a DICOM folder of random bytes", "dicom_junk", make_dicom_junk, "partial"),
    ("a path that does not exist", "missing.nii.gz", None, "partial"),
    ("7 memory|a 69-byte .nii.gz header claiming 1200³ voxels", "bomb1200.nii.gz", make_nifti_bomb((1200,) * 3, True), "partial"),
    ("7 memory|a 364-byte .nii header claiming 1200³ voxels", "bomb1200.nii", make_nifti_bomb((1200,) * 3, False), "partial"),
    ("7 memory|a .nii.gz header claiming 10^12 voxels", "bomb1e12.nii.gz", make_nifti_bomb((10000,) * 3, True), "partial"),
    ("7 memory|a .nrrd header claiming 1200³ voxels", "bomb.nrrd", make_nrrd_bomb(1200), "partial"),
    ("7 memory|a .mha header claiming 10^12 voxels", "bomb.mha", make_mha_bomb(10000), "partial"),
    ("7 memory|a PNG header claiming 100000² pixels", "bomb.png", make_png_bomb, "partial"),
    ("10 other|a huge spacing along x (1e9 mm)", "huge_spacing.nii.gz", make_spacing(1e9), "partial"),
    ("10 other|a zero spacing along x", "zero_spacing.nii.gz", make_spacing(0.0), "partial"),
    ("10 other|all voxels one value", "constant.nii.gz", make_constant, "success"),
    ("10 other|a flipped axis (negative spacing)", "flipped.nii.gz", make_flipped, "success"),
    ("10 other|a 2x2x2 scan", "tiny.nii.gz", make_tiny, "success"),
    ("10 other|a file name with spaces and ü", "scan ü 1.nii.gz", make_flipped, "success"),
    ("10 other|an upper-case ending .NII.GZ", "SCAN.NII.GZ", make_flipped, "success"),
]  # fmt: skip


def _output_stem(name: str) -> str:
    lower = name.lower()
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".png"):
        if lower.endswith(ending):
            return name[: -len(ending)]
    return name


for _name, _file, _maker, _expected in BAD_SCANS:
    _category, _, _label = _name.rpartition("|")

    def _batch(ctx: Ctx, file: str = _file, maker: Callable | None = _maker, expected: str = _expected) -> CaseSpec:
        good = [ctx.scan("in/good_a.nii.gz"), ctx.scan("in/good_b.nii.gz")]
        bad = ctx.dir / "in" / file
        if maker is not None:
            maker(bad, ctx.fx)
        out = ctx.dir / "out"
        cases = ["good_a", "good_b"] + ([_output_stem(file)] if expected == "success" else [])
        return CaseSpec(
            predict_argv(ctx.fx, [good[0], bad, good[1]], out), names(bad), outputs=label_outputs(out, *cases)
        )

    add(_category or "5 batch", f"predict good, {_label}, good", _expected, _batch)


@case("5 batch", "predict --input DIR holding a truncated .nii.gz among good scans", "partial")
def _(ctx: Ctx) -> CaseSpec:
    ctx.scan("in/good_a.nii.gz")
    ctx.scan("in/good_b.nii.gz")
    make_truncated(ctx.dir / "in" / "half.nii.gz", ctx.fx)
    out = ctx.dir / "out"
    return CaseSpec(
        predict_argv(ctx.fx, [ctx.dir / "in"], out),
        names("half.nii.gz"),
        outputs=label_outputs(out, "good_a", "good_b"),
    )


@case("5 batch", "predict into a read-only output folder", "fails")
def _(ctx: Ctx) -> CaseSpec:
    scan, out = ctx.scan("in/scan_0000.nii.gz"), ctx.dir / "out"
    out.mkdir()
    return CaseSpec(predict_argv(ctx.fx, [scan], out), names(out, "--out"), readonly=(out,))


@case("5 batch", "predict --device cuda without CUDA")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("in/scan_0000.nii.gz")
    return CaseSpec(
        predict_argv(ctx.fx, [scan], ctx.dir / "out", "--device", "cuda"), names("--device", "cuda", "CUDA")
    )


@case("5 batch", "predict --device nonsense")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("in/scan_0000.nii.gz")
    return CaseSpec(
        predict_argv(ctx.fx, [scan], ctx.dir / "out", "--device", "nonsense"), names("--device", "nonsense")
    )


@case("5 batch", "predict --input an empty folder", "fails")
def _(ctx: Ctx) -> CaseSpec:
    (ctx.dir / "empty").mkdir()
    return CaseSpec(predict_argv(ctx.fx, [ctx.dir / "empty"], ctx.dir / "out"), names("empty"))


@case("5 batch", "predict --input a folder of notes (no image)", "fails")
def _(ctx: Ctx) -> CaseSpec:
    make_text(ctx.path("docs/readme.txt"), ctx.fx)
    return CaseSpec(predict_argv(ctx.fx, [ctx.dir / "docs"], ctx.dir / "out"), names("docs"))


@case("5 batch", "predict --input only a path that does not exist", "fails")
def _(ctx: Ctx) -> CaseSpec:
    return CaseSpec(predict_argv(ctx.fx, [ctx.dir / "nowhere.nii.gz"], ctx.dir / "out"), names("nowhere.nii.gz"))


# (case, file name, maker, expected) for `denoise DIR OUT`, with two good PNGs beside
BAD_IMAGES: list[tuple[str, str, Callable[[Path, Fixtures], None], str]] = [
    ("5 batch|a truncated PNG", "cut.png", lambda p, fx: p.write_bytes(make_png(p).read_bytes()[:200]), "partial"),
    ("5 batch|a zero-byte PNG", "empty.png", make_empty, "partial"),
    ("5 batch|a text file renamed .tif", "notes.tif", make_text, "partial"),
    ("7 memory|a PNG header claiming 100000² pixels", "bomb.png", make_png_bomb, "partial"),
    ("7 memory|a TIFF header claiming 100000² pixels", "bomb.tif", make_tiff_bomb, "partial"),
    ("10 other|hidden .DS_Store and ._a.png files", "._a.png", make_text, "success"),
]  # fmt: skip

for _name, _file, _maker, _expected in BAD_IMAGES:
    _category, _, _label = _name.partition("|")

    def _images(ctx: Ctx, file: str = _file, maker: Callable = _maker, expected: str = _expected) -> CaseSpec:
        make_png(ctx.path("slides/a.png"))
        make_png(ctx.path("slides/b.png"))
        maker(ctx.dir / "slides" / file, ctx.fx)
        if expected == "success":
            (ctx.dir / "slides" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(64))
        out = ctx.dir / "out"
        return CaseSpec(
            denoise_argv(ctx.fx, ctx.dir / "slides", out), names(file), outputs=(out / "a.png", out / "b.png")
        )

    add(_category, f"denoise a folder: {_label} beside good images", _expected, _images)


@case("10 other", "predict a folder with .DS_Store and ._scan.nii.gz (AppleDouble) files", "success")
def _(ctx: Ctx) -> CaseSpec:
    ctx.scan("in/good_a.nii.gz")
    (ctx.dir / "in" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(64))
    (ctx.dir / "in" / "._good_a.nii.gz").write_bytes(b"\0\5\26\7" + bytes(200))
    out = ctx.dir / "out"
    return CaseSpec(
        predict_argv(ctx.fx, [ctx.dir / "in"], out), names("._good_a.nii.gz"), outputs=label_outputs(out, "good_a")
    )


@case("10 other", "predict a symlink to a scan", "success")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("store/real_0000.nii.gz")
    link = ctx.path("in/link_0000.nii.gz")
    link.symlink_to(scan)
    out = ctx.dir / "out"
    return CaseSpec(predict_argv(ctx.fx, [link], out), outputs=label_outputs(out, "link"))


# --- 6. dataset validation ----------------------------------------------------------------------------


def _edit_info(root: Path, edit: Callable[[dict], None]) -> None:
    info = json.loads((root / "dataset.json").read_text())
    edit(info)
    (root / "dataset.json").write_text(json.dumps(info))


def _edit_label(
    root: Path, case_id: str, edit: Callable[[np.ndarray], np.ndarray], affine: np.ndarray | None = None
) -> None:
    path = root / "labelsTr" / f"{case_id}.nii.gz"
    image = nib.load(str(path))
    write_nifti(path, edit(np.asarray(image.dataobj)), image.affine if affine is None else affine)


def _shifted(root: Path) -> np.ndarray:
    affine = nib.load(str(root / "labelsTr" / "phantom_001.nii.gz")).affine.copy()
    affine[:3, 3] += 5.0
    return affine


def _with_value(array: np.ndarray, value: int) -> np.ndarray:
    array = array.copy()
    array[0, 0, 0] = value
    return array


def _remove_images(root: Path) -> None:
    for path in (root / "imagesTr").iterdir():
        path.unlink()


def _keep_one_case(root: Path) -> None:
    for case_id in ("phantom_001", "phantom_002"):
        (root / "imagesTr" / f"{case_id}_0000.nii.gz").unlink()
        (root / "labelsTr" / f"{case_id}.nii.gz").unlink()
    _edit_info(root, lambda info: info.update(numTraining=1, cases={}, presence={}))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_in_place(path: Path) -> None:
    image = nib.load(str(path))
    array = np.asarray(image.dataobj, dtype=np.float32)
    array[10:12, 10:12, 10:12] = np.nan
    write_nifti(path, array, image.affine)


def _label_names(info: dict, mapping: Callable[[dict], dict]) -> None:
    info["labels"] = mapping(info["labels"])


# (category, case, how the copy of the training dataset is broken, what the message must name, expected)
BROKEN_DATASETS: list[tuple[str, str, Callable[[Path], None], tuple[str, ...], str]] = [
    ("6 validation", "dataset.json missing", lambda r: (r / "dataset.json").unlink(), ("dataset.json",), "error"),
    ("6 validation", "dataset.json invalid JSON", lambda r: (r / "dataset.json").write_text("{labels: [}"), ("dataset.json",), "error"),
    ("6 validation", "labels a list, not a mapping", lambda r: _edit_info(r, lambda i: i.update(labels=["background", "liver"])),
     ("labels",), "error"),
    ("6 validation", "channel_names missing", lambda r: _edit_info(r, lambda i: i.pop("channel_names")), ("channel_names",), "error"),
    ("6 validation", "numTraining 7 for 3 cases", lambda r: _edit_info(r, lambda i: i.update(numTraining=7)), ("numTraining",), "error"),
    ("6 validation", "a label value (42) not declared", lambda r: _edit_label(r, "phantom_000", lambda a: _with_value(a, 42)),
     ("phantom_000.nii.gz",), "error"),
    ("6 validation", "image/label shape mismatch", lambda r: _edit_label(r, "phantom_001", lambda a: a[:31]),
     ("phantom_001.nii.gz",), "error"),
    ("6 validation", "image/label affine mismatch (5 mm)", lambda r: _edit_label(r, "phantom_001", lambda a: a, _shifted(r)),
     ("phantom_001.nii.gz",), "error"),
    ("6 validation", "float label values (1.5)", lambda r: _edit_label(r, "phantom_000", lambda a: a.astype(np.float32) * 1.5),
     ("phantom_000.nii.gz",), "error"),
    ("6 validation", "a truncated image in imagesTr", lambda r: _truncate(r / "imagesTr" / "phantom_002_0000.nii.gz"),
     ("phantom_002_0000.nii.gz",), "error"),
    ("6 validation", "NaN voxels in an imagesTr image", lambda r: _nan_in_place(r / "imagesTr" / "phantom_002_0000.nii.gz"),
     ("phantom_002_0000.nii.gz",), "error"),
    ("6 validation", "imagesTr empty", _remove_images, ("imagesTr",), "error"),
    ("6 validation", "labelsTr missing", lambda r: shutil.rmtree(r / "labelsTr"), ("labelsTr", "phantom_000.nii.gz"), "error"),
    ("6 validation", "a label file without an image", lambda r: shutil.copyfile(r / "labelsTr" / "phantom_000.nii.gz",
                                                                                r / "labelsTr" / "stray.nii.gz"),
     ("stray.nii.gz",), "error"),
    ("6 validation", "an image without a label file", lambda r: (r / "labelsTr" / "phantom_002.nii.gz").unlink(),
     ("phantom_002",), "error"),
    ("6 validation", "wrong channel suffix _0001", lambda r: (r / "imagesTr" / "phantom_000_0000.nii.gz").rename(
        r / "imagesTr" / "phantom_000_0001.nii.gz"), ("phantom_000_0001.nii.gz",), "error"),
    ("6 validation", "one case only (a valid dataset: trains without validation, and says so)", _keep_one_case,
     (), "success"),
    ("10 other", "duplicate label ids (spleen and liver both 1)",
     lambda r: _edit_info(r, lambda i: _label_names(i, lambda labels: {**labels, "liver": 1})), ("labels", "liver"), "error"),
    ("10 other", "background not 0", lambda r: _edit_info(r, lambda i: _label_names(i, lambda labels: {**labels, "background": 99})),
     ("background",), "error"),
    ("10 other", "a negative label value (-3)", lambda r: _edit_label(r, "phantom_000", lambda a: _with_value(a.astype(np.int16), -3)),
     ("phantom_000.nii.gz",), "error"),
    ("10 other", "label names unknown to the anatomy table",
     lambda r: _edit_info(r, lambda i: _label_names(i, lambda labels: {(k if v == 0 else f"thing_{v}"): v for k, v in labels.items()})),
     ("labels",), "success"),
]  # fmt: skip


for _category, _name, _breaker, _names, _expected in BROKEN_DATASETS:

    def _broken_train(
        ctx: Ctx, breaker: Callable = _breaker, must_name: tuple = _names, expected: str = _expected
    ) -> CaseSpec:
        data = ctx.copy(ctx.fx.train, "data")
        breaker(data)
        outputs = (ctx.dir / "run" / "checkpoints" / "last" / "model.safetensors",) if expected == "success" else ()
        return CaseSpec(train_argv(ctx, data=data), must_name, outputs=outputs)

    add(_category, f"train on a dataset with {_name}", _expected, _broken_train, timeout=90)

    def _broken_validate(ctx: Ctx, breaker: Callable = _breaker, must_name: tuple = _names) -> CaseSpec:
        data = ctx.copy(ctx.fx.train, "data")
        breaker(data)
        return _validate_spec(ctx, ["validate", str(data)], must_name)

    if _category == "6 validation":
        add(_category, f"validate a dataset with {_name}", _expected, _broken_validate)


def _validate_spec(ctx: Ctx, argv: list[str], must_name: tuple[str, ...] = ()) -> CaseSpec:
    missing = None if "validate" in ctx.fx.commands else "no `mednets validate` command yet"
    return CaseSpec(argv, must_name, not_applicable=missing)


@case("6 validation", "train --data a folder that is not a dataset (no dataset.json, no imagesTr)")
def _(ctx: Ctx) -> CaseSpec:
    folder = ctx.path("photos/holiday.jpg").parent
    make_png(folder / "holiday.png")
    return CaseSpec(train_argv(ctx, data=folder), names("dataset.json", "photos"))


@case("6 validation", "validate a valid dataset", "success")
def _(ctx: Ctx) -> CaseSpec:
    return _validate_spec(ctx, ["validate", str(ctx.fx.train)])


@case("6 validation", "validate --quick a valid dataset", "success")
def _(ctx: Ctx) -> CaseSpec:
    return _validate_spec(ctx, ["validate", "--quick", str(ctx.fx.train)])


@case("6 validation", "validate --quick a dataset whose dataset.json is invalid JSON")
def _(ctx: Ctx) -> CaseSpec:
    data = ctx.copy(ctx.fx.train, "data")
    (data / "dataset.json").write_text("{labels: [}")
    return _validate_spec(ctx, ["validate", "--quick", str(data)], names("dataset.json"))


@case("6 validation", "validate --quick a dataset with an image/label shape mismatch")
def _(ctx: Ctx) -> CaseSpec:
    data = ctx.copy(ctx.fx.train, "data")
    _edit_label(data, "phantom_001", lambda a: a[:31])
    return _validate_spec(ctx, ["validate", "--quick", str(data)], names("phantom_001.nii.gz"))


@case("6 validation", "validate a folder that does not exist")
def _(ctx: Ctx) -> CaseSpec:
    return _validate_spec(ctx, ["validate", str(ctx.dir / "no_such_data")], names("no_such_data"))


# --- 8. checkpoints -----------------------------------------------------------------------------------


def _best(run: Path) -> Path:
    return run / "checkpoints" / "best"


def _torch_pickle(path: Path, marker: Path) -> None:
    import torch  # only this maker needs it: torch.save's zip format around the payload

    torch.save({"state": _Evil(marker)}, path)


def _write_configs(run: Path, edit: Callable[[str], str]) -> None:
    """Rewrite the run's config.yaml and every checkpoint's."""
    for path in run.rglob("config.yaml"):
        path.write_text(edit(path.read_text()))


def _wrong_type(text: str) -> str:
    return yaml.safe_dump({**yaml.safe_load(text), "train": {"lr": "fast"}})


def _weights(run: Path) -> Path:
    return run / "checkpoints" / "best" / "model.safetensors"


# (case, how the copy of the run is broken, what the message must name); the marker is ctx.dir / "MARKER"
BROKEN_RUNS: list[tuple[str, Callable[[Path, Ctx], object], tuple[str, ...]]] = [
    ("model.safetensors truncated", lambda run, ctx: _weights(run).write_bytes(_weights(run).read_bytes()[:5000]),
     ("model.safetensors",)),
    ("model.safetensors zero bytes", lambda run, ctx: _weights(run).write_bytes(b""), ("model.safetensors",)),
    ("model.safetensors random bytes", lambda run, ctx: _weights(run).write_bytes(os.urandom(4096)), ("model.safetensors",)),
    ("model.safetensors a malicious pickle",
     lambda run, ctx: _weights(run).write_bytes(pickle.dumps(_Evil(ctx.dir / "MARKER"))), ("model.safetensors",)),
    ("model.safetensors the weights of another model (the denoiser's)",
     lambda run, ctx: shutil.copyfile(ctx.fx.drun / "checkpoints" / "last" / "model.safetensors", _weights(run)),
     ("model.safetensors",)),
    ("config.yaml with !!python/object/apply:os.system",
     lambda run, ctx: _write_configs(run, lambda t: f"name: !!python/object/apply:os.system ['touch {ctx.dir / 'MARKER'}']\n"),
     ("config.yaml",)),
    ("config.yaml invalid YAML", lambda run, ctx: _write_configs(run, lambda t: "name: [unclosed\n  model: {"), ("config.yaml",)),
    ("config.yaml with an unknown key", lambda run, ctx: _write_configs(run, lambda t: t + "colour: blue\n"), ("colour",)),
    ("config.yaml with a wrong type (train.lr: fast)", lambda run, ctx: _write_configs(run, _wrong_type), ("train.lr",)),
    ("config.yaml missing", lambda run, ctx: [p.unlink() for p in run.rglob("config.yaml")], ("config.yaml",)),
    ("checkpoints folder missing", lambda run, ctx: shutil.rmtree(run / "checkpoints"), ("checkpoints",)),
    ("preprocessing.json invalid JSON", lambda run, ctx: (run / "preprocessing.json").write_text("{"), ("preprocessing.json",)),
    ("dataset.json missing", lambda run, ctx: (run / "dataset.json").unlink(), ("dataset.json",)),
]  # fmt: skip

for _name, _breaker, _names in BROKEN_RUNS:

    def _broken_run(ctx: Ctx, breaker: Callable = _breaker, must_name: tuple = _names) -> CaseSpec:
        run = ctx.copy(ctx.fx.run, "run")
        breaker(run, ctx)
        scan = ctx.scan("in/scan_0000.nii.gz")
        return CaseSpec(
            predict_argv(ctx.fx, [scan], ctx.dir / "out", run=run), must_name, forbidden=(ctx.dir / "MARKER",)
        )

    add("8 checkpoints", f"predict with a run whose {_name}", "error", _broken_run)


@case("8 checkpoints", "train --resume from a trainer_state.pt that is a malicious pickle")
def _(ctx: Ctx) -> CaseSpec:
    run, marker = ctx.copy(ctx.fx.run, "run"), ctx.dir / "MARKER"
    (run / "checkpoints" / "last" / "trainer_state.pt").write_bytes(pickle.dumps(_Evil(marker)))
    argv = train_argv(ctx, "train.max_steps=3", flags=("--resume",))
    return CaseSpec(argv, names("trainer_state.pt"), forbidden=(marker,), mutable=(run / "tensorboard",))


@case("8 checkpoints", "train --resume from a torch.save file holding a malicious pickle")
def _(ctx: Ctx) -> CaseSpec:
    run, marker = ctx.copy(ctx.fx.run, "run"), ctx.dir / "MARKER"
    _torch_pickle(run / "checkpoints" / "last" / "trainer_state.pt", marker)
    argv = train_argv(ctx, "train.max_steps=3", flags=("--resume",))
    return CaseSpec(argv, names("trainer_state.pt"), forbidden=(marker,), mutable=(run / "tensorboard",))


@case("8 checkpoints", "train a config with !!python/object/apply:os.system")
def _(ctx: Ctx) -> CaseSpec:
    marker, config = ctx.dir / "MARKER", ctx.path("evil.yaml")
    config.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    return CaseSpec(train_argv(ctx, config=config), names("evil.yaml"), forbidden=(marker,))


@case("8 checkpoints", "train a config with invalid YAML")
def _(ctx: Ctx) -> CaseSpec:
    config = ctx.path("broken.yaml")
    config.write_text("model: {name: unet3d\ntrain: [")
    return CaseSpec(train_argv(ctx, config=config), names("broken.yaml"))


@case("8 checkpoints", "train a config with an unknown key (train.epochs)")
def _(ctx: Ctx) -> CaseSpec:
    return CaseSpec(train_argv(ctx, "train.epochs=10"), names("train.epochs", "epochs"))


@case("8 checkpoints", "train a config that is a YAML list")
def _(ctx: Ctx) -> CaseSpec:
    config = ctx.path("list.yaml")
    config.write_text("- unet3d\n- 2\n")
    return CaseSpec(train_argv(ctx, config=config), names("list.yaml"))


@case("8 checkpoints", "predict --run a folder that does not exist")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("in/scan_0000.nii.gz")
    return CaseSpec(predict_argv(ctx.fx, [scan], ctx.dir / "out", run=ctx.dir / "no_run"), names("no_run"))


@case("8 checkpoints", "predict --checkpoint nonsense", "any")
def _(ctx: Ctx) -> CaseSpec:
    scan, out = ctx.scan("in/scan_0000.nii.gz"), ctx.dir / "out"
    return CaseSpec(predict_argv(ctx.fx, [scan], out, "--checkpoint", "nonsense"), names("--checkpoint", "nonsense"),
                    outputs=label_outputs(out, "scan"))  # fmt: skip


@case("8 checkpoints", "predict with a denoising run")
def _(ctx: Ctx) -> CaseSpec:
    scan = ctx.scan("in/scan_0000.nii.gz")
    return CaseSpec(predict_argv(ctx.fx, [scan], ctx.dir / "out", run=ctx.fx.drun), names("drun", "denois"))


@case("8 checkpoints", "denoise with a segmentation run")
def _(ctx: Ctx) -> CaseSpec:
    image = make_png(ctx.path("a.png"))
    return CaseSpec(denoise_argv(ctx.fx, image, ctx.dir / "out", run=ctx.fx.run), names("run", "denois"))


# --- 9. paths and command line ------------------------------------------------------------------------


def _cli(argv: list[str], *must_name: str) -> Callable[[Ctx], CaseSpec]:
    """A case whose command needs no files; `{dir}` in an argument is the case's folder."""
    return lambda ctx: CaseSpec([a.replace("{dir}", str(ctx.dir)) for a in argv], must_name)


CLI_CASES: list[tuple[str, list[str], tuple[str, ...], str]] = [
    ("an unknown command", ["segment-everything"], ("segment-everything",), "error"),
    ("an unknown option", ["phantoms", "--out", "{dir}/p", "--colour", "blue"], ("--colour",), "error"),
    ("a missing required option (predict without --run)", ["predict", "--input", "x.nii.gz", "--out", "o"], ("--run",), "error"),
    ("a missing argument (train without CONFIG)", ["train"], ("CONFIG", "config"), "error"),
    ("no command at all (prints the help)", [], ("Usage",), "any"),
    ("--shape with two numbers", ["phantoms", "--out", "{dir}/p", "--shape", "1", "2"], ("--shape",), "error"),
    ("--shape with letters", ["phantoms", "--out", "{dir}/p", "--shape", "a", "b", "c"], ("--shape",), "error"),
    ("--shape 0 0 0", ["phantoms", "--out", "{dir}/p", "--shape", "0", "0", "0"], ("--shape", "shape"), "error"),
    ("--n abc", ["phantoms", "--out", "{dir}/p", "--n", "abc"], ("--n",), "error"),
    ("--n -1", ["phantoms", "--out", "{dir}/p", "--n", "-1"], ("--n",), "error"),
    ("--spacing 0", ["phantoms", "--out", "{dir}/p", "--spacing", "0"], ("--spacing", "spacing"), "error"),
    ("--absence-rate banana=2", ["phantoms", "--out", "{dir}/p", "--absence-rate", "banana=2"], ("banana", "--absence-rate"), "error"),
    ("--window with three numbers", ["show", "--input", "x.nii.gz", "--out", "x.png", "--window", "1", "2", "3"], ("--window",), "error"),
    ("--input-size with one number", ["report", "unet", "--input-size", "3", "--out", "{dir}/r"], ("--input-size",), "error"),
    ("report an unknown model", ["report", "unet9", "--input-size", "3", "64", "64", "--out", "{dir}/r"], ("unet9",), "error"),
    ("predict --overlap 1.5", ["predict", "--run", "r", "--input", "x", "--out", "o", "--overlap", "1.5"], ("--overlap",), "error"),
    ("predict --batch-size 0", ["predict", "--run", "r", "--input", "x", "--out", "o", "--batch-size", "0"], ("--batch-size",), "error"),
    ("denoise --patch-size 8", ["denoise", "--run", "r", "--input", "a.png", "--out", "b.png", "--patch-size", "8"], ("--patch-size",), "error"),
    ("show a file that does not exist", ["show", "--input", "{dir}/nothing.nii.gz", "--out", "{dir}/s.png"], ("nothing.nii.gz",), "error"),
    ("train --set without '='", ["train", str(REPO / "configs" / "unet3d_phantoms.yaml"), "--set", "train.lr"], ("--set", "train.lr"),
     "error"),
    ("dataset-from-image with a missing image", ["dataset-from-image", "--image", "{dir}/none.tif", "--mask", "{dir}/m.tif", "--out",
                                                 "{dir}/d"], ("none.tif",), "error"),
    ("report-run a folder that does not exist", ["report-run", "--run", "{dir}/no_run"], ("no_run",), "error"),
]  # fmt: skip

for _name, _argv, _names, _expected in CLI_CASES:
    add("9 cli", _name, _expected, _cli(_argv, *_names))


@case("9 cli", "convert-labels --map nonsense")
def _(ctx: Ctx) -> CaseSpec:
    labels = ctx.copy(ctx.fx.test / "labelsTr" / "phantom_000.nii.gz", "seg.nii.gz")
    argv = ["convert-labels", "--in", str(labels), "--out", str(ctx.dir / "mapped.nii.gz"), "--map", "nonsense"]
    return CaseSpec(argv, names("nonsense", "--map"))


@case("9 cli", "evaluate with predictions missing for some truth cases")
def _(ctx: Ctx) -> CaseSpec:
    pred = ctx.copy(ctx.fx.pred, "pred")
    for path in pred.glob("phantom_001*"):
        path.unlink()
    return CaseSpec(["evaluate", "--pred", str(pred), "--truth", str(ctx.fx.test)], names("phantom_001"))


@case("9 cli", "evaluate with an empty predictions folder")
def _(ctx: Ctx) -> CaseSpec:
    (ctx.dir / "pred").mkdir()
    return CaseSpec(["evaluate", "--pred", str(ctx.dir / "pred"), "--truth", str(ctx.fx.test)], names("pred"))


@case("9 cli", "evaluate --truth a folder that does not exist")
def _(ctx: Ctx) -> CaseSpec:
    return CaseSpec(["evaluate", "--pred", str(ctx.fx.pred), "--truth", str(ctx.dir / "no_truth")], names("no_truth"))


@case("9 cli", "evaluate a prediction of another shape")
def _(ctx: Ctx) -> CaseSpec:
    pred = ctx.copy(ctx.fx.pred, "pred")
    write_nifti(pred / "phantom_001.nii.gz", np.zeros((16, 16, 16), np.uint8))
    return CaseSpec(["evaluate", "--pred", str(pred), "--truth", str(ctx.fx.test)], names("phantom_001.nii.gz"))


@case("9 cli", "evaluate a prediction that is a truncated file")
def _(ctx: Ctx) -> CaseSpec:
    pred = ctx.copy(ctx.fx.pred, "pred")
    data = (pred / "phantom_001.nii.gz").read_bytes()
    (pred / "phantom_001.nii.gz").write_bytes(data[: len(data) // 3])
    return CaseSpec(["evaluate", "--pred", str(pred), "--truth", str(ctx.fx.test)], names("phantom_001.nii.gz"))


@case("9 cli", "evaluate a prediction folder with notes.txt and .DS_Store beside", "success")
def _(ctx: Ctx) -> CaseSpec:
    pred = ctx.copy(ctx.fx.pred, "pred")
    (pred / "notes.txt").write_text("run 3")
    (pred / ".DS_Store").write_bytes(bytes(32))
    out = ctx.dir / "scores"
    argv = ["evaluate", "--pred", str(pred), "--truth", str(ctx.fx.test), "--out", str(out)]
    return CaseSpec(argv, outputs=(out.with_suffix(".csv"), out.with_suffix(".json")))


@case("9 cli", "export to a read-only folder")
def _(ctx: Ctx) -> CaseSpec:
    folder = ctx.dir / "locked"
    folder.mkdir()
    return CaseSpec(["export", "--out", str(folder / "model.onnx"), "--run", str(ctx.fx.run)], names("locked", "model.onnx"),
                    readonly=(folder,))  # fmt: skip


@case("9 cli", "export with onnxruntime not installed")
def _(ctx: Ctx) -> CaseSpec:
    shadow = ctx.path("shadow/onnxruntime/__init__.py")
    shadow.write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    return CaseSpec(["export", "--out", str(ctx.dir / "model.onnx"), "--run", str(ctx.fx.run)], names("onnxruntime", "export"),
                    env={"PYTHONPATH": str(shadow.parent.parent)})  # fmt: skip


@case("9 cli", "export --format tflite")
def _(ctx: Ctx) -> CaseSpec:
    return CaseSpec(["export", "--out", str(ctx.dir / "m.tflite"), "--run", str(ctx.fx.run), "--format", "tflite"],
                    names("--format", "tflite"))  # fmt: skip


@case("9 cli", "export --opset 5")
def _(ctx: Ctx) -> CaseSpec:
    return CaseSpec(
        ["export", "--out", str(ctx.dir / "m.onnx"), "--run", str(ctx.fx.run), "--opset", "5"],
        names("--opset", "opset"),
    )


# --- baselines: what works must keep working ----------------------------------------------------------


@case("0 baseline", "predict two good scans", "success")
def _(ctx: Ctx) -> CaseSpec:
    out = ctx.dir / "out"
    scans = [ctx.scan("in/a_0000.nii.gz"), ctx.scan("in/b_0000.nii.gz")]
    return CaseSpec(predict_argv(ctx.fx, scans, out), outputs=label_outputs(out, "a", "b"))


@case("0 baseline", "denoise a good image", "success")
def _(ctx: Ctx) -> CaseSpec:
    image = make_png(ctx.path("a.png"), (70, 45))
    return CaseSpec(denoise_argv(ctx.fx, image, ctx.dir / "a_clean.png"), outputs=(ctx.dir / "a_clean.png",))


@case("0 baseline", "export the tiny run to ONNX", "success")
def _(ctx: Ctx) -> CaseSpec:
    out = ctx.dir / "model.onnx"
    return CaseSpec(["export", "--out", str(out), "--run", str(ctx.fx.run)], outputs=(out, Path(f"{out}.json")))


# ---------------------------------------------------------------------------------------------------
# Running and classifying


@dataclass
class Result:
    """What one case did and how it was classified."""

    case: Case
    index: int
    argv: list[str] = field(default_factory=list)
    exit: int | None = None
    outcome: str = "n/a"
    message: str = ""
    reasons: list[str] = field(default_factory=list)
    output: str = ""
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass
class Run:
    """A finished command: exit code (-N for signal N), its output, wall time and peak resident memory."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float
    timed_out: bool


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a new user's shell: no voxel cap, no colours, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "MEDNETS_MAX_VOXELS"}
    env.update({"NO_COLOR": "1", "PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


def run_command(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Run:
    """Run `mednets argv` in `cwd` under the memory limit, killed after `timeout` seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        process = subprocess.Popen([str(MEDNETS), *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=err, preexec_fn=_limit_memory, start_new_session=True)  # fmt: skip
        timed_out = False
        while True:  # wait4 gives this child's own peak RSS
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Run(process.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   seconds, usage.ru_maxrss / 1024, timed_out)  # fmt: skip


def fingerprint(folder: Path) -> dict[Path, str]:
    """{file: sha256} of every regular file under `folder` (links not followed)."""
    prints = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            prints[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def unreadable(path: Path) -> str | None:
    """Why a written file cannot be read back in its format, or None."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            np.asarray(nib.load(str(path)).dataobj)
        elif name.endswith((".json", ".onnx.json")):
            json.loads(path.read_text())
        elif name.endswith((".yaml", ".yml")):
            yaml.safe_load(path.read_text())
        elif name.endswith((".png", ".jpg", ".jpeg")):
            with Image.open(path) as image:
                image.load()
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            tifffile.imread(path)
        elif name.endswith(".safetensors"):
            from safetensors.numpy import load_file

            load_file(path)
        elif name.endswith(".onnx"):
            import onnx

            onnx.checker.check_model(onnx.load(str(path)))
        elif name.endswith(".pt"):
            import zipfile

            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return "corrupt zip member"
        elif name.endswith(".html") and "</html>" not in path.read_text(errors="replace"):
            return "HTML without its end"
    except Exception as error:  # any failure to read back is the finding
        return f"{type(error).__name__}: {str(error)[:120]}"
    return None


_PROGRESS = re.compile(r"^\s*[\w ]+:\s+\d+%\|")
_WARNING = re.compile(r"\w*Warning: ")


@dataclass
class Messages:
    """The lines of a command's stderr that speak to the user, sorted by kind."""

    errors: list[str]  # `error:` and `internal error:` lines
    listed: list[str]  # indented items under an error line ending in ':' (a dataset's problems, each with its file)
    failed: list[str]  # `failed:` lines of a batch
    usage: str  # Click's boxed usage error, joined into one line
    other: list[str]  # anything else that is not progress or a warning


def parse_stderr(text: str) -> Messages:
    """Sort stderr's lines: errors, failures, Click's usage error box; progress bars and warnings dropped."""
    errors, listed, failed, usage, other = [], [], [], [], []
    in_warning = in_box = False
    for line in re.split(r"[\r\n]+", text):
        stripped = line.strip()
        if not stripped or _PROGRESS.match(line):
            continue
        if _WARNING.search(line):
            in_warning = True
            continue
        if in_warning and line.startswith(" "):
            continue
        in_warning = False
        if stripped.startswith("╭─ Error"):
            in_box = True
        elif stripped.startswith("╰"):
            in_box = False
        elif in_box:
            usage.append(stripped.strip("│ "))
        elif stripped.startswith(("error:", "internal error:")):
            errors.append(stripped)
        elif line.startswith("  ") and errors and errors[-1].endswith(":") and not other:
            listed.append(stripped)
        elif stripped.startswith("failed:"):
            failed.append(stripped)
        elif not stripped.startswith(("Usage:", "Try '")):
            other.append(stripped)
    return Messages(errors, listed, failed, " ".join(usage), other)


def last_line(text: str) -> str:
    """What a successful command said last (the usage line of a help page)."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip() and not _PROGRESS.match(line)]
    if lines and lines[0].startswith("Usage:"):
        return lines[0]
    lines = [line for line in lines if not line.startswith(("╭", "╰", "│"))]
    return lines[-1] if lines else ""


def classify(result: Result, spec: CaseSpec, run: Run, problems: list[str]) -> None:
    """Set `result.outcome`, `message` and `reasons` from the exit code, the output and the checks after the run."""
    expected, code, text = result.case.expected, run.code, run.stdout + run.stderr
    messages = parse_stderr(run.stderr)
    shown = messages.errors + messages.failed or ([messages.usage] if messages.usage else [])
    if not shown and code == 2 and run.stdout.lstrip().startswith("Usage:"):  # no arguments: the help page
        shown = [last_line(run.stdout)]
    result.message = shown[0] if shown else last_line(run.stdout) or last_line(run.stderr)
    if messages.listed:  # a header line and its list: show the first item
        more = f" (+{len(messages.listed) - 1} more)" if len(messages.listed) > 1 else ""
        result.message += f" {messages.listed[0]}{more}"
    crashes = []
    if run.timed_out:
        crashes.append(f"hang: killed after {result.case.timeout:.0f} s")
    elif code < 0:
        crashes.append(f"killed by signal {-code}")
    if "Traceback" in text:
        crashes.append("traceback")
    if re.search(r"MemoryError|Unable to allocate|bad_alloc|Cannot allocate memory", text):
        crashes.append("memory blow-up (hit the 8 GiB address-space limit)")
    if run.peak_rss_mb > RSS_LIMIT_MB:
        crashes.append(f"memory blow-up: peak RSS {run.peak_rss_mb:.0f} MB")
    if any(line.startswith("internal error:") for line in messages.errors):
        crashes.append("internal error (exit 1)")
    elif code == 1 and expected == "error":
        crashes.append(
            "exit 1 for a user error" + (" (each input failed instead of one refusal)" if messages.failed else "")
        )
    elif code == 1 and not messages.failed:
        crashes.append("exit 1 without a failed: line")
    if expected == "partial" and code == 2:
        crashes.append("batch aborted by one bad input (exit 2)")
    if (expected == "partial" and code == 1) or code == 0:
        missing = [p.name for p in spec.outputs if not p.exists()]
        if missing:
            crashes.append(f"good inputs not written: {', '.join(missing)}")
    if problems:
        result.outcome, result.reasons = "data lost", problems + crashes
    elif crashes:
        result.outcome, result.reasons = "crash", crashes
    elif (expected == "success" and code != 0) or (expected in ("error", "fails", "partial") and code == 0):
        result.outcome = "unexpected"
        result.reasons = ["refused a valid input" if code else "accepted without an error"]
    elif code == 0:
        result.outcome = "handled"
    elif not shown:
        result.outcome, result.reasons = "poor message", ["no error message"]
    elif spec.names and not any(name in " ".join(shown + messages.listed) for name in spec.names):
        result.outcome, result.reasons = "poor message", [f"names none of {list(spec.names)}"]
    elif len(messages.errors) > 1 or (messages.errors and messages.other):
        result.outcome = "poor message"
        result.reasons = [f"message spans {len(messages.errors) + len(messages.other)} lines"]
    else:
        result.outcome = "handled"


@contextmanager
def unwritable(folders: tuple[Path, ...]) -> Iterator[str | None]:
    """Make `folders` unwritable (root ignores chmod, so `chattr +i`); yields why it cannot be done, or None."""
    if not folders:
        yield None
        return
    as_root = os.geteuid() == 0
    command = (lambda flag, p: ["chattr", flag, str(p)]) if as_root else None
    done: list[Path] = []
    try:
        for folder in folders:
            if command is None:
                folder.chmod(0o555)
            elif subprocess.run(command("+i", folder), capture_output=True).returncode != 0:
                yield "running as root and chattr +i is not available here"
                return
            done.append(folder)
        yield None
    finally:
        for folder in done:
            if command is None:
                folder.chmod(0o755)
            else:
                subprocess.run(command("-i", folder), capture_output=True)


def run_case(index: int, case_: Case, fx: Fixtures, fixture_prints: dict[Path, str]) -> Result:
    """Prepare, run and classify one case in its own folder."""
    result = Result(case_, index)
    folder = fx.root / "cases" / f"{index:03d}"
    folder.mkdir(parents=True)
    ctx = Ctx(folder, fx)
    try:
        spec = case_.build(ctx)
    except Exception as error:  # a broken case is the probe's bug: show it, do not hide it
        result.outcome, result.reasons = "n/a", [f"probe could not prepare the case: {type(error).__name__}: {error}"]
        return result
    result.argv = spec.argv
    if spec.not_applicable:
        result.reasons = [spec.not_applicable]
        return result
    before = fingerprint(folder)
    with unwritable(spec.readonly) as why_not:
        if why_not:
            result.reasons = [why_not]
            return result
        run = run_command(spec.argv, folder, child_env(spec.env), case_.timeout)
    result.exit, result.output, result.seconds, result.peak_rss_mb = (
        run.code,
        run.stdout + run.stderr,
        run.seconds,
        run.peak_rss_mb,
    )
    problems = data_problems(folder, before, spec)
    problems += [f"the payload ran: {path.name} was created" for path in spec.forbidden if path.exists()]
    for path, digest in fixture_prints.items():
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"shared fixture changed: {path.relative_to(fx.root)}")
            fixture_prints[path] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""
    if spec.check is not None:
        problems += spec.check()
    classify(result, spec, run, problems)
    return result


def data_problems(folder: Path, before: dict[Path, str], spec: CaseSpec) -> list[str]:
    """Inputs changed or gone, and new files under final names that cannot be read back."""

    def allowed(path: Path) -> bool:
        return any(path == m or m in path.parents for m in spec.mutable)

    problems = []
    after = fingerprint(folder)
    for path, digest in before.items():
        if allowed(path):
            continue
        if path not in after:
            problems.append(f"input deleted: {path.relative_to(folder)}")
        elif after[path] != digest:
            problems.append(f"input overwritten: {path.relative_to(folder)}")
    for path in sorted(after.keys() - before.keys()):
        if path.name.startswith(".") or "tfevents" in path.name:
            continue
        why = unreadable(path)
        if why:
            problems.append(f"unreadable output {path.relative_to(folder)}: {why}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Fixtures, table, main


def make_fixtures(root: Path) -> Fixtures:
    """Phantoms, a tiny trained 3D UNet run with predictions, and a tiny denoising run, via the command line."""
    fx_dir = root / "fixtures"
    fx_dir.mkdir(parents=True)
    config = fx_dir / "tiny.yaml"
    train, test = fx_dir / "train", fx_dir / "test"
    data = {**TINY_CONFIG, "data": {**TINY_CONFIG["data"], "dataset": str(train)}}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    steps = [
        ["phantoms", "--out", str(train), "--n", "3", "--shape", "32", "32", "32", "--seed", "0"],
        ["phantoms", "--out", str(test), "--n", "2", "--shape", "32", "32", "32", "--seed", "1"],
        ["train", str(config), "--out", str(fx_dir / "run")],
        ["predict", "--run", str(fx_dir / "run"), "--input", str(test / "imagesTr"), "--out", str(fx_dir / "pred")],
        ["train", str(REPO / "configs" / "histo_denoise.yaml"), "--out", str(fx_dir / "drun"),
         *[arg for item in TINY_DENOISER for arg in ("--set", item)]],
    ]  # fmt: skip
    for argv in steps:
        run = run_command(argv, fx_dir, child_env(), 600)
        print(f"fixture: mednets {' '.join(argv[:2])} ... exit {run.code} in {run.seconds:.1f} s", file=sys.stderr)
        if run.code != 0:
            raise SystemExit(f"could not make the fixtures: mednets {' '.join(argv)}\n{run.stdout}{run.stderr}")
    listing = run_command(["--help"], fx_dir, child_env(), 60).stdout
    commands = tuple(re.findall(r"^│ (\w[\w-]*)\s{2,}", listing, flags=re.M))
    return Fixtures(root, train, test, config, fx_dir / "run", fx_dir / "pred", fx_dir / "drun", commands)


def add_help_cases(commands: tuple[str, ...]) -> None:
    """One `--help` case per command the CLI lists (all must exit 0)."""
    for command in ("", *commands):
        add(
            "9 cli",
            f"{command or 'mednets'} --help",
            "success",
            lambda ctx, c=command: CaseSpec([c, "--help"] if c else ["--help"]),
        )


def shorten(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def table(results: list[Result], root: Path) -> str:
    """The markdown table and the summary line."""
    rows = ["| # | category | case | expected | exit | outcome | what it now does |", "|---|---|---|---|---|---|---|"]
    for r in results:
        said = r.message.replace(str(root), "$ROOT")
        note = f" [{'; '.join(r.reasons)}]" if r.reasons else ""
        rows.append(f"| {r.index} | {r.case.category} | {shorten(r.case.name, 80)} | {r.case.expected} | "
                    f"{'' if r.exit is None else r.exit} | {r.outcome} | {shorten(said + note)} |")  # fmt: skip
    return "\n".join([*rows, "", summary(results)])


def summary(results: list[Result]) -> str:
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in OUTCOMES}
    tried = len(results) - counts["n/a"]
    return f"**{tried} cases tried**: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES) + "."


def details(results: list[Result], root: Path) -> str:
    """The command and full output of every case that is not handled."""
    parts = ["## Cases not handled", ""]
    for r in results:
        if r.outcome in ("handled", "n/a"):
            continue
        command = "mednets " + " ".join(f"'{a}'" if (" " in a or not a) else a for a in r.argv)
        output = "\n".join(line for line in re.split(r"[\r\n]+", r.output) if not _PROGRESS.match(line))
        parts += [f"### {r.index}. {r.case.name} ({r.outcome}: {'; '.join(r.reasons)})", "",
                  f"    cd $ROOT/cases/{r.index:03d} && {command.replace(str(root), '$ROOT')}", "",
                  f"exit {r.exit}, {r.seconds:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB", "", "```",
                  output.replace(str(root), "$ROOT").strip()[-6000:], "```", ""]  # fmt: skip
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the cases whose category or name contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1: this machine has 2 cores)")
    parser.add_argument("--markdown", type=Path, help="also write the table and details here (not RESULTS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder of fixtures and cases")
    args = parser.parse_args(argv)
    if args.markdown is not None and args.markdown.name == "RESULTS.md":
        parser.error("--markdown must not be RESULTS.md: copy the table there by hand")
    if not MEDNETS.is_file():
        parser.error(f"{MEDNETS} not found: run this script with the project's .venv/bin/python")

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mednets-bad-inputs-"))
    print(f"probe folder: {root}", file=sys.stderr)
    fx = make_fixtures(root)
    add_help_cases(fx.commands)
    chosen = [(i, c) for i, c in enumerate(CASES, 1) if not args.only or args.only in f"{c.category} {c.name}"]
    fixture_prints = {p: d for p, d in fingerprint(root / "fixtures").items() if "tfevents" not in p.name}

    def one(item: tuple[int, Case]) -> Result:
        result = run_case(*item, fx, fixture_prints)
        print(f"[{item[0]:3d}] {result.outcome:12s} {result.seconds:5.1f} s  {item[1].name}", file=sys.stderr)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, chosen))
    elapsed = time.monotonic() - started
    report = f"{table(results, root)} Probe time {elapsed / 60:.1f} min.\n\n{details(results, root)}"
    print(report)
    if args.markdown is not None:
        args.markdown.write_text(report + "\n")
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r.outcome in ("crash", "data lost") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
