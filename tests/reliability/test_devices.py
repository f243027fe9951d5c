"""A device this machine lacks, or a name torch does not know, is one typed error naming the option (issue 24)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mednets.cli import main
from mednets.devices import resolve_device
from mednets.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "unet3d_phantoms.yaml"


def test_cpu_and_auto_resolve_here() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(("name", "reason"), [("cuda", "no CUDA"), ("cuda:7", "no CUDA"), ("tpu", "unknown device"),
                                              ("gpu", "unknown device"), ("meta", "unsupported device")])  # fmt: skip
def test_a_missing_or_unknown_device_is_a_config_error_naming_its_source(name: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"^train\.device: .*{reason}.*got {name}\)$"):
        resolve_device(name, source="train.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_commands_given_a_missing_device_print_one_line_and_exit_2(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["report", "unet", "--input-size", "1", "32", "32", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    )
    assert main(["train", str(CONFIG), "--out", str(tmp_path / "run"), "--set", "train.device=cuda"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in errors] == ["--device", "train.device"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()  # refused before anything was written
