"""The model report of seed 001, measured: layer table, parameter breakdown, FLOPs, memory, data-flow map.

Every figure comes from running the model: shapes from forward hooks, FLOPs from
`torch.utils.flop_counter`, peak memory of an inference pass and of one Adam training step from
`measure.run_measured` (a fresh child process on CPU, `max_memory_allocated` on CUDA), and the
training memory split into weights, gradients, optimizer state and activations per stage
(`training_memory`). Any build can be reported: constructor overrides go to `create_model`. The
report opens with when and where it was measured; with two or more models, a side-by-side comparison.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from mednets.atomic import atomic_write_text
from mednets.config import yaml_values
from mednets.devices import resolve_device
from mednets.errors import ConfigError, UnknownNameError
from mednets.models import create_model, get_model_spec
from mednets.models.registry import model_options
from mednets.reports.figures import figure_to_base64, plot_data_flow, plot_parameter_breakdown
from mednets.reports.html import MODEL_CSS, page, table
from mednets.reports.measure import count_flops, machine_description, median_time, run_measured
from mednets.reports.training_memory import ACTIVATION_METHOD, TrainingMemory, adam_step, training_memory

__all__ = [
    "LayerRow",
    "StageRow",
    "ModelMeasurements",
    "describe_model",
    "measure_model",
    "model_figures",
    "render_html_sections",
    "write_model_report",
]

_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class LayerRow:
    """One call of a leaf module: `params` counts the module's own parameters."""

    name: str
    type: str
    input_shapes: list[tuple[int, ...]]
    output_shape: Any
    params: int


@dataclass(frozen=True)
class StageRow:
    """One call of a top-level stage (a direct child of the model), in call order."""

    name: str
    input_shapes: list[tuple[int, ...]]
    output_shape: Any
    params: int


@dataclass
class ModelMeasurements:
    """Everything the report shows about one model at one input size.

    Memory and time are None when not measured (`describe_model`: the structure only); `overrides`
    are the arguments given to `create_model` (empty: the registry's default build; None: not known).
    """

    name: str
    architecture: str
    description: str
    input_shape: tuple[int, ...]
    total_params: int
    trainable_params: int
    weight_layers: int
    layers: list[LayerRow]
    stages: list[StageRow]
    flops: int
    inference_peak_mb: float | None
    train_peak_mb: float | None
    inference_seconds: float | None
    train_step_seconds: float | None
    device: str
    breakdown: list[tuple[str, int]] = field(default_factory=list)
    overrides: dict[str, Any] | None = None
    memory: TrainingMemory | None = None

    @property
    def size_mb(self) -> float:
        """fp32 weight size in MiB."""
        return self.total_params * 4 / 2**20

    @property
    def grouped_breakdown(self) -> list[tuple[str, int]]:
        """Parameters per component kind: stage names without their trailing index (encoder1..4 -> encoder)."""
        groups: dict[str, int] = {}
        for stage, params in self.breakdown:
            kind = re.sub(r"\d+$", "", stage) or stage
            groups[kind] = groups.get(kind, 0) + params
        return list(groups.items())


def _shape_of(value: Any) -> Any:
    """Shapes of a (nested) output: a tuple for a tensor, a dict or list of shapes otherwise."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return {key: _shape_of(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shape_of(item) for item in value]
    return type(value).__name__


def _tensor_shapes(values: Iterable[Any]) -> list[tuple[int, ...]]:
    return [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def trace_layers(model: nn.Module, x: torch.Tensor) -> tuple[list[LayerRow], list[StageRow]]:
    """Run `model(x)` once without gradients and record every leaf-module call and top-level stage call."""
    layers: list[LayerRow] = []
    stages: list[StageRow] = []
    top_level = {module: name for name, module in model.named_children()}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        is_leaf = next(module.children(), None) is None
        if is_leaf or _own_params(module):

            def record_layer(mod: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
                kind = (
                    type(mod).__name__
                    if next(mod.children(), None) is None
                    else f"{type(mod).__name__} (own parameters)"
                )
                layers.append(LayerRow(name, kind, _tensor_shapes(inputs), _shape_of(output), _own_params(mod)))

            handles.append(module.register_forward_hook(record_layer))
        if module in top_level:

            def record_stage(mod: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
                params = sum(p.numel() for p in mod.parameters())
                stages.append(StageRow(name, _tensor_shapes(inputs), _shape_of(output), params))

            handles.append(module.register_forward_hook(record_stage))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return layers, stages


def _parameter_breakdown(model: nn.Module) -> list[tuple[str, int]]:
    """Parameters per direct child of the model, plus the model's own parameters if any."""
    rows = [(name, sum(p.numel() for p in child.parameters())) for name, child in model.named_children()]
    own = _own_params(model)
    return [*rows, ("(model's own parameters)", own)] if own else rows


