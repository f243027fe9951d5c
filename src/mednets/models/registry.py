"""One door to every model: `register_model` records a builder with its facts, `create_model` builds it.

A registry entry is a small function that builds a model class with a few keyword arguments;
variants (seed configuration, CPU preset) are separate entries, not subclasses. The entry records
what every tool needs to know without building the model: task, 2D/3D, channels, the standard input
size, the parameter count of the default build (checked by the contract tests), and a tiny
configuration the tests and smoke checks can afford.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mednets.errors import ConfigError, UnknownNameError

__all__ = ["ModelSpec", "register_model", "create_model", "list_models", "get_model_spec", "TASKS"]

TASKS = ("segmentation", "absence_segmentation", "denoising")


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model without building it.

    Attributes:
        name: registry name.
        builder: function building the model from keyword overrides.
        task: one of `TASKS`.
        spatial_dims: 2 or 3.
        in_channels: input channels of the default build.
        out_channels: output channels (classes, structures or image channels).
        input_size: standard spatial input size, e.g. `(256, 256)` or `(64, 64, 64)`.
        description: one line for `mednets models`.
        param_count: parameters of the default build (None if it depends on nothing fixed).
        tiny_overrides: overrides for a small build that tests can run in seconds.
        tiny_input_size: spatial input size that the tiny build accepts.
        out_channels_option: the builder argument that sets the output channels (e.g. `n_classes`),
            so training can fit the model to a dataset's labels; None if the output is fixed.
    """

    name: str
    builder: Callable[..., nn.Module]
    task: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    input_size: tuple[int, ...]
    description: str
    param_count: int | None = None
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    tiny_input_size: tuple[int, ...] = ()
    out_channels_option: str | None = None

    @property
    def options(self) -> list[str]:
        """Keyword arguments the builder accepts."""
        return [p for p in inspect.signature(self.builder).parameters if p != "kwargs"]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    task: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    input_size: tuple[int, ...],
    description: str,
    param_count: int | None = None,
    tiny_overrides: dict[str, Any] | None = None,
    tiny_input_size: tuple[int, ...] | None = None,
    out_channels_option: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under `name` (see `ModelSpec` for the fields)."""
    if task not in TASKS:
        raise ConfigError("unknown task", source=f"register_model({name!r})", expected=list(TASKS), got=task)

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ConfigError("model name registered twice", source=f"register_model({name!r})")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            task=task,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            input_size=tuple(input_size),
            description=description,
            param_count=param_count,
            tiny_overrides=dict(tiny_overrides or {}),
            tiny_input_size=tuple(tiny_input_size or input_size),
            out_channels_option=out_channels_option,
        )
        return builder

    return decorate


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; raises `UnknownNameError` listing the valid names."""
    if name not in _REGISTRY:
        raise UnknownNameError("unknown model", source="model", expected=f"one of {list_models()}", got=repr(name))
    return _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`, with keyword `overrides` of its builder's arguments.

    Raises:
        UnknownNameError: `name` is not registered, or an override is not an argument of the builder.
    """
    spec = get_model_spec(name)
    unknown = sorted(set(overrides) - set(spec.options))
    if unknown:
        raise UnknownNameError(
            "unknown override", source=f"create_model({name!r})", expected=f"one of {spec.options}", got=unknown
        )
    return spec.builder(**overrides)
