"""Typed experiment configuration: YAML in (`yaml.safe_load`), dataclasses out, every key checked.

An unknown key is an error naming its dotted path and the valid keys; `--set a.b=value` overrides
parse `value` as YAML (`--set train.lr=3e-4`, `--set data.phantoms.shape=[96,96,96]`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mednets.atomic import atomic_write_text
from mednets.errors import ConfigError, UnknownNameError

__all__ = [
    "ModelConfig",
    "PhantomConfig",
    "DataConfig",
    "TrainConfig",
    "ExperimentConfig",
    "InferenceConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "parse_assignments",
    "save_config",
    "yaml_values",
]


@dataclass
class ModelConfig:
    """Which registered model to build, with keyword overrides of its builder.

    Attributes:
        name: registered model name.
        overrides: keyword arguments of its builder. Segmentation models get `out_channels` from the
            dataset's labels (one softmax output per label, background included) unless set here;
            `out_channels: 1` on a dataset of one structure (labels `{background: 0, <name>: 1}`) is
            binary segmentation: a sigmoid head trained with BCE + Dice, foreground where the
            sigmoid exceeds 0.5 (MONAI's `out_channels=1` with `sigmoid=True`).
        init_from_data: start the model from the training data where it supports this (SADAAn: the
            position prior from the training labels' voxel-wise frequency; see
            `SpatialAttentionMedicalSegmenter.init_from_label_frequency`). A resumed run loads its
            checkpoint over it.
        init_prior_floor: with `init_from_data`, the prior probability where a structure was never
            seen in training (0.5: a soft prior that still lets shifted anatomy through).
    """

    name: str = "sadaan_fast"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from_data: bool = False
    init_prior_floor: float = 0.5


@dataclass
class PhantomConfig:
    """The built-in phantom data set, generated when no dataset folder is given."""

    n_train: int = 48
    n_test: int = 16
    shape: tuple[int, ...] = (64, 64, 64)
    seed: int = 0


@dataclass
class DataConfig:
    """Where the data comes from and how it is prepared.

    Attributes:
        dataset: dataset folder (docs/dataset_format.md); None generates phantoms into the run folder.
        phantoms: phantom settings used when `dataset` is None.
        val_fraction: share of the training cases held out for validation (seeded split).
        split_seed: seed of the split.
        plan: "auto" plans segmentation training from the dataset's fingerprint (`mednets plan`:
            voxel size, normalisation, patch, batch and grid); or the path of a plans.json written by
            `mednets plan --out` (and edited). Every key below that is set overrides the plan.
        patch_size: the window of patch-wise models (training patches, prediction windows) and the tile
            of denoising; None: planned (segmentation) or the model's input size (denoising).
        hu_window: a fixed CT window mapped to [0, 1] (`window` normalisation of CT channels); None:
            the plan's (CT: clipped to the foreground's 0.5-99.5 percentiles and z-scored).
        normalisation: one scheme per channel (`mednets.data.intensity.SCHEMES`), overriding the plan's.
        spacing_mm: the voxel size training resamples to; None: planned (the median, or the data's own
            spacing for 2D images).
        memory_budget_gb: the training memory the plan fits the patch (or grid) and batch into; None:
            a quarter of this machine's memory, at most 8 GiB (CPU), or 80% of the GPU's.
        cache_dir: where preprocessed cases are kept; None: `$MEDNETS_CACHE` or `~/.cache/mednets`.
        preprocess_workers: worker processes of preprocessing; None: one per core.
        foreground_share: share of training patches centred on a voxel of a random present structure.
        absent_share: share of patches centred where an absent structure would be (when one is absent).
        augment: random flips (where anatomy allows), rotations and scalings, gamma, brightness and
            contrast, noise and blur, low-resolution simulation.
        augmentation: the strength of segmentation augmentation: "nnunet" (the full set) or "light"
            (rotations, scalings, small intensity shifts: for budgets of minutes).
        organ_removal_prob: probability that a training case loses one of `organ_removal`, erased
            from image and labels as if removed by surgery (`RandOrganRemovald`; 0 disables it).
        organ_removal: structure names that may be erased; `["*"]`: any structure of the dataset.
        num_workers: data-loader worker processes; None: one on CPU (patches are read while the step
            computes), two on GPU.
        noise: noise of denoising tasks: "seed" (the seed's mixture) or a list of stages, e.g.
            `[{model: gaussian, sigma: 0.1}]` (`mednets.data.histology`).
        min_tissue: least share of tissue pixels in a histology tile.
        stain_augment: stain augmentation strength of histology tiles (0 disables it).
    """

    dataset: str | None = None
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)
    val_fraction: float = 0.2
    split_seed: int = 0
    plan: str = "auto"
    patch_size: tuple[int, ...] | None = None
    hu_window: tuple[float, float] | None = None
    normalisation: tuple[str, ...] | None = None
    spacing_mm: tuple[float, ...] | None = None
    memory_budget_gb: float | None = None
    cache_dir: str | None = None
    preprocess_workers: int | None = None
    foreground_share: float = 0.33
    absent_share: float = 0.3
    augment: bool = True
    augmentation: str = "nnunet"
    organ_removal_prob: float = 0.0
    organ_removal: tuple[str, ...] = ("left_kidney", "right_kidney", "spleen", "gallbladder")
    num_workers: int | None = None
    noise: str | tuple[dict[str, Any], ...] = "seed"
    min_tissue: float = 0.25
    stain_augment: float = 0.2


@dataclass
class TrainConfig:
    """The optimisation loop.

    Attributes:
        max_steps: optimizer steps at most.
        max_minutes: wall-clock budget; training stops (and validates, checkpoints) when it is spent.
            The cosine schedule ends where the budget does: from the measured time per step
            (validation included) the trainer shortens its horizon to the steps the budget reaches on
            this machine, re-estimated at every validation, never beyond `max_steps`.
        batch_size: samples per step per process (before accumulation); None: planned (segmentation)
            or 2.
        accumulation_steps: micro-batches per optimizer step.
        lr: peak learning rate of AdamW.
        lr_multipliers: learning-rate factors for parameters whose name contains a key, e.g.
            `{position_prior: 50}`: a per-voxel map moves by about one learning rate per step, so
            an absolute prior needs a larger rate to form within a training budget.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then cosine decay to 0 at `max_steps` (or where the budget ends).
        grad_clip: max global gradient norm (None: no clipping).
        precision: "fp32", "bf16" (autocast, CPU and CUDA) or "fp16" (autocast + GradScaler, CUDA only).
        channels_last: channels-last memory format for model and inputs.
        gradient_checkpointing: recompute activations in the backward pass.
        keep_freed_memory: keep freed host memory for the next step instead of returning it to the
            kernel (`mednets.host_memory`, glibc): no page faults on every step's activations, a
            faster step on CPU, at the cost of a higher peak RSS where many odd-sized buffers fragment
            the heap (benchmarks/RESULTS.md). False returns memory as soon as it is freed.
        val_every: validate (and checkpoint) every this many steps.
        best_metric: metric that picks the best checkpoint, e.g. "val/dice".
        best_mode: "max" or "min".
        seed: seed of everything random in the run.
        device: "auto", "cpu", "cuda" or "cuda:N".
    """

    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int | None = None
    accumulation_steps: int = 1
    lr: float = 1e-3
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float | None = 1.0
    precision: str = "bf16"
    channels_last: bool = True
    gradient_checkpointing: bool = False
    keep_freed_memory: bool = True
    val_every: int = 100
    best_metric: str = "val/loss"
    best_mode: str = "min"
    seed: int = 0
    device: str = "auto"


@dataclass
class InferenceConfig:
    """How the run's model predicts; saved with the run, and the command line's flags override it.

    Attributes:
        overlap: fraction of a window shared with its neighbour (patch-wise models).
        tta: average over the flips the anatomy allows (test-time augmentation).
        batch_size: windows per forward pass.
        precision: "bf16" (autocast) or "fp32".
        accumulate_device: where the blended full-size scores live (None: the CPU).
        accumulate_dtype: their dtype, "float32" or "bfloat16" (half the memory).
        min_volume_fraction: a structure painted with less than this share of its smallest training
            volume is emptied as noise (0 turns the floor off).
        gating: empty the structures a presence head judges absent.
    """

    overlap: float = 0.5
    tta: bool = False
    batch_size: int = 2
    precision: str = "bf16"
    accumulate_device: str | None = None
    accumulate_dtype: str = "float32"
    min_volume_fraction: float = 0.25
    gating: bool = True


@dataclass
class ExperimentConfig:
    """One experiment: model, data, loss settings, training loop and inference settings."""

    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")

_CHOICES = {
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "best_mode"): ("max", "min"),
    ("inference", "precision"): ("fp32", "bf16"),
    ("inference", "accumulate_dtype"): ("float32", "bfloat16"),
    ("data", "augmentation"): ("nnunet", "light"),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _at_least(low: float, *, finite: bool = False) -> Any:
    return lambda v: _number(v) and v >= low and (not finite or math.isfinite(v))


def _between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Any:
    return lambda v: _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


def _sides(low: int, count: int | None = None) -> Any:
    return lambda v: (count is None or len(v) == count) and len(v) > 0 and all(_number(s) and s >= low for s in v)


def _window(value: tuple[float, ...]) -> bool:
    return len(value) == 2 and all(map(_number, value)) and value[1] > value[0]


def _spacing(value: tuple[float, ...]) -> bool:
    return len(value) > 0 and all(_number(s) and 0 < s < math.inf for s in value)


def _multipliers(value: dict[str, Any]) -> bool:
    return all(_number(m) and 0 <= m < math.inf for m in value.values())


# Value checks of numeric keys, (section, key) -> (accepts the converted value, what it accepts); None
# (where the type allows it) keeps its meaning and is not checked.
_BOUNDS: dict[tuple[str, str], tuple[Any, str]] = {
    ("model", "init_prior_floor"): (_between(0, 1, low_open=True, high_open=True), "a number in (0, 1)"),
    ("data.phantoms", "n_train"): (_at_least(1), "an integer >= 1"),
    ("data.phantoms", "n_test"): (_at_least(0), "an integer >= 0"),
    ("data.phantoms", "shape"): (_sides(8, 3), "3 sizes of at least 8"),
    ("data.phantoms", "seed"): (_at_least(0), "an integer >= 0"),
    ("data", "val_fraction"): (_between(0, 1, high_open=True), "a number in [0, 1)"),
    ("data", "split_seed"): (_at_least(0), "an integer >= 0"),
    ("data", "patch_size"): (_sides(1), "one or more sizes of at least 1"),
    ("data", "hu_window"): (_window, "[low, high] with high > low"),
    ("data", "spacing_mm"): (_spacing, "one or more positive sizes in mm"),
    ("data", "organ_removal_prob"): (_between(0, 1), "a probability in [0, 1]"),
    ("data", "num_workers"): (_at_least(0), "an integer >= 0"),
    ("data", "preprocess_workers"): (_at_least(1), "an integer >= 1"),
    ("data", "memory_budget_gb"): (lambda v: _number(v) and 0 < v < math.inf, "a number of GiB > 0"),
    ("data", "foreground_share"): (_between(0, 1), "a share in [0, 1]"),
    ("data", "absent_share"): (_between(0, 1), "a share in [0, 1]"),
    ("data", "min_tissue"): (_between(0, 1), "a share in [0, 1]"),
    ("data", "stain_augment"): (_at_least(0, finite=True), "a number >= 0"),
    ("train", "max_steps"): (_at_least(1), "an integer >= 1"),
    ("train", "max_minutes"): (_at_least(0), "a number of minutes >= 0, or null for no budget"),
    ("train", "batch_size"): (_at_least(1), "an integer >= 1"),
    ("train", "accumulation_steps"): (_at_least(1), "an integer >= 1"),
    ("train", "lr"): (lambda v: _number(v) and 0 < v < math.inf, "a number > 0"),
    ("train", "lr_multipliers"): (_multipliers, "numbers >= 0"),
    ("train", "weight_decay"): (_at_least(0, finite=True), "a number >= 0"),
    ("train", "warmup_steps"): (_at_least(0), "an integer >= 0"),
    ("train", "grad_clip"): (_at_least(0), "a number >= 0, or null (0 or null: no clipping)"),
    ("train", "val_every"): (_at_least(1), "an integer >= 1"),
    ("train", "seed"): (_at_least(0), "an integer >= 0"),
    ("inference", "overlap"): (_between(0, 1, high_open=True), "a fraction in [0, 1)"),
    ("inference", "batch_size"): (_at_least(1), "an integer >= 1"),
    ("inference", "min_volume_fraction"): (_at_least(0, finite=True), "a number >= 0 (0: off)"),
}


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Convert YAML `value` to the type `annotation`, raising ConfigError naming `path`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, path)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError("must be a mapping", source=path, got=type(value).__name__)
        return config_from_dict(value, annotation, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError("must be a list", source=path, got=value)
        item_type = typing.get_args(annotation)[0]
        return tuple(_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError("must be a mapping", source=path, got=value)
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError("has the wrong type", source=path, expected="float", got=repr(value)) from None
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError("has the wrong type", source=path, expected=annotation.__name__, got=repr(value))
    return value


def config_from_dict(data: dict[str, Any], cls: type = ExperimentConfig, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise UnknownNameError("unknown config key", source=where, expected=f"one of {names}", got=unknown)
    values = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        values[key] = _convert(value, hints[key], key_path)
        choices = _CHOICES.get((path, key))
        if choices and values[key] not in choices:
            raise ConfigError("invalid value", source=key_path, expected=f"one of {list(choices)}", got=values[key])
        bounds = _BOUNDS.get((path, key))
        if bounds and values[key] is not None and not bounds[0](values[key]):
            got = list(values[key]) if isinstance(values[key], tuple) else values[key]
            raise ConfigError("value out of range", source=key_path, expected=bounds[1], got=got)
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (value parsed as YAML) to a config mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError("override must look like key.path=value", source="--set", got=item)
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError("cannot set a key inside a non-mapping", source=dotted)
        node[keys[-1]] = yaml.safe_load(text)
    return data


def yaml_values(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """`values` with every string read as YAML, as `--set` reads it (`"true"` -> True, `"8"` -> 8, `"[32, 32]"`)."""
    return {
        str(key): yaml.safe_load(value) if isinstance(value, str) else value for key, value in (values or {}).items()
    }


def parse_assignments(items: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """`KEY=VALUE` strings (a repeated `--set`) as `{KEY: VALUE read as YAML}`; a later KEY wins.

    Raises:
        ConfigError: an item without `=` or with an empty key, or a value that is not YAML.
    """
    parsed = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError("must look like KEY=VALUE", source=source, got=item)
        try:
            parsed[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"invalid YAML value: {_yaml_problem(error)}", source=f"{source} {item}") from error
    return parsed


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, in one line (its message quotes the line with a caret below)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment config from YAML (or the defaults when `path` is None) and apply overrides.

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type or invalid value; the message names the key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ConfigError("config file not found", source=source) from error
        except yaml.YAMLError as error:
            raise ConfigError(f"invalid YAML: {_yaml_problem(error)}", source=source) from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("must be a YAML mapping", source=source, got=type(loaded).__name__)
        data = loaded or {}
    apply_overrides(data, list(overrides or []))
    name = str(data.get("name", ExperimentConfig.name))
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError("the name must be one path component (it names the run folder under runs/)",
                          source=f"{source}: name", expected="letters, digits, '.', '_' or '-'", got=repr(name))  # fmt: skip
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise type(error)(
            error.message, source=f"{source}: {error.source}", expected=error.expected, got=error.got
        ) from error


def save_config(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the fully resolved config as YAML, atomically."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
