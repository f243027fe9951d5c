"""mednets: medical image segmentation, absent-anatomy detection and denoising in PyTorch."""

from __future__ import annotations

from mednets.errors import MednetsError
from mednets.models import create_model, get_model_spec, list_models

__all__ = ["MednetsError", "create_model", "get_model_spec", "list_models", "__version__"]
__version__ = "0.1.0"
