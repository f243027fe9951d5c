"""Export trained models to ONNX, checked against PyTorch fp32 with onnxruntime.

`mednets export --run RUN --format onnx OUT.onnx` calls `export_run`, which loads the run's model
and exports it at the run's patch size (or grid, or tile) with `export_onnx`:

1. a copy of the model in fp32 eval mode, autocast off (so `BF16SafeConv3d` and every other layer
   export as plain fp32 operators), is traced by the TorchScript exporter (`torch.onnx.export`,
   `dynamo=False`: the dynamo exporter needs onnxscript, which the `[export]` extra does not
   install); LHA-Net's adaptive pooling needs its own symbolic, see `_traceable`;
2. models returning dictionaries are wrapped to export named tensors (SADAAn with gating off:
   `segmentation_logits`, `segmentation_probs`, `presence_probs`, `confidence_scores`);
3. the batch axis is dynamic; spatial axes are dynamic for fully convolutional models (UNet,
   DynUNet, the autoencoders: sizes that are multiples of their total stride), fixed for LHA-Net
   (its resampling sizes are computed from the input size and traced as constants) and SADAAn
   (its position prior is absolute);
4. `onnx.checker` validates the graph; onnxruntime runs it on the example input and on a second
   input (batch 2, and another spatial size where the axes are dynamic), and every output is
   compared with PyTorch's (max abs difference, at most `tolerance`);
5. only then are `OUT.onnx` and its sidecar `OUT.onnx.json` (model, shapes, opset, differences,
   versions) written, each atomically: a failed export leaves the previous files (or none), never
   a partial one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from mednets.atomic import atomic_write_bytes, atomic_write_text, check_not_inputs
from mednets.engine.run import RunFolder
from mednets.errors import ConfigError, MednetsError, UnknownNameError
from mednets.models import get_model_spec, list_models
from mednets.models.base import input_channels
from mednets.tasks import AbsenceSegmentationTask, task_type

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "INPUT_NAME",
    "PARITY_TOLERANCE",
    "SADAAN_OUTPUTS",
    "ExportError",
    "export_onnx",
    "export_run",
    "sidecar_path",
]

FORMATS = ("onnx",)
DEFAULT_OPSET = 17
OPSETS = range(13, 21)  # what the TorchScript exporter of torch 2.13 writes and onnxruntime runs
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "image"
SADAAN_OUTPUTS = AbsenceSegmentationTask.export_outputs
_AXIS_NAMES = {2: ("height", "width"), 3: ("depth", "height", "width")}


class ExportError(MednetsError, RuntimeError):
    """A model cannot be exported, or the exported graph disagrees with PyTorch."""


def sidecar_path(out_path: str | os.PathLike[str]) -> Path:
    """The JSON record written beside an export: `OUT.onnx` -> `OUT.onnx.json`."""
    return Path(f"{os.fspath(out_path)}.json")


def _import_runtime() -> tuple[ModuleType, ModuleType]:
    """`onnx` and `onnxruntime`, or an `ExportError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ExportError(
            f"{error.name or 'onnx'} is not installed",
            source="mednets export",
            expected="the export extra: pip install 'mednets[export]' (onnx and onnxruntime)",
        ) from error
    return onnx, onnxruntime


def _interface(model_name: str | None) -> tuple[tuple[str, ...] | None, dict[str, Any], int | None]:
    """Output names, forward keyword arguments and the spatial step of a dynamic graph, from the registry.

    A registered model exports its task's outputs (`Task.export_outputs`, else the model's own
    `output_names`) and tries dynamic spatial axes in steps of its `export_multiple` (else
    `size_multiple`) unless it is a whole-image model; an unregistered one exports its single output
    at the example's size.
    """
    if model_name is None or model_name not in list_models():
        return None, {}, None
    spec = get_model_spec(model_name)
    task = task_type(spec.task)
    names = task.export_outputs or spec.output_names
    step = None if spec.whole_image else (spec.export_multiple or spec.size_multiple)
    return tuple(names), dict(task.call_options), step


class _NamedOutputs(nn.Module):
    """The model with its outputs as a tuple of tensors, in the order of `names` (dict outputs picked by key)."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None, call_options: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names or ("output",))
        self.call_options = dict(call_options)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(x, **self.call_options)
        if isinstance(outputs, torch.Tensor):
            return (outputs,)
        if isinstance(outputs, Mapping) and set(self.names) <= set(outputs):
            return tuple(outputs[name] for name in self.names)
        raise ExportError(
            "model outputs cannot be exported", source=type(self.model).__name__,
            expected=f"a tensor or a dict with {list(self.names)}", got=type(outputs).__name__,
        )  # fmt: skip


def _adaptive_pool_weights(size: int, pooled: int) -> torch.Tensor:
    """`[size, pooled]` matrix averaging the windows of `adaptive_avg_pool` (PyTorch's floor/ceil bounds)."""
    weights = torch.zeros(size, pooled)
    for j in range(pooled):
        start, end = (j * size) // pooled, -(-((j + 1) * size) // pooled)
        weights[start:end, j] = 1.0 / (end - start)
    return weights


def _adaptive_avg_pool_symbolic(g: Any, x: Any, output_size: Any) -> Any:
    """ONNX for `adaptive_avg_pool{1,2,3}d` at any sizes, read from the traced node.

    Sizes that divide evenly become one `AveragePool`; otherwise each resized axis is a matrix
    product with the averaging weights (ONNX has no adaptive pooling).
    """
    # `original_node` is the traced aten node: its types keep the static sizes (dynamic batch aside).
    in_sizes = g.original_node.inputsAt(0).type().varyingSizes()[2:]
    out_sizes = g.original_node.output().type().varyingSizes()[2:]
    if all(n % m == 0 for n, m in zip(in_sizes, out_sizes, strict=True)):
        kernel = [n // m for n, m in zip(in_sizes, out_sizes, strict=True)]
        return g.op("AveragePool", x, kernel_shape_i=kernel, strides_i=kernel)
    rank = len(in_sizes) + 2
    for axis, (n, m) in enumerate(zip(in_sizes, out_sizes, strict=True), start=2):
        if n == m:
            continue
        swap = list(range(rank))
        swap[axis], swap[-1] = swap[-1], swap[axis]
        x = g.op("Transpose", x, perm_i=swap)
        x = g.op("MatMul", x, g.op("Constant", value_t=_adaptive_pool_weights(n, m)))
        x = g.op("Transpose", x, perm_i=swap)
    return x


@contextlib.contextmanager
def _traceable(opset: int) -> Iterator[None]:
    """Adaptive average pooling gets a symbolic that reads the traced sizes (LHA-Net pools to sizes
    computed from the input); the built-in one needs constant sizes that divide the input.
    """
    names = [f"aten::adaptive_avg_pool{d}d" for d in (1, 2, 3)]
    for name in names:
        torch.onnx.register_custom_op_symbolic(name, _adaptive_avg_pool_symbolic, opset)
    try:
        yield
    finally:
        for name in names:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _second_input(example: torch.Tensor, size_multiple: int | None) -> torch.Tensor:
    """Batch 2 and, for a dynamic graph, each spatial side one `size_multiple` larger."""
    spatial = list(example.shape[2:])
    if size_multiple is not None:
        spatial = [n + size_multiple for n in spatial]
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, example.shape[1], *spatial, generator=generator)


def _differences(expected: Sequence[torch.Tensor], got: Sequence[np.ndarray], names: Sequence[str]) -> dict:
    """Max abs difference per output name."""
    return {
        name: float(np.abs(value - reference.numpy()).max()) if value.size else 0.0
        for name, reference, value in zip(names, expected, got, strict=True)
    }


def _dynamic_axes(
    example: torch.Tensor, outputs: Mapping[str, torch.Tensor], size_multiple: int | None
) -> dict[str, dict[int, str]]:
    """`torch.onnx.export`'s dynamic axes: the batch, and the spatial axes of image-like tensors if `size_multiple`."""
    image_axes = {0: "batch"}
    if size_multiple is not None:
        image_axes.update(enumerate(_AXIS_NAMES[example.ndim - 2], start=2))
    return {INPUT_NAME: image_axes} | {
        name: image_axes if value.ndim == example.ndim else {0: "batch"} for name, value in outputs.items()
    }


def _trace(
    graph: nn.Module,
    example: torch.Tensor,
    names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
    source: str,
) -> bytes:
    """The serialised ONNX model of `graph` traced on `example` (fp32, autocast off)."""
    buffer = io.BytesIO()
    # The tracer warns about every size it turns into a constant and the exporter about its own
    # deprecation; the parity checks are what tells whether the graph is right.
    with warnings.catch_warnings(), _traceable(opset), torch.no_grad(), torch.autocast("cpu", enabled=False):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(names),
                dynamic_axes=dynamic_axes,
            )
        except Exception as error:  # the exporter raises many types (RuntimeError, SymbolicValueError, ...)
            raise ExportError(f"the ONNX exporter failed ({type(error).__name__}: {error})", source=source) from error
    return buffer.getvalue()


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    out_path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_spatial: bool = True,
    tolerance: float = PARITY_TOLERANCE,
    model_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export `model` to ONNX at `out_path`, checked against PyTorch fp32 with onnxruntime (see the module docstring).

    The model is not changed: a copy is exported in fp32 eval mode on the CPU.

    Args:
        model: a mednets model (or any module returning a tensor).
        example_input: `[B, C, *S]`; the traced graph's shapes, and the input of the parity check.
        out_path: the `.onnx` file; its sidecar is `sidecar_path(out_path)`.
        opset: ONNX opset version.
        dynamic_spatial: make the spatial axes dynamic where the model allows it and the example's
            size is a multiple of the model's total stride (the batch axis is always dynamic).
        tolerance: largest max abs difference accepted between onnxruntime and PyTorch, per output.
        model_name: name recorded in the sidecar (default: the class name).
        metadata: more entries for the sidecar (e.g. the run folder).

    Returns:
        `out_path`.

    Raises:
        ConfigError: unsupported opset, negative tolerance, or `out_path` is a folder.
        ExportError: onnx/onnxruntime missing, the exporter or checker fails, or onnxruntime
            disagrees with PyTorch by more than `tolerance`.
        InvalidInputError: the model rejects `example_input`.
    """
    out_path = Path(out_path)
    if opset not in OPSETS:
        raise ConfigError("unsupported ONNX opset", source="opset", expected=f"{OPSETS.start} to {OPSETS.stop - 1}",
                          got=opset)  # fmt: skip
    if not tolerance >= 0:
        raise ConfigError("tolerance must be a non-negative number", source="tolerance", got=tolerance)
    if out_path.is_dir():
        raise ConfigError("is a folder", source=str(out_path), expected="the path of the .onnx file to write")
    onnx, onnxruntime = _import_runtime()

    names, call_options, size_multiple = _interface(model_name)
    graph = _NamedOutputs(copy.deepcopy(model), names, call_options)
    graph = graph.to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    names = graph.names
    example = example_input.detach().to("cpu", torch.float32).contiguous()
    if size_multiple is not None and not (
        dynamic_spatial and example.ndim - 2 in _AXIS_NAMES and all(n % size_multiple == 0 for n in example.shape[2:])
    ):
        size_multiple = None
    if size_multiple is not None:
        try:  # a graph that traced its sizes as constants fails the check at another size: export it fixed
            return _export_checked(graph, example, out_path, names, size_multiple, opset, tolerance, onnx,
                                   onnxruntime, model_name or type(model).__name__, metadata)  # fmt: skip
        except ExportError:
            size_multiple = None
    return _export_checked(graph, example, out_path, names, None, opset, tolerance, onnx, onnxruntime,
                           model_name or type(model).__name__, metadata)  # fmt: skip


def _export_checked(
    graph: _NamedOutputs,
    example: torch.Tensor,
    out_path: Path,
    names: tuple[str, ...],
    size_multiple: int | None,
    opset: int,
    tolerance: float,
    onnx: ModuleType,
    onnxruntime: ModuleType,
    model_name: str,
    metadata: Mapping[str, Any] | None,
) -> Path:
    """Trace, check against PyTorch at the example and at a second input, then write the graph and its sidecar."""
    second = _second_input(example, size_multiple)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        expected = graph(example)  # the model checks the input here and raises its own typed errors
        expected_second = graph(second)
    dynamic_axes = _dynamic_axes(example, dict(zip(names, expected, strict=True)), size_multiple)
    data = _trace(graph, example, names, dynamic_axes, opset, source=model_name)
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except Exception as error:  # onnx raises ValidationError, InferenceError, DecodeError
        raise ExportError(f"the exported graph is invalid ({error})", source=str(out_path)) from error

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        got, got_second = (session.run(list(names), {INPUT_NAME: x.numpy()}) for x in (example, second))
    except Exception as error:  # onnxruntime's own exception types
        raise ExportError(
            f"onnxruntime cannot run the exported graph ({error})",
            source=str(out_path),
            expected=f"a graph taking inputs {list(example.shape)} and {list(second.shape)}",
        ) from error
    differences = _differences(expected, got, names)
    differences_second = _differences(expected_second, got_second, names)
    if not max([*differences.values(), *differences_second.values()]) <= tolerance:
        raise ExportError(
            "onnxruntime disagrees with PyTorch fp32",
            source=str(out_path),
            expected=f"max abs difference <= {tolerance:g}",
            got=f"{differences} at {list(example.shape)}, {differences_second} at {list(second.shape)}",
        )

    record = {
        "format": "onnx",
        "model": model_name,
        **dict(metadata or {}),
        "input": {"name": INPUT_NAME, "shape": list(example.shape), "dtype": "float32"},
        "outputs": {name: list(value.shape) for name, value in zip(names, expected, strict=True)},
        "dynamic_axes": {
            name: {str(axis): label for axis, label in axes.items()} for name, axes in dynamic_axes.items()
        },
        "spatial_multiple": size_multiple,
        "opset": opset,
        "max_abs_diff": max(differences.values()),
        "max_abs_diff_per_output": differences,
        "second_check": {"input_shape": list(second.shape), "max_abs_diff": max(differences_second.values())},
        "tolerance": tolerance,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
    }
    atomic_write_bytes(out_path, data)
    atomic_write_text(sidecar_path(out_path), json.dumps(record, indent=2))
    return out_path


def export_run(
    run_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    checkpoint: str = "best",
    opset: int | None = None,
    tolerance: float | None = None,
) -> Path:
    """Export the model of a run folder made by `mednets train` (segmentation or denoising).

    The example input is one image of the size the model trained on, uniform in [0, 1]: the grid
    (SADAAn) or patch size from `preprocessing.json`, the tile size of denoising runs, else the
    registry's input size.

    Args:
        run_dir: the run folder.
        out_path: the file to write, e.g. `model.onnx`; the sidecar goes to `sidecar_path(out_path)`.
        format: export format; only "onnx".
        checkpoint: "best" or "last" (falls back to "last").
        opset: ONNX opset (default `DEFAULT_OPSET`).
        tolerance: parity tolerance (default `PARITY_TOLERANCE`).

    Returns:
        `out_path`.

    Raises:
        UnknownNameError: unknown `format`.
        CheckpointError: the run folder has no checkpoint, or lacks its dataset.json/preprocessing.json.
        ExportError, ConfigError: see `export_onnx`.
    """
    if format not in FORMATS:
        raise UnknownNameError("unknown export format", source="format", expected=f"one of {list(FORMATS)}",
                               got=repr(format))  # fmt: skip
    run = RunFolder(run_dir)
    check_not_inputs([out_path, sidecar_path(out_path)], run.run_files(), "OUT")
    _import_runtime()  # fail before loading anything
    folder = run.checkpoint_dir(checkpoint)
    spec = run.spec(checkpoint)
    model = run.load_model(checkpoint)
    spatial = run.preprocessing.window or spec.input_size
    channels = input_channels(model)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(1, channels, *spatial, generator=generator)
    return export_onnx(
        model,
        example,
        out_path,
        opset=DEFAULT_OPSET if opset is None else opset,
        tolerance=PARITY_TOLERANCE if tolerance is None else tolerance,
        model_name=spec.name,
        metadata={"run": str(run.path), "checkpoint": folder.name},
    )
