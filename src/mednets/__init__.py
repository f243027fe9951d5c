"""mednets: medical image segmentation, absent-anatomy detection and denoising in PyTorch.

The public names are loaded on first use, so `import mednets.data.io` (or `mednets --help`) does not
build the model zoo.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mednets.engine.api import load_run, predict
    from mednets.errors import MednetsError
    from mednets.models import create_model, get_model_spec, list_models

__all__ = ["MednetsError", "create_model", "get_model_spec", "list_models", "load_run", "predict", "__version__"]
__version__ = "0.1.0"

_PUBLIC = {
    "MednetsError": "mednets.errors",
    "create_model": "mednets.models",
    "get_model_spec": "mednets.models",
    "list_models": "mednets.models",
    "load_run": "mednets.engine.api",
    "predict": "mednets.engine.api",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mednets' has no attribute {name!r}")
