"""ONNX export: onnxruntime equals PyTorch fp32, dynamic sizes where claimed, atomic files, typed errors, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml

from mednets.cli import main
from mednets.config import load_config
from mednets.engine.checkpoints import save_checkpoint
from mednets.engine.export import SADAAN_OUTPUTS, ExportError, export_onnx, export_run, sidecar_path
from mednets.engine.inference import load_run
from mednets.errors import CheckpointError, ConfigError, UnknownNameError
from mednets.models import create_model, get_model_spec, list_models
from mednets.models.kernels import BF16SafeConv3d

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOLERANCE = 1e-4
FIXED_SIZE = {"lhanet_lightweight", "lhanet_standard", "sadaan", "sadaan_fast"}  # no dynamic spatial axes
# The registry's tiny UNet keeps the seed's width (124 MB of weights to serialise): a narrower one is enough here.
NARROWER = {"unet": {"base_channels": 8}}


def tiny(name: str, size: tuple[int, ...] | None = None, batch: int = 1) -> tuple[torch.nn.Module, torch.Tensor]:
    """The registry's tiny build of `name` and an input in [0, 1] (default: its tiny input size)."""
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = create_model(name, **spec.tiny_overrides, **NARROWER.get(name, {})).eval()
    return model, torch.rand(batch, spec.in_channels, *(size or spec.tiny_input_size))


def torch_outputs(model: torch.nn.Module, x: torch.Tensor, task: str) -> dict[str, np.ndarray]:
    """PyTorch fp32 outputs under the exported names (SADAAn without gating)."""
    with torch.no_grad():
        if task == "absence_segmentation":
            outputs = model.eval()(x, gating=False)
            return {name: outputs[name].numpy() for name in SADAAN_OUTPUTS}
        return {"denoised" if task == "denoising" else "logits": model.eval()(x).numpy()}


def onnx_outputs(path: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": x.numpy()}), strict=True))


def max_differences(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    assert set(got) == set(expected)
    return {name: float(np.abs(got[name] - expected[name]).max()) for name in expected}


@pytest.mark.parametrize("name", list_models())
def test_onnxruntime_equals_pytorch_fp32_on_every_output(name: str, tmp_path: Path) -> None:
    spec = get_model_spec(name)
    model, x = tiny(name)
    model.train()  # exported in eval mode all the same (LHA-Net's deep-supervision dict is train-mode only)
    path = export_onnx(model, x, tmp_path / f"{name}.onnx", model_name=name)
    assert model.training  # the caller's model is left as it was

    differences = max_differences(torch_outputs(model, x, spec.task), onnx_outputs(path, x))
    assert max(differences.values()) <= TOLERANCE, differences
    record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    assert record["model"] == name and record["opset"] == 17 and record["input"]["shape"] == list(x.shape)
    assert record["max_abs_diff"] <= TOLERANCE and record["second_check"]["max_abs_diff"] <= TOLERANCE
    assert record["second_check"]["input_shape"][0] == 2  # the batch axis is dynamic for every model
    assert (record["onnx_version"], record["onnxruntime_version"]) == (onnx.__version__, onnxruntime.__version__)
    if name in FIXED_SIZE:
        assert record["spatial_multiple"] is None
    # the graph's input axes are what the sidecar says: named where dynamic, the example's size where fixed
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    claimed = record["dynamic_axes"]["image"]
    for axis, dim in enumerate(dims):
        assert (dim.dim_param, dim.dim_value) == (
            (claimed[str(axis)], 0) if str(axis) in claimed else ("", x.shape[axis])
        )


def test_sadaan_with_presence_evidence_exports_with_parity(tmp_path: Path) -> None:
    """The configs' SADAAn reads its painted volume into the presence decision: the graph must too."""
    spec = get_model_spec("sadaan_fast")
    torch.manual_seed(0)
    model = create_model("sadaan_fast", **spec.tiny_overrides, presence_evidence=True).eval()
    x = torch.rand(1, 1, *spec.tiny_input_size)
    path = export_onnx(model, x, tmp_path / "sadaan_evidence.onnx", model_name="sadaan_fast")
    differences = max_differences(torch_outputs(model, x, spec.task), onnx_outputs(path, x))
    assert max(differences.values()) <= TOLERANCE, differences


@pytest.mark.parametrize(
    "name, size",
    [("unet", (32, 48)), ("unet3d", (16, 32, 32)), ("dynunet", (16, 32, 32)), ("histo_autoencoder", (32, 48))],
)
def test_dynamic_graphs_take_other_sizes_and_batches(name: str, size: tuple[int, ...], tmp_path: Path) -> None:
    model, x = tiny(name, size)
    path = export_onnx(model, x, tmp_path / "model.onnx", model_name=name)
    assert json.loads(sidecar_path(path).read_text(encoding="utf-8"))["spatial_multiple"] == 16

    _, other = tiny(name, (size[0] + 16, *size[1:-1], size[-1] + 32), batch=3)  # not the export's own second check
    differences = max_differences(torch_outputs(model, other, get_model_spec(name).task), onnx_outputs(path, other))
    assert max(differences.values()) <= TOLERANCE, differences


def test_bf16_model_exported_under_autocast_gives_an_fp32_graph(tmp_path: Path) -> None:
    model, x = tiny("dynunet")
    assert any(isinstance(module, BF16SafeConv3d) for module in model.modules())
    model = model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        path = export_onnx(model, x.to(torch.bfloat16), tmp_path / "model.onnx")

    graph = onnx.load(str(path)).graph
    low_precision = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}
    assert not low_precision & {tensor.data_type for tensor in graph.initializer}
    assert not low_precision & {a.i for node in graph.node if node.op_type == "Cast" for a in node.attribute}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert next(model.parameters()).dtype == torch.bfloat16  # the caller's model is left as it was


def test_parity_failure_writes_nothing_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda self, *a, **k: [o + 1 for o in run(self, *a, **k)])
    model, x = tiny("sadaan_fast")
    with pytest.raises(ExportError, match="onnxruntime disagrees with PyTorch fp32"):
        export_onnx(model, x, out, model_name="sadaan_fast")
    assert out.read_bytes() == b"previous export"
    assert sorted(tmp_path.iterdir()) == [out]


