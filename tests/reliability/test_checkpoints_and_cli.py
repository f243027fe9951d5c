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


class _Payload:
    """Unpickling this runs `touch marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_a_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    import torch

    from mednets.errors import CheckpointError

    _save(tmp_path / "last", 1)
    torch.save({"state": _Payload(tmp_path / "ran")}, tmp_path / "last" / "trainer_state.pt")
    with pytest.raises(
        CheckpointError, match=r"trainer_state\.pt: unreadable trainer state: the safe loader"
    ) as caught:
        load_trainer_state(tmp_path / "last")
    assert "\n" not in str(caught.value) and not (tmp_path / "ran").exists()


def test_a_yaml_python_tag_is_refused_without_running(tmp_path: Path, capsys) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(f'name: !!python/object/apply:os.system ["touch {tmp_path / "ran"}"]\n')
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert "invalid YAML: could not determine a constructor" in error and "\n" not in error
    assert not (tmp_path / "ran").exists()


def test_predict_refuses_an_output_folder_that_is_a_file(tmp_path: Path) -> None:
    from mednets.engine.inference import check_output_folder
    from mednets.errors import ConfigError

    (tmp_path / "result.nii.gz").write_bytes(b"an earlier result")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "result.nii.gz")
