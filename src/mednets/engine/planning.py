"""A training plan from a dataset's fingerprint: voxel size, normalisation, patch or grid, batch size.

nnU-Net's planning ideas, with mednets' models measured instead of modelled:

- **voxel size**: the median of the cases'; on thick-slice data (one axis over 3x coarser than the
  finest, with few voxels along it) that axis takes the 10th percentile of its spacings instead, so
  thin-slice cases are not thrown away (nnU-Net's anisotropy rule). 2D images keep their pixels.
- **normalisation** per channel from `channel_names` (`mednets.data.intensity`): CT clipped to the
  foreground's 0.5-99.5 percentiles and z-scored with its mean and std; other modalities z-scored
  per image; 8-bit colour over 255.
- **patch size** (patch-wise models): from the median cropped case at that voxel size, shrunk along
  its physically longest axis until a training step of batch 2 fits the memory budget. The memory of
  a step is measured, not modelled: the peak RSS of real training steps of the configured model
  (its loss, optimizer, precision and layout) at two input sizes, in a fresh process, and a line
  through them (a count of tensors misses most of it on CPU).
- **grid** (whole-image models such as SADAAn): the median cropped extent, at the largest size that
  fits the budget; the voxel size follows from it (extent / grid, but never finer than the median
  voxel size: a grid larger than the case is padded, not filled by upsampling).
- **batch size**: as many as the budget holds, at least 2, at most what covers 5% of the dataset's
  voxels (nnU-Net's cap: more would show the same voxels in every step).

Every planned value can be overridden by the config (`data.spacing_mm`, `data.patch_size`,
`data.hu_window`, `data.normalisation`, `model.overrides.grid_size`, `train.batch_size`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mednets.atomic import atomic_write_text
from mednets.config import ExperimentConfig
from mednets.data.fingerprint import Fingerprint
from mednets.data.intensity import DEFAULT_HU_WINDOW, SCHEMES, ChannelNormalisation, scheme_for_channel
from mednets.data.preprocessing import PreprocessingPlan
from mednets.errors import ConfigError
from mednets.host_memory import total_memory_bytes
from mednets.models import create_model, get_model_spec

__all__ = [
    "ANISOTROPY",
    "Plan",
    "cache_root",
    "dataset_cache_folder",
    "default_memory_budget_gb",
    "fingerprint_table",
    "plan_dataset",
    "plan_training",
]

ANISOTROPY = 3.0  # an axis this many times coarser than the finest is thick-slice (nnU-Net's threshold)
MAX_BATCH_SHARE = 0.05  # a batch covers at most this share of the dataset's voxels
PLAN_VERSION = 1
_GiB = 2**30


@dataclass
class Plan:
    """What training does with a dataset, and why (`reasons`).

    Attributes:
        model: the registered model it was planned for.
        signature: the fingerprint's dataset signature.
        preprocessing: the cached data's voxel size, orientation, normalisation and crop.
        patch_size: training window of patch-wise models, else None.
        grid: input size of whole-image models, else None.
        batch_size: samples per step.
        median_shape: the median cropped case in voxels at the planned voxel size.
        memory_budget_gb: the budget the patch (or grid) and batch were fitted into.
        estimated_memory_gb: the measured memory of training at that patch and batch (None: the config set
            both, nothing was measured).
        reasons: one line per planned value: where it came from.
    """

    model: str
    signature: str
    preprocessing: PreprocessingPlan
    patch_size: list[int] | None
    grid: list[int] | None
    batch_size: int
    median_shape: list[int]
    memory_budget_gb: float
    estimated_memory_gb: float | None
    reasons: dict[str, str] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "signature": self.signature,
                "preprocessing": self.preprocessing.to_dict(), "patch_size": self.patch_size, "grid": self.grid,
                "batch_size": self.batch_size, "median_shape": self.median_shape,
                "memory_budget_gb": self.memory_budget_gb, "estimated_memory_gb": self.estimated_memory_gb,
                "reasons": self.reasons}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "plans.json") -> Plan:
        """Read a plan (e.g. one written by `mednets plan --out` and edited).

        Raises:
            ConfigError: a missing or malformed key.
        """
        try:
            values = dict(data)
            values["preprocessing"] = PreprocessingPlan.from_dict(values["preprocessing"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"not a mednets plan ({error})", source=source) from error

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def table(self) -> list[tuple[str, str, str]]:
        """(setting, value, why) rows: what `mednets plan` prints."""
        prep = self.preprocessing
        rules = [f"{r.scheme}" + (f" [{r.low:.4g}, {r.high:.4g}]" if r.low is not None else "")
                 + (f" mean {r.mean:.4g} std {r.std:.4g}" if r.mean is not None else "") for r in prep.normalisation]  # fmt: skip
        rows = [
            (
                "voxel size (mm)",
                _listing(prep.spacing) if prep.spacing else "as stored",
                self.reasons.get("spacing", ""),
            ),
            ("orientation", prep.orientation or "-", self.reasons.get("orientation", "")),
            ("normalisation", "; ".join(rules), self.reasons.get("normalisation", "")),
            ("crop", "body / non-zero box" if prep.crop else "none", ""),
            ("median case (voxels)", _listing(self.median_shape), "after cropping, at the planned voxel size"),
        ]
        if self.grid:
            rows.append(("grid", _listing(self.grid), self.reasons.get("grid", "")))
        if self.patch_size:
            rows.append(("patch size", _listing(self.patch_size), self.reasons.get("patch_size", "")))
        rows += [
            ("batch size", str(self.batch_size), self.reasons.get("batch_size", "")),
            ("step memory (GiB)",
             "not measured" if self.estimated_memory_gb is None
             else f"{self.estimated_memory_gb:.2f} of {self.memory_budget_gb:.2f}",
             "peak RSS of the training process, from two measured training steps"),
        ]  # fmt: skip
        return rows


def _listing(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)


def cache_root(config: ExperimentConfig) -> Path:
    """Where preprocessed data is kept: `data.cache_dir`, `$MEDNETS_CACHE` or `~/.cache/mednets`."""
    chosen = config.data.cache_dir or os.environ.get("MEDNETS_CACHE") or Path.home() / ".cache" / "mednets"
    return Path(chosen).expanduser()


def dataset_cache_folder(root: Path, dataset_root: Path) -> Path:
    """The cache folder of one dataset folder: its name and a hash of its absolute path."""
    resolved = dataset_root.resolve()
    return root / "preprocessed" / f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def default_memory_budget_gb(device: torch.device) -> float:
    """A quarter of this machine's memory, at most 8 GiB (CPU); 80% of the GPU's memory (CUDA)."""
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory / _GiB
    return min(8.0, total_memory_bytes() / _GiB / 4)


def _target_spacing(fingerprint: Fingerprint) -> tuple[list[float], str]:
    """The median voxel size, with nnU-Net's anisotropy rule; and why."""
    spacings = fingerprint.spacings()
    target = np.median(spacings, axis=0)
    shapes = np.array([case.shape for case in fingerprint.cases], dtype=float)
    median_shape = np.median(shapes * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(len(target)) if axis != worst]
    thick = target[worst] > ANISOTROPY * min(target[others]) if others else False
    if thick and median_shape[worst] * ANISOTROPY < max(median_shape[others]):
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), float(max(target[others])) + 1e-5)
        return [float(s) for s in target], f"median; thick-slice axis {worst} at the 10th percentile of its spacings"
    return [float(s) for s in target], "median of the cases' voxel sizes"


