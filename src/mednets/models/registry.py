"""One door to every model: `register_model` records a builder with its contract, `create_model` builds it.

A registry entry is a small function that builds a model class with a few keyword arguments, and
every builder takes `in_channels` and `out_channels`. A variant (seed configuration, CPU preset,
3D form) is data: `register_variant` registers the same builder with other defaults, not a
subclass. The entry is the model's contract, readable without building it: task, 2D/3D, channels,
output names, the size multiple its inputs need, whether it sees the whole image on a fixed grid or
runs patch-wise, the standard input size (the grid, for whole-image models), the parameter count of
the default build (checked by the contract tests), and a tiny configuration the tests can afford.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from mednets.errors import ConfigError, UnknownNameError

__all__ = [
    "ModelSpec",
    "register_model",
    "register_variant",
    "unregister_model",
    "create_model",
    "model_options",
    "list_models",
    "get_model_spec",
    "TASKS",
    "GRID_OPTION",
    "PRESENCE_OPTION",
]

TASKS = ("segmentation", "absence_segmentation", "denoising")
# The builder argument of a whole-image model that sets its grid (the spec's `input_size`).
GRID_OPTION = "grid_size"
# The option of every softmax segmenter that adds a presence head (`mednets.models.presence`).
PRESENCE_OPTION = "presence_head"
# Old option names accepted by `create_model` for one release, and the name each stands for.
_DEPRECATED_ALIASES = {
    "n_channels": "in_channels",
    "n_classes": "out_channels",
    "num_classes": "out_channels",
    "num_structures": "out_channels",
}
# Spec fields that are also builder arguments: a default build must agree with its spec on them.
_SHARED_FIELDS = ("in_channels", "out_channels", "spatial_dims")


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model without building it: its contract.

    Attributes:
        name: registry name.
        builder: function building the model from keyword overrides; takes `in_channels` and
            `out_channels` like every builder.
        task: one of `TASKS`.
        spatial_dims: 2 or 3.
        in_channels: input channels of the default build.
        out_channels: output channels of the default build (classes, structures or image channels).
        input_size: standard spatial input size, e.g. `(256, 256)` or `(64, 64, 64)`; for a whole-image
            model, its grid (see `grid`).
        output_names: names of the outputs in eval mode: the keys of the output dict, in the order
            `forward` returns them, or one name (`"logits"`, `"image"`) for a model returning a tensor.
        size_multiple: every spatial input side must be a multiple of this for the output to have the
            input's spatial size (1: any size works).
        whole_image: True for a model that sees the whole scan resampled to a fixed grid (its input
            must be exactly `input_size`); False for a patch-wise model that takes any valid size.
        export_multiple: the spatial step at which a traced (ONNX) graph stays valid, where it differs
            from `size_multiple` (a model that pads odd sizes traces its padding as constants).
        description: one line for `mednets models`.
        param_count: parameters of the default build (None if it depends on nothing fixed).
        tiny_overrides: overrides for a small build that tests can run in seconds.
        tiny_input_size: spatial input size that the tiny build accepts.
        base: the model this one is a variant of (`register_variant`), or None.
    """

    name: str
    builder: Callable[..., nn.Module]
    task: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    input_size: tuple[int, ...]
    output_names: tuple[str, ...]
    size_multiple: int
    whole_image: bool
    description: str
    export_multiple: int | None = None
    param_count: int | None = None
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    tiny_input_size: tuple[int, ...] = ()
    base: str | None = None

    @property
    def options(self) -> list[str]:
        """Keyword arguments the builder accepts, and `presence_head` for softmax segmenters."""
        options = [p for p in inspect.signature(self.builder).parameters if p != "kwargs"]
        return [*options, PRESENCE_OPTION] if self.task == "segmentation" else options

    @property
    def defaults(self) -> dict[str, Any]:
        """The builder's default arguments: the default build."""
        parameters = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}

    @property
    def grid(self) -> tuple[int, ...] | None:
        """The fixed grid a whole-image model sees (its `input_size`); None for patch-wise models."""
        return self.input_size if self.whole_image else None


_REGISTRY: dict[str, ModelSpec] = {}


