"""The one intensity normalisation of mednets: training, preprocessing and prediction call `normalise`.

Each input channel has a `ChannelNormalisation`, chosen by the plan from the channel's name in
`dataset.json` (`channel_names`), as nnU-Net chooses its normalisation schemes:

- ``ct``: clipped to the training foreground's 0.5th and 99.5th percentiles, then z-scored with the
  foreground's mean and standard deviation (one transform for every image of the dataset: HU mean
  the same tissue everywhere);
- ``window``: a fixed window (`data.hu_window`, e.g. [-175, 250] HU) mapped to [0, 1] and clipped;
- ``zscore``: z-scored per image (MR and other arbitrary units: the scale differs between scans);
- ``rescale``: per image, its 0.5th-99.5th percentiles mapped to [0, 1] and clipped;
- ``rgb``: 8-bit colour divided by 255;
- ``none``: left as stored.

`scheme_for_channel` gives the default of a channel name; a name that is itself a scheme (or one of
nnU-Net's: ``noNorm``, ``zscore``, ``rescale_to_0_1``, ``rgb_to_0_1``) chooses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mednets.errors import ConfigError

__all__ = [
    "DEFAULT_HU_WINDOW",
    "PERCENTILES",
    "SCHEMES",
    "ChannelNormalisation",
    "normalise",
    "padding_value",
    "scheme_for_channel",
]

# The soft-tissue abdominal window of configs that ask for `window` normalisation without a window.
DEFAULT_HU_WINDOW = (-200.0, 300.0)
PERCENTILES = (0.5, 99.5)
AIR_HU = -1000.0
SCHEMES = ("ct", "window", "zscore", "rescale", "rgb", "none")
# Channel names that name a scheme (nnU-Net's spellings included).
_NAMED_SCHEMES = {"ct": "ct", "window": "window", "zscore": "zscore", "z-score": "zscore", "rescale": "rescale",
                  "rescale_to_0_1": "rescale", "rgb": "rgb", "rgb_to_0_1": "rgb", "none": "none", "nonorm": "none"}  # fmt: skip


@dataclass(frozen=True)
class ChannelNormalisation:
    """How one input channel is normalised (module docstring).

    Attributes:
        scheme: one of `SCHEMES`.
        low, high: the clip range (``ct``: foreground percentiles; ``window``: the window), else None.
        mean, std: the foreground statistics of ``ct``, else None.
    """

    scheme: str
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError("unknown normalisation", source="normalisation", expected=", ".join(SCHEMES),
                              got=self.scheme)  # fmt: skip
        if self.scheme in ("ct", "window") and not (
            self.low is not None and self.high is not None and self.high > self.low
        ):
            raise ConfigError(f"{self.scheme} normalisation needs low < high", source="normalisation",
                              got={"low": self.low, "high": self.high})  # fmt: skip
        if self.scheme == "ct" and not (self.mean is not None and self.std is not None and self.std > 0):
            raise ConfigError("ct normalisation needs the foreground mean and a positive std", source="normalisation",
                              got={"mean": self.mean, "std": self.std})  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelNormalisation:
        return cls(**{key: (value if key == "scheme" else float(value)) for key, value in data.items()})

    @classmethod
    def window(cls, hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> ChannelNormalisation:
        low, high = (float(v) for v in hu_window)
        return cls("window", low, high)


def scheme_for_channel(channel_name: str, dtype: np.dtype | None = None) -> str:
    """The default scheme of a channel by its name: CT -> ``ct``, 8-bit images -> ``rgb``, else ``zscore``."""
    named = _NAMED_SCHEMES.get(channel_name.strip().lower())
    if named is not None:
        return named
    if dtype is not None and np.dtype(dtype) == np.uint8:
        return "rgb"
    return "zscore"


def normalise(array: np.ndarray | torch.Tensor, rule: ChannelNormalisation) -> np.ndarray | torch.Tensor:
    """One channel's values (any shape) as float32, normalised by `rule`.

    Returns a tensor for a tensor, an array for an array (always a new buffer: inputs are never changed).
    """
    if isinstance(array, torch.Tensor):
        values = array.to(torch.float32, copy=True)
    else:
        values = torch.from_numpy(np.array(array, dtype=np.float32))  # the one copy: a scan can be large
    if rule.scheme == "ct":
        values.clamp_(rule.low, rule.high).sub_(rule.mean).div_(rule.std)
    elif rule.scheme == "window":
        values.sub_(rule.low).div_(rule.high - rule.low).clamp_(0.0, 1.0)
    elif rule.scheme == "rgb":
        values.div_(255.0)
    elif rule.scheme == "zscore" and values.numel():
        values.sub_(values.mean()).div_(max(float(values.std(correction=0)), 1e-6))
    elif rule.scheme == "rescale" and values.numel():
        low, high = _percentiles(values)
        values.sub_(low).div_(max(high - low, 1e-6)).clamp_(0.0, 1.0)
    return values if isinstance(array, torch.Tensor) else values.numpy()


def _percentiles(values: torch.Tensor) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles, from a strided sample of at most ~2 million values (a scan is large)."""
    flat = values.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 2_000_000)].numpy()
    low, high = np.percentile(sample, PERCENTILES)
    return float(low), float(high)


def padding_value(rule: ChannelNormalisation) -> float:
    """The normalised value of what lies outside a scan: air for CT rules, else 0 (nnU-Net's padding)."""
    if rule.scheme in ("ct", "window"):
        return float(normalise(torch.tensor([AIR_HU]), rule)[0])
    return 0.0
