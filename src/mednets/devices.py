"""Turn a device name from a config or an option into a `torch.device` that exists on this machine."""

from __future__ import annotations

import torch

from mednets.errors import ConfigError

__all__ = ["resolve_device"]

KNOWN = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(requested: str | torch.device, *, source: str = "device", local_rank: int = 0) -> torch.device:
    """The device `requested` names ("auto": CUDA when available, else the CPU; "cuda": GPU `local_rank`).

    Raises:
        ConfigError: an unknown name, or a device this machine does not have (naming `source`, the
            option or config key it came from).
    """
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise ConfigError("unknown device", source=source, expected=KNOWN, got=requested) from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = local_rank if device.index is None else device.index
        if index >= count:
            found = (
                f"{count} CUDA device{'s' if count != 1 else ''}"
                if count
                else "no CUDA (a CPU-only torch build, or no GPU)"
            )
            raise ConfigError(f"this machine has {found}", source=source, expected="cpu or an available GPU",
                              got=requested)  # fmt: skip
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("this machine has no MPS device", source=source, expected="cpu", got=requested)
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError("unsupported device", source=source, expected=KNOWN, got=requested)
    return device