def _check_spec(spec: ModelSpec) -> ModelSpec:
    """Raise `ConfigError` unless the spec is complete and agrees with its builder's defaults."""
    source = f"register_model({spec.name!r})"
    if spec.task not in TASKS:
        raise ConfigError("unknown task", source=source, expected=list(TASKS), got=spec.task)
    if spec.spatial_dims not in (2, 3):
        raise ConfigError("spatial_dims must be 2 or 3", source=source, got=spec.spatial_dims)
    if len(spec.input_size) != spec.spatial_dims or len(spec.tiny_input_size) != spec.spatial_dims:
        raise ConfigError("input sizes need one side per spatial axis", source=source,
                          expected=f"{spec.spatial_dims} sides", got=(spec.input_size, spec.tiny_input_size))  # fmt: skip
    if not spec.output_names or spec.size_multiple < 1:
        raise ConfigError("a model needs output names and a positive size multiple", source=source,
                          got=(spec.output_names, spec.size_multiple))  # fmt: skip
    missing = [name for name in ("in_channels", "out_channels") if name not in spec.options]
    if missing:
        raise ConfigError("every builder takes in_channels and out_channels", source=source, got=f"missing {missing}")
    defaults = spec.defaults
    for name in _SHARED_FIELDS:
        if name in defaults and defaults[name] != getattr(spec, name):
            raise ConfigError(f"the builder's default {name} differs from the spec's", source=source,
                              expected=getattr(spec, name), got=defaults[name])  # fmt: skip
    if spec.whole_image:
        grids = {"input_size": (spec.input_size, defaults.get(GRID_OPTION)),
                 "tiny_input_size": (spec.tiny_input_size, spec.tiny_overrides.get(GRID_OPTION))}  # fmt: skip
        for what, (size, grid) in grids.items():
            if grid is None or tuple(grid) != size or any(side % spec.size_multiple for side in size):
                raise ConfigError(f"a whole-image model's {what} is its grid ({GRID_OPTION!r})", source=source,
                                  expected=f"{GRID_OPTION} == {what}, sides multiples of {spec.size_multiple}",
                                  got=(size, grid))  # fmt: skip
    return spec


def _add(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ConfigError("model name registered twice", source=f"register_model({spec.name!r})")
    _REGISTRY[spec.name] = _check_spec(spec)
    return spec


def register_model(
    name: str,
    *,
    task: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    input_size: tuple[int, ...],
    output_names: tuple[str, ...],
    size_multiple: int,
    whole_image: bool = False,
    export_multiple: int | None = None,
    description: str,
    param_count: int | None = None,
    tiny_overrides: dict[str, Any] | None = None,
    tiny_input_size: tuple[int, ...] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under `name` (see `ModelSpec` for the fields).

    Raises:
        ConfigError: the name is taken, a field is invalid, the builder lacks `in_channels` or
            `out_channels`, or its defaults disagree with the spec (channels, `spatial_dims`, grid).
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _add(
            ModelSpec(
                name=name,
                builder=builder,
                task=task,
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=out_channels,
                input_size=tuple(input_size),
                output_names=tuple(output_names),
                size_multiple=size_multiple,
                whole_image=whole_image,
                export_multiple=export_multiple,
                description=description,
                param_count=param_count,
                tiny_overrides=dict(tiny_overrides or {}),
                tiny_input_size=tuple(tiny_input_size or input_size),
            )
        )
        return builder

    return decorate


def _with_defaults(builder: Callable[..., nn.Module], defaults: dict[str, Any]) -> Callable[..., nn.Module]:
    """`builder` with other default arguments; its signature shows them."""

    def variant_builder(**overrides: Any) -> nn.Module:
        return builder(**{**defaults, **overrides})

    signature = inspect.signature(builder)
    variant_builder.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=defaults.get(p.name, p.default))
            for p in signature.parameters.values()
        ]
    )
    variant_builder.__doc__ = builder.__doc__
    return variant_builder


def register_variant(
    name: str, base: str, *, description: str, param_count: int | None = None, **defaults: Any
) -> ModelSpec:
    """Register `name` as `base` with other defaults: a preset in a few lines, as timm's variants.

    Each keyword in `defaults` is a builder argument of `base` (a new default), a `ModelSpec` field
    (`input_size`, `tiny_overrides`, `tiny_input_size`, ...), or both (`in_channels`, `out_channels`,
    `spatial_dims`), in which case the builder and the spec change together. For a whole-image model
    the grid is both: `input_size` or the builder's grid argument (`GRID_OPTION`) sets the other.
    Spec fields not given are `base`'s.

    Returns:
        The new entry.

    Raises:
        UnknownNameError: `base` is not registered, or a keyword is neither a builder argument nor a field.
        ConfigError: `name` is taken, or the variant is inconsistent (see `register_model`).
    """
    parent = get_model_spec(base)
    spec_fields = {f.name for f in fields(ModelSpec)} - {"name", "builder", "description", "param_count", "base"}
    unknown = sorted(set(defaults) - set(parent.options) - spec_fields)
    if unknown:
        raise UnknownNameError("unknown variant default", source=f"register_variant({name!r}, {base!r})",
                               expected=f"builder arguments {parent.options} or spec fields {sorted(spec_fields)}",
                               got=unknown)  # fmt: skip
    defaults = dict(defaults)
    if parent.whole_image and GRID_OPTION in parent.options:
        grid = defaults.get(GRID_OPTION, defaults.get("input_size"))
        if grid is not None:
            defaults.setdefault(GRID_OPTION, tuple(grid))
            defaults.setdefault("input_size", tuple(grid))
    builder_defaults = {k: v for k, v in defaults.items() if k in parent.options}
    spec_changes = {k: v for k, v in defaults.items() if k in spec_fields}
    for key in ("input_size", "tiny_input_size", "output_names"):
        if key in spec_changes:
            spec_changes[key] = tuple(spec_changes[key])
    spec = replace(
        parent,
        name=name,
        builder=_with_defaults(parent.builder, builder_defaults),
        description=description,
        param_count=param_count,
        base=base,
        **spec_changes,
    )
    return _add(spec)