def _normalisation(fingerprint: Fingerprint, config: ExperimentConfig) -> tuple[list[ChannelNormalisation], str]:
    """One rule per channel: `data.normalisation`, else a window when `data.hu_window` is set, else by name."""
    data = config.data
    names = fingerprint.channel_names
    chosen = list(data.normalisation) if data.normalisation else None
    if chosen is not None and len(chosen) != len(names):
        raise ConfigError("one normalisation per channel", source="data.normalisation", expected=names, got=chosen)
    dtype = np.dtype(fingerprint.cases[0].dtype)
    rules, why = [], []
    for index, name in enumerate(names):
        scheme = chosen[index] if chosen else scheme_for_channel(name, dtype)
        if scheme not in SCHEMES:
            raise ConfigError("unknown normalisation", source="data.normalisation", expected=", ".join(SCHEMES),
                              got=scheme)  # fmt: skip
        if data.hu_window is not None and scheme == "ct" and not chosen:
            scheme = "window"
        if scheme == "window":
            rules.append(ChannelNormalisation.window(data.hu_window or DEFAULT_HU_WINDOW))
        elif scheme == "ct":
            stats = fingerprint.foreground[index]
            if not stats:
                raise ConfigError("CT normalisation needs labelled foreground in the training cases",
                                  source="data.normalisation", got=f"channel {name}")  # fmt: skip
            rules.append(ChannelNormalisation("ct", stats["percentile_00_5"], stats["percentile_99_5"],
                                              stats["mean"], max(stats["std"], 1e-6)))  # fmt: skip
        else:
            rules.append(ChannelNormalisation(scheme))
        why.append(f"{name}: {scheme}" + (" (data.normalisation)" if chosen else ""))
    return rules, "; ".join(why)