def test_failure_while_writing_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.onnx"
    write_bytes = Path.write_bytes

    def write_half_then_fail(path: Path, data: bytes) -> int:
        write_bytes(path, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    model, x = tiny("sadaan_fast")
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, x, out, model_name="sadaan_fast")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_missing_checkpoint_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match=r"format: unknown export format \(expected one of \['onnx'\]"):
        export_run(tmp_path, tmp_path / "model.tflite", format="tflite")
    with pytest.raises(CheckpointError, match="no checkpoint in run folder") as error:
        export_run(tmp_path, tmp_path / "model.onnx")
    assert str(tmp_path / "checkpoints") in str(error.value)


def test_missing_onnxruntime_names_the_export_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model, x = tiny("sadaan_fast")
    with pytest.raises(ExportError, match=r"onnxruntime is not installed.*mednets\[export\]"):
        export_onnx(model, x, tmp_path / "model.onnx")


def test_unsupported_opset_and_folder_output_are_config_errors(tmp_path: Path) -> None:
    model, x = tiny("sadaan_fast")
    with pytest.raises(ConfigError, match="opset: unsupported ONNX opset"):
        export_onnx(model, x, tmp_path / "model.onnx", opset=9)
    with pytest.raises(ConfigError, match="is a folder"):
        export_onnx(model, x, tmp_path)


def test_export_command_writes_a_checked_graph_of_the_trained_run(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tiny_run  # dynunet and sadaan_fast (tests/engine/conftest.py)
    name = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"]
    out = tmp_path / "model.onnx"
    assert main(["export", "--run", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "max abs difference" in printed

    record = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    preprocessing = json.loads((run_dir / "preprocessing.json").read_text(encoding="utf-8"))
    assert record["model"] == name and record["run"] == str(run_dir) and record["checkpoint"] == "best"
    assert record["input"]["shape"][2:] == (preprocessing["grid"] or preprocessing["patch_size"])
    run = load_run(run_dir)
    x = torch.rand(*record["input"]["shape"])
    differences = max_differences(torch_outputs(run.model, x, get_model_spec(name).task), onnx_outputs(out, x))
    assert max(differences.values()) <= TOLERANCE, differences


def test_export_command_reports_a_bad_format_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--run", str(tmp_path), "--format", "tflite", "--out", str(tmp_path / "model.onnx")]) == 2
    assert "format: unknown export format" in capsys.readouterr().err


def test_denoising_run_exports_at_its_tile_size(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "histo_denoise.yaml", ["model.overrides.base_channels=4"])
    torch.manual_seed(0)
    model = create_model(config.model.name, **config.model.overrides)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "last", model, {"step": 0}, config)
    (run_dir / "preprocessing.json").write_text(json.dumps({"spatial_dims": 2, "task": "denoising", "tile_size": 32}))

    path = export_run(run_dir, tmp_path / "histo.onnx")
    record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    assert record["model"] == "histo_autoencoder" and record["checkpoint"] == "last"
    assert record["outputs"] == {"denoised": [1, 3, 32, 32]} and record["max_abs_diff"] <= TOLERANCE
