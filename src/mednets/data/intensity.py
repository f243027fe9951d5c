"""The one intensity normalisation of mednets: training and prediction, 2D and 3D, call `normalise`.

The rule follows the channel's name in `dataset.json` (`channel_names`), as nnU-Net's does:

- ``CT``: Hounsfield units windowed to [0, 1] with `hu_window` (clipped): organs spread out, fat and
  bone saturate;
- anything else stored as uint8: divided by 255;
- anything else: scaled per image between its 0.5th and 99.5th percentiles, clipped to [0, 1]
  (fluorescence, MR or any arbitrary unit).

A channel file is normalised as a whole (all colours of an RGB image together), when it is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mednets.errors import ConfigError

__all__ = ["DEFAULT_HU_WINDOW", "PERCENTILES", "normalise", "padding_value"]

# Soft-tissue abdominal window: the default of `data.hu_window` in configs.
DEFAULT_HU_WINDOW = (-200.0, 300.0)
PERCENTILES = (0.5, 99.5)
AIR_HU = -1000.0


def _check_window(hu_window: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in hu_window)
    if not high > low:
        raise ConfigError("HU window must be (low, high) with high > low", source="data.hu_window", got=hu_window)
    return low, high


def normalise(
    array: np.ndarray | torch.Tensor, channel_name: str, hu_window: Sequence[float] = DEFAULT_HU_WINDOW
) -> np.ndarray | torch.Tensor:
    """One channel's values (any shape) as float32 in [0, 1] by the rule of its name (module docstring).

    Returns a tensor for a tensor, an array for an array.
    """
    if isinstance(array, torch.Tensor):
        is_uint8 = array.dtype == torch.uint8
        values = array.to(torch.float32, copy=True)
    else:
        is_uint8 = np.asarray(array).dtype == np.uint8
        values = torch.from_numpy(np.array(array, dtype=np.float32))  # the one copy: a scan can be large
    if channel_name.upper() == "CT":
        low, high = _check_window(hu_window)
        values.sub_(low).div_(high - low)
    elif is_uint8:
        values.div_(255.0)
    else:
        low, high = np.percentile(values.numpy(), PERCENTILES) if values.numel() else (0.0, 1.0)
        values.sub_(float(low)).div_(max(float(high - low), 1e-6))
    values.clamp_(0.0, 1.0)
    return values if isinstance(array, torch.Tensor) else values.numpy()


def padding_value(channel_name: str, hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> float:
    """The normalised value of what lies outside a scan: air for CT, 0 otherwise."""
    if channel_name.upper() == "CT":
        return float(normalise(torch.tensor([AIR_HU]), channel_name, hu_window)[0])
    return 0.0