@dataclass
class _StepMemory:
    """Peak resident bytes of a training process: fixed (the process, weights, optimizer) + per input voxel of a sample."""

    fixed: float
    per_voxel: float

    def gib(self, voxels: int, batch: int) -> float:
        return (self.fixed + self.per_voxel * voxels * batch) / _GiB


def _probe_sizes(spec: Any, dims: int) -> list[list[int]]:
    """Two input sizes whose training steps are measured: small enough to be quick, large enough to rise above noise."""
    multiple = max(spec.size_multiple, 8)
    sides = (32, 48) if spec.whole_image else (48, 80) if dims == 3 else (128, 256)
    return [[math.ceil(side / multiple) * multiple] * dims for side in sides]


def _peak_rss_of_steps(job: tuple[ExperimentConfig, int, int, list[list[int]]]) -> list[int]:
    """Peak resident bytes after two training steps at each probe size, smallest first (run in a fresh process).

    The step is training's: the configured model, task loss, AdamW, precision, channels-last and
    host-memory setting, at batch 1.
    """
    import contextlib

    from mednets.host_memory import reuse_freed_memory
    from mednets.models.base import memory_format_for
    from mednets.tasks import create_task

    config, in_channels, num_labels, probes = job
    spec = get_model_spec(config.model.name)
    task = create_task(spec.task, num_classes=num_labels, **config.loss)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.train.precision == "bf16")
    keep = reuse_freed_memory() if config.train.keep_freed_memory else contextlib.nullcontext()
    peaks = []
    with keep:
        for probe in probes:
            overrides = {"out_channels": task.out_channels, **config.model.overrides}
            if spec.whole_image:
                overrides["grid_size"] = probe
            model = create_model(config.model.name, **overrides).train()
            layout = memory_format_for(len(probe)) if config.train.channels_last else torch.contiguous_format
            model = model.to(memory_format=layout)
            optimizer = torch.optim.AdamW(model.parameters())
            batch = {"image": torch.randn(1, in_channels, *probe).to(memory_format=layout),
                     "label": torch.zeros(1, *probe, dtype=torch.long),
                     "presence": torch.ones(1, num_labels - 1, dtype=torch.bool)}  # fmt: skip
            _reset_peak_rss()
            for _ in range(2):  # the first step creates AdamW's moments
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    outputs = model(batch["image"])
                task.loss(outputs, batch)["total"].backward()
                optimizer.step()
            del model, optimizer, outputs
            peaks.append(_peak_rss())
    return peaks


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux), so each probe's peak is its own and not the imports' or the last probe's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    """The peak resident bytes since `_reset_peak_rss` (Linux `VmHWM`), else since the process began."""
    import resource

    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measured_step_memory(config: ExperimentConfig, in_channels: int, num_labels: int, dims: int) -> _StepMemory:
    """The memory of a training process, measured: peak RSS of training steps at two input sizes, a line through them.

    Measured in a fresh process, so that neither this process's memory nor its allocator's history
    counts. On CPU the peak RSS of a step is about 2.5x the bytes of the live tensors (oneDNN's
    blocked copies of activations and weights, the kept heap: benchmarks/RESULTS.md), which a count of
    tensors misses.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spec = get_model_spec(config.model.name)
    probes = _probe_sizes(spec, dims)
    key = json.dumps([config.model.name, config.model.overrides, config.loss, config.train.precision,
                      config.train.channels_last, config.train.keep_freed_memory, in_channels, num_labels, probes],
                     sort_keys=True, default=str)  # fmt: skip
    if key not in _MEASURED:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            small, large = pool.submit(_peak_rss_of_steps, (config, in_channels, num_labels, probes)).result()
        voxels = [math.prod(probe) for probe in probes]
        per_voxel = max((large - small) / (voxels[1] - voxels[0]), 1.0)
        _MEASURED[key] = _StepMemory(fixed=max(small - per_voxel * voxels[0], 0.0), per_voxel=per_voxel)
    return _MEASURED[key]


_MEASURED: dict[str, _StepMemory] = {}  # one measurement per model setting and process: it takes seconds


def _shrink_to_budget(
    shape: Sequence[int], spacing: Sequence[float], multiple: int, memory: _StepMemory, budget_gb: float
) -> list[int]:
    """`shape` rounded up to `multiple`, shrunk along the physically longest axis until batch 2 fits the budget."""
    size = [max(multiple, math.ceil(n / multiple) * multiple) for n in shape]
    while memory.gib(math.prod(size), 2) > budget_gb:
        candidates = [axis for axis in range(len(size)) if size[axis] > multiple]
        if not candidates:
            break
        axis = max(candidates, key=lambda a: size[a] * spacing[a])
        size[axis] -= multiple
    return size


def plan_training(
    fingerprint: Fingerprint,
    config: ExperimentConfig,
    *,
    in_channels: int,
    num_labels: int,
    device: torch.device | None = None,
) -> Plan:
    """Plan training of `config.model` on the fingerprinted dataset (module docstring); config values win.

    Raises:
        ConfigError: an impossible setting (a normalisation per channel that does not fit, an unknown scheme).
    """
    spec = get_model_spec(config.model.name)
    data = config.data
    dims = fingerprint.spatial_dims
    reasons: dict[str, str] = {}
    spacing: list[float] | None
    if dims == 2:
        spacing, reasons["spacing"] = None, "2D images keep their pixels"
    elif data.spacing_mm is not None:
        spacing, reasons["spacing"] = [float(s) for s in data.spacing_mm], "data.spacing_mm"
    else:
        spacing, reasons["spacing"] = _target_spacing(fingerprint)
    rules, reasons["normalisation"] = _normalisation(fingerprint, config)
    budget = data.memory_budget_gb or default_memory_budget_gb(device or torch.device("cpu"))
    given = config.model.overrides.get("grid_size") if spec.whole_image else data.patch_size
    measured = given is None or config.train.batch_size is None  # a window and batch the config sets need no measure
    memory = _measured_step_memory(config, in_channels, num_labels, dims) if measured else None
    extents = np.median([case.cropped_extent_mm for case in fingerprint.cases], axis=0)
    case_spacing = np.median(fingerprint.spacings(), axis=0)
    grid = patch = None
    if spec.whole_image:
        if given is not None:
            grid, reasons["grid"] = [int(g) for g in given], "model.overrides.grid_size"
        else:
            natural = np.maximum(1, np.round(extents / np.asarray(spacing or case_spacing))).astype(int)
            assert memory is not None
            grid = _shrink_to_budget(natural, extents / natural, spec.size_multiple, memory, budget)
            reasons["grid"] = "median cropped extent, as large as the memory budget allows"
        if dims == 3 and data.spacing_mm is None:
            # Never finer than the data's voxel size: upsampling adds no information, blurs small organs
            # and costs Dice when the prediction is resampled back (benchmarks/RESULTS.md, issue 21).
            spacing = [float(max(t, e / g)) for t, e, g in zip(spacing, extents, grid, strict=True)]
            reasons["spacing"] = "median cropped extent / grid, never finer than the median voxel size"
    working = np.asarray(spacing) if spacing else case_spacing
    median_shape = [max(1, round(float(v))) for v in extents / working]
    if not spec.whole_image:
        if data.patch_size is not None:
            patch, reasons["patch_size"] = [int(p) for p in data.patch_size], "data.patch_size"
        else:
            assert memory is not None
            patch = _shrink_to_budget(median_shape, working, max(spec.size_multiple, 8), memory, budget)
            reasons["patch_size"] = "median case, shrunk along its longest axis to fit batch 2 in the memory budget"
            if memory.gib(math.prod(patch), 2) > budget:
                raise ConfigError(f"training {config.model.name} needs about {memory.gib(math.prod(patch), 2):.2f} GiB "
                                  f"even at the smallest patch {patch}", source="data.memory_budget_gb",
                                  expected="a larger budget, or data.patch_size", got=budget)  # fmt: skip
    window = grid or patch
    assert window is not None
    voxels = math.prod(window)
    if config.train.batch_size is not None:
        batch, reasons["batch_size"] = config.train.batch_size, "train.batch_size"
    else:
        assert memory is not None
        fits = int((budget * _GiB - memory.fixed) // max(memory.per_voxel * voxels, 1.0))
        dataset_voxels = sum(math.prod(median_shape) for _ in fingerprint.cases)
        cap = max(2, int(MAX_BATCH_SHARE * dataset_voxels // voxels))
        batch = max(2, min(fits, cap))
        reasons["batch_size"] = "what the memory budget holds, 2 to 5% of the dataset's voxels"
    orientation = fingerprint.orientation() if dims == 3 else None
    reasons["orientation"] = "the most common of the cases'" if orientation else ""
    preprocessing = PreprocessingPlan(dims, tuple(spacing) if spacing else None, orientation, tuple(rules))
    return Plan(model=config.model.name, signature=fingerprint.signature, preprocessing=preprocessing,
                patch_size=patch, grid=grid, batch_size=int(batch), median_shape=median_shape,
                memory_budget_gb=round(float(budget), 3), estimated_memory_gb=round(memory.gib(voxels, batch), 3) if memory else None,
                reasons=reasons)  # fmt: skip


def plan_dataset(
    dataset_root: str | os.PathLike[str],
    config: ExperimentConfig,
    *,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[Plan, Fingerprint]:
    """Fingerprint a dataset folder (or reuse its saved fingerprint) and plan `config.model`'s training on it.

    Writes the plan to `out` (JSON, atomically) when given; `data.plan: <that file>` trains with it.

    Raises:
        DatasetError: an invalid dataset folder or an unreadable case.
        ConfigError: an impossible setting.
    """
    from mednets.data.dataset import load_dataset
    from mednets.data.fingerprint import load_or_extract_fingerprint
    from mednets.devices import resolve_device

    dataset = load_dataset(dataset_root, progress=progress)
    folder = dataset_cache_folder(cache_root(config), dataset.root)
    fingerprint = load_or_extract_fingerprint(
        dataset, folder, workers=config.data.preprocess_workers, progress=progress
    )
    plan = plan_training(fingerprint, config, in_channels=len(fingerprint.channel_names), num_labels=len(dataset.labels),
                         device=resolve_device(config.train.device, source="train.device"))  # fmt: skip
    if out is not None:
        plan.save(out)
    return plan, fingerprint


def fingerprint_table(fingerprint: Fingerprint) -> list[tuple[str, str]]:
    """(property, value) rows summarising a fingerprint: what `mednets plan` prints above the plan."""
    spacings = fingerprint.spacings()
    shapes = np.array([case.shape for case in fingerprint.cases])
    rows = [
        ("cases", str(len(fingerprint.cases))),
        ("shape (min / median / max)", " / ".join(_listing([int(v) for v in f(shapes, axis=0)])
                                                  for f in (np.min, np.median, np.max))),
        ("voxel size mm (min / median / max)", " / ".join(_listing([round(float(v), 3) for v in f(spacings, axis=0)])
                                                          for f in (np.min, np.median, np.max))),
    ]  # fmt: skip
    for name, stats in zip(fingerprint.channel_names, fingerprint.foreground, strict=True):
        if stats:
            rows.append((f"{name} in the foreground", f"mean {stats['mean']:.4g}, std {stats['std']:.4g}, "
                         f"0.5-99.5% [{stats['percentile_00_5']:.4g}, {stats['percentile_99_5']:.4g}]"))  # fmt: skip
    counts = fingerprint.presence_counts()
    missing = {name: len(fingerprint.cases) - count for name, count in counts.items() if count < len(fingerprint.cases)}
    rows.append(("absent in", ", ".join(f"{n} ({k})" for n, k in missing.items()) or "no case"))
    return rows
