"""kill -9 at random points of training, prediction, dataset writing and checkpoint saving (issue 24).

After every kill: no file under a final name is partial (each one parses completely; interrupted
writes leave only hidden temporary names), and the operation can go on (`train --resume`, a rerun of
`predict`, `phantoms --overwrite`). In the end the results equal those of an uninterrupted run:
resumed fp32 training ends with the same weights, bit for bit.

CI kills each operation `MEDNETS_KILLS` times (default 2); `MEDNETS_KILLS=20 pytest
tests/reliability/test_kill.py` is the run recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
import torch
from file_checks import assert_cases_whole, assert_nothing_half_written
from safetensors.torch import load_file

from mednets.data.phantoms import PhantomConfig, write_phantom_dataset
from mednets.engine.checkpoints import recover_checkpoint

KILLS = int(os.environ.get("MEDNETS_KILLS", "2"))
MEDNETS = [sys.executable, "-c", "import sys; from mednets.cli import main; sys.exit(main())"]
TRAIN_OVERRIDES = ["model.name=unet3d", "model.overrides.base_channels=4", "data.patch_size=[16, 32, 32]",
                   "data.val_fraction=0.34", "data.num_workers=0", "train.max_steps=10", "train.val_every=2",
                   "train.batch_size=2", "train.precision=fp32", "train.best_metric=val/dice",
                   "train.best_mode=max"]  # fmt: skip


def _run(argv: list[str], cwd: Path) -> float:
    """Run a command to its end, asserting success; returns its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return time.perf_counter() - start


def _kill_after(argv: list[str], cwd: Path, seconds: float) -> None:
    """Start a command and SIGKILL its process group after `seconds` (if it is still running)."""
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data"), 4, seed=1, config=PhantomConfig(shape=(16, 32, 32)))


@pytest.fixture(scope="module")
def reference_run(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted fp32 training run and its wall time."""
    root = tmp_path_factory.mktemp("reference")
    seconds = _run(_train_argv(phantoms, root / "run"), root)
    return root / "run", seconds


def _train_argv(data: Path, run: Path, *extra: str) -> list[str]:
    sets = [item for override in TRAIN_OVERRIDES for item in ("--set", override)]
    return [*MEDNETS, "train", str(Path(__file__).resolve().parents[2] / "configs" / "unet3d_phantoms.yaml"),
            "--data", str(data), "--out", str(run), *sets, *extra]  # fmt: skip


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_to_the_uninterrupted_weights(
    phantoms: Path, reference_run: tuple[Path, float], tmp_path: Path
) -> None:
    reference, seconds = reference_run
    rng = random.Random(0)
    run = tmp_path / "run"
    for kill in range(KILLS):
        _kill_after(_train_argv(phantoms, run, *(["--resume"] if kill else [])), tmp_path, rng.uniform(0, seconds))
        assert_nothing_half_written(run)
    _run(_train_argv(phantoms, run, "--resume"), tmp_path)  # always possible, even before the first checkpoint
    assert_nothing_half_written(run)
    expected, got = _weights(reference / "checkpoints" / "last"), _weights(run / "checkpoints" / "last")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
def test_prediction_killed_at_random_points_leaves_whole_cases_and_a_rerun_completes(
    phantoms: Path, reference_run: tuple[Path, float], tmp_path: Path
) -> None:
    run = reference_run[0]
    argv = [*MEDNETS, "predict", "--run", str(run), "--input", str(phantoms / "imagesTr")]
    seconds = _run([*argv, "--out", str(tmp_path / "reference")], tmp_path)
    rng = random.Random(1)
    out = tmp_path / "out"
    for _ in range(KILLS):
        _kill_after([*argv, "--out", str(out)], tmp_path, rng.uniform(0, seconds))
        assert_nothing_half_written(out)
        assert_cases_whole(out)
    _run([*argv, "--out", str(out)], tmp_path)
    for expected in (tmp_path / "reference").glob("*.nii.gz"):
        assert (nib.load(out / expected.name).get_fdata() == nib.load(expected).get_fdata()).all()


@pytest.mark.slow
def test_dataset_writing_killed_at_random_points_leaves_no_usable_half_dataset(tmp_path: Path) -> None:
    argv = [*MEDNETS, "phantoms", "--n", "4", "--shape", "24,32,32", "--seed", "3"]
    seconds = _run([*argv, "--out", str(tmp_path / "reference")], tmp_path)
    rng = random.Random(2)
    out = tmp_path / "out"
    for kill in range(KILLS):
        _kill_after([*argv, "--out", str(out), *(["--overwrite"] if kill else [])], tmp_path, rng.uniform(0, seconds))
        assert_nothing_half_written(out)
        if (out / "dataset.json").is_file():  # written last: its presence means every case is there
            assert len(list((out / "labelsTr").glob("*.nii.gz"))) == 4
    _run([*argv, "--out", str(out), "--overwrite"], tmp_path)
    for expected in (tmp_path / "reference").rglob("*.nii.gz"):
        assert (out / expected.relative_to(tmp_path / "reference")).read_bytes() == expected.read_bytes()


SAVE_LOOP = """
import sys, torch
from mednets.config import load_config
from mednets.engine.checkpoints import save_checkpoint
model = torch.nn.Conv3d(1, 64, 5)
config = load_config(None, [])
for step in range(1, 10**6):
    torch.nn.init.constant_(model.weight, step)
    save_checkpoint(sys.argv[1], model, {"step": step}, config)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_checkpoint_writing_killed_at_random_points_always_leaves_one_whole_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(3)
    folder = tmp_path / "checkpoints" / "last"
    for _ in range(max(KILLS, 5)):
        log = tmp_path / "steps.txt"
        with log.open("w") as handle:
            process = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(folder)], stdout=handle,
                                       start_new_session=True)  # fmt: skip
            while not log.read_text().strip() and process.poll() is None:  # saving has begun
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.5))
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        completed = int(log.read_text().split()[-1])
        recover_checkpoint(folder)
        step = torch.load(folder / "trainer_state.pt", weights_only=True)["step"]
        assert step in (completed, completed + 1)  # the last finished save, or one finished but not yet printed
        assert torch.all(load_file(folder / "model.safetensors")["weight"] == step)  # weights and state agree