def _options(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` checked by `model_options`: an unknown key raises `UnknownNameError` naming its `--set`."""
    get_model_spec(name)  # an unknown model is its own error
    try:
        return model_options(name, overrides)
    except UnknownNameError as error:
        raise UnknownNameError(f"unknown constructor option of model {name!r}", source=f"--set {' '.join(error.got)}",
                               expected=error.expected, got=error.got) from error  # fmt: skip


def _build(name: str, device: str, train: bool, overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Build model `name` with `overrides` on `device`; a value the builder rejects raises `ConfigError`."""
    options = _options(name, overrides or {})
    torch.manual_seed(0)
    try:
        model = create_model(name, **options)
    except (TypeError, ValueError) as error:  # a value of the wrong kind, deep in the builder
        raise ConfigError(f"model {name!r} cannot be built with these overrides ({error})", source="--set",
                          got=options) from error  # fmt: skip
    return model.to(device).train(train)


def _inference_run(name: str, input_shape: tuple[int, ...], device: str, repeats: int, overrides: dict) -> float:
    """Build the model and time `repeats` no-grad forward passes (runs in the measuring child)."""
    model, x = _build(name, device, False, overrides), torch.randn(input_shape, device=device)
    with torch.no_grad():
        return median_time(lambda: model(x), repeats=repeats, warmup=1)


def _train_run(name: str, input_shape: tuple[int, ...], device: str, repeats: int, overrides: dict) -> float:
    """Build the model and time Adam training steps on a surrogate loss (runs in the measuring child)."""
    _, step = adam_step(_build(name, device, True, overrides), torch.randn(input_shape, device=device))
    return median_time(step, repeats=repeats, warmup=1)


def describe_model(
    model: nn.Module, name: str, input_shape: Sequence[int], *, description: str = ""
) -> ModelMeasurements:
    """The structure of a built model, from one pass at `input_shape` = `(B, C, *spatial)`.

    Layers, stages, FLOPs and parameters are measured by running the model once in this process;
    peak memory and times are left unmeasured (None): `measure_model` adds them.
    """
    x = torch.randn(tuple(input_shape))
    layers, stages = trace_layers(model, x)
    return ModelMeasurements(
        name=name,
        architecture=type(model).__name__,
        description=description,
        input_shape=tuple(input_shape),
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        weight_layers=sum(isinstance(m, _WEIGHT_LAYERS) for m in model.modules()),
        layers=layers,
        stages=stages,
        flops=count_flops(model, x),
        inference_peak_mb=None,
        train_peak_mb=None,
        inference_seconds=None,
        train_step_seconds=None,
        device="cpu",
        breakdown=_parameter_breakdown(model),
    )


def measure_model(name: str, input_shape: Sequence[int], *, batch_size: int = 1, device: str = "cpu", repeats: int = 3,
                  overrides: Mapping[str, Any] | None = None) -> ModelMeasurements:  # fmt: skip
    """Measure model `name`, built with `overrides`, at `input_shape` = `(C, *spatial)`: structure, memory, times.

    Raises:
        ConfigError: the channels or the number of spatial axes do not fit the model; an override is
            unknown (`UnknownNameError`) or rejected by the builder.
    """
    spec = get_model_spec(name)
    overrides = yaml_values(overrides)
    model = _build(name, "cpu", False, overrides)
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    fits = (first.in_channels, len(first.kernel_size)) if first else (spec.in_channels, spec.spatial_dims)
    channels, *spatial = input_shape
    if (channels, len(spatial)) != fits:
        raise ConfigError(f"input size does not fit model {name!r}", source="--input-size",
                          expected=f"{fits[0]} channels and {fits[1]} spatial sizes, e.g. "
                          f"{' '.join(map(str, (fits[0], *spec.input_size)))}", got=" ".join(map(str, input_shape)))  # fmt: skip
    full_shape = (batch_size, *input_shape)
    structure = describe_model(model, name, full_shape, description=spec.description)
    inference = run_measured(_inference_run, name, full_shape, device, repeats, overrides, device=device)
    training = run_measured(_train_run, name, full_shape, device, repeats, overrides, device=device)
    memory = training_memory(_build(name, device, True, overrides), torch.randn(full_shape, device=device))
    return replace(structure, inference_peak_mb=inference.peak_mb, train_peak_mb=training.peak_mb,
                   inference_seconds=inference.value, train_step_seconds=training.value, device=device,
                   overrides=overrides, memory=memory)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Rendering


def _fmt_shape(shape: Any) -> str:
    if isinstance(shape, tuple):
        return "[B, " + ", ".join(map(str, shape[1:])) + "]" if shape else "[]"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {_fmt_shape(v)}" for k, v in shape.items()) + "}"
    if isinstance(shape, list):
        return "[" + ", ".join(_fmt_shape(v) for v in shape) + "]"
    return str(shape)


def data_flow_lines(m: ModelMeasurements) -> list[str]:
    """The data-flow map as text: one line per stage call, `name: input shapes -> output shape`."""
    lines = [f"INPUT: {_fmt_shape(m.input_shape)}"]
    for stage in m.stages:
        inputs = " + ".join(_fmt_shape(s) for s in stage.input_shapes)
        lines.append(f"{stage.name.upper()}: {inputs} -> {_fmt_shape(stage.output_shape)}  ({stage.params:,} params)")
    return lines


def _overrides_text(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in overrides.items()) or "none (the registry's default build)"


def _summary_rows(m: ModelMeasurements) -> list[tuple[str, str]]:
    return [
        ("Architecture", m.architecture),
        *([] if m.overrides is None else [("Constructor overrides", _overrides_text(m.overrides))]),
        ("Input shape", str(list(m.input_shape))),
        ("Total parameters", f"{m.total_params:,}"),
        ("Trainable parameters", f"{m.trainable_params:,}"),
        ("Weights size (fp32)", f"{m.size_mb:.2f} MB"),
        ("Weight layers (conv + linear)", str(m.weight_layers)),
        ("FLOPs per forward pass", f"{m.flops / 1e9:.2f} GFLOP"),
    ] + [
        (label, fmt.format(value * scale))
        for label, value, fmt, scale in (
            (f"Peak memory, inference ({m.device}, measured)", m.inference_peak_mb, "{:.1f} MB", 1),
            (f"Peak memory, training step with Adam ({m.device}, measured)", m.train_peak_mb, "{:.1f} MB", 1),
            ("Inference time (median)", m.inference_seconds, "{:.1f} ms", 1000),
            ("Training step time (median)", m.train_step_seconds, "{:.1f} ms", 1000),
        )
        if value is not None  # not measured (`describe_model`)
    ]


def _comparison_rows(models: Sequence[ModelMeasurements]) -> tuple[list[str], list[list[str]]]:
    header = ["Metric", *(m.name for m in models)]
    if len(models) == 2:
        header.append(f"{models[1].name} / {models[0].name}")
    numeric = [
        ("Total parameters", lambda m: m.total_params, "{:,.0f}"),
        ("Weights size (fp32, MB)", lambda m: m.size_mb, "{:.1f}"),
        ("Weight layers (conv + linear)", lambda m: m.weight_layers, "{:.0f}"),
        ("GFLOPs per forward pass", lambda m: m.flops / 1e9, "{:.2f}"),
        ("Peak memory, inference (MB, measured)", lambda m: m.inference_peak_mb, "{:.1f}"),
        ("Peak memory, training step (MB, measured)", lambda m: m.train_peak_mb, "{:.1f}"),
        ("Inference time (ms, median)", lambda m: m.inference_seconds * 1000, "{:.1f}"),
        ("Training step time (ms, median)", lambda m: m.train_step_seconds * 1000, "{:.1f}"),
        ("Training memory, sum of the parts (MB)", lambda m: m.memory.total_mb, "{:.1f}"),
        ("Activations saved for backward (MB)", lambda m: m.memory.activations_mb, "{:.1f}"),
    ]
    rows = [["Architecture", *(m.architecture for m in models)] + ([""] if len(models) == 2 else [])]
    for label, value, fmt in numeric:
        row = [label, *(fmt.format(value(m)) for m in models)]
        if len(models) == 2:
            first = value(models[0])
            row.append(f"{value(models[1]) / first:.2f}x" if first else "-")
        rows.append(row)
    return header, rows


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _layer_table(m: ModelMeasurements) -> tuple[list[str], list[list[str]]]:
    header = ["Layer", "Type", "Input shape", "Output shape", "Params"]
    rows = [
        [r.name, r.type, ", ".join(_fmt_shape(s) for s in r.input_shapes), _fmt_shape(r.output_shape), f"{r.params:,}"]
        for r in m.layers
    ]
    return header, rows


def _breakdown_table(rows: list[tuple[str, int]], total: int) -> tuple[list[str], list[list[str]]]:
    return ["Component", "Parameters", "Share"], [
        [name, f"{params:,}", f"{100 * params / total:.1f}%"] for name, params in rows
    ] + [["Total", f"{total:,}", "100.0%"]]


def _sections(m: ModelMeasurements) -> list[tuple[str, str, tuple[list[str], list[list[str]]] | None]]:
    """(title, preformatted text, table) triples shared by the Markdown and HTML renderers."""
    return [
        ("Summary", "", (["Quantity", "Value"], [list(r) for r in _summary_rows(m)])),
        *(m.memory.sections() if m.memory else []),
        ("Parameter breakdown by stage", "", _breakdown_table(m.breakdown, m.total_params)),
        ("Parameter breakdown by component", "", _breakdown_table(m.grouped_breakdown, m.total_params)),
        ("Data-flow map", "\n".join(data_flow_lines(m)), None),
        ("Architecture map (every layer call)", "", _layer_table(m)),
    ]


_NOTES = (
    "Peak memory is measured, not estimated: on CPU, the peak resident memory of a fresh child process above its "
    "start-up baseline while it builds the model and runs the pass (so it includes the weights, and for training the "
    "gradients and Adam state); on CUDA, `torch.cuda.max_memory_allocated`. FLOPs count a multiply-add as 2 "
    "(convolutions and matrix products; element-wise work is not counted). The training step uses the mean of the "
    "outputs as a surrogate loss. Training memory: weights (parameters and buffers), gradients and Adam's two moments "
    f"follow from the parameters; {ACTIVATION_METHOD}."
)


def _header(models: Sequence[ModelMeasurements]) -> list[tuple[str, str]]:
    """When, where and what was measured: ISO 8601 time with its zone, machine, device, overrides."""
    overrides = "; ".join(f"{m.name}: {_overrides_text(m.overrides or {})}" for m in models)
    return [("Generated", datetime.now().astimezone().isoformat(timespec="seconds")), ("Machine", machine_description()),
            ("Device", ", ".join(sorted({m.device for m in models}))), ("Constructor overrides", overrides)]  # fmt: skip


def render_markdown(models: Sequence[ModelMeasurements], figures: dict[str, dict[str, str]],
                    header: list[tuple[str, str]] | None = None) -> str:  # fmt: skip
    """The report as Markdown; `figures[model][kind]` are paths relative to the report; `header`: `_header`'s rows."""
    parts = ["# mednets model report", "", *[f"- {key}: {value}" for key, value in header or _header(models)], ""]
    parts += [_NOTES, ""]
    if len(models) > 1:
        parts += ["## Comparison", "", _md_table(*_comparison_rows(models)), ""]
    for m in models:
        parts += [f"## {m.name}", "", m.description, ""]
        for title, text, rows_table in _sections(m):
            parts += [f"### {title}", ""]
            if text:
                parts += ["```", text, "```", ""]
            if rows_table:
                parts += [_md_table(*rows_table), ""]
            if title.startswith("Parameter breakdown by component"):
                parts += [f"![parameters]({figures[m.name]['parameters']})", ""]
            if title == "Data-flow map":
                parts += [f"![data flow]({figures[m.name]['data_flow']})", ""]
    return "\n".join(parts)


def render_html_sections(m: ModelMeasurements, images: dict[str, str]) -> str:
    """One model's part of the HTML report (h2, h3 sections); `images[kind]` are base64 PNGs."""
    body = [f"<h2>{html.escape(m.name)}</h2>", f"<p>{html.escape(m.description)}</p>"]
    for title, text, rows_table in _sections(m):
        content = []
        if text:
            content.append(f"<pre>{html.escape(text)}</pre>")
        if rows_table:
            content.append(table(*rows_table))
        if title.startswith("Parameter breakdown by component"):
            content.append(f'<img alt="parameters" src="data:image/png;base64,{images["parameters"]}">')
        if title == "Data-flow map":
            content.append(f'<img alt="data flow" src="data:image/png;base64,{images["data_flow"]}">')
        if title.startswith("Architecture map"):
            body.append(
                f"<details><summary><h3 style='display:inline'>{title}</h3></summary>{''.join(content)}</details>"
            )
        else:
            body += [f"<h3>{html.escape(title)}</h3>", *content]
    return "".join(body)


def render_html(models: Sequence[ModelMeasurements], images: dict[str, dict[str, str]],
                header: list[tuple[str, str]] | None = None) -> str:  # fmt: skip
    """The report as one self-contained HTML page; `images[model][kind]` are base64 PNGs; `header`: `_header`'s rows."""
    header_table = table(["Measured", ""], [list(row) for row in header or _header(models)])
    body = ["<h1>mednets model report</h1>", header_table, f"<p>{html.escape(_NOTES)}</p>"]
    if len(models) > 1:
        body += ["<h2>Comparison</h2>", table(*_comparison_rows(models))]
    body += [render_html_sections(m, images[m.name]) for m in models]
    return page("mednets model report", MODEL_CSS, "".join(body))


def model_figures(m: ModelMeasurements) -> list[tuple[str, Figure]]:
    """The report's figures of one model as (kind, figure): parameter breakdown and data-flow map."""
    return [
        ("parameters", plot_parameter_breakdown(m.grouped_breakdown, m.total_params, m.name)),
        ("data_flow", plot_data_flow([(s.name, s.output_shape) for s in m.stages], m.input_shape, m.name)),
    ]


def write_model_report(
    names: Sequence[str],
    input_shape: Sequence[int],
    out_dir: Path,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    repeats: int = 3,
    overrides: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Measure each model and write `report.md`, `report.html` and `figures/*.png` into `out_dir`.

    Args:
        overrides: constructor arguments of every model, `{"bilinear": "true"}`; strings are read as YAML
            (`config.yaml_values`); an unknown key raises `UnknownNameError` before anything is measured.

    Returns:
        The paths written: report.md, report.html.
    """
    if not names:
        raise ConfigError("no model given", source="report", expected="one or more registered model names")
    device = str(resolve_device(device, source="--device"))
    overrides = yaml_values(overrides)
    for name in names:  # every model's overrides are checked before the first is measured
        _options(name, overrides)
    models = [measure_model(n, input_shape, batch_size=batch_size, device=device, repeats=repeats,
                            overrides=overrides) for n in names]  # fmt: skip
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, str]] = {}
    images: dict[str, dict[str, str]] = {}
    for m in models:
        paths[m.name], images[m.name] = {}, {}
        for kind, figure in model_figures(m):
            relative = f"figures/{m.name}_{kind}.png"
            images[m.name][kind] = figure_to_base64(figure, out_dir / relative)
            paths[m.name][kind] = relative
    markdown, page = out_dir / "report.md", out_dir / "report.html"
    header = _header(models)  # one time stamp for both files
    atomic_write_text(markdown, render_markdown(models, paths, header))
    atomic_write_text(page, render_html(models, images, header))
    return [markdown, page]
