"""The CLI: listing models, the measured report, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mednets.cli import main
from mednets.cli_options import join_multi_value_options


def test_models_lists_seed_models_with_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, count in [
        ("unet", "31,037,633"),
        ("histo_autoencoder", "34,544,963"),
        ("deep_histo_autoencoder", "133,288,259"),
    ]:
        assert re.search(rf"{name}\s.*{count}", out), f"{name} with {count} missing"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    commands = re.findall(r"^│ (\w[\w-]*)\s{2,}", capsys.readouterr().out, flags=re.M)
    assert "models" in commands and "report" in commands
    for command in commands:
        assert main([command, "--help"]) == 0, command
        text = capsys.readouterr().out
        assert "Usage" in text
        # value names as click writes them (PATH, INT, CONFIG), never Python types or braces
        assert not re.search(r"<(path|bool|int|float|str|text|list\[)", text, flags=re.I), (command, text)
        assert "{" not in text.split("Usage:")[1].splitlines()[0], command


def test_help_shows_the_value_names_and_brackets_of_the_options(capsys) -> None:
    assert main(["predict", "--help"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"--run\s+PATH", text) and re.search(r"--roi-subset\s+NAME\.\.\.", text)
    assert re.search(r"--split-masks\s+Also write", text)  # a flag takes no value
    assert main(["report", "--help"]) == 0
    assert "C [D] H W" in capsys.readouterr().out  # brackets kept, not read as markup


def test_user_error_is_one_line_with_exit_code_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["report", "no_such_model", "--input-size", "3", "64", "64", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown model" in err and "'no_such_model'" in err and "unet" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    from mednets.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        main(["--debug", "report", "no_such_model", "--input-size", "3", "64", "64", "--out", str(tmp_path)])


def test_input_size_that_does_not_fit_the_model_is_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["report", "unet", "--input-size", "1", "64", "64", "--out", str(tmp_path)]) == 2
    assert "expected 3 channels and 2 spatial sizes" in capsys.readouterr().err


def test_multi_value_options_are_joined() -> None:
    argv = ["report", "unet", "--input-size", "3", "64", "64", "--out", "x"]
    assert join_multi_value_options(argv) == ["report", "unet", "--input-size", "3,64,64", "--out", "x"]


def test_version_and_short_help(capsys) -> None:
    from mednets import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mednets {__version__}"
    assert main(["-h"]) == 0 and "Usage: mednets" in capsys.readouterr().out
    assert main(["predict", "-h"]) == 0 and "--input" in capsys.readouterr().out


def test_report_takes_constructor_overrides_and_refuses_unknown_ones(capsys, tmp_path: Path) -> None:
    code = main(["report", "unet", "--set", "nonsense=1", "--input-size", "3", "64", "64", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and "nonsense" in error and "bilinear" in error and len(error.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
