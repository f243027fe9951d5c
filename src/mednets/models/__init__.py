"""Model zoo: every model is built through `create_model(name, in_channels=..., out_channels=..., **overrides)`.

Importing this package registers every model module below.
"""

from __future__ import annotations

from mednets.models import dynunet, histo_autoencoder, lhanet, sadaan, unet  # noqa: F401  (registers the models)
from mednets.models.base import MednetsModel
from mednets.models.registry import (
    ModelSpec,
    create_model,
    get_model_spec,
    list_models,
    register_model,
    register_variant,
)

__all__ = [
    "MednetsModel",
    "ModelSpec",
    "create_model",
    "get_model_spec",
    "list_models",
    "register_model",
    "register_variant",
]
