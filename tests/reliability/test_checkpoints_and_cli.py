"""Checkpoints survive a crash inside their swap and keep the usual file mode; the CLI never shows a traceback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from torch import nn

from mednets.atomic import UMASK
from mednets.cli import main
from mednets.config import ExperimentConfig
from mednets.engine import checkpoints
from mednets.engine.checkpoints import load_trainer_state, recover_checkpoint, save_checkpoint


def _save(folder: Path, step: int) -> None:
    save_checkpoint(folder, nn.Linear(2, 2), {"state": {"step": step}}, ExperimentConfig())


def test_a_crash_inside_the_swap_leaves_a_checkpoint_to_resume_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "checkpoints" / "last"
    _save(folder, 1)
    rename = Path.rename

    def crash_before_the_new_copy_is_in_place(self: Path, target: Path) -> Path:
        if self.name == ".last.tmp":
            raise KeyboardInterrupt  # the process dies between the two renames
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_before_the_new_copy_is_in_place)
    with pytest.raises(KeyboardInterrupt):
        _save(folder, 2)
    monkeypatch.undo()
    assert not folder.exists()  # only the hidden copies are left
    assert recover_checkpoint(folder) and load_trainer_state(folder)["state"]["step"] == 2  # the newer, complete one
    assert not recover_checkpoint(folder)  # nothing left to do


def test_an_incomplete_new_copy_gives_back_the_old_one(tmp_path: Path) -> None:
    folder = tmp_path / "last"
    _save(folder, 1)
    folder.rename(tmp_path / ".last.old")  # the swap had begun...
    (tmp_path / ".last.tmp").mkdir()  # ...with a new copy that never got its files
    assert recover_checkpoint(folder) and load_trainer_state(folder)["state"]["step"] == 1


def test_checkpoint_files_get_the_usual_permissions(tmp_path: Path) -> None:
    _save(tmp_path / "last", 1)
    for name in (checkpoints.MODEL_FILE, "trainer_state.pt", "config.yaml"):
        mode = stat.S_IMODE(os.stat(tmp_path / "last" / name).st_mode)
        assert mode == 0o666 & ~UMASK, (name, oct(mode))


def test_unexpected_errors_are_one_line_with_an_exit_code(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("something nobody foresaw")

    monkeypatch.setattr("mednets.models.list_models", broken)
    assert main(["models"]) == 1
    error = capsys.readouterr().err
    assert "internal error: TypeError: something nobody foresaw" in error and "Traceback" not in error
    with pytest.raises(TypeError):
        main(["--debug", "models"])


def test_file_system_errors_are_user_errors(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_such_config.yaml"
    assert main(["train", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
