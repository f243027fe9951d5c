"""Checkpoints that never unpickle untrusted data and are never half-written.

A checkpoint is a folder:
- `model.safetensors`: the model's state dict (safetensors: tensors only, no code);
- `trainer_state.pt`: optimizer, scheduler, RNG states, step (loaded with `weights_only=True`);
- `config.yaml`: the fully resolved experiment config.

The folder is written under a temporary name and then swapped in with renames, so a crash leaves
the previous checkpoint intact; `recover_checkpoint` puts back the complete copy that a crash inside
the swap itself leaves under a hidden name. Files get the process's usual permissions (umask), so a
shared run folder works.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mednets.atomic import UMASK as _UMASK
from mednets.config import ExperimentConfig, load_config, save_config
from mednets.errors import CheckpointError, MednetsError

__all__ = [
    "MODEL_FILE",
    "load_checkpoint_config",
    "load_model_weights",
    "load_trainer_state",
    "recover_checkpoint",
    "save_checkpoint",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or compiled) wrapper."""
    return getattr(model, "module", getattr(model, "_orig_mod", model))


def save_checkpoint(
    folder: str | os.PathLike[str], model: nn.Module, state: dict[str, Any], config: ExperimentConfig
) -> Path:
    """Write model weights, trainer state and config into `folder`, replacing it atomically."""
    folder = Path(folder)
    recover_checkpoint(folder)  # an earlier crash inside the swap: its complete copy first goes back
    temporary, previous = _hidden(folder, "tmp"), _hidden(folder, "old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        weights, aliases = _deduplicated(_unwrap(model).state_dict())
        save_file(weights, temporary / MODEL_FILE, metadata={"aliases": json.dumps(aliases)})
        os.chmod(temporary / MODEL_FILE, 0o666 & ~_UMASK)  # safetensors writes owner-only files
        torch.save(state, temporary / STATE_FILE)
        save_config(config, temporary / CONFIG_FILE)
    except BaseException as error:  # e.g. a full disk: the half-written copy must not keep the space
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, (SafetensorError, RuntimeError)):  # how safetensors and torch.save report I/O errors
            raise CheckpointError(f"cannot write the checkpoint ({error})", source=str(folder)) from error
        raise
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    temporary.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def _hidden(folder: Path, kind: str) -> Path:
    return folder.with_name(f".{folder.name}.{kind}")


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE))


def recover_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Put back the checkpoint `folder` after a crash inside `save_checkpoint`'s swap; True if it did.

    A crash between moving the old copy aside and renaming the new one into place leaves both complete
    under hidden names and no `folder`: the new copy (`.<name>.tmp`) is put in place when complete,
    else the old one (`.<name>.old`).
    """
    folder = Path(folder)
    new, old = _hidden(folder, "tmp"), _hidden(folder, "old")
    if folder.exists() or not old.is_dir():  # no swap was under way
        return False
    # The old copy is only moved aside once the new one is fully written.
    (new if new.is_dir() and _complete(new) else old).rename(folder)
    return True


def _deduplicated(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store and `{alias: stored name}` for entries sharing storage (safetensors stores each once).

    Some models register one module under two names (MONAI's DynUNet does), so its weights appear twice.
    """
    stored: dict[tuple, str] = {}
    weights: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in stored:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        weights[name] = tensor.detach().contiguous().cpu()
    return weights, aliases


def _checkpoint_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise CheckpointError("file missing from checkpoint", source=str(path), expected=f"{name} in {folder}")
    return path


def load_model_weights(folder: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load `model.safetensors` from `folder` into `model` (strict: every key and shape must match).

    Raises:
        CheckpointError: missing or corrupt file, or weights that do not fit the model; names the file.
    """
    path = _checkpoint_file(Path(folder), MODEL_FILE)
    try:
        weights = load_file(path)
        with safe_open(path, framework="pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        weights.update({alias: weights[name] for alias, name in aliases.items()})
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"unreadable weights ({error})", source=str(path)) from error
    target = _unwrap(model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if mismatched:
            k = mismatched[0]
            details.append(f"shape of {k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}")
        raise CheckpointError(
            "weights do not match the model", source=str(path), expected=type(target).__name__, got="; ".join(details)
        )
    target.load_state_dict(weights)
    return model


def load_trainer_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Load `trainer_state.pt` with `weights_only=True` (no arbitrary code can run)."""
    path = _checkpoint_file(Path(folder), STATE_FILE)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        if isinstance(error, pickle.UnpicklingError) and str(error).startswith("Weights only load failed"):
            boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
            why = " ".join(line.strip() for line in str(error).splitlines() if line.strip()
                           and not line.startswith(boilerplate))  # fmt: skip
            raise CheckpointError(f"unreadable trainer state: the safe loader reads only tensors and plain values ({why})",
                                  source=str(path)) from error  # fmt: skip
        raise CheckpointError(
            f"unreadable trainer state ({type(error).__name__}: {error})", source=str(path)
        ) from error


def load_checkpoint_config(folder: str | os.PathLike[str]) -> ExperimentConfig:
    """The experiment config saved with a checkpoint."""
    path = _checkpoint_file(Path(folder), CONFIG_FILE)
    try:
        return load_config(path)
    except MednetsError as error:
        raise CheckpointError(f"invalid config ({str(error).removeprefix(f'{path}: ')})", source=str(path)) from error
