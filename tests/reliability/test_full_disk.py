"""A full disk (a small tmpfs) under predict and train: a clear error, nothing half-written (issue 24).

The tmpfs is mounted in a private mount namespace (`unshare --user --map-root-user --mount`), so the
test needs neither root nor changes to the machine; without user namespaces it is skipped. The
tmpfs goes with the namespace, so what the command left on it is copied out for the checks.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from file_checks import assert_cases_whole, assert_nothing_half_written

from mednets.data.phantoms import PhantomConfig, write_phantom_dataset

MEDNETS = [sys.executable, "-c", "import sys; from mednets.cli import main; sys.exit(main())"]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "unet3d_phantoms.yaml"
TINY = ["data.patch_size=[16, 32, 32]", "data.val_fraction=0.34", "train.val_every=1", "train.precision=fp32"]


def _on_small_disk(disk: Path, kilobytes: int, argv: list[str], left: Path) -> subprocess.CompletedProcess:
    """Run `argv` with a `kilobytes` tmpfs on `disk` (seen by that command only); copy what it leaves to `left`."""
    disk.mkdir(exist_ok=True)
    left.mkdir(exist_ok=True)
    script = (f"mount -t tmpfs -o size={kilobytes}k tmpfs {shlex.quote(str(disk))} && {shlex.join(argv)}; "
              f"status=$?; cp -a {shlex.quote(str(disk))}/. {shlex.quote(str(left))}/; exit $status")  # fmt: skip
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, encoding="utf-8", timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("disk")
    if shutil.which("unshare") is None or _on_small_disk(root / "d", 64, ["true"], root / "l").returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    return write_phantom_dataset(root / "data", 3, seed=1, config=PhantomConfig(shape=(16, 32, 32)))


def _train(data: Path, run: Path, *overrides: str) -> list[str]:
    sets = [x for o in [*TINY, *overrides] for x in ("--set", o)]
    return [*MEDNETS, "train", str(CONFIG), "--data", str(data), "--out", str(run), *sets]


def _one_line_error(done: subprocess.CompletedProcess, code: int) -> str:
    """The output of a command that failed with exit `code` and no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert "Traceback" not in output
    return output


@pytest.mark.slow
def test_predict_onto_a_full_disk_fails_the_cases_that_do_not_fit_and_half_writes_nothing(
    data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    subprocess.run(_train(data, run, "model.overrides.base_channels=4", "train.max_steps=1"), check=True,
                   capture_output=True)  # fmt: skip
    inputs = sorted((data / "imagesTr").iterdir())
    argv = [*MEDNETS, "predict", "--run", str(run), "--input", str(data / "imagesTr"), "--out", str(tmp_path / "disk")]
    # 12 KiB: three 4 KiB pages, room for one case's two files, not for three cases.
    done = _on_small_disk(tmp_path / "disk", 12, argv, tmp_path / "left")
    message = _one_line_error(done, 1)  # 1: some inputs failed, each reported
    assert "No space left on device" in message and "imagesTr/phantom_00" in message  # the reason and the case
    assert "inputs failed" in message
    assert_nothing_half_written(tmp_path / "left")
    written = assert_cases_whole(tmp_path / "left")
    assert len(written) < 3
    assert not [p for p in (tmp_path / "left").iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert sorted((data / "imagesTr").iterdir()) == inputs


@pytest.mark.slow
def test_training_onto_a_full_disk_stops_with_one_line_and_leaves_no_partial_checkpoint(
    data: Path, tmp_path: Path
) -> None:
    # 256 KiB: room for the run's records, not for the default 3D UNet's 22 MB checkpoint.
    done = _on_small_disk(tmp_path / "disk", 256, _train(data, tmp_path / "disk" / "run", "train.max_steps=2"),
                          tmp_path / "left")  # fmt: skip
    message = _one_line_error(done, 2)
    assert "No space left on device" in message and "cannot write the checkpoint" in message
    run = tmp_path / "left" / "run"
    assert_nothing_half_written(run)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())  # no copy, whole or half
