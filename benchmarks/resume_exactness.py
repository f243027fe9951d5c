"""Is `train --resume` exact? Uninterrupted runs against stopped-and-resumed ones, in fp32 and in CPU bf16.

For each precision: two uninterrupted runs of `--steps` steps (is the precision deterministic at
all?), and one run killed (SIGKILL) once its half-way checkpoint is written, then resumed with
`--resume`. All runs share one config (checkpoints every half run). Prints the largest absolute
weight difference of each comparison (0 means bit for bit) as a markdown table.

    flock /tmp/mednets-heavy.lock .venv/bin/python benchmarks/resume_exactness.py [--steps 24]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
MEDNETS = [sys.executable, "-c", "import sys; from mednets.cli import main; sys.exit(main())"]
TINY = ["model.name=unet3d", "model.overrides.base_channels=8", "data.patch_size=[32, 32, 32]", "data.augment=false",
        "data.val_fraction=0.25", "train.batch_size=2", "train.warmup_steps=2", "train.channels_last=true"]  # fmt: skip


def _argv(data: Path, run: Path, precision: str, steps: int, *flags: str) -> list[str]:
    sets = [*TINY, f"train.precision={precision}", f"train.max_steps={steps}", f"train.val_every={steps // 2}"]
    return [*MEDNETS, "train", str(REPO / "configs" / "unet3d_phantoms.yaml"), "--data", str(data), "--out", str(run),
            *flags, *[x for s in sets for x in ("--set", s)]]  # fmt: skip


def _train(data: Path, run: Path, precision: str, steps: int, *flags: str) -> dict[str, torch.Tensor]:
    subprocess.run(_argv(data, run, precision, steps, *flags), check=True, capture_output=True)
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def _saved_step(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)["state"]["step"])
    except Exception:  # not written yet, or being swapped in
        return 0


def _kill_at_half(data: Path, run: Path, precision: str, steps: int) -> None:
    process = subprocess.Popen(_argv(data, run, precision, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while _saved_step(run) < steps // 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if _saved_step(run) != steps // 2:
        raise SystemExit(f"the kill missed the half-way checkpoint ({_saved_step(run)} saved): rerun")


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mednets-resume-"))
    data = root / "data"
    subprocess.run([*MEDNETS, "phantoms", "--out", str(data), "--n", "4", "--shape", "32", "32", "32"], check=True,
                   capture_output=True)  # fmt: skip
    print("| precision | uninterrupted vs uninterrupted | uninterrupted vs stopped at half and resumed |")
    print("|---|---|---|")
    for precision in ("fp32", "bf16"):
        first = _train(data, root / f"{precision}_a", precision, args.steps)
        second = _train(data, root / f"{precision}_b", precision, args.steps)
        _kill_at_half(data, root / f"{precision}_r", precision, args.steps)
        resumed = _train(data, root / f"{precision}_r", precision, args.steps, "--resume")
        print(f"| {precision} | {_largest_difference(first, second):.3g} | {_largest_difference(first, resumed):.3g} |")


if __name__ == "__main__":
    main()
