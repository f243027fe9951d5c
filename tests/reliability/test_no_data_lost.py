"""No command overwrites a user's file, replaces a run silently, or spins without making progress (issue 24)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mednets.config import load_config
from mednets.engine.api import load_run, predict_paths
from mednets.engine.denoise import denoise_paths
from mednets.engine.training import run_training
from mednets.errors import ConfigError, InvalidInputError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_DENOISER = ["train.max_steps=1", "train.val_every=1", "train.batch_size=2", "model.overrides.base_channels=4",
                 "data.patch_size=[32, 32]"]  # fmt: skip


def _scan(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read: the outputs are checked before anything is read or written")
    return path


def test_predict_refuses_an_output_folder_that_would_replace_an_input(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    labels_like_output = _scan(scans / "case.nii.gz")  # `<case>.nii.gz` is also the label map's name
    with pytest.raises(InvalidInputError, match="an output would replace an input"):
        predict_paths(None, [scans], scans, progress=False)  # type: ignore[arg-type]
    assert labels_like_output.read_bytes().startswith(b"not read")


def test_predict_refuses_two_inputs_that_would_share_an_output(tmp_path: Path) -> None:
    first, second = _scan(tmp_path / "a" / "case_0000.nii.gz"), _scan(tmp_path / "b" / "case.nrrd")
    with pytest.raises(InvalidInputError, match="two inputs would write the same output") as caught:
        predict_paths(None, [first, second], tmp_path / "out", progress=False)  # type: ignore[arg-type]
    assert str(first) in str(caught.value) and str(second) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_denoise_refuses_to_write_over_its_input(tmp_path: Path) -> None:
    image = tmp_path / "slide.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(image)
    before = image.read_bytes()
    with pytest.raises(InvalidInputError, match="an output would replace an input"):
        denoise_paths(None, image, image, progress=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="an output would replace an input"):
        denoise_paths(None, tmp_path, tmp_path, progress=False)  # type: ignore[arg-type]
    assert image.read_bytes() == before


def test_training_into_an_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "histo_denoise.yaml", TINY_DENOISER)
    run_training(config, tmp_path / "run", progress=False)
    weights = (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run") as caught:
        run_training(config, tmp_path / "run", progress=False)
    assert "--resume" in str(caught.value) and "--overwrite" in str(caught.value)
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").read_bytes() == weights  # untouched
    result = run_training(config, tmp_path / "run", overwrite=True, progress=False)
    assert result["state"]["step"] == 1
    with pytest.raises(ConfigError, match="not a segmentation run"):  # predict refuses it before reading any input
        load_run(tmp_path / "run")


def test_resume_without_a_checkpoint_starts_the_run_and_keeps_a_changed_dataset_out(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "histo_denoise.yaml", TINY_DENOISER)
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)  # what a run killed before its first checkpoint leaves
    (run / "metrics.csv").write_text("step\n")
    assert run_training(config, run, resume=True, progress=False)["state"]["step"] == 1  # nothing to resume: starts
    assert run_training(config, tmp_path / "new", resume=True, progress=False)["state"]["step"] == 1  # no folder yet
    longer = load_config(CONFIGS / "histo_denoise.yaml", [*TINY_DENOISER, "train.max_steps=2"])
    assert run_training(longer, run, resume=True, progress=False)["state"]["step"] == 2  # a checkpoint: continues
    stride = load_config(
        CONFIGS / "histo_denoise.yaml", [*TINY_DENOISER, "train.max_steps=3", "data.patch_size=[48, 48]"]
    )
    with pytest.raises(ConfigError, match=r"preprocessing\.json"):  # other preprocessing: not the same run
        run_training(stride, run, resume=True, progress=False)


def test_a_batch_larger_than_the_training_samples_is_an_error_not_an_endless_loop(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "histo_denoise.yaml", [*TINY_DENOISER, "train.batch_size=100000"])
    with pytest.raises(ConfigError, match="no batch can be formed") as caught:
        run_training(config, tmp_path / "run", progress=False)
    assert "train.batch_size" in str(caught.value)


@pytest.mark.parametrize("name", ["../outside", "/abs/path", "a/b", "..", ""])
def test_a_run_name_must_be_one_path_component(name: str) -> None:
    with pytest.raises(ConfigError, match="one path component"):
        load_config(None, [f"name={name!r}" if name else "name=''"])


@pytest.mark.parametrize(
    ("errno", "reason"), [(28, "No space left on device"), (13, "Permission denied"), (30, "Read-only file system")]
)
def test_a_full_disk_or_read_only_output_loses_one_case_whole_and_the_others_go_on(
    errno: int, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from mednets.data.io import InputCase
    from mednets.data.volume import Volume
    from mednets.engine import api, inference, outputs

    scans = [_scan(tmp_path / "in" / f"case{i}.nii.gz") for i in range(3)]
    monkeypatch.setattr(InputCase, "read", lambda case: Volume(np.zeros((4, 4, 4), np.int16)))
    monkeypatch.setattr(api, "predict_image",
                        lambda run, volume, **_: inference.Prediction(np.ones((4, 4, 4), np.uint8), {"liver": {}}))  # fmt: skip
    write_text = outputs.atomic_write_text

    def disk_full_for_case1(path: Path, text: str) -> Path:
        if Path(path).name == "case1.json":
            raise OSError(errno, reason, str(path))
        return write_text(path, text)

    monkeypatch.setattr(outputs, "atomic_write_text", disk_full_for_case1)
    run = SimpleNamespace(spec=SimpleNamespace(name="toy"), run_dir=tmp_path, structures={"liver": 1},
                          preprocessing=SimpleNamespace(orientation=None))  # fmt: skip
    result = predict_paths(run, scans, tmp_path / "out", progress=False)  # type: ignore[arg-type]
    assert [p.name for p in result["written"]] == ["case0.nii.gz", "case2.nii.gz"]
    assert len(result["failed"]) == 1 and result["failed"][0][1].startswith(f"{scans[1]}: {reason}")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [  # case1's label map and colours are gone
        "case0.ctbl",
        "case0.json",
        "case0.nii.gz",
        "case2.ctbl",
        "case2.json",
        "case2.nii.gz",
    ]


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_a_header_claiming_more_voxels_than_the_file_holds_is_refused_before_reading(
    tmp_path: Path, ending: str
) -> None:
    import gzip

    import nibabel as nib

    from mednets.data.io import read_volume

    header = nib.Nifti1Header()
    header.set_data_shape((1200, 1200, 1200))  # 3.4 GB of int16 claimed...
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    data = header.binaryblock + b"\0" * 4 + np.zeros(8, np.int16).tobytes()  # ...by a file of 364 bytes
    path = tmp_path / f"bomb{ending}"
    path.write_bytes(gzip.compress(data) if ending == ".nii.gz" else data)
    with pytest.raises(InvalidInputError, match="cannot fit in the file") as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


def test_an_rgb_nifti_is_a_typed_error_naming_the_file(tmp_path: Path) -> None:
    import nibabel as nib

    from mednets.data.io import read_volume

    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.Nifti1Image(rgb, np.eye(4)).to_filename(path)
    with pytest.raises(InvalidInputError, match="plain numbers of one channel") as caught:
        read_volume(path)
    assert str(path) in str(caught.value)