def unregister_model(name: str) -> ModelSpec:
    """Remove `name` from the registry and return its entry (for tests that register throw-away models)."""
    get_model_spec(name)  # an unknown name raises, listing the registered ones
    dependants = sorted(n for n, s in _REGISTRY.items() if s.base == name)
    if dependants:
        raise ConfigError("other models are variants of this one", source=f"unregister_model({name!r})",
                          got=dependants)  # fmt: skip
    return _REGISTRY.pop(name)


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; raises `UnknownNameError` listing the valid names."""
    if name not in _REGISTRY:
        raise UnknownNameError("unknown model", source="model", expected=f"one of {list_models()}", got=repr(name))
    return _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _resolve_aliases(name: str, overrides: dict[str, Any], *, stacklevel: int = 3) -> dict[str, Any]:
    """Map the deprecated seed names (`n_channels`, `n_classes`, `num_classes`, `num_structures`)."""
    resolved = dict(overrides)
    for old, new in _DEPRECATED_ALIASES.items():
        if old not in resolved:
            continue
        if new in resolved:
            raise ConfigError(f"{old!r} and {new!r} both given; they are the same option",
                              source=f"create_model({name!r})", expected=new, got=sorted(overrides))  # fmt: skip
        warnings.warn(f"create_model option {old!r} is deprecated; use {new!r}", FutureWarning, stacklevel=stacklevel)
        resolved[new] = resolved.pop(old)
    return resolved


def create_model(
    name: str, *, in_channels: int | None = None, out_channels: int | None = None, **overrides: Any
) -> nn.Module:
    """Build the registered model `name`: the only door to every model.

    Args:
        name: a registered name (`list_models()`).
        in_channels: input channels (default: the spec's).
        out_channels: output channels: classes for segmentation, structures for absence-aware
            segmentation, image channels for denoising (default: the spec's).
        **overrides: other arguments of the model's builder (`get_model_spec(name).options`), and
            `presence_head=True` for a segmentation model: per-structure presence logits
            (`mednets.models.presence`) beside its segmentation. The seed names `n_channels` (for `in_channels`) and `n_classes`, `num_classes`, `num_structures`
            (for `out_channels`) are accepted for one release, with a `FutureWarning`.

    Raises:
        UnknownNameError: `name` is not registered, or an override is not an argument of the builder.
        ConfigError: an option is given under its old and its new name, or the builder rejects a value.
    """
    if in_channels is not None:
        overrides["in_channels"] = in_channels
    if out_channels is not None:
        overrides["out_channels"] = out_channels
    options = model_options(name, overrides, stacklevel=4)
    presence_head = bool(options.pop(PRESENCE_OPTION, False))
    model = get_model_spec(name).builder(**options)
    if presence_head:
        from mednets.models.presence import with_presence_head

        model = with_presence_head(model)
    return model


def model_options(name: str, overrides: Mapping[str, Any], *, stacklevel: int = 3) -> dict[str, Any]:
    """`overrides` of model `name` checked against its builder's arguments (`ModelSpec.options`), as
    `create_model` checks them: the seed names are mapped to the new ones (with a `FutureWarning`).

    Raises:
        UnknownNameError: an override is not an argument of the builder (the message lists them).
        ConfigError: an option is given under its old and its new name.
    """
    spec = get_model_spec(name)
    resolved = _resolve_aliases(name, dict(overrides), stacklevel=stacklevel)
    unknown = sorted(set(resolved) - set(spec.options))
    if unknown:
        raise UnknownNameError(
            "unknown override", source=f"create_model({name!r})", expected=f"one of {spec.options}", got=unknown
        )
    return resolved
